"""Issue 14 item 3: decompression bombs are refused at C-STORE time, before anything decodes them.

A JPEG 2000 frame of a few kilobytes that declares 60000 x 60000 (before: stored with 0x0000; decoding
it took the inference worker to 21 GB) is refused with 0xC210 and an Error Comment, so is a codestream
whose size disagrees with Rows/Columns; the good image of the same study is stored; ``infer`` reports
such a file not processed, without decoding it.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from pydicom.encaps import encapsulate, get_frame

from dicom_node import imagesize
from tests.dicomgen import copy_with_new_uids, dx_from_image, pydicom_radiographs
from tests.nodeproc import REPO, NodeProcess, node_config

FIXTURE_IMAGES = REPO / "tests" / "fixtures" / "fracatlas" / "images"


def _j2k(tmp_path: Path) -> Path:
    return copy_with_new_uids(pydicom_radiographs()[5], tmp_path / "j2kr.dcm")  # RG3_J2KR, 1760 x 1760


def _bomb(src: Path, dst: Path, size: int, *, rows_match: bool) -> Path:
    """``src`` (one JPEG 2000 frame) with its SIZ segment declaring ``size`` x ``size``; Rows/Columns too
    when ``rows_match``. The codestream stays a few MB: only its header lies."""
    ds = pydicom.dcmread(src)
    frame = bytearray(get_frame(ds.PixelData, 0, number_of_frames=1))
    assert frame[:4] == b"\xff\x4f\xff\x51"
    frame[8:16] = struct.pack(">II", size, size)  # Xsiz, Ysiz (offsets are 0)
    ds.PixelData = encapsulate([bytes(frame)])
    if rows_match:
        ds.Rows = ds.Columns = size
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(dst, enforce_file_format=True)
    return dst


def _jpeg_baseline(tmp_path: Path, declared: tuple[int, int] | None = None) -> Path:
    """An 8-bit DX encapsulated as JPEG Baseline (Pillow's encoder); ``declared`` patches the SOF0 size."""
    ds = dx_from_image(sorted(FIXTURE_IMAGES.iterdir())[0])
    img = (ds.pixel_array >> 4).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    data = bytearray(buf.getvalue())
    if declared is not None:
        at = data.find(b"\xff\xc0")
        data[at + 5:at + 9] = struct.pack(">HH", *declared)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([bytes(data)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    p = tmp_path / f"jpeg_{declared}.dcm"
    ds.save_as(p, enforce_file_format=True)
    return p


# -- header readers -------------------------------------------------------------------------------------

def test_codestream_headers_give_the_size_of_real_images(tmp_path):
    ds = pydicom.dcmread(pydicom_radiographs()[5])
    assert imagesize.j2k_size(get_frame(ds.PixelData, 0, number_of_frames=1)) == (ds.Rows, ds.Columns)
    assert imagesize.check(ds, ds.file_meta.TransferSyntaxUID, 100_000_000).pixels == ds.Rows * ds.Columns
    jp = pydicom.dcmread(_jpeg_baseline(tmp_path))
    assert imagesize.jpeg_size(get_frame(jp.PixelData, 0, number_of_frames=1)) == (jp.Rows, jp.Columns)
    imagesize.check(jp, uid.JPEGBaseline8Bit, 100_000_000)
    ls = dx_from_image(sorted(FIXTURE_IMAGES.iterdir())[1])
    ls.compress(uid.JPEGLSLossless)
    assert imagesize.jpeg_size(get_frame(ls.PixelData, 0, number_of_frames=1)) == (ls.Rows, ls.Columns)
    imagesize.check(ls, uid.JPEGLSLossless, 100_000_000)


def test_declared_sizes_past_the_limit_or_disagreeing_are_refused(tmp_path):
    src = _j2k(tmp_path)
    big = pydicom.dcmread(_bomb(src, tmp_path / "big.dcm", 60000, rows_match=True))
    with pytest.raises(imagesize.DeclaredSizeError, match="60000 x 60000 x 1 frame"):
        imagesize.check(big, big.file_meta.TransferSyntaxUID, 100_000_000)
    lying = pydicom.dcmread(_bomb(src, tmp_path / "lying.dcm", 60000, rows_match=False))
    with pytest.raises(imagesize.DeclaredSizeError, match="codestream declares 60000 x 60000, the dataset 1760"):
        imagesize.check(lying, lying.file_meta.TransferSyntaxUID, 100_000_000)
    jp = pydicom.dcmread(_jpeg_baseline(tmp_path, declared=(65000, 65000)))
    with pytest.raises(imagesize.DeclaredSizeError, match="codestream declares 65000 x 65000"):
        imagesize.check(jp, uid.JPEGBaseline8Bit, 100_000_000)
    native = pydicom.dcmread(pydicom_radiographs()[3])
    native.NumberOfFrames = 40  # 40 frames of 1760 x 1760 declared
    with pytest.raises(imagesize.DeclaredSizeError, match="more than the limit of 100.0 MP"):
        imagesize.check(native, uid.ExplicitVRLittleEndian, 100_000_000)


# -- at the network edge -------------------------------------------------------------------------------

def _store(port: int, path: Path):
    from pynetdicom import AE

    ds = pydicom.dcmread(path)
    ae = AE("PYNETDICOM")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MSKNODE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def test_bombs_are_refused_at_c_store_and_the_good_image_is_stored(tmp_path):
    src = _j2k(tmp_path)
    bombs = [_bomb(src, tmp_path / "b1.dcm", 60000, rows_match=True),
             _bomb(src, tmp_path / "b2.dcm", 60000, rows_match=False),
             _jpeg_baseline(tmp_path, declared=(65000, 65000))]
    cfg = node_config(tmp_path / "node", limits={"max_image_megapixels": 50})
    with NodeProcess(tmp_path / "node", cfg) as node:
        for b in bombs:
            t0 = time.monotonic()
            rsp = _store(node.port, b)
            assert rsp.Status == 0xC210, hex(rsp.Status)
            assert rsp.ErrorComment.startswith("refused before decoding")
            assert time.monotonic() - t0 < 5  # nothing was decoded
        assert _store(node.port, src).Status == 0x0000  # the study's good image
        assert node.status()["instances"] == 1
        files = list((node.storage / "instances").rglob("*.dcm"))
        assert len(files) == 1
        log = node.log()
        assert log.count("refused with 0xC210: refused before decoding") == 3
        assert "declares 60000 x 60000 x 1 frame(s) = 3600.0 MP, more than the limit of 50.0 MP" in log


def test_infer_reports_a_bomb_not_processed_without_decoding_it(tmp_path):
    src = _j2k(tmp_path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    _bomb(src, inputs / "bomb.dcm", 60000, rows_match=True)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "infer", "--json", "--out", str(tmp_path / "out"),
                        str(inputs)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 3, r.stderr[-2000:]  # 3: some input not processed
    (doc,) = json.loads(r.stdout) if r.stdout.strip().startswith("[") else [json.loads(r.stdout)]
    text = json.dumps(doc)
    assert "limits.max_image_megapixels" in text and "60000 x 60000" in text and "not decoded" in text
    assert time.monotonic() - t0 < 120
