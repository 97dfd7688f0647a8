"""Checkpoints that survive a preemption, and the signal that asks for a stop, for any script.

    folder = checkpoint_folder(args.checkpoint_dir)  # --checkpoint_dir or expkit's; None: off
    state = load_latest(folder)                       # the newest checkpoint, or None
    stop = StopSignal.install()                       # the job's signal; SIGUSR1
    for epoch in ...:
        ...                                           # `if stop.requested: break` per batch
        save(folder, epoch + 1, {...})                # rank 0 only; atomic
    if stop.requested: sys.exit(STOPPED)

A checkpoint is one file, `epoch-NNNN.pt` (N: the epochs it has completed), written as a
temporary file in the same folder and renamed into place (`os.replace`), so that the folder
never holds a half-written checkpoint, whenever the process is killed: the newest complete
checkpoint is always the one to resume from. Older ones are removed once the new one is in
place. Loading uses `torch.load(weights_only=True)`, so a checkpoint holds tensors, numbers,
strings, lists, tuples and dicts only (the numpy random state is kept as a list).

The folder is the job's `checkpoints:` under expkit (`Run.get_context().checkpoint_dir`, from
EXPKIT_CHECKPOINT_DIR): what it holds when an attempt ends is there when the next one starts.
Before a planned stop (a time limit, a preemption, `expkit runs cancel --requeue`) expkit sends
each rank the job's `checkpoints.signal` (SIGUSR1 by default, as PyTorch Lightning and submitit
use) and waits `checkpoints.grace_seconds` before SIGTERM; a script that saved exits with
STOPPED (75, EX_TEMPFAIL of sysexits.h: "try again later"), which the job's `retry.on` can name.
"""

from __future__ import annotations

import os
import random
import re
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from expkit import Run

# The exit code of a script that stopped on the stop signal after saving (sysexits.h's
# EX_TEMPFAIL): a job's `retry: {on: [{exit_codes: [75]}]}` starts the next attempt.
STOPPED = 75
STOP_SIGNAL_ENV = "EXPKIT_STOP_SIGNAL"  # the job's checkpoints.signal, e.g. SIGUSR2
DEFAULT_STOP_SIGNAL = "SIGUSR1"
NAME = re.compile(r"epoch-(\d+)\.pt")
TEMP_PREFIX = ".epoch-"  # a checkpoint being written (left behind only by a killed writer)


def checkpoint_folder(given: str | None = None) -> Path | None:
    """The folder to keep checkpoints in: `given` (a --checkpoint_dir option) when set, else
    the one expkit hands the script (the job's `checkpoints:`), else None (no checkpoints)."""
    folder = given or Run.get_context().checkpoint_dir
    return Path(folder) if folder else None


def checkpoint_path(folder: Path, epoch: int) -> Path:
    """Where the checkpoint taken after `epoch` completed epochs is kept."""
    return folder / f"epoch-{epoch:04d}.pt"


def latest(folder: Path | None) -> tuple[int, Path] | None:
    """The newest complete checkpoint in `folder` (its epoch and path); None when there is
    none. Temporary files of an interrupted write are not checkpoints."""
    if folder is None or not folder.is_dir():
        return None
    found = [
        (int(match.group(1)), entry)
        for entry in folder.iterdir()
        if (match := NAME.fullmatch(entry.name)) and entry.is_file()
    ]
    return max(found) if found else None


def save(folder: Path, epoch: int, state: dict[str, Any]) -> Path:
    """Write `state` as the checkpoint after `epoch` completed epochs, atomically; its path.

    The bytes go to a temporary file in `folder` (the same file system), are flushed to disk,
    and the file is renamed over the checkpoint's name: a reader sees the old checkpoint or
    the new one, never part of one. Then the older checkpoints (and temporary files a killed
    writer left) are removed. Raises what torch.save or the file system raises, leaving the
    checkpoints as they were.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(folder, epoch)
    temp = folder / f"{TEMP_PREFIX}{epoch:04d}.{os.getpid()}.tmp"  # this process's alone
    try:
        with open(temp, "wb") as file:
            torch.save({**state, "epoch": epoch}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _sync_folder(folder)  # the rename itself on disk, before the old ones go
    for entry in folder.iterdir():
        if entry != target and (NAME.fullmatch(entry.name) or _stale_temp(entry)):
            entry.unlink(missing_ok=True)
    return target


def load_latest(folder: Path | None) -> dict[str, Any] | None:
    """The newest checkpoint's state (tensors on the CPU), with its "epoch"; None when the
    folder has none. Raises what torch.load raises for a file that is not a checkpoint."""
    found = latest(folder)
    if found is None:
        return None
    return torch.load(found[1], map_location="cpu", weights_only=True)


def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """The state of every random number generator a training loop draws from: Python's,
    numpy's, torch's (and CUDA's on this device), and `generator` (a DataLoader's shuffle),
    so that a resumed run draws what an uninterrupted one would have."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Put back what `capture_rng` took (CUDA's only where there is CUDA)."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


class StopSignal:
    """A planned stop asked for by a signal: the handler only sets `requested`; the training
    loop checks it between batches (a handler that saved would race the loop's own writes)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.requested = False

    @classmethod
    def install(cls) -> StopSignal:
        """Handle the stop signal from now on: the job's `checkpoints.signal` as expkit hands
        it over (`Run.get_context().stop_signal`, from EXPKIT_STOP_SIGNAL), SIGUSR1 without
        one. Raises ValueError for a name that is not a signal of this system."""
        name = Run.get_context().stop_signal or DEFAULT_STOP_SIGNAL
        signum = getattr(signal, name, None)
        if not isinstance(signum, signal.Signals):
            raise ValueError(f"{STOP_SIGNAL_ENV}={name}: not a signal name, e.g. SIGUSR1")
        stop = cls(signum)
        signal.signal(signum, stop._handle)
        return stop

    @property
    def name(self) -> str:
        """The signal's name, e.g. SIGUSR1."""
        return signal.Signals(self.signum).name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def _stale_temp(entry: Path) -> bool:
    return entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(".tmp")


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
