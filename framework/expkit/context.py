"""The in-script API: what a training script calls to record metrics and tags.

Stdlib only and never blocking: `log()` appends to an in-memory queue, and a daemon thread
writes the queue to the run's metric channel (one append-only file per process) every few
hundred milliseconds. The driver tails that channel while the script runs. Outside expkit
the same calls do nothing harmful: they are accepted and dropped, with one notice.
"""

from __future__ import annotations

import atexit
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

    def __init__(self, run_id: str | None, channel_path: str | None) -> None:
        self.id = run_id
        self.rank = process_rank()
        self._queue: deque[tuple] = deque()
        self._put = self._queue.append
        self._path = channel_path
        self._names: dict[str, str] = {}
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._warned = False
        if channel_path:
            self._file = open(channel_path, "ab", buffering=0)  # noqa: SIM115 - lives with the run
            self._writer = threading.Thread(target=self._write_loop, name="expkit-metrics")
            self._writer.daemon = True
            self._writer.start()
            atexit.register(self.flush)

    @property
    def offline(self) -> bool:
        """True when the script runs outside expkit and nothing is recorded."""
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
            queue, lines = self._queue, []
            while queue:
                lines.append(self._encode(queue.popleft()))
                if len(lines) >= 10_000:
                    self._file.write("".join(lines).encode())
                    lines = []
            if lines:
                self._file.write("".join(lines).encode())

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


_context: ScriptRun | None = None
_context_lock = threading.Lock()


def get_context() -> ScriptRun:
    """The run this process belongs to: one object per process, created on first use."""
    global _context
    if _context is None:
        with _context_lock:
            if _context is None:
                folder = os.environ.get(CHANNEL_ENV)
                path = None
                if folder:
                    path = os.path.join(folder, f"rank-{process_rank()}.{os.getpid()}.jsonl")
                _context = ScriptRun(os.environ.get(RUN_ID_ENV), path)
    return _context
