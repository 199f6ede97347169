"""The stages of dicom_node.stages on real files and the shipped model: load filters as the node does,
route applies rules, encode and to_part10 give the objects the PACS receives."""

from __future__ import annotations

import shutil

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node import stages
from dicom_node.config import RoutingRule, RoutingSection
from dicom_node.errors import EncodingError


@pytest.fixture(scope="module")
def model():
    from inference import load_bundle

    return load_bundle(None, "cpu")


def _rows(paths):
    rows = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        rows.append({"SOPInstanceUID": ds.SOPInstanceUID, "SOPClassUID": ds.SOPClassUID,
                     "Modality": ds.Modality, "BodyPartExamined": ds.get("BodyPartExamined", ""),
                     "ViewPosition": ds.get("ViewPosition", ""), "Rows": ds.Rows, "Columns": ds.Columns,
                     "file_path": str(p)})
    return rows


def test_load_instances_filters_sop_class_and_modality_and_reports_unreadable(tmp_path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not DICOM")
    rg, ct = get_testdata_file("RG3_J2KI.dcm"), get_testdata_file("CT_small.dcm")
    rows = _rows([rg, ct])
    rows.append(dict(rows[0], SOPInstanceUID="1.2.3.4", file_path=str(broken)))
    images = stages.load_instances(rows, lambda rel: rel, calling_ae="PACS")
    assert images[0].processable and images[0].facts.calling_ae == "PACS"
    assert images[1].ds is None and images[1].reason_kind == stages.UNSUPPORTED
    assert images[1].reason == "unsupported SOP class or modality (CT)"
    assert images[2].ds is None and images[2].reason_kind == stages.NOT_PROCESSABLE
    assert images[2].reason.startswith("stored file cannot be read")


def test_unsupported_reason_uses_the_model_vocabulary():
    from pydicom.uid import ComputedRadiographyImageStorage, DigitalMammographyXRayImageStorageForPresentation

    assert stages.unsupported_reason(ComputedRadiographyImageStorage, "CR") is None
    assert stages.unsupported_reason(ComputedRadiographyImageStorage, "") is None
    assert stages.unsupported_reason(ComputedRadiographyImageStorage, "XA") is not None
    assert stages.unsupported_reason(DigitalMammographyXRayImageStorageForPresentation, "MG") is not None
    assert stages.unsupported_reason("1.2.840.10008.5.1.4.1.1.2", "CR") is not None  # CT Image Storage


def test_load_file_matches_load_instances(tmp_path):
    copy = tmp_path / "x.dcm"
    shutil.copy(get_testdata_file("MR_small.dcm"), copy)
    image = stages.load_file(copy)
    assert image.image_id == str(copy) and image.ds is None and image.reason_kind == stages.UNSUPPORTED
    assert (image.rows, image.columns) == (64, 64)
    assert stages.load_file(tmp_path / "missing.dcm").reason.startswith("not a readable DICOM file")


def test_route_skip_heads_and_destinations(model):
    paths = [get_testdata_file("RG1_J2KI.dcm"), get_testdata_file("RG3_J2KI.dcm")]
    images = stages.load_instances(_rows(paths), lambda rel: rel, calling_ae="PACS")
    results = stages.infer(model, images, 2)
    routing = RoutingSection(rules=[
        RoutingRule(name="no-chest", match={"body_part": ["CHEST"]}, skip=True),
        RoutingRule(name="legs", heads=["fracture"], outputs={"sr": ["origin"], "heatmaps": [], "summary": []}),
    ])
    routed = stages.route(images, results, routing, "PACS")
    chest, leg = routed.results
    assert not chest.processed and chest.reason == "routing rule 'no-chest'"
    assert routed.images[0].reason_kind == stages.ROUTING_RULE
    assert leg.processed and leg.fracture is not None and leg.anatomy is None and leg.view is None
    # gsps not named: its default, the origin
    assert routed.destinations == {"sr": ("PACS",), "heatmaps": (), "summary": (), "gsps": ("PACS",)}
    assert routed.processed == [routed.images[1]]
    # the inputs are not changed (the model itself declined the chest: outside its domain)
    assert images[0].reason is None and results[0].reason.startswith("outside the model's domain")


def test_skip_reason_names_the_kind():
    facts = stages.ImageFacts("", "", "", "", "")
    only_rules = [stages.LoadedImage("a", facts, None, "routing rule 'x'", stages.ROUTING_RULE)]
    assert stages.skip_reason(only_rules) == "routing rule: routing rule 'x'"
    mixed = only_rules + [stages.LoadedImage("b", facts, None, "unsupported SOP class or modality (MG)",
                                             stages.UNSUPPORTED)]
    assert stages.skip_reason(mixed).startswith("no processable image: ")


def test_encode_and_to_part10_give_the_objects_in_sending_order(model):
    paths = [get_testdata_file("RG3_J2KI.dcm")]
    images = stages.load_instances(_rows(paths), lambda rel: rel)
    results = stages.infer(model, images, 8)
    objs = stages.encode(images, results, model.info, card=model.card)
    encoded = stages.to_part10(objs)
    assert [e.kind for e in encoded] == ["summary", "heatmap", "gsps", "sr"]
    assert [stages.OUTPUT_OF[e.kind] for e in encoded] == ["summary", "heatmaps", "gsps", "sr"]
    assert encoded[2].dataset.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"
    for e in encoded:
        back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(e.data))
        assert back.SOPInstanceUID == e.dataset.SOPInstanceUID
    pixels = stages.heatmap_pixels(objs, images[0])
    assert pixels is not None and pixels.shape == objs.heatmaps[0].pixel_array.shape
    with pytest.raises(EncodingError):
        stages.encode(images, results, model.info, card=model.card, result_version=1, predecessor=objs.sr)
