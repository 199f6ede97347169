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


class InstanceStore:
    """Durable file store rooted at ``root``; thread-safe (no shared mutable state)."""

    def __init__(self, root: str | os.PathLike, min_free_mb: int = 0):
        self.root = Path(root).resolve()
        self.min_free_bytes = int(min_free_mb) * _MB
        self.tmp = self.root / "tmp"
        for d in (self.root, self.tmp, self.root / "instances", self.root / "results"):
            d.mkdir(parents=True, exist_ok=True)
        self._clean_tmp()

    def _clean_tmp(self) -> None:
        """Partial files of a crashed write are never acknowledged: remove them at start-up."""
        for p in self.tmp.iterdir():
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
            if not parent.exists():
                parent.mkdir(parents=True, exist_ok=True)
                _fsync_dir(parent.parent)
            os.replace(tmp, final)
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
        its index row left behind. Run only while nothing writes to the store (the node's start-up).
        Returns (files removed, bytes freed)."""
        removed = freed = 0
        for top in ("instances", "results"):
            base = self.root / top
            for path in sorted(base.rglob("*"), reverse=True):  # files before their folders
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
