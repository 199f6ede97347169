"""DICOM TLS (PS3.15 B.1, the BCP 195 profiles): the listener's server context and handshake, the
sender's per-peer client contexts, and their check at start-up.

Both directions require TLS 1.2 or newer. The listener's context presents ``node.tls.certificate``
and, with ``node.tls.ca_file``, asks for a client certificate (refusing a client without one when
``require_client_certificate``). A peer's context always verifies the peer's certificate, against
``peers[].tls.ca_file`` or the system's CAs, and checks its name against ``peers[].host`` only when
``verify_hostname`` (DICOM nodes are often addressed by IP and certified by AE title or device name).

The handshake never runs in the accept loop. pynetdicom's ``AssociationServer.get_request`` wraps
each accepted socket with ``do_handshake_on_connect=True``, so the handshake runs in the one thread
that accepts every connection, on a blocking socket: a client that connects and sends nothing (a
port scanner, a half-open connection, a plain-TCP health check) stops the node from accepting
anything else, for ever. :class:`TLSAssociationServer` wraps with ``do_handshake_on_connect=False``
in the accept loop and performs the handshake in the connection's own thread, with a timeout of
:data:`HANDSHAKE_TIMEOUT_SECONDS`; a failed or timed-out handshake closes that connection only, with
a log line, and the association machinery never sees it.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.errors import ConfigError

if TYPE_CHECKING:
    from dicom_node.config import Config, NodeTLS, Peer, PeerTLS

log = logging.getLogger("dicom_node.tls")

#: how long a client has, after connecting, to complete the TLS handshake
HANDSHAKE_TIMEOUT_SECONDS = 10.0

#: the conventional DICOM TLS port (PS3.15 B.1); the node uses node.port whatever it is
DICOM_TLS_PORT = 2762


def _no_password() -> bytes:
    # an encrypted private key fails to load instead of prompting on the terminal
    raise ssl.SSLError("the private key is encrypted; give an unencrypted PEM key")


def _base(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_context(tls: NodeTLS) -> ssl.SSLContext:
    """The listener's context (``node.tls``); raises ``ValueError`` naming the key at fault."""
    if tls.certificate is None:
        raise ValueError("certificate: required when node.tls.enabled is true")
    if tls.private_key is None:
        raise ValueError("private_key: required when node.tls.enabled is true")
    if tls.require_client_certificate and tls.ca_file is None:
        raise ValueError("ca_file: required when require_client_certificate is true (the CAs whose client "
                         "certificates are accepted)")
    ctx = _base(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(ctx, tls.certificate, tls.private_key)
    if tls.ca_file is not None:
        _load_ca(ctx, tls.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(tls: PeerTLS) -> ssl.SSLContext:
    """A peer's context (``peers[].tls``); raises ``ValueError`` naming the key at fault."""
    if (tls.certificate is None) != (tls.private_key is None):
        missing = "private_key" if tls.private_key is None else "certificate"
        raise ValueError(f"{missing}: a client certificate needs both certificate and private_key")
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = tls.verify_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if tls.ca_file is not None:
        _load_ca(ctx, tls.ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.certificate is not None and tls.private_key is not None:
        _load_chain(ctx, tls.certificate, tls.private_key)
    return ctx


def _exists(key: str, path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"{key}: no such file: {path}")


def _load_ca(ctx: ssl.SSLContext, ca_file: Path) -> None:
    _exists("ca_file", ca_file)
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"ca_file: {ca_file} holds no PEM certificate that loads ({exc})") from None


def _load_chain(ctx: ssl.SSLContext, certificate: Path, private_key: Path) -> None:
    _exists("certificate", certificate)
    _exists("private_key", private_key)
    try:  # the certificate alone first, so that an error names the right key
        _base(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(certificate))
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"certificate: {certificate} holds no PEM certificate that loads ({exc})") from None
    try:
        ctx.load_cert_chain(str(certificate), str(private_key), password=_no_password)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"private_key: {private_key} does not load or does not match the certificate "
                         f"({exc})") from None


def check_config(cfg: Config, source: str | None = None) -> None:
    """Build every enabled context once, at load: a missing or unreadable file, a key that does not
    match its certificate, is a :class:`ConfigError` naming the key (e.g. ``node.tls.private_key``)."""
    where = None if source in (None, "<config>") else source
    if cfg.node.tls.enabled:
        _check("node.tls", server_context, cfg.node.tls, where)
    for i, peer in enumerate(cfg.peers):
        if peer.tls is not None and peer.tls.enabled:
            _check(f"peers[{i}].tls", client_context, peer.tls, where)


def _check(prefix: str, build, section, where: str | None) -> None:
    try:
        build(section)
    except ValueError as exc:
        key, msg = str(exc).split(": ", 1)
        raise ConfigError(msg, key=f"{prefix}.{key}", path=where) from None


def peer_tls_args(peer: Peer) -> tuple[ssl.SSLContext, str] | None:
    """``tls_args`` for ``AE.associate`` to this peer: (context, server name), or None without TLS."""
    if peer.tls is None or not peer.tls.enabled:
        return None
    return client_context(peer.tls), cast(str, peer.host)


class TLSAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved out of the accept loop (see the module).

    ``get_request`` (accept loop) only wraps the socket, with ``do_handshake_on_connect=False``;
    ``process_request_thread`` (one thread per connection) runs the handshake with a timeout, then
    hands the socket to pynetdicom as ``AssociationServer`` would have.
    """

    handshake_timeout = HANDSHAKE_TIMEOUT_SECONDS

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock = cast(socket.socket, self.socket)
        client, address = sock.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: socket.socket | tuple[bytes, socket.socket],
                               client_address: tuple[str, int] | str) -> None:
        if isinstance(request, ssl.SSLSocket):
            where = ":".join(str(p) for p in client_address[:2]) if isinstance(client_address, tuple) \
                else client_address
            previous = request.gettimeout()
            try:
                request.settimeout(self.handshake_timeout)
                request.do_handshake()
                request.settimeout(previous)
            except TimeoutError:
                log.warning("TLS connection from %s closed: no handshake within %.0f s", where,
                            self.handshake_timeout)
                self.shutdown_request(request)
                return
            except (ssl.SSLError, OSError) as exc:
                log.warning("TLS connection from %s closed: handshake failed: %s", where,
                            getattr(exc, "reason", None) or exc)
                self.shutdown_request(request)
                return
            log.debug("TLS %s with %s, %s", request.version(), where, (request.cipher() or ("?",))[0])
        super().process_request_thread(request, client_address)
