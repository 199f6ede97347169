"""The training commands end to end on a small real sample, on CPU with a tiny architecture:
``pack-data`` -> ``pretrain`` (MAE) -> ``pretrain --supervised-epochs`` (adaptation) -> ``fit-heads`` ->
a bundle that loads, verifies and infers. Plus the pieces the GPU run relies on: the device-side
batches standardise like inference does, and a box's patch targets move with their image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from dicom_node.cli import main
from inference import load_bundle
from inference.bundle import load_mae
from inference.preprocess import canvas_uint8
from tests.test_inference_model import DATA, needs_data

TINY = ["--image-size", "64", "--dim", "32", "--depth", "2", "--heads", "2", "--decoder-dim", "32",
        "--decoder-depth", "1", "--decoder-heads", "2"]


@needs_data
def test_pack_pretrain_adapt_fit_heads_infer(tmp_path):
    data = tmp_path / "data"
    assert main(["model", "pack-data", "--data", str(DATA), "--out", str(data), "--sample", "60"]) == 0
    pack = json.loads((data / "pack.json").read_text())
    assert pack["fracatlas"] == 60 and pack["knee"] == 60 and pack["sample"] == 60 and pack["long_side"] == 384
    assert all(p.suffix == ".webp" for p in (data / "fracatlas" / "images").iterdir())

    pre, ad = tmp_path / "pre", tmp_path / "adapted"
    cache = str(tmp_path / "cache.npz")
    assert main(["model", "pretrain", "--data", str(data), "--out", str(pre), "--epochs", "2", "--batch-size", "16",
                 "--cache", cache, "--threads", "2", *TINY]) == 0
    meta = json.loads((pre / "configs" / "metadata.json").read_text())
    tr = meta["msk_node"]["training"]["pretrain"]
    assert tr["epochs_done"] == 2 and tr["data_pack"] == pack["command"]
    assert meta["msk_node"]["architecture"]["config"]["dim"] == 32
    # an encoder continued at a larger input size keeps every weight (fixed sine-cosine positions)
    assert main(["model", "pretrain", "--init", str(pre), "--image-size", "96", "--data", str(data), "--out",
                 str(tmp_path / "pre96"), "--epochs", "1", "--stop-after-epochs", "1", "--batch-size", "16",
                 "--cache", str(tmp_path / "cache96.npz"), "--threads", "2"]) == 0
    big, big_cfg, _ = load_mae(tmp_path / "pre96")
    assert (big_cfg.image_size, big_cfg.grid, big_cfg.dim) == (96, 6, 32) and big.encoder.pos.shape[1] == 36
    with pytest.raises(SystemExit, match="image-size"):
        main(["model", "pretrain", "--init", str(pre), "--supervised-epochs", "1", "--image-size", "96",
              "--data", str(data), "--out", str(tmp_path / "x")])

    assert main(["model", "pretrain", "--init", str(pre), "--supervised-epochs", "2", "--batch-size", "16",
                 "--head-weight", "kl_grade=2",
                 "--data", str(data), "--out", str(ad), "--cache", cache, "--threads", "2"]) == 0
    stage = json.loads((ad / "configs" / "metadata.json").read_text())["msk_node"]["training"]["pretrain"]["adapt"]
    assert len(stage["history"]) == 2 and stage["dev_images"] > 0
    assert stage["best_epoch"] in (0, 1) and "score" in stage["history"][0]["dev"]
    assert stage["epochs_done"] == 2  # also when the last epoch was not the best
    assert stage["dev_split"] == "patient"

    assert main(["model", "fit-heads", "--bundle", str(ad), "--data", str(data), "--head", "fracture",
                 "--head", "kl_grade", "--head", "anatomy", "--head", "anomaly", "--epochs", "2",
                 "--arch", "ordinal_weight=1.0", "--arch", "branch_depth=1", "--cache-dir", str(tmp_path),
                 "--threads", "2"]) == 0
    model = load_bundle(ad, "cpu")
    kl = model.card.heads["kl_grade"]
    assert kl.arch["ordinal_weight"] == 1.0 and kl.arch["image_augmentation"] == 1
    # the KL grade is a branch: its own copy of the last block, reading the tokens after block 0 of 2,
    # trained on augmented images through the frozen encoder; selected on the split the encoder's
    # adaptation held out (by patient), so neither the encoder nor the head trained on it
    assert kl.arch["type"] == "branch" and model.head_inputs["kl_grade"] == 0
    meta = json.loads((ad / "configs" / "metadata.json").read_text())["msk_node"]["heads"]
    assert meta["kl_grade"]["training"]["dev_split"] == "patient" and meta["kl_grade"]["training"]["dev_images"] > 0
    assert model.head_inputs["fracture"] is None
    # the fracture head's probabilities are Platt-scaled on its development split (5 images, 1 fractured)
    cal = meta["fracture"]["calibration"]
    assert cal["method"] == "platt" and (cal["images"], cal["positives"]) == (5, 1) and cal["scale"] > 0
    # its thresholds, like its epoch, come from that development split (issue 17: val only measures)
    assert meta["fracture"]["operating_points"]["split"] == "development"
    assert cal["log_loss_after"] <= cal["log_loss_before"] + 1e-3
    assert {"fracture", "kl_grade", "anatomy"} <= set(model.heads)
    # weights are stored as float16 and come back as the model's float32
    assert all(p.dtype == torch.float32 for p in model.mae.parameters())
    res, = model.predict_datasets([pydicom.dcmread(get_testdata_file("RG3_J2KI.dcm"))])
    assert res.processed and 0 <= res.fracture.probability <= 1
    assert res.anomaly_map is not None and res.anomaly_map.shape == (res.rows, res.columns)

    # calibrating again composes with the first step; thresholds are chosen again; the bundle still verifies
    assert main(["model", "calibrate", "--bundle", str(ad), "--data", str(data), "--head", "fracture",
                 "--cache-dir", str(tmp_path), "--threads", "2"]) == 0
    again = json.loads((ad / "configs" / "metadata.json").read_text())["msk_node"]["heads"]["fracture"]
    assert again["calibration"]["scale_total"] == pytest.approx(again["calibration"]["scale"] * cal["scale"], rel=1e-3)
    assert again["calibration"]["dev_split"] == "patient" and again["calibration"]["calibrated"]
    assert 0 <= again["operating_points"]["suspected"] <= again["operating_points"]["definite"] <= 1
    assert again["operating_points"]["split"] == "development"
    definite = load_bundle(ad, "cpu").card.heads["fracture"].operating_points.definite
    assert definite == again["operating_points"]["definite"]
    with pytest.raises(SystemExit, match="binary heads"):
        main(["model", "calibrate", "--bundle", str(ad), "--data", str(data), "--head", "kl_grade",
              "--cache-dir", str(tmp_path), "--threads", "2"])

    # an ensemble of two branches (seeds 0 and 1), selected on the image-level split of models before 0.4.0
    assert main(["model", "fit-heads", "--bundle", str(ad), "--data", str(data), "--head", "kl_grade", "--epochs", "1",
                 "--arch", "branch_depth=1", "--arch", "members=2", "--dev-split", "image",
                 "--cache-dir", str(tmp_path), "--threads", "2"]) == 0
    entry = json.loads((ad / "configs" / "metadata.json").read_text())["msk_node"]["heads"]["kl_grade"]
    assert entry["training"]["dev_split"] == "image" and entry["training"]["best_epoch"] == [0, 0]
    model = load_bundle(ad, "cpu")
    assert len(model.heads["kl_grade"].members) == 2 and model.head_inputs["kl_grade"] == 0
    res, = model.predict_datasets([pydicom.dcmread(get_testdata_file("RG3_J2KI.dcm"))])
    assert res.processed


def test_development_split_keeps_a_patients_knees_together(tmp_path):
    from inference.training import data as D
    from inference.training.splits import dev_split

    for grade in "01234":
        (tmp_path / "knee-kl" / "train" / grade).mkdir(parents=True)
    patients = [f"9{n:06d}" for n in range(300)]
    for k, p in enumerate(patients):  # the two knees of a patient often differ in grade
        for side, grade in (("L", k % 5), ("R", (k + 1) % 5)):
            (tmp_path / "knee-kl" / "train" / str(grade) / f"{p}{side}.jpg").write_bytes(b"")
    records = D.read_knee(tmp_path / "knee-kl")
    assert {r.group for r in records} == {f"knee:{p}" for p in patients}
    idx = np.arange(len(records))
    tr, dev = dev_split(idx, records)
    assert 0 < len(dev) < len(records) / 4
    assert not {records[i].group for i in tr} & {records[i].group for i in dev}
    # by image (the split before model 0.4.0): patients straddle it
    tr_i, dev_i = dev_split(idx, records, by="image")
    assert {records[i].group for i in tr_i} & {records[i].group for i in dev_i}
    # image-exclusive: the development images of "image" (those an encoder adapted by image never saw),
    # with their patients' other knees left out of training
    tr_x, dev_x = dev_split(idx, records, by="image-exclusive")
    assert dev_x.tolist() == dev_i.tolist()
    assert not {records[i].group for i in tr_x} & {records[i].group for i in dev_x}
    assert set(tr_x) < set(tr_i) and not set(tr_x) & set(dev_x)
    with pytest.raises(ValueError, match="dev split"):
        dev_split(idx, records, by="study")


def test_heads_are_selected_on_a_split_the_encoder_adaptation_held_out():
    from inference.training.splits import clean_dev_split

    def training(*stages):
        return {"pretrain": {"epochs": 1, "adapt_stages": [dict(s) for s in stages]}}

    assert clean_dev_split({}) == clean_dev_split({"pretrain": {"epochs": 3}}) == "patient"
    assert clean_dev_split(training({"dev_split": "patient"})) == "patient"
    # adapted by image (or before the split was recorded): the same images, made patient-disjoint
    assert clean_dev_split(training({"dev_split": "image"})) == "image-exclusive"
    assert clean_dev_split(training({})) == "image-exclusive"
    assert clean_dev_split({"pretrain": {"adapt": {"epochs": 2}}}) == "image-exclusive"
    assert clean_dev_split(training({"dev_split": "image"}, {"dev_split": "image-exclusive"})) == "image-exclusive"
    assert clean_dev_split(training({"dev_split": "image"}, {"dev_split": "patient"})) == "patient"


def test_device_batches_standardise_like_inference():
    from inference.preprocess import prepare
    from inference.training.runtime import DeviceImages

    rng = np.random.default_rng(0)
    img = (rng.random((90, 50)) * 200 + 20).astype(np.uint8)
    canvas, geo = canvas_uint8(img, 64)
    x, black = DeviceImages(canvas[None], [geo]).batch([0])
    want, _ = prepare(img, 64)
    assert x.shape == (1, 1, 64, 64)
    np.testing.assert_allclose(x[0, 0].numpy(), want, atol=0.05)
    assert float(black[0]) == pytest.approx(float(want[0, 0]), abs=0.05)  # the padding


def test_patch_targets_move_with_their_image():
    from inference.training.augment import augment_params, warp

    gen = torch.Generator().manual_seed(3)
    theta = augment_params(4, gen)
    img = torch.zeros(4, 1, 64, 64)
    img[:, :, 8:24, 40:56] = 1.0  # a bright square = a "box" of 1x1 patches at grid 4 (16 px patches)
    tgt = torch.zeros(4, 1, 4, 4)
    tgt[:, :, 0:2, 2:4] = 1.0
    wi, wt = warp(img, theta), warp(tgt, theta)
    for b in range(4):
        centre_img = torch.nonzero(wi[b, 0] > 0.5).float().mean(0) / 64
        centre_tgt = (torch.nonzero(wt[b, 0] > 0.5).float().mean(0) + 0.5) / 4
        assert torch.allclose(centre_img, centre_tgt, atol=0.15), (b, centre_img, centre_tgt)


def test_pretrain_help_lists_the_architecture_options(capsys):
    with pytest.raises(SystemExit):
        main(["model", "pretrain", "--help"])
    out = capsys.readouterr().out
    for opt in ("--dim", "--depth", "--decoder-dim", "--gamma", "--mae-weight"):
        assert opt in out
    assert Path(DATA).name == "msk-xray"


def test_ensemble_head_averages_member_probabilities():
    from inference.heads import build_head, probabilities

    torch.manual_seed(0)
    tokens = torch.randn(5, 17, 32)
    for kind, n_out, arch in (("ordinal", 5, {"type": "attn", "hidden": 16}),
                              ("binary", 1, {"type": "attn+patch", "hidden": 16, "patch_hidden": 8})):
        ens = build_head({**arch, "members": 3}, 32, n_out).eval()
        out = ens(tokens)
        members = [m(tokens) for m in ens.members]
        want = torch.stack([probabilities(kind, o["logits"]) for o in members]).mean(0)
        torch.testing.assert_close(probabilities(kind, out["logits"]), want, atol=1e-5, rtol=1e-4)
        if "patch_logits" in out:
            want_map = torch.stack([torch.sigmoid(o["patch_logits"]) for o in members]).mean(0)
            torch.testing.assert_close(torch.sigmoid(out["patch_logits"]), want_map, atol=1e-5, rtol=1e-4)
        # it saves and loads as one head
        again = build_head({**arch, "members": 3}, 32, n_out)
        again.load_state_dict(ens.state_dict())


def test_branch_head_starts_as_the_encoders_own_last_blocks():
    """Before fine-tuning, a branch reproduces the shared encoder's final tokens from the tapped ones,
    so it starts from what the frozen heads see; the model runs it on the tokens it taps in one pass."""
    from inference.heads import build_head, input_layer
    from inference.vit import MAE, ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=64, patch_size=16, dim=32, depth=3, heads=2, decoder_dim=32, decoder_depth=1,
                    decoder_heads=2)
    enc = MAE(cfg).encoder.eval()
    arch = {"type": "branch", "branch_depth": 2, "hidden": 16}
    layer = input_layer(arch, cfg.depth)
    assert layer == 0
    head = build_head(arch, cfg.dim, 5, enc).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        final, taps = enc.forward_taps(x, taps=(layer,))
        t = taps[layer]
        for blk in head.blocks:
            t = blk(t)
        torch.testing.assert_close(head.norm(t), final)
        assert head(taps[layer])["logits"].shape == (2, 5)
        # training makes a branch's inputs with only the blocks up to the tap
        none, only = enc.forward_taps(x, taps=(layer,), final=False)
        assert none is None and set(only) == {layer}
        torch.testing.assert_close(only[layer], taps[layer])
    # a configuration alone builds the same shape (loading from a bundle); a bad depth is refused
    assert set(build_head(arch, cfg.dim, 5, cfg).state_dict()) == set(head.state_dict())
    with pytest.raises(ValueError, match="branch_depth"):
        build_head({**arch, "branch_depth": 3}, cfg.dim, 5, cfg)
    with pytest.raises(ValueError, match="configuration"):
        build_head(arch, cfg.dim, 5)


def test_ordinal_decisions_mode_and_median():
    from inference.results import CategoricalFinding, decide

    p = np.array([[0.40, 0.05, 0.04, 0.11, 0.40],   # bimodal: the mode is 0, the median grade 3
                  [0.10, 0.20, 0.40, 0.20, 0.10],
                  [0.00, 0.00, 0.00, 0.00, 1.00]])
    assert decide(p, "argmax").tolist() == [0, 2, 4]
    assert decide(p, "median").tolist() == [3, 2, 4]
    f = CategoricalFinding("kl_grade", tuple("01234"), tuple(p[0]), rule="median")
    assert (f.index, f.label, f.confidence) == (3, "3", pytest.approx(0.11))
    with pytest.raises(ValueError, match="decision"):
        CategoricalFinding("kl_grade", tuple("01234"), tuple(p[0]), rule="mean")


def test_platt_scaling_undoes_an_overconfident_scale():
    from inference.training.calibrate import platt
    from inference.training.metrics import log_loss

    rng = np.random.default_rng(0)
    s = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-s))).astype(float)
    z = 5 * s - 3  # overconfident and shifted logits of a calibrated score s
    scale, shift = platt(z, y)
    assert scale == pytest.approx(0.2, rel=0.1) and shift == pytest.approx(0.6, abs=0.15)
    assert log_loss(scale * z + shift, y) < log_loss(z, y) - 0.1
    with pytest.raises(ValueError, match="both classes"):
        platt(z, np.zeros_like(y))


def test_calibration_folds_into_the_heads_last_layer():
    from inference.heads import EnsembleHead, build_head, rescale_logits
    from inference.vit import ViTConfig

    torch.manual_seed(0)
    tokens = torch.randn(3, 17, 32)
    cfg = ViTConfig(image_size=64, patch_size=16, dim=32, depth=2, heads=2)
    for arch in ({"type": "attn+patch"}, {"type": "linear"}, {"type": "attn"}, {"type": "branch", "branch_depth": 1}):
        head = build_head(arch, 32, 1, cfg).eval()
        before = head(tokens)
        rescale_logits(head, 0.5, -1.25)
        after = head(tokens)
        assert torch.allclose(after["logits"], 0.5 * before["logits"] - 1.25, atol=1e-5), arch
        if "patch_logits" in before:  # the localisation map is not touched
            assert torch.equal(after["patch_logits"], before["patch_logits"])
    with pytest.raises(ValueError, match="ensemble"):
        rescale_logits(EnsembleHead([build_head({"type": "linear"}, 32, 1)]), 0.5, 0.0)


@needs_data
def test_device_training_script_runs_every_step_on_a_sample(tmp_path):
    """scripts/train_on_device.py, the one script an accelerator run gets (issue 17, item 4), in its CPU
    smoke mode: a tiny encoder continued at a larger size, adapted, every head, the domain bank, val
    metrics and the card, in one process; what it leaves is a bundle the node loads."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_on_device.py"
    r = subprocess.run([sys.executable, str(script), "--data", str(DATA), "--out", str(tmp_path / "run"), "--smoke",
                        "--threads", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [s["step"] for s in run["steps"]] == ["sample", "tiny encoder", "mae", "adapt", "fracture head",
                                                 "anatomy, view, anomaly", "kl grade head", "domain", "evaluate",
                                                 "card"]
    assert "fracture_auroc" in run["val"] and run["bundle_mb"] < 30
    model = load_bundle(tmp_path / "run" / "bundle", "cpu")
    assert model.cfg.image_size == 96 and {"fracture", "kl_grade", "anatomy", "view"} <= set(model.heads)
    assert model.domain_bank is not None and model.anomaly_mean is not None
    assert not (tmp_path / "run" / "work").exists()  # the caches stay behind
