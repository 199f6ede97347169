"""Bad input over a real association: the node answers with a DICOM status, writes nothing outside its
storage, and goes on storing good images. The malformed data goes onto the wire byte for byte, through
pynetdicom's raw (chunked) file sending and a raw socket peer."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation, Verification

from tests.dicomgen import copy_with_new_uids, pydicom_radiographs
from tests.peers import echoscu, storescu


@pytest.fixture
def raw_send(monkeypatch):
    """pynetdicom sends files exactly as they are on disk (no decoding, no re-encoding)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    monkeypatch.setattr(_config, "ENFORCE_UID_CONFORMANCE", False)


def _assoc(port: int):
    ae = AE(ae_title="PYNETDICOM")
    for ts in (ExplicitVRLittleEndian, JPEG2000, JPEG2000Lossless):  # one context per syntax: sent as it is
        ae.add_requested_context(ComputedRadiographyImageStorage, ts)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MSKNODE")
    assert assoc.is_established
    return assoc


def _store_file(assoc, path: Path) -> int:
    rsp = assoc.send_c_store(path)
    assert rsp is not None and "Status" in rsp, "no C-STORE response"
    return int(rsp.Status)


def _truncated(src: Path, dst: Path, keep: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def _corrupt_j2k(src: Path, dst: Path, *, siz: bool = True) -> Path:
    """Zero the JPEG 2000 main header after its SIZ segment (COD, QCD: the coding parameters) and scramble
    the middle of the code stream; the DICOM framing (item and sequence lengths) and the declared size stay
    valid, so only a decoder can tell. ``siz=False`` zeroes the SIZ segment too: the declared size cannot
    be read, which the node refuses at C-STORE time."""
    data = bytearray(src.read_bytes())
    start = data.find(b"\xff\x4f\xff\x51")  # SOC + SIZ: start of the code stream
    assert start > 0
    siz_end = start + 2 + 2 + int.from_bytes(data[start + 4:start + 6], "big")
    at = siz_end if siz else start + 4
    data[at: at + 40] = b"\x00" * 40
    mid = start + (len(data) - start) // 2
    data[mid: mid + 4096] = os.urandom(4096).replace(b"\xff", b"\x00")
    dst.write_bytes(bytes(data))
    return dst


def _meta_only(dst: Path, sop_uid: str) -> Path:
    """A file with a file meta group naming a CR instance and a zero-length data set."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    pydicom.dcmwrite(dst, ds, enforce_file_format=False)
    return dst


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_bad_datasets_get_failure_status_and_node_keeps_storing(node, tmp_path, raw_send):
    src = pydicom_radiographs()
    rg3_unc, rg3_j2k = src[3], src[4]
    bad = tmp_path / "bad"
    bad.mkdir()
    before_outside = _all_files(tmp_path) - _all_files(node.storage)

    assoc = _assoc(node.port)
    try:
        # 1. truncated in the pixel data, and truncated in the header
        st = _store_file(assoc, _truncated(copy_with_new_uids(rg3_unc, bad / "a.dcm"), bad / "trunc1.dcm", 0.6))
        assert st == 0xC210
        st = _store_file(assoc, _truncated(copy_with_new_uids(rg3_j2k, bad / "b.dcm"), bad / "trunc2.dcm", 0.5))
        assert st == 0xC210
        # 2. a corrupt JPEG 2000 stream: DICOM framing and declared size intact, so it is stored as it
        #    arrived (the pixels are decoded only at inference, which reports the image as not processable);
        #    with its SIZ segment gone too, its size cannot be known without decoding: refused
        corrupt = _corrupt_j2k(copy_with_new_uids(rg3_j2k, bad / "c.dcm"), bad / "corrupt.dcm")
        assert _store_file(assoc, corrupt) == 0x0000
        no_siz = _corrupt_j2k(copy_with_new_uids(rg3_j2k, bad / "d.dcm"), bad / "no_siz.dcm", siz=False)
        assert _store_file(assoc, no_siz) == 0xC210
        # 3. a SOP Instance UID that tries to climb out of the storage directory
        ds = pydicom.dcmread(rg3_unc)
        evil = "1.2.3/../../etc"
        ds.SOPInstanceUID = evil
        ds.file_meta.MediaStorageSOPInstanceUID = evil
        rsp = assoc.send_c_store(ds)
        assert int(rsp.Status) == 0xC210
        ds.StudyInstanceUID = "../../../../tmp/evil"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        assert int(assoc.send_c_store(ds).Status) == 0xC210
        # 4. a zero-length data set
        assert _store_file(assoc, _meta_only(bad / "empty.dcm", generate_uid())) == 0xC210
        # 5. the association goes on: a good image is stored
        good = copy_with_new_uids(rg3_unc, bad / "good.dcm")
        assert _store_file(assoc, good) == 0x0000
    finally:
        assoc.release()

    assert node.alive()
    # nothing written outside the storage path, nothing named from the UIDs
    after_outside = _all_files(tmp_path) - _all_files(node.storage)
    new_outside = {p for p in after_outside - before_outside if not p.is_relative_to(bad)
                   and p.name not in ("node.log",)}
    assert not new_outside, new_outside
    assert not any("etc" in p.parts or "evil" in str(p) for p in _all_files(node.storage))
    assert not Path("/tmp/evil").exists()
    status = node.status()
    assert status["instances"] == 2  # the corrupt J2K and the good image
    assert not list((node.storage / "tmp").iterdir())  # no partial files left behind
    log = node.log()
    assert log.count("refused with 0xC210") == 6
    assert "a frame's codestream declares 0 x 0, the dataset 1760 x 1760" in log
    # and a new association from a dcmtk peer still works
    assert echoscu("127.0.0.1", node.port).returncode == 0


def test_garbage_bytes_on_the_socket_do_not_disturb_the_node(node):
    """A raw-byte peer: nonsense PDUs, a PDU announcing more than it sends, an abrupt close."""
    payloads = [
        os.urandom(64),
        b"\x01\x00" + struct.pack(">I", 0xFFFFFF00) + b"\x00\x01",  # A-ASSOCIATE-RQ claiming 4 GB
        b"\x04\x00" + struct.pack(">I", 10) + b"\x00" * 10,  # P-DATA before any association
        b"",
    ]
    for data in payloads:
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
            if data:
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            try:
                s.recv(1024)
            except OSError:
                pass
    assert node.alive()
    assert echoscu("127.0.0.1", node.port).returncode == 0
    assert storescu("127.0.0.1", node.port, pydicom_radiographs()[3:4]).returncode == 0
    assert node.status()["instances"] == 1


def test_out_of_space_answers_a700_and_keeps_running(make_node, tmp_path):
    # more free space required than any disk has: every store is refused with 0xA700
    node = make_node(min_free_mb=1 << 40)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MSKNODE")
    assert assoc.is_established
    ds = pydicom.dcmread(copy_with_new_uids(pydicom_radiographs()[3], tmp_path / "x.dcm"))
    assert int(assoc.send_c_store(ds).Status) == 0xA700
    assert int(assoc.send_c_store(ds).Status) == 0xA700
    assoc.release()
    assert node.alive()
    assert echoscu("127.0.0.1", node.port).returncode == 0
    assert node.status()["instances"] == 0
    assert "0xA700" in node.log()
