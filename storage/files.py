"""The instance file store: durable writes, names from hashes, never from a peer's UID.

Layout under the storage root::

    instances/<aa>/<study-hash>/<instance-hash>.dcm   received instances, as they arrived
    results/<aa>/<study-hash>/<id>.dcm                objects the node made
    tmp/                                              partial writes (same file system)

``<study-hash>`` and ``<instance-hash>`` are SHA-256 digests (hex, truncated)
of the StudyInstanceUID and SOPInstanceUID, so a re-sent instance lands on
the same name and replaces the earlier file atomically, and no text a peer
sent ever becomes part of a path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from storage.errors import OutOfResources, StorageError

_MB = 1024 * 1024


def uid_hash(uid: str, n: int = 32) -> str:
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:n]


@dataclass(frozen=True)
class StoredFile:
    relpath: str  # relative to the store root, '/'-separated
    size: int


#: on a store other nodes write to too, what the start-up clean-up may remove is at least this old
#: (seconds): a partial write, or a file written and not yet indexed, is younger by far
SHARED_MIN_AGE = 3600.0


class InstanceStore:
    """Durable file store rooted at ``root``; thread-safe (no shared mutable state).

    ``min_age`` (seconds): the start-up clean-ups (:meth:`_clean_tmp`, :meth:`sweep`) leave alone what
    was modified more recently: 0 when this process is the store's only writer; on a store that
    several nodes share (:data:`SHARED_MIN_AGE`), another node's write in progress, or its file
    written a moment before its index row, must not be taken for a crash's leftovers.
    """

    def __init__(self, root: str | os.PathLike, min_free_mb: int = 0, min_age: float = 0.0):
        self.root = Path(root).resolve()
        self.min_free_bytes = int(min_free_mb) * _MB
        self.min_age = float(min_age)
        self.tmp = self.root / "tmp"
        for d in (self.root, self.tmp, self.root / "instances", self.root / "results"):
            d.mkdir(parents=True, exist_ok=True)
        self._clean_tmp()

    def _old_enough(self, path: Path, now: float) -> bool:
        if not self.min_age:
            return True
        try:
            return now - path.stat().st_mtime >= self.min_age
        except OSError:
            return False  # gone already, or unreadable: leave it

    def _clean_tmp(self) -> None:
        """Partial files of a crashed write are never acknowledged: remove them at start-up."""
        now = time.time()
        for p in self.tmp.iterdir():
            if not self._old_enough(p, now):
                continue
            try:
                p.unlink()
            except OSError:
                pass

    # -- paths ---------------------------------------------------------------
    def instance_relpath(self, study_uid: str, sop_uid: str) -> str:
        sh = uid_hash(study_uid)
        return f"instances/{sh[:2]}/{sh}/{uid_hash(sop_uid)}.dcm"

    def result_relpath(self, study_uid: str, name_seed: str) -> str:
        sh = uid_hash(study_uid)
        return f"results/{sh[:2]}/{sh}/{uid_hash(name_seed)}.dcm"

    def abspath(self, relpath: str) -> Path:
        p = (self.root / relpath).resolve()
        if self.root not in p.parents:
            raise StorageError(f"path {relpath!r} is outside the store")
        return p

    # -- space ---------------------------------------------------------------
    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming: int = 0) -> None:
        if self.min_free_bytes and self.free_bytes() - incoming < self.min_free_bytes:
            raise OutOfResources(
                f"free space on {self.root} is below storage.min_free_mb ({self.min_free_bytes // _MB} MB)")

    # -- writes --------------------------------------------------------------
    def write(self, relpath: str, data: bytes | memoryview) -> StoredFile:
        """Write ``data`` to ``relpath`` durably: temp file, fsync, rename, fsync the directory."""
        self.check_space(len(data))
        final = self.abspath(relpath)
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            parent = final.parent
            for attempt in range(2):
                if not parent.exists():
                    parent.mkdir(parents=True, exist_ok=True)
                    _fsync_dir(parent.parent)
                try:
                    os.replace(tmp, final)
                    break
                except FileNotFoundError:
                    # on a shared store another node's start-up sweep removed the (old, empty) folder
                    # between the check and the rename: make it again, once
                    if attempt or not tmp.exists():
                        raise
            _fsync_dir(parent)
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        return StoredFile(relpath=relpath, size=len(data))

    def read(self, relpath: str) -> bytes:
        return self.abspath(relpath).read_bytes()

    def delete(self, relpath: str) -> None:
        try:
            self.abspath(relpath).unlink()
        except FileNotFoundError:
            pass

    def sweep(self, known: set[str]) -> tuple[int, int]:
        """Remove the files under ``instances/`` and ``results/`` whose relative path is not in ``known``
        (the paths the index holds), and the folders that leaves empty: what a crash between a write and
        its index row left behind. Run while this process writes nothing to the store (the node's
        start-up); on a shared store (``min_age``) other nodes may write: ``known`` must then be read
        before this call, and only what is older than ``min_age`` is removed. Returns (files removed,
        bytes freed)."""
        removed = freed = 0
        now = time.time()
        for top in ("instances", "results"):
            base = self.root / top
            # ages first: removing a file makes its folder young again
            listed = [(p, self._old_enough(p, now)) for p in sorted(base.rglob("*"), reverse=True)]
            for path, old in listed:  # files before their folders
                if not old:
                    continue  # another node's file (or folder) of a moment ago
                if path.is_dir():
                    try:
                        path.rmdir()  # only when empty
                    except OSError:
                        pass
                    continue
                if path.relative_to(self.root).as_posix() in known:
                    continue
                try:
                    size = path.stat().st_size
                    path.unlink()
                except OSError:
                    continue
                removed += 1
                freed += size
        return removed, freed

    def delete_study_dirs(self, study_uid: str) -> None:
        sh = uid_hash(study_uid)
        for top in ("instances", "results"):
            d = self.root / top / sh[:2] / sh
            if d.exists():
                shutil.rmtree(d)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
