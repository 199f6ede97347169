"""Issue 14 items 5 and 6: no data element value and no raw control character in the log; the inference
worker dies with its node."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicom_node.logs import describe_error, escape_controls
from tests.dicomgen import copy_with_new_uids, pydicom_radiographs
from tests.nodeproc import NodeProcess, node_config


def test_escape_and_describe():
    assert escape_controls("a\x00b\nc\x1bd\x7f") == "a\\x00b\\x0ac\\x1bd\\x7f"
    exc = ValueError("Unable to convert 'ZZTESTNAME^SECRET' for (0010, 0010) in VR PN")
    assert describe_error(exc) == "ValueError at tag (0010,0010)"
    assert "SECRET" not in describe_error(exc)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def test_a_value_in_a_bad_element_never_reaches_the_log_even_at_debug(tmp_path):
    """A PatientName sent with a wrong VR (pydicom cannot read it as a name): the log never holds what it
    held, at any level; a control character in a refused UID never reaches the log raw."""
    from pynetdicom import AE

    node = NodeProcess(tmp_path / "node", node_config(tmp_path / "node", logging={"level": "DEBUG"}))
    with node:
        src = copy_with_new_uids(pydicom_radiographs()[3], tmp_path / "a.dcm")
        bad = pydicom.dcmread(src)
        secret = b"ZZTESTNAME^SECRET "
        bad[Tag(0x00100010)] = RawDataElement(Tag(0x00100010), "US", len(secret), secret, 0, False, True)
        ctrl = pydicom.dcmread(src)
        ctrl.SOPInstanceUID = "1.2.3\x1b[31m.4"
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(bad.SOPClassUID, bad.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MSKNODE")
        assert assoc.is_established
        try:
            statuses = [assoc.send_c_store(bad), assoc.send_c_store(ctrl)]
        finally:
            assoc.release()
        # the unreadable name is stored or refused as the listener can read the rest; the bad UID is refused
        assert statuses[0] and statuses[0].Status in (0x0000, 0xC210), statuses
        assert statuses[1] and statuses[1].Status == 0xC210, statuses
        time.sleep(0.5)
        text = node.log()
    assert "SECRET" not in text
    assert "\x1b" not in text


@pytest.mark.slow
def test_the_worker_dies_with_its_node_even_while_the_model_loads(tmp_path):
    node = NodeProcess(tmp_path / "node", node_config(tmp_path / "node", pipeline={"enabled": True}))
    node.start()
    try:
        pid = node.proc.pid
        deadline = time.monotonic() + 30
        workers: list[int] = []
        while time.monotonic() < deadline and not workers:
            workers = [c for c in _children(pid)]
            time.sleep(0.1)
        assert workers, "the node started no worker"
        node.kill()  # SIGKILL, while the worker is still loading the model
        gone_by = time.monotonic() + 5
        while time.monotonic() < gone_by and any(Path(f"/proc/{w}").exists() and
                                                  "Z" not in (Path(f"/proc/{w}/stat").read_text().split()[2:3] or [""])
                                                  for w in workers):
            time.sleep(0.1)
        alive = [w for w in workers if Path(f"/proc/{w}").exists()
                 and Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        assert not alive, f"worker(s) {alive} outlived their node"
    finally:
        node.kill()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _stream(port: int, header: bytes, total: int, chunk: int = 1 << 20) -> int:
    """Send ``header`` then zeros until ``total`` bytes or the node closes; bytes the node took."""
    import socket

    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(header)
        zeros = bytes(chunk)
        try:
            while sent < total:
                s.sendall(zeros)
                sent += chunk
        except OSError:
            pass
    return sent


def test_oversize_pdus_are_refused_unread_and_memory_stays_bounded(tmp_path):
    """An A-ASSOCIATE-RQ declaring ~4 GiB, then 200 MB of zeros: the node closes the connection after at
    most a few MB (what the kernel buffers), its memory does not grow with what was sent, and a
    legitimate echo still works. (Before: memory grew 1 MB per MB sent until the socket closed.)"""
    from tests.peers import echoscu

    node = NodeProcess(tmp_path / "node", node_config(tmp_path / "node"))
    with node:
        before = _rss_mb(node.proc.pid)
        sent = _stream(node.port, b"\x01\x00\xff\xff\xff\xf0", 200 << 20)
        after = _rss_mb(node.proc.pid)
        assert sent < 64 << 20, f"the node took {sent >> 20} MB of a 4 GiB A-ASSOCIATE-RQ"
        assert after - before < 40, (before, after)
        # a P-DATA-TF declaring 1 GiB, without an association: refused the same way
        sent = _stream(node.port, b"\x04\x00\x40\x00\x00\x00", 200 << 20)
        assert sent < 64 << 20
        assert _rss_mb(node.proc.pid) - before < 40
        assert echoscu("127.0.0.1", node.port).returncode == 0
        print(f"RSS before {before:.0f} MB, after the oversize PDUs {_rss_mb(node.proc.pid):.0f} MB")
        assert "connection closed unread" in node.log()


def test_a_trickled_pdu_is_cut_at_its_deadline(tmp_path):
    import socket

    node = NodeProcess(tmp_path / "node", node_config(tmp_path / "node", limits={"pdu_seconds": 2}))
    with node:
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
            s.sendall(b"\x01\x00\x00\x00\x01\x00")  # a 256-byte A-ASSOCIATE-RQ, then one byte a second
            t0 = time.monotonic()
            closed = False
            while time.monotonic() - t0 < 15:
                try:
                    s.sendall(b"\x00")
                    s.settimeout(1.0)
                    if s.recv(1) == b"":
                        closed = True
                        break
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
                    break
            assert closed and time.monotonic() - t0 < 10, "the trickle kept the connection open"


def test_start_up_sweep_removes_stored_files_without_an_index_row(tmp_path):
    """A file written but not indexed before a crash (planted here as such a crash leaves it) is removed at
    the next start; indexed files, and the folders they live in, stay."""
    from tests.peers import storescu

    # the node is the store's only writer (on PostgreSQL storage.shared would default to true, and the
    # sweep would leave these young files alone: tests/test_multinode.py)
    node = NodeProcess(tmp_path / "node", node_config(tmp_path / "node", storage={"shared": False}))
    with node:
        assert storescu("127.0.0.1", node.port, pydicom_radiographs()[:1]).returncode == 0
    kept = list((node.storage / "instances").rglob("*.dcm"))
    assert len(kept) == 1
    stray = [kept[0].parent / ("0" * 32 + ".dcm"), node.storage / "instances" / "ff" / ("f" * 32) / "1.dcm",
             node.storage / "results" / "ee" / ("e" * 32) / "2.dcm"]
    for p in stray:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"DICM" * 1000)
    with node:
        assert not any(p.exists() for p in stray)
        assert not (node.storage / "instances" / "ff").exists()
        assert kept[0].exists() and node.status()["instances"] == 1
        assert "start-up sweep: 3 stored file(s) without an index row removed" in node.log()


def test_a_capped_worker_runs_the_model_within_its_cap(tmp_path):
    """pipeline.memory_limit_mb caps each inference worker's data segment (RLIMIT_DATA); the model still loads
    and reads a study under a 3 GB cap."""
    from tests.peers import storescu

    cfg = node_config(tmp_path / "node", pipeline={"enabled": True, "memory_limit_mb": 3072})
    with NodeProcess(tmp_path / "node", cfg) as node:
        deadline = time.monotonic() + 30
        limits = ""
        while time.monotonic() < deadline and "Max data size" not in limits:
            for w in _children(node.proc.pid):
                text = Path(f"/proc/{w}/limits").read_text() if Path(f"/proc/{w}/limits").exists() else ""
                if str(3072 * 1024 * 1024) in text:
                    limits = text
            time.sleep(0.2)
        line = next(ln for ln in limits.splitlines() if ln.startswith("Max data size"))
        assert line.split()[3:5] == [str(3072 * 1024 * 1024)] * 2, line
        assert storescu("127.0.0.1", node.port, pydicom_radiographs()[3:4]).returncode == 0
        node.wait_for(lambda: "results v1 ready (1 image(s) processed, 0 not)" in node.log(), timeout=180,
                      interval=1, what="results under the cap")
        assert "inference worker memory capped at 3072 MB" in node.log()


def test_a_data_set_past_max_dataset_mb_closes_the_connection_and_memory_stays_bounded(tmp_path):
    """Conformant PDUs, each within the advertised maximum, adding up to a 48 MB data set: past
    limits.max_dataset_mb (8) the node closes the connection, holds nothing of it, and serves the next peer."""
    import numpy as np
    from pynetdicom import AE

    from tests.peers import storescu

    node = NodeProcess(tmp_path / "node", node_config(tmp_path / "node", limits={"max_dataset_mb": 8}))
    with node:
        src = copy_with_new_uids(pydicom_radiographs()[3], tmp_path / "a.dcm")
        big = pydicom.dcmread(src)
        big.Rows, big.Columns = 4000, 6000
        big.PixelData = np.zeros((4000, 6000), np.uint16).tobytes()
        big.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        # a radiograph of the usual size gets in (and warms the receive path up before memory is measured)
        small = copy_with_new_uids(pydicom_radiographs()[3], tmp_path / "b.dcm")
        assert storescu("127.0.0.1", node.port, [small]).returncode == 0
        before = _rss_mb(node.proc.pid)
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(big.SOPClassUID, pydicom.uid.ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MSKNODE")
        assert assoc.is_established
        status = assoc.send_c_store(big)
        assert not status  # no response: the node closed the connection
        assoc.abort()
        grown = _rss_mb(node.proc.pid) - before
        time.sleep(0.5)
        assert "passed limits.max_dataset_mb" in node.log()
        # and the next peer still gets in
        again = copy_with_new_uids(pydicom_radiographs()[3], tmp_path / "c.dcm")
        assert storescu("127.0.0.1", node.port, [again]).returncode == 0
    print(f"\nnode RSS grew {grown:.1f} MB while a peer sent a 48 MB data set (limit 8 MB)")
    assert grown < 40  # holding the data set would take 48 MB and more

