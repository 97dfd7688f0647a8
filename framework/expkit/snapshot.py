"""The source snapshot: the job's source folder, content-hashed, frozen into the run.

`.expkitignore` in the source folder lists patterns to leave out (like .gitignore: `name`,
`*.ext`, `folder/`, `path/inside`, and `!pattern` to keep something back in).
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import re
import shutil
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from expkit.blobs import BlobStore, copy_private
from expkit.errors import UserError
from expkit.outputs import escaped
from expkit.snapindex import FOLDER, SnapshotIndex, stat_key

IGNORE_FILE = ".expkitignore"
INDEX_FOLDER = FOLDER  # the snapshot index's folder in the workspace (.expkit/)
ALWAYS_IGNORED = [
    ".git/",
    ".hg/",
    "__pycache__/",
    "*.pyc",
    ".expkit/",
    ".venv/",
    "venv/",
    ".ipynb_checkpoints/",
    ".pytest_cache/",
    ".ruff_cache/",
    "outputs/",
]
WARN_BYTES = 100 * 1024 * 1024
WARN_FILES = 2000


@dataclass
class Snapshot:
    hash: str
    files: dict[str, tuple[int, str]]  # relative path -> (size, sha256)
    warnings: list[str] = field(default_factory=list)
    rehashed: int = 0  # files read and hashed (the others were found unchanged in the index)

    @property
    def size(self) -> int:
        return sum(size for size, _ in self.files.values())


class Ignore:
    """Gitignore-like matching of relative posix paths: the last rule that matches decides
    (`!pattern` keeps back in); a rule without `/` matches the name, one with `/` the whole
    path; `name/` matches folders only. Patterns are fnmatch's (`*` also matches `/`).

    The rules are compiled into one regular expression per kind of target (name, path) and
    entry (file, folder), with the rules in reverse order: the first alternative that
    matches is the last rule that does, found in one match instead of one per rule."""

    def __init__(self, patterns: list[str]) -> None:
        self.rules: list[tuple[bool, bool, bool, str]] = []
        for line in patterns:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            keep = line.startswith("!")
            line = line.lstrip("!")
            dir_only = line.endswith("/")
            line = line.strip("/")
            self.rules.append((keep, dir_only, "/" in line, line))

        def matcher(is_dir: bool, anchored: bool) -> re.Pattern[str] | None:
            return _alternatives(
                [
                    (number, pattern)
                    for number, (_, dir_only, rule_anchored, pattern) in enumerate(self.rules)
                    if rule_anchored == anchored and (is_dir or not dir_only)
                ]
            )

        self._by_name = {False: matcher(False, False), True: matcher(True, False)}
        self._by_path = {False: matcher(False, True), True: matcher(True, True)}

    def ignored(self, rel: str, is_dir: bool) -> bool:
        last = -1
        by_name = self._by_name[is_dir]
        if by_name is not None:
            found = by_name.fullmatch(rel[rel.rfind("/") + 1 :])
            if found is not None:
                last = int(found.lastgroup[1:])  # type: ignore[index]
        by_path = self._by_path[is_dir]
        if by_path is not None:
            found = by_path.fullmatch(rel)
            if found is not None:
                last = max(last, int(found.lastgroup[1:]))  # type: ignore[index]
        return last >= 0 and not self.rules[last][0]


def _alternatives(rules: list[tuple[int, str]]) -> re.Pattern[str] | None:
    """One pattern matching what any of `rules` (number, fnmatch pattern) matches; the
    group that matches is named `r<number>` of the last rule in `rules` that matches."""
    if not rules:
        return None
    return re.compile(
        "|".join(
            f"(?P<r{number}>{fnmatch.translate(pattern)})" for number, pattern in reversed(rules)
        )
    )


def load_ignore(source: Path) -> Ignore:
    """The rules for `source`: ALWAYS_IGNORED, then its `.expkitignore`. Raises UserError
    when that file is there but cannot be read: a snapshot without its rules could take in
    what the user left out (data, secrets)."""
    patterns = list(ALWAYS_IGNORED)
    ignore_file = source / IGNORE_FILE
    if ignore_file.is_file():
        try:
            text = ignore_file.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            raise UserError(
                f"{escaped(str(ignore_file))}: cannot be read ({error.strerror or error}); "
                "the snapshot needs its rules"
            ) from None
        patterns += text.splitlines()
    return Ignore(patterns)


@dataclass(slots=True)
class _Found:
    """A file of the source folder to be in the snapshot, as the walk saw it."""

    rel: str
    path: str
    info: os.stat_result  # the file's (a link's: its target's) stat data, before any read
    follow: bool  # a link inside the source folder: read through it
    key: str = ""  # its stat data as the index records them
    digest: str | None = None  # from the index, else once read; None: gone meanwhile
    size: int = 0
    changed: bool = False  # into something else than a file while the snapshot was taken
    refused: str = ""  # why it could not be opened (permission denied): not in the snapshot


def take(
    source: Path,
    dest: Path,
    blobs: BlobStore,
    index_dir: Path | None = None,
    workers: int | None = None,
) -> Snapshot:
    """Copy `source` into the blob store and lay it out read-only at `dest`.

    Links are never followed out of `source`: a link to a folder is not followed at all, a
    link to a file outside `source` (or to nothing) is left out; each is named in a warning
    (with what to do instead). A link to a file inside `source` is taken as that file's
    content under the link's name. A file or folder that cannot be read (permission denied)
    is left out, named in a warning: the snapshot holds what the user can read.

    With `index_dir` (the workspace's `.expkit/snapshot-index/`), a file whose stat data are
    those the last snapshot of `source` recorded, and not racy, is not read again (see
    expkit.snapindex): its blob is linked as the walk finds it. The others are read once,
    hashed and stored (by `workers` threads, default one per CPU, at most 8, when there are
    many bytes to read); their count is `Snapshot.rehashed`. Without `index_dir`, or with an
    index that is missing, damaged or cannot be written, every file is read: the index only
    ever saves time. Raises OSError (the store or `dest` cannot be written).
    """
    index = _open_index(index_dir, os.path.realpath(source))
    warnings: list[str] = []
    found: list[_Found] = []
    os.makedirs(dest, exist_ok=True)
    layout = _Layout(str(dest), blobs)
    try:
        unknown = []
        for item in _walk(source, load_ignore(source), warnings):
            found.append(item)
            item.key = stat_key(item.info)
            if index is not None:
                item.digest = index.lookup(item.rel, item.key, item.info.st_ctime_ns)
            if item.digest is None or not layout.link(item):
                unknown.append(item)
        rehashed = _read_all(unknown, layout, workers or _default_workers())
        files: dict[str, tuple[int, str]] = {}
        for item in sorted(found, key=lambda item: item.rel):
            if item.refused:
                warnings.append(_unreadable(item.rel, item.refused))
            elif item.changed:
                warnings.append(
                    f"source folder: {escaped(item.rel)} changed into something other than a "
                    "file while the snapshot was taken: not in the snapshot"
                )
            if item.digest is None:
                continue  # gone (or no longer a file) while the snapshot was taken
            files[item.rel] = (item.size, item.digest)
            if index is not None:
                index.record(item.rel, item.key, item.digest)
        if index is not None:
            index.save(rehashed)
    finally:
        if index is not None:
            index.close()
    listing = "".join(f"{p}\0{d}\n" for p, (_, d) in files.items())
    snapshot = Snapshot(hashlib.sha256(listing.encode()).hexdigest(), files, warnings, rehashed)
    if snapshot.size > WARN_BYTES or len(files) > WARN_FILES:
        snapshot.warnings.append(
            f"the source folder holds {len(files)} files, {snapshot.size / 1e6:.0f} MB; "
            f"list data and other large files in {IGNORE_FILE} and pass them as `data:` inputs"
        )
    return snapshot


# Files are read by threads when there are this many bytes to read, in runs of about
# _CHUNK_BYTES (counting _FILE_BYTES more for each file: opening it, making its blob).
_THREADS_FROM_BYTES = 16 * 1024 * 1024
_CHUNK_BYTES = 4 * 1024 * 1024
_FILE_BYTES = 16 * 1024


def _read_all(unknown: list[_Found], layout: _Layout, workers: int) -> int:
    """Read, hash, store and link each of `unknown`; the number of files read. Threads share
    the work when it is large: they overlap reading and hashing (hashlib lets go of the GIL
    on large buffers). Links to known blobs are made by the walking thread instead: many
    short calls in two threads wait on each other for the GIL (a convoy) and take longer
    than in one."""
    cost = [_FILE_BYTES + item.info.st_size for item in unknown]
    if workers <= 1 or sum(cost) < _THREADS_FROM_BYTES:
        return layout.read(unknown)
    chunks, start, total = [], 0, 0
    for end, size in enumerate(cost, 1):
        total += size
        if total >= _CHUNK_BYTES:
            chunks.append(unknown[start:end])
            start, total = end, 0
    chunks.append(unknown[start:])
    with ThreadPoolExecutor(workers, "expkit-snapshot") as pool:
        return sum(pool.map(layout.read, chunks))


class _Layout:
    """Lays files out at `dest` from the store."""

    def __init__(self, dest: str, blobs: BlobStore) -> None:
        self.dest = dest
        self.prefix = dest + os.sep
        self.blobs = blobs
        self.made: set[str] = {""}  # folders of dest made so far

    def _target(self, rel: str) -> str:
        folder = rel[: max(rel.rfind("/"), 0)]
        if folder not in self.made:
            os.makedirs(self.prefix + folder, exist_ok=True)
            self.made.add(folder)
        return self.prefix + rel

    def link(self, item: _Found) -> bool:
        """Link a file the index knows to its blob; False when the blob is missing. (Run
        once per file of every snapshot: kept to a few calls.)"""
        item.size = item.info.st_size
        target = self._target(item.rel)
        digest: str = item.digest  # type: ignore[assignment]
        try:
            os.link(self.blobs.name(digest), target)
        except OSError:  # no such blob, another file system, too many links: see place
            return self.blobs.place(digest, target)
        return True

    def read(self, files: list[_Found]) -> int:
        """Read, hash and store each file, then link it; sets its digest and size (digest
        None: it went, or changed into something else, meanwhile, or cannot be opened: see
        `_Found.refused`). The number read."""
        read = 0
        for item in files:
            target = self._target(item.rel)
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO now: never waited on
            try:
                fd = os.open(item.path, flags if item.follow else flags | os.O_NOFOLLOW)
            except FileNotFoundError:  # removed since it was listed: not in the snapshot
                item.digest = None
                continue
            except PermissionError as error:  # as a folder that cannot be read: a warning
                item.digest, item.refused = None, error.strerror or str(error)
                continue
            except OSError as error:
                if error.errno != errno.ELOOP:
                    raise
                item.digest, item.changed = None, True  # a link now: named in a warning
                continue
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):  # a FIFO, a folder now: named too
                    item.digest, item.changed = None, True
                    continue
                item.digest, item.size = self.blobs.store(fd, info, target)
                read += 1
            finally:
                os.close(fd)
        return read


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _open_index(index_dir: Path | None, source: str) -> SnapshotIndex | None:
    """The source folder's index, None without one (no `index_dir`, or one that cannot be
    written: a snapshot is then taken by reading every file, as without an index)."""
    if index_dir is None:
        return None
    try:
        return SnapshotIndex(index_dir, source).open()
    except OSError:
        return None


def _walk(source: Path, ignore: Ignore, warnings: list[str]) -> Iterator[_Found]:
    """The files of `source` to be in the snapshot, folder by folder as os.walk goes (names in
    order); what is left out and why goes into `warnings`."""
    root = os.path.realpath(source)
    pending = [(str(source), "")]
    while pending:
        folder, prefix = pending.pop()
        try:
            with os.scandir(folder) as scan:
                entries = list(scan)
            entries.sort(key=_name)
        except OSError as error:
            if prefix:  # the source folder itself: as before, an empty snapshot
                warnings.append(
                    f"source folder: {escaped(prefix)} cannot be read "
                    f"({error.strerror or error}): not in the snapshot"
                )
            continue
        subfolders: list[os.DirEntry[str]] = []
        names: list[os.DirEntry[str]] = []
        kept: list[tuple[str, str]] = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # a link to a folder counts as one, as in os.walk
            except OSError:
                is_dir = False
            (subfolders if is_dir else names).append(entry)
        for entry in subfolders:
            rel = prefix + entry.name
            if _not_utf8(entry.name):
                warnings.append(_unnamed(rel, folder=True))
            elif ignore.ignored(rel, True):
                continue
            elif entry.is_symlink():
                warnings.append(_link_warning(rel, Path(entry.path), root, folder=True))
            else:
                kept.append((entry.path, rel + "/"))
        for entry in names:
            name = entry.name
            rel = prefix + name
            if not name.isascii() and _not_utf8(name):
                warnings.append(_unnamed(rel, folder=False))
            elif not ignore.ignored(rel, False):
                try:
                    info = entry.stat(follow_symlinks=False)
                    item = (
                        _Found(rel, entry.path, info, follow=False)
                        if stat.S_ISREG(info.st_mode)
                        else _file(entry, rel, root, warnings)
                    )
                except FileNotFoundError:  # removed since the folder was listed
                    continue
                except PermissionError as error:  # in a folder listed but not searchable
                    warnings.append(_unreadable(rel, error.strerror or str(error)))
                    continue
                if item is not None:
                    yield item
        pending.extend(reversed(kept))  # the first folder is walked next, as os.walk does


def _name(entry: os.DirEntry[str]) -> str:
    return entry.name


def _file(entry: os.DirEntry[str], rel: str, root: str, warnings: list[str]) -> _Found | None:
    """The file `entry` as it goes into the snapshot; None (with a warning) when it does not:
    a link to outside the source folder or to nothing, a FIFO, a socket, a device."""
    try:
        info = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            real = os.path.realpath(entry.path)
            target = os.stat(real) if _inside(real, root) else None
            if target is None or not stat.S_ISREG(target.st_mode):
                warnings.append(_link_warning(rel, Path(entry.path), root, folder=False))
                return None
            return _Found(rel, entry.path, target, follow=True)
    except FileNotFoundError:  # removed (or its target) while the folder was listed
        if os.path.islink(entry.path):
            warnings.append(_link_warning(rel, Path(entry.path), root, folder=False))
        return None
    if not stat.S_ISREG(info.st_mode):  # a FIFO, a socket: not source code (and never read)
        warnings.append(
            f"source folder: {escaped(rel)} is not a regular file (a FIFO, a socket, "
            f"a device): not in the snapshot; list it in {IGNORE_FILE} to silence this"
        )
        return None
    return _Found(rel, entry.path, info, follow=False)


def _unreadable(rel: str, why: str) -> str:
    """Why a file that cannot be read (`why`: permission denied) is not in the snapshot."""
    return (
        f"source folder: {escaped(rel)} cannot be read ({why}): not in the snapshot; "
        f"list it in {IGNORE_FILE} to silence this"
    )


def _not_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _unnamed(rel: str, folder: bool) -> str:
    """Why a name that is not UTF-8 is not in the snapshot (it cannot be recorded)."""
    what = f"{escaped(rel)}/ (a folder)" if folder else escaped(rel)
    return (
        f"source folder: {what}: the name is not UTF-8 and cannot be recorded: not in the "
        "snapshot; rename it if the script needs it"
    )


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _link_warning(rel: str, path: Path, root: str, folder: bool) -> str:
    """Why a link in the source folder is not in the snapshot, and what to do instead."""
    target = os.readlink(path)
    real = os.path.realpath(path)
    if not os.path.exists(real):
        return f"source folder: {rel} is a link to {target}, which does not exist: left out"
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(rel).name).strip("_") or "data"
    instead = (
        f"pass it as a `data:` input instead (data: {{{key}: {{source: {real}}}}}, then "
        f"${{data.{key}}} in args) or list it in {IGNORE_FILE}"
    )
    if folder and _inside(real, root):
        inside = Path(os.path.relpath(real, root)).as_posix()
        return (
            f"source folder: {rel}/ is a link to {target}: links to folders are not followed, "
            f"so the snapshot holds those files under {inside}/ only (use that name)"
        )
    kind = f"{rel}/ is a link to the folder" if folder else f"{rel} is a link to"
    return (
        f"source folder: {kind} {target}, outside the source folder: not in the snapshot "
        f"(links are not followed out of it); {instead}"
    )


def working_copy(snapshot_dir: Path, work_dir: Path, workers: int | None = None) -> None:
    """A writable copy of the snapshot for the script to run in; each file is readable by
    whoever could read it in the source folder, and by no one else. A real copy (the script
    may change any file; a link would change the store), made by the kernel where it can
    (copy_file_range: a reflink on a copy-on-write file system), `workers` threads at a time
    (default: one per CPU, at most 8). Raises OSError."""
    files: list[tuple[str, str]] = []
    folders: list[tuple[str, str]] = []
    pending = [(str(snapshot_dir), str(work_dir))]
    while pending:
        folder, copy = pending.pop()
        os.makedirs(copy, exist_ok=True)
        folders.append((folder, copy))
        with os.scandir(folder) as scan:
            for entry in scan:
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, os.path.join(copy, entry.name)))
                else:
                    files.append((entry.path, os.path.join(copy, entry.name)))
    workers = workers or _default_workers()
    per_chunk = max(64, len(files) // (workers * 4) + 1)
    chunks = [files[start : start + per_chunk] for start in range(0, len(files), per_chunk)]
    if len(chunks) <= 1:
        for chunk in chunks:
            _copy_chunk(chunk)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="expkit-working-copy") as pool:
            list(pool.map(_copy_chunk, chunks))
    for folder, copy in reversed(folders):  # as copytree: each folder's mode, once filled
        shutil.copymode(folder, copy)


def _copy_chunk(chunk: list[tuple[str, str]]) -> None:
    for source, dest in chunk:
        copy_private(source, dest, also=stat.S_IWUSR)
