"""Optional GPU decoding (inference/gpu_decode.py): nvImageCodec decodes the full-size JPEG 2000 a heatmap
capture needs where the model runs on CUDA. Without a GPU its CPU backend runs the same calls, so the values
and the hook into the decoding path are checked here; on a CUDA machine the GPU path is checked as well."""

from __future__ import annotations

import logging

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from inference import gpu_decode
from inference.gpu_decode import NvDecoder, set_gpu_decoder, use_gpu_decoder
from inference.reduced import J2K_SYNTAXES, reduced_frame

RADIOGRAPHS = ["RG1_J2KR.dcm", "RG3_J2KR.dcm", "RG1_J2KI.dcm", "RG3_J2KI.dcm"]


@pytest.fixture
def cpu_decoder():
    nv = NvDecoder("cpu")
    set_gpu_decoder(nv)
    yield nv
    set_gpu_decoder(None)


@pytest.mark.parametrize("name", RADIOGRAPHS)
def test_nvimagecodec_gives_pydicoms_values(name):
    """Lossless and lossy JPEG 2000, 10 and 15 bits: the same stored values as pydicom's decode."""
    ds = pydicom.dcmread(get_testdata_file(name))
    from pydicom.encaps import get_frame

    nv = NvDecoder("cpu")
    values = nv.decode(bytes(get_frame(ds.PixelData, 0, number_of_frames=1)), int(ds.Columns), int(ds.Rows),
                       int(ds.BitsStored), np.dtype(np.uint16))
    assert values is not None and values.dtype == np.uint16
    assert np.array_equal(values, ds.pixel_array)
    # a codestream that is not the image the header describes is not decoded there
    assert nv.decode(bytes(get_frame(ds.PixelData, 0, number_of_frames=1)), int(ds.Columns) + 1, int(ds.Rows),
                     int(ds.BitsStored), np.dtype(np.uint16)) is None


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG3_J2KI.dcm"])
def test_full_size_decodes_go_to_nvimagecodec_and_reduced_ones_do_not(cpu_decoder, name):
    ds = pydicom.dcmread(get_testdata_file(name))
    assert str(ds.file_meta.TransferSyntaxUID) in J2K_SYNTAXES
    full = reduced_frame(ds, 100_000)  # no level small enough: the capture's full-size decode
    assert cpu_decoder.decoded == 1 and np.array_equal(full, ds.pixel_array)
    small = reduced_frame(ds, 256)  # the model's decode: a wavelet level, on the CPU as before
    assert small is not None and max(small.shape) < max(ds.pixel_array.shape)
    assert cpu_decoder.decoded == 1


def test_the_device_decides(caplog):
    """On the CPU nothing changes; on CUDA nvImageCodec is used where it starts, else one log line says why not."""
    with caplog.at_level(logging.INFO, logger="inference.gpu_decode"):
        assert use_gpu_decoder("cpu") is None and gpu_decode.gpu_decoder() is None
        nv = use_gpu_decoder("cuda")
    try:
        if torch.cuda.is_available():
            assert nv is not None and "decoded on cuda by nvImageCodec" in caplog.text
            ds = pydicom.dcmread(get_testdata_file("RG3_J2KR.dcm"))
            assert np.array_equal(reduced_frame(ds, 100_000), ds.pixel_array) and nv.decoded == 1
        else:
            assert nv is None and gpu_decode.gpu_decoder() is None
            assert "JPEG 2000 decoded on the CPU: nvImageCodec cannot start on cuda" in caplog.text
    finally:
        set_gpu_decoder(None)
