"""Reduced-resolution decoding (inference/reduced.py) against the full decode it replaces.

The model reads 256-pixel images; JPEG 2000 (and HTJ2K) and baseline JPEG images are decoded at the
smallest resolution level that still gives it that, the others in full. Checked on the real CR
radiographs of pydicom-data (RG1: 15 bits, RG3: 10 bits, both MONOCHROME1, uncompressed and JPEG 2000
lossless and lossy) and on FracAtlas-made DX in every transfer syntax the node accepts.

Tolerances (stated here, in docs/performance.md too): on the model's 0..255 input canvas (the image
box-filtered to the model's input size, as the model sees it), the reduced path differs from the full
decode by at most ``MAX_MEAN_ABS`` grey levels on average, with a Pearson correlation of at least
``MIN_CORRELATION``; binary findings' probabilities differ by at most ``MAX_PROB_DIFF`` and categorical
ones' class probabilities by at most ``MAX_PROB_DIFF``; a decision or label may differ only where the
full decode's own call is within ``NEAR`` of the operating point (or of the runner-up class).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file

from dicom_node.sop import TRANSFER_SYNTAXES
from inference import load_bundle
from inference.pixels import decode_pixels, display_uint8
from inference.preprocess import resize_to_canvas
from inference.reduced import J2K_SYNTAXES, JPEG_DCT_SYNTAXES, reduced_frame
from inference.results import BinaryFinding, CategoricalFinding
from tests.dicomgen import dx_from_image, encode_as, fracatlas_images

MAX_MEAN_ABS = 3.0  # grey levels of 255, mean over the model's input canvas
MIN_CORRELATION = 0.985
MAX_PROB_DIFF = 0.06
NEAR = 0.06

RG_FILES = ["RG1_UNCI.dcm", "RG1_J2KI.dcm", "RG1_J2KR.dcm", "RG3_UNCI.dcm", "RG3_J2KI.dcm", "RG3_J2KR.dcm"]
#: what pydicom cannot encode, dcmtk's dcmcjpeg can (option per transfer syntax)
DCMCJPEG = {uid.JPEGExtended12Bit: "+ee", uid.JPEGLossless: "+el", uid.JPEGLosslessSV1: "+e1"}
#: accepted transfer syntaxes with no reduced path: decoded in full (JPEG extended has one for 8 bits only)
FULL_ONLY = [ts for ts in TRANSFER_SYNTAXES if ts not in J2K_SYNTAXES and ts not in JPEG_DCT_SYNTAXES]
FRACATLAS_N = 2


@pytest.fixture(scope="module")
def model():
    return load_bundle(device="cpu")


def _rg(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def _dcmcjpeg(ds: pydicom.Dataset, syntax: str, tmp: Path) -> pydicom.Dataset:
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmtk's dcmcjpeg is not installed (it encodes JPEG extended and lossless here)")
    src, dst = tmp / f"src-{syntax}.dcm", tmp / f"dst-{syntax}.dcm"
    ds.save_as(src, enforce_file_format=True)
    subprocess.run(["dcmcjpeg", DCMCJPEG[syntax], str(src), str(dst)], check=True, capture_output=True)
    out = pydicom.dcmread(dst)
    assert str(out.file_meta.TransferSyntaxUID) == syntax
    return out


@pytest.fixture(scope="module")
def fracatlas_dx(tmp_path_factory):
    """FracAtlas radiographs as 12-bit DX at 1,024 pixels on the long side (enlarged 2x), in every transfer
    syntax the node accepts: {(image name, transfer syntax): dataset}."""
    tmp = tmp_path_factory.mktemp("syntaxes")
    out = {}
    for img in fracatlas_images(FRACATLAS_N, offset=1):
        base = dx_from_image(img, scale=2)
        for ts in TRANSFER_SYNTAXES:
            out[(img.name, ts)] = _dcmcjpeg(base, ts, tmp) if ts in DCMCJPEG else encode_as(base, ts)
    return out


def _canvas255(image: np.ndarray, size: int, source_shape: tuple[int, int]) -> np.ndarray:
    canvas, _ = resize_to_canvas(image, size, source_shape)
    return canvas.astype(np.float64) * 255.0


def _compare_inputs(model, ds) -> tuple[float, float, np.ndarray, np.ndarray]:
    full = display_uint8(ds)
    reduced = model.model_input_image(ds)
    a = _canvas255(full, model.cfg.image_size, full.shape)
    b = _canvas255(reduced, model.cfg.image_size, full.shape)
    return float(np.abs(a - b).mean()), float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), full, reduced


def _assert_findings_agree(full, reduced, where: str) -> None:
    if not full.processed:  # declined (RG1, a chest: outside the model's domain): on both paths, for that reason
        assert not reduced.processed, (where, reduced)
        assert full.reason.startswith("outside the model's domain") and reduced.reason.startswith(
            "outside the model's domain"), (where, full.reason, reduced.reason)
        return
    assert full.processed and reduced.processed, where
    assert (reduced.rows, reduced.columns) == (full.rows, full.columns), where
    by_name = {f.name: f for f in reduced.findings()}
    assert set(by_name) == {f.name for f in full.findings()}, where
    for f in full.findings():
        g = by_name[f.name]
        if isinstance(f, BinaryFinding):
            assert isinstance(g, BinaryFinding)
            assert abs(f.probability - g.probability) <= MAX_PROB_DIFF, (where, f.name, f.probability, g.probability)
            if f.decision != g.decision:
                ops = f.operating_points
                margin = min(abs(f.probability - ops.suspected), abs(f.probability - ops.definite))
                assert margin <= NEAR, (where, f.name, f.decision, g.decision, f.probability)
        else:
            assert isinstance(f, CategoricalFinding) and isinstance(g, CategoricalFinding)
            assert np.max(np.abs(np.subtract(f.probabilities, g.probabilities))) <= MAX_PROB_DIFF, (where, f.name)
            if f.label != g.label:
                top = sorted(f.probabilities, reverse=True)
                assert top[0] - top[1] <= 2 * NEAR, (where, f.name, f.label, g.label, top[:2])


def _assert_regions_in_image(result, where: str) -> None:
    for region in result.reported_regions():
        x0, y0, x1, y1 = region.box
        assert 0 <= x0 < x1 <= result.columns and 0 <= y0 < y1 <= result.rows, (where, region.box)
    for m in (result.fracture_map, result.anomaly_map):
        if m is not None:
            assert m.shape == (result.rows, result.columns), where


# -- which path each transfer syntax takes ---------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in RG_FILES if "J2K" in n])
def test_jpeg2000_radiographs_are_decoded_at_the_smallest_sufficient_level(model, name):
    ds = _rg(name)
    image = model.model_input_image(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    side = model.decode_side
    long_side = max(image.shape)
    assert long_side >= side  # still enough for the model
    assert long_side < max(rows, cols) // 2  # at least two levels down: 1,760 and 1,955 -> 440, 489
    assert -(-long_side // 2) < side  # the next level would be too small
    assert image.shape == (-(-rows // 4), -(-cols // 4))  # the reduced grid of ISO 15444-1 B.5


def test_every_fracatlas_syntax_takes_its_path(model, fracatlas_dx):
    for (name, ts), ds in fracatlas_dx.items():
        reduced = reduced_frame(ds, model.decode_side)
        if ts in J2K_SYNTAXES or (ts == uid.JPEGBaseline8Bit):
            assert reduced is not None, (name, ts)
            assert max(reduced.shape) >= model.decode_side and reduced.shape[0] < int(ds.Rows), (name, ts)
        else:  # uncompressed, deflate, RLE, JPEG-LS, JPEG lossless, 12-bit JPEG extended: decoded in full
            assert reduced is None, (name, ts)
            assert np.array_equal(model.model_input_image(ds), display_uint8(ds)), (name, ts)


def test_full_only_syntaxes_are_the_expected_ones():
    assert set(FULL_ONLY) == {uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian,
                              uid.DeflatedExplicitVRLittleEndian, uid.JPEGLossless, uid.JPEGLosslessSV1,
                              uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.RLELossless}
    assert set(JPEG_DCT_SYNTAXES) == {uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit}  # 8-bit images only


# -- the model's input and findings, reduced against full --------------------------------------------------------
@pytest.mark.parametrize("name", RG_FILES)
def test_rg_model_input_and_findings_match_full_decode(model, name):
    ds = _rg(name)
    mad, r, full, reduced = _compare_inputs(model, ds)
    assert mad <= MAX_MEAN_ABS and r >= MIN_CORRELATION, (name, mad, r)
    if "UNC" in name:
        assert np.array_equal(full, reduced)
    res_full = model.predict_datasets([ds], decoded=[full])[0]
    res_reduced = model.predict_datasets([ds])[0]
    assert (res_reduced.rows, res_reduced.columns) == (int(ds.Rows), int(ds.Columns))
    _assert_findings_agree(res_full, res_reduced, name)
    _assert_regions_in_image(res_reduced, name)


def test_fracatlas_model_input_and_findings_match_full_decode(model, fracatlas_dx):
    keys = list(fracatlas_dx)
    worst = 0.0
    for key in keys:
        ds = fracatlas_dx[key]
        mad, r, _, _ = _compare_inputs(model, ds)
        assert mad <= MAX_MEAN_ABS and r >= MIN_CORRELATION, (key, mad, r)
        worst = max(worst, mad)
    assert worst > 0  # some syntaxes really are decoded another way
    datasets = [fracatlas_dx[k] for k in keys]
    full = model.predict_datasets(datasets, decoded=[display_uint8(ds) for ds in datasets])
    reduced = model.predict_datasets(datasets)
    for key, ds, a, b in zip(keys, datasets, full, reduced):
        assert (b.rows, b.columns) == (int(ds.Rows), int(ds.Columns)), key
        _assert_findings_agree(a, b, str(key))
        _assert_regions_in_image(b, str(key))
        if a.anatomy is not None:
            assert a.anatomy.label == b.anatomy.label, key


# -- MONOCHROME1, modality LUT, VOI: the same functions of each value on both paths ------------------------------
def _variant(ds: pydicom.Dataset, kind: str) -> pydicom.Dataset:
    out = copy.deepcopy(ds)
    if kind == "monochrome2":
        out.PhotometricInterpretation = "MONOCHROME2"
    elif kind == "rescale":  # a modality LUT that moves the values: the window follows in modality units
        out.RescaleSlope, out.RescaleIntercept = 2, -1000
        out.WindowCenter = 2 * float(ds.WindowCenter) - 1000
        out.WindowWidth = 2 * float(ds.WindowWidth) / 3  # narrower: a contrast the original does not show
    elif kind == "narrow window":
        out.WindowCenter, out.WindowWidth = float(ds.WindowCenter) + float(ds.WindowWidth) / 8, \
            float(ds.WindowWidth) / 4
    elif kind == "no window":  # the percentile window of the values decoded
        del out.WindowCenter
        del out.WindowWidth
    elif kind == "sigmoid":
        out.VOILUTFunction = "SIGMOID"
    return out


@pytest.mark.parametrize("name", ["RG3_J2KR.dcm", "RG1_J2KI.dcm"])
@pytest.mark.parametrize("kind", ["as is", "monochrome2", "rescale", "narrow window", "no window", "sigmoid"])
def test_display_transforms_are_the_same_on_both_paths(model, name, kind):
    base = _rg(name)
    ds = _variant(base, kind)
    full = display_uint8(ds).astype(np.float64)
    reduced = display_uint8(ds, model.decode_side).astype(np.float64)
    assert reduced.shape[0] < full.shape[0]  # reduced indeed
    # the full display box-averaged to the reduced grid (edge rows/columns of a partial block left out)
    k = -(-full.shape[0] // reduced.shape[0])
    h, w = full.shape[0] // k, full.shape[1] // k
    pooled = full[:h * k, :w * k].reshape(h, k, w, k).mean(axis=(1, 3))
    diff = np.abs(pooled - reduced[:h, :w])
    assert diff.mean() <= 4.0, (name, kind, diff.mean())
    assert np.corrcoef(pooled.ravel(), reduced[:h, :w].ravel())[0, 1] >= 0.98
    if kind != "as is":  # the variant does change what is shown (so the check above can fail)
        plain = display_uint8(base, model.decode_side).astype(np.float64)
        assert np.abs(plain - reduced).mean() > 4.0, (name, kind)


def test_reduced_values_are_stored_values_before_the_modality_lut(model):
    ds = _rg("RG3_J2KR.dcm")
    stored = reduced_frame(ds, model.decode_side)
    assert stored is not None and stored.dtype == np.uint16  # pydicom's dtype for 10 bits stored, unsigned
    full = decode_pixels(ds)
    assert 0 <= stored.min() and stored.max() <= 2 ** int(ds.BitsStored) - 1
    # a wavelet low-pass of the values: the same range, the same mean
    assert abs(float(stored.mean()) - float(full.mean())) < 0.01 * float(full.max())


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG3_J2KR.dcm"])
def test_a_jpeg_2000_needed_at_full_size_is_decoded_by_the_threaded_decoder_exactly(name):
    """No level small enough (the capture of a small image): Pillow's OpenJPEG at level 0, which can
    use several threads (OPJ_NUM_THREADS), gives exactly pydicom's full decode."""
    ds = pydicom.dcmread(get_testdata_file(name))
    full = reduced_frame(ds, 100_000)
    assert full is not None and np.array_equal(full, ds.pixel_array)
