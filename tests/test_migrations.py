"""Schema migrations of the index: a database of the previous release is upgraded and keeps its rows,
a new one is made by the migrations, the result equals storage/models.py, several processes may start together,
and ``dicom-node db upgrade`` / ``db current`` work (SQLite)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from storage import migrate
from storage.deliveries import DeliveryQueue
from storage.errors import StorageError
from storage.index import Index
from storage.jobs import Jobs
from storage.models import Base
from tests.postgres import database_url

REPO = Path(__file__).resolve().parent.parent
PREVIOUS_RELEASE = REPO / "tests" / "fixtures" / "index-previous-release.sql"
TABLES = ("patients", "studies", "series", "instances", "result_objects", "deliveries")


def _previous_release_db(path: Path) -> Path:
    con = sqlite3.connect(path)
    con.executescript(PREVIOUS_RELEASE.read_text())
    con.close()
    return path


def _rows(path: Path) -> dict[str, list[dict]]:
    con = sqlite3.connect(path)
    con.row_factory = sqlite3.Row
    try:
        return {t: [dict(r) for r in con.execute(f'SELECT * FROM "{t}" ORDER BY id')] for t in TABLES}
    finally:
        con.close()


def _kept(before: dict[str, list[dict]], after: dict[str, list[dict]]) -> bool:
    """Every row of ``before`` is in ``after`` with the same values; columns that later migrations
    added are empty (NULL)."""
    for table, rows in before.items():
        if len(after[table]) != len(rows):
            return False
        for old, new in zip(rows, after[table]):
            if {k: new[k] for k in old} != old or any(new[k] is not None for k in new.keys() - old.keys()):
                return False
    return True


def _tables(path: Path) -> set[str]:
    con = sqlite3.connect(path)
    try:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()


def _schema_differences(index: Index) -> list:
    with index.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def test_previous_release_database_is_upgraded_and_keeps_its_rows(tmp_path):
    db = _previous_release_db(tmp_path / "index.sqlite")
    before = _rows(db)
    assert [len(before[t]) for t in TABLES] == [4, 4, 4, 9 - 1, 3, 6]
    assert "alembic_version" not in _tables(db)

    index = Index(f"sqlite:///{db}")
    try:
        assert migrate.current(index.db) == migrate.head() and not migrate.is_legacy(index.db)
        assert _kept(before, _rows(db)), "every row is still there, unchanged"
        assert _schema_differences(index) == []

        # the node's queries read them
        assert index.status() == {"instances": 8, "studies": 4, "studies_by_state": {
            "receiving": 1, "stable": 0, "inferring": 0, "results_ready": 0, "sent": 0, "failed": 2, "skipped": 1}}
        studies = {s["StudyInstanceUID"].rsplit(".", 1)[1]: s for s in index.list_studies()}
        assert {k: (v["state"], v["instances"]) for k, v in studies.items()} == {
            "1": ("failed", 2), "2": ("skipped", 2), "3": ("failed", 2), "4": ("receiving", 2)}
        assert studies["2"]["state_reason"] == "no processable image (fixture)"
        assert studies["1"]["created_at"] == "2026-11-02T09:00:00+00:00"
        assert len(index.study_instances("1.2.826.0.1.3680043.10.1999.1")) == 2
        jobs = {j["StudyInstanceUID"].rsplit(".", 1)[1]: j for j in Jobs(index).jobs()}
        assert jobs["3"]["last_error"] == "RuntimeError: fixture" and jobs["1"]["result_version"] == 1
        assert len(Jobs(index).result_objects("1.2.826.0.1.3680043.10.1999.1")) == 3
        queue = DeliveryQueue(index)
        summary = {d["destination"]: d["states"] for d in queue.study_deliveries(jobs["1"]["id"])}
        assert summary["ORTHANC"]["sent"] == 3 and summary["ARCHIVE"]["dead"] == 3
        assert queue.counts() == {"pending": 0, "sending": 0, "sent": 3, "dead": 3, "cancelled": 0}

        # and the upgraded index keeps working: a dead letter re-queued moves its study back
        assert queue.retry_dead() == 3
        assert index.list_studies(state="results_ready")[0]["StudyInstanceUID"].endswith(".1")
    finally:
        index.close()
    index = Index(f"sqlite:///{db}")  # opened again: nothing to do
    assert migrate.upgrade(index.db) == (migrate.head(), migrate.head())
    index.close()


def test_a_new_database_is_made_by_the_migrations_and_equals_the_models(tmp_path):
    db = tmp_path / "sub" / "index.sqlite"
    index = Index(f"sqlite:///{db}")
    try:
        assert migrate.current(index.db) == migrate.head()
        assert _tables(db) == set(Base.metadata.tables) | {"alembic_version"}
        assert _schema_differences(index) == []
        # the pragmas of the engine hold on the migrated file
        with index.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        index.close()
    # create=False leaves a database alone
    fresh = tmp_path / "untouched.sqlite"
    Index(f"sqlite:///{fresh}", create=False).close()
    assert "alembic_version" not in _tables(fresh)


def test_a_model_change_without_a_migration_is_noticed(tmp_path):
    """The comparison the suite relies on sees a column the migrations do not make."""
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    try:
        with index.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE studies DROP COLUMN last_calling_ae")
        diffs = _schema_differences(index)
        assert [(d[0], d[3].name) for d in diffs if d[0] == "add_column"] == [("add_column", "last_calling_ae")]
    finally:
        index.close()


def _open_together(url: str, go: Path, n: int = 6) -> None:
    """``n`` processes open the index at ``url`` at the same moment; each must end at the head revision."""
    # each process imports everything, says it is ready, then waits for the same starting signal
    code = ("import os, sys, time; from storage.index import Index; from storage import migrate; "
            "print('ready', flush=True)\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.001)\n"
            "i = Index(sys.argv[1]); print(migrate.current(i.db)); i.close()")
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(go)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [o[1][-2000:] for o in outs]
    assert {o[0].strip() for o in outs} == {migrate.head()}, outs


@pytest.mark.parametrize("start", ["new", "previous_release"])
def test_several_processes_opening_the_index_together_upgrade_it_once(tmp_path, start):
    db = tmp_path / "index.sqlite"
    if start == "previous_release":
        _previous_release_db(db)
    before = _rows(db) if db.exists() else None
    _open_together(f"sqlite:///{db}", tmp_path / "go")
    con = sqlite3.connect(db)
    assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [(migrate.head(),)]
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    con.close()
    if before is not None:
        assert _kept(before, _rows(db))


def _config(tmp_path: Path, database_url: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "node": {"ae_title": "MSKNODE", "bind": "127.0.0.1", "port": 11112},
        "peers": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 11113}],
        "storage": {"path": str(tmp_path / "var"), "database_url": database_url, "min_free_mb": 0}}))
    return path


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120, check=False)


def test_db_commands(tmp_path):
    db = _previous_release_db(tmp_path / "index.sqlite")
    config = _config(tmp_path, f"sqlite:///{db}")
    r = _cli(config, "db", "current")
    assert r.returncode == 0 and r.stdout.startswith("(none): made before schema migrations"), r.stderr
    r = _cli(config, "db", "upgrade")
    assert r.returncode == 0 and r.stdout.strip() == f"index schema upgraded from revision (none) to {migrate.head()}"
    r = _cli(config, "db", "upgrade")
    assert r.returncode == 0 and "nothing to do" in r.stdout
    r = _cli(config, "db", "current")
    assert r.returncode == 0 and r.stdout.strip() == f"{migrate.head()} (newest)"
    assert len(_rows(db)["instances"]) == 8

    empty = _config(tmp_path / "empty", f"sqlite:///{tmp_path / 'empty' / 'index.sqlite'}")
    r = _cli(empty, "db", "current")
    assert r.returncode == 0 and r.stdout.startswith("(none): no schema yet")


def test_db_command_errors_are_one_line(tmp_path):
    broken = tmp_path / "broken.sqlite"
    broken.write_bytes(b"this is not a database" * 100)
    r = _cli(_config(tmp_path, f"sqlite:///{broken}"), "db", "upgrade")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == \
        "error: index migration error: file is not a database", r.stderr
    assert "Traceback" not in r.stderr

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    r = _cli(_config(tmp_path, f"sqlite:///{a_file / 'index.sqlite'}"), "db", "current")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot make the index's directory:")

    with pytest.raises(StorageError, match="not a database"):
        Index(f"sqlite:///{broken}")


def test_several_processes_migrate_a_new_postgresql_database_once(tmp_path):
    """Issue 18 item 1: nodes starting together on one PostgreSQL run the migrations once (an
    advisory lock), and the schema is the models' one."""
    url = database_url(tmp_path, "postgresql")
    _open_together(url, tmp_path / "go")
    index = Index(url)
    try:
        with index.db.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").fetchall() == [(migrate.head(),)]
        assert _schema_differences(index) == []
    finally:
        index.close()
