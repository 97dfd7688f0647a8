"""The installed entry points of one group, remembered between commands while nothing changed.

Scanning every installed distribution for entry points (`importlib.metadata.entry_points`)
costs tens of milliseconds per command, most of it importing `importlib.metadata` (email,
zipfile, csv) and reading ~200 distributions' files; `expkit run` pays it every time. The
result is kept in a file under the user's cache folder (`$XDG_CACHE_HOME/expkit`, else
`~/.cache/expkit`), never in a project, and used only while its key still matches.

The key is what any install, uninstall or editable (re)install changes: the interpreter and its
`sys.meta_path` finders, every `sys.path` entry (the current folder for ""; a .pth file added
or removed changes the path itself), and for each folder on it the names of its distribution
folders (`*.dist-info`, `*.egg-info`, `*.egg`) in the order the scan lists them, each with the
stat data of the files `importlib.metadata` reads from it to list its entry points
(`DIST_FILES`); for a zip file on the path, its stat data. Stat data is (mtime in
nanoseconds, size, inode), "-" for a path that does not exist.

Timestamps are coarse (a file system may round them to 2 s), so a change within the same tick
as the scan could leave the key unchanged: the racily-clean case of git's index
(Documentation/technical/racy-git.txt). As git does, a key with any mtime younger than
`RACY_SECONDS` before the scan is not stored at all: that command and the next ones scan until
the files have aged. A missing, unreadable or corrupt cache file only costs the scan.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import time
from importlib import import_module
from typing import Any

VERSION = 2  # of the file's format
CACHE_ENV = "EXPKIT_CACHE_DIR"  # where the cache lives instead of the user's cache folder
RACY_SECONDS = 3.0  # a file changed this recently may change again within its mtime's tick
# The files of a distribution folder, by its suffix, that importlib.metadata reads to list its
# entry points: entry_points.txt, and for an .egg its PKG-INFO too (the name that tells two
# copies of a distribution apart; a .dist-info's or an .egg-info's comes from the folder's
# name: `PathDistribution._normalized_name`). A folder replaced (reinstalled) gives its files
# new inodes; one edited in place, a new mtime or size.
DIST_FILES = {
    ".dist-info": ("entry_points.txt",),
    ".egg-info": ("entry_points.txt",),
    ".egg": ("EGG-INFO/entry_points.txt", "EGG-INFO/PKG-INFO"),
}
KEPT = 8  # keys kept in the file (python -m expkit puts the current folder on the path)
# importlib.metadata.EntryPoint.pattern: "module", "module:attr.attr", "module:attr [extras]"
VALUE = re.compile(r"(?P<module>[\w.]+)\s*(:\s*(?P<attr>[\w.]+)\s*)?((?P<extras>\[.*\])\s*)?$")


class Distribution:
    """The distribution an entry point came from, by its folder: `metadata` is parsed by
    `importlib.metadata.PathDistribution` on first use only (only `expkit plugins` and a
    conflict's message show a plugin's distribution)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @functools.cached_property
    def metadata(self) -> Any:
        """The distribution's METADATA (an email.message.Message-like mapping)."""
        from importlib.metadata import PathDistribution
        from pathlib import Path

        return PathDistribution(Path(self.path)).metadata


class EntryPoint:
    """One entry point as found: its name, its value ("module:attr") and its distribution;
    `load()` imports it as `importlib.metadata.EntryPoint.load` does."""

    def __init__(self, name: str, value: str, dist: Any) -> None:
        self.name, self.value, self.dist = name, value, dist

    def load(self) -> Any:
        """Import the module and return the attribute the value names. Raises what the import
        raises (ImportError, or anything the module raises), AttributeError for a missing
        attribute, ValueError for a value that is not "module[:attr]"."""
        match = VALUE.match(self.value)
        if match is None:
            raise ValueError(f"entry point {self.name!r}: {self.value!r} is not module:attr")
        module = import_module(match.group("module"))
        attrs = filter(None, (match.group("attr") or "").split("."))
        return functools.reduce(getattr, attrs, module)


def entry_points(group: str) -> list[Any]:
    """The entry points of `group`, in `importlib.metadata.entry_points(group=...)`'s order:
    from the cache when its key still matches, else from the scan, then stored unless the
    key is racy or changed while the scan read the files (then the next command scans too).
    Each has `name`, `value`, `dist` (with `metadata`) and `load()`."""
    started = time.time()
    try:
        key, youngest = _key()
    except OSError:  # a path that cannot be read: scan, and keep nothing
        return list(_scan(group))
    file = _cache_file(group)
    kept = _read(file) if file else []
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()
    found = next((r["entry_points"] for r in kept if r["key"] == digest), None)
    if found is not None:
        dists: dict[str, Distribution] = {}
        return [
            EntryPoint(name, value, dists.setdefault(path, Distribution(path)))
            for name, value, path in found
        ]
    scanned = list(_scan(group))
    paths = [_dist_path(ep) for ep in scanned]
    if file and youngest < started - RACY_SECONDS and all(paths) and _same_key(key):
        rows = [[ep.name, ep.value, path] for ep, path in zip(scanned, paths, strict=True)]
        records = [{"key": digest, "entry_points": rows}, *kept][:KEPT]
        write_json(file, {"version": VERSION, "records": records})
    return scanned


def _same_key(key: list[Any]) -> bool:
    """Whether the key is still `key` (nothing changed while the scan read the files)."""
    try:
        return _key()[0] == key
    except OSError:
        return False


def _scan(group: str) -> Any:
    from importlib.metadata import entry_points

    return entry_points(group=group)


def _dist_path(ep: Any) -> str | None:
    """The folder of an entry point's distribution, when it is one on disk (not a zip)."""
    path = getattr(ep.dist, "_path", None) or getattr(ep.dist, "path", None)
    if path is None or not os.path.isdir(path):
        return None
    return os.fspath(path)


def _stat(path: str) -> list[int] | str:
    try:
        found = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "-"
    return [found.st_mtime_ns, found.st_size, found.st_ino]


def _key() -> tuple[list[Any], float]:
    """(the key, the youngest mtime in it in seconds since the epoch). Raises OSError for a
    folder on the path that cannot be listed."""
    key: list[Any] = [
        sys.version,
        sys.executable,
        [f"{type(f).__module__}.{type(f).__qualname__}" for f in sys.meta_path],
    ]
    youngest = 0.0
    for entry in sys.path:
        folder = os.path.abspath(entry or ".")
        row: list[Any] = [entry, folder]
        if os.path.isdir(folder):  # its distribution folders, in the order a scan lists them
            row.append("folder")
            for name in os.listdir(folder):
                suffix = os.path.splitext(name)[1].lower()
                if suffix not in DIST_FILES:
                    continue
                dist = os.path.join(folder, name)
                stats = [_stat(os.path.join(dist, f)) for f in DIST_FILES[suffix]]
                youngest = max([youngest, *(s[0] / 1e9 for s in stats if isinstance(s, list))])
                row.append([name, stats])
        else:  # a zip file (its own stat data), or nothing
            row.append(_stat(folder))
            if isinstance(row[-1], list):
                youngest = max(youngest, row[-1][0] / 1e9)
        key.append(row)
    return key, youngest


def cache_folder() -> str | None:
    """expkit's cache folder: `$EXPKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/expkit`, else
    `~/.cache/expkit`; None when there is no home to keep it. A relative `EXPKIT_CACHE_DIR` or
    `XDG_CACHE_HOME` is ignored (no cache), as the XDG Base Directory Specification says of
    relative paths: one would put the cache in whatever folder the command runs from, a
    project's."""
    folder = os.environ.get(CACHE_ENV)
    if folder and not os.path.isabs(folder):
        return None
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        if not os.path.isabs(base):
            return None
        folder = os.path.join(base, "expkit")
    return folder


def _cache_file(group: str) -> str | None:
    """The cache file of `group` for this interpreter; None when there is no cache folder
    (`cache_folder`)."""
    folder = cache_folder()
    if folder is None:
        return None
    digest = hashlib.sha256(f"{sys.executable}\0{group}".encode()).hexdigest()[:16]
    return os.path.join(folder, f"entry-points-{digest}.json")


def read_json(file: str) -> Any:
    """The JSON value stored in `file`; None when it is missing, unreadable or corrupt."""
    try:
        with open(file, encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, ValueError):
        return None


def _read(file: str) -> list[dict[str, Any]]:
    """The records ({"key": the key's SHA-256, "entry_points"}) stored in `file`, newest
    first; none when the file is missing, corrupt or of another format."""
    stored = read_json(file)
    try:
        if stored["version"] != VERSION:
            return []
        records = stored["records"]
        for record in records:
            rows = record["entry_points"]
            if not isinstance(record["key"], str) or not all(
                isinstance(r, list) and len(r) == 3 and all(isinstance(x, str) for x in r)
                for r in rows
            ):
                return []
        return list(records)
    except (ValueError, KeyError, TypeError):
        return []


def write_json(file: str, content: Any) -> None:
    """Store `content` at `file` at once (a temporary file renamed over it); a failure (a
    read-only home, a full disk) keeps nothing and is not an error."""
    temporary = f"{file}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(file), mode=0o700, exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(content, stream)
        os.replace(temporary, file)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
