"""The metrics each run logged: one row per value, in the order they arrived.

Each value is kept with the attempt that logged it (`expkit.history.attempts`). A later
attempt that resumes from a checkpoint logs again the steps since that checkpoint: the run's
current curve (`Metrics.current`, what `expkit metrics`, plots and `Run.get_metrics` show)
keeps the later values, the history keeps both (`expkit metrics --all-attempts`), and the
metric sinks get every row as it arrived.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

from expkit.history.connection import Part

# What SQLite raises for a row it cannot take (unsupported type, text that is not UTF-8, an
# integer beyond 64 bits): that row alone is at fault, not the database.
REFUSED = (sqlite3.InterfaceError, ValueError, OverflowError, TypeError)


class ChannelMoved(Exception):
    """Another reader of the run's metric channel stored lines of a file past where this
    batch began (`Metrics.add`'s `read_from`): the batch is not stored, the reader reads on
    from the history's offsets (`Metrics.offsets_of`)."""


class Metrics(Part):
    """Metric rows: (name, step, value, payload, ts, rank, attempt) per logged value; `value`
    holds a number, `payload` the JSON of anything else (strings, table rows).

    Row ids follow the attempts (the pump reads an earlier attempt's files first, see
    `expkit.metrics.ChannelReader`): the last row of a metric is its current value."""

    def add(
        self,
        run_id: str,
        rows: Iterable[tuple],
        offsets: dict[str, int] | None = None,
        tags: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        refused: Callable[[tuple, Exception], None] | None = None,
        read_from: dict[str, int] | None = None,
    ) -> int:
        """Append (name, step, value, payload, ts, rank, attempt) rows in one transaction (a row
        without its attempt is attempt 1's), with how far each file of the metric channel
        has now been read (`offsets`, bytes by file name), so that a driver that
        re-attaches to the run reads on from there (`offsets_of`), and
        the tags and parameters (source "script") read from the same lines: what was read
        is recorded whole or not at all. Returns how many rows were stored.

        A row SQLite cannot take (text that is not UTF-8, an integer beyond 64 bits) raises
        one of REFUSED and nothing is stored; with `refused`, the rows are stored one by one
        instead, still in one transaction, and each such row is left out and handed to
        `refused` with its error.

        `read_from`: where the batch began in each file (bytes). When the history has another
        offset for a file of `offsets` (another reader stored those lines first: the recovery
        of a dead driver's run and a driver resuming it), nothing is stored and ChannelMoved
        is raised, so that no value is stored twice (a compare-and-set, in the transaction)."""
        sql = (
            "INSERT INTO metrics (run_id, name, step, value, payload, ts, rank, attempt)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        full = ((run_id, *row, 1) if len(row) == 6 else (run_id, *row) for row in rows)

        def insert(db: sqlite3.Connection) -> int:
            return _insert(db, sql, full, refused, lambda row: row[1:])

        return self._record(run_id, insert, offsets, tags, params, read_from)

    def add_values(
        self,
        run_id: str,
        values: list[tuple[int, list[tuple]]],
        offsets: dict[str, int] | None = None,
        tags: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        refused: Callable[[tuple, Exception], None] | None = None,
        read_from: dict[str, int] | None = None,
    ) -> int:
        """`add` in the form the metric pump reads the channel into: rows by attempt,
        (attempt, [(name, step, value, ts, rank), ...]), where `value` is a float (stored
        in the column `value`) or text (the JSON of anything else: stored in `payload`).
        Each row is bound as it is, five parameters, the run id and attempt written into the
        statement (`_insert_of`): the pump's hot path, where a new tuple of eight per row
        cost a tenth of its time and binding seven parameters another. `refused` gets the
        row as it was given. The rest as `add`."""

        def insert(db: sqlite3.Connection) -> int:
            stored = 0
            for attempt, rows in values:
                if not run_id.isprintable():  # bound, not written into the statement
                    rows = [(*row, run_id) for row in rows]
                sql = _insert_of(run_id, attempt)
                stored += _insert(db, sql, rows, refused, lambda row: row[:5])
            return stored

        return self._record(run_id, insert, offsets, tags, params, read_from)

    def _record(
        self,
        run_id: str,
        insert: Callable[[sqlite3.Connection], int],
        offsets: dict[str, int] | None,
        tags: dict[str, str] | None,
        params: dict[str, str] | None,
        read_from: dict[str, int] | None,
    ) -> int:
        """One transaction of `add`: the compare-and-set on `read_from`, `insert`'s rows (it
        returns how many), the offsets, tags and parameters."""
        with self.transaction() as db:
            if read_from is not None and offsets:
                now = dict(
                    db.execute(
                        "SELECT file, offset FROM channel_offsets WHERE run_id = ?", (run_id,)
                    ).fetchall()
                )
                moved = [f for f in offsets if now.get(f, 0) != read_from.get(f, 0)]
                if moved:
                    raise ChannelMoved(f"{moved[0]} was read on by another reader")
            stored = insert(db)
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
        return max(stored, 0)

    def offsets_of(self, run_id: str) -> dict[str, int]:
        """How far each metric channel file of the run was read into the history (bytes)."""
        rows = self.db.execute(
            "SELECT file, offset FROM channel_offsets WHERE run_id = ?", (run_id,)
        ).fetchall()
        return {file: offset for file, offset in rows}

    def names(self, run_id: str) -> list[str]:
        """The names of the run's metrics, sorted: one index look-up per name (`_NAMES`),
        however many values the run logged."""
        rows = self.db.execute(_NAMES + "SELECT name FROM names WHERE name IS NOT NULL", [run_id])
        return [row[0] for row in rows.fetchall()]

    def last_id(self, run_id: str) -> int:
        """The row id of the run's last recorded value (0: none yet): the highest of each
        metric's last, one index look-up per name (a scan of the run's rows would take a
        second per few million values)."""
        return self.span(run_id)[1]

    def span(self, run_id: str) -> tuple[int, int]:
        """The row ids of the run's first and last recorded values ((0, 0): none yet), two
        index look-ups per name (`_NAMES`)."""
        row = self.db.execute(
            _NAMES + "SELECT MIN((SELECT MIN(id) FROM metrics WHERE run_id = ?1"
            " AND name = names.name)), MAX((SELECT MAX(id) FROM metrics WHERE run_id = ?1"
            " AND name = names.name)) FROM names WHERE name IS NOT NULL",
            [run_id],
        ).fetchone()
        return row[0] or 0, row[1] or 0

    def count(self, run_id: str, name: str | None = None) -> int:
        """How many values the run logged (of metric `name`, or all), every attempt's."""
        sql, args = "SELECT COUNT(*) FROM metrics WHERE run_id = ?", [run_id]
        if name:
            sql, args = sql + " AND name = ?", [*args, name]
        return int(self.db.execute(sql, args).fetchone()[0])

    def of(
        self, run_id: str, name: str | None = None, after_id: int = 0, limit: int = -1
    ) -> list[sqlite3.Row]:
        """The run's rows (of metric `name`, or all) past row id `after_id`, at most `limit`
        of them (-1: all), oldest first; read a value with `metric_value`.

        A page (`limit`) costs what it returns, not what the run holds: a metric's rows come
        from the index by (run, name, id); all the run's rows by row id, within the run's
        span (`span`) from `after_id` on, other runs' rows in that range skipped (through
        the index the rows of every name would be gathered and sorted for each page)."""
        if name:
            return self.db.execute(
                "SELECT * FROM metrics WHERE run_id = ? AND name = ? AND id > ?"
                " ORDER BY id LIMIT ?",
                (run_id, name, after_id, limit),
            ).fetchall()
        first, last = self.span(run_id)
        if last <= after_id:
            return []
        return self.db.execute(  # `+run_id`: not through the index (see above)
            "SELECT * FROM metrics WHERE +run_id = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?",
            (run_id, max(after_id, first - 1), last, limit),
        ).fetchall()

    def current(self, run_id: str, name: str | None = None) -> list[sqlite3.Row]:
        """The run's current curve (of metric `name`, or all), oldest first: every row but
        those a later attempt superseded.

        A value an attempt logged at step s is superseded when a later attempt logged the
        same metric, on the same rank, at a step <= s: that attempt went back to a checkpoint
        taken before s and logged those steps again, so the curve does not zigzag. A value
        logged without a step is never superseded. Two queries on the run's rows: the first
        step each attempt logged of each metric and rank (from which `_cutoffs`), then the
        rows; a run with one attempt gets its rows as `of` gives them."""
        where, args = "m.run_id = ?", [run_id]
        if name:
            where, args = where + " AND m.name = ?", [*args, name]
        firsts = self.db.execute(
            f"SELECT name, rank, attempt, MIN(step) FROM metrics m WHERE {where}"
            " AND step IS NOT NULL GROUP BY name, rank, attempt",
            args,
        ).fetchall()
        cutoffs = _cutoffs(firsts)
        if not cutoffs:
            return self.db.execute(
                f"SELECT * FROM metrics m WHERE {where} ORDER BY id", args
            ).fetchall()
        # The cutoffs travel as one JSON parameter (there may be more than SQLite allows
        # parameters): a row is kept unless its attempt's cutoff is at or below its step.
        found = json.dumps([[n, r, a, cutoff] for (n, r, a), cutoff in cutoffs.items()])
        return self.db.execute(
            "WITH cut (name, rank, attempt, cutoff) AS (SELECT json_extract(value, '$[0]'),"
            " json_extract(value, '$[1]'), json_extract(value, '$[2]'),"
            " json_extract(value, '$[3]') FROM json_each(?))"
            " SELECT m.* FROM metrics m LEFT JOIN cut c"
            " ON c.name = m.name AND c.rank = m.rank AND c.attempt = m.attempt"
            f" WHERE {where} AND (c.cutoff IS NULL OR m.step IS NULL OR m.step < c.cutoff)"
            " ORDER BY m.id",
            [found, *args],
        ).fetchall()

    def latest(self, run_id: str) -> dict[str, Any]:
        """The last value of each metric, in the order the names were first logged: its
        current value (the latest attempt's, see the class). Two index look-ups per name
        (`_NAMES`), however many values the run logged (`expkit runs show` while a run
        logs millions)."""
        rows = self.db.execute(
            _NAMES + "SELECT m.name, m.value, m.payload FROM names n JOIN metrics m"
            " ON m.id = (SELECT MAX(id) FROM metrics WHERE run_id = ?1 AND name = n.name)"
            " WHERE n.name IS NOT NULL"
            " ORDER BY (SELECT MIN(id) FROM metrics WHERE run_id = ?1 AND name = n.name)",
            [run_id],
        )
        return {r["name"]: metric_value(r) for r in rows}

    def last_of(self, run_ids: list[str], name: str) -> dict[str, Any]:
        """The last value of metric `name` in each of the runs that logged it, run id ->
        value (`expkit runs list --metric NAME`): one indexed look-up per run. The last
        value is the current one (the latest attempt's, see the class)."""
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


def _insert(
    db: sqlite3.Connection,
    sql: str,
    rows: Iterable[tuple],
    refused: Callable[[tuple, Exception], None] | None,
    given: Callable[[tuple], tuple],
) -> int:
    """`rows` through `sql` in one executemany, or (with `refused`) one by one, each row SQLite
    refuses handed to `refused` (as `given` makes it) and left out; how many were stored."""
    if refused is None:
        return max(db.executemany(sql, rows).rowcount, 0)
    stored = 0
    for row in rows:
        try:
            db.execute(sql, row)
            stored += 1
        except REFUSED as error:
            refused(given(row), error)
    return stored


def _insert_of(run_id: str, attempt: int) -> str:
    """The INSERT of (name, step, value, ts, rank) rows of run `run_id`'s attempt `attempt`
    (`Metrics.add_values`): a value that is text goes to `payload`, any other to `value`. The
    run id is a quoted SQL literal ('' for a quote, SQL's escape); one that SQL text cannot
    hold (a NUL, a lone surrogate) is bound as a sixth parameter instead. One text per run and
    attempt: SQLite's statement cache (sqlite3.connect's cached_statements) prepares it once."""
    run = "'" + run_id.replace("'", "''") + "'" if run_id.isprintable() else "?6"
    return (
        "INSERT INTO metrics (run_id, name, step, value, payload, ts, rank, attempt)"
        f" VALUES ({run}, ?1, ?2, CASE WHEN typeof(?3) != 'text' THEN ?3 END,"
        f" CASE WHEN typeof(?3) = 'text' THEN ?3 END, ?4, ?5, {int(attempt)})"
    )


# The names of run ?1's metrics, as the table `names` (ending with a NULL row): each found by
# one look-up in the index (run_id, name, id) after the one before, a "skip scan" that costs
# one look-up per name, however many values each has (SQLite's own skip-scan needs ANALYZE).
_NAMES = (
    "WITH RECURSIVE names(name) AS ("
    " SELECT (SELECT MIN(name) FROM metrics WHERE run_id = ?1)"
    " UNION ALL SELECT (SELECT MIN(name) FROM metrics WHERE run_id = ?1 AND name > names.name)"
    " FROM names WHERE names.name IS NOT NULL) "
)


def _cutoffs(firsts: list[tuple[str, int, int, int]]) -> dict[tuple[str, int, int], int]:
    """From (name, rank, attempt, first step logged) rows: for each (name, rank, attempt)
    that a later attempt rewound, the lowest first step of the later attempts; the attempt's
    values from that step on are superseded (`Metrics.current`)."""
    by_series: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for name, rank, attempt, first in firsts:
        by_series.setdefault((name, rank), []).append((attempt, first))
    cutoffs: dict[tuple[str, int, int], int] = {}
    for (name, rank), attempts in by_series.items():
        attempts.sort()
        lowest: int | None = None  # the lowest first step of the attempts after this one
        for attempt, first in reversed(attempts):
            if lowest is not None:
                cutoffs[(name, rank, attempt)] = lowest
            lowest = first if lowest is None else min(lowest, first)
    return cutoffs


def metric_value(row: sqlite3.Row) -> Any:
    """A stored metric's value: the number, or the decoded payload (strings, table rows)."""
    return json.loads(row["payload"]) if row["payload"] is not None else row["value"]
