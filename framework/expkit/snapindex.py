"""The snapshot index: what each file of a source folder hashed to, so that taking the next
snapshot of an unchanged file does not read it again (git's index, for `git status`).

One index per source folder, a cache in the workspace (`.expkit/snapshot-index/`): losing it,
or finding it damaged, costs a full re-hash and nothing else. An entry maps a relative path to
the file's stat data (size, mtime and ctime in nanoseconds, inode, device, mode) and the
sha256 of its content. A file is trusted without reading it only when its stat data are the
recorded ones *and* the entry is not racy (git's racy-git rule, Documentation/technical/
racy-git.txt in git's source): a file whose ctime is not older than the moment the index began
(less `RACY_MARGIN_NS`) may have been changed again within the same timestamp tick after it was
read, with stat data that do not show it, so it is hashed again.

Why ctime: the kernel sets it to the current time on every change of content, mode or name,
and no program can set it back (`touch -d`, `cp -p` and `rsync -t` set mtime, not ctime). So a
change made after the index began always gets a ctime at or after that moment; an entry with
an older ctime whose stat data still match has not changed since it was read. The moment the
index began is read from the file system's own clock (the timestamps of the index's new file,
made before any source file is read), as git reads its index file's mtime.

The file is written whole to a temporary file and renamed over the old one (atomic): runs
started at once each write a complete index and the last rename wins. Its header carries the
sha256 of its entries, so a torn or damaged file is never taken for an index; and an index
whose hashes are not all 64 hex digits is not used either (a hash names a blob relative to a
folder of the store: one that is a path must never reach a file outside it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from pathlib import Path

from expkit.procs import pid_alive

FOLDER = "snapshot-index"  # under the workspace folder (.expkit/)
VERSION = 1
# Timestamps this far before the index began still count as racy: file systems that keep
# timestamps to the second (ext3, HFS+, many network file systems) or two (FAT), and a source
# folder on another file system than the workspace, whose clock is read.
RACY_MARGIN_NS = 2_000_000_000
STALE_TMP_SECONDS = 60
_TMP = re.compile(r"^\.[0-9a-f]{32}\.(?P<pid>\d+)\.[0-9a-f]{12}\.tmp$")
_MAX_HEADER = 64 * 1024
_HEX = b"0123456789abcdef"

Entry = tuple[str, str]  # (stat key, sha256)


def stat_key(info: os.stat_result) -> str:
    """The stat data an entry is checked against, as one string: size (bytes), mtime and
    ctime (nanoseconds), inode, device and mode."""
    return (
        f"{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}:"
        f"{info.st_ino}:{info.st_dev}:{info.st_mode}"
    )


class SnapshotIndex:
    """The index of one source folder (`source`, a real path), kept in `folder`.

    `lookup` answers from the index as it was when opened; `record` collects the entries of
    the snapshot being taken, and `save` writes them as the new index. Opening never raises
    for a missing, damaged or foreign file: the index is then empty.
    """

    def __init__(self, folder: Path, source: str) -> None:
        self.folder = Path(folder)
        self.source = source
        self.name = hashlib.sha256(os.fsencode(source)).hexdigest()[:32]
        self.path = self.folder / f"{self.name}.index"
        self.old: dict[str, Entry] = {}
        self.old_began_ns = 0
        self.new: dict[str, Entry] = {}
        self.began_ns = 0
        self._tmp: str | None = None
        self._fd: int | None = None

    # -- reading -----------------------------------------------------------------------------
    def open(self) -> SnapshotIndex:
        """Read the saved index (an empty one when there is none, or it cannot be trusted),
        then mark the moment the new one begins: the file system's time of a new file in
        `folder`. Call it before any source file is read. Raises OSError only when `folder`
        cannot be made or written (then no index is kept: see `take`)."""
        self.old, self.old_began_ns = self._read()
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        _remove_stale_tmp(self.folder)
        self._tmp = str(self.folder / f".{self.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        made = os.fstat(self._fd)
        self.began_ns = max(made.st_mtime_ns, made.st_ctime_ns)
        return self

    def _read(self) -> tuple[dict[str, Entry], int]:
        try:
            with open(self.path, "rb") as f:
                header = json.loads(f.readline(_MAX_HEADER))
                body = f.read()
            if (
                not isinstance(header, dict)
                or header.get("version") != VERSION
                or header.get("source") != self.source
                or header.get("entries_sha256") != hashlib.sha256(body).hexdigest()
                or not isinstance(header.get("began_ns"), int)
            ):
                return {}, 0
            fields = body.decode("utf-8").split("\0") if body else []
            if len(fields) % 3:
                return {}, 0
            digests = "".join(fields[2::3]).encode()
            if len(digests) != 64 * (len(fields) // 3) or digests.translate(None, _HEX):
                return {}, 0  # a digest that is not a sha256 never names a path to link
            pairs = zip(fields[1::3], fields[2::3], strict=True)
            entries = dict(zip(fields[0::3], pairs, strict=True))
            return entries, header["began_ns"]
        except (OSError, ValueError):  # missing, unreadable, not JSON, not UTF-8: no index
            return {}, 0

    def lookup(self, rel: str, key: str, ctime_ns: int) -> str | None:
        """The recorded sha256 of `rel` when its stat data (`key`, from `stat_key`) are the
        recorded ones and the entry is not racy; None when the file must be read."""
        entry = self.old.get(rel)
        if entry is None or entry[0] != key:
            return None
        if ctime_ns >= self.old_began_ns - RACY_MARGIN_NS:  # racy-git: maybe changed unseen
            return None
        return entry[1]

    # -- writing -----------------------------------------------------------------------------
    def record(self, rel: str, key: str, digest: str) -> None:
        """Enter `rel` in the new index: stat data taken before its content was read."""
        self.new[rel] = (key, digest)

    def save(self, rehashed: int) -> None:
        """Write the new index in place of the old one (atomically), unless it would say the
        same (no entry changed and none was hashed again: the old one stays valid). Errors
        (a full disk) are not raised: the index is a cache."""
        try:
            if self._fd is None or self._tmp is None:
                return
            if rehashed == 0 and self.new == self.old:
                return
            body = "\0".join(
                field for rel, (key, digest) in self.new.items() for field in (rel, key, digest)
            ).encode("utf-8")
            header = {
                "version": VERSION,
                "source": self.source,
                "began_ns": self.began_ns,
                "entries": len(self.new),
                "entries_sha256": hashlib.sha256(body).hexdigest(),
            }
            with os.fdopen(self._fd, "wb") as f:
                self._fd = None
                f.write(json.dumps(header).encode() + b"\n")
                f.write(body)
            os.replace(self._tmp, self.path)
            self._tmp = None
        except OSError:
            pass
        finally:
            self.close()

    def close(self) -> None:
        """Let go of the new index's temporary file, if it was not saved."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None


def _remove_stale_tmp(folder: Path) -> None:
    """Remove new indexes that a killed process left half made (its pid gone, idle a minute)."""
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            found = _TMP.match(entry.name)
            if found is None or pid_alive(int(found["pid"])):
                continue
            with contextlib.suppress(OSError):
                if time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_TMP_SECONDS:
                    os.unlink(entry.path)
