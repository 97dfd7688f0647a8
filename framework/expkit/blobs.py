"""A content-addressed file store: each distinct file is kept once and hard-linked elsewhere.

Snapshots, sealed outputs and registered model versions all point at the same blobs, so
registering a 1 GB model writes no second gigabyte. Blobs are read-only.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

READ_ONLY = 0o444


def hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest(folder: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (size, sha256) of every file under `folder`, in path order."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        found[path.relative_to(folder).as_posix()] = (path.stat().st_size, hash_file(path))
    return found


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def adopt(self, file: Path, digest: str) -> None:
        """Make `file` (which expkit owns, e.g. a sealed output) a blob by hard link."""
        blob = self.path(digest)
        if blob.exists():
            _replace_with_link(blob, file)
            return
        file.chmod(READ_ONLY)
        blob.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, blob)
        except FileExistsError:  # another process adopted the same content just now
            _replace_with_link(blob, file)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            self._copy_in(file, blob)

    def add_copy(self, file: Path, digest: str) -> Path:
        """Copy a file expkit does not own (a user's source file) into the store."""
        blob = self.path(digest)
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            self._copy_in(file, blob)
        return blob

    def link_to(self, digest: str, dest: Path) -> None:
        """Place the blob at `dest` as a hard link (a copy across file systems)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(self.path(digest), dest)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            shutil.copyfile(self.path(digest), dest)
            dest.chmod(READ_ONLY)

    def _copy_in(self, file: Path, blob: Path) -> None:
        tmp = blob.with_name(f".{blob.name}.{os.getpid()}.tmp")
        shutil.copyfile(file, tmp)
        tmp.chmod(READ_ONLY)
        os.replace(tmp, blob)


def _replace_with_link(blob: Path, file: Path) -> None:
    """Point `file` at the existing blob so the content is stored once."""
    tmp = file.with_name(f".{file.name}.link.tmp")
    try:
        os.link(blob, tmp)
    except OSError:
        file.chmod(READ_ONLY)
        return
    os.replace(tmp, file)
