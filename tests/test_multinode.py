"""Several nodes on one database and one store (docs/deployment.md): roles, the shared store's start-up
clean-up, periodic jobs one node at a time, study claims that skip each other's rows."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request

import pytest

from dicom_node.config import parse_config
from storage.database import Database
from storage.files import InstanceStore
from storage.index import Index
from storage.jobs import Jobs
from tests import postgres
from tests.nodeproc import NodeProcess, node_config
from tests.postgres import BACKENDS, database_url

needs_postgresql = pytest.mark.skipif(not postgres.available(), reason="PostgreSQL is not installed")


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return rsp.status, json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# -- roles -----------------------------------------------------------------------------------------
def test_roles_default_to_all_three_and_name_the_node_when_fewer(tmp_path):
    base = {"peers": [{"ae_title": "PACS"}], "storage": {"path": str(tmp_path)}}
    whole = parse_config(base)
    assert whole.node.roles == ["listener", "worker", "sender"] and whole.runs("listener")
    some = parse_config(dict(base, node={"roles": ["sender", "worker", "worker"]}))
    assert some.node.roles == ["worker", "sender"] and not some.runs("listener")
    assert some.node_identity() == whole.node_identity() + "/worker+sender"
    from dicom_node.errors import ConfigError

    with pytest.raises(ConfigError, match=r"node\.roles"):
        parse_config(dict(base, node={"roles": []}))
    with pytest.raises(ConfigError, match=r"node\.roles\[0\]"):
        parse_config(dict(base, node={"roles": ["gpu"]}))


def test_an_unknown_role_on_the_command_line_names_the_option(tmp_path):
    node = NodeProcess(tmp_path / "n", node_config(tmp_path / "n"))
    r = node.cli("serve", "--role", "listener,gpu", check=False)
    assert r.returncode == 2 and "--role: gpu: roles are listener, worker, sender" in r.stderr


def test_a_sender_only_node_has_no_listener_and_checks_only_its_roles(tmp_path):
    # node.roles says everything; the command line says sender only (the flag wins)
    node = NodeProcess(tmp_path / "n", node_config(tmp_path / "n"))
    node.start(args=("--role", "sender"))
    try:
        assert not _listening(node.port)
        status, ready = _get(node.http_url + "/readyz")
        assert status == 200, ready
        assert set(ready["checks"]) == {"database", "storage", "sender"}
        assert _get(node.http_url + "/healthz")[1]["roles"] == ["sender"]
        assert "roles sender" in node.log()
    finally:
        node.stop()


def test_a_listener_and_worker_node_checks_no_sender(tmp_path):
    cfg = node_config(tmp_path / "n", node={"roles": ["listener", "worker"]})
    with NodeProcess(tmp_path / "n", cfg) as node:
        status, ready = _get(node.http_url + "/readyz")
        assert status == 200 and set(ready["checks"]) == {"database", "storage", "listener", "workers"}
        assert "sender started" not in node.log()


# -- the shared store --------------------------------------------------------------------------------
def test_on_a_shared_store_the_start_up_clean_up_leaves_young_files_alone(tmp_path):
    store = InstanceStore(tmp_path / "store")
    partial = store.tmp / "another-node.part"
    partial.write_bytes(b"half")
    written = store.write("instances/aa/bb/just-written.dcm", b"not indexed yet")
    orphan = store.write("instances/cc/dd/crash-left.dcm", b"an hour old")
    old = time.time() - 7200
    os.utime(store.abspath(orphan.relpath), (old, old))
    for path in (store.abspath(orphan.relpath).parent, store.abspath(orphan.relpath).parent.parent):
        os.utime(path, (old, old))

    shared = InstanceStore(tmp_path / "store", min_age=3600)  # a second node starts
    assert partial.exists()
    assert shared.sweep(set()) == (1, len(b"an hour old"))
    assert store.abspath(written.relpath).exists() and not store.abspath(orphan.relpath).exists()
    assert not (tmp_path / "store" / "instances" / "cc").exists()  # its old, now empty folders too

    InstanceStore(tmp_path / "store")  # the only writer: everything in tmp/ is a crash's
    assert not partial.exists()
    assert InstanceStore(tmp_path / "store").sweep(set())[0] == 1


def test_storage_shared_defaults_to_the_database_kind(tmp_path):
    from dicom_node.node import shared_store

    base = {"peers": [{"ae_title": "PACS"}], "storage": {"path": str(tmp_path)}}
    assert not shared_store(parse_config(base))
    pg = dict(base, storage={"path": str(tmp_path), "database_url": "postgresql+psycopg://u@h/db"})
    assert shared_store(parse_config(pg))
    pg["storage"]["shared"] = False
    assert not shared_store(parse_config(pg))


# -- one node at a time --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_periodic_job_runs_on_one_node_at_a_time(tmp_path, backend):
    if backend == "postgresql" and not postgres.available():
        pytest.skip("PostgreSQL is not installed")
    url = database_url(tmp_path, backend)
    Index(url).close()
    a, b = Database(url), Database(url)
    try:
        with a.exclusive("retention") as first:
            with b.exclusive("retention") as second, b.exclusive("another job") as other:
                assert first and other
                assert second is (backend == "sqlite")  # SQLite: one node, nothing to exclude
        with b.exclusive("retention") as again:
            assert again  # released with the block
    finally:
        a.close()
        b.close()


@needs_postgresql
def test_workers_of_two_nodes_claim_different_studies_without_waiting(tmp_path):
    """Two claims in flight at once on PostgreSQL: the second skips the row the first has locked."""
    from sqlalchemy import select

    from storage.models import Study, StudyState
    from tests.test_storage_states import _study_in

    url = database_url(tmp_path, "postgresql")
    one, two = Index(url), Index(url)
    try:
        first = _study_in(one, StudyState.STABLE, "1.2.3.1")
        second = _study_in(one, StudyState.STABLE, "1.2.3.2")
        with one.db.write() as s:  # node one is between its SELECT ... FOR UPDATE and its UPDATE
            locked = s.scalar(select(Study.id).where(Study.id == first).with_for_update())
            t0 = time.monotonic()
            claim = Jobs(two).claim("node-two:1:0", lease_seconds=60)
            assert time.monotonic() - t0 < 5
            assert locked == first and claim is not None and claim.id == second
        claim = Jobs(one).claim("node-one:1:0", lease_seconds=60)
        assert claim is not None and claim.id == first
        assert Jobs(two).claim("node-two:1:0", lease_seconds=60) is None
    finally:
        one.close()
        two.close()
