"""The operations endpoint over real HTTP against a running node: /healthz, /readyz, /metrics, the token;
start-up failures (busy port, unusable storage) as one line and exit status 2; `status` through /healthz."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.nodeproc import REPO, NodeProcess, node_config
from tests.peers import echoscu, storescu

TOKEN = "s3cret-token-for-the-tests"


def http(url: str, *, token: str | None = None, basic: str | None = None, method: str = "GET",
         data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method, data=data, headers=dict(headers or {}))
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if basic is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(basic.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as rsp:
            return rsp.status, dict(rsp.headers), rsp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample of the exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return 0.0


def test_health_ready_and_metrics_move_when_storescu_sends(make_node):
    node = make_node()
    status, _, body = http(node.http_url + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "alive"
    status, _, body = http(node.http_url + "/readyz")
    ready = json.loads(body)
    assert status == 200 and ready["ready"] is True and ready["failed"] == []
    assert set(ready["checks"]) == {"database", "storage", "listener", "workers", "sender"}

    _, headers, before = http(node.http_url + "/metrics")
    assert headers["content-type"].startswith("text/plain")
    before_text = before.decode()
    f = get_testdata_file("RG3_UNCI.dcm")
    assert storescu("127.0.0.1", node.port, [f]).returncode == 0
    assert echoscu("127.0.0.1", node.port, calling="INTRUDER").returncode != 0  # not a peer: refused
    size = os.path.getsize(f)
    node.wait_for(lambda: metric(http(node.http_url + "/metrics")[2].decode(), "msknode_studies", state="stable")
                  == 1, what="the study stable in the metrics")
    after = http(node.http_url + "/metrics")[2].decode()
    assert metric(after, "msknode_c_store_total", status="0x0000", calling_ae="STORESCU") == \
        metric(before_text, "msknode_c_store_total", status="0x0000", calling_ae="STORESCU") + 1
    assert metric(after, "msknode_associations_total", result="accepted", calling_ae="STORESCU") == 1
    assert metric(after, "msknode_associations_total", result="rejected", calling_ae="other") == 1
    # the dataset as stored (its file meta left out) is a little smaller than the file
    assert size - 1024 < metric(after, "msknode_received_bytes_total") <= size
    assert metric(after, "msknode_queue_depth", queue="inference") == 1
    assert 'msknode_model_info{name="",pipeline="disabled",version=""} 1.0' in after
    for name in ("msknode_inference_study_seconds_bucket", "msknode_stable_to_sent_seconds_bucket",
                 "msknode_dead_letters_waiting", "msknode_worker_restarts_total"):
        assert name in after, name
    # no patient data in any metric
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    assert str(ds.PatientName) not in after and str(ds.PatientID) not in after


def test_readyz_flips_when_storage_is_full_or_not_writable(tmp_path):
    workdir = tmp_path / "node"
    (workdir / "var").mkdir(parents=True)
    free_mb = shutil.disk_usage(workdir / "var").free // (1 << 20)
    node = NodeProcess(workdir, node_config(workdir, min_free_mb=free_mb - 200))
    with node:
        assert http(node.http_url + "/readyz")[0] == 200
        filler = node.storage / "filler.bin"
        with open(filler, "wb") as fh:
            os.posix_fallocate(fh.fileno(), 0, 400 << 20)  # the volume now has less than min_free_mb
        try:
            status, _, body = http(node.http_url + "/readyz")
            answer = json.loads(body)
            assert status == 503 and answer["failed"] == ["storage"], answer
            assert "below storage.min_free_mb" in answer["checks"]["storage"]["detail"]
            assert http(node.http_url + "/healthz")[0] == 200  # alive all the same
        finally:
            filler.unlink()
        assert http(node.http_url + "/readyz")[0] == 200

        tmp = node.storage / "tmp"  # where every write starts: a file there, and nothing can be written
        tmp.rename(node.storage / "tmp.away")
        tmp.write_text("not a directory")
        try:
            status, _, body = http(node.http_url + "/readyz")
            assert status == 503 and json.loads(body)["failed"] == ["storage"]
        finally:
            tmp.unlink()
            (node.storage / "tmp.away").rename(tmp)
        assert http(node.http_url + "/readyz")[0] == 200


def test_the_token_guards_every_endpoint_but_healthz(make_node):
    node = make_node(http={"token": TOKEN})
    assert http(node.http_url + "/healthz")[0] == 200
    for path in ("/readyz", "/metrics", "/", "/api/studies", "/thumbnails/1.png"):
        status, headers, _ = http(node.http_url + path)
        assert status == 401 and "Basic" in headers.get("www-authenticate", ""), path
        assert http(node.http_url + path, token="wrong-token-wrong-token")[0] == 401, path
    assert http(node.http_url + "/readyz", token=TOKEN)[0] == 200
    assert http(node.http_url + "/metrics", token=TOKEN)[0] == 200
    assert http(node.http_url + "/", basic=f"admin:{TOKEN}")[0] == 200  # what a browser sends
    assert http(node.http_url + "/thumbnails/1.png", token=TOKEN)[0] == 404
    assert http(node.http_url + "/retry", method="POST", data=b"")[0] == 401
    status, _, body = http(node.http_url + "/retry", method="POST", data=b"", token=TOKEN)
    assert status == 200 and json.loads(body) == {"deliveries_requeued": 0, "studies_requeued": 0}
    # with the credentials a browser adds by itself (basic auth), a form without the page's token-derived
    # field (another site's form) is refused
    status, _, _ = http(node.http_url + "/retry", method="POST", data=b"study=1.2.3", basic=f"admin:{TOKEN}",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 403


def test_retry_is_refused_without_a_token_and_the_endpoint_is_localhost_by_default(make_node):
    node = make_node()
    status, _, body = http(node.http_url + "/retry", method="POST", data=b"")
    assert status == 403 and b"http.token" in body
    from dicom_node.config import HttpSection

    assert HttpSection().bind == "127.0.0.1"


def _serve(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "--config", str(config), "serve"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_busy_ports_and_unusable_storage_are_one_line_and_exit_2(make_node, tmp_path):
    first = make_node(name="first")
    # the same DICOM port
    second = make_node(name="second", start=False, port=first.port)
    r = _serve(second.config_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [f"error: cannot start: node.port {first.port} on 127.0.0.1 is in use (another node or "
                     f"program listens there)"], r.stderr
    # the same HTTP port
    third = make_node(name="third", start=False, http={"port": first.cfg["http"]["port"]})
    r = _serve(third.config_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: cannot start: http.port {first.cfg['http']['port']} on 127.0.0.1 is in use (another node or "
        f"program listens there)"], r.stderr
    # storage.path that cannot be a directory
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    fourth = make_node(name="fourth", start=False)
    cfg = dict(fourth.cfg, storage={"path": str(blocker / "var"), "database_url": "sqlite:///" +
                                    str(tmp_path / "fourth.sqlite"), "min_free_mb": 0})
    fourth = NodeProcess(tmp_path / "fourth", cfg)
    r = _serve(fourth.config_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot start: storage.path {blocker / 'var'} cannot be "
                                                   f"used: Not a directory"), r.stderr
    assert first.alive()


def test_status_says_whether_the_node_runs(make_node):
    node = make_node()
    out = node.cli("status").stdout
    assert re.search(r"^node: +running \(pid \d+", out, re.MULTILINE), out
    assert json.loads(node.cli("status", "--json").stdout)["node"]["running"] is True
    node.stop()
    t0 = time.monotonic()
    out = node.cli("status").stdout
    assert time.monotonic() - t0 < 30
    assert re.search(r"^node: +NOT running \(no answer at http://127\.0\.0\.1:\d+/healthz", out, re.MULTILINE), out
    st = json.loads(node.cli("status", "--json").stdout)
    assert st["node"]["running"] is False and st["instances"] == 0


@pytest.mark.parametrize("signal_name", ["SIGTERM"])
def test_shutdown_is_not_held_up_by_the_http_server(make_node, signal_name):
    node = make_node()
    # a client holding a keep-alive connection open must not delay the stop
    import socket

    with socket.create_connection(("127.0.0.1", node.cfg["http"]["port"])) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        s.recv(4096)
        t0 = time.monotonic()
        rc = node.stop()
        took = time.monotonic() - t0
    assert rc == 0 and took < 10, (rc, took)
