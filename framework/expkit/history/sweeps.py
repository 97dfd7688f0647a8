"""Sweeps: a record per sweep (its spec, state, best trial, driver); its trials are runs that
name it (`runs.sweep`, `runs.trial`, see `Runs.of_sweep`).

A sweep is `running` while its driver asks for trials and watches them, then `completed`
(its limits reached or its search space done), `failed` (the driver could not go on) or
`canceled` (`expkit sweeps cancel`, Ctrl-C, or its `limits.timeout`). The driver's process
is recorded as a run's is, so that a sweep whose driver died is told from one still going
(`expkit sweeps resume` takes it over).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from expkit.history.connection import Part
from expkit.procs import process_start

SWEEP_STATES = ("running", "completed", "failed", "canceled")
FINAL_SWEEP_STATES = ("completed", "failed", "canceled")


@dataclass
class SweepRecord:
    """One row of `sweeps`. `spec` is the sweep spec as `SweepSpec.to_dict` wrote it (the
    trial's job spec inline); `best_run` the id of the best completed trial so far; `model`
    the "name:version" `register_best` registered."""

    id: str
    number: int
    experiment: str
    state: str
    spec: dict[str, Any]
    created: float
    ended: float | None
    error: str | None
    best_run: str | None
    model: str | None
    driver_pid: int | None
    driver_start: str | None
    driver_host: str | None
    cancel_requested: int

    @property
    def finished(self) -> bool:
        return self.state in FINAL_SWEEP_STATES

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> SweepRecord:
        values = {name: row[name] for name in _SWEEP_FIELDS}
        values["spec"] = json.loads(values["spec"])
        return cls(**values)


_SWEEP_FIELDS = tuple(SweepRecord.__dataclass_fields__)


class Sweeps(Part):
    """The sweeps: created running by the command that starts one, driven, finished."""

    def create(self, experiment: str, spec: dict[str, Any]) -> SweepRecord:
        """A new sweep of `experiment`, state running, this process its driver; its id is
        "<experiment>_sweep_<number>", the number past every recorded sweep's."""
        with self.transaction() as db:
            (number,) = db.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM sweeps").fetchone()
            sweep_id = f"{experiment}_sweep_{number}"
            pid = os.getpid()
            db.execute(
                "INSERT INTO sweeps (id, number, experiment, state, spec, created, driver_pid,"
                " driver_start, driver_host) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?)",
                (
                    sweep_id,
                    number,
                    experiment,
                    json.dumps(spec),
                    time.time(),
                    pid,
                    process_start(pid),
                    os.uname().nodename,
                ),
            )
        return self.get(sweep_id)

    def get(self, sweep_id: str) -> SweepRecord:
        """The sweep `sweep_id`; KeyError when there is none."""
        row = self.db.execute("SELECT * FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
        if row is None:
            raise KeyError(sweep_id)
        return SweepRecord.from_row(row)

    def find(self, ref: str) -> SweepRecord | None:
        """A sweep by id, by number (`3`), or `latest`; None when there is none."""
        if ref == "latest":
            row = self.db.execute("SELECT * FROM sweeps ORDER BY number DESC LIMIT 1").fetchone()
        elif ref.isdigit():
            row = self.db.execute("SELECT * FROM sweeps WHERE number = ?", (int(ref),)).fetchone()
        else:
            row = self.db.execute("SELECT * FROM sweeps WHERE id = ?", (ref,)).fetchone()
        return SweepRecord.from_row(row) if row else None

    def recent(self, experiment: str | None = None, limit: int = 50) -> list[SweepRecord]:
        """The latest `limit` sweeps (of `experiment`, or of all), newest first."""
        sql, args = "SELECT * FROM sweeps", []
        if experiment:
            sql, args = sql + " WHERE experiment = ?", [experiment]
        rows = self.db.execute(sql + " ORDER BY number DESC LIMIT ?", (*args, limit))
        return [SweepRecord.from_row(r) for r in rows]

    def update(self, sweep_id: str, **fields: Any) -> None:
        """Set columns of the sweep's row (`best_run="..."`) in one transaction."""
        columns = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE sweeps SET {columns} WHERE id = ?", (*fields.values(), sweep_id))

    def claim(self, sweep_id: str, pid: int | None = None) -> None:
        """Record `pid` (default: this process) as the sweep's driver, and the sweep running."""
        pid = pid or os.getpid()
        self.update(
            sweep_id,
            state="running",
            ended=None,
            driver_pid=pid,
            driver_start=process_start(pid),
            driver_host=os.uname().nodename,
        )

    def finish(self, sweep_id: str, state: str, error: str | None = None) -> None:
        """End the sweep in final `state` (completed, failed or canceled)."""
        assert state in FINAL_SWEEP_STATES
        self.update(sweep_id, state=state, error=error, ended=time.time())

    def request_cancel(self, sweep_id: str) -> None:
        """Ask the sweep's driver to stop: it cancels its running trials and ends canceled."""
        self.update(sweep_id, cancel_requested=1)

    def cancel_requested(self, sweep_id: str) -> bool:
        """Whether someone asked to cancel the sweep."""
        row = self.db.execute("SELECT cancel_requested FROM sweeps WHERE id = ?", (sweep_id,))
        return bool(row.fetchone()[0])
