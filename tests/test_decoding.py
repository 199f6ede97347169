"""Decoding for the model and for the captures (dicom_node/decoding.py, pipeline.decode_workers).

Each image is decoded once for the model, at the smallest resolution giving it its input, and once more
only where that is too small for the heatmap capture, at the smallest resolution giving the capture its
size (a 4,096-pixel JPEG 2000 radiograph: 1/2; a 1,760-pixel one: in full). The capture and the
presentation state are made from that decode, and the decoder threads change no result.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file

import inference.pixels
from dicom_node import stages
from dicom_node.cli_infer import DEFAULT_DECODE_WORKERS
from dicom_node.config import OUTPUT_KINDS, PipelineSection, RoutingSection
from dicom_node.decoding import DecoderPool, decode_image
from dicom_node.results_dicom import build_result_objects
from dicom_node.sc.content import capture_side, render_heatmap
from inference import load_bundle
from inference.pixels import Displayed, display_uint8, fallback_window
from tests.dicomgen import dx_from_image, encode_as, fracatlas_images


@pytest.fixture(scope="module")
def model():
    return load_bundle(device="cpu")


@pytest.fixture(scope="module")
def large_j2k():
    """A DX 4,096 pixels on its long side (a FracAtlas radiograph enlarged 8x) in JPEG 2000 lossless."""
    return encode_as(dx_from_image(fracatlas_images(1, offset=3)[0], scale=8), uid.JPEG2000Lossless)


def _loaded(datasets) -> list[stages.LoadedImage]:
    out = []
    for ds in datasets:
        facts = stages.ImageFacts("", str(ds.Modality), str(ds.get("BodyPartExamined", "") or ""), "",
                                  str(ds.SOPClassUID))
        out.append(stages.LoadedImage(str(ds.SOPInstanceUID), facts, ds, rows=int(ds.Rows), columns=int(ds.Columns)))
    return out


class CountingDecodes:
    """Counts the real decoder's calls (inference.pixels.decode_pixels, which every display decode goes through)."""

    def __init__(self, monkeypatch):
        self.calls: list[int | None] = []
        real = inference.pixels.decode_pixels

        def counted(ds, min_long_side=None):
            self.calls.append(min_long_side)
            return real(ds, min_long_side)

        monkeypatch.setattr(inference.pixels, "decode_pixels", counted)


def test_capture_decoded_at_the_level_it_needs(model, large_j2k):
    ds = large_j2k
    need = capture_side(int(ds.Rows), int(ds.Columns))
    d = decode_image(ds, model.decode_side)
    assert model.decode_side <= max(d.model.image.shape) < 2 * model.decode_side  # the model's level
    assert d.capture is not None
    half = (-(-int(ds.Rows) // 2), -(-int(ds.Columns) // 2))
    assert d.capture.image.shape == half  # 1/2: the smallest level at least `need` (1,750) long
    assert need <= max(half) < 2 * need
    # the capture from it has the size and, within resampling, the look of the one from a full decode
    result = model.predict_datasets([ds], decoded=[d.model.image])[0]
    assert (result.rows, result.columns) == (int(ds.Rows), int(ds.Columns)) and max(ds.Rows, ds.Columns) == 4096
    from_reduced = render_heatmap(d.capture.image, result, model.info).astype(np.int16)
    from_full = render_heatmap(display_uint8(ds), result, model.info).astype(np.int16)
    assert from_reduced.shape == from_full.shape and max(from_full.shape[:2]) == 2048
    assert np.abs(from_reduced - from_full).mean() < 2.0
    with pytest.raises(Exception, match="smaller than the capture"):  # a model-sized decode is refused
        render_heatmap(d.model.image, result, model.info)


def test_one_decode_per_image_for_model_capture_and_presentation_state(model, monkeypatch):
    rg3 = pydicom.dcmread(get_testdata_file("RG3_J2KR.dcm"))
    unc = pydicom.dcmread(get_testdata_file("RG3_UNCI.dcm"))
    unc.SOPInstanceUID = unc.SOPInstanceUID + ".9"  # another image of the same study
    del unc.WindowCenter, unc.WindowWidth  # a percentile window: the presentation state needs the values
    images = _loaded([rg3, unc])
    spy = CountingDecodes(monkeypatch)
    results = stages.infer(model, images, batch_size=2)
    # JPEG 2000 at 1,760: 1/4 for the model, in full for the capture; uncompressed: in full once
    assert sorted(spy.calls, key=str) == sorted([model.decode_side, 1760, model.decode_side], key=str)
    assert images[0].decoded.capture.image.shape == (1760, 1760) and images[1].decoded.capture is None
    n = len(spy.calls)
    objs = stages.encode(images, results, model.info, card=model.card)
    assert len(spy.calls) == n  # the encode stage decodes nothing again
    assert len(objs.heatmaps) == 2 and len(objs.presentation_states) == 2
    # the same objects as from fresh full decodes
    fresh = build_result_objects([rg3, unc], results, model.info, created=None)
    for a, b in zip(objs.heatmaps, fresh.heatmaps):
        assert np.array_equal(a.pixel_array, b.pixel_array)
    voi = objs.presentation_states[1].SoftcopyVOILUTSequence[0]
    lo, hi = fallback_window(unc)
    assert float(voi.WindowCenter) == pytest.approx((lo + hi) / 2 + 0.5, abs=1e-3)


def test_encode_without_infer_decodes_itself(model):
    ds = pydicom.dcmread(get_testdata_file("RG3_J2KI.dcm"))
    result = model.predict_datasets([ds])[0]
    objs = build_result_objects([ds], [result], model.info)  # no decodes given: one, at the capture's level
    full = Displayed(display_uint8(ds), fallback_window(ds))
    given = build_result_objects([ds], [result], model.info, displays={str(ds.SOPInstanceUID): full})
    assert np.array_equal(objs.heatmaps[0].pixel_array, given.heatmaps[0].pixel_array)


def test_decoder_threads_change_no_result(model):
    datasets = [encode_as(dx_from_image(p, scale=2), ts) for p, ts in
                zip(fracatlas_images(5), [uid.JPEG2000Lossless, uid.ExplicitVRLittleEndian, uid.JPEGBaseline8Bit,
                                          uid.HTJ2K, uid.RLELossless])]
    inline = stages.infer(model, _loaded(datasets), batch_size=2)
    with DecoderPool(3) as pool:
        threaded = stages.infer(model, _loaded(datasets), batch_size=2, decoder=pool)
    for a, b in zip(inline, threaded):
        assert a.to_json() == b.to_json()


def test_pool_keeps_order_and_decodes_one_batch_ahead():
    started: list[int] = []
    lock = threading.Lock()

    def work(x: int) -> int:
        with lock:
            started.append(x)
        time.sleep(0.01)
        return x * x

    batches = [list(range(k * 4, k * 4 + 4)) for k in range(5)]
    with DecoderPool(4) as pool:
        for k, out in enumerate(pool.batches(work, batches)):
            assert out == [x * x for x in batches[k]]
            time.sleep(0.1)  # the model's turn: the next batch is decoded meanwhile, not the one after
            with lock:
                assert set(started) == set(range(0, min(k + 2, 5) * 4)), (k, sorted(started))
    with DecoderPool(0) as pool:
        assert list(pool.batches(work, batches)) == [[x * x for x in b] for b in batches]
    with pytest.raises(ValueError):
        DecoderPool(-1)


def test_decode_workers_default_and_not_processable(model):
    assert DEFAULT_DECODE_WORKERS == PipelineSection().decode_workers
    ds = pydicom.dcmread(get_testdata_file("RG3_UNCI.dcm"))
    del ds.PixelData
    images = _loaded([ds])
    with DecoderPool(2) as pool:
        res, = stages.infer(model, images, 1, decoder=pool)
    assert not res.processed and "no pixel data" in res.reason
    routed = stages.route(images, [res], RoutingSection())
    assert routed.destinations == {k: () for k in OUTPUT_KINDS}


def test_blend_of_the_pixels_above_the_floor_equals_the_whole_image_formula():
    from dicom_node.sc import enum
    from dicom_node.sc.content import blend, colour_lut

    rng = np.random.default_rng(16)
    display = rng.integers(0, 256, (301, 257), dtype=np.uint8)
    for heat in (rng.random((301, 257), dtype=np.float32) ** 3, np.zeros((301, 257), np.float32),
                 np.full((301, 257), enum.MAP_FLOOR, np.float32), np.ones((301, 257), np.float32)):
        grey = np.repeat(display[..., None], 3, axis=2).astype(np.float32)
        colour = colour_lut()[np.clip(np.rint(heat * 255), 0, 255).astype(np.int64)].astype(np.float32)
        alpha = (enum.MAX_ALPHA * np.clip((heat - enum.MAP_FLOOR) / (1.0 - enum.MAP_FLOOR), 0.0, 1.0))[..., None]
        expected = np.clip(np.rint(grey * (1.0 - alpha) + colour * alpha), 0, 255).astype(np.uint8)
        assert np.array_equal(blend(display, heat), expected)
    assert np.array_equal(blend(display, None), np.repeat(display[..., None], 3, axis=2))
