"""A run's parameters, and how far each of its metric sinks got."""

from __future__ import annotations

from expkit.history.connection import Part

JOB = "job"  # a parameter the job gave the script (its `args`)
SCRIPT = "script"  # a parameter the script logged (mlflow.log_param, Run.log_params, ...)


class Params(Part):
    """The run's parameters: key -> value (text), each with its source (JOB or SCRIPT) and an
    id that grows with every write (a value written again gets a new one), so that a sink can
    ask for what changed since it last looked (`after`)."""

    def set(self, run_id: str, params: dict[str, str], source: str) -> None:
        """Add or replace the run's parameters `params` (keys and values stored as text)."""
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO params (run_id, key, value, source) VALUES (?, ?, ?, ?)",
                [(run_id, str(k), str(v), source) for k, v in params.items()],
            )

    def of(self, run_id: str) -> dict[str, str]:
        """The run's parameters, in the order they were first written (the job's first)."""
        rows = self.db.execute(
            "SELECT key, value FROM params WHERE run_id = ? ORDER BY id", (run_id,)
        )
        return dict(rows.fetchall())

    def sources(self, run_id: str) -> dict[str, str]:
        """Each parameter's source: JOB or SCRIPT."""
        rows = self.db.execute("SELECT key, source FROM params WHERE run_id = ?", (run_id,))
        return dict(rows.fetchall())

    def after(self, run_id: str, after_id: int = 0) -> list[tuple[int, str, str]]:
        """(id, key, value) of the parameters written after id `after_id`, oldest first."""
        rows = self.db.execute(
            "SELECT id, key, value FROM params WHERE run_id = ? AND id > ? ORDER BY id",
            (run_id, after_id),
        )
        return [tuple(r) for r in rows.fetchall()]

    def of_runs(self, run_ids: list[str]) -> dict[str, dict[str, str]]:
        """The parameters of several runs at once (`runs list --param`, `metrics A B`)."""
        found: dict[str, dict[str, str]] = {run_id: {} for run_id in run_ids}
        for start in range(0, len(run_ids), 500):
            chunk = run_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT run_id, key, value FROM params WHERE run_id IN ({marks}) ORDER BY id",
                chunk,
            )
            for run_id, key, value in rows.fetchall():
                found[run_id][key] = value
        return found


class SinkCursors(Part):
    """How far each metric sink of a run delivered: the last metric row id and param id."""

    def get(self, run_id: str, sink: str) -> tuple[int, int]:
        """(metric_id, param_id) the sink `sink` of the run delivered up to; (0, 0): nothing."""
        row = self.db.execute(
            "SELECT metric_id, param_id FROM sink_cursors WHERE run_id = ? AND sink = ?",
            (run_id, sink),
        ).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    def set(self, run_id: str, sink: str, metric_id: int, param_id: int) -> None:
        """Record that the sink delivered everything up to these ids."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO sink_cursors (run_id, sink, metric_id, param_id)"
                " VALUES (?, ?, ?, ?)",
                (run_id, sink, metric_id, param_id),
            )
