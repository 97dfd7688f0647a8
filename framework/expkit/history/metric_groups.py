"""Row groups of the `metrics` table: many numeric values of one series in one row.

A row whose `n` is 1 is one value, as the history always stored them. A row whose `n` is
above 1 is a group: n numbers of one (run, name, attempt, rank), in the order they were
logged, packed in three BLOB columns (`packed_values`: little-endian float64 each;
`packed_times`: float64 seconds since the epoch; `packed_steps`: int64, or NULL when none of
them has a step: a group never mixes values with and without a step). Its scalar columns say
what the aggregate readers need without unpacking: `value` and `ts` are its last value's,
`step` the lowest step (NULL without steps), `payload` NULL.

Ids stay one per value: a group row's `id` is its last value's id, its values have the ids
id-n+1 .. id (reserved when the group is written, `Metrics.add_values`), so that a sink's
cursor, a page's `after_id` and a sweep's `last_id` keep counting values.

Why groups: one SQLite row and one index entry per value cost about 4 us, more than a
training script takes to log it (`benchmarks/bench_metrics.py --only pump`); a group costs
that once per batch of a series.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator, Sequence
from itertools import compress, repeat
from operator import eq
from typing import Any

from expkit.channel import pack, unpack

# The keys of a metric row, in the order `MetricRow` holds them (those of the table's
# original columns, as `SELECT *` gave them before groups).
FIELDS = ("id", "run_id", "name", "step", "value", "payload", "ts", "rank", "attempt")
_INDEX = {key: i for i, key in enumerate(FIELDS)}

# The columns a reader selects: FIELDS, then what a group needs to be expanded.
COLUMNS = ", ".join(FIELDS) + ", n, packed_steps, packed_values, packed_times"


class MetricRow(tuple):
    """One logged value as the history's readers return it: `row["name"]` (or `row[2]`), with
    the keys of FIELDS, as a `sqlite3.Row` of the table gave them before values were
    grouped; `keys()` lists them (so that `dict(zip(row.keys(), row))` works as before)."""

    __slots__ = ()

    def __getitem__(self, key: Any) -> Any:
        if type(key) is str:
            return tuple.__getitem__(self, _INDEX[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> tuple[str, ...]:
        """The row's keys, FIELDS."""
        return FIELDS


def last_value(blob: bytes) -> float:
    """The last float64 of a group's `packed_values` (the exact value: the REAL column keeps
    no sign of a -0.0)."""
    return unpack("d", blob[-8:])[0]


def expand(row: Sequence[Any], after_id: int = 0, cutoff: int | None = None) -> Iterator[MetricRow]:
    """The values of one row selected as COLUMNS, as MetricRows, oldest first: those whose id
    is above `after_id`, and (`cutoff`, `Metrics.current`) whose step is below `cutoff`.
    A group is expanded by C iterators (zip, map, compress), not value by value in Python."""
    id_, run_id, name, step, value, payload, ts, rank, attempt, n, steps, values, times = row
    if values is not None and n == 1:  # one value whose sign the REAL column lost (`row_of`)
        value, values = unpack("d", values)[0], None
    if values is None:
        if id_ > after_id and (cutoff is None or step is None or step < cutoff):
            yield MetricRow((id_, run_id, name, step, value, payload, ts, rank, attempt))
        return
    first = id_ - n + 1
    skip = max(after_id - first + 1, 0)
    if skip >= n:
        return
    stepped = unpack("q", steps)[skip:] if steps is not None else None
    columns = zip(
        range(first + skip, id_ + 1),
        repeat(run_id),
        repeat(name),
        repeat(None) if stepped is None else stepped,
        unpack("d", values)[skip:],
        repeat(None),
        unpack("d", times)[skip:],
        repeat(rank),
        repeat(attempt),
    )
    if cutoff is not None and stepped is not None:
        yield from map(MetricRow, compress(columns, map(cutoff.__gt__, stepped)))
    else:
        yield from map(MetricRow, columns)


def finite(blob: bytes) -> array:
    """The finite numbers of a group's `packed_values` (no NaN, no +-inf), in order: what the
    sweeps' report counts (`expkit.sweeps.report`), filtered in C."""
    return array("d", filter(math.isfinite, unpack("d", blob)))


# A group as `groups` finds it: (index of its first value in the rows given, name, rank,
# steps (None: no step), values (numbers, or one text: a payload alone), times).
Group = tuple[int, str, int, Sequence[Any] | None, Sequence[Any], Sequence[Any]]

# Up to this many series in one batch are told apart by one C pass over the rows each
# (`_series`); more by one Python pass in all.
_FEW_SERIES = 8


def groups(rows: Sequence[tuple]) -> list[Group]:
    """(name, step, value, ts, rank) rows of one attempt (`Metrics.add_values`), as groups in
    the order of their first values: the consecutive numbers of each series (name, rank)
    that all have a step or all have none, each text value (a payload) alone. A series'
    values keep their order; a new group starts where the kind of value changes."""
    if not rows:
        return []
    names, steps, values, times, ranks = zip(*rows, strict=True)
    found: list[Group] = []
    for index in _series(names, ranks):
        name, rank, first = names[index[0]], ranks[index[0]], index[0]
        s, v, t = _take(steps, index), _take(values, index), _take(times, index)
        nones = s.count(None)
        if len(index) > 1 and nones in (0, len(s)):
            try:
                numbers = array("d", v)  # TypeError: a payload among them (text)
            except TypeError:
                pass
            else:
                found.append((first, name, rank, None if nones else s, numbers, t))
                continue
        found.extend(_runs(index, name, rank, s, v, t))
    if len(found) > 1:
        found.sort(key=_first)
    return found


def _first(group: Group) -> int:
    return group[0]


def _series(names: Sequence[str], ranks: Sequence[int]) -> list[Sequence[int]]:
    """The indices of each series' rows (name, rank), in the order of their first rows, found
    in C where the rows allow: one series (all of them); series that take turns, as a
    training loop logs them (each k-th row, one slice each); a few series (one pass over
    the rows each); else one Python pass."""
    count = len(names)
    keys: Sequence[Any] = names
    if ranks.count(ranks[0]) != count:
        keys = list(zip(names, ranks, strict=True))
    unique = dict.fromkeys(keys)
    turns = len(unique)
    if turns == 1:
        return [range(count)]
    if keys[turns:] == keys[:-turns]:  # each series every `turns`-th row
        return [range(j, count, turns) for j in range(turns)]
    if turns <= _FEW_SERIES:
        return [list(compress(range(count), map(eq, keys, repeat(key)))) for key in unique]
    found: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        bucket = found.get(key)
        if bucket is None:
            found[key] = [i]
        else:
            bucket.append(i)
    return list(found.values())


def _take(column: Sequence[Any], index: Sequence[int]) -> Sequence[Any]:
    """The items of `column` at `index`, in C: a slice for a range, else one by one."""
    if isinstance(index, range):
        return column[index.start : index.stop : index.step]
    return list(map(column.__getitem__, index))


def _runs(
    index: Sequence[int],
    name: str,
    rank: int,
    steps: Sequence[Any],
    values: Sequence[Any],
    times: Sequence[Any],
) -> list[Group]:
    """One series' rows that mix kinds (numbers with and without steps, payloads) as groups,
    value by value: a group ends where the kind changes; a payload is a group alone."""
    found: list[Group] = []
    start, kind = 0, None
    for j, (step, value) in enumerate(zip(steps, values, strict=True)):
        now = "text" if type(value) is str else "stepped" if step is not None else "plain"
        if now != kind or now == "text":
            if kind is not None:
                found.append(_run(index, name, rank, steps, values, times, start, j, kind))
            start, kind = j, now
    found.append(_run(index, name, rank, steps, values, times, start, len(values), kind))
    return found


def _run(
    index: Sequence[int],
    name: str,
    rank: int,
    steps: Sequence[Any],
    values: Sequence[Any],
    times: Sequence[Any],
    start: int,
    end: int,
    kind: str | None,
) -> Group:
    """The group of a series' values start..end-1 (`_runs`), of kind `kind`."""
    numbers = (
        values[start:end] if kind == "text" or end - start == 1 else array("d", values[start:end])
    )
    return (
        index[start],
        name,
        rank,
        None if kind == "plain" else steps[start:end],
        numbers,
        times[start:end],
    )


def row_of(group: Group, last_id: int) -> tuple:
    """The (id, name, step, value, payload, ts, rank, n, packed_steps, packed_values,
    packed_times) a group is stored as, its last value's id `last_id` (see the module).
    One value alone is a plain row, as before groups (but a -0.0, whose sign the REAL
    column would lose, keeps its exact value in `packed_values`). Raises OverflowError for
    a step beyond int64, TypeError for a value that is neither a number nor text."""
    _, name, rank, steps, values, times = group
    if len(values) == 1:
        step, value, ts = None if steps is None else steps[0], values[0], times[0]
        if type(value) is str:
            return (last_id, name, step, None, value, ts, rank, 1, None, None, None)
        exact = pack("d", [value]) if value == 0 and math.copysign(1, value) < 0 else None
        return (last_id, name, step, float(value), None, ts, rank, 1, None, exact, None)
    packed_steps = None if steps is None else pack("q", steps)
    low = None if steps is None else min(steps)
    return (
        last_id,
        name,
        low,
        float(values[-1]),
        None,
        times[-1],
        rank,
        len(values),
        packed_steps,
        pack("d", values),
        pack("d", times),
    )


def values_of(group: Group) -> list[tuple]:
    """A group's values as the rows they were given: (name, step, value, ts, rank)."""
    _, name, rank, steps, values, times = group
    stepped = repeat(None) if steps is None else steps
    return [(name, s, v, t, rank) for s, v, t in zip(stepped, values, times, strict=False)]
