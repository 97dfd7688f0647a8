"""Attempts: each execution of a run's script, from its start to how it ended.

A run has one attempt unless its job asks for retries (`retry:`), its compute target's
service starts the job again (a Slurm requeue after a preemption), or a user resumes it
(`expkit runs resume`). Attempt 1 starts with the run stage; each later one starts when the
one before it ended retryable (see `expkit.job.RetrySpec.retryable`). `runs.attempt` is the
current attempt's number; the attempt rows say how each one went (`expkit runs show`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from expkit.history.connection import Part


@dataclass
class AttemptRecord:
    """One attempt of a run: its number (from 1), when it started and ended (seconds since
    the epoch; `ended` None while it goes on), its outcome (an `expkit.stages.AttemptOutcome`
    value; None while it goes on), the one-line reason, the script's exit code when it exited
    (None when it did not, or is not known), and the compute target's job id when the
    attempt ran as a job of its own ("slurm:1234")."""

    run_id: str
    attempt: int
    started: float
    ended: float | None
    outcome: str | None
    reason: str | None
    exit_code: int | None
    remote_job: str | None

    @property
    def seconds(self) -> float:
        """How long the attempt took (so far), in seconds."""
        return (self.ended or time.time()) - self.started


class Attempts(Part):
    """The attempts of each run, and the run's current attempt number."""

    def start(self, run_id: str, attempt: int, remote_job: str | None = None) -> None:
        """Record attempt `attempt` of the run as started now, and make it the run's current
        one (`runs.attempt`). Starting an attempt that is already recorded (a driver that
        re-attaches) keeps its start time."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO attempts (run_id, attempt, started, remote_job)"
                " VALUES (?, ?, ?, ?)",
                (run_id, attempt, time.time(), remote_job),
            )
            db.execute("UPDATE runs SET attempt = ? WHERE id = ?", (attempt, run_id))

    def finish(
        self,
        run_id: str,
        attempt: int,
        outcome: str,
        reason: str | None = None,
        exit_code: int | None = None,
    ) -> None:
        """Record how attempt `attempt` ended (an AttemptOutcome value, its reason, the exit
        code); an attempt already ended keeps its first outcome."""
        with self.transaction() as db:
            db.execute(
                "UPDATE attempts SET ended = ?, outcome = ?, reason = ?, exit_code = ?"
                " WHERE run_id = ? AND attempt = ? AND outcome IS NULL",
                (time.time(), outcome, reason, exit_code, run_id, attempt),
            )

    def set_remote_job(self, run_id: str, attempt: int, remote_job: str) -> None:
        """Record the compute target's job id of attempt `attempt`."""
        with self.transaction() as db:
            db.execute(
                "UPDATE attempts SET remote_job = ? WHERE run_id = ? AND attempt = ?",
                (remote_job, run_id, attempt),
            )

    def of(self, run_id: str) -> list[AttemptRecord]:
        """The run's attempts, first first; empty for a run whose script never started (or
        one recorded before attempts were)."""
        rows = self.db.execute(
            "SELECT run_id, attempt, started, ended, outcome, reason, exit_code, remote_job"
            " FROM attempts WHERE run_id = ? ORDER BY attempt",
            (run_id,),
        ).fetchall()
        return [AttemptRecord(**dict(row)) for row in rows]

    def of_runs(self, run_ids: list[str]) -> dict[str, list[AttemptRecord]]:
        """The attempts of each of `run_ids` (one query; for `expkit runs list`)."""
        if not run_ids:
            return {}
        marks = ",".join("?" * len(run_ids))
        rows = self.db.execute(
            "SELECT run_id, attempt, started, ended, outcome, reason, exit_code, remote_job"
            f" FROM attempts WHERE run_id IN ({marks}) ORDER BY run_id, attempt",
            run_ids,
        ).fetchall()
        found: dict[str, list[AttemptRecord]] = {run_id: [] for run_id in run_ids}
        for row in rows:
            found[row["run_id"]].append(AttemptRecord(**dict(row)))
        return found
