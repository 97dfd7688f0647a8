"""A content-addressed file store: each distinct file is kept once and hard-linked elsewhere.

Snapshots, sealed outputs and registered model versions all point at the same blobs, so
registering a 1 GB model writes no second gigabyte. Blobs are read-only, and never more
readable than the file they were made from: a 0600 file becomes a 0400 blob (see
`stored_mode`). The store never changes a file that has a name outside it: a file with other
hard links is copied in, not adopted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import time
from pathlib import Path

from expkit.procs import pid_alive

READ_ONLY = 0o444
TMP_SUFFIX = ".tmp"
STALE_TMP_SECONDS = 60
# A blob being copied in (`.<sha256>.<pid>.tmp`) in its folder of the store.
_BLOB_TMP = re.compile(r"^\.[0-9a-f]{64}\.(?P<pid>\d+)\.tmp$")
# A hard link failed for a reason that a copy gets around (another file system, a file system
# without hard links, too many links to one file).
_NO_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP)


def hash_file(path: Path) -> str:
    """The sha256 of a file's content, as hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def stored_mode(mode: int) -> int:
    """The mode of a stored copy of a file with `mode`: read-only, readable by whoever could
    read the file (the owner always), never by anyone else."""
    return (stat.S_IMODE(mode) & READ_ONLY) | stat.S_IRUSR


def manifest(folder: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (size, sha256) of every regular file under `folder`, in path order.

    Links are not followed (neither to files nor to folders), and neither is `folder` itself
    when it is a link: what is listed lives in `folder`.
    """
    found: dict[str, tuple[int, str]] = {}
    if Path(folder).is_symlink() or not Path(folder).is_dir():
        return found
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in names:
            path = Path(root) / name
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                found[path.relative_to(folder).as_posix()] = (info.st_size, hash_file(path))
    return dict(sorted(found.items()))


class BlobStore:
    """The workspace's blobs, each at `<root>/<first two hex digits>/<sha256>`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        """Where the blob with this sha256 is (or would be) kept."""
        return self.root / digest[:2] / digest

    def adopt(self, file: Path, digest: str) -> None:
        """Make `file`, a regular file in a folder of the run's own (sealed outputs, a kept
        export), a read-only name of the blob `digest`.

        A file whose inode has no other name becomes the blob by hard link (no copy). A file
        with other names (a hard link to a file that may live outside the run) is copied into
        the store and its name in the run replaced by the blob: its mode and its other names
        are never changed.
        """
        info = os.lstat(file)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{file} is not a regular file")
        blob = self.path(digest)
        if blob.exists():
            self._tighten(blob, info.st_mode)
            _replace_with(blob, file)
            return
        if info.st_nlink > 1:
            self._copy_in(file, blob, info.st_mode)
            _replace_with(blob, file)
            return
        os.chmod(file, stored_mode(info.st_mode))
        blob.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, blob)
        except FileExistsError:  # another process adopted the same content just now
            self._tighten(blob, info.st_mode)
            _replace_with(blob, file)
        except OSError as error:
            if error.errno not in _NO_LINK:
                raise
            self._copy_in(file, blob, info.st_mode)

    def add_copy(self, file: Path, digest: str) -> Path:
        """Copy a file expkit does not own (a user's source file) into the store."""
        blob = self.path(digest)
        mode = os.stat(file).st_mode
        if blob.exists():
            self._tighten(blob, mode)
        else:
            blob.parent.mkdir(parents=True, exist_ok=True)
            self._copy_in(file, blob, mode)
        return blob

    def link_to(self, digest: str, dest: Path) -> None:
        """Place the blob at `dest` as a hard link (a copy across file systems)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        blob = self.path(digest)
        try:
            os.link(blob, dest)
        except OSError as error:
            if error.errno not in _NO_LINK:
                raise
            copy_private(blob, dest, stored_mode(blob.stat().st_mode))

    def _copy_in(self, file: Path, blob: Path, mode: int) -> None:
        blob.parent.mkdir(parents=True, exist_ok=True)
        tmp = blob.with_name(f".{blob.name}.{os.getpid()}{TMP_SUFFIX}")
        try:
            copy_private(file, tmp, stored_mode(mode))
            os.replace(tmp, blob)
        finally:  # a full disk or a signal half-way: the partial copy never stays
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @staticmethod
    def _tighten(blob: Path, mode: int) -> None:
        """A blob is readable by no one who could not read every file it was made from."""
        current = stat.S_IMODE(blob.stat().st_mode)
        wanted = current & stored_mode(mode)
        if wanted != current:
            os.chmod(blob, wanted)


def copy_private(source: Path, dest: Path, mode: int) -> None:
    """Copy `source` to a new file `dest` that is never readable by more than `mode` allows,
    not even while it is being written. An existing `dest` is replaced, never written
    through (when it is a link, the link itself goes)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dest)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, 1024 * 1024)
        os.chmod(dest, mode)
    except BaseException:  # a full disk, a signal: no partial copy is left (dest is ours)
        with contextlib.suppress(OSError):
            os.unlink(dest)
        raise


def _replace_with(blob: Path, file: Path) -> None:
    """Make `file` a name of `blob` (a copy of it across file systems), atomically. Only the
    name `file` changes: the inode it named before, and that inode's other names, do not."""
    tmp = file.with_name(short_temporary_name())  # never built from a name that may be long
    try:
        try:
            os.link(blob, tmp)
        except OSError as error:
            if error.errno not in _NO_LINK:
                raise
            copy_private(blob, tmp, stored_mode(blob.stat().st_mode))
        os.replace(tmp, file)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def short_temporary_name() -> str:
    """A fresh name for a temporary file next to another, short whatever that file's name
    (a name built from it could exceed the file system's 255 bytes)."""
    return f".expkit-{os.getpid()}-{os.urandom(6).hex()}{TMP_SUFFIX}"


def remove_stale_tmp(root: Path) -> list[Path]:
    """Remove the temporary files of blob copies whose process is gone (a kill -9 or a crash
    half-way through a copy into the store): left, they keep a full disk full. Returns them."""
    removed = []
    with contextlib.suppress(OSError):
        for folder in Path(root).iterdir():
            if folder.is_symlink() or not folder.is_dir():
                continue
            for path in folder.iterdir():
                found = _BLOB_TMP.match(path.name)
                if found and not pid_alive(int(found["pid"])) and _idle(path):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                        removed.append(path)
    return removed


def _idle(path: Path) -> bool:
    """Not written for a minute: not a copy in progress by a process of another machine
    sharing the workspace (whose pid means nothing here)."""
    return time.time() - os.lstat(path).st_mtime > STALE_TMP_SECONDS
