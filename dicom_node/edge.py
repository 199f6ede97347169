"""Bounds on what a peer can make the node hold, below the association layer.

pynetdicom reads a PDU by its declared length: a peer that declares a 4 GiB A-ASSOCIATE-RQ or
P-DATA-TF PDU and streams bytes makes it buffer them all (before any AE title is checked), and
its reads time out per read, so a byte every few seconds keeps a connection, and a slot, forever.
:func:`install` replaces the DUL's PDU reader with one that

- refuses a PDU whose declared length passes its limit (A-ASSOCIATE-RQ: ``limits.max_associate_rq_bytes``;
  any other: ``limits.max_pdu_bytes`` plus the PDV headers), before reading its body: the connection
  is closed, nothing is buffered;
- gives a whole PDU, once its header arrived, ``limits.pdu_seconds`` to arrive, whatever the trickle;
- closes the connection when one message's command or data set, counted over its P-DATA fragments
  as they arrive, passes ``limits.max_dataset_mb``: a peer cannot make the node assemble an endless
  data set out of conformant PDUs either.

The node advertises ``limits.max_pdu_bytes`` as its Maximum Length Received, so a conformant peer
never sends more. The reader is the one pynetdicom 3.x uses, with those checks added.
"""

from __future__ import annotations

import logging
import struct
import time
from dataclasses import dataclass

from pynetdicom import dul

log = logging.getLogger("dicom_node.edge")

#: PDV item headers (4 + 2 bytes each) a P-DATA-TF PDU may add to the negotiated maximum
_PDV_SLACK = 1024


@dataclass(frozen=True)
class Limits:
    max_associate_rq_bytes: int
    max_pdu_bytes: int
    pdu_seconds: float
    max_message_bytes: int | None = None  # one message's command set or data set, over its fragments

    def allowed(self, pdu_type: int) -> int:
        return self.max_associate_rq_bytes if pdu_type == 0x01 else self.max_pdu_bytes + _PDV_SLACK


_limits: Limits | None = None


def _recv_by(sock, n: int, deadline: float) -> bytearray:
    """Up to ``n`` bytes from the raw socket, stopping at ``deadline`` (monotonic) or when the peer closes."""
    out = bytearray()
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(min(left, 5.0))
        try:
            chunk = sock.recv(min(65536, n - len(out)))
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out


def _read_pdu_data(self: dul.DULServiceProvider) -> None:
    """pynetdicom's PDU reader with the node's limits (the events it emits are pynetdicom's own)."""
    limits = _limits
    assoc_socket = self.socket
    raw = getattr(assoc_socket, "socket", None)
    if limits is None or raw is None:
        return _original(self)
    deadline = time.monotonic() + limits.pdu_seconds
    timeout = raw.gettimeout()
    try:
        _read_bounded(self, assoc_socket, raw, limits, deadline)
    finally:
        try:
            raw.settimeout(timeout)
        except OSError:
            pass
    return None


def _read_bounded(self: dul.DULServiceProvider, assoc_socket, raw, limits: Limits, deadline: float) -> None:
    header = _recv_by(raw, 6, deadline)
    if len(header) != 6:
        _connection_ended(self)  # closed, or no whole header in time
        return None
    pdu_type, _, pdu_length = struct.unpack(">BBL", header)
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        self.event_queue.put("Evt19")
        return None
    if pdu_length > limits.allowed(pdu_type):
        log.warning("PDU of type 0x%02X declaring %d bytes (limit %d) from %s: connection closed unread",
                    pdu_type, pdu_length, limits.allowed(pdu_type), _peer(raw))
        assoc_socket.close()
        _connection_ended(self)
        return None
    body = _recv_by(raw, pdu_length, deadline)
    if len(body) != pdu_length:
        log.warning("PDU of type 0x%02X from %s: %d of %d bytes in %.0f s; connection closed", pdu_type, _peer(raw),
                    len(body), pdu_length, limits.pdu_seconds)
        assoc_socket.close()
        _connection_ended(self)
        return None
    try:
        pdu, event = self._decode_pdu(header + body)
    except Exception as exc:
        log.warning("PDU of type 0x%02X from %s cannot be decoded (%s)", pdu_type, _peer(raw), type(exc).__name__)
        self.event_queue.put("Evt19")
        return None
    if pdu_type == 0x04 and limits.max_message_bytes is not None and _message_too_large(self, pdu, limits):
        log.warning("a message from %s passed limits.max_dataset_mb (%d bytes); connection closed", _peer(raw),
                    limits.max_message_bytes)
        assoc_socket.close()
        _connection_ended(self)
        return None
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)
    return None


def _message_too_large(self: dul.DULServiceProvider, pdu, limits: Limits) -> bool:
    """Count the fragments of the message in progress (command and data set apart, each from its first fragment
    to its last): whether one passed ``limits.max_message_bytes``."""
    counts: list[int] = self.__dict__.setdefault("_msk_message_bytes", [0, 0])  # [data set, command]
    for item in pdu.presentation_data_value_items:
        data = item.presentation_data_value  # the message control header, then the fragment
        if not data:
            continue
        header = data[0]
        kind = header & 0x01  # 1: command, 0: data set
        counts[kind] += len(data) - 1
        if counts[kind] > (limits.max_message_bytes or 0):
            return True
        if header & 0x02:  # the last fragment
            counts[kind] = 0
    return False


def _connection_ended(self: dul.DULServiceProvider) -> None:
    """Evt17 (transport closed). Before any A-ASSOCIATE-RQ (Sta2), also wake the acceptor's thread, which
    otherwise waits for a request until its ACSE timeout: ``None`` is what that wait returns on timeout,
    and the thread then ends at once (so closed and evicted connections do not linger as threads)."""
    self.event_queue.put("Evt17")
    if self.state_machine.current_state == "Sta2" and self.assoc.is_acceptor:
        self.to_user_queue.put(None)  # type: ignore[arg-type]


def _peer(sock) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "a closed connection"


_original = dul.DULServiceProvider._read_pdu_data


def install(limits: Limits) -> None:
    """Use the bounded reader for every association of this process (the listener's and the sender's)."""
    global _limits
    _limits = limits
    dul.DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]


__all__ = ["Limits", "install"]
