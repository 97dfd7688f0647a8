"""The driver's side of the metric pipeline.

The script appends to channel files (see `expkit.context`); `MetricPump` tails them into the
run history every PUMP_SECONDS, in batches of bounded size (at once again while a backlog
remains); one `SinkWorker` thread per metric sink reads new rows from the history by id, a
page of SINK_BATCH at a time, and delivers them. The script never waits for any of this, a
burst costs the driver no more memory than one batch, and a slow sink only falls behind: it
catches up from the history, and the rest is flushed at post-process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expkit.capabilities import Metric, MetricSink, MetricWriter, RunInfo, RunOutcome
from expkit.channel import COLUMNS, calls_of, read_columns
from expkit.errors import PluginError
from expkit.history import History, metric_value
from expkit.history.metric_groups import Group, values_of
from expkit.history.metrics import REFUSED, ChannelMoved
from expkit.plugins import call

PUMP_SECONDS = 0.1  # how often the pump looks for new lines once it has caught up (latency)
CHUNK_BYTES = 1 << 20  # the most channel bytes one batch reads (a longer line is read whole)
MIN_SHARE = 64 << 10  # the least one file reads in a batch, however many files share it
SINK_BATCH = 5000
RETRY_DELAYS = (0.5, 1.0, 2.0)
SINK_NICENESS = 10  # sink threads give way to the training script when the cores are busy
DRAIN_STALL_SECONDS = 300.0  # post-process gives up on a sink that delivers nothing for this long
DRAIN_REPORT_SECONDS = 5.0  # how often a long drain says how far it got
SINK_OUTCOME = "sink-outcome"  # the event that records how a sink fared (`SinkWorker.outcome`)


CHANNEL_ATTEMPT = re.compile(r"\.a([1-9][0-9]*)\.jsonl$")


def attempt_of_file(name: str) -> int:
    """The attempt whose process wrote channel file `name` (see `expkit.context`):
    `rank-R.PID.aN.jsonl` is attempt N, `rank-R.PID.jsonl` (and any other name) attempt 1."""
    found = CHANNEL_ATTEMPT.search(name)
    return int(found.group(1)) if found else 1


@dataclass
class Batch:
    """What one `ChannelReader.read` took from the channel: metric values by attempt
    (`values`: (attempt, part) in the order read, `part` a list of rows (name, step, value,
    ts, rank) from one-call lines, a row's value a float or the JSON text of anything else,
    or a `Group` of a columns line's values (`expkit.channel`); see
    `history.metrics.Metrics.add_values`), tags and parameters (each key's latest value),
    where each
    file it read now stands (`offsets`, bytes by file name: recorded with the rows, see
    `ChannelReader.commit`), the lines it skipped (`rejected`: (metric name, why)), and
    whether complete lines were left for the next batch (`more`: the batch was full)."""

    values: list[tuple[int, list[tuple] | Group]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    more: bool = False

    def __bool__(self) -> bool:
        """Whether there is anything to record (rows, tags, parameters or skipped lines)."""
        return bool(self.values or self.tags or self.params or self.offsets)

    @property
    def rows(self) -> list[tuple]:
        """The metric rows as the history stores them: (name, step, value, payload, ts, rank,
        attempt), `value` None and `payload` the JSON text for what is not a number."""
        return [
            (name, step, *((None, v) if type(v) is str else (v, None)), ts, rank, attempt)
            for attempt, part in self.values
            for name, step, v, ts, rank in (part if isinstance(part, list) else values_of(part))
        ]

    def rows_of(self, attempt: int) -> list[tuple]:
        """The list that takes attempt `attempt`'s rows: the last part when it is a list of
        that attempt's (files are read attempt by attempt), else a new one."""
        if not self.values or self.values[-1][0] != attempt or type(self.values[-1][1]) is not list:
            self.values.append((attempt, []))
        return self.values[-1][1]  # type: ignore[return-value]


class ChannelReader:
    """Reads the complete new lines of every channel file in a folder, a bounded batch at a
    time.

    `offsets` (bytes read so far, by file name) starts it where an earlier reader stopped:
    a driver that re-attaches to a run reads on from what the history holds. A line that
    cannot be recorded (not JSON, a step that is not a 64-bit integer, a number beyond a
    float's range) is skipped alone: counted in `bad_lines`, and why in `rejected` (by
    metric name, the first reason each).

    One `read` takes at most `CHUNK_BYTES` of the channel (but a single longer line,
    whole), so that what the driver holds does not grow with a burst: a batch holds at
    most CHUNK_BYTES / 20 rows (the shortest line, `["m","",0,null,0,0]`, is 20 bytes), or
    CHUNK_BYTES / 32 values of columns lines (`expkit.channel`: 24 bytes each once read).
    The files of one attempt share that room (`_shares`), so that every rank's values move
    on while one rank floods. What a batch read counts only once it is recorded
    (`commit`): a batch that could not be stored is read again.

    Each value is read with its attempt, from the name of its file (`attempt_of_file`), and
    the files are read attempt by attempt: an earlier attempt's values get the lower row ids
    even when one read takes the end of one attempt and the start of the next, so that the
    last row of a metric is always its current value (`expkit.history.metrics`). A batch
    reads a later attempt's files only once it has read every earlier attempt's to its
    end."""

    def __init__(self, folder: Path, offsets: dict[str, int] | None = None) -> None:
        self.folder = folder
        self.offsets: dict[str, int] = dict(offsets or {})
        self.bad_lines = 0
        self.rejected: dict[str, str] = {}

    def read(self, limit: int = 0) -> Batch:
        """The next batch of new lines, of at most `limit` bytes (0: CHUNK_BYTES; a line
        longer than that is read whole); `Batch.more` when complete lines were left
        unread."""
        budget = limit or CHUNK_BYTES
        batch = Batch()
        pending = []  # (attempt, name, offset, bytes new) of the files that grew
        for path in self.folder.glob("*.jsonl"):
            offset = self.offsets.get(path.name, 0)
            with contextlib.suppress(OSError):  # a file removed meanwhile has nothing new
                new = path.stat().st_size - offset
                if new > 0:
                    pending.append((attempt_of_file(path.name), path.name, offset, new))
        pending.sort()
        last = pending[-1][0] if pending else 0
        for attempt in sorted({file[0] for file in pending}):
            files = [file for file in pending if file[0] == attempt]
            shares = _shares([file[3] for file in files], budget)
            for (_, name, offset, _), share in zip(files, shares, strict=True):
                data, whole = self._take(self.folder / name, offset, share)
                batch.more = batch.more or not whole
                if data:
                    batch.offsets[name] = offset + len(data)
                    self._parse_lines(data, attempt, batch)
                budget -= len(data)
            if batch.more or budget <= 0:  # a later attempt waits for this one's backlog
                batch.more = batch.more or attempt != last
                break
        return batch

    def commit(self, batch: Batch) -> None:
        """Count `batch` as read, once it is recorded: the next `read` starts after it, and
        the lines it skipped count in `bad_lines`."""
        self.offsets.update(batch.offsets)
        for name, why in batch.rejected:
            self.reject(name, why)

    def reject(self, name: str, why: str) -> None:
        """Count one line that is not recorded, and why (the first reason per metric)."""
        self.bad_lines += 1
        self.rejected.setdefault(name, why)

    def problem(self) -> str | None:
        """What was skipped, in one line for the run's warnings; None when nothing was."""
        if not self.bad_lines:
            return None
        reasons = "; ".join(f"{name!r}: {why}" for name, why in list(self.rejected.items())[:3])
        more = ", ..." if len(self.rejected) > 3 else ""
        return f"{self.bad_lines} unreadable metric lines were skipped ({reasons}{more})"

    @staticmethod
    def _take(path: Path, offset: int, size: int) -> tuple[bytes, bool]:
        """The complete lines of file `path` within `size` bytes from `offset` (the first
        line whole when it alone is longer), and whether they reach the file's end as it is
        now (a partial last line, still being written, is left for later). A long line is
        read in parts of `size` joined once: appending each part to the rest would copy the
        line over and over (a 50 MB line in 64 KiB parts: 20 GB copied, 16 s)."""
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                parts = [f.read(size)]
                whole = len(parts[0]) < size
                while not whole and parts[-1].rfind(b"\n") < 0:  # a line longer than `size`
                    parts.append(f.read(size))
                    whole = len(parts[-1]) < size
                data = parts[0] if len(parts) == 1 else b"".join(parts)
        except OSError:
            return b"", True
        return data[: data.rfind(b"\n") + 1], whole

    def _parse_lines(self, data: bytes, attempt: int, batch: Batch) -> None:
        """The lines `data` holds (each ends with a newline) into `batch`, a line that
        cannot be recorded skipped alone (in `batch.rejected`). Fast path: the lines parsed
        as one JSON array (the JSON parser runs once, not once per line: twice as fast),
        taken when it holds one item per line (as it does when each line is one JSON text,
        which holds no raw newline); otherwise (a line that is not JSON) line by line."""
        try:
            items = json.loads(b"[" + data[:-1].replace(b"\n", b",") + b"]")
        except ValueError:
            items = None
        if items is None or len(items) != data.count(b"\n"):
            return self._parse_each(data, attempt, batch)
        rows, tags, params = batch.rows_of(attempt), batch.tags, batch.params
        append = rows.append
        low, high = STEP_RANGE
        for item in items:
            if type(item) is list and len(item) == 6:  # the common cases checked inline
                kind, name, value, step, ts, rank = item
                if (
                    kind == "m"
                    and type(value) is float
                    and value == value  # not NaN
                    and type(name) is str
                    and (step is None or (type(step) is int and low <= step <= high))
                    and type(ts) is float
                    and type(rank) is int
                ):
                    append((name, step, value, ts, rank))
                    continue
                if kind == COLUMNS:
                    group = _column_group(item)
                    if group is not None:  # else value by value, below
                        batch.values.append((attempt, group))
                        rows = batch.rows_of(attempt)
                        append = rows.append
                        continue
            try:
                self._parse_item(item, rows, tags, params)
            except (ValueError, TypeError, OverflowError) as error:
                name = item[1] if type(item) is list and len(item) > 1 else "?"
                why = str(error) or type(error).__name__
                batch.rejected.append((name if isinstance(name, str) else "?", why))
        return None

    def _parse_each(self, data: bytes, attempt: int, batch: Batch) -> None:
        """The slow path of `_parse_lines`: line by line."""
        rows = batch.rows_of(attempt)
        for line in data.splitlines():
            try:
                try:
                    item = json.loads(line)
                except ValueError:
                    raise ValueError("not a channel line") from None
                self._parse_item(item, rows, batch.tags, batch.params)
            except (ValueError, TypeError, OverflowError) as error:
                batch.rejected.append((_name_of(line), str(error) or type(error).__name__))

    @staticmethod
    def _parse_item(
        item: Any,
        rows: list[tuple],
        tags: dict[str, str],
        params: dict[str, str],
    ) -> None:
        """One channel line's JSON into `rows` (name, step, value, ts, rank: `Batch.values`),
        `tags` or `params`; ValueError, TypeError or OverflowError (and nothing added) when it
        cannot be recorded."""
        try:
            kind, name, value, step, ts, rank = item
        except (ValueError, TypeError):
            raise ValueError("not a channel line") from None
        if not isinstance(name, str):
            raise TypeError(f"the name {name!r} is not text")
        if kind == COLUMNS:  # NaN stored as a one-call line's (its payload "NaN")
            calls = list(calls_of(item))  # all or none: a bad line raises before any is added
            rows.extend((n, s, "NaN" if v != v else v, t, r) for _, n, v, s, t, r in calls)
            return
        if kind in ("t", "p"):
            if not isinstance(value, dict):
                raise TypeError("tags or parameters that are not a mapping")
            (tags if kind == "t" else params).update({str(k): str(v) for k, v in value.items()})
            return
        if step is not None and (
            type(step) is not int or not STEP_RANGE[0] <= step <= STEP_RANGE[1]
        ):
            raise ValueError(f"step {step!r} is not an integer in -2**63..2**63-1")
        if type(ts) not in (int, float) or type(rank) is not int:
            raise TypeError("a time or rank that is not a number")
        if kind == "m" and type(value) in (int, float):
            number = float(value)  # OverflowError: beyond a float's range
            if number != number:  # NaN: a REAL column would store NULL; the payload keeps it
                rows.append((name, step, "NaN", ts, rank))
            else:
                rows.append((name, step, number, ts, rank))
        elif kind in ("m", "r"):
            rows.append((name, step, json.dumps(value), ts, rank))
        else:
            raise ValueError(f"unknown kind {kind!r}")


STEP_RANGE = (-(2**63), 2**63 - 1)  # what SQLite's INTEGER holds


def _column_group(item: list) -> Group | None:
    """A columns line's values (`expkit.channel`) as one Group, stored as they are; None
    when they are to be read value by value (`ChannelReader._parse_item`): a NaN among them,
    stored as a one-call line's is (its payload "NaN"), or a line that is not a columns
    line, rejected there with why."""
    try:
        name, rank, steps, values, times = read_columns(item)
    except (ValueError, TypeError):
        return None
    total = sum(values)  # NaN when a NaN is among them (or +inf and -inf are)
    if total != total and any(map(math.isnan, values)):
        return None
    return (0, name, rank, steps, values, times)


def _shares(sizes: list[int], budget: int) -> list[int]:
    """How many bytes each of files with `sizes` bytes new may read in a batch of `budget`
    bytes: a fair part each (at least MIN_SHARE), a file that needs less than its part
    leaving the rest to the others (max-min fairness, the smallest backlogs served
    first), so that one rank's flood never holds up another rank's values."""
    shares = [0] * len(sizes)
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    for served, i in enumerate(order):
        shares[i] = max(budget // (len(sizes) - served), MIN_SHARE)
        budget -= min(sizes[i], shares[i])
    return shares


def _name_of(line: bytes) -> str:
    """The metric name of a channel line, as well as it can be told ("?" when it cannot)."""
    try:
        name = json.loads(line)[1]
    except Exception:
        return "?"
    return name if isinstance(name, str) else "?"


class MetricPump:
    """Moves metrics from the channel into the history until stopped, then drains.

    It reads a bounded batch at a time (`ChannelReader`) and records each batch in one
    transaction with how far it read each file (`history.metrics.Metrics.add_values`), so
    that the driver's memory does not grow with a burst and a driver that dies between two
    batches loses nothing and stores nothing twice: whoever reads on starts from the
    recorded offsets.
    While a backlog remains it reads the next batch at once; otherwise it looks again every
    PUMP_SECONDS.

    What one line holds never takes other lines with it: a batch the history refuses is
    stored row by row, and the rows it still refuses are skipped (see `ChannelReader`).
    A failure of the history itself (a locked or full disk) leaves the lines unread, to be
    read again at the next pump; the thread keeps going. Another reader of the same channel
    (the recovery of a dead driver's run while `expkit runs resume` starts the next attempt)
    may store lines first: a batch is stored only where it began at the offsets the history
    holds (`history.metrics.Metrics.add_values`'s `read_from`), else read again from there."""

    def __init__(self, history: History, run_id: str, channel: Path) -> None:
        self.history, self.run_id = history, run_id
        self.reader = ChannelReader(channel, history.metrics.offsets_of(run_id))
        self.count = 0
        self.listeners: list[threading.Event] = []
        self.error: Exception | None = None  # the last failure to store, if any
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="expkit-pump", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            more = False
            with contextlib.suppress(Exception):  # recorded in self.error; tried again
                more = self.pump_batch()
            if not more:
                self._stop.wait(PUMP_SECONDS)

    def pump(self) -> int:
        """Record everything the channel holds now, batch by batch; returns how many
        values. Raises what the history raised (what was not recorded is read again)."""
        before = self.count
        while self.pump_batch():
            pass
        return self.count - before

    def pump_batch(self) -> bool:
        """Record the next batch (`ChannelReader.read`); returns whether lines were left
        for the next. Raises what the history raised (the batch is read again)."""
        try:
            batch = self.reader.read()
            stored = self._store(batch) if batch else 0
        except ChannelMoved:  # another reader stored these lines: read on from where it got
            self.reader.offsets = self.history.metrics.offsets_of(self.run_id)
            return True
        except Exception as error:
            self.error = error
            raise
        self.reader.commit(batch)
        self.count += stored
        if any(rows for _, rows in batch.values) or batch.params:
            for event in self.listeners:
                event.set()
        return batch.more

    def _store(self, batch: Batch) -> int:
        """Record `batch` in one transaction; returns how many values. A row the database
        refuses (text it cannot encode, ...) is left out alone, and counted as a skipped
        line."""
        args = (self.run_id, batch.values, batch.offsets, batch.tags, batch.params)
        began = self.reader.offsets  # where the batch began: not stored when another got on
        try:
            return self.history.metrics.add_values(*args, read_from=began)
        except REFUSED:
            pass  # a row the database refuses: find it, in one transaction still

        def refused(row: tuple, error: Exception) -> None:
            name = str(row[0]).encode("utf-8", "replace").decode()
            batch.rejected.append((name, str(error)))

        return self.history.metrics.add_values(*args, refused=refused, read_from=began)

    def stop(self) -> None:
        """Stop the thread, then read what the processes wrote last."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(Exception):  # recorded in self.error
            self.pump()
            self.error = None

    def problems(self) -> list[str]:
        """What the run's warnings should say about the values not recorded."""
        found = [self.reader.problem()]
        if self.error is not None:
            found.append(f"metric values not recorded: {type(self.error).__name__}: {self.error}")
        return [text for text in found if text]


class SinkWorker:
    """Delivers a run's metrics and parameters to one sink on a background thread, with
    retries.

    How far it got is recorded in the history (`history.sink_cursors`, under `key`: the
    sink's name, see `cursor_keys`) after each batch that arrives: whoever takes over the
    run later (a driver that re-attaches, or the recovery of a run whose driver died,
    `expkit.sinkrecovery`) delivers the rest, and nothing twice (but the one batch a driver
    that died between delivering it and recording so had on its way)."""

    def __init__(
        self,
        history: History,
        run: RunInfo,
        sink: MetricSink,
        options: dict[str, Any],
        required: bool,
        key: str | None = None,
    ) -> None:
        self.history, self.run, self.sink = history, run, sink
        self.options, self.required = options, required
        self.key = key or sink.name
        self.wake = threading.Event()
        self.error: PluginError | None = None
        self.delivered = 0  # metric values delivered by this worker
        self._cursor, self._param_cursor = history.sink_cursors.get(run.run_id, self.key)
        self._writer: MetricWriter | None = None
        self._done = threading.Event()
        self.handed_over = False  # a stop came during `drain`: the rest is another's to send
        self._thread = threading.Thread(target=self._loop, name=f"expkit-sink-{sink.name}")
        self._thread.daemon = True

    @property
    def label(self) -> str:
        return f"metric sink {self.sink.name!r}"

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        """Open the sink, then deliver what the pump stores until the run ends (`drain`).

        The open runs at full priority: it is done once and bounded (imports, a connection),
        and a busy machine would otherwise starve it for as long as it is busy, which
        post-process then waits for. From then on the thread gives way to the training
        script (`_yield_cpu`); the deliveries left when the run ends are `drain`'s, on a
        thread of full priority again (Linux lets no thread raise its priority back)."""
        opened, writer = self._call("open", self.run, self.options)
        if not opened:
            return
        self._writer = writer
        _yield_cpu()
        # Woken by events, never by a period: the pump sets `wake` when it stored new values
        # or parameters, `drain` when the run ends. Whatever was stored before the sink
        # opened (or between a wake and its clear) is found by the next delivery, which
        # reads everything after the cursor.
        while not self._done.is_set():
            self.wake.wait()
            self.wake.clear()
            if not self._done.is_set() and not self._deliver():
                return

    def _deliver(self) -> bool:
        """Send everything new, parameters before each batch; False once the sink has
        failed for good."""
        while self.error is None:
            if self._done.is_set() and threading.current_thread() is self._thread:
                return True  # the run ended: `drain` delivers the rest at full priority
            if self.handed_over:
                return True  # stopped in `drain`: the batch before this one is recorded
            if not self._deliver_params():
                return False
            rows = self.history.metrics.of(self.run.run_id, after_id=self._cursor, limit=SINK_BATCH)
            if not rows:
                return True
            batch = [
                Metric(r["name"], metric_value(r), r["step"], r["ts"], r["rank"]) for r in rows
            ]
            if not self._call("send", batch, on=self._writer)[0]:
                return False
            self._cursor = rows[-1]["id"]
            self.delivered += len(rows)
            self._save_cursors()
        return False

    def _deliver_params(self) -> bool:
        """`MetricWriter.log_params` with the parameters new or changed since the last call
        (each key's latest value); False once the sink has failed for good."""
        new = self.history.params.after(self.run.run_id, self._param_cursor)
        if not new:
            return True
        params = {key: value for _, key, value in new}
        if not self._call("log_params", params, on=self._writer)[0]:
            return False
        self._param_cursor = new[-1][0]
        self._save_cursors()
        return True

    def _save_cursors(self) -> None:
        """Record how far the sink got. A history that cannot be written now (a full disk)
        only means that a later recovery sends the last batch again."""
        with contextlib.suppress(sqlite3.OperationalError):
            self.history.sink_cursors.set(
                self.run.run_id, self.key, self._cursor, self._param_cursor
            )

    def outcome(self) -> str:
        """How the sink fared, for the run's summary: `mlflow ok (1,234 values)` or
        `tensorboard failed at send: <reason>`."""
        if self.error is None and self.handed_over:
            return f"{self.sink.name}: {self.delivered:,} values sent, the rest in the background"
        if self.error is None:
            return f"{self.sink.name} ok ({self.delivered:,} values)"
        text = str(self.error)
        prefix = f"plugin {self.sink.plugin}, {self.label} "
        if text.startswith(prefix):
            method, _, reason = text[len(prefix) :].partition(": ")
            return f"{self.sink.name} failed at {method}: {reason}"
        return f"{self.sink.name} failed: {text}"

    def _call(self, method: str, *args: Any, on: object | None = None) -> tuple[bool, Any]:
        """The sink's (or its writer's) `method`, tried again with the very same arguments
        after each of RETRY_DELAYS while it raises: (True, what it returned), or (False,
        None) once it failed for good, with `self.error` saying why."""
        for delay in (*RETRY_DELAYS, None):
            try:
                return True, call(self.sink, method, *args, on=on)
            except Exception as error:
                if delay is None:
                    self.error = self._problem(method, error)
                    return False, None
                time.sleep(delay)
        return False, None

    def _problem(self, method: str, error: Exception) -> PluginError:
        """`error` as "plugin X, metric sink 'name' method: ..." (a UserError is not one yet)."""
        if isinstance(error, PluginError):
            return error
        return PluginError(self.sink.plugin, f"{self.label} {method}", error)

    def drain(
        self,
        stopped: Callable[[], bool] = lambda: False,
        report: Callable[[SinkWorker], None] | None = None,
    ) -> None:
        """Deliver everything in the history, then stop (post-process).

        The worker's thread ends after the batch it is sending; what is left goes on a new
        thread, of the caller's priority rather than the worker's lowered one (see `_loop`).
        Waits as long as the sink makes progress (a million values take MLflow minutes),
        calling `report` every DRAIN_REPORT_SECONDS, and gives up on one that delivered
        nothing for DRAIN_STALL_SECONDS: that is recorded as its failure, rather than the
        run closing while values are still on their way.

        Once `stopped()` (the lifecycle: a signal came), the batch in flight is finished and
        recorded and the rest is left in the history for another process to send and close
        (`handed_over`; `expkit.sinkrecovery`): a stop does not wait for minutes of sends
        (but a send in flight that hangs is still waited for, up to DRAIN_STALL_SECONDS).
        """
        self._done.set()
        self.wake.set()
        if not self._wait(self._thread, stopped, report) or self._writer is None:
            return
        if self.error is not None or self.handed_over:
            return
        rest = threading.Thread(target=self._deliver, name=f"expkit-drain-{self.sink.name}")
        rest.daemon = True
        rest.start()
        self._wait(rest, stopped, report)

    def _wait(
        self,
        thread: threading.Thread,
        stopped: Callable[[], bool],
        report: Callable[[SinkWorker], None] | None,
    ) -> bool:
        """Join `thread` while the sink makes progress: True once it ended, False (the stall
        recorded as the sink's failure) when it delivered nothing for DRAIN_STALL_SECONDS.
        Once `stopped()`, the thread is asked to end after its batch (`handed_over`)."""
        progress, since = self.delivered, time.monotonic()
        reported = since
        while True:
            thread.join(0.25)
            if not thread.is_alive():
                return True
            now = time.monotonic()
            if not self.handed_over and self._writer is not None and stopped():
                self.handed_over = True
            if self.delivered != progress:
                progress, since = self.delivered, now
            elif now - since >= DRAIN_STALL_SECONDS:
                break
            if report is not None and now - reported >= DRAIN_REPORT_SECONDS:
                reported = now
                report(self)
        stuck = TimeoutError(f"delivered nothing for {DRAIN_STALL_SECONDS:g} s; gave up")
        self.error = self.error or PluginError(self.sink.plugin, f"{self.label} send", stuck)
        return False

    def close(self, outcome: RunOutcome) -> PluginError | None:
        """Tell the sink how the run ended, once (a close is not retried: it ends the
        sink's run, and the run's record waits for it). Returns why it failed, or None. A
        sink that already failed, or never opened, is not told, nor one handed over (the
        process that sends the rest closes it)."""
        if self._writer is None or self.error is not None or self.handed_over:
            return None
        try:
            call(self.sink, "close", outcome, on=self._writer)
        except Exception as error:
            self.error = self._problem("close", error)
            return self.error
        return None


def cursor_keys(names: list[str]) -> list[str]:
    """The key under which each of a job's sinks records how far it got: its name, and
    `name.i` for a sink the job names again at index i (`metrics.i`)."""
    seen: set[str] = set()
    keys = []
    for i, name in enumerate(names):
        keys.append(name if name not in seen else f"{name}.{i}")
        seen.add(name)
    return keys


def _yield_cpu() -> None:
    """Lower the calling thread's priority (Linux niceness is per thread): a sink's imports and
    writes can take CPU seconds, and the training script should get the cores first; the sink
    catches up later from the history."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SINK_NICENESS)
