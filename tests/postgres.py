"""A private PostgreSQL server for the tests, as the tests start their own Orthanc.

Debian's ``postgresql`` package (installed by ``.ci/run``) provides ``initdb`` and ``pg_ctl``; a
cluster is made in a temporary folder, listens on loopback on a free port (and on a socket in that
folder), and is stopped and removed at the end. PostgreSQL refuses to run as root: as root, the
cluster belongs to the ``postgres`` user the package creates, and its programs run as that user.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.peers import free_port, wait_for_port


def _bindir() -> Path | None:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if versions:
        return versions[-1].parent
    found = shutil.which("pg_ctl")  # elsewhere: the directory of the real program (not of a symlink to it)
    return Path(found).resolve().parent if found else None


def available() -> bool:
    return _bindir() is not None


class Postgres:
    """``with Postgres() as pg: url = pg.new_database()``: a throw-away server; one database per use."""

    def __init__(self) -> None:
        bindir = _bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql; .ci/run installs it)")
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="msknode-pg-"))
        self.data = self.root / "data"
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.role = self.user or pwd.getpwuid(os.geteuid()).pw_name
        self._made: set[str] = set()

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / program), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done

    def start(self) -> Postgres:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8",
                  "-U", self.role)
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=on -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", opts, "-w", "start")
        wait_for_port(self.port, timeout=30)
        return self

    def stop(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def new_database(self, name: str | None = None) -> str:
        """A database (new and empty, unless ``name`` was made before); its SQLAlchemy URL (psycopg 3,
        loopback TCP)."""
        name = name or "t_" + uuid.uuid4().hex[:12]
        if name not in self._made:
            self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.role, name)
            self._made.add(name)
        return f"postgresql+psycopg://{self.role}@127.0.0.1:{self.port}/{name}"


# -- which database the node-level tests use -------------------------------------------------------
#: ``MSKNODE_TEST_DATABASE=postgresql`` runs every test that starts a node (and the storage tests'
#: default index) on a private PostgreSQL server instead of SQLite: ``make test-postgresql``.
BACKENDS = ("sqlite", "postgresql")
_SERVER: Postgres | None = None


def backend() -> str:
    chosen = os.environ.get("MSKNODE_TEST_DATABASE", "sqlite").strip().lower() or "sqlite"
    if chosen not in BACKENDS:
        raise RuntimeError(f"MSKNODE_TEST_DATABASE={chosen!r}: use one of {', '.join(BACKENDS)}")
    return chosen


def server() -> Postgres:
    """The test session's PostgreSQL server, started on first use and stopped at exit."""
    global _SERVER
    if _SERVER is None:
        import atexit

        _SERVER = Postgres().start()
        atexit.register(_SERVER.stop)
    return _SERVER


def database_url(workdir: Path, kind: str | None = None) -> str:
    """The index database of a test's ``workdir``: SQLite in it, or a database of the session's
    PostgreSQL server named after it (``kind``, default :func:`backend`)."""
    if (kind or backend()) == "postgresql":
        # one database per folder, as SQLite has one file per folder: a node restarted on the same
        # folder finds its index again
        return server().new_database("t_" + hashlib.sha256(str(Path(workdir).resolve()).encode()).hexdigest()[:20])
    return f"sqlite:///{Path(workdir) / 'var' / 'index.sqlite'}"
