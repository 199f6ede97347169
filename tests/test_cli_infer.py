"""``dicom-node infer`` end to end on real DICOM files, through the installed command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import yaml
from PIL import Image
from pydicom.data import get_testdata_file

from dicom_node.sc.content import layout
from dicom_node.sc.enum import MAX_SIDE

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "dicom_node.cli"]


def run(*args, check_rc=None):
    p = subprocess.run([*CLI, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert p.returncode == check_rc, p.stdout + p.stderr
    return p


def test_infer_writes_json_and_heatmaps(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    shutil.copy(get_testdata_file("RG3_J2KR.dcm"), src / "leg.dcm")
    shutil.copy(get_testdata_file("RG1_J2KI.dcm"), src / "sub" / "chest.dcm")
    out = tmp_path / "out"
    p = run("infer", src, "--out", out, "--json", check_rc=3)
    docs = json.loads(p.stdout)
    # the chest radiograph is outside the model's domain: declined, no findings, no regions, no heatmap
    chest = next(d for d in docs if d["source"].endswith("chest.dcm"))
    assert not chest["processed"] and chest["reason"].startswith("outside the model's domain")
    assert chest["findings"] == {} and chest["regions"] == [] and chest["fracture_regions"] == []
    assert "heatmap_png" not in chest
    docs = [d for d in docs if d is not chest]
    assert len(docs) == 1 and all(d["processed"] for d in docs)
    for d in docs:
        ds = pydicom.dcmread(d["source"], stop_before_pixels=True)
        assert (d["rows"], d["columns"]) == (ds.Rows, ds.Columns)
        f = d["findings"]["fracture"]
        assert 0 <= f["probability"] <= 1 and f["decision"] in ("absent", "suspected", "definite")
        assert set(f["thresholds"]) == {"suspected", "definite"}
        assert {"anatomy", "view"} <= set(d["findings"])
        for r in d["regions"] + d["fracture_regions"]:
            x0, y0, x1, y1 = r["box"]
            assert 0 <= x0 < x1 <= ds.Columns and 0 <= y0 < y1 <= ds.Rows
        on_disk = json.loads((out / d["json"]).read_text())
        assert on_disk["findings"] == d["findings"]
        png = Image.open(out / d["heatmap_png"])
        # the heatmap PNG is the heatmap secondary capture (within 1024 pixels by default): the image above, the
        # burned-in panel below
        assert png.mode == "RGB" and max(png.size) <= 1024 < MAX_SIDE
        lay = next(lay for n in range(3, 12) if (lay := layout(ds.Rows, ds.Columns, n, 1024)) and
                   (lay.canvas_width, lay.height) == png.size)
        # its image part keeps the source's aspect ratio
        assert abs(lay.width / lay.image_height - ds.Columns / ds.Rows) < 0.01
        assert (out / d["fracture_heatmap_png"]).is_file()
        # output files are named from hashes, not from the input's names
        assert "leg" not in d["json"] and "chest" not in d["json"]
    assert len(json.loads((out / "index.json").read_text())) == 2


def test_infer_reports_unreadable_input_and_exits_3(tmp_path):
    bad = tmp_path / "notdicom.dcm"
    bad.write_bytes(b"this is not DICOM")
    out = tmp_path / "out"
    p = run("infer", get_testdata_file("RG3_J2KI.dcm"), bad, "--out", out, check_rc=3)
    assert "not processed" in p.stdout and "1/2 images processed" in p.stdout
    docs = json.loads((out / "index.json").read_text())
    assert [d["processed"] for d in docs] == [True, False]
    assert "DICOM" in docs[1]["reason"]


def test_infer_heatmap_shows_the_image(tmp_path):
    out = tmp_path / "out"
    run("infer", get_testdata_file("RG3_J2KI.dcm"), "--out", out, "--json", check_rc=0)
    png = np.asarray(Image.open(next(out.glob("*[0-9a-f].png"))).convert("L"), dtype=float)
    # the overlay is the radiograph underneath: bright tibia in the middle, dark air beside it
    h, w = png.shape
    rows = slice(h // 4, h // 2)
    assert png[rows, int(w * 0.45):int(w * 0.55)].mean() > png[rows, int(w * 0.3):int(w * 0.34)].mean()


def test_missing_input_is_an_error(tmp_path):
    p = run("infer", tmp_path / "nope.dcm", "--out", tmp_path / "o")
    assert p.returncode != 0 and "no such file" in (p.stdout + p.stderr)


def test_node_commands_do_not_import_torch():
    code = ("import sys; from dicom_node.cli import build_parser; build_parser(); import inference; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_model_commands_are_registered():
    for cmd in (["model", "pretrain", "--help"], ["model", "fit-heads", "--help"], ["model", "evaluate", "--help"],
                ["infer", "--help"]):
        p = run(*cmd, check_rc=0)
        assert "usage" in p.stdout


def test_infer_heatmap_png_is_the_capture_the_pacs_receives(tmp_path):
    """One blend: at --heatmap-side 2048 the PNG of an image is the pixel data of the heatmap SC written with
    --dicom-out."""
    out, dicom_out = tmp_path / "out", tmp_path / "dicom"
    p = run("infer", get_testdata_file("RG3_J2KR.dcm"), "--out", out, "--dicom-out", dicom_out, "--json",
            "--heatmap-side", "2048", check_rc=0)
    (doc,) = json.loads(p.stdout)
    (heatmap,) = dicom_out.rglob("heatmap_*.dcm")
    sc = pydicom.dcmread(heatmap)
    source = pydicom.dcmread(get_testdata_file("RG3_J2KR.dcm"), stop_before_pixels=True)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert np.array_equal(np.asarray(Image.open(out / doc["heatmap_png"])), sc.pixel_array)


def test_infer_without_dicom_out_renders_the_same_capture(tmp_path):
    """Without --dicom-out no result object is built, yet the heatmap PNG at --heatmap-side 2048 is the same
    pixels as the capture written with it (and the decoder threads change nothing: --decode-workers 0 against 3)."""
    with_objects, without = tmp_path / "with", tmp_path / "without"
    p = run("infer", get_testdata_file("RG3_J2KI.dcm"), "--out", with_objects, "--dicom-out", tmp_path / "dicom",
            "--json", "--decode-workers", "0", "--heatmap-side", "2048", check_rc=0)
    (a,) = json.loads(p.stdout)
    q = run("infer", get_testdata_file("RG3_J2KI.dcm"), "--out", without, "--json", "--decode-workers", "3",
            "--heatmap-side", "2048", check_rc=0)
    (b,) = json.loads(q.stdout)
    (heatmap,) = (tmp_path / "dicom").rglob("heatmap_*.dcm")
    png = np.asarray(Image.open(without / b["heatmap_png"]))
    assert np.array_equal(png, pydicom.dcmread(heatmap).pixel_array)
    assert np.array_equal(png, np.asarray(Image.open(with_objects / a["heatmap_png"])))
    assert {k: v for k, v in a.items() if k not in ("json", "heatmap_png", "fracture_heatmap_png")} == \
        {k: v for k, v in b.items() if k not in ("json", "heatmap_png", "fracture_heatmap_png")}
    run("infer", get_testdata_file("RG3_J2KI.dcm"), "--out", tmp_path / "x", "--decode-workers", "-1", check_rc=2)


def test_infer_heatmap_png_is_a_preview_of_the_capture_by_default(tmp_path):
    """By default the heatmap PNG is the capture laid out again within 1024 pixels, from a half-resolution decode
    of the JPEG 2000 source (without --dicom-out) or from the capture's decode (with it): the same picture, text
    and boxes as the capture at half its size, with or without --dicom-out; the findings are the same."""
    src = get_testdata_file("RG3_J2KR.dcm")  # 1760 x 1760: the capture is 2048 pixels high
    q = run("infer", src, "--out", tmp_path / "without", "--json", check_rc=0)
    (b,) = json.loads(q.stdout)
    p = run("infer", src, "--out", tmp_path / "with", "--dicom-out", tmp_path / "dicom", "--json", check_rc=0)
    (a,) = json.loads(p.stdout)
    preview = np.asarray(Image.open(tmp_path / "without" / b["heatmap_png"])).astype(np.int16)
    from_capture_decode = np.asarray(Image.open(tmp_path / "with" / a["heatmap_png"])).astype(np.int16)
    (heatmap,) = (tmp_path / "dicom").rglob("heatmap_*.dcm")
    capture = pydicom.dcmread(heatmap).pixel_array
    assert max(preview.shape[:2]) <= 1024 < max(capture.shape[:2])
    assert preview.shape == from_capture_decode.shape
    # the two decodes (a wavelet level against the area-downscaled full image) differ by a grey level or two
    assert np.abs(preview - from_capture_decode).mean() < 2.0
    half = np.asarray(Image.fromarray(capture).resize(preview.shape[1::-1], Image.Resampling.BOX)).astype(np.int16)
    image_rows = preview.shape[0] * 3 // 4  # the radiograph and its map; the text panel is below
    assert np.abs(preview[:image_rows] - half[:image_rows]).mean() < 6.0
    assert {k: v for k, v in a.items() if k not in ("json", "heatmap_png", "fracture_heatmap_png")} == \
        {k: v for k, v in b.items() if k not in ("json", "heatmap_png", "fracture_heatmap_png")}
    run("infer", src, "--out", tmp_path / "x", "--heatmap-side", "4096", check_rc=2)


def test_infer_applies_the_modality_filter_of_the_node(tmp_path):
    """An image the model does not read (MR) is reported as the node reports it, and a study with no
    processed image gets no DICOM objects, as the node sends none."""
    out, dicom_out = tmp_path / "out", tmp_path / "dicom"
    p = run("infer", get_testdata_file("MR_small.dcm"), get_testdata_file("RG3_J2KR.dcm"), "--out", out,
            "--dicom-out", dicom_out, "--json", check_rc=3)
    mr, rg = json.loads(p.stdout)
    assert not mr["processed"] and mr["reason"] == "unsupported SOP class or modality (MR)"
    assert "heatmap_png" not in mr and rg["processed"]
    assert len(list(dicom_out.iterdir())) == 1  # the radiograph's study only


def test_infer_uses_the_routing_rules_of_config(tmp_path):
    """With --config, routing rules apply as in the node: a skipping rule, and a rule's heads."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "peers": [{"ae_title": "PACS"}],
        "routing": {"rules": [{"name": "no-chest", "match": {"body_part": ["CHEST"]}, "skip": True},
                              {"name": "legs", "match": {"body_part": ["EXTREMITY"]}, "heads": ["anatomy"]}]},
    }))
    out = tmp_path / "out"
    p = run("--config", config, "infer", get_testdata_file("RG1_J2KI.dcm"), get_testdata_file("RG3_J2KR.dcm"),
            "--out", out, "--json", check_rc=3)
    chest, leg = json.loads(p.stdout)
    assert not chest["processed"] and chest["reason"] == "routing rule 'no-chest'"
    assert leg["processed"] and set(leg["findings"]) == {"anatomy"}
    # without --config the default rule applies: every head on the leg; the chest declined by its pixels
    p = run("infer", get_testdata_file("RG1_J2KI.dcm"), get_testdata_file("RG3_J2KR.dcm"), "--out", out, "--json",
            check_rc=3)
    chest, leg = json.loads(p.stdout)
    assert not chest["processed"] and chest["reason"].startswith("outside the model's domain")
    assert {"fracture", "anatomy", "view"} <= set(leg["findings"])
