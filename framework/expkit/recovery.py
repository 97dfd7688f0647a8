"""What the next open of a workspace does about a driver that died (kill -9, a crash, a reboot).

The run is marked failed (`Runs.reap_orphans`), what it left running is stopped, the metric
values its script wrote and its driver had not stored are stored, what its
script wrote into outputs/ is kept where the user can find it (and said so in the record), its
working copy is removed, its metric sinks get the rest of its metrics and are told it failed
(in the background, `expkit.sinkrecovery`), and the temporary folders of cache builds whose
builder died go.
A run whose job goes on without its driver (a Slurm job) is not failed: a background driver
re-attaches to it (`expkit.driver`), follows the job to its end and finishes the run.
Nothing here needs to write to run on a full disk: a read-only command still answers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from expkit import data, sinkrecovery
from expkit.capabilities import ENV_COMPLETE
from expkit.console import count_files
from expkit.history import History, no_room
from expkit.outputs import own_folders
from expkit.procs import stop_run_processes

if TYPE_CHECKING:
    from expkit.workspace import Workspace

SQLITE_READONLY = 8
# The room a driver sets aside in its run's folder for the run's record (expkit.lifecycle).
RESERVE_NAME = ".room-for-the-record"  # a history opened read-only because the disk is full


def recover(workspace: Workspace, history: History) -> list[str]:
    """Mark failed the runs whose driver is gone, stop their processes, keep their outputs,
    remove their working copies and stale cache builds; returns the reaped run ids.

    A full disk (SQLite cannot write) leaves the records as they are, for a later open."""
    try:
        to_reap, to_reattach = history.runs.orphans()
        reaped = history.runs.reap_orphans(to_reap)
        reattach(workspace, history, to_reattach)
    except sqlite3.OperationalError as error:
        if not (no_room(error) or getattr(error, "sqlite_errorcode", 0) == SQLITE_READONLY):
            raise
        reaped = []  # no room to write: read the records as they are
    for run_id in reaped:
        stop_run_processes(run_id, workspace=workspace.path)
        with contextlib.suppress(OSError, sqlite3.OperationalError):
            record_metrics(history, run_id, workspace.run_dir(run_id) / "metrics")
        with contextlib.suppress(OSError, sqlite3.OperationalError):
            salvage(workspace, history, run_id)
        with contextlib.suppress(OSError, sqlite3.OperationalError):
            if sinkrecovery.needs_closing(history, run_id):  # in the background: not slow
                sinkrecovery.start(workspace, run_id)
    remove_stale_builds(workspace)
    return reaped


def record_metrics(history: History, run_id: str, channel: Path) -> int:
    """Store what the dead run's processes wrote to its metric channel (`channel`, the run's
    metrics/ folder) and its driver had not stored yet; returns how many values.

    The pump records each batch with how far it read each file (`expkit.metrics.MetricPump`),
    so reading on from there stores every value the script wrote before it was stopped, and
    none twice; without this, a burst still in the channel when the driver died would be
    in no record and reach no sink (`expkit.sinkrecovery` delivers what the history holds).
    Takes as long as storing that backlog (a few seconds for a million values), once. Raises
    sqlite3.OperationalError (a full disk: the values stay in the channel, where `expkit runs
    resume` reads on from the same offsets)."""
    from expkit.metrics import MetricPump  # the pump's imports only for a dead run

    return MetricPump(history, run_id, channel).pump()


def reattach(workspace: Workspace, history: History, run_ids: list[str]) -> list[str]:
    """Start a background driver for each of `run_ids`: runs whose job outlives their driver,
    that driver gone (`Runs.orphans`); returns those started. Two commands that look at once
    start one each only for the runs each took over first (`Runs.take_over`)."""
    from expkit.driver import start_driver

    started = []
    for run_id in run_ids:
        if history.runs.take_over(run_id, os.getpid()):
            try:
                start_driver(workspace, run_id, reattach=True)
            except OSError:  # no room for its log, no process left: a later command tries
                continue
            started.append(run_id)
    return started


def salvage(workspace: Workspace, history: History, run_id: str) -> str | None:
    """Keep what a dead driver's script wrote, remove the run's working copy (and what an
    export worker it ran left); returns the note added to the record's error (None when
    there was nothing to say).

    The outputs (a real folder, never a link, which stays where it is) are moved to the run's
    outputs/ unsealed: not hashed or made read-only, listed in a warning and in the error."""
    run_dir = workspace.run_dir(run_id)
    with contextlib.suppress(OSError):  # the room its driver set aside for its record
        (run_dir / RESERVE_NAME).unlink()
    for warning in own_folders(run_dir):  # links the script made: removed, never followed
        history.events.add(run_id, "warning", warning)
    for folder in run_dir.glob("exports/*/.expkit-worker-*"):  # an export worker's request
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
    work = run_dir / "work"
    if not work.is_dir() or work.is_symlink():
        return None
    keep_checkpoints(history, run_id, work, run_dir)
    sealed = run_dir / "outputs"
    source = work / "outputs"
    if source.is_dir() and not source.is_symlink() and not sealed.exists():
        os.replace(source, sealed)
    logs = work / "logs"
    if logs.is_dir() and not logs.is_symlink() and not (run_dir / "logs" / "script").exists():
        (run_dir / "logs").mkdir(exist_ok=True)
        os.replace(logs, run_dir / "logs" / "script")
    note = None
    if sealed.is_dir() and not history.outputs.of(run_id):
        files = [p for p in sealed.rglob("*") if p.is_file() and not p.is_symlink()]
        if files:
            size = sum(p.stat().st_size for p in files)
            note = (
                f"its outputs were not sealed: {count_files(len(files), size)} are "
                f"kept as they were in {sealed}"
            )
    shutil.rmtree(work, ignore_errors=True)
    if note:
        history.events.add(run_id, "warning", note)
        record = history.runs.get(run_id)
        history.runs.update(run_id, error=f"{record.error}; {note}" if record.error else note)
    return note


def keep_checkpoints(history: History, run_id: str, work: Path, run_dir: Path) -> None:
    """The checkpoint folder (the job's `checkpoints:`) of a dead driver's working copy,
    kept in the run's folder for `expkit runs resume` (see expkit.checkpoints)."""
    job = history.runs.get(run_id).job
    if not job.get("checkpoints"):
        return
    from expkit.checkpoints import rescue
    from expkit.job import JobSpec

    try:
        spec = JobSpec.from_dict(job, source=f"run {run_id}").checkpoints
    except Exception:  # a job this version cannot read: its folder stays unknown
        return
    if spec is not None:
        for warning in rescue(work, run_dir, spec):
            history.events.add(run_id, "warning", warning)


def remove_stale_builds(workspace: Workspace) -> list[Path]:
    """Remove cache folders whose build died: data prepares (their temporary folder names
    the builder's pid) and environments (no completion mark, and no build holds the lock)."""
    removed = data.remove_stale(workspace.data_dir)
    removed += remove_stale_blob_copies(workspace)
    with contextlib.suppress(OSError):
        for folder in workspace.envs_dir.iterdir():
            lock = folder.with_name(folder.name + ".lock")
            if not folder.is_dir() or (folder / ENV_COMPLETE).exists() or not lock.exists():
                continue
            fd = os.open(lock, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a build in progress
            else:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
            finally:
                os.close(fd)
    return removed


def remove_stale_blob_copies(workspace: Workspace) -> list[Path]:
    """Remove the store's temporary copies whose process died (a kill -9 half-way through
    copying a file into the store): left, a big one keeps a full disk full."""
    from expkit.blobs import remove_stale_tmp

    return remove_stale_tmp(workspace.blobs_dir)
