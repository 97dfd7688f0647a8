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
import resource
import stat
import time
from collections.abc import Callable
from pathlib import Path

from expkit.procs import pid_alive

READ_ONLY = 0o444
TMP_SUFFIX = ".tmp"
STALE_TMP_SECONDS = 60
# A blob being copied in (`.<sha256>.<pid>.tmp`) in its folder of the store.
_BLOB_TMP = re.compile(r"^\.[0-9a-f]{64}\.(?P<pid>\d+)\.tmp$")
# Files up to this size (bytes) are read into memory whole: hashed and stored from one read.
WHOLE_READ_BYTES = 4 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
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
        self._root = os.fspath(self.root)

    def path(self, digest: str) -> Path:
        """Where the blob with this sha256 is (or would be) kept."""
        return Path(self.name(digest))

    def name(self, digest: str) -> str:
        """`path`, as a string (no Path object: it is asked for every file of a snapshot)."""
        return f"{self._root}{os.sep}{digest[:2]}{os.sep}{digest}"

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

    def store(self, fd: int, info: os.stat_result, dest: str) -> tuple[str, int]:
        """Hash what the open file `fd` holds (a user's file, `info` its fstat, read from its
        start),
        keep it in the store and place it at `dest` (a new name in an existing folder): one
        read for a file up to WHOLE_READ_BYTES, two for a larger one whose content is new.
        Returns (sha256, size in bytes) of what was read, which is what the blob holds even
        when the file changes meanwhile: the hash is never of other content than the blob's.
        New content is written at `dest` (private while written, then read-only and never
        more readable than the file), then linked into the store, so the store never holds a
        partial file; an existing blob is linked, tightened as `add_copy` does. Raises OSError.
        Safe in threads."""
        mode = stored_mode(info.st_mode)
        data = _read_up_to(fd, WHOLE_READ_BYTES + 1, info.st_size)
        if len(data) <= WHOLE_READ_BYTES:
            digest = hashlib.sha256(data).hexdigest()
            if not self._linked(digest, mode, dest):
                _write_new(dest, mode, lambda out: _write_all(out, data))
                self._publish(dest, digest, mode)
            return digest, len(data)
        os.lseek(fd, 0, os.SEEK_SET)  # large: hashed first, copied only when new
        digest, size = _hash_stream(fd, None)
        if self._linked(digest, mode, dest):
            return digest, size
        os.lseek(fd, 0, os.SEEK_SET)  # hashed again as it is copied: the copy's own hash
        copied: list[tuple[str, int]] = []
        _write_new(dest, mode, lambda out: copied.append(_hash_stream(fd, out)))
        self._publish(dest, copied[0][0], mode)
        return copied[0]

    def _linked(self, digest: str, mode: int, dest: str) -> bool:
        """Place the blob `digest` at `dest` when it exists (made no more readable than
        `mode` allows first); False when it does not."""
        return self._tightened(digest, mode) and self.place(digest, dest)

    def place(self, digest: str, dest: str) -> bool:
        """Put the blob `digest` at `dest`, a new name in an existing folder, as a hard link (a
        copy across file systems, or past the file system's limit of links to one file).
        False when there is no such blob (`store` the file instead)."""
        try:
            self._link_or_copy(digest, dest)
        except FileNotFoundError:
            if not os.path.isdir(os.path.dirname(dest) or "."):
                raise
            return False
        return True

    def linker(self) -> BlobLinker:
        """A `BlobLinker` on this store (close it when done, or use it in a `with`)."""
        return BlobLinker(self)

    def _link_or_copy(self, digest: str, dest: str) -> None:
        blob = self.name(digest)
        try:
            os.link(blob, dest)
        except OSError as error:
            if error.errno not in _NO_LINK:
                raise
            copy_private(blob, dest, stat.S_IMODE(os.stat(blob).st_mode))

    def _tightened(self, digest: str, mode: int) -> bool:
        """Whether the blob exists (then made no more readable than `mode` allows)."""
        blob = self.name(digest)
        try:
            current = stat.S_IMODE(os.stat(blob).st_mode)
        except FileNotFoundError:
            return False
        if current & mode != current:
            os.chmod(blob, current & mode)
        return True

    def _publish(self, file: str, digest: str, mode: int) -> None:
        """Make `file`, new content just written in a folder of expkit's own, the blob
        `digest`: by hard link (atomic: the blob appears whole), or a copy across file
        systems. When another process stored the same content meanwhile, `file` becomes a
        name of that blob instead (tightened to `mode`)."""
        blob = self.name(digest)
        try:
            try:
                os.link(file, blob)
            except FileNotFoundError:  # the blob's folder is new (once more: it is made)
                os.makedirs(os.path.dirname(blob), exist_ok=True)
                os.link(file, blob)
        except FileExistsError:
            self._tightened(digest, mode)
            _replace_with(Path(blob), Path(file))
        except OSError as error:
            if error.errno not in _NO_LINK:
                raise
            self._copy_in(Path(file), Path(blob), mode)

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


class BlobLinker:
    """`BlobStore.place` for many files in a row, in one system call each: the hard link is
    made between open folders (linkat with a descriptor of the blob's folder of the store
    and one of the destination folder), so the kernel does not resolve two long paths for
    every file. The store's folders are opened as they are first needed and stay open until
    `close`: at most 256 descriptors, and at most a quarter of the process's limit of open
    files (RLIMIT_NOFILE's soft limit), so that the snapshot's walk and the run keep the
    descriptors they need under a low `ulimit -n`; past that, a blob is placed by its path.
    Not shared between threads."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._folders: dict[str, int] = {}
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._most = 256 if soft == resource.RLIM_INFINITY else min(256, soft // 4)

    def place(self, digest: str, name: str, folder: int, path: str) -> bool:
        """Put the blob `digest` at `name` in the open folder `folder` (a descriptor) whose
        path is `path` (ending in a separator: for the slow way, a copy across file systems
        or past the file system's limit of links to one file). False when there is no such
        blob. Raises OSError as `BlobStore.place` does."""
        prefix = digest[:2]
        blobs = self._folders.get(prefix)
        if blobs is None:
            if len(self._folders) >= self._most:  # no descriptor to spare: by the path
                return self.store.place(digest, path + name)
            try:
                blobs = os.open(
                    f"{self.store._root}{os.sep}{prefix}",
                    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                )
            except OSError:  # no such folder (no such blob): see place
                return self.store.place(digest, path + name)
            self._folders[prefix] = blobs
        try:
            os.link(digest, name, src_dir_fd=blobs, dst_dir_fd=folder)
        except OSError:  # no such blob, another file system, too many links: see place
            return self.store.place(digest, path + name)
        return True

    def close(self) -> None:
        """Close the store's folders opened so far."""
        folders, self._folders = self._folders, {}
        for fd in folders.values():
            os.close(fd)

    def __enter__(self) -> BlobLinker:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _write_new(dest: str, mode: int, write: Callable[[int], object]) -> None:
    """A new file `dest` (never an existing one, nor through a link) holding what `write`
    writes to its descriptor, private while written, then given `mode`. Raises OSError;
    nothing is left at `dest` then."""
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        write(out)
        os.fchmod(out, mode)
    except BaseException:  # a full disk, a signal: no partial file is left
        os.close(out)
        with contextlib.suppress(OSError):
            os.unlink(dest)
        raise
    os.close(out)


def _read_up_to(fd: int, limit: int, expected: int) -> bytes:
    """What `fd` holds from its offset, up to `limit` bytes, read `expected` bytes first
    (the file's size: a small file is read in one call, into a buffer of its size)."""
    parts = []
    left = limit
    want = min(limit, expected + 1)
    while left > 0:
        chunk = os.read(fd, min(left, want))
        parts.append(chunk)
        left -= len(chunk)
        if len(chunk) < want:  # a short read of a regular file: its end
            break
        want = CHUNK_BYTES
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of `data` to `fd`."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _hash_stream(fd: int, out: int | None) -> tuple[str, int]:
    """The sha256 and size (bytes) of what `fd` holds from its offset, copied to `out` too
    when given."""
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(CHUNK_BYTES)
    while count := os.readv(fd, [buffer]):
        chunk = memoryview(buffer)[:count]
        digest.update(chunk)
        if out is not None:
            _write_all(out, chunk)
        size += count
    return digest.hexdigest(), size


def copy_private(
    source: str | Path, dest: str | Path, mode: int | None = None, also: int = 0
) -> None:
    """Copy `source` to a new file `dest` that is never readable by more than `mode` allows,
    not even while it is being written (`mode` None: the source's mode, with the bits of
    `also` added). An existing `dest` is replaced, never written through (when it is a link,
    the link itself goes). The content is copied by the kernel (copy_file_range) where it
    can. Raises OSError; no partial copy is left."""
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if mode is None:
            mode = stat.S_IMODE(os.fstat(src).st_mode) | also
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            out = os.open(dest, flags, 0o600)
        except FileExistsError:
            os.unlink(dest)
            out = os.open(dest, flags, 0o600)
        try:
            _copy_content(src, out)
            os.fchmod(out, mode)
        except BaseException:  # a full disk, a signal: no partial copy is left (dest is ours)
            os.close(out)
            with contextlib.suppress(OSError):
                os.unlink(dest)
            raise
        os.close(out)
    finally:
        os.close(src)


# copy_file_range refused for a reason a plain copy gets around (another file system on an
# older kernel, a file system or kernel without it).
_NO_COPY_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


def _copy_content(src: int, out: int) -> None:
    """Copy what `src` holds from its offset to `out`."""
    if hasattr(os, "copy_file_range"):
        try:
            while os.copy_file_range(src, out, 1 << 30):
                pass
            return
        except OSError as error:
            if error.errno not in _NO_COPY_RANGE:
                raise
    while chunk := os.read(src, CHUNK_BYTES):  # on from where copy_file_range stopped
        _write_all(out, chunk)


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
