"""The index database: its engine, its sessions, the process's write lock and its errors.

One :class:`Database` per process and URL is shared by :class:`~storage.index.Index`,
:class:`~storage.jobs.Jobs` and :class:`~storage.deliveries.DeliveryQueue`.
SQLite (WAL, ``synchronous=FULL``: a commit survives power loss) by default,
PostgreSQL by URL. A write is one short transaction under the write lock
(:meth:`Database.write`); a write that returns has been committed.

Every SQLAlchemy error leaving this package becomes a
:class:`~storage.errors.StorageError` here, and only here
(:func:`storage_errors`). Its message carries the driver's first line (e.g.
``database is locked``), never the statement's parameters: those may be
patient data.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from storage.errors import StorageError

log = logging.getLogger("storage.database")

T = TypeVar("T")

#: how many times a write that lost a race (IntegrityError: another process inserted the same row) is tried
CONFLICT_ATTEMPTS = 3


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, not only a crash
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``: SQLite with the pragmas above (its directory created), else a pooled server engine.

    Statement parameters are kept out of exception messages and logs (``hide_parameters``). A URL
    that cannot be parsed, or whose driver is not installed, raises :class:`StorageError` (without
    the URL: it may hold a password).
    """
    try:
        return _make_engine(url)
    except ArgumentError:
        raise StorageError("the index database URL is not valid") from None
    except ImportError as exc:
        raise StorageError(f"the index database's driver is not installed: {exc}") from None


def _make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            try:
                Path(u.database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot make the index's directory: {exc.strerror}") from None
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True)
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, hide_parameters=True)
    return engine


def describe(exc: SQLAlchemyError) -> str:
    """The driver's first line of ``exc`` (no SQL, no parameters, no PostgreSQL ``DETAIL`` with key values)."""
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else type(exc).__name__
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


@contextmanager
def storage_errors(what: str = "index") -> Iterator[None]:
    """Turn SQLAlchemy errors raised in the block into :class:`StorageError` (the one mapping of this package).

    ``OperationalError`` (database unreachable, locked, disk I/O) reads ``"<what> unavailable: ..."``,
    ``IntegrityError`` ``"<what> conflict: ..."``, any other ``"<what> error: ..."``.
    """
    try:
        yield
    except OperationalError as exc:
        raise StorageError(f"{what} unavailable: {describe(exc)}") from None
    except IntegrityError as exc:
        raise StorageError(f"{what} conflict: {describe(exc)}") from None
    except SQLAlchemyError as exc:
        raise StorageError(f"{what} error: {describe(exc)}") from None


class Database:
    """The engine, the session factory and the write lock of one index database (thread-safe)."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self.Session = sessionmaker(self.engine, expire_on_commit=False)
        #: one writer at a time in this process: SQLite serialises writers anyway, and this keeps
        #: get-or-create sequences (patients, studies, series) free of races between threads
        self.write_lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction under the write lock, committed when the block returns.

        Database errors become :class:`StorageError`; errors of the block itself pass unchanged.
        """
        with storage_errors(), self.write_lock, self.Session.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading (no lock); database errors become :class:`StorageError`."""
        with storage_errors(), self.Session() as session:
            yield session

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """Whether this process may run the periodic job ``name`` now, among all processes on this database.

        PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``, keyed by a hash of ``name``)
        held on a connection of its own for the block, so that of several nodes on one database one
        runs the job and the others skip this turn (the block gets False; it never waits). A node that
        dies loses its lock with its connection. SQLite (one node): always True.
        """
        if self.is_sqlite:
            yield True
            return
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        with storage_errors(), self.engine.connect() as conn:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar())
            conn.commit()
            try:
                yield got
            finally:
                if got:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    conn.commit()

    def write_retrying(self, work: Callable[[Session], T], what: str) -> T:
        """Run ``work(session)`` in :meth:`write`, again when it lost an insert race to another process.

        An ``IntegrityError`` (another listener, e.g. on PostgreSQL, created the same patient, study,
        series or instance first) is retried up to :data:`CONFLICT_ATTEMPTS` times, then reported as
        ``"index conflict while <what>"``.
        """
        with storage_errors():
            for _attempt in range(CONFLICT_ATTEMPTS):
                try:
                    with self.write_lock, self.Session.begin() as session:
                        return work(session)
                except IntegrityError:
                    log.info("index conflict while %s: trying again", what)
        raise StorageError(f"index conflict while {what}")
