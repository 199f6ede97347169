"""The model bundle, its failures, every head's outputs and the anomaly map geometry, on real radiographs."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from inference import DEFAULT_BUNDLE, load_bundle
from inference.errors import BundleError
from inference.pixels import display_uint8
from inference.results import BinaryFinding, CategoricalFinding, ImageResult

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "msk-xray"


@pytest.fixture(scope="module")
def model():
    return load_bundle(device="cpu")


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "fracatlas" / "images"


@pytest.fixture(scope="module")
def rg():
    """An ankle CR (pydicom-data RG3) and a FracAtlas hand as DX (tests/fixtures): both in the model's domain
    (RG1, the chest radiograph, is declined: see test_inference_domain.py)."""
    from tests.dicomgen import dx_from_image

    return [pydicom.dcmread(get_testdata_file("RG3_J2KI.dcm")), dx_from_image(FIXTURES / "IMG0000015.jpg")]


@pytest.fixture(scope="module")
def results(model, rg):
    return model.predict_datasets(rg, ["rg3", "hand"])


def test_default_bundle_identity_and_card(model):
    info = model.info
    assert info.name == "msk-foundation" and info.version
    assert len(info.weights_sha256) == 64 and info.for_diagnostic_use is False
    card = model.card
    for name in ("fracture", "kl_grade", "anatomy", "view"):
        assert card.heads[name].has_weights, name
    assert card.heads["fracture"].operating_points.suspected <= card.heads["fracture"].operating_points.definite
    assert card.heads["fracture"].concept.scheme_designator == "SCT"
    assert len(card.heads["anatomy"].label_concepts) == len(card.heads["anatomy"].labels)
    # the tumour head has a slot and no weights, and says why
    assert not card.heads["tumour"].has_weights and "no bone tumour data" in card.heads["tumour"].notes
    assert card.anomaly["groups"] == 4 and card.anomaly["file"]
    total = sum(f.stat().st_size for f in DEFAULT_BUNDLE.rglob("*") if f.is_file())
    assert total < 30 * 2 ** 20
    assert (DEFAULT_BUNDLE / "docs" / "README.md").is_file()


def test_every_head_shape_and_range(results):
    for res in results:
        assert isinstance(res, ImageResult) and res.processed, res.reason
        assert isinstance(res.fracture, BinaryFinding) and 0.0 <= res.fracture.probability <= 1.0
        assert res.fracture.decision == res.fracture.operating_points.decide(res.fracture.probability)
        assert res.tumour is None  # no weights shipped
        for f, n in ((res.anatomy, 6), (res.view, 3)):
            assert isinstance(f, CategoricalFinding) and len(f.probabilities) == n
            assert abs(sum(f.probabilities) - 1.0) < 1e-4 and all(0 <= p <= 1 for p in f.probabilities)
            assert f.concept is not None
        if res.kl_grade is not None:
            assert len(res.kl_grade.probabilities) == 5 and res.anatomy.label == "knee"
        json.dumps(res.to_json())


def test_maps_are_in_source_geometry(results, rg):
    for res, ds in zip(results, rg):
        assert (res.rows, res.columns) == (ds.Rows, ds.Columns)
        for m in (res.anomaly_map, res.fracture_map):
            assert m is not None and m.dtype == np.float32 and m.shape == (ds.Rows, ds.Columns)
            assert 0.0 <= float(m.min()) and float(m.max()) <= 1.0
        for r in res.regions + res.fracture_regions:
            x0, y0, x1, y1 = r.box
            assert 0 <= x0 < x1 <= ds.Columns and 0 <= y0 < y1 <= ds.Rows
            assert 0 < r.area_px <= ds.Rows * ds.Columns
            # the region's score is the map's value inside its box
            assert r.score <= float((res.anomaly_map if r.source == "anomaly" else res.fracture_map).max()) + 0.05


def test_non_square_image_maps_follow_the_image(model, rg):
    img = display_uint8(rg[0])[200:1400, 300:1000]  # 1200 x 700 crop of the leg
    res, = model.predict_arrays([img], ["crop"])
    assert (res.rows, res.columns) == img.shape
    assert res.anomaly_map.shape == img.shape and res.fracture_map.shape == img.shape


def test_unprocessable_images_are_reported_in_order(model, rg):
    no_pixels = copy.deepcopy(rg[0])
    del no_pixels.PixelData
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    out = model.predict_datasets([no_pixels, rg[0], mr], ["a", "b", "c"])
    assert [r.image_id for r in out] == ["a", "b", "c"]
    assert not out[0].processed and "no pixel data" in out[0].reason
    assert out[1].processed
    assert not out[2].processed and "modality MR" in out[2].reason


def test_head_subset_skips_other_heads(model, rg):
    res, = model.predict_datasets([rg[0]], heads={"anatomy"})
    assert res.anatomy is not None and res.fracture is None and res.view is None
    assert res.anomaly_map is None and res.regions == ()
    with pytest.raises(ValueError, match="unknown head"):
        model.predict_datasets([rg[0]], heads={"nonsense"})


def test_knee_only_head_runs_on_the_knees_of_a_batch_only(model, rg):
    """The KL grade (a branch head on the tokens the encoder taps) runs only on the rows the gate
    passes, and gives a row the same answer in a mixed batch as alone."""
    imgs = [display_uint8(ds) for ds in rg]
    both = model.predict_arrays(imgs, ["a", "b"], body_parts=["KNEE", ""])
    alone, = model.predict_arrays(imgs[:1], ["a"], body_parts=["KNEE"])
    assert both[0].kl_grade is not None
    np.testing.assert_allclose(both[0].kl_grade.probabilities, alone.kl_grade.probabilities, atol=1e-4)
    assert (both[1].kl_grade is not None) == (both[1].anatomy.label == "knee")
    if model.head_inputs["kl_grade"] is not None:
        x = torch.from_numpy(model.prepare(imgs[0])[0])[None, None]
        with pytest.raises(ValueError, match="taps"):
            model.run_heads(model.tokens(x), {"kl_grade"})


def test_rgb_secondary_capture_is_declined(model):
    """A 100-pixel colour secondary capture is no radiograph the model reads: declined, no findings."""
    res, = model.predict_datasets([pydicom.dcmread(get_testdata_file("SC_rgb.dcm"))])
    assert not res.processed and res.reason.startswith("outside the model's domain")
    assert res.findings() == [] and res.anomaly_map is None and (res.rows, res.columns) == (100, 100)


def test_same_image_same_result(model, rg, results):
    again = model.predict_datasets([rg[0]], ["rg3"])[0]
    assert again.fracture.probability == pytest.approx(results[0].fracture.probability, abs=1e-5)
    assert np.allclose(again.anomaly_map, results[0].anomaly_map, atol=1e-5)


# -- bundle failures ------------------------------------------------------------------------------

@pytest.fixture()
def bundle_copy(tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, dst)
    return dst


def test_missing_weights_file(bundle_copy):
    (bundle_copy / "models" / "heads" / "view.safetensors").unlink()
    with pytest.raises(BundleError, match="view.safetensors is missing"):
        load_bundle(bundle_copy, "cpu")


def test_hash_mismatch(bundle_copy):
    f = bundle_copy / "models" / "mae.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        load_bundle(bundle_copy, "cpu")


def test_malformed_card(bundle_copy):
    card = bundle_copy / "configs" / "metadata.json"
    meta = json.loads(card.read_text())
    card.write_text(card.read_text()[:-20])
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy, "cpu")
    del meta["msk_node"]["architecture"]
    card.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="malformed card.*architecture"):
        load_bundle(bundle_copy, "cpu")
    meta = json.loads((DEFAULT_BUNDLE / "configs" / "metadata.json").read_text())
    meta["msk_node"]["heads"]["fracture"]["operating_points"] = {"suspected": 0.9, "definite": 0.1}
    card.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="operating_points"):
        load_bundle(bundle_copy, "cpu")
    meta = json.loads((DEFAULT_BUNDLE / "configs" / "metadata.json").read_text())
    meta["msk_node"]["heads"]["anatomy"]["arch"]["decision"] = "median"  # only ordered labels have a median
    card.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="anatomy.*decision"):
        load_bundle(bundle_copy, "cpu")


def test_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nowhere", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="metadata.json"):
        load_bundle(tmp_path / "empty", "cpu")


# -- pieces ---------------------------------------------------------------------------------------

def test_geometry_round_trip():
    from inference.preprocess import Geometry

    g = Geometry.for_image(1200, 700, 192)
    assert (g.height, g.width) == (192, 112) and g.off_x == 40 and g.off_y == 0
    box = (100.0, 300.0, 400.0, 900.0)
    assert np.allclose(g.box_to_source(g.box_to_canvas(box)), box)
    assert g.map_to_source(np.ones((12, 12), np.float32)).shape == (1200, 700)


def test_complementary_masks_partition_the_grid(model):
    import torch

    from inference.anomaly import reconstruction_error
    from inference.vit import complementary_keeps

    keeps = complementary_keeps(model.cfg, 4)
    assert sorted(keeps.flatten().tolist()) == list(range(model.cfg.num_patches))
    x, _ = model.prepare(np.full((300, 200), 128, np.uint8))
    err = reconstruction_error(model.mae, torch.from_numpy(x)[None, None], 4)
    assert err.shape == (1, model.cfg.num_patches) and torch.isfinite(err).all()


def test_operating_points_reach_their_targets():
    from inference.training.metrics import operating_points

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(200), np.zeros(800)].astype(int)
    p = np.r_[rng.beta(4, 2, 200), rng.beta(2, 4, 800)]
    op = operating_points(y, p)
    assert np.mean(p[y == 1] >= op["suspected"]) >= 0.90
    assert np.mean(p[y == 0] < op["definite"]) >= 0.95
    assert op["suspected"] <= op["definite"]


# -- training data and the recorded metrics ---------------------------------------------------------

#: Only the training and evaluation tests read the full data sets; every other test uses tests/fixtures.
needs_data = pytest.mark.skipif(
    not (DATA / "fracatlas" / "labels.csv").exists(),
    reason=f"training data missing: put the msk-xray data sets (fracatlas/, knee-kl/) at {DATA.resolve()} "
           "(../shared/data/msk-xray beside the repository)")


@needs_data
def test_fracatlas_split_is_deterministic_and_stratified():
    from inference.training.data import read_fracatlas

    a, b = read_fracatlas(DATA / "fracatlas"), read_fracatlas(DATA / "fracatlas")
    assert [r.split for r in a] == [r.split for r in b]
    val = [r for r in a if r.split == "val"]
    assert abs(len(val) / len(a) - 0.2) < 0.01
    frac_val = np.mean([r.fractured for r in val])
    frac_all = np.mean([r.fractured for r in a])
    assert abs(frac_val - frac_all) < 0.01


@needs_data
def test_evaluate_reproduces_recorded_sample_metrics(tmp_path):
    from inference.training.evaluate import evaluate

    meta = json.loads((DEFAULT_BUNDLE / "configs" / "metadata.json").read_text())
    recorded = meta["msk_node"]["validation_metrics_sample"]
    n = recorded["sample_per_source"]
    m = evaluate(None, str(DATA), str(tmp_path), splits=("val",), sample=n, plots=False, device="cpu")
    got, want = m["splits"]["val"]["headline"], recorded["val"]
    assert set(want) <= set(got)
    for k, v in want.items():
        if v is not None:
            assert got[k] == pytest.approx(v, abs=0.02), k
    assert (tmp_path / "metrics.json").is_file()


@needs_data
def test_fit_heads_trains_the_tumour_slot(tmp_path, bundle_copy):
    """The tumour head ships no weights; fit-heads trains it from a labelled CSV (here a stand-in label)."""
    import csv

    from dicom_node.cli import main

    rows = list(csv.DictReader(open(DATA / "fracatlas" / "labels.csv")))
    pos = [r for r in rows if r["hardware"] == "1"][:30]
    neg = [r for r in rows if r["hardware"] == "0"][:70]
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label"])
        for r in pos + neg:
            w.writerow([r["image_id"], r["hardware"]])
    rc = main(["model", "fit-heads", "--bundle", str(bundle_copy), "--labels", str(labels), "--images",
               str(DATA / "fracatlas" / "images"), "--head", "tumour", "--epochs", "5",
               "--cache-dir", str(tmp_path)])
    assert rc == 0
    model = load_bundle(bundle_copy, "cpu")
    assert model.card.heads["tumour"].has_weights
    res, = model.predict_datasets([pydicom.dcmread(get_testdata_file("RG3_J2KI.dcm"))], heads={"tumour"})
    assert res.tumour is not None and 0 <= res.tumour.probability <= 1
