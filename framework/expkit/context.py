"""The in-script API: what a training script calls to record metrics and tags.

Stdlib only and never waiting on the driver: `log()` appends to an in-memory queue, and a
daemon thread writes the queue to the run's metric channel (one append-only file per process)
every FLUSH_SECONDS, in the lines `expkit.channel` describes (a metric's many values in a
batch as one columns line; `calls_of`, re-exported here for plugins' in-script code, reads a
line back as the calls it records). The queue is bounded: a script that logs faster than its
values can be written (millions in a burst) writes a batch itself once QUEUE_LIMIT values
wait, so that its memory does not grow with the burst. The driver tails that channel while
the script runs.
Outside expkit the same calls do nothing harmful: they are accepted and dropped, with one
notice.

A compute target whose service keeps runs of its own can name a forwarder, which also sends
the calls to the service's run (e.g. Azure ML's, see the `azureml` plugin): EXPKIT_FORWARDER
set to `module:attribute` in the script's environment. get_context() imports that module and
calls the attribute (a class or factory) with no arguments; the forwarder then gets each batch
the writer drains, in order, and is given time to send the rest at exit (see `Forwarder`). It
must hand the batches to a thread of its own and return at once (whatever it needs that is
slow to import, it imports there). A forwarder that cannot be loaded, or that raises, is one
notice, and the script goes on recording to expkit's channel only. Without EXPKIT_FORWARDER
(or with it empty) nothing is imported for it.

Values: a Python float, int or bool is queued as it is (the fast path). Any other number is
stored as a number too: numpy scalars, 0-d arrays and tensors, anything with `.item()` or
`__float__` (duck typing: neither numpy nor torch is imported here). A mutable value (a
tensor, an array) is copied when logged (`detach().clone()`, `.copy()`: no GPU sync in
`log()`) and turned into a number on the writer thread. A value or step that cannot be
recorded (`2**1024`, `step="epoch_1"`, a step outside -2**63..2**63-1) is dropped alone, with
one notice on stderr per metric naming why; every other value is recorded.

Processes a script starts record into channel files of their own. The script's own process
(and each torchrun/MPI rank) queues, as above. A child of it does not: a process it forks
(`os.fork`, `multiprocessing` with the fork start method) or starts with `multiprocessing`
(spawn, forkserver: `multiprocessing.parent_process()` is set, or the child is importing the
script as its main module, where a run object made at the script's top is made) writes each
call to its channel file before the call returns, on the calling thread (a tensor is turned
into a number there).
Such a child is often ended with no chance to write what it holds (`os._exit`, the SIGTERM of
`Pool.__exit__`): whatever it logged is recorded all the same. A forked child starts with an
empty queue (what the parent had queued is the parent's to write) and no forwarder (its thread
stayed in the parent). A fork is seen by this module's fork hook, so a process forked before
expkit.context was first imported in its parent is not known as a child: it queues.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import operator
import os
import sys
import threading
import time
from collections import deque
from typing import Any, Protocol

from expkit.channel import calls_of as calls_of  # re-exported: see the module
from expkit.channel import columns_line

CHANNEL_ENV = "EXPKIT_METRICS_DIR"
RUN_ID_ENV = "EXPKIT_RUN_ID"
# The attempt this process belongs to (from 1; see the job's `retry:`), and the absolute path
# of the checkpoint folder kept from one attempt to the next (the job's `checkpoints:`).
ATTEMPT_ENV = "EXPKIT_ATTEMPT"
CHECKPOINT_ENV = "EXPKIT_CHECKPOINT_DIR"
# The name of the signal a planned stop sends first (`checkpoints.signal`: "SIGUSR1").
STOP_SIGNAL_ENV = "EXPKIT_STOP_SIGNAL"
FLUSH_SECONDS = 0.1  # how often the writer thread writes what was logged (latency)
WRITE_BATCH = 10_000  # values encoded and written at a time
# The most values queued: past it, a call writes a batch itself (`ScriptRun._catch_up`), so
# that a script that logs faster than its values can be written does not hold the burst in
# memory (about 150 bytes a value: 15 MB here, 450 MB for a burst of 3 million).
QUEUE_LIMIT = 100_000
COLUMN_MIN = 4  # a metric's values in one batch written as one columns line from this many
FORWARDER_ENV = "EXPKIT_FORWARDER"  # `module:attribute` of a forwarder; unset or empty: none
FORWARDER_EXIT_SECONDS = 30.0  # at exit, how long the forwarder may take to send the rest

STEP_MIN, STEP_MAX = -(2**63), 2**63 - 1  # what SQLite's INTEGER holds

# Environment variables that launchers set for a process's global rank.
_RANK_VARS = ("RANK", "HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def process_rank() -> int:
    """This process's global rank under torchrun, Horovod or MPI; 0 when not distributed."""
    for var in _RANK_VARS:
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 0


def attempt_number() -> int:
    """EXPKIT_ATTEMPT as a number from 1 (1 when it is not set or not a whole number)."""
    value = os.environ.get(ATTEMPT_ENV, "")
    return int(value) if value.isdigit() and int(value) >= 1 else 1


def channel_file_name(rank: int, pid: int) -> str:
    """The channel file of process `pid` of rank `rank`: one per process and attempt (a
    requeued job may reuse a pid), `rank-R.PID.jsonl` in attempt 1, `rank-R.PID.aN.jsonl`
    in attempt N > 1; the driver records each value with the attempt its file names."""
    attempt = attempt_number()
    return f"rank-{rank}.{pid}" + (f".a{attempt}" if attempt > 1 else "") + ".jsonl"


class Forwarder(Protocol):
    """Also sends a script's calls elsewhere (a service's own run), named by EXPKIT_FORWARDER.

    Items are tuples `(kind, name, value, step, timestamp)`: kind "m" a metric value (step an
    int or None), "r" a table row (value: the columns as a dict), "t" tags (value: a dict of
    strings, name ""), "p" parameters (as "t"); timestamp is time.time() when the script made
    the call.
    """

    # Set by the ScriptRun to its flush: a forwarder whose own exit handler runs before the
    # ScriptRun's calls it first, so that what is still queued is handed over.
    before_exit: Any

    def send(self, items: list[tuple]) -> None:
        """Take a batch, in the order logged; called by the writer (or a flush): never blocks."""

    def close(self, timeout: float) -> None:
        """At exit: wait at most `timeout` seconds until everything handed over was sent."""


class ScriptRun:
    """The run a training script belongs to (`Run.get_context()`)."""

    def __init__(
        self,
        run_id: str | None,
        channel_path: str | None,
        forwarder: Forwarder | None = None,
    ) -> None:
        self.id = run_id
        self.rank = process_rank()
        self._queue: deque[tuple] = deque()
        self._put = self._queue.append
        self._file = None
        self._forwarder = forwarder
        # None when nothing records the calls (the fast check of every call)
        self._path = channel_path if channel_path or forwarder is None else ""
        self._names: dict[str, str] = {}
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._warned = False
        if channel_path:
            self._file = open(channel_path, "ab", buffering=0)  # noqa: SIM115 - lives with the run
        if forwarder is not None:
            with contextlib.suppress(AttributeError):  # a forwarder that has no use for it
                forwarder.before_exit = self.flush
        self._rejected: set[str] = set()  # metrics whose bad values were already reported
        self._write_failed = False  # a failed write was reported (once)
        self._own_path: str | None = None  # a forked child's channel file, not made yet
        if self._path is not None:
            if _child_process():
                self._put = self._put_now
            else:
                self._writer = threading.Thread(target=self._write_loop, name="expkit-metrics")
                self._writer.daemon = True
                self._writer.start()
            atexit.register(self._at_exit)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=self._after_fork)

    @property
    def attempt(self) -> int:
        """Which attempt of the run this is, from 1 (a retry, a requeue or `expkit runs
        resume` starts the next); 1 outside expkit."""
        return attempt_number()

    @property
    def checkpoint_dir(self) -> str | None:
        """The folder to write checkpoints into and resume from (the job's `checkpoints:`):
        what it holds when an attempt ends is there when the next one starts. None when the
        job names none, or outside expkit."""
        return os.environ.get(CHECKPOINT_ENV) or None

    @property
    def stop_signal(self) -> str | None:
        """The name of the signal ("SIGUSR1") each rank gets before a planned stop (a time
        limit, a preemption, a requeue, a cancel), with the job's grace period to write a
        checkpoint and exit: handle it with `signal.signal(getattr(signal, name), handler)`.
        None when the job names no checkpoint folder, or outside expkit."""
        return os.environ.get(STOP_SIGNAL_ENV) or None

    @property
    def offline(self) -> bool:
        """True when the script runs outside expkit (and has no forwarder): nothing is recorded."""
        return self._path is None

    # -- the calls a script makes -------------------------------------------------------
    def log(self, name: str, value: Any, step: int | None = None) -> None:
        """Record one value of metric `name` (optionally at an integer `step`); returns at
        once. `value`: a number of any kind (float, numpy scalar, 0-d array or tensor: stored
        as a number, as it was when logged), text, or a list or dict (stored as JSON)."""
        if self._path is None:
            return self._drop()
        if type(value) is not float:
            value = _snapshot(value)
        self._put(("m", name, value, step, time.time()))
        if len(self._queue) > QUEUE_LIMIT:
            self._catch_up()

    def log_list(self, name: str, values: list[Any]) -> None:
        """Record a list of values for `name`, stepped 0..n-1."""
        if self._path is None:
            return self._drop()
        now = time.time()
        for step, value in enumerate(values):
            self._put(("m", name, _snapshot(value), step, now))
            if len(self._queue) > QUEUE_LIMIT:
                self._catch_up()

    def log_row(self, name: str, **columns: Any) -> None:
        """Record one row of the table `name`, e.g. `log_row("per_class", cls=1, acc=0.9)`."""
        if self._path is None:
            return self._drop()
        row = {key: _snapshot(value) for key, value in columns.items()}
        self._put(("r", name, row, None, time.time()))
        if len(self._queue) > QUEUE_LIMIT:
            self._catch_up()

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Attach tags (string key and value) to the run."""
        if self._path is None:
            return self._drop()
        self._put(("t", "", {str(k): str(v) for k, v in tags.items()}, None, time.time()))

    def log_params(self, params: dict[str, Any]) -> None:
        """Record the run's parameters (`{"lr": 0.01}`; values are kept as text, the latest
        value of a key wins); `expkit runs show` lists them with the job's `args`."""
        if self._path is None:
            return self._drop()
        self._put(("p", "", {str(k): str(v) for k, v in params.items()}, None, time.time()))

    def tag(self, key: str, value: Any = "") -> None:
        """Attach one tag to the run."""
        self.set_tags({key: value})

    def flush(self) -> None:
        """Write everything logged so far to the channel (called at exit too)."""
        if self._path is not None:
            self._drain()

    def _at_exit(self) -> None:
        self.flush()
        forwarder = self._forwarder
        if forwarder is not None:
            try:
                forwarder.close(FORWARDER_EXIT_SECONDS)
            except Exception as error:
                self._forwarder_failed(forwarder, error)

    # -- internals ------------------------------------------------------------------------
    def _drop(self) -> None:
        if not self._warned:
            self._warned = True
            print(
                "expkit: this script is not running under expkit; metrics are not recorded",
                file=sys.stderr,
            )

    def _forwarder_failed(self, forwarder: Forwarder, error: Exception) -> None:
        self._forwarder = None
        _notice(f"the forwarder {type(forwarder).__name__} failed ({_why(error)})")

    def _after_fork(self) -> None:
        """In a forked child: a channel file of its own (made when it first logs), an empty
        queue, and each call written before it returns (see `_put_now`): the writer thread
        stayed in the parent, and the child may be ended at any moment."""
        self._queue = deque()
        self._put = self._put_now
        self._lock = threading.Lock()  # the parent's writer may have held it at the fork
        self._forwarder = None  # its thread stayed in the parent
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
            if self._path:  # opened when the child logs something (see _open_own)
                name = channel_file_name(self.rank, os.getpid())
                self._own_path = os.path.join(os.path.dirname(self._path), name)

    def _put_now(self, item: tuple) -> None:
        """A child process's `_put`: `item` is in its channel file when this returns (a
        call made meanwhile on another thread may write it, under the lock)."""
        self._queue.append(item)
        try:
            self._drain()
        except Exception as error:  # never an exception in the script
            self._lost(error)

    def _open_own(self) -> None:
        """A forked child's channel file, made when it first has something to write."""
        path, self._own_path = self._own_path, None
        if path is None:
            return
        try:
            self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - lives with the run
            self._path = path
        except OSError as error:
            _notice(f"a forked process cannot record metrics ({_why(error)})", False)

    def _write_loop(self) -> None:
        while True:
            self._wake.wait(FLUSH_SECONDS)
            try:
                self._drain()
            except Exception as error:  # never the end of the writer: the next batch is tried
                self._lost(error)

    def _lost(self, error: Exception) -> None:
        """A write failed: one notice per process."""
        if not self._write_failed:
            self._write_failed = True
            _notice(f"metric values were lost ({_why(error)})", recorded=False)

    def _catch_up(self) -> None:
        """The writer thread is QUEUE_LIMIT values behind (the script logs faster than
        values can be encoded and written): write one batch on the calling thread. A burst
        then costs the script the time to write it, which the writer thread would have
        taken from it anyway (one interpreter lock), instead of memory that grows with the
        burst; a script that logs at a pace the writer keeps up with never gets here."""
        try:
            self._drain(batches=1)
        except Exception as error:  # never an exception in the script
            self._lost(error)

    def _drain(self, batches: int = -1) -> None:
        """Write what is queued, WRITE_BATCH values at a time (`batches` of them at most;
        -1: until the queue is empty), in the order logged: each batch is taken and
        written under the lock, which another thread may take between two batches."""
        while self._queue and batches != 0:
            batches -= 1
            with self._lock:
                queue = self._queue
                if not queue:
                    return
                pop = queue.popleft
                items = [pop() for _ in range(min(len(queue), WRITE_BATCH))]
                if self._own_path is not None:
                    self._open_own()
                if self._file is not None:
                    try:
                        text = self._encode_batch(items)
                    except Exception:  # e.g. a name that is no dict key: call by call
                        text = "".join(map(self._encode_or_reject, items))
                    self._file.write(text.encode())
                forwarder = self._forwarder
                if forwarder is not None:
                    try:
                        forwarder.send(items)
                    except Exception as error:  # a broken forwarder: expkit's channel only
                        self._forwarder_failed(forwarder, error)

    def _encode_batch(self, items: list[tuple]) -> str:
        """The channel lines of `items` (see `expkit.channel`): each metric's consecutive
        plain numbers (a float, int or bool; an int step or none) as one columns line when
        there are several, every other call as a line of its own, in the order logged (a
        column where its first value was). A column ends at a call of its metric that goes
        on a line of its own, and where its values change between having a step and not,
        so that a metric's values keep their order. A value or step that cannot be recorded
        goes on a line of its own too, that is, is left out alone, with its notice in the
        order logged (`_encode_or_reject`)."""
        open_columns: dict[str, tuple[int, bool, list, list, list]] = {}
        lines: list[str] = []
        for item in items:
            kind, name, value, step, ts = item
            if (
                kind == "m"
                and (type(value) is float or _plain(value))
                and (step is None or (type(step) is int and STEP_MIN <= step <= STEP_MAX))
            ):
                column = open_columns.get(name)
                if column is None or column[1] is not (step is None):
                    if column is not None:
                        lines[column[0]] = self._column(name, column)
                    column = open_columns[name] = (len(lines), step is None, [], [], [])
                    lines.append("")  # the column's place
                column[2].append(value)
                column[3].append(step)
                column[4].append(ts)
                continue
            column = open_columns.pop(name, None)
            if column is not None:
                lines[column[0]] = self._column(name, column)
            lines.append(self._encode_or_reject(item))
        for name, column in open_columns.items():
            lines[column[0]] = self._column(name, column)
        return "".join(lines)

    def _column(self, name: str, column: tuple[int, bool, list, list, list]) -> str:
        """The lines of one metric's consecutive plain values (`_encode_batch`): a columns
        line, or a line per value when there are fewer than COLUMN_MIN (a script that logs
        now and then keeps a channel a person can read)."""
        _, plain, values, steps, times = column
        if len(values) < COLUMN_MIN or not isinstance(name, str):  # the name: its notice
            return "".join(
                self._encode_or_reject(("m", name, v, s, t))
                for v, s, t in zip(values, steps, times, strict=True)
            )
        quoted = self._names.get(name)
        if quoted is None:
            quoted = self._names[name] = json.dumps(name)
        return columns_line(quoted, values, None if plain else steps, times, self.rank)

    def _encode(self, item: tuple) -> str:
        """`item`'s one-call line (`expkit.channel`). Raises TypeError for a name that is not
        text, ValueError (StepError) or OverflowError for a value or step that cannot be
        recorded."""
        kind, name, value, step, ts = item
        quoted = self._names.get(name) if type(name) is str else None
        if quoted is None:
            if not isinstance(name, str):
                raise TypeError(f"the name {name!r} is not text")
            quoted = self._names[name] = json.dumps(name)
        if kind == "m":
            if type(value) not in (int, float, bool) and type(value) is not str:
                value = _number(value)
            if type(value) in (int, float, bool):
                number = float(value)  # OverflowError for an int beyond a float's range
                if number != number or number in (_INF, -_INF):  # JSON's NaN/Infinity
                    return f'["m",{quoted},{json.dumps(number)},{_step(step)},{ts!r},{self.rank}]\n'
                return f'["m",{quoted},{number!r},{_step(step)},{ts!r},{self.rank}]\n'
        payload = json.dumps(value, default=_jsonable)
        return f'["{kind}",{quoted},{payload},{_step(step)},{ts!r},{self.rank}]\n'

    def _encode_or_reject(self, item: tuple) -> str:
        """`item`'s channel line, or "" after one notice per metric saying why it is not."""
        try:
            return self._encode(item)
        except Exception as error:
            kind, name = item[0], item[1]
            key = name if isinstance(name, str) else repr(name)  # a list is no set member
            if key not in self._rejected:
                self._rejected.add(key)
                what = {"m": "metric", "r": "table"}.get(kind, "call")
                with contextlib.suppress(Exception):
                    sys.stderr.write(
                        f"expkit: {what} {name!r}: a value was not recorded ({_reason(error)}); "
                        "log a number (or text) under a text name, with an integer step; "
                        "further rejected values of it are not reported\n"
                    )
                    sys.stderr.flush()
            return ""


_INF = float("inf")


def _plain(value: Any) -> bool:
    """Whether `value` goes into a columns line as it is (`_encode_batch`; a float is checked
    inline): a float of a subclass (numpy's float64), an int or bool within a float's range."""
    if isinstance(value, float):
        return True
    if type(value) is not int and type(value) is not bool:
        return False
    try:
        float(value)
    except OverflowError:  # rejected by `_encode`, in the order logged
        return False
    return True


def _step(step: Any) -> str:
    """A step as the channel writes it: an integer within SQLite's range, or null."""
    if step is None:
        return "null"
    if type(step) is not int:
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        else:
            try:
                step = operator.index(step)  # numpy integers, 0-d integer tensors
            except TypeError:
                raise StepError(f"step {step!r} is not an integer") from None
    if not STEP_MIN <= step <= STEP_MAX:
        raise StepError(f"step {step} is outside -2**63..2**63-1")
    return str(step)


class StepError(ValueError):
    """A step that cannot be recorded."""


def _reason(error: Exception) -> str:
    if isinstance(error, StepError):
        return str(error)
    if isinstance(error, OverflowError):
        return "the number is too large for a float"
    return _why(error)


def _snapshot(value: Any) -> Any:
    """`value` as it is now: a tensor or array is copied (never synced with a GPU), since the
    script may change it in place before the writer turns it into a number."""
    kind = type(value)
    if kind is float or kind is int or kind is str or kind is bool or value is None:
        return value
    detach = getattr(value, "detach", None)
    if detach is not None and callable(detach):  # a torch tensor
        try:
            return detach().clone()
        except Exception:
            return value
    if hasattr(value, "__array_interface__") and callable(getattr(value, "copy", None)):
        try:
            return value.copy()  # a numpy array (a numpy scalar is immutable: copied cheaply)
        except Exception:
            return value
    return value


def _number(value: Any) -> Any:
    """A number-like `value` (numpy scalar, 0-d array or tensor, Decimal, anything with
    `.item()` or `__float__`) as a Python number; anything else as it is."""
    item = getattr(value, "item", None)
    if item is not None and callable(item):
        try:
            got = item()
        except Exception:  # an array of more than one element
            got = None
        if type(got) in (int, float, bool):
            return got
    if hasattr(value, "__float__") and not isinstance(value, complex):
        try:
            return float(value)
        except OverflowError:  # too large for a float: the value is rejected
            raise
        except Exception:  # not a single number (a tensor of several elements)
            pass
    tolist = getattr(value, "tolist", None)
    if tolist is not None and callable(tolist):
        with contextlib.suppress(Exception):
            return tolist()
    return value


def _jsonable(value: Any) -> Any:
    """How json.dumps writes what it does not know: numbers as numbers, the rest as text."""
    number = _number(value)
    if number is not value:
        return number
    return str(value)


def load_forwarder(spec: str) -> Forwarder | None:
    """The forwarder that `spec` (`module:attribute`, EXPKIT_FORWARDER's value) names, made
    with no arguments; None, after one notice, when it cannot be had."""
    module_name, _, attribute = (part.strip() for part in spec.partition(":"))
    try:
        if not module_name or not attribute:
            raise ValueError("not module:attribute")
        import importlib

        factory: Any = importlib.import_module(module_name)
        for name in attribute.split("."):
            factory = getattr(factory, name)
        forwarder = factory()
        if not all(callable(getattr(forwarder, method, None)) for method in ("send", "close")):
            raise TypeError(f"{type(forwarder).__name__} has no send() and close()")
    except (Exception, SystemExit) as error:  # never an exception in the script
        _notice(f"{FORWARDER_ENV}={spec}: no forwarder ({_why(error)})")
        return None
    return forwarder


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _notice(text: str, recorded: bool = True) -> None:
    tail = "; metrics are recorded by expkit only" if recorded else ""
    with contextlib.suppress(Exception):
        sys.stderr.write(f"expkit: {text}{tail}\n")
        sys.stderr.flush()


_forked = False  # set in a process forked after this module was imported


def _mark_forked() -> None:
    global _forked, _context_lock
    _forked = True
    _context_lock = threading.Lock()  # another thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked)


def _child_process() -> bool:
    """True in a process the script forked or started with multiprocessing (not in the
    script's own process, nor in a rank a launcher started): it writes each call at once."""
    if _forked:
        return True
    multiprocessing = sys.modules.get("multiprocessing")
    if multiprocessing is None:
        return False
    try:
        # A process multiprocessing starts (spawn, forkserver) imports the parent's main
        # module before `parent_process()` is set, marked `_inheriting` meanwhile
        # (multiprocessing/spawn.py, `_main`): a run object the script makes at its top.
        current = multiprocessing.current_process()
        return multiprocessing.parent_process() is not None or bool(
            getattr(current, "_inheriting", False)
        )
    except Exception:
        return False


_context: ScriptRun | None = None
_context_lock = threading.Lock()


def get_context() -> ScriptRun:
    """The run this process belongs to: one object per process, created on first use."""
    global _context
    if _context is None:
        with _context_lock:
            if _context is None:
                folder = os.environ.get(CHANNEL_ENV)
                spec = os.environ.get(FORWARDER_ENV)
                forwarder = load_forwarder(spec) if spec else None
                # Locally the driver makes the channel's folder before the script starts. A
                # target that sets EXPKIT_FORWARDER (even to "", none) has its service start
                # the script, and the folder is relative to the script's (on Azure ML: inside
                # ./logs): made here, also when the forwarder could not be loaded.
                if folder and spec is not None:
                    try:
                        os.makedirs(folder, exist_ok=True)
                    except OSError:
                        folder = None
                path = None
                if folder:
                    # One file per process and attempt (a requeued job may reuse a pid): the
                    # driver records each value with the attempt its file names.
                    name = channel_file_name(process_rank(), os.getpid())
                    path = os.path.join(folder, name)
                _context = ScriptRun(os.environ.get(RUN_ID_ENV), path, forwarder)
    return _context
