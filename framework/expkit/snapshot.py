"""The source snapshot: the job's source folder, content-hashed, frozen into the run.

`.expkitignore` in the source folder lists patterns to leave out (like .gitignore: `name`,
`*.ext`, `folder/`, `path/inside`, and `!pattern` to keep something back in).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import gc
import hashlib
import os
import re
import shutil
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path

from expkit.blobs import BlobStore, copy_private, stored_mode
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
    """What `take` laid out: its hash (of the paths, contents and which files are
    executable, as a git tree records a file's mode), the files, what was left out and why."""

    hash: str
    files: dict[str, tuple[int, str]]  # relative path -> (size, sha256)
    warnings: list[str] = field(default_factory=list)
    rehashed: int = 0  # files read and hashed (the others were found unchanged in the index)
    executable: frozenset[str] = frozenset()  # the files with an execute bit

    @property
    def size(self) -> int:
        return sum(size for size, _ in self.files.values())


class Ignore:
    """Gitignore-like matching of relative posix paths: the last rule that matches decides
    (`!pattern` keeps back in); a rule without `/` matches the name, one with `/` the whole
    path; `name/` matches folders only. Patterns are fnmatch's (`*` also matches `/`).

    The rules are compiled into one regular expression per kind of target (name, path) and
    entry (file, folder), with the rules in reverse order: the first alternative that
    matches is the last rule that does, found in one match instead of one per rule. Most
    files are decided without it: when every rule that can leave a file out is a plain name
    or `*` and a plain ending (`*.pyc`, the usual rules), a name that is none of those and
    ends in none of those is kept (no rule leaving it out matches it) at the cost of a set
    lookup and an `endswith`.
    """

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
        self._file_names = _plain_names(
            [pattern for keep, dir_only, _, pattern in self.rules if not keep and not dir_only]
        )

    def kept_files(self, prefix: str, entries: list[os.DirEntry[str]]) -> list[os.DirEntry[str]]:
        """The files `entries` of the folder at `prefix` (relative, "" or ending in `/`) that
        are not left out, in their order: `ignored` for a folder's files at once."""
        if self._file_names is None:
            return [entry for entry in entries if not self.ignored(prefix + entry.name, False)]
        names, endings = self._file_names
        return [
            entry
            for entry in entries
            if (entry.name not in names and not entry.name.endswith(endings))
            or not self.ignored(prefix + entry.name, False)
        ]

    def ignored(self, rel: str, is_dir: bool) -> bool:
        """Whether the entry at `rel` (a file, or a folder with `is_dir`) is left out."""
        if not is_dir and self._file_names is not None:
            names, endings = self._file_names
            name = rel[rel.rfind("/") + 1 :]
            if name not in names and not name.endswith(endings):
                return False
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


def _plain_names(patterns: list[str]) -> tuple[frozenset[str], tuple[str, ...]] | None:
    """The names and the endings that `patterns` (fnmatch patterns matched against names)
    match, when each is a plain name or `*` and a plain ending; None when one is not (or
    holds a `/`: it is matched against the whole path)."""
    names, endings = set(), []
    for pattern in patterns:
        if not _FNMATCH_SPECIAL.search(pattern) and "/" not in pattern:
            names.add(pattern)
        elif pattern.startswith("*") and not _FNMATCH_SPECIAL.search(pattern[1:]):
            if "/" in pattern:
                return None
            endings.append(pattern[1:])
        else:
            return None
    return frozenset(names), tuple(endings)


_FNMATCH_SPECIAL = re.compile(r"[*?\[]")


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
    name: str  # its name in its folder (the end of `rel`)
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
    with _no_cycle_collection():
        return _take(source, dest, blobs, index_dir, workers)


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Python's cycle collector held off for the block, then let run again (if it ran
    before). A snapshot makes a few objects per file that live until it ends and form no
    cycles; the collector would walk them, and everything else the process holds, many
    times over for nothing (about a sixth of an unchanged tree's snapshot). Mercurial does
    the same around reading its dirstate (`util.nogc`)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _take(
    source: Path,
    dest: Path,
    blobs: BlobStore,
    index_dir: Path | None,
    workers: int | None,
) -> Snapshot:
    index = _open_index(index_dir, os.path.realpath(source))
    warnings: list[str] = []
    found: list[_Found] = []
    os.makedirs(dest, exist_ok=True)
    layout = _Layout(str(dest), blobs)
    try:
        unknown = []
        lookup = index.lookup if index is not None else None
        place = layout.links.place  # the loop below runs for every file: kept to a few calls
        for folder, items in _walk(source, load_ignore(source), warnings):
            found += items
            fd, path = layout.folder(folder)
            try:
                for item in items:
                    info = item.info
                    item.key = key = stat_key(info)
                    if lookup is None:
                        unknown.append(item)
                        continue
                    item.digest = digest = lookup(item.rel, key, info.st_ctime_ns)
                    if digest is not None and place(digest, item.name, fd, path):
                        item.size = info.st_size
                    else:  # changed, new, racy; or its blob is gone from the store
                        unknown.append(item)
            finally:
                os.close(fd)
        rehashed = _read_all(unknown, layout, workers or _default_workers())
        found.sort(key=_rel)  # the walk's order is by folder, the listing's by path
        executable = layout.executables(found)
        files: dict[str, tuple[int, str]] = {}
        for item in found:
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
        layout.close()
        if index is not None:
            index.close()
    # An executable file's line says so (a file without an execute bit: as before there was
    # the mark), so that making a script executable makes another snapshot.
    listing = "".join(
        [f"{p}\0{d}\0x\n" if p in executable else f"{p}\0{d}\n" for p, (_, d) in files.items()]
    )
    snapshot = Snapshot(
        hashlib.sha256(listing.encode()).hexdigest(), files, warnings, rehashed, executable
    )
    size = snapshot.size
    if size > WARN_BYTES or len(files) > WARN_FILES:
        snapshot.warnings.append(
            f"the source folder holds {len(files)} files, {size / 1e6:.0f} MB; "
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
    """Lays files out at `dest` from the store, folder by folder."""

    def __init__(self, dest: str, blobs: BlobStore) -> None:
        self.prefix = dest + os.sep
        self.blobs = blobs
        self.links = blobs.linker()

    def folder(self, rel: str) -> tuple[int, str]:
        """Make the folder `rel` of dest ("": dest itself, made already; else ending in `/`)
        and its parents where they are missing (a folder holding only folders is made when a
        file of one of them is laid out). Returns an open descriptor of it (close it) and its
        path, ending in a separator, for `BlobLinker.place`."""
        path = self.prefix + rel
        if rel:
            try:
                os.mkdir(path)
            except FileNotFoundError:
                os.makedirs(path, exist_ok=True)
            except FileExistsError:
                pass
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC), path

    def read(self, files: list[_Found]) -> int:
        """Read, hash and store each file, then link it into its folder (made by `folder`);
        sets its digest and size (digest None: it went, or changed into something else,
        meanwhile, or cannot be opened: see `_Found.refused`). The number read."""
        read = 0
        for item in files:
            target = self.prefix + item.rel
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

    def executables(self, found: list[_Found]) -> frozenset[str]:
        """Lay out each of `found` that has an execute bit in the source folder as a copy of
        its blob with the bits, instead of a link to the blob (whose mode every name of the
        same content shares), so that a script can run a tool of its source folder
        (`./prepare.sh`) in the snapshot and its working copy as it does outside them.
        Returns their paths. Raises OSError."""
        executable = []
        for item in found:
            bits = stat.S_IMODE(item.info.st_mode) & 0o111
            if not bits or item.digest is None:
                continue
            mode = stored_mode(item.info.st_mode) | bits
            copy_private(self.blobs.name(item.digest), self.prefix + item.rel, mode)
            executable.append(item.rel)
        return frozenset(executable)

    def close(self) -> None:
        self.links.close()


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


_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _walk(source: Path, ignore: Ignore, warnings: list[str]) -> Iterator[tuple[str, list[_Found]]]:
    """The files of `source` to be in the snapshot, folder by folder as os.walk goes (names in
    order): (the folder's relative path, "" or ending in `/`; its files). What is left out
    and why goes into `warnings`. Each folder is opened once and its files' stat data read
    relative to it (no path resolved per file); a folder is never opened through a link,
    even one that took its place after its parent was listed."""
    root = os.path.realpath(source)
    pending: list[tuple[str, str, tuple[int, int] | None]] = [(str(source), "", None)]
    while pending:
        folder, prefix, listed = pending.pop()
        try:
            fd = os.open(folder, (_FOLDER_FLAGS | os.O_NOFOLLOW) if prefix else _FOLDER_FLAGS)
        except OSError as error:
            _cannot_list(prefix, error, warnings)
            continue
        if listed is not None:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != listed:
                # O_NOFOLLOW guards the last part of the path only: a folder above it became
                # a link since it was listed. The folder opened is not the one listed.
                os.close(fd)
                warnings.append(
                    f"source folder: {escaped(prefix)} was moved or replaced while the "
                    "snapshot was taken: not in the snapshot"
                )
                continue
        try:
            kept, items = _list(fd, folder, prefix, root, ignore, warnings)
        finally:
            os.close(fd)
        if items:
            yield prefix, items
        pending.extend(reversed(kept))  # the first folder is walked next, as os.walk does


def _list(
    fd: int, folder: str, prefix: str, root: str, ignore: Ignore, warnings: list[str]
) -> tuple[list[tuple[str, str, tuple[int, int] | None]], list[_Found]]:
    """The subfolders to walk (path, relative path ending in `/`, (device, inode) as
    listed) and the files to take of the open folder `fd` (at `folder`, `prefix` relative to
    the source folder)."""
    kept: list[tuple[str, str, tuple[int, int] | None]] = []
    items: list[_Found] = []
    try:
        with os.scandir(fd) as scan:
            entries = list(scan)
        entries.sort(key=_name)
    except OSError as error:
        _cannot_list(prefix, error, warnings)
        return kept, items
    subfolders: list[os.DirEntry[str]] = []
    names: list[os.DirEntry[str]] = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()  # a link to a folder counts as one, as in os.walk
        except OSError:
            is_dir = False
        (subfolders if is_dir else names).append(entry)
    base = folder + os.sep
    for entry in subfolders:
        rel = prefix + entry.name
        if _not_utf8(entry.name):
            warnings.append(_unnamed(rel, folder=True))
        elif ignore.ignored(rel, True):
            continue
        elif entry.is_symlink():
            warnings.append(_link_warning(rel, Path(base + entry.name), root, folder=True))
        else:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed since the folder was listed
                continue
            except OSError:  # opened later, where the error is reported
                kept.append((base + entry.name, rel + "/", None))
                continue
            kept.append((base + entry.name, rel + "/", (info.st_dev, info.st_ino)))
    named: list[os.DirEntry[str]] = []
    for entry in names:
        if entry.name.isascii() or not _not_utf8(entry.name):
            named.append(entry)
        else:
            warnings.append(_unnamed(prefix + entry.name, folder=False))
    for entry in ignore.kept_files(prefix, named):
        name = entry.name
        rel = prefix + name
        try:
            info = entry.stat(follow_symlinks=False)
            item = (
                _Found(rel, name, base + name, info, follow=False)
                if stat.S_ISREG(info.st_mode)
                else _file(base + name, name, info, rel, root, warnings)
            )
        except FileNotFoundError:  # removed since the folder was listed
            continue
        except PermissionError as error:  # in a folder listed but not searchable
            warnings.append(_unreadable(rel, error.strerror or str(error)))
            continue
        if item is not None:
            items.append(item)
    return kept, items


# The process or the system ran out of file descriptors: the walk fails rather than leave a
# folder out of the snapshot with a "cannot be read" warning.
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


def _cannot_list(prefix: str, error: OSError, warnings: list[str]) -> None:
    """A folder of the source (`prefix`) that cannot be opened or listed: a warning that it
    is not in the snapshot (none for the source folder itself: as before, an empty snapshot).
    Raises `error` when the process ran out of descriptors: not the folder's fault."""
    if error.errno in OUT_OF_DESCRIPTORS:
        raise error
    if prefix:
        warnings.append(
            f"source folder: {escaped(prefix)} cannot be read "
            f"({error.strerror or error}): not in the snapshot"
        )


def _name(entry: os.DirEntry[str]) -> str:
    return entry.name


_rel = attrgetter("rel")


def _file(
    path: str, name: str, info: os.stat_result, rel: str, root: str, warnings: list[str]
) -> _Found | None:
    """The file at `path` (`info`: its lstat data) as it goes into the snapshot; None (with
    a warning) when it does not: a link to outside the source folder or to nothing, a FIFO,
    a socket, a device."""
    try:
        if stat.S_ISLNK(info.st_mode):
            real = os.path.realpath(path)
            target = os.stat(real) if _inside(real, root) else None
            if target is None or not stat.S_ISREG(target.st_mode):
                warnings.append(_link_warning(rel, Path(path), root, folder=False))
                return None
            return _Found(rel, name, path, target, follow=True)
    except FileNotFoundError:  # removed (or its target) while the folder was listed
        if os.path.islink(path):
            warnings.append(_link_warning(rel, Path(path), root, folder=False))
        return None
    if not stat.S_ISREG(info.st_mode):  # a FIFO, a socket: not source code (and never read)
        warnings.append(
            f"source folder: {escaped(rel)} is not a regular file (a FIFO, a socket, "
            f"a device): not in the snapshot; list it in {IGNORE_FILE} to silence this"
        )
        return None
    return _Found(rel, name, path, info, follow=False)


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
