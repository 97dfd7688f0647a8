"""The metrics each run logged, in the order they arrived: a row per value, or a row per
group of a series' values (`expkit.history.metric_groups`), read back value by value.

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
from expkit.history.metric_groups import (
    COLUMNS,
    Group,
    MetricRow,
    expand,
    groups,
    last_value,
    row_of,
    values_of,
)

# What SQLite raises for a row it cannot take (unsupported type, text that is not UTF-8, an
# integer beyond 64 bits): that row alone is at fault, not the database.
REFUSED = (sqlite3.InterfaceError, ValueError, OverflowError, TypeError)


class ChannelMoved(Exception):
    """Another reader of the run's metric channel stored lines of a file past where this
    batch began (`Metrics.add`'s `read_from`): the batch is not stored, the reader reads on
    from the history's offsets (`Metrics.offsets_of`)."""


class Metrics(Part):
    """Metric values: (name, step, value, payload, ts, rank, attempt) per logged value; `value`
    holds a number, `payload` the JSON of anything else (strings, table rows). The pump
    stores a series' numbers in row groups (`expkit.history.metric_groups`); every reader
    here gives them back one MetricRow per value, ids counting values.

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
        values: list[tuple[int, list[tuple] | Group]],
        offsets: dict[str, int] | None = None,
        tags: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        refused: Callable[[tuple, Exception], None] | None = None,
        read_from: dict[str, int] | None = None,
    ) -> int:
        """`add` in the form the metric pump reads the channel into: values by attempt,
        (attempt, [(name, step, value, ts, rank), ...]), where `value` is a float or text
        (the JSON of anything else: stored in `payload`), or (attempt, group): one Group of
        numbers (a columns line's, `expkit.channel`), stored as row groups
        (`expkit.history.metric_groups`): each series' consecutive numbers in one row, so
        that a batch of thousands of values costs a few rows, not a row and index entry each
        (the pump's hot path: a row per value stored about 160,000 values/s, less than a
        script logs). The values' ids are reserved in the transaction: from the table's
        highest id on, consecutive, group after group in the order of their first values.
        `refused` gets each value of a group SQLite refuses as it was given, the others of
        that group stored one by one. The rest as `add`."""

        def insert(db: sqlite3.Connection) -> int:
            next_id = (db.execute("SELECT MAX(id) FROM metrics").fetchone()[0] or 0) + 1
            stored = 0
            for attempt, part in values:
                sql = _insert_of(run_id, attempt)
                extra = () if run_id.isprintable() else (run_id,)  # bound, not in the SQL
                if refused is None:
                    found, params = groups(part) if isinstance(part, list) else [part], []
                    for group in found:
                        next_id += len(group[4])
                        params.append((*row_of(group, next_id - 1), *extra))
                    db.executemany(sql, params)
                    stored += sum(len(group[4]) for group in found)
                    continue
                for group in _groups_or_values(part) if isinstance(part, list) else [part]:
                    stored += _insert_group(db, sql, group, next_id, extra, refused)
                    next_id += len(group[4])
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
        """The ids of the run's first and last recorded values ((0, 0): none yet), two
        index look-ups per name (`_NAMES`); a group's first value is its row's id - n + 1
        (`expkit.history.metric_groups`)."""
        row = self.db.execute(
            _NAMES + "SELECT MIN((SELECT id - n + 1 FROM metrics WHERE run_id = ?1"
            " AND name = names.name ORDER BY id LIMIT 1)), MAX((SELECT MAX(id) FROM metrics"
            " WHERE run_id = ?1 AND name = names.name)) FROM names WHERE name IS NOT NULL",
            [run_id],
        ).fetchone()
        return row[0] or 0, row[1] or 0

    def count(self, run_id: str, name: str | None = None) -> int:
        """How many values the run logged (of metric `name`, or all), every attempt's: the
        sum of its rows' `n` (a group holds n values)."""
        sql, args = "SELECT TOTAL(n) FROM metrics WHERE run_id = ?", [run_id]
        if name:
            sql, args = sql + " AND name = ?", [*args, name]
        return int(self.db.execute(sql, args).fetchone()[0])

    def of(
        self, run_id: str, name: str | None = None, after_id: int = 0, limit: int = -1
    ) -> list[MetricRow]:
        """The run's values (of metric `name`, or all) past value id `after_id`, at most
        `limit` of them (-1: all), oldest first, a group's values each a row of its own
        (`expkit.history.metric_groups`: a group partly past `after_id` gives the values
        past it, `limit` may end a page inside a group); read a value with `metric_value`.

        A page (`limit`) costs what it returns, not what the run holds: a metric's rows come
        from the index by (run, name, id); all the run's rows by row id, within the run's
        span (`span`) from `after_id` on, other runs' rows in that range skipped (through
        the index the rows of every name would be gathered and sorted for each page). Rows
        are read until the page is full: a group holds up to a batch's values."""
        if name:
            rows = self.db.execute(
                f"SELECT {COLUMNS} FROM metrics WHERE run_id = ? AND name = ? AND id > ?"
                " ORDER BY id LIMIT ?",
                (run_id, name, after_id, limit),
            )
        else:
            first, last = self.span(run_id)
            if last <= after_id:
                return []
            rows = self.db.execute(  # `+run_id`: not through the index (see above)
                f"SELECT {COLUMNS} FROM metrics WHERE +run_id = ? AND id > ? AND id <= ?"
                " ORDER BY id LIMIT ?",
                (run_id, max(after_id, first - 1), last, limit),
            )
        found: list[MetricRow] = []
        for row in rows:
            found.extend(expand(row, after_id))
            if 0 <= limit <= len(found):
                del found[limit:]
                break
        rows.close()
        return found

    def current(self, run_id: str, name: str | None = None) -> list[MetricRow]:
        """The run's current curve (of metric `name`, or all), oldest first: every row but
        those a later attempt superseded.

        A value an attempt logged at step s is superseded when a later attempt logged the
        same metric, on the same rank, at a step <= s: that attempt went back to a checkpoint
        taken before s and logged those steps again, so the curve does not zigzag. A value
        logged without a step is never superseded. Two queries on the run's rows: the first
        step each attempt logged of each metric and rank (from which `_cutoffs`), then the
        rows; a run with one attempt gets its rows as `of` gives them. A group (its `step`
        is its lowest) is kept when that step is below the cutoff, and its values at or past
        the cutoff are left out as it is expanded."""
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
            rows = self.db.execute(
                f"SELECT {COLUMNS} FROM metrics m WHERE {where} ORDER BY id", args
            )
            return [value for row in rows for value in expand(row)]
        # The cutoffs travel as one JSON parameter (there may be more than SQLite allows
        # parameters): a row is kept unless its attempt's cutoff is at or below its step.
        found = json.dumps([[n, r, a, cutoff] for (n, r, a), cutoff in cutoffs.items()])
        columns = ", ".join(f"m.{column}" for column in COLUMNS.split(", "))
        rows = self.db.execute(
            "WITH cut (name, rank, attempt, cutoff) AS (SELECT json_extract(value, '$[0]'),"
            " json_extract(value, '$[1]'), json_extract(value, '$[2]'),"
            " json_extract(value, '$[3]') FROM json_each(?))"
            f" SELECT {columns}, c.cutoff FROM metrics m LEFT JOIN cut c"
            " ON c.name = m.name AND c.rank = m.rank AND c.attempt = m.attempt"
            f" WHERE {where} AND (c.cutoff IS NULL OR m.step IS NULL OR m.step < c.cutoff)"
            " ORDER BY m.id",
            [found, *args],
        )
        return [value for row in rows for value in expand(row[:-1], cutoff=row[-1])]

    def latest(self, run_id: str) -> dict[str, Any]:
        """The last value of each metric, in the order the names were first logged: its
        current value (the latest attempt's, see the class). Two index look-ups per name
        (`_NAMES`), however many values the run logged (`expkit runs show` while a run
        logs millions)."""
        rows = self.db.execute(
            _NAMES + "SELECT m.name, m.value, m.payload, m.packed_values FROM names n"
            " JOIN metrics m"
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
                "SELECT value, payload, packed_values FROM metrics WHERE run_id = ? AND name = ?"
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


def _groups_or_values(rows: list[tuple]) -> list[Group]:
    """`groups` of `rows`, or (rows it cannot group: a value neither a number nor text) each
    value a group alone, for `_insert_group` to store or refuse one by one."""
    try:
        return groups(rows)
    except REFUSED:
        return [
            (i, name, rank, [step], [value], [ts])
            for i, (name, step, value, ts, rank) in enumerate(rows)
        ]


def _insert_group(
    db: sqlite3.Connection,
    sql: str,
    group: Group,
    first_id: int,
    extra: tuple,
    refused: Callable[[tuple, Exception], None],
) -> int:
    """Store `group` (its values' ids from `first_id` on) through `sql`; when SQLite refuses
    it, each of its values alone, those it still refuses handed to `refused` as they were
    given. Returns how many values were stored."""
    count = len(group[4])
    try:
        db.execute(sql, (*row_of(group, first_id + count - 1), *extra))
        return count
    except REFUSED as error:
        if count == 1:
            refused(values_of(group)[0], error)
            return 0
    stored = 0
    for k, (name, step, value, ts, rank) in enumerate(values_of(group)):
        alone: Group = (0, name, rank, None if step is None else [step], [value], [ts])
        stored += _insert_group(db, sql, alone, first_id + k, extra, refused)
    return stored


def _insert_of(run_id: str, attempt: int) -> str:
    """The INSERT of a row group (`metric_groups.row_of`: id, name, step, value, payload, ts,
    rank, n and the three packed columns) of run `run_id`'s attempt `attempt`
    (`Metrics.add_values`). The run id is a quoted SQL literal ('' for a quote, SQL's
    escape); one that SQL text cannot hold (a NUL, a lone surrogate) is bound as a twelfth
    parameter instead. One text per run and attempt: SQLite's statement cache
    (sqlite3.connect's cached_statements) prepares it once."""
    run = "'" + run_id.replace("'", "''") + "'" if run_id.isprintable() else "?12"
    return (
        "INSERT INTO metrics (id, run_id, name, step, value, payload, ts, rank, attempt, n,"
        " packed_steps, packed_values, packed_times)"
        f" VALUES (?1, {run}, ?2, ?3, ?4, ?5, ?6, ?7, {int(attempt)}, ?8, ?9, ?10, ?11)"
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


def metric_value(row: Any) -> Any:
    """A stored metric's value: the number, or the decoded payload (strings, table rows).
    `row`: a MetricRow (`Metrics.of`, `current`), or a row with `value` and `payload` (and
    maybe `packed_values`, a group's, whose last value is the row's exact value)."""
    if row["payload"] is not None:
        return json.loads(row["payload"])
    if isinstance(row, sqlite3.Row) and "packed_values" in row.keys():  # noqa: SIM118 (in row: its values)
        packed = row["packed_values"]
        if packed is not None:
            return last_value(packed)
    return row["value"]
