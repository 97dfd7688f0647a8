"""Sealing what a script left in ./outputs and ./logs, without ever reaching out of the run.

Design principle 8: post-process never follows a link out of the run, never chmods, moves or
hard-links a file that lives elsewhere. The rules for ./outputs:

- ./outputs itself a link: to a folder inside the working copy, that folder is sealed; to
  anything else, the link is recorded (`outputs -> target`) with a warning, never followed,
  and nothing from it is sealed (its files stay where they are, as they are);
- a regular file is sealed: hashed, made read-only and stored once. A file with other hard
  links (which may live outside the run) is copied into the store; it is never chmod-ed;
- a link to a file or folder inside outputs is sealed as the content it points to
  (`outputs/best.pt -> checkpoints/epoch_3.pt` becomes the file best.pt with that content);
- a link out of outputs, or to nothing, is recorded as a link (its name and target) with a
  warning: never followed, never stored, never served. It is removed from the sealed folder,
  so that nothing walking the folder later can follow it;
- anything else (a FIFO, a socket) is left out, with a warning.

The script's ./logs join the run's logs under the same rules: a ./logs that is a link out of
the working copy is not collected, links out of it are not followed, and a file with other
hard links is copied, not moved.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from expkit.blobs import BlobStore, hash_file

# Files reached through links to folders (each a second name of a file already there): past
# this many, further links to folders are recorded as links instead of being expanded.
LINK_EXPANSION_LIMIT = 100_000
# Links named in one warning; the rest are counted.
NAMED_IN_WARNING = 3


@dataclass
class Sealed:
    """A run's sealed outputs: files (relative path -> (size, sha256)) and links that were
    recorded, not stored (relative path -> target as the link gave it; "." is outputs/)."""

    files: dict[str, tuple[int, str]]
    links: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    content: dict[str, str] = field(default_factory=dict)  # name -> regular file holding it
    links: dict[str, str] = field(default_factory=dict)  # name -> target, recorded only
    folders: list[str] = field(default_factory=list)  # links to folders: made real folders
    drop: list[str] = field(default_factory=list)  # entries removed from the sealed folder
    loops: list[str] = field(default_factory=list)
    special: list[str] = field(default_factory=list)
    unnamed: list[str] = field(default_factory=list)  # names that are not UTF-8: left as they are
    budget: int = LINK_EXPANSION_LIMIT


RUN_FOLDERS = ("work", "outputs", "logs")


def own_folders(run_dir: Path) -> list[str]:
    """Make sure the run's work/, outputs/ and logs/ are its own real folders (or absent)
    before anything is collected from or moved into them; returns warnings.

    A script may replace them (they are its cwd and ../outputs, ../logs): a link is removed
    (the link alone: its target is never followed, moved or changed), and anything else that
    is not a folder is renamed aside in the run's folder (kept, not lost). A working folder
    the script renamed away (e.g. work.moved) is left where it is, never followed."""
    warnings = []
    for name in RUN_FOLDERS:
        path = run_dir / name
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(info.st_mode):
            continue
        if stat.S_ISLNK(info.st_mode):
            target = os.readlink(path)
            os.unlink(path)
            warnings.append(
                f"the run's {name}/ was replaced by a link to {escaped(target)} (by the script): "
                "the link was removed, nothing was collected or moved through it"
            )
            continue
        aside = run_dir / f"{name}.not-a-folder"
        os.replace(path, aside)
        warnings.append(
            f"the run's {name}/ was replaced by something that is not a folder (by the "
            f"script): kept as {aside}, nothing was collected from it"
        )
    return warnings


def escaped(name: str | bytes) -> str:
    """`name` as one printable line: a name that is not UTF-8 or holds a control character
    (a newline) is shown escaped, the way Python writes a string literal's inside."""
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if name.isprintable() and not _has_surrogates(name):
        return name
    return repr(name.encode("utf-8", "surrogateescape"))[2:-1]


def _has_surrogates(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def seal(work_dir: Path, sealed: Path, blobs: BlobStore) -> Sealed:
    """Move the script's ./outputs (in `work_dir`) to `sealed`, the run's outputs folder, and
    make every file in it a read-only blob, by the rules of this module."""
    warnings: list[str] = []
    links: dict[str, str] = {}
    if sealed.is_symlink():  # the script wrote into the run's folder: the link alone goes
        warnings.append(
            f"the run's outputs/ was a link to {os.readlink(sealed)} (not made by expkit): "
            "removed, not followed"
        )
        os.unlink(sealed)
    folder: Path | None = None
    if sealed.is_dir():
        folder = sealed
    else:
        source = work_dir / "outputs"
        if source.is_symlink():
            target = escaped(os.readlink(source))
            real = os.path.realpath(source)
            work = os.path.realpath(work_dir)
            if _inside(real, work) and real != work and os.path.isdir(real):
                folder = Path(real)
            else:
                links["."] = target
                warnings.append(
                    f"outputs/ is a link to {target}, outside the run: recorded as a link, "
                    "not followed, and none of its files are sealed (write outputs into "
                    "./outputs itself)"
                )
        elif source.is_dir():
            folder = source
        elif source.exists() and stat.S_ISREG(os.lstat(source).st_mode):  # a file: kept
            sealed.mkdir(exist_ok=True)
            os.replace(source, sealed / "outputs")
            folder = sealed
            warnings.append(
                "./outputs was a file, not a folder: sealed as outputs/outputs (write outputs "
                "into the folder ./outputs)"
            )
        elif source.exists():
            warnings.append("./outputs is not a folder (a FIFO, a socket): nothing to seal")
    plan = _plan(folder) if folder is not None else _Plan()
    if folder is not None and folder != sealed:
        os.replace(folder, sealed)
    sealed.mkdir(exist_ok=True)
    files = _apply(plan, sealed, blobs)
    links.update(plan.links)
    warnings += _describe(plan, sealed)
    return Sealed(files, links, warnings)


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _plan(root: Path) -> _Plan:
    """What each entry under `root` (a real folder) becomes, by the module's rules."""
    real_root = os.path.realpath(root)
    plan = _Plan()

    def name_of(real: str) -> str:
        return Path(os.path.relpath(real, real_root)).as_posix()

    def walk(folder: str, prefix: str, through_link: bool, ancestors: tuple[str, ...]) -> None:
        with os.scandir(folder) as found:
            entries = sorted(found, key=lambda e: e.name)
        for entry in entries:
            rel = prefix + entry.name
            if through_link:
                plan.budget -= 1
            if _has_surrogates(entry.name):  # cannot be recorded as it is: kept on disk only
                plan.unnamed.append(rel)
                if entry.is_symlink() and not through_link:
                    plan.drop.append(rel)  # a link is never left to be followed later
                continue
            if entry.is_symlink():
                target = escaped(os.readlink(entry.path))
                real = os.path.realpath(entry.path)
                on_disk = [] if through_link else [rel]
                if not _inside(real, real_root) or not os.path.exists(real):
                    plan.links[rel] = target
                    plan.drop += on_disk
                elif os.path.isdir(real):
                    if real in (*ancestors, folder) or plan.budget <= 0:
                        plan.links[rel] = target
                        plan.drop += on_disk
                        plan.loops.append(rel)
                    else:
                        plan.folders.append(rel)
                        walk(real, rel + "/", True, (*ancestors, folder))
                elif os.path.isfile(real):
                    plan.content[rel] = name_of(real)
                else:
                    plan.special.append(rel)
                    plan.drop += on_disk
            elif entry.is_dir(follow_symlinks=False):
                walk(entry.path, rel + "/", through_link, (*ancestors, folder))
            elif entry.is_file(follow_symlinks=False):
                plan.content[rel] = name_of(entry.path)
            else:
                plan.special.append(rel)
                if not through_link:
                    plan.drop.append(rel)

    walk(real_root, "", False, ())
    return plan


def _apply(plan: _Plan, sealed: Path, blobs: BlobStore) -> dict[str, tuple[int, str]]:
    """Carry out `plan` in the sealed folder; returns the manifest."""
    for rel in plan.drop:
        path = sealed / rel
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            os.unlink(path)
    for rel in sorted(plan.folders):  # parents first: a link inside an expanded folder
        path = sealed / rel
        if path.is_symlink():
            os.unlink(path)
        path.mkdir(parents=True, exist_ok=True)
    digests: dict[str, tuple[int, str]] = {}
    for rel, source in plan.content.items():  # the files themselves first
        if rel == source:
            path = sealed / rel
            size, digest = os.lstat(path).st_size, hash_file(path)
            blobs.adopt(path, digest)
            digests[rel] = (size, digest)
    files = {}
    for rel, source in plan.content.items():
        if rel != source:  # a link to a file inside outputs: that file's content, stored once
            if source not in digests:
                path = sealed / source
                digests[source] = (os.lstat(path).st_size, hash_file(path))
            path = sealed / rel
            if path.is_symlink():
                os.unlink(path)
            blobs.link_to(digests[source][1], path)
        files[rel] = digests[source]
    return dict(sorted(files.items()))


def _describe(plan: _Plan, sealed: Path | None = None) -> list[str]:
    """The warnings about what was recorded or left out, a line per kind."""
    warnings = []
    if plan.unnamed:
        shown = ", ".join(escaped(n) for n in plan.unnamed[:NAMED_IN_WARNING])
        more = len(plan.unnamed) - NAMED_IN_WARNING
        warnings.append(
            f"outputs: {shown}{f' and {more} more' if more > 0 else ''}: names that are not "
            f"UTF-8 cannot be recorded: left out of the manifest, kept as they are in {sealed}"
        )
    outside = [r for r in plan.links if r not in plan.loops]
    if outside:
        warnings.append(
            f"outputs: {_named(outside, plan.links)} point{'s' if len(outside) == 1 else ''} "
            "out of outputs/ or to nothing: recorded as links, not followed, not stored"
        )
    if plan.loops:
        warnings.append(
            f"outputs: {_named(plan.loops, plan.links)}: links to folders that loop (or too "
            "many files reached through links): recorded as links, not followed"
        )
    if plan.special:
        shown = ", ".join(escaped(n) for n in plan.special[:NAMED_IN_WARNING])
        more = len(plan.special) - NAMED_IN_WARNING
        warnings.append(
            f"outputs: {shown}{f' and {more} more' if more > 0 else ''}: not regular files "
            "(a FIFO, a socket, a device): left out"
        )
    return warnings


def _named(names: list[str], links: dict[str, str]) -> str:
    shown = ", ".join(f"{escaped(n)} -> {escaped(links[n])}" for n in names[:NAMED_IN_WARNING])
    more = len(names) - NAMED_IN_WARNING
    return shown + (f" and {more} more" if more > 0 else "")


def open_own_log(run_dir: Path, name: str) -> BinaryIO | None:
    """The run's log `name`, open for reading, when it is a regular file in the run's own
    logs/ folder; None otherwise (missing, or reached only through a link: a script may have
    replaced logs/ or a log with a link to a file of the user's, never shown as the run's)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        folder = os.open(run_dir / "logs", flags | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=folder)
    except OSError:
        return None
    finally:
        os.close(folder)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def collect_logs(work_dir: Path, log_dir: Path) -> list[str]:
    """Move the script's own ./logs files into the run's `log_dir` (as Azure ML streams them);
    returns warnings about what was not collected. Nothing is moved out of, or changed in, a
    folder that is not the run's own."""
    source = work_dir / "logs"
    if not source.is_symlink() and not source.is_dir():
        return []
    work = os.path.realpath(work_dir)
    root = os.path.realpath(source)
    if not _inside(root, work) or root == work or not os.path.isdir(root):
        return [
            f"logs/ is a link to {os.readlink(source)}, outside the run: its files were not "
            "collected (write the script's logs into ./logs itself)"
        ]
    skipped = []
    for folder, dirs, names in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            rel = path.relative_to(root)
            target = log_dir / rel
            if target.exists() or target.is_symlink():
                target = target.with_name(f"script-{target.name}")
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                real = os.path.realpath(path)
                if _inside(real, work) and os.path.isfile(real):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(real, target)
                else:
                    skipped.append(f"{rel.as_posix()} -> {os.readlink(path)}")
            elif stat.S_ISREG(info.st_mode):
                target.parent.mkdir(parents=True, exist_ok=True)
                if info.st_nlink == 1:
                    os.replace(path, target)
                else:  # another name of this file may live outside the run: copy it
                    shutil.copyfile(path, target)
    if not skipped:
        return []
    shown = ", ".join(skipped[:NAMED_IN_WARNING])
    more = len(skipped) - NAMED_IN_WARNING
    return [
        f"logs: {shown}{f' and {more} more' if more > 0 else ''}: links out of the run, "
        "not collected"
    ]
