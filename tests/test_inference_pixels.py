"""Preprocessing from DICOM pixel data on real radiographs (pydicom-data RG1/RG3 CR images)."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from inference.errors import ImageNotProcessable
from inference.pixels import decode_pixels, display_uint8


def _read(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name))


@pytest.fixture(scope="module")
def rg3():
    return {name: _read(f"RG3_{name}.dcm") for name in ("UNCR", "J2KR", "J2KI")}


def test_jpeg2000_lossless_decodes_identically_to_uncompressed(rg3):
    unc = decode_pixels(rg3["UNCR"])
    j2k = decode_pixels(rg3["J2KR"])
    assert unc.dtype == np.float32 and unc.shape == (1760, 1760)
    assert np.array_equal(unc, j2k)
    # 10 bits stored: every value fits
    assert unc.min() >= 0 and unc.max() <= 1023 and unc.max() > 900


def test_jpeg2000_lossy_is_close_to_uncompressed(rg3):
    unc = display_uint8(rg3["UNCR"]).astype(np.int16)
    lossy = display_uint8(rg3["J2KI"]).astype(np.int16)
    assert lossy.shape == unc.shape
    assert np.mean(np.abs(unc - lossy)) < 3.0
    assert not np.array_equal(decode_pixels(rg3["UNCR"]), decode_pixels(rg3["J2KI"]))


def test_fifteen_bit_chest_decodes_in_range():
    ds = _read("RG1_J2KR.dcm")
    assert ds.BitsStored == 15
    v = decode_pixels(ds)
    assert v.shape == (ds.Rows, ds.Columns)
    assert 0 <= v.min() and v.max() <= 2 ** 15 - 1 and v.max() > 2 ** 14
    assert np.array_equal(v, decode_pixels(_read("RG1_UNCR.dcm")))


def test_window_applied_and_monochrome1_inverted(rg3):
    ds = rg3["UNCR"]
    values = decode_pixels(ds)
    shown = display_uint8(ds)
    assert shown.dtype == np.uint8 and shown.shape == values.shape
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    expected = 255 - np.rint(np.clip((values - lo) / (hi - lo), 0, 1) * 255)
    assert np.max(np.abs(shown.astype(int) - expected.astype(int))) <= 1
    # the same pixels declared MONOCHROME2 display as the negative
    mono2 = copy.deepcopy(ds)
    mono2.PhotometricInterpretation = "MONOCHROME2"
    assert np.max(np.abs(display_uint8(mono2).astype(int) - (255 - shown.astype(int)))) <= 1


def test_bone_is_bright_on_the_extremity_radiograph(rg3):
    shown = display_uint8(rg3["UNCR"]).astype(float)
    # the tibia shaft runs down the middle of the image, soft tissue either side of it:
    # bone brighter than soft tissue, soft tissue brighter than the open-field air
    # strip at the left of the detector (before the collimated border)
    profile = [shown[400:600, x:x + 40].mean() for x in range(0, 1760, 80)]
    air, bone = min(profile[5:16]), max(profile[5:16])
    assert air < 40  # open field beside the leg (air) is dark
    assert bone > 170  # the tibia is bright
    assert profile[0] > 250 and profile[-1] > 250  # collimated border (no exposure) is white


def test_missing_window_falls_back_to_percentiles(rg3):
    ds = copy.deepcopy(rg3["UNCR"])
    del ds.WindowCenter
    del ds.WindowWidth
    shown = display_uint8(ds)
    assert shown.min() == 0 and shown.max() == 255
    # the top 0.5 % of stored values (MONOCHROME1: the darkest) are clipped to black,
    # the collimated border (stored 0) to white
    assert 0.001 < np.mean(shown == 0) < 0.02
    assert np.mean(shown == 255) > 0.3


def test_for_processing_ignores_window(rg3):
    ds = copy.deepcopy(rg3["UNCR"])
    ds.WindowCenter, ds.WindowWidth = 5, 2  # would make the image almost all white
    bogus = display_uint8(ds)
    assert np.mean((bogus > 0) & (bogus < 255)) > 0.05  # unusable window rejected
    ds.PresentationIntentType = "FOR PROCESSING"
    assert np.mean((display_uint8(ds) > 0) & (display_uint8(ds) < 255)) > 0.5


def test_rgb_secondary_capture_becomes_grey():
    ds = _read("SC_rgb.dcm")
    v = decode_pixels(ds)
    assert v.shape == (ds.Rows, ds.Columns) and v.ndim == 2
    shown = display_uint8(ds)
    assert shown.shape == v.shape and shown.max() == 255


def test_multiframe_takes_first_frame():
    ds = _read("SC_rgb_2frame.dcm")
    assert int(ds.NumberOfFrames) == 2
    assert decode_pixels(ds).shape == (ds.Rows, ds.Columns)


def test_unsupported_photometric_and_missing_pixels_are_reported(rg3):
    ds = copy.deepcopy(rg3["UNCR"])
    ds.PhotometricInterpretation = "HSV"
    with pytest.raises(ImageNotProcessable, match="PhotometricInterpretation"):
        decode_pixels(ds)
    ds = copy.deepcopy(rg3["UNCR"])
    del ds.PixelData
    with pytest.raises(ImageNotProcessable, match="no pixel data"):
        display_uint8(ds)


def test_truncated_pixel_data_is_reported(rg3):
    ds = copy.deepcopy(rg3["UNCR"])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    with pytest.raises(ImageNotProcessable, match="cannot be decoded"):
        decode_pixels(ds)
