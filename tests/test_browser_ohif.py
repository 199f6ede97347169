"""A real viewer shows the node's results: OHIF Viewer (headless chromium) opens a study the node returned
to Orthanc and loads the node's SR; the browser console stays clean and the fracture is in the
measurement panel.

The whole path is real: Orthanc (with its DICOMweb plugin) pushes a study to the node (a subprocess
with its model), the node sends its results back to Orthanc, and OHIF reads them over DICOMweb.
Screenshots and the console log go to var/test-output/ohif/.
"""

from __future__ import annotations

import shutil

import pydicom
import pytest

from tests.browser.fetch_ohif import fetch, have_ohif
from tests.browser.ohif import OhifStack, browser_page, missing, open_sr
from tests.dicomgen import fracatlas_images, write_dx_study
from tests.nodeproc import REPO
from tests.peers import free_port

pytestmark = pytest.mark.slow

OUT = REPO / "var" / "test-output" / "ohif"
#: FracAtlas fixtures on which the shipped model reports a fracture with a region (fracture_regions)
FRACTURE_IMAGES = ("IMG0000019.jpg", "IMG0002180.jpg")
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


@pytest.fixture(scope="module")
def ohif_available():
    """Fetches OHIF once when npm is there (make ohif does the same); fails naming what is missing."""
    if not have_ohif() and shutil.which("npm"):
        fetch()
    gaps = missing()
    if gaps:
        raise RuntimeError("the OHIF browser test needs: " + "; ".join(gaps) + " (.ci/run installs them all)")


def test_ohif_shows_the_nodes_sr(ohif_available, make_node, tmp_path):
    images = [p for p in fracatlas_images(12) if p.name in FRACTURE_IMAGES]
    files = write_dx_study(tmp_path / "study", images)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    node_port = free_port()
    with OhifStack(tmp_path / "stack", modalities={"msknode": ("MSKNODE", "127.0.0.1", node_port)}) as stack:
        pacs = stack.orthanc
        node = make_node(port=node_port, quiet_seconds=1,
                         peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}],
                         pipeline={"enabled": True, "batch_size": 4},
                         sending={"base_delay_seconds": 0.5, "max_delay_seconds": 2, "timeout_seconds": 10,
                                  "poll_seconds": 0.3})
        stack.upload(files)
        pacs.store_to("msknode", pacs.get("/studies"))
        node.wait_for(lambda: node.studies() and node.studies()[0]["state"] == "sent", timeout=240, interval=1,
                      what="the node's results sent to Orthanc")
        srs = pacs.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid,
                                                                        "SOPClassUID": SR_CLASS}})
        assert srs, "the node sent no SR to Orthanc"

        shutil.rmtree(OUT, ignore_errors=True)
        with browser_page(stack.url) as page:
            view = open_sr(page, stack.viewer_url(study_uid), OUT)
        (OUT / "console.txt").write_text("\n".join(view.console) + "\n")
        print(f"\nOHIF screenshots and console log: {OUT}")

    bad = view.bad_lines()
    assert not bad, (f"OHIF did not take the node's SR: {len(bad)} bad console line(s) (all of the console in "
                     f"{OUT}/console.txt):\n{view.bad_summary()}\n\n{view.report()[:3000]}")
    assert "fracture" in view.panel_text.lower(), (
        f"no fracture in OHIF's measurement panel (screenshots in {OUT}):\n{view.report()[:4000]}")
