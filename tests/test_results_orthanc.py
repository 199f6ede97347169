"""Orthanc, as the PACS, accepts every result object over C-STORE and renders the secondary captures."""

from __future__ import annotations

import io
import json

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_node.results_dicom import build_result_objects, write_result_objects
from tests.peers import Orthanc
from tests.test_results_support import MODEL, cr_study, dx_study, make_results


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with Orthanc(tmp_path_factory.mktemp("orthanc"), aet="PACS") as orthanc:
        yield orthanc


def _lookup(pacs: Orthanc, uid: str) -> str:
    """Orthanc's id of the instance with SOP Instance UID ``uid`` (REST /tools/lookup)."""
    hits = json.loads(pacs._request("POST", "/tools/lookup", uid.encode(), "text/plain"))
    hits = [h for h in hits if h["Type"] == "Instance"]
    assert len(hits) == 1, f"{uid} is not in Orthanc"
    return hits[0]["ID"]


def _send(pacs: Orthanc, files) -> None:
    """C-STORE ``files`` to Orthanc with pynetdicom, every status checked.

    (dcmtk's storescu, as tests.peers.storescu calls it, proposes a fixed list of storage SOP classes
    without Comprehensive 3D SR and still exits 0 after "No presentation context", so it cannot show
    that the SR was accepted.)
    """
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title="MSKNODE")
    for pair in {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}:
        ae.add_requested_context(*pair)
    assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title="PACS")
    assert assoc.is_established, "Orthanc refused the association"
    try:
        for f, ds in zip(files, datasets):
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0x0000, f"C-STORE of {f} answered {status}"
    finally:
        assoc.release()


@pytest.mark.parametrize("kind", ["cr", "dx"])
def test_orthanc_accepts_all_objects_and_renders_the_secondary_captures(pacs, kind, tmp_path):
    sources = cr_study(tmp_path) if kind == "cr" else dx_study(tmp_path, n=3, offset=30)
    results = make_results(sources, not_processed=1 if kind == "cr" else None)
    objs = build_result_objects(sources, results, MODEL)
    paths = write_result_objects(objs, tmp_path / "out")
    source_files = [tmp_path / f"src_{i}.dcm" for i in range(len(sources))]
    for ds, p in zip(sources, source_files):
        ds.save_as(p, enforce_file_format=True)

    before = set(pacs.instances())
    _send(pacs, source_files)
    _send(pacs, paths)
    added = set(pacs.instances()) - before
    assert len(added) == len(sources) + len(paths)
    # a presentation state per processed image among them, accepted over C-STORE and stored as sent
    assert len(objs.presentation_states) == sum(r.processed for r in results)
    for pr in objs.presentation_states:
        tags = pacs.get(f"/instances/{_lookup(pacs, str(pr.SOPInstanceUID))}/simplified-tags")
        assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.11.1" and tags["Modality"] == "PR"
        assert tags["ContentLabel"] == "AI_FINDINGS"

    # all in the source study, the results in their own series
    study_ids = {pacs.get(f"/instances/{_lookup(pacs, str(ds.SOPInstanceUID))}/study")["ID"] for ds in sources}
    assert len(study_ids) == 1
    for ds in objs.datasets():
        oid = _lookup(pacs, str(ds.SOPInstanceUID))
        assert pacs.get(f"/instances/{oid}/study")["ID"] in study_ids
        tags = pacs.get(f"/instances/{oid}/simplified-tags")
        assert tags["SOPClassUID"] == ds.SOPClassUID

    sr_tags = pacs.get(f"/instances/{_lookup(pacs, str(objs.sr.SOPInstanceUID))}/simplified-tags")
    assert sr_tags["Modality"] == "SR" and sr_tags["VerificationFlag"] == "UNVERIFIED"

    # Orthanc renders every secondary capture; its PNG is the pixels written
    for path in paths:
        written = pydicom.dcmread(path)
        if written.Modality != "OT":
            continue
        png = pacs.get_bytes(f"/instances/{_lookup(pacs, str(written.SOPInstanceUID))}/preview")
        rendered = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert rendered.shape == written.pixel_array.shape
        diff = np.abs(rendered.astype(int) - written.pixel_array.astype(int))
        assert diff.max() <= 1, f"Orthanc's rendering differs from the written pixels by up to {diff.max()}"

    # sending the same results again replaces them: no new instances
    count = len(pacs.instances())
    again = write_result_objects(build_result_objects(sources, results, MODEL), tmp_path / "again")
    _send(pacs, again)
    assert len(pacs.instances()) == count
    # a re-run (version 2) is a new set of objects next to the first
    v2 = build_result_objects(sources, results, MODEL, result_version=2, predecessor=objs.sr)
    _send(pacs, write_result_objects(v2, tmp_path / "v2"))
    assert len(pacs.instances()) == count + len(paths)
