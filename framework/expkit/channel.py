"""The lines of a run's metric channel: what the script's writer appends (`expkit.context`) and
the driver's pump reads (`expkit.metrics.ChannelReader`). Standard library only: the script
imports it.

Each line is one JSON array of six items. Two kinds of line:

- **One call** (`log`, `log_row`, `set_tags`, `log_params`): `[kind, name, value, step, ts,
  rank]`, kind "m" (a metric value), "r" (a table row), "t" (tags) or "p" (parameters);
  `value` a number (`NaN`, `Infinity` as Python's json writes them), or any JSON; `step` an
  integer or null; `ts` seconds since the epoch.
- **Columns** (kind "M"): `["M", name, values, steps, times, rank]`, n numeric values of one
  metric of one process, in the order logged, written when the writer has several of them in
  one batch (a burst, a fast loop). `values` and `times` are base64 of n little-endian
  float64 (bit-exact, -0.0 and NaN included), `steps` base64 of n little-endian int64, or null
  when none of the n has a step (a column never mixes values with and without a step).

Why columns: turning a float into its shortest decimal text and back costs about 0.5 us each
way, twice a value (value and time), which capped a script that logs as fast as it can, and
the driver that stores it, at about 400,000 values/s on one core each
(`benchmarks/bench_metrics.py --only latency`). Packed, a value costs a few nanoseconds to
write and to read, and the pump stores a column as one row group
(`expkit.history.metric_groups`) without looking at its values one by one.
"""

from __future__ import annotations

import binascii
import json
import os
import sys
from array import array
from collections.abc import Iterator, Sequence
from itertools import repeat
from typing import Any

COLUMNS = "M"  # the kind of a columns line
_SWAP = sys.byteorder == "big"  # the channel and the history's blobs are little-endian


def pack(kind: str, items: Sequence[Any]) -> bytes:
    """`items` as little-endian bytes: kind "d" float64, "q" int64. Raises TypeError for an
    item that is not a number (of that kind), OverflowError for one out of its range."""
    packed = items if isinstance(items, array) and items.typecode == kind else array(kind, items)
    if _SWAP:
        packed = array(kind, packed)
        packed.byteswap()
    return packed.tobytes()


def unpack(kind: str, blob: bytes) -> array:
    """Bytes written by `pack` as an array. Raises ValueError when their length is not a
    multiple of the item's size (8 bytes)."""
    packed = array(kind)
    packed.frombytes(blob)
    if _SWAP:
        packed.byteswap()
    return packed


def columns_line(
    name_json: str,
    values: Sequence[Any],
    steps: Sequence[int] | None,
    times: Sequence[float],
    rank: int,
) -> str:
    """The columns line of n values of one metric: `name_json` the metric's name as JSON
    text, `values` numbers (float, int, bool), `steps` ints or None (none has a step),
    `times` seconds since the epoch. Raises TypeError for an item of the wrong type,
    OverflowError for an int beyond a float's range or a step beyond int64's."""
    packed_steps = "null" if steps is None else f'"{_text(pack("q", steps))}"'
    return (
        f'["M",{name_json},"{_text(pack("d", values))}",{packed_steps},'
        f'"{_text(pack("d", times))}",{rank}]\n'
    )


def _text(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def read_columns(item: list) -> tuple[str, int, array | None, array, array]:
    """A columns line's JSON (a list, see the module) as (name, rank, steps, values, times),
    arrays of n items ("q", "d", "d"; steps None when none has one). Raises ValueError or
    TypeError for a line that is not one (bad base64, columns of different lengths, a name
    that is not text, ...)."""
    try:
        _, name, values, steps, times, rank = item
    except (ValueError, TypeError):
        raise ValueError("not a channel line") from None
    if type(name) is not str:
        raise TypeError(f"the name {name!r} is not text")
    if type(rank) is not int:
        raise TypeError("a rank that is not an integer")
    try:
        numbers = unpack("d", binascii.a2b_base64(values))
        stamps = unpack("d", binascii.a2b_base64(times))
        stepped = None if steps is None else unpack("q", binascii.a2b_base64(steps))
    except (binascii.Error, TypeError, ValueError):  # ValueError: not 8 bytes an item
        raise ValueError("columns that are not base64 of 8-byte numbers") from None
    if len(stamps) != len(numbers) or (stepped is not None and len(stepped) != len(numbers)):
        raise ValueError("columns of different lengths")
    if not numbers:  # a group of no values has no last value to store (a damaged line)
        raise ValueError("columns of no values")
    return name, rank, stepped, numbers, stamps


def calls_of(item: list) -> Iterator[tuple[str, str, Any, int | None, float, int]]:
    """The calls one line's JSON records, each as a one-call line's items (kind, name, value,
    step, ts, rank): the line itself, or a columns line's values one by one (kind "m").
    For readers that want every value (the Azure ML plugin's `get_metrics`). Raises
    ValueError or TypeError for a line that is not one."""
    if type(item) is not list or len(item) != 6:
        raise ValueError("not a channel line")
    if item[0] != COLUMNS:
        yield tuple(item)
        return
    name, rank, steps, values, times = read_columns(item)
    stepped = repeat(None) if steps is None else steps
    for step, value, ts in zip(stepped, values, times, strict=False):
        yield "m", name, value, step, ts, rank


def calls_in(
    path: str | os.PathLike[str],
) -> Iterator[tuple[str, str, Any, int | None, float, int]]:
    """Every call channel file `path` records (`calls_of` of each line), for readers that
    want them all (tests, benchmarks). Raises ValueError for a line that is not one, OSError
    when the file cannot be read."""
    with open(path, "rb") as f:
        for line in f:
            yield from calls_of(json.loads(line))
