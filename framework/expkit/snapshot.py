"""The source snapshot: the job's source folder, content-hashed, frozen into the run.

`.expkitignore` in the source folder lists patterns to leave out (like .gitignore: `name`,
`*.ext`, `folder/`, `path/inside`, and `!pattern` to keep something back in).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from expkit.blobs import BlobStore, hash_file

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
    """Copy `source` into the blob store and lay it out read-only at `dest`."""
    patterns = list(ALWAYS_IGNORED)
    ignore_file = source / IGNORE_FILE
    if ignore_file.is_file():
        patterns += ignore_file.read_text(encoding="utf-8", errors="replace").splitlines()
    ignore = Ignore(patterns)
    files: dict[str, tuple[int, str]] = {}
    for folder, dirs, names in os.walk(source, followlinks=False):
        rel_folder = Path(folder).relative_to(source).as_posix()
        prefix = "" if rel_folder == "." else rel_folder + "/"
        dirs[:] = sorted(d for d in dirs if not ignore.ignored(prefix + d, True))
        for name in sorted(names):
            rel = prefix + name
            path = Path(folder) / name
            if ignore.ignored(rel, False) or not path.is_file():
                continue
            digest = hash_file(path)
            blobs.add_copy(path, digest)
            blobs.link_to(digest, dest / rel)
            files[rel] = (path.stat().st_size, digest)
    listing = "".join(f"{p}\0{d}\n" for p, (_, d) in sorted(files.items()))
    snapshot = Snapshot(hashlib.sha256(listing.encode()).hexdigest(), files)
    if snapshot.size > WARN_BYTES or len(files) > WARN_FILES:
        snapshot.warnings.append(
            f"the source folder holds {len(files)} files, {snapshot.size / 1e6:.0f} MB; "
            f"list data and other large files in {IGNORE_FILE} and pass them as `data:` inputs"
        )
    return snapshot


def working_copy(snapshot_dir: Path, work_dir: Path) -> None:
    """A writable copy of the snapshot for the script to run in."""
    shutil.copytree(snapshot_dir, work_dir, copy_function=shutil.copyfile, dirs_exist_ok=True)
