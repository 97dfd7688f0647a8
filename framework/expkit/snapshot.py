"""The source snapshot: the job's source folder, content-hashed, frozen into the run.

`.expkitignore` in the source folder lists patterns to leave out (like .gitignore: `name`,
`*.ext`, `folder/`, `path/inside`, and `!pattern` to keep something back in).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from expkit.blobs import BlobStore, copy_private, hash_file
from expkit.outputs import escaped

IGNORE_FILE = ".expkitignore"
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

    @property
    def size(self) -> int:
        return sum(size for size, _ in self.files.values())


class Ignore:
    """Gitignore-like matching of relative posix paths."""

    def __init__(self, patterns: list[str]) -> None:
        self.rules = []
        for line in patterns:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            keep = line.startswith("!")
            line = line.lstrip("!")
            dir_only = line.endswith("/")
            line = line.strip("/")
            self.rules.append((keep, dir_only, "/" in line, line))

    def ignored(self, rel: str, is_dir: bool) -> bool:
        result = False
        name = rel.rsplit("/", 1)[-1]
        for keep, dir_only, anchored, pattern in self.rules:
            if dir_only and not is_dir:
                continue
            target = rel if anchored else name
            if fnmatch.fnmatchcase(target, pattern):
                result = not keep
        return result


def take(source: Path, dest: Path, blobs: BlobStore) -> Snapshot:
    """Copy `source` into the blob store and lay it out read-only at `dest`.

    Links are never followed out of `source`: a link to a folder is not followed at all, a
    link to a file outside `source` (or to nothing) is left out; each is named in a warning
    (with what to do instead). A link to a file inside `source` is taken as that file's
    content under the link's name.
    """
    patterns = list(ALWAYS_IGNORED)
    ignore_file = source / IGNORE_FILE
    if ignore_file.is_file():
        patterns += ignore_file.read_text(encoding="utf-8", errors="replace").splitlines()
    ignore = Ignore(patterns)
    files: dict[str, tuple[int, str]] = {}
    warnings: list[str] = []
    root = os.path.realpath(source)
    for folder, dirs, names in os.walk(source, followlinks=False):
        rel_folder = Path(folder).relative_to(source).as_posix()
        prefix = "" if rel_folder == "." else rel_folder + "/"
        kept = []
        for name in sorted(dirs):
            if _not_utf8(name):
                warnings.append(_unnamed(prefix + name, folder=True))
                continue
            if ignore.ignored(prefix + name, True):
                continue
            path = Path(folder) / name
            if path.is_symlink():
                warnings.append(_link_warning(prefix + name, path, root, folder=True))
                continue
            kept.append(name)
        dirs[:] = kept
        for name in sorted(names):
            rel = prefix + name
            path = Path(folder) / name
            if _not_utf8(name):
                warnings.append(_unnamed(rel, folder=False))
                continue
            if ignore.ignored(rel, False):
                continue
            if path.is_symlink():
                real = os.path.realpath(path)
                if not _inside(real, root) or not os.path.isfile(real):
                    warnings.append(_link_warning(rel, path, root, folder=False))
                    continue
            elif not path.is_file():  # a FIFO, a socket: not source code (and never read)
                warnings.append(
                    f"source folder: {escaped(rel)} is not a regular file (a FIFO, a socket, "
                    f"a device): not in the snapshot; list it in {IGNORE_FILE} to silence this"
                )
                continue
            digest = hash_file(path)
            blobs.add_copy(path, digest)
            blobs.link_to(digest, dest / rel)
            files[rel] = (path.stat().st_size, digest)
    listing = "".join(f"{p}\0{d}\n" for p, (_, d) in sorted(files.items()))
    snapshot = Snapshot(hashlib.sha256(listing.encode()).hexdigest(), files, warnings)
    if snapshot.size > WARN_BYTES or len(files) > WARN_FILES:
        snapshot.warnings.append(
            f"the source folder holds {len(files)} files, {snapshot.size / 1e6:.0f} MB; "
            f"list data and other large files in {IGNORE_FILE} and pass them as `data:` inputs"
        )
    return snapshot


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


def working_copy(snapshot_dir: Path, work_dir: Path) -> None:
    """A writable copy of the snapshot for the script to run in; each file is readable by
    whoever could read it in the source folder, and by no one else."""
    shutil.copytree(snapshot_dir, work_dir, copy_function=_copy_writable, dirs_exist_ok=True)


def _copy_writable(source: str, dest: str) -> str:
    copy_private(Path(source), Path(dest), stat.S_IMODE(os.stat(source).st_mode) | stat.S_IWUSR)
    return dest
