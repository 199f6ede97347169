"""Issue 14 item 2: connections that never associate cannot lock the configured peers out.

Raw sockets from Python on loopback play the hostile peer; they connect from 127.0.0.2.. (Linux routes
all of 127/8 to lo) so that the node sees them as other addresses than dcmtk's storescu/echoscu, which
connect from 127.0.0.1 as a configured peer would. Every wait is bounded.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from dicom_node.connections import ConnectionBudget
from tests.dicomgen import pydicom_radiographs
from tests.nodeproc import NodeProcess, node_config
from tests.peers import echoscu, storescu


def _connect(port: int, source: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    return s


def _closed_by_node(s: socket.socket, within: float) -> float | None:
    """Seconds until the node closed ``s`` (None: still open after ``within``)."""
    t0 = time.monotonic()
    s.settimeout(0.2)
    while time.monotonic() - t0 < within:
        try:
            if s.recv(4096) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0
    return None


def _limits(**kw) -> dict:
    return {"max_pending_connections": 8, "max_pending_per_address": 4, "associate_seconds": 3, **kw}


# -- the budget on its own (real sockets, no node) ---------------------------------------------------

def _pair() -> socket.socket:
    a, b = socket.socketpair()
    b.close()  # only a's identity and its shutdown matter here
    return a


def test_budget_per_address_limit_and_eviction_of_the_busiest_address():
    budget = ConnectionBudget(max_associations=2, max_pending=4, max_pending_per_address=2, associate_seconds=60)
    socks = [_pair() for _ in range(8)]
    assert budget.connect(socks[0], "10.0.0.1") and budget.connect(socks[1], "10.0.0.1")
    assert not budget.connect(socks[2], "10.0.0.1")  # the address is at its limit: refused
    assert budget.connect(socks[3], "10.0.0.2")
    assert budget.connect(socks[4], "10.0.0.3")
    # the budget is full (4): a fifth address evicts the oldest connection of the busiest address
    assert budget.connect(socks[5], "10.0.0.4")
    assert socks[0].fileno() != -1 and budget.counts().evicted == 1 and budget.counts().pending == 4
    assert budget.counts().refused == 1
    # associations: two slots, whatever is pending
    assert budget.request(101) and budget.request(102) and not budget.request(103)
    budget.closed(101)
    assert budget.request(103)


def test_budget_expires_pending_connections_and_forgets_closed_ones():
    budget = ConnectionBudget(max_associations=2, max_pending=4, max_pending_per_address=4, associate_seconds=5)
    a, peer = socket.socketpair()
    b = _pair()
    budget.connect(a, "10.0.0.1")
    budget.connect(b, "10.0.0.1")
    b.close()
    budget.expire(time.monotonic())
    assert budget.counts().pending == 1  # the closed one is forgotten
    budget.expire(time.monotonic() + 6)
    assert budget.counts().pending == 0 and budget.counts().expired == 1
    peer.settimeout(1)
    assert peer.recv(1) == b""  # shut down: the reading thread sees the end at once
    a.close()
    peer.close()


# -- against a running node ---------------------------------------------------------------------------

def test_idle_sockets_do_not_lock_out_a_configured_peer(tmp_path):
    """Nine idle sockets with max_associations 4 (before: storescu failed with 'Local Limit Exceeded' until
    they were dropped after 30 s): four are held (the per-address limit), the rest closed at once; echoscu and
    storescu from the peer's address succeed at once; the four are closed after limits.associate_seconds."""
    cfg = node_config(tmp_path / "node", node={"max_associations": 4}, limits=_limits())
    with NodeProcess(tmp_path / "node", cfg) as node:
        socks = [_connect(node.port, "127.0.0.2") for _ in range(9)]
        try:
            refused = [s for s in socks[4:] if _closed_by_node(s, 2.0) is not None]
            assert len(refused) == 5, "connections over the per-address limit are closed at once"
            t0 = time.monotonic()
            assert echoscu("127.0.0.1", node.port, timeout=20).returncode == 0
            files = pydicom_radiographs()[:1]
            r = storescu("127.0.0.1", node.port, files, timeout=60)
            assert r.returncode == 0, r.stderr
            assert time.monotonic() - t0 < 10
            # the held four: closed at their association deadline (3 s after connecting), not 30 s
            waits = [_closed_by_node(s, 8.0) for s in socks[:4]]
            assert all(w is not None for w in waits), waits
        finally:
            for s in socks:
                s.close()
        log = node.log()
        assert "limits.max_pending_per_address" in log
        assert "no association request within 3 s" in log
        assert node.wait_for(lambda: node.status()["instances"] == 1, timeout=10, what="the stored instance")


def test_reconnecting_attackers_on_many_addresses_never_lock_the_peer_out(tmp_path):
    """Attackers on four addresses keep reconnecting the moment the node closes them, while a peer sends:
    every one of its associations succeeds."""
    cfg = node_config(tmp_path / "node", node={"max_associations": 4},
                      limits=_limits(max_pending_connections=6, max_pending_per_address=3, associate_seconds=2))
    with NodeProcess(tmp_path / "node", cfg) as node:
        stop = threading.Event()
        opened = [0]

        def attack(source: str) -> None:
            held: list[socket.socket] = []
            while not stop.is_set():
                try:
                    held.append(_connect(node.port, source))
                    opened[0] += 1
                except OSError:
                    time.sleep(0.05)
                for s in list(held):  # reconnect as soon as the node drops one
                    s.settimeout(0)
                    try:
                        if s.recv(1) == b"":
                            held.remove(s)
                            s.close()
                    except (BlockingIOError, TimeoutError):
                        pass
                    except OSError:
                        held.remove(s)
                        s.close()
                time.sleep(0.05)
            for s in held:
                s.close()

        threads = [threading.Thread(target=attack, args=(f"127.0.0.{i}",), daemon=True) for i in range(2, 6)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            for _ in range(3):
                r = echoscu("127.0.0.1", node.port, timeout=20)
                assert r.returncode == 0, r.stdout + r.stderr
            r = storescu("127.0.0.1", node.port, pydicom_radiographs()[:1], timeout=60)
            assert r.returncode == 0, r.stderr
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=10)
        assert opened[0] > 20, "the attackers kept connecting"


def test_a_trickled_association_request_is_cut_at_the_association_deadline(tmp_path):
    """Sockets that send a PDU header, then a byte every 0.5 s (before: they kept their slots for the whole
    120 s measured): closed limits.associate_seconds after connecting, while the peer stores."""
    cfg = node_config(tmp_path / "node", node={"max_associations": 4}, limits=_limits(pdu_seconds=60))
    with NodeProcess(tmp_path / "node", cfg) as node:
        socks = [_connect(node.port, "127.0.0.2") for _ in range(4)]
        t0 = time.monotonic()
        closed_at: dict[int, float] = {}
        try:
            for s in socks:
                s.sendall(b"\x01\x00\x00\x00\x01\x00")  # an A-ASSOCIATE-RQ of 256 bytes, never finished
            assert storescu("127.0.0.1", node.port, pydicom_radiographs()[:1], timeout=60).returncode == 0
            while len(closed_at) < len(socks) and time.monotonic() - t0 < 15:
                for i, s in enumerate(socks):
                    if i in closed_at:
                        continue
                    try:
                        s.sendall(b"\x00")
                    except OSError:
                        closed_at[i] = time.monotonic() - t0
                        continue
                    if _closed_by_node(s, 0.1) is not None:
                        closed_at[i] = time.monotonic() - t0
                time.sleep(0.5)
        finally:
            for s in socks:
                s.close()
        assert len(closed_at) == 4 and max(closed_at.values()) < 6, closed_at


def test_associations_over_max_associations_are_refused_transiently_and_the_log_says_why(tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    cfg = node_config(tmp_path / "node", node={"max_associations": 2}, limits=_limits())
    with NodeProcess(tmp_path / "node", cfg) as node:
        ae = AE("PYNETDICOM")
        ae.add_requested_context(Verification)
        held = [ae.associate("127.0.0.1", node.port, ae_title="MSKNODE") for _ in range(2)]
        try:
            assert all(a.is_established for a in held)
            third = ae.associate("127.0.0.1", node.port, ae_title="MSKNODE")
            assert third.is_rejected
            rj = third.acceptor.primitive
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit
            held[0].release()
            again = ae.associate("127.0.0.1", node.port, ae_title="MSKNODE")
            assert again.is_established
            assert again.send_c_echo().Status == 0x0000
            again.release()
        finally:
            for a in held:
                if a.is_established:
                    a.release()
        assert "no capacity (node.max_associations = 2 in use)" in node.log()


@pytest.mark.parametrize("idle", [2])
def test_an_idle_association_is_aborted_after_limits_idle_seconds(tmp_path, idle):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    cfg = node_config(tmp_path / "node", limits=_limits(idle_seconds=idle))
    with NodeProcess(tmp_path / "node", cfg) as node:
        ae = AE("PYNETDICOM")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MSKNODE")
        assert assoc.is_established
        t0 = time.monotonic()
        while assoc.is_established and time.monotonic() - t0 < idle + 8:
            time.sleep(0.1)
        assert not assoc.is_established and assoc.is_aborted
        assert idle - 0.5 < time.monotonic() - t0 < idle + 5
