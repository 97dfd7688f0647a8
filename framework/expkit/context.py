"""The in-script API: what a training script calls to record metrics and tags.

Stdlib only and never blocking: `log()` appends to an in-memory queue, and a daemon thread
writes the queue to the run's metric channel (one append-only file per process) every few
hundred milliseconds. The driver tails that channel while the script runs. Outside expkit
the same calls do nothing harmful: they are accepted and dropped, with one notice.

On Azure ML (AZUREML_RUN_ID is set in a run's processes) the same calls also go to the Azure
ML run, through azureml's `Run.get_context()`: azureml is imported, and each call made, on a
thread of its own, so the script never waits for it; if that fails, one notice, and the
metrics still reach expkit's channel (the `azureml` compute target brings that back).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import threading
import time
from collections import deque
from typing import Any

CHANNEL_ENV = "EXPKIT_METRICS_DIR"
RUN_ID_ENV = "EXPKIT_RUN_ID"
FLUSH_SECONDS = 0.2
AZUREML_RUN_ENV = "AZUREML_RUN_ID"  # set by Azure ML in the processes of a run on its compute
AZUREML_EXIT_SECONDS = 30.0  # at exit, how long to wait for the Azure ML run to take the rest
AZUREML_MAX_PENDING = 1_000_000  # items waiting for Azure ML beyond this are dropped (counted)

# Environment variables that launchers set for a process's global rank.
_RANK_VARS = ("RANK", "HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def process_rank() -> int:
    """This process's global rank under torchrun, Horovod or MPI; 0 when not distributed."""
    for var in _RANK_VARS:
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 0


class ScriptRun:
    """The run a training script belongs to (`Run.get_context()`)."""

    def __init__(
        self,
        run_id: str | None,
        channel_path: str | None,
        azureml: AzureMLForwarder | None = None,
    ) -> None:
        self.id = run_id
        self.rank = process_rank()
        self._queue: deque[tuple] = deque()
        self._put = self._queue.append
        self._file = None
        self._azureml = azureml
        # None when nothing records the calls (the fast check of every call)
        self._path = channel_path if channel_path or azureml is None else ""
        self._names: dict[str, str] = {}
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._warned = False
        if channel_path:
            self._file = open(channel_path, "ab", buffering=0)  # noqa: SIM115 - lives with the run
        if azureml is not None:
            azureml.before_exit = self.flush
        if self._path is not None:
            self._writer = threading.Thread(target=self._write_loop, name="expkit-metrics")
            self._writer.daemon = True
            self._writer.start()
            atexit.register(self._at_exit)

    @property
    def offline(self) -> bool:
        """True when the script runs outside expkit (and outside Azure ML): nothing is recorded."""
        return self._path is None

    # -- the calls a script makes -------------------------------------------------------
    def log(self, name: str, value: Any, step: int | None = None) -> None:
        """Record one value of metric `name` (optionally at `step`); returns at once."""
        if self._path is None:
            return self._drop()
        self._put(("m", name, value, step, time.time()))

    def log_list(self, name: str, values: list[Any]) -> None:
        """Record a list of values for `name`, stepped 0..n-1."""
        if self._path is None:
            return self._drop()
        now = time.time()
        for step, value in enumerate(values):
            self._put(("m", name, value, step, now))

    def log_row(self, name: str, **columns: Any) -> None:
        """Record one row of the table `name`, e.g. `log_row("per_class", cls=1, acc=0.9)`."""
        if self._path is None:
            return self._drop()
        self._put(("r", name, columns, None, time.time()))

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Attach tags (string key and value) to the run."""
        if self._path is None:
            return self._drop()
        self._put(("t", "", {str(k): str(v) for k, v in tags.items()}, None, time.time()))

    def tag(self, key: str, value: Any = "") -> None:
        """Attach one tag to the run."""
        self.set_tags({key: value})

    def flush(self) -> None:
        """Write everything logged so far to the channel (called at exit too)."""
        if self._path is not None:
            self._drain()

    def _at_exit(self) -> None:
        self.flush()
        if self._azureml is not None:
            self._azureml.close(AZUREML_EXIT_SECONDS)

    # -- internals ------------------------------------------------------------------------
    def _drop(self) -> None:
        if not self._warned:
            self._warned = True
            print(
                "expkit: this script is not running under expkit; metrics are not recorded",
                file=sys.stderr,
            )

    def _write_loop(self) -> None:
        while True:
            self._wake.wait(FLUSH_SECONDS)
            self._drain()

    def _drain(self) -> None:
        with self._lock:
            queue = self._queue
            while queue:
                pop = queue.popleft
                items = [pop() for _ in range(min(len(queue), 10_000))]
                if self._file is not None:
                    self._file.write("".join(map(self._encode, items)).encode())
                if self._azureml is not None:
                    self._azureml.send(items)

    def _encode(self, item: tuple) -> str:
        kind, name, value, step, ts = item
        quoted = self._names.get(name)
        if quoted is None:
            quoted = self._names[name] = json.dumps(name)
        if kind == "m" and type(value) in (int, float, bool):
            number = (
                value if value == value and value not in (float("inf"), float("-inf")) else None
            )
            if number is None:  # NaN and infinities: JSON's NaN/Infinity, still numbers when read
                return f'["m",{quoted},{json.dumps(value)},{_step(step)},{ts!r},{self.rank}]\n'
            return f'["m",{quoted},{float(number)!r},{_step(step)},{ts!r},{self.rank}]\n'
        payload = json.dumps(value, default=str)
        return f'["{kind}",{quoted},{payload},{_step(step)},{ts!r},{self.rank}]\n'


def _step(step: int | None) -> str:
    return "null" if step is None else str(int(step))


class AzureMLForwarder:
    """Sends a script's logged items to the Azure ML run it runs in, on its own thread.

    `connect` (azureml's `Run.get_context()` by default) runs on that thread: importing azureml
    takes seconds. The script's thread only hands over batches; a failure to connect or to
    send is one notice on stderr, never an exception in the script.
    """

    def __init__(self, connect: Any = None) -> None:
        self._connect = connect or _azureml_run
        self._pending: deque[tuple] = deque()
        self._wake = threading.Event()
        self._busy = True  # connecting, until the thread says otherwise
        self.run: Any = None
        self.before_exit: Any = None  # the ScriptRun's flush: hands over what is still queued
        self.dropped = 0
        self.failed: str | None = None  # why nothing more is sent
        self._noticed = False
        self._thread = threading.Thread(target=self._loop, name="expkit-azureml", daemon=True)
        self._thread.start()

    def send(self, items: list[tuple]) -> None:
        if self.failed is not None:
            return
        room = max(AZUREML_MAX_PENDING - len(self._pending), 0)
        if room < len(items):
            self.dropped += len(items) - room
            items = items[:room]
        self._pending.extend(items)
        self._wake.set()

    def close(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) until everything handed over was sent."""
        deadline = time.monotonic() + timeout
        while (self._pending or self._busy) and self.failed is None and self._thread.is_alive():
            if time.monotonic() > deadline:
                break
            self._wake.set()
            time.sleep(0.05)
        flush = getattr(self.run, "flush", None)
        if self.failed is None and callable(flush):
            try:
                flush(timeout_seconds=max(1, int(deadline - time.monotonic())))
            except Exception as error:
                self._notice(f"the Azure ML run did not take the last metrics ({error})")
        if self.dropped:
            self._notice(f"{self.dropped} values were not sent to the Azure ML run (too many)")

    def _loop(self) -> None:
        try:
            self.run = self._connect()
        except BaseException as error:  # azureml missing or broken: expkit's channel only
            self._give_up(f"cannot reach the Azure ML run ({type(error).__name__}: {error})")
            return
        if self.run is None:
            self._give_up("azureml finds no Azure ML run in this process (an offline run)")
            return
        # Registered after azureml's own exit handlers, so it runs before them (last in,
        # first out): what the script logged last is sent while azureml still takes it.
        atexit.register(self._exit)
        while True:
            while self._pending:
                item = self._pending.popleft()
                try:
                    self._send(item)
                except Exception as error:
                    self._notice(f"the Azure ML run refused {item[1]!r} ({error})")
            self._busy = False
            self._wake.wait()
            self._wake.clear()
            self._busy = True

    def _send(self, item: tuple) -> None:
        kind, name, value, step, _ = item
        if kind == "m":
            if step is None:
                self.run.log(name, value)
            else:
                self.run.log(name, value, step=step)
        elif kind == "r":
            self.run.log_row(name, **value)
        elif kind == "t":
            self.run.set_tags(value)

    def _exit(self) -> None:
        if callable(self.before_exit):
            self.before_exit()
        self.close(AZUREML_EXIT_SECONDS)

    def _give_up(self, why: str) -> None:
        self._notice(f"{why}; metrics are recorded by expkit only")  # before close() returns
        self.failed = why
        self._pending.clear()
        self._busy = False

    def _notice(self, text: str) -> None:
        if not self._noticed:  # one line, however many calls fail
            self._noticed = True
            # One write, flushed at once: azureml may fork meanwhile (a child would print a
            # half-written line again).
            with contextlib.suppress(Exception):
                sys.stderr.write(f"expkit: azureml: {text}\n")
                sys.stderr.flush()


def _azureml_run() -> Any:
    """azureml's run of this process, or None when azureml finds none (an offline run)."""
    from azureml.core import Run

    run = Run.get_context()
    return None if type(run).__name__ == "_OfflineRun" else run


_context: ScriptRun | None = None
_context_lock = threading.Lock()


def get_context() -> ScriptRun:
    """The run this process belongs to: one object per process, created on first use."""
    global _context
    if _context is None:
        with _context_lock:
            if _context is None:
                folder = os.environ.get(CHANNEL_ENV)
                azureml = None
                if os.environ.get(AZUREML_RUN_ENV):
                    # azureml's import needs this module, which cannot be imported once the
                    # interpreter shuts down: a script that ends before azureml is imported
                    # on the forwarder's thread would lose its last metrics otherwise.
                    import concurrent.futures.thread  # noqa: F401

                    azureml = AzureMLForwarder()
                if folder and azureml is not None:  # on Azure ML: a folder inside ./logs
                    try:
                        os.makedirs(folder, exist_ok=True)
                    except OSError:
                        folder = None
                path = None
                if folder:
                    path = os.path.join(folder, f"rank-{process_rank()}.{os.getpid()}.jsonl")
                _context = ScriptRun(os.environ.get(RUN_ID_ENV), path, azureml)
    return _context
