"""The metrics each run logged: one row per value, in the order they arrived."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from expkit.history.connection import Part


class Metrics(Part):
    """Metric rows: (name, step, value, payload, ts, rank) per logged value; `value` holds a
    number, `payload` the JSON of anything else (strings, table rows)."""

    def add(
        self,
        run_id: str,
        rows: Iterable[tuple],
        offsets: dict[str, int] | None = None,
        tags: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> None:
        """Append (name, step, value, payload, ts, rank) rows in one transaction, with how far
        each file of the metric channel has now been read (`offsets`, bytes by file name),
        so that a driver that re-attaches to the run reads on from there (`offsets_of`), and
        the tags and parameters (source "script") read from the same lines: what was read
        is recorded whole or not at all."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO metrics (run_id, name, step, value, payload, ts, rank)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                ((run_id, *row) for row in rows),
            )
            db.executemany(
                "INSERT OR REPLACE INTO channel_offsets (run_id, file, offset) VALUES (?, ?, ?)",
                ((run_id, name, offset) for name, offset in (offsets or {}).items()),
            )
            db.executemany(
                "INSERT OR REPLACE INTO tags (run_id, key, value) VALUES (?, ?, ?)",
                [(run_id, str(k), str(v)) for k, v in (tags or {}).items()],
            )
            db.executemany(
                "INSERT OR REPLACE INTO params (run_id, key, value, source)"
                " VALUES (?, ?, ?, 'script')",
                [(run_id, str(k), str(v)) for k, v in (params or {}).items()],
            )

    def offsets_of(self, run_id: str) -> dict[str, int]:
        """How far each metric channel file of the run was read into the history (bytes)."""
        rows = self.db.execute(
            "SELECT file, offset FROM channel_offsets WHERE run_id = ?", (run_id,)
        ).fetchall()
        return {file: offset for file, offset in rows}

    def last_id(self, run_id: str) -> int:
        """The row id of the run's last recorded value (0: none yet)."""
        row = self.db.execute("SELECT MAX(id) FROM metrics WHERE run_id = ?", (run_id,)).fetchone()
        return row[0] or 0

    def of(
        self, run_id: str, name: str | None = None, after_id: int = 0, limit: int = -1
    ) -> list[sqlite3.Row]:
        """The run's rows (of metric `name`, or all) past row id `after_id`, at most `limit`
        of them (-1: all), oldest first; read a value with `metric_value`."""
        sql = "SELECT * FROM metrics WHERE run_id = ? AND id > ?"
        args: list[Any] = [run_id, after_id]
        if name:
            sql, args = sql + " AND name = ?", [*args, name]
        return self.db.execute(sql + " ORDER BY id LIMIT ?", (*args, limit)).fetchall()

    def latest(self, run_id: str) -> dict[str, Any]:
        """The last value of each metric, in the order the names were first logged."""
        rows = self.db.execute(
            "SELECT name, value, payload FROM metrics WHERE id IN"
            " (SELECT MAX(id) FROM metrics WHERE run_id = ? GROUP BY name)"
            " ORDER BY (SELECT MIN(id) FROM metrics m"
            " WHERE m.run_id = ? AND m.name = metrics.name)",
            (run_id, run_id),
        )
        return {r["name"]: metric_value(r) for r in rows}

    def last_of(self, run_ids: list[str], name: str) -> dict[str, Any]:
        """The last value of metric `name` in each of the runs that logged it, run id ->
        value (`expkit runs list --metric NAME`): one indexed look-up per run."""
        found: dict[str, Any] = {}
        for run_id in run_ids:
            row = self.db.execute(
                "SELECT value, payload FROM metrics WHERE run_id = ? AND name = ?"
                " ORDER BY id DESC LIMIT 1",
                (run_id, name),
            ).fetchone()
            if row is not None:
                found[run_id] = metric_value(row)
        return found


def metric_value(row: sqlite3.Row) -> Any:
    """A stored metric's value: the number, or the decoded payload (strings, table rows)."""
    return json.loads(row["payload"]) if row["payload"] is not None else row["value"]
