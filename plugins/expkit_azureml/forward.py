"""The in-script API's forwarder on Azure ML: a script's `Run.get_context().log(...)` also goes
to the Azure ML run it runs in, through azureml's `Run.get_context()`.

The `azureml` target names it in the run's environment variables
(EXPKIT_FORWARDER=expkit_azureml.forward:AzureMLForwarder) and uploads this file next to the
copy of expkit's package, as expkit_azureml/forward.py with an empty __init__.py (not the
whole plugin, whose __init__ needs expkit's plugin machinery). So it is standard library only
here: azureml takes seconds to import, and it is imported, and each call made, on the
forwarder's own thread; the script never waits for it, and a failure is one notice, the
metrics still reaching expkit's channel (which the target brings back).
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading
import time
from collections import deque
from typing import Any

# What EXPKIT_FORWARDER names on Azure ML (the target sets it in the run's environment).
FORWARDER = "expkit_azureml.forward:AzureMLForwarder"
EXIT_SECONDS = 30.0  # at exit, how long to wait for the Azure ML run to take the rest
MAX_PENDING = 1_000_000  # items waiting for Azure ML beyond this are dropped (counted)


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
        # azureml's import (on the thread) imports this module, whose import registers a
        # threading exit handler, refused ("can't register atexit after shutdown") once the
        # main thread has ended. A script that ends before azureml is imported there would
        # lose its last metrics: imported here, on the script's thread, while it still runs.
        import concurrent.futures.thread  # noqa: F401

        self._thread = threading.Thread(target=self._loop, name="expkit-azureml", daemon=True)
        self._thread.start()

    def send(self, items: list[tuple]) -> None:
        if self.failed is not None:
            return
        room = max(MAX_PENDING - len(self._pending), 0)
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
        self.close(EXIT_SECONDS)

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
    from azureml.core.run import Run, _OfflineRun

    run = Run.get_context()
    # isinstance: expkit's own stand-in (inscript.ExpkitRun) is an offline run too, never a
    # place to forward to
    return None if isinstance(run, _OfflineRun) else run
