"""Runs and what each one records as it goes: its stages, events, tags and sealed outputs.

Every state change is its own committed transaction, written before the next stage starts, so
a crash, a kill -9 or a full disk leaves a record that can be read and, once its driver is
gone, is marked failed with that reason (`Runs.reap_orphans`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from expkit.history.connection import Owner, Part
from expkit.procs import pid_alive, process_start
from expkit.stages import FINAL_STATES, Stage

STAGES = tuple(Stage)


@dataclass
class RunRecord:
    """One row of the run history."""

    id: str
    number: int
    experiment: str
    state: str
    status: str | None
    job: dict[str, Any]
    created: float
    ended: float | None
    exit_code: int | None
    error: str | None
    snapshot_hash: str | None
    environment_hash: str | None
    driver_pid: int | None
    driver_start: str | None
    driver_host: str | None
    cancel_requested: int
    remote_job: str | None = None  # the compute target's id of a job that outlives the driver
    sweep: str | None = None  # the sweep this run is a trial of (expkit.history.sweeps)
    trial: int | None = None  # its trial number in that sweep (Optuna's, from 0)
    cancel_reason: str | None = None  # why it was asked to stop, when not by the user
    attempt: int = 1  # the current attempt (expkit.history.attempts), from 1
    requeue_requested: int = 0  # `expkit runs cancel --requeue`: stop this attempt, start the next

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> RunRecord:
        """The record of a `runs` row; columns a later schema step added and this class does
        not declare are left out (see expkit.history.schema)."""
        values = {name: row[name] for name in _RUN_FIELDS}
        values["job"] = json.loads(values["job"])
        return cls(**values)


_RUN_FIELDS = tuple(RunRecord.__dataclass_fields__)
# The states in which a run whose driver died is re-attached to rather than reaped, when its
# compute target recorded a job that outlives the driver.
REATTACHABLE_STATES = ("queued", "scaling", "running")


@dataclass
class StageRecord:
    """One stage of a run: its state (running, completed, failed, canceled, skipped), when it
    started and ended (seconds since the epoch) and its message."""

    stage: str
    state: str
    started: float | None
    ended: float | None
    message: str | None

    @property
    def seconds(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.time()) - self.started


def driver_alive(pid: int | None, start: str | None) -> bool:
    """Whether the driver process `pid`, started at `start` (`procs.process_start`), still
    runs. On Linux a driver recorded without its start time is not trusted to be alive."""
    if start is None and os.path.exists("/proc/self/stat"):
        return False
    return pid_alive(pid, start)


class Runs(Part):
    """The runs: created queued, claimed by a driver, updated, finished or reaped."""

    def __init__(self, history: Owner, run_taken: Callable[[str], bool]) -> None:
        super().__init__(history)
        self._run_taken = run_taken

    def create(
        self,
        experiment: str,
        job: dict[str, Any],
        sweep: str | None = None,
        trial: int | None = None,
    ) -> RunRecord:
        """A new run in state `queued`, owned by this process until a driver claims it; its
        number is past every recorded one and every run folder found (`run_taken`). `sweep`
        and `trial`: the sweep it is a trial of, and its trial number there."""
        with self.transaction() as db:
            (number,) = db.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM runs").fetchone()
            while self._run_taken(f"{experiment}_{number}"):  # a run the history lost
                number += 1
            run_id = f"{experiment}_{number}"
            pid = os.getpid()
            db.execute(
                "INSERT INTO runs (id, number, experiment, state, job, created, driver_pid,"
                " driver_start, driver_host, sweep, trial)"
                " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    number,
                    experiment,
                    json.dumps(job),
                    time.time(),
                    pid,
                    process_start(pid),
                    os.uname().nodename,
                    sweep,
                    trial,
                ),
            )
        return self.get(run_id)

    def claim(self, run_id: str, pid: int | None = None) -> None:
        """Record `pid` (default: this process) as the run's driver."""
        pid = pid or os.getpid()
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET driver_pid = ?, driver_start = ?, driver_host = ? WHERE id = ?",
                (pid, process_start(pid), os.uname().nodename, run_id),
            )

    def get(self, run_id: str) -> RunRecord:
        """The run `run_id`; KeyError when there is none."""
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(run_id)
        return RunRecord.from_row(row)

    def find(self, ref: str) -> RunRecord | None:
        """A run by id, by number (`7`), or `latest`; None when there is none."""
        if ref == "latest":
            row = self.db.execute("SELECT * FROM runs ORDER BY number DESC LIMIT 1").fetchone()
        elif ref.isdigit():
            row = self.db.execute("SELECT * FROM runs WHERE number = ?", (int(ref),)).fetchone()
        else:
            row = self.db.execute("SELECT * FROM runs WHERE id = ?", (ref,)).fetchone()
        return RunRecord.from_row(row) if row else None

    def recent(self, experiment: str | None = None, limit: int = 50) -> list[RunRecord]:
        """The latest `limit` runs (of `experiment`, or of all), newest first."""
        sql, args = "SELECT * FROM runs", []
        if experiment:
            sql, args = sql + " WHERE experiment = ?", [experiment]
        rows = self.db.execute(sql + " ORDER BY number DESC LIMIT ?", (*args, limit))
        return [RunRecord.from_row(r) for r in rows]

    def experiments(self) -> list[str]:
        """The names of the experiments that have runs, sorted."""
        rows = self.db.execute("SELECT DISTINCT experiment FROM runs ORDER BY experiment")
        return [row[0] for row in rows]

    def update(self, run_id: str, **fields: Any) -> None:
        """Set columns of the run's row (`status="..."`, `exit_code=1`) in one transaction."""
        columns = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE runs SET {columns} WHERE id = ?", (*fields.values(), run_id))

    def finish(self, run_id: str, state: str, error: str | None = None) -> None:
        """End the run in final `state` (one of FINAL_STATES), keeping an earlier error."""
        assert state in FINAL_STATES
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET state = ?, error = COALESCE(?, error), status = NULL, ended = ?"
                " WHERE id = ?",
                (state, error, time.time(), run_id),
            )

    def request_cancel(self, run_id: str, reason: str | None = None) -> None:
        """Ask the run's driver to cancel it (it polls `cancel_requested`); `reason`, when it
        is not the user asking (a sweep's early termination), becomes the run's error. A
        second request keeps the first reason."""
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET cancel_requested = 1,"
                " cancel_reason = COALESCE(cancel_reason, ?) WHERE id = ?",
                (reason, run_id),
            )

    def request_requeue(self, run_id: str) -> None:
        """Ask the run's driver to stop the current attempt as a planned stop (the script gets
        the job's stop signal and its grace period, see `expkit.job.CheckpointSpec`) and to
        start the next attempt from the checkpoint it wrote (`expkit runs cancel --requeue`).
        It also asks for a cancel, which is how the driver learns of it (`cancel_requested`);
        the driver clears both when it acts on it (`clear_requeue`)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET requeue_requested = 1, cancel_requested = 1 WHERE id = ?",
                (run_id,),
            )

    def clear_requeue(self, run_id: str) -> None:
        """The driver acted on a requeue request: a later one is a new request."""
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET requeue_requested = 0, cancel_requested = 0 WHERE id = ?",
                (run_id,),
            )

    def reopen(self, run_id: str) -> RunRecord:
        """Make a failed or canceled run unfinished again, queued for its next attempt and
        owned by this process until a driver claims it (`expkit runs resume`); its stages,
        attempts, metrics and outputs stay as recorded. Raises ValueError when the run is not
        failed or canceled (another process resumed it first, or it completed)."""
        pid = os.getpid()
        with self.transaction() as db:
            row = db.execute("SELECT state FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None or row[0] not in ("failed", "canceled"):
                raise ValueError(f"run {run_id} is {row[0] if row else 'not recorded'}")
            db.execute(
                "UPDATE runs SET state = 'queued', status = NULL, ended = NULL, error = NULL,"
                " exit_code = NULL, cancel_requested = 0, cancel_reason = NULL,"
                " requeue_requested = 0, driver_pid = ?, driver_start = ?, driver_host = ?"
                " WHERE id = ?",
                (pid, process_start(pid), os.uname().nodename, run_id),
            )
        return self.get(run_id)

    def of_sweep(self, sweep_id: str) -> list[RunRecord]:
        """The trials of sweep `sweep_id`, by trial number (a re-asked trial: oldest first)."""
        rows = self.db.execute(
            "SELECT * FROM runs WHERE sweep = ? ORDER BY trial, number", (sweep_id,)
        )
        return [RunRecord.from_row(r) for r in rows]

    def cancel_requested(self, run_id: str) -> bool:
        """Whether someone asked to cancel the run."""
        row = self.db.execute("SELECT cancel_requested FROM runs WHERE id = ?", (run_id,))
        return bool(row.fetchone()[0])

    def orphans(self) -> tuple[list[str], list[str]]:
        """The unfinished runs of this host whose driver process is gone: (those to reap,
        those to re-attach to). A run is re-attached to when its compute target recorded a
        job that outlives the driver (`remote_job`) and it was waiting for or running it
        (queued, scaling or running); any other is reaped."""
        host = os.uname().nodename
        reap, reattach = [], []
        rows = self.db.execute(
            "SELECT id, state, driver_pid, driver_start, remote_job FROM runs"
            " WHERE state NOT IN ('completed', 'failed', 'canceled') AND driver_host = ?",
            (host,),
        ).fetchall()
        for run_id, state, pid, start, remote_job in rows:
            if driver_alive(pid, start):
                continue
            if remote_job and state in REATTACHABLE_STATES:
                reattach.append(run_id)
            else:
                reap.append(run_id)
        return reap, reattach

    def reap_orphans(self, run_ids: list[str] | None = None) -> list[str]:
        """Mark failed every unfinished run of this host whose driver process is gone, but
        for those a new driver re-attaches to (see `orphans`; `run_ids`: those `orphans`
        gave to reap, when the caller asked already); returns the reaped ids.

        The attempt the driver was in is recorded `lost`; when the driver died during or
        between attempts of a job that can go on (`checkpoints:`, or `retry.max_attempts`
        above 1), the error says how: `expkit runs resume N` starts the next attempt."""
        reaped = []
        for run_id in self.orphans()[0] if run_ids is None else run_ids:
            now = time.time()
            with self.transaction() as db:
                row = db.execute(
                    "SELECT state, driver_pid, driver_start, number, job FROM runs WHERE id = ?",
                    (run_id,),
                ).fetchone()
                if row[0] in FINAL_STATES or driver_alive(row[1], row[2]):  # taken meanwhile
                    continue
                reason = _reap_reason(db, run_id, row[0], row[1], row[3], row[4], now)
                db.execute(
                    "UPDATE stages SET state = 'failed', ended = ?, message = ?"
                    " WHERE run_id = ? AND state = 'running'",
                    (now, reason, run_id),
                )
                db.execute(
                    "UPDATE runs SET state = 'failed', error = ?, status = NULL, ended = ?"
                    " WHERE id = ?",
                    (reason, now, run_id),
                )
            reaped.append(run_id)
        return reaped

    def take_over(self, run_id: str, pid: int) -> bool:
        """Make `pid` the driver of run `run_id` if its driver is gone and it is unfinished;
        False when another process got there first (or the run ended). Two commands that
        both find an orphan start one driver for it, not two."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT state, driver_pid, driver_start FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
            if row is None or row[0] in FINAL_STATES or driver_alive(row[1], row[2]):
                return False
            db.execute(
                "UPDATE runs SET driver_pid = ?, driver_start = ?, driver_host = ? WHERE id = ?",
                (pid, process_start(pid), os.uname().nodename, run_id),
            )
        return True


def _reap_reason(
    db: sqlite3.Connection,
    run_id: str,
    state: str,
    pid: int | None,
    number: int,
    job_text: str,
    now: float,
) -> str:
    """Why a run whose driver died is failed; closes its open attempt as lost (in `db`'s
    transaction). A run that died during or between attempts of a job that can go on says
    how to resume it."""
    reason = f"the driver process (pid {pid}) ended without finishing the run"
    (last,) = db.execute("SELECT MAX(attempt) FROM attempts WHERE run_id = ?", (run_id,)).fetchone()
    if last is None:
        return reason  # the script never started
    (open_attempt,) = db.execute(
        "SELECT MAX(attempt) FROM attempts WHERE run_id = ? AND outcome IS NULL", (run_id,)
    ).fetchone()
    if open_attempt is not None:
        reason = f"the driver process (pid {pid}) ended during attempt {open_attempt}"
        db.execute(
            "UPDATE attempts SET ended = ?, outcome = 'lost', reason = ?"
            " WHERE run_id = ? AND outcome IS NULL",
            (now, reason, run_id),
        )
    elif state == "running":
        reason = f"the driver process (pid {pid}) ended between attempts {last} and {last + 1}"
    else:
        return reason  # after the last attempt: post-process or register
    try:
        job = json.loads(job_text)
        checkpoints = bool(job.get("checkpoints"))
        retries = int((job.get("retry") or {}).get("max_attempts", 1)) > 1
    except (ValueError, TypeError, AttributeError):
        return reason
    if checkpoints or retries:
        reason += f"; `expkit runs resume {number}` starts attempt {last + 1}"
        reason += " from its last checkpoint" if checkpoints else ""
    return reason


class Stages(Part):
    """The five stages of each run, as they start, end or are skipped."""

    def start(self, run_id: str, stage: str) -> None:
        """Record `stage` as running, and the run as in it (`preparing`, `running`...)."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO stages (run_id, stage, state, started, ended, message)"
                " VALUES (?, ?, 'running', ?, NULL, NULL)",
                (run_id, stage, time.time()),
            )
            db.execute(
                "UPDATE runs SET state = ?, status = NULL WHERE id = ?",
                (Stage(stage).state, run_id),
            )

    def finish(self, run_id: str, stage: str, outcome: str, message: str | None) -> float | None:
        """Record how `stage` ended (an `Outcome`: completed, failed or canceled), with its
        message; returns how long it took as recorded (seconds; None when its start is not
        recorded), the one duration every command shows for it."""
        ended = time.time()
        with self.transaction() as db:
            db.execute(
                "UPDATE stages SET state = ?, ended = ?, message = ?"
                " WHERE run_id = ? AND stage = ?",
                (outcome, ended, message, run_id, stage),
            )
            row = db.execute(
                "SELECT started FROM stages WHERE run_id = ? AND stage = ?", (run_id, stage)
            ).fetchone()
        return None if row is None or row[0] is None else ended - row[0]

    def skip(self, run_id: str, stage: str, reason: str) -> None:
        """Record `stage` as skipped, saying why."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO stages (run_id, stage, state, started, ended, message)"
                " VALUES (?, ?, 'skipped', NULL, NULL, ?)",
                (run_id, stage, reason),
            )

    def of(self, run_id: str) -> list[StageRecord]:
        """The run's recorded stages, in the order they run."""
        rows = self.db.execute(
            "SELECT stage, state, started, ended, message FROM stages WHERE run_id = ?", (run_id,)
        ).fetchall()
        order = {str(s): i for i, s in enumerate(STAGES)}
        return sorted((StageRecord(**dict(r)) for r in rows), key=lambda s: order[s.stage])


class Events(Part):
    """What happened to a run besides its stages: warnings, failed sinks, signals."""

    def add(self, run_id: str, kind: str, message: str, stage: str | None = None) -> None:
        """Record an event of `kind` (e.g. "warning", "sink-failed"), now."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO events (run_id, ts, stage, kind, message) VALUES (?, ?, ?, ?, ?)",
                (run_id, time.time(), stage, kind, message),
            )

    def of(self, run_id: str, kind: str | None = None) -> list[sqlite3.Row]:
        """The run's events (of `kind`, or all), oldest first."""
        sql, args = "SELECT * FROM events WHERE run_id = ?", [run_id]
        if kind:
            sql, args = sql + " AND kind = ?", [*args, kind]
        return self.db.execute(sql + " ORDER BY ts", args).fetchall()


class Tags(Part):
    """The tags a run's script or driver set (key -> value, both text)."""

    def set(self, run_id: str, tags: dict[str, str]) -> None:
        """Add or replace the run's tags `tags` (keys and values are stored as text)."""
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO tags (run_id, key, value) VALUES (?, ?, ?)",
                [(run_id, str(k), str(v)) for k, v in tags.items()],
            )

    def of(self, run_id: str) -> dict[str, str]:
        """The run's tags."""
        rows = self.db.execute("SELECT key, value FROM tags WHERE run_id = ?", (run_id,))
        return dict(rows.fetchall())


class Outputs(Part):
    """The files each run sealed in outputs/, and the links there that were recorded."""

    def set(
        self,
        run_id: str,
        manifest: dict[str, tuple[int, str]],
        links: dict[str, str] | None = None,
    ) -> None:
        """Record the run's sealed outputs (path -> (size, sha256)), and with `links` the links
        found in outputs/ that were recorded, not stored (path -> target; "." is outputs/
        itself). Without `links`, the recorded links stay as they are."""
        with self.transaction() as db:
            db.execute("DELETE FROM outputs WHERE run_id = ?", (run_id,))
            db.executemany(
                "INSERT INTO outputs (run_id, path, size, sha256) VALUES (?, ?, ?, ?)",
                [(run_id, p, size, digest) for p, (size, digest) in manifest.items()],
            )
            if links is not None:
                db.execute("DELETE FROM output_links WHERE run_id = ?", (run_id,))
                db.executemany(
                    "INSERT INTO output_links (run_id, path, target) VALUES (?, ?, ?)",
                    [(run_id, p, target) for p, target in links.items()],
                )

    def of(self, run_id: str) -> dict[str, tuple[int, str]]:
        """The run's sealed outputs: path -> (size in bytes, sha256), sorted by path."""
        rows = self.db.execute(
            "SELECT path, size, sha256 FROM outputs WHERE run_id = ? ORDER BY path", (run_id,)
        )
        return {p: (size, digest) for p, size, digest in rows}

    def links(self, run_id: str) -> dict[str, str]:
        """The links in the run's outputs that were recorded, not stored: path -> target."""
        rows = self.db.execute(
            "SELECT path, target FROM output_links WHERE run_id = ? ORDER BY path", (run_id,)
        )
        return dict(rows.fetchall())
