"""Orthanc as the PACS pushes a study to the node through its REST API (C-STORE underneath)."""

from __future__ import annotations

import pydicom

from tests.dicomgen import copy_with_new_uids, fracatlas_images, pydicom_radiographs, write_dx_study
from tests.peers import Orthanc, free_port


def test_orthanc_pushes_a_study_and_the_node_indexes_it(make_node, tmp_path):
    node_port = free_port()
    with Orthanc(tmp_path / "orthanc", aet="PACS", modalities={"msknode": ("MSKNODE", "127.0.0.1", node_port)}) \
            as pacs:
        node = make_node(port=node_port, peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}])
        study_uid = pydicom.uid.generate_uid()
        (tmp_path / "cr").mkdir()
        files = [copy_with_new_uids(p, tmp_path / "cr" / p.name, study_uid=study_uid)
                 for p in pydicom_radiographs()]
        patient_id = pydicom.dcmread(files[0], stop_before_pixels=True).PatientID
        for f in files:  # the pydicom-data files name two patients; a study names one (the node refuses others)
            ds = pydicom.dcmread(f)
            ds.PatientID = patient_id
            ds.save_as(f, enforce_file_format=True)
        files += write_dx_study(tmp_path / "dx", fracatlas_images(3), study_uid=study_uid, patient_id=patient_id)
        for f in files:
            pacs.upload(f)
        pacs.store_to("msknode", pacs.get("/studies"))

        studies = node.wait_for(lambda: [s for s in node.studies() if s["StudyInstanceUID"] == study_uid],
                                timeout=30, what="the study at the node")
        assert studies[0]["instances"] == len(files)
        assert studies[0]["calling_ae"] == "PACS"
        node.wait_for(lambda: node.studies()[0]["state"] == "stable", timeout=30, what="stable")
        # what Orthanc sent is what the node holds: same instances, same transfer syntaxes
        import json

        rows = json.loads(node.cli("instances", study_uid, "--json").stdout)
        sent = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID:
                str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files}
        assert {r["SOPInstanceUID"]: r["TransferSyntaxUID"] for r in rows} == sent
