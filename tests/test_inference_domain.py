"""Knowing what the model cannot read (issue 17): images outside its domain are declined by their pixels,
not only by BodyPartExamined; in-domain radiographs are not."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from inference import DEFAULT_BUNDLE, load_bundle
from inference.domain import OUTSIDE_DOMAIN, body_part_outside

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "fracatlas" / "images"


@pytest.fixture(scope="module")
def model():
    return load_bundle(device="cpu")


def _declined(res) -> bool:
    return not res.processed and (res.reason or "").startswith(OUTSIDE_DOMAIN)


def test_card_records_the_bank_its_threshold_and_hash(model):
    dm = model.card.domain
    assert dm["file"] == "models/domain.safetensors" and dm["file"] in model.card.weights
    assert 0 < dm["threshold"] < 1 and dm["threshold_quantile"] == 0.995 and dm["command"]
    assert model.domain_bank is not None and model.domain_bank.shape == (dm["bank_vectors"], model.cfg.dim)
    assert (DEFAULT_BUNDLE / dm["file"]).stat().st_size < 2 * 2 ** 20


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "RG1_J2KR.dcm"])
@pytest.mark.parametrize("body_part", [True, False])
def test_chest_radiograph_is_declined_with_and_without_body_part(model, name, body_part):
    ds = pydicom.dcmread(get_testdata_file(name))
    assert ds.BodyPartExamined == "CHEST"
    if not body_part:
        del ds.BodyPartExamined
    res, = model.predict_datasets([ds], ["rg1"])
    assert _declined(res), res.reason
    assert "pixels" in res.reason  # decided from the pixels, whatever the header says
    assert res.findings() == [] and res.reported_regions() == () and res.not_localised() == []
    assert (res.rows, res.columns) == (ds.Rows, ds.Columns)
    doc = res.to_json()
    assert doc["processed"] is False and doc["findings"] == {} and doc["fracture_regions"] == []
    json.dumps(doc)


@pytest.mark.parametrize("name", ["RG3_UNCI.dcm", "RG3_J2KR.dcm"])
def test_ankle_radiograph_is_not_declined(model, name):
    res, = model.predict_datasets([pydicom.dcmread(get_testdata_file(name))])
    assert res.processed, res.reason
    assert res.fracture is not None and res.anatomy is not None


def test_msk_fixture_radiographs_are_not_declined(model):
    from inference.pixels import load_image_file

    images = [load_image_file(p) for p in sorted(FIXTURES.glob("*.jpg"))]
    results = model.predict_arrays(images)
    declined = [p.name for p, r in zip(sorted(FIXTURES.glob("*.jpg")), results) if _declined(r)]
    # one known false decline (the card says so): IMG0000025, a whole-arm lateral, mostly soft tissue
    assert set(declined) <= {"IMG0000025.jpg"}, declined


def test_body_part_alone_declines_an_msk_image():
    """BodyPartExamined is an added signal: a header naming the chest declines even MSK-looking pixels."""
    assert body_part_outside("CHEST") and body_part_outside("abdomen") and not body_part_outside("EXTREMITY")
    assert not body_part_outside("") and not body_part_outside(None) and not body_part_outside("KNEE")


def test_body_part_chest_on_msk_pixels(model):
    from inference.pixels import load_image_file

    img = load_image_file(FIXTURES / "IMG0000015.jpg")
    res, = model.predict_arrays([img], body_parts=["CHEST"])
    assert _declined(res) and "BodyPartExamined" in res.reason
    res, = model.predict_arrays([img], body_parts=["HAND"])
    assert res.processed


def test_non_radiographs_are_declined(model):
    rng = np.random.default_rng(0)
    blank = np.full((512, 512), 30, np.uint8)
    noise = rng.integers(0, 255, (512, 512)).astype(np.uint8)
    marker = np.zeros((512, 512), np.uint8)
    marker[200:260, 100:400] = 255  # a marker-only crop
    tiny = rng.integers(0, 255, (40, 60)).astype(np.uint8)
    from inference.pixels import load_image_file

    img = load_image_file(FIXTURES / "IMG0000015.jpg")
    collimated = np.zeros_like(img)  # only a tenth of each side left open
    h, w = img.shape
    collimated[int(h * .45):int(h * .55), int(w * .45):int(w * .55)] = img[int(h * .45):int(h * .55),
                                                                          int(w * .45):int(w * .55)]
    results = model.predict_arrays([blank, noise, marker, tiny, collimated], ["blank", "noise", "marker", "tiny",
                                                                              "collimated"])
    assert all(_declined(r) for r in results), [(r.image_id, r.reason) for r in results]


def test_declined_image_is_a_not_processed_image_in_the_sr(model, tmp_path):
    """A decline reaches the node's SR as a not-processed image with its reason."""
    from dicom_node.results_dicom import build_result_objects
    from dicom_node.sr.sop import read_sr
    from tests.test_results_support import cr_study

    sources = cr_study(tmp_path, names=("RG1_J2KI.dcm", "RG3_J2KI.dcm"))
    for ds in sources:  # two pydicom-data patients made one
        ds.PatientID, ds.PatientName = "MSK17", "TEST^DOMAIN"
    results = model.predict_datasets(sources)
    assert _declined(results[0]) and results[1].processed
    objs = build_result_objects(sources, results, model.info)
    sr = objs.sr
    texts = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]
    assert any(t.startswith(OUTSIDE_DOMAIN) or f"not processed: {OUTSIDE_DOMAIN}" in t for t in texts), texts
    assert sr.CompletionFlagDescription.startswith("1 of 2 images not processed")
    # the processed image's group says what its anomaly map is not
    assert any("not a localiser" in t for t in texts), texts
    read = {i.source_sop_instance_uid: i for i in read_sr(sr).images}
    assert len(read) == 2


def test_copy_of_bundle_without_bank_declines_nothing(model, tmp_path):
    """A bundle without a domain entry (older bundles) processes every image as before."""
    import shutil

    root = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE, root)
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    meta["msk_node"].pop("domain")
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    old = load_bundle(root, device="cpu")
    ds = copy.deepcopy(pydicom.dcmread(get_testdata_file("RG1_J2KR.dcm")))
    del ds.BodyPartExamined
    res, = old.predict_datasets([ds])
    assert res.processed


def test_anomaly_map_is_shown_but_not_reported_as_regions(model):
    """The card says the anomaly map is not a localiser (issue 17): no anomaly regions as findings, and the
    note travels with the result (JSON) and into the SR."""
    assert model.card.anomaly.get("not_a_localiser")
    res, = model.predict_datasets([pydicom.dcmread(get_testdata_file("RG3_J2KI.dcm"))])
    assert res.anomaly_map is not None and res.regions == ()
    assert all(r.source == "fracture" for r in res.reported_regions())
    assert "not a localiser" in res.to_json()["anomaly_map_note"]


def test_random_mask_error_scores_every_patch(model):
    import torch

    from inference.anomaly import random_mask_error

    x = torch.from_numpy(model.prepare(np.full((300, 200), 100, np.uint8) + np.arange(200, dtype=np.uint8) // 2)[0])
    err = random_mask_error(model.mae, x[None, None], passes=10)
    assert err.shape == (1, model.cfg.num_patches) and torch.isfinite(err).all() and (err >= 0).all()
