"""Who gets a connection, and for how long it may stay without an association.

pynetdicom counts every accepted socket as an association from the moment it is accepted: a
handful of idle sockets (a port scanner, a half-open connection, a hostile peer that connects and
sends nothing, or a PDU header and then a byte every few seconds) fill ``maximum_associations`` and
the configured peers are refused with "local limit exceeded" for as long as the sockets stay.

:class:`ConnectionBudget` splits the two stages:

- **pending** connections (accepted, no A-ASSOCIATE-RQ yet) have their own small budget,
  ``limits.max_pending_connections``, and at most ``limits.max_pending_per_address`` from one
  address; a connection from an address at its limit is closed at once, in the accept loop. When
  the whole budget is full, a connection from another address evicts the oldest pending connection
  of the address holding the most, so one address, or a few, never lock the others out.
- a pending connection has ``limits.associate_seconds`` from its accept to a complete
  A-ASSOCIATE-RQ (the TLS handshake included), whatever it trickles: a watchdog closes it then.
- **associations** (A-ASSOCIATE-RQ received, caller admitted) count against
  ``node.max_associations``, and only they do. The check runs when the request arrives, under
  one lock, so two requests never both take the last slot.

Refusals and evictions are logged at most once per address every :data:`LOG_EVERY_SECONDS`, with a count.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dicom_node.tls import TLSAssociationServer

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.events import EventHandlerType

log = logging.getLogger("dicom_node.connections")

#: at most one refusal line per address in this many seconds (a flood must not flood the log)
LOG_EVERY_SECONDS = 10.0

#: how often the watchdog looks at pending connections
WATCH_SECONDS = 0.25


@dataclass
class _Pending:
    address: str
    since: float


@dataclass
class _Refusals:
    last_logged: float = 0.0
    unlogged: int = 0


@dataclass
class BudgetCounts:
    pending: int
    associations: int
    refused: int
    evicted: int
    expired: int


@dataclass
class ConnectionBudget:
    max_associations: int
    max_pending: int
    max_pending_per_address: int
    associate_seconds: float
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _pending: dict[socket.socket, _Pending] = field(default_factory=dict, repr=False)
    _sockets: dict[int, socket.socket] = field(default_factory=dict, repr=False)  # id(assoc) -> socket
    _admitted: set[int] = field(default_factory=set, repr=False)  # id(assoc)
    _refusals: dict[str, _Refusals] = field(default_factory=dict, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _watchdog: threading.Thread | None = field(default=None, repr=False)
    refused: int = 0
    evicted: int = 0
    expired: int = 0

    # -- the accept loop --------------------------------------------------------------------
    def connect(self, sock: socket.socket, address: str) -> bool:
        """A connection was accepted: keep it (True) or refuse it (False: the caller closes it)."""
        now = time.monotonic()
        victim: socket.socket | None = None
        with self._lock:
            per_address = Counter(p.address for p in self._pending.values())
            if per_address[address] >= self.max_pending_per_address:
                self.refused += 1
                self._log_limited(address, now, f"connection from {address} refused: {per_address[address]} "
                                  f"connections from it are not associated yet (limits.max_pending_per_address)")
                return False
            if len(self._pending) >= self.max_pending:
                busiest = max(per_address, key=lambda a: (per_address[a], -self._oldest(a)))
                victim = next(s for s, p in self._pending.items() if p.address == busiest)
                victim_address = self._pending.pop(victim).address
                self.evicted += 1
            self._pending[sock] = _Pending(address, now)
            if victim is not None:
                self._log_limited(victim_address, now, f"connection from {victim_address} closed before its "
                                  f"association: {self.max_pending} connections are not associated yet "
                                  f"(limits.max_pending_connections) and it holds the most")
        if victim is not None:
            _close(victim)
        return True

    def _oldest(self, address: str) -> float:
        return min(p.since for p in self._pending.values() if p.address == address)

    def _log_limited(self, address: str, now: float, message: str) -> None:
        r = self._refusals.setdefault(address, _Refusals())
        if now - r.last_logged >= LOG_EVERY_SECONDS:
            more = f" ({r.unlogged} more refused or closed since the last line)" if r.unlogged else ""
            log.warning("%s%s", message, more)
            r.last_logged, r.unlogged = now, 0
        else:
            r.unlogged += 1

    # -- association events -------------------------------------------------------------------
    def opened(self, assoc_id: int, sock: socket.socket | None) -> None:
        """EVT_CONN_OPEN: the association thread that owns ``sock``."""
        if sock is not None:
            with self._lock:
                self._sockets[assoc_id] = sock

    def request(self, assoc_id: int) -> bool:
        """A-ASSOCIATE-RQ received from an admitted caller: take an association slot, if one is free."""
        with self._lock:
            sock = self._sockets.get(assoc_id)
            if sock is not None:
                self._pending.pop(sock, None)
            if len(self._admitted) >= self.max_associations:
                return False
            self._admitted.add(assoc_id)
            return True

    def requested(self, assoc_id: int) -> None:
        """A-ASSOCIATE-RQ received (whatever the answer): the association stage is over."""
        with self._lock:
            sock = self._sockets.get(assoc_id)
            if sock is not None:
                self._pending.pop(sock, None)

    def closed(self, assoc_id: int) -> None:
        """EVT_CONN_CLOSE, release or abort: the slot and the pending entry go."""
        with self._lock:
            self._admitted.discard(assoc_id)
            sock = self._sockets.pop(assoc_id, None)
            if sock is not None:
                self._pending.pop(sock, None)

    def counts(self) -> BudgetCounts:
        with self._lock:
            return BudgetCounts(len(self._pending), len(self._admitted), self.refused, self.evicted, self.expired)

    # -- the watchdog -------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._watchdog = threading.Thread(target=self._watch, name="connection-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
            self._watchdog = None

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_SECONDS):
            self.expire(time.monotonic())

    def expire(self, now: float) -> None:
        """Close pending connections past their deadline; forget those that closed on their own."""
        late: list[tuple[socket.socket, _Pending]] = []
        with self._lock:
            for sock, p in list(self._pending.items()):
                if sock.fileno() == -1:
                    del self._pending[sock]
                elif now - p.since > self.associate_seconds:
                    late.append((sock, self._pending.pop(sock)))
                    self.expired += 1
            for assoc_id, sock in list(self._sockets.items()):
                if sock.fileno() == -1:  # ended without an event we saw
                    del self._sockets[assoc_id]
                    self._admitted.discard(assoc_id)
        for sock, p in late:
            log.warning("connection from %s closed: no association request within %.0f s of connecting "
                        "(limits.associate_seconds)", p.address, self.associate_seconds)
            _close(sock)


def normalise_address(address: str | None) -> str | None:
    """An IP address as one spelling (IPv4-mapped IPv6 as IPv4); anything else unchanged."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


class NodeAssociationServer(TLSAssociationServer):
    """pynetdicom's threaded server with the TLS handshake out of the accept loop (when TLS is on)
    and every accepted connection weighed by the :class:`ConnectionBudget` before a thread starts."""

    budget: ConnectionBudget | None = None

    def verify_request(self, request, client_address) -> bool:  # the accept loop; False: closed at once
        if self.budget is None:
            return True
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        return self.budget.connect(request, normalise_address(host) or host)


def start_server(ae: AE, address: tuple[str, int], ctx: ssl.SSLContext | None, handlers: list[EventHandlerType],
                 budget: ConnectionBudget) -> NodeAssociationServer:
    """``ae.start_server(address, block=False, ...)`` with a :class:`NodeAssociationServer` (``AE.start_server``
    takes no ``server_class``); the budget's watchdog runs until the server shuts down."""
    server = ae.make_server(address, ssl_context=ctx, evt_handlers=handlers, server_class=NodeAssociationServer)
    assert isinstance(server, NodeAssociationServer)
    server.budget = budget
    budget.start()
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
    thread.start()
    ae._servers.append(server)  # as AE.start_server does: AssociationServer.shutdown removes it again
    return server


def _close(sock: socket.socket) -> None:
    """Shut the connection down under whichever thread reads it (TLS or not): its reads end at once."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


__all__ = ["BudgetCounts", "ConnectionBudget", "NodeAssociationServer", "normalise_address", "start_server"]
