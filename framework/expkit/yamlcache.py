"""Job specs' YAML, read and written without importing PyYAML while nothing changed.

Importing PyYAML costs 12-17 ms (its reader compiles a large regular expression at import),
and `expkit run` pays it twice for nothing on every run of an unchanged job file: to read the
job file into plain data (`expkit.bounded_yaml`), and to write the resolved job as the run's
`job.yaml`. Both are pure functions of their input and of the code that computes them, so
their results are remembered in a file next to the plugin scan's (`expkit.entrycache`: under
`$EXPKIT_CACHE_DIR`, else the user's cache folder, never in a project):

- `load(text)`: the data of a YAML document, by the SHA-256 of its text;
- `dump(data)`: `yaml.safe_dump(data, sort_keys=False)`, by the SHA-256 of the data as JSON.

A result is kept only for an input of at most MAX_SOURCE_CHARS, and when JSON holds it
exactly: plain dicts with text keys, lists, text, whole numbers, numbers, booleans and null,
each list and mapping met once (YAML's aliases make one object appear twice, and a caller that
edits one would see the other change: JSON would give two copies). Anything else (dates,
`!!set`, `!!binary`, an alias) is read by PyYAML every time, as before.

The key of every record also holds what the results depend on: the interpreter, and the stat
data (mtime in nanoseconds, size, inode) of PyYAML's package file and of
`expkit/bounded_yaml.py`; an upgrade or an edit of either makes new keys. As for the plugin
scan, nothing is stored while one of those files is younger than `entrycache.RACY_SECONDS`
(git's racy-git rule: Documentation/technical/racy-git.txt). A missing, unreadable or corrupt
cache only costs the import: the results are then computed, as they always were.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
from typing import Any

from expkit.entrycache import RACY_SECONDS, cache_folder, read_json, write_json

VERSION = 1  # of the file's format
KEPT = 32  # records kept in the file, newest first
# The largest input remembered, in characters: job specs are a few hundred bytes; a large one
# (they may be up to 1 MiB) would make the file slower to read than PyYAML is to import.
MAX_SOURCE_CHARS = 8192
MISSING = object()  # what `recall` returns for a result not remembered
BOUNDED_YAML = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bounded_yaml.py")


def load(text: str) -> Any:
    """The data of the YAML document `text` (`expkit.bounded_yaml.load`): remembered, else
    read by PyYAML and remembered. Raises yaml.YAMLError as `bounded_yaml.load` does (an
    error is never remembered)."""
    found = recall("load", text)
    if found is not MISSING:
        return found
    from expkit import bounded_yaml

    data = bounded_yaml.load(text)
    remember("load", text, data)
    return data


def dump(data: Any) -> str:
    """`yaml.safe_dump(data, sort_keys=False)`: remembered, else written by PyYAML and
    remembered."""
    exact = _exact(data)
    key = json.dumps(data, allow_nan=True) if exact else None
    if key is not None:
        found = recall("dump", key)
        if isinstance(found, str):
            return found
    import yaml

    text: str = yaml.safe_dump(data, sort_keys=False)
    if key is not None:
        remember("dump", key, text)
    return text


def recall(kind: str, source: str) -> Any:
    """What `remember(kind, source, ...)` kept (a new copy each time: callers may edit it),
    or MISSING."""
    file = _file()
    if file is None:
        return MISSING
    try:
        stamp, _ = _stamp()
    except OSError:
        return MISSING
    digest = _digest(kind, source, stamp)
    for record in _records(file):
        if record.get("key") == digest:
            return record.get("value", MISSING)
    return MISSING


def remember(kind: str, source: str, value: Any) -> None:
    """Keep `value` as the result of `kind` for `source`, when `source` is at most
    MAX_SOURCE_CHARS long, JSON holds `value` exactly and the files it depends on are not
    racily young; otherwise (or when the cache cannot be written) keep nothing."""
    if len(source) > MAX_SOURCE_CHARS:
        return
    file = _file()
    if file is None or not _exact(value):
        return
    started = time.time()
    try:
        stamp, youngest = _stamp()
    except OSError:
        return
    if youngest >= started - RACY_SECONDS:
        return
    digest = _digest(kind, source, stamp)
    kept = [r for r in _records(file) if r.get("key") != digest]
    records = [{"key": digest, "value": value}, *kept][:KEPT]
    write_json(file, {"version": VERSION, "records": records})


def _exact(value: Any) -> bool:
    """Whether JSON gives `value` back as it is: only dict (text keys), list, str, int,
    float, bool and None, each dict and list met once."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict or kind is list:
            if id(item) in seen:
                return False
            seen.add(id(item))
            if kind is dict:
                if not all(type(key) is str for key in item):
                    return False
                stack.extend(item.values())
            else:
                stack.extend(item)
        elif kind not in (str, int, float, bool, type(None)):
            return False
    return True


def _stamp() -> tuple[list[Any], float]:
    """(what the results depend on besides their input, the youngest mtime in it in seconds
    since the epoch). Raises OSError when PyYAML is not found or a file cannot be read."""
    spec = importlib.util.find_spec("yaml")
    if spec is None or not spec.origin:
        raise OSError("PyYAML is not installed")
    stamp: list[Any] = [sys.version, sys.executable]
    youngest = 0.0
    for path in (spec.origin, BOUNDED_YAML):
        found = os.stat(path)
        stamp.append([path, found.st_mtime_ns, found.st_size, found.st_ino])
        youngest = max(youngest, found.st_mtime_ns / 1e9)
    return stamp, youngest


def _digest(kind: str, source: str, stamp: list[Any]) -> str:
    header = json.dumps([VERSION, kind, stamp])
    return hashlib.sha256(f"{header}\0{source}".encode("utf-8", "surrogatepass")).hexdigest()


def _file() -> str | None:
    """The cache file of this interpreter; None when there is no cache folder."""
    folder = cache_folder()
    if folder is None:
        return None
    digest = hashlib.sha256(sys.executable.encode()).hexdigest()[:16]
    return os.path.join(folder, f"yaml-{digest}.json")


def _records(file: str) -> list[dict[str, Any]]:
    """The records kept in `file`; none when it is missing, corrupt or of another format."""
    stored = read_json(file)
    if not isinstance(stored, dict) or stored.get("version") != VERSION:
        return []
    records = stored.get("records")
    if not isinstance(records, list):
        return []
    return [r for r in records if isinstance(r, dict)]
