"""DICOM TLS (issue 14 item 7): the listener and the sender against dcmtk's TLS tools.

A throwaway CA, server and client certificates are made with ``openssl`` in the test's directory.
dcmtk's ``+tls KEY CERT`` presents a certificate, ``+tla`` speaks TLS without one, ``+cf CA`` adds a
trusted CA; dcmtk verifies the peer's certificate by default (``-rc``).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file

from dicom_node.config import load_config, parse_config
from dicom_node.errors import ConfigError
from tests.nodeproc import NodeProcess, node_config
from tests.peers import Storescp, require, storescu
from tests.test_sender import Rig

CR_FILE = get_testdata_file("RG3_UNCI.dcm")  # a real CR radiograph, uncompressed


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run([require("openssl"), *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> Path:
    """ca.crt/ca.key, server.crt/server.key (localhost, 127.0.0.1), client.crt/client.key, all under ``d``;
    and rogue.crt/rogue.key: a self-signed certificate no one trusts."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=msk-dicom-node test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n" + ext)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={'localhost' if name == 'server' else 'STORESCU'}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.crt",
             "-days", "2", "-subj", "/CN=rogue", cwd=d)
    return d


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_node(workdir: Path, pki: Path, **tls) -> NodeProcess:
    cfg = node_config(workdir)
    cfg["node"]["tls"] = {"enabled": True, "certificate": str(pki / "server.crt"),
                          "private_key": str(pki / "server.key"), "ca_file": str(pki / "ca.crt"), **tls}
    return NodeProcess(workdir, cfg)


def _dcmtk(program: str, port: int, *args: str | Path, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([require(program), "-aet", "STORESCU", "-aec", "MSKNODE", "-to", "10", "-ta", "10",
                           *map(str, args), "127.0.0.1", str(port)], capture_output=True, text=True, timeout=timeout)


def _client_tls(pki: Path) -> list[str | Path]:
    return ["+tls", pki / "client.key", pki / "client.crt", "+cf", pki / "ca.crt"]


# -- configuration --------------------------------------------------------------
def _raw(pki: Path, node_tls: dict | None = None, peer_tls: dict | None = None) -> dict:
    peer = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    if peer_tls is not None:
        peer["tls"] = peer_tls
    return {"node": {"tls": node_tls or {}}, "peers": [peer]}


def test_config_defaults_off_and_relative_paths_resolve(tmp_path, pki):
    cfg = parse_config(_raw(pki), environ={})
    assert cfg.node.tls.enabled is False and cfg.peers[0].tls is None
    (tmp_path / "certs").symlink_to(pki)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_raw(pki, {"enabled": True, "certificate": "certs/server.crt",
                                              "private_key": "certs/server.key", "ca_file": "certs/ca.crt",
                                              "require_client_certificate": True},
                                        {"enabled": True, "ca_file": "certs/ca.crt", "certificate": "certs/client.crt",
                                         "private_key": "certs/client.key", "verify_hostname": True})))
    cfg = load_config(path, environ={})
    assert cfg.node.tls.certificate == (tmp_path / "certs" / "server.crt").resolve()
    assert cfg.peers[0].tls is not None and cfg.peers[0].tls.private_key == (pki / "client.key").resolve()


@pytest.mark.parametrize(("node_tls", "peer_tls", "key", "words"), [
    ({"enabled": True, "private_key": "server.key"}, None, "node.tls.certificate", "required"),
    ({"enabled": True, "certificate": "server.crt", "private_key": "missing.key"}, None, "node.tls.private_key",
     "no such file"),
    ({"enabled": True, "certificate": "server.crt", "private_key": "client.key"}, None, "node.tls.private_key",
     "does not match"),
    ({"enabled": True, "certificate": "server.key", "private_key": "server.key"}, None, "node.tls.certificate",
     "no PEM certificate"),
    ({"enabled": True, "certificate": "server.crt", "private_key": "server.key",
      "require_client_certificate": True}, None, "node.tls.ca_file", "required"),
    ({"enabled": True, "certificate": "server.crt", "private_key": "server.key", "ca_file": "ca.key"}, None,
     "node.tls.ca_file", "no PEM certificate"),
    (None, {"enabled": True, "ca_file": "nothere.crt"}, "peers[0].tls.ca_file", "no such file"),
    (None, {"enabled": True, "ca_file": "ca.crt", "certificate": "client.crt"}, "peers[0].tls.private_key",
     "needs both"),
    (None, {"enabled": True, "ca_file": "ca.crt", "tls_version": "1.0"}, "peers[0].tls.tls_version", "unknown key"),
])
def test_config_errors_name_the_key(pki, node_tls, peer_tls, key, words):
    with pytest.raises(ConfigError) as err:
        parse_config(_raw(pki, node_tls, peer_tls), base=pki, environ={})
    assert err.value.key == key and words in str(err.value), str(err.value)


def test_disabled_tls_sections_are_not_checked(pki):
    cfg = parse_config(_raw(pki, {"certificate": "missing.crt"}, {"ca_file": "missing.crt"}), base=pki, environ={})
    assert not cfg.node.tls.enabled and cfg.peers[0].tls is not None and not cfg.peers[0].tls.enabled


# -- the listener ---------------------------------------------------------------
def test_listener_speaks_tls_only(tmp_path, pki):
    with _tls_node(tmp_path / "node", pki) as node:
        r = _dcmtk("echoscu", node.port, *_client_tls(pki))
        assert r.returncode == 0, r.stderr + r.stdout
        r = storescu("127.0.0.1", node.port, [CR_FILE], extra=[*map(str, _client_tls(pki))], timeout=30)
        assert r.returncode == 0, r.stderr + r.stdout
        node.wait_for(lambda: node.status()["instances"] == 1, what="the instance stored")
        # without a client certificate: allowed (ca_file given, not required)
        r = _dcmtk("echoscu", node.port, "+tla", "+cf", pki / "ca.crt")
        assert r.returncode == 0, r.stderr + r.stdout
        # plain DICOM on the TLS port: no association
        r = _dcmtk("echoscu", node.port)
        assert r.returncode != 0
        # a certificate the node's CA did not sign: refused in the handshake
        r = _dcmtk("echoscu", node.port, "+tls", pki / "rogue.key", pki / "rogue.crt", "+cf", pki / "ca.crt")
        assert r.returncode != 0
        # the client does not trust the node's certificate
        r = _dcmtk("echoscu", node.port, *_client_tls(pki)[:3])
        assert r.returncode != 0
        assert node.alive()
    log = node.log()
    assert "(DICOM TLS)" in log and "handshake failed" in log


def test_client_certificate_required(tmp_path, pki):
    with _tls_node(tmp_path / "node", pki, require_client_certificate=True) as node:
        r = _dcmtk("echoscu", node.port, "+tla", "+cf", pki / "ca.crt")
        assert r.returncode != 0, r.stdout
        r = _dcmtk("echoscu", node.port, *_client_tls(pki))
        assert r.returncode == 0, r.stderr + r.stdout
    assert "handshake failed" in node.log()


def test_an_idle_connection_does_not_stall_the_listener(tmp_path, pki):
    """A client that connects and never starts the handshake holds its own thread, not the accept loop."""
    with _tls_node(tmp_path / "node", pki) as node:
        idle = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
        try:
            time.sleep(0.5)  # the accept loop has taken them
            t0 = time.monotonic()
            r = _dcmtk("echoscu", node.port, *_client_tls(pki), timeout=20)
            took = time.monotonic() - t0
            assert r.returncode == 0 and took < 5, (took, r.stderr + r.stdout)
            r = storescu("127.0.0.1", node.port, [CR_FILE], extra=[*map(str, _client_tls(pki)), "-to", "10"],
                         timeout=20)
            assert r.returncode == 0, r.stderr + r.stdout
        finally:
            for s in idle:
                s.close()
        assert node.alive()


# -- the sender -------------------------------------------------------------------
def _tls_storescp(out: Path, pki: Path) -> Storescp:
    """dcmtk's storescp speaking TLS only, requiring a client certificate signed by the CA (``-rc``)."""
    return Storescp(out, aet="STORESCP", extra=["+tls", str(pki / "server.key"), str(pki / "server.crt"),
                                                "+cf", str(pki / "ca.crt"), "-rc"])


def test_sender_delivers_over_tls(tmp_path, pki, caplog):
    """Results reach a TLS-only storescp, with a client certificate and the host name checked; the
    recovery of an in-flight delivery (its C-FIND/C-ECHO association) goes over TLS too."""
    with _tls_storescp(tmp_path / "scp", pki) as scp:
        tls = {"enabled": True, "ca_file": str(pki / "ca.crt"), "certificate": str(pki / "client.crt"),
               "private_key": str(pki / "client.key"), "verify_hostname": True}
        rig = Rig(tmp_path / "node", [{"ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port, "tls": tls}])
        try:
            sid, _, uids = rig.add_study(["STORESCP"])
            rig.set_state([rig.deliveries(sid)[0].id], "sending")
            with caplog.at_level(logging.WARNING, logger="dicom_node.sender"):
                assert rig.sender.run_once() == 3
            assert "does not support Study Root C-FIND" in caplog.text  # the recovery association was made
            got = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in scp.files())
            assert got == sorted(uids)
            assert rig.study(sid).state == "sent"
        finally:
            rig.close()


@pytest.mark.parametrize("problem", ["untrusted peer", "no client certificate", "plain DICOM"])
def test_sender_refuses_or_is_refused_without_the_right_tls(tmp_path, pki, problem):
    """A peer whose certificate the node does not trust, a peer that wants a client certificate the node
    does not have, a TLS peer configured without TLS: no association, nothing arrives, the delivery
    waits for a retry (not a dead letter) and its error names the destination."""
    tls: dict | None = {"enabled": True, "ca_file": str(pki / "ca.crt"), "certificate": str(pki / "client.crt"),
                        "private_key": str(pki / "client.key")}
    if problem == "untrusted peer":
        tls = {**tls, "ca_file": str(pki / "rogue.crt")}
    elif problem == "no client certificate":
        tls = {"enabled": True, "ca_file": str(pki / "ca.crt")}
    else:
        tls = None
    with _tls_storescp(tmp_path / "scp", pki) as scp:
        peer = {"ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port, **({"tls": tls} if tls else {})}
        rig = Rig(tmp_path / "node", [peer])
        try:
            sid, _, _ = rig.add_study(["STORESCP"])
            assert rig.sender.run_once() == 0
            assert scp.files() == []
            ds = rig.deliveries(sid)
            assert {d.state for d in ds} == {"pending"}, [(d.state, d.last_error) for d in ds]
            assert all("STORESCP at 127.0.0.1" in (d.last_error or "") for d in ds)
            if tls is not None:
                assert "(TLS)" in (ds[0].last_error or "")
        finally:
            rig.close()


def test_a_connection_without_a_handshake_is_closed_after_the_timeout(pki, caplog):
    """TLSAssociationServer in process (a pynetdicom AE, real sockets): a client that sends nothing is
    closed after ``handshake_timeout``, and a TLS client is served meanwhile."""
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from dicom_node import tls
    from dicom_node.config import NodeTLS, PeerTLS
    from dicom_node.connections import ConnectionBudget, start_server

    ae = AE("MSKNODE")
    ae.add_supported_context(Verification)
    ctx = tls.server_context(NodeTLS(enabled=True, certificate=pki / "server.crt", private_key=pki / "server.key"))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_NONE
    peer = tls.client_context(PeerTLS(enabled=True, ca_file=pki / "ca.crt"))
    assert peer.minimum_version == ssl.TLSVersion.TLSv1_2 and peer.verify_mode == ssl.CERT_REQUIRED
    assert not peer.check_hostname
    old = tls.TLSAssociationServer.handshake_timeout
    tls.TLSAssociationServer.handshake_timeout = 1.0
    budget = ConnectionBudget(max_associations=4, max_pending=4, max_pending_per_address=4, associate_seconds=30)
    server = start_server(ae, ("127.0.0.1", 0), ctx, [], budget)
    port = server.server_address[1]
    try:
        with caplog.at_level(logging.WARNING, logger="dicom_node.tls"), \
                socket.create_connection(("127.0.0.1", port)) as idle:
            t0 = time.monotonic()
            client = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            with client.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                                    server_hostname="localhost") as served:
                assert served.version() in ("TLSv1.2", "TLSv1.3")
            idle.settimeout(5)
            assert idle.recv(1) == b""  # closed by the node
            took = time.monotonic() - t0
            assert 0.5 < took < 4, took
        assert "no handshake within 1 s" in caplog.text
    finally:
        tls.TLSAssociationServer.handshake_timeout = old
        server.shutdown()
        budget.stop()
