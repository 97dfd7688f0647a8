"""A run's checkpoint folder (the job's `checkpoints:`), kept from one attempt to the next.

It lives in the working copy as `work/<checkpoints.folder>`: made empty before attempt 1 and
left as each attempt leaves it (the working copy is not made again between the attempts of
one driver, nor by a Slurm requeue), so the next attempt finds what the last one wrote. At
post-process, before the working copy goes, it is moved to `<run_dir>/checkpoints`; `expkit
runs resume` moves it back. Only real folders are moved, never through a link: a link a
script left there is a warning, and stays where it is (see the team's rule on users' data).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from expkit.errors import StageFailed
from expkit.job import CheckpointSpec

KEPT_NAME = "checkpoints"  # the folder of the run that keeps it between drivers


def working_folder(work_dir: Path, spec: CheckpointSpec) -> Path:
    """The checkpoint folder in the working copy (absolute: EXPKIT_CHECKPOINT_DIR)."""
    return Path(os.path.abspath(work_dir / spec.folder))


def kept_folder(run_dir: Path) -> Path:
    """Where the run keeps the checkpoint folder once its working copy is gone."""
    return run_dir / KEPT_NAME


def _link_on_the_way(work_dir: Path, spec: CheckpointSpec) -> Path | None:
    """The first part of `work/<folder>` (the folder itself included) that is a link or not
    a folder, or None when every part that exists is a real folder."""
    path = work_dir
    for part in Path(spec.folder).parts:
        path = path / part
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            return path
    return None


def make_empty(work_dir: Path, spec: CheckpointSpec) -> None:
    """Make `work/<folder>` an empty folder before attempt 1 (what the source folder had
    there is not a checkpoint of this run). StageFailed when a part above it in the working
    copy is not a real folder (the snapshot has a file of that name)."""
    folder = work_dir / spec.folder
    blocking = _link_on_the_way(work_dir, spec)
    if blocking is not None and blocking != folder:
        raise StageFailed(
            f"checkpoints: {blocking.relative_to(work_dir)} in the source folder is not a "
            f"folder, so {spec.folder} cannot be made; name another checkpoints path"
        )
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        folder.unlink()  # the snapshot's copy: the source folder itself is not touched
    elif folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def keep(work_dir: Path, run_dir: Path, spec: CheckpointSpec) -> list[str]:
    """Move `work/<folder>` to `<run_dir>/checkpoints` (post-process, before the working copy
    is removed); returns warnings. A link on the way, or one where the kept folder goes, is
    left alone and said; a kept folder from an earlier driver is replaced (the resumed
    attempt started from it, so what it holds now is newer)."""
    folder = work_dir / spec.folder
    blocking = _link_on_the_way(work_dir, spec)
    if blocking is not None:
        what = f"a link to {os.readlink(blocking)}" if blocking.is_symlink() else "not a folder"
        return [
            f"checkpoints: {blocking.relative_to(work_dir)} is {what} (not made by expkit): "
            "left alone, not followed; the checkpoints are not kept"
        ]
    if not folder.is_dir():
        return []  # the script removed it: nothing to keep
    kept = kept_folder(run_dir)
    if kept.is_symlink():
        return [_linked(kept, "the checkpoints are not kept")]
    if kept.is_dir():
        shutil.rmtree(kept)
    elif kept.exists():
        kept.unlink()
    os.replace(folder, kept)
    return []


def restore(work_dir: Path, run_dir: Path, spec: CheckpointSpec) -> tuple[int, list[str]]:
    """Put `<run_dir>/checkpoints` back as `work/<folder>` (made empty first) for the next
    attempt of a resumed run; returns the number of files put back and the warnings. The
    folder is made empty when the run kept none."""
    make_empty(work_dir, spec)
    kept = kept_folder(run_dir)
    if kept.is_symlink():
        return 0, [_linked(kept, "the attempt starts without checkpoints")]
    if not kept.is_dir():
        return 0, []
    folder = work_dir / spec.folder
    folder.rmdir()
    os.replace(kept, folder)
    count = sum(1 for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return count, []


def rescue(work_dir: Path, run_dir: Path, spec: CheckpointSpec) -> list[str]:
    """Keep the checkpoint folder of a working copy a driver left behind (it died: kill -9,
    a crash) before the working copy is removed; as `keep`, but an already kept folder (from
    an earlier driver) stays when the working copy has none."""
    if not (work_dir / spec.folder).is_dir() and kept_folder(run_dir).exists():
        return []
    return keep(work_dir, run_dir, spec)


def _linked(kept: Path, so: str) -> str:
    """The warning about a run's kept folder that is a link (never followed), and `so`."""
    return (
        f"the run's {KEPT_NAME}/ is a link to {os.readlink(kept)} (not made by expkit): "
        f"left alone, not followed; {so}"
    )
