"""Signal handlers when a second signal comes while the first one's work is under way.

The run driver's handler, when a second signal interrupts the first one's handler:

CPython runs a Python signal handler between two bytecodes of the main thread, and that may be
inside another handler: Ctrl-C and a SIGTERM sent together (a service manager that follows
up at once) run the SIGTERM handler in the middle of the SIGINT one. The handler once called
`threading.Event.set()`, which takes a lock: a second signal at that point blocked the driver
forever while the script went on training. Here the second signal is delivered at every line
of the first handler in turn (a trace function calls the handler again), on a real driver
object; each case must end at once, with the run stopping for the first signal.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from expkit import lifecycle
from expkit.console import Console
from expkit.errors import Canceled
from expkit.job import JobSpec
from expkit.lifecycle import Lifecycle, Stage

SEEN_PER_CALL = 20


def _driver(workspace: Any, plugins: Any, tmp_path: Path) -> Lifecycle:
    source = tmp_path / "src"
    source.mkdir(parents=True)
    (source / "train.py").write_text("print('hi')\n")
    job = JobSpec.from_dict(
        {"experiment": "signals", "entry_script": "train.py", "source_directory": str(source)}
    )
    record = workspace.history.runs.create(job.experiment, job.to_dict(), None, None)
    choice = lifecycle.choose(job, plugins)
    return Lifecycle(workspace, record, choice.job, choice, plugins, Console(io.StringIO()))


def _first_handler_with_a_second_at(
    driver: Lifecycle, second: signal.Signals, step: int
) -> tuple[bool, bool, BaseException | None]:
    """Run the handler for SIGINT and deliver `second` before its `step`-th line, counting
    its own lines and the first SEEN_PER_CALL lines of each function it calls (a lock taken
    there is the danger: Event.set takes one on its first line); (whether `second` came,
    whether the first handler blocked, what it raised)."""
    handler_code = Lifecycle._on_signal.__code__
    lines = 0
    came: list[bool] = []

    def counting(limit: int | None) -> Any:
        seen = 0

        def within(frame: Any, event: str, arg: Any) -> Any:
            nonlocal lines, seen
            if event == "line" and not came and (limit is None or seen < limit):
                seen += 1
                if lines == step:
                    came.append(True)
                    driver._on_signal(second, None)  # the second signal, inside the first
                lines += 1
            return within

        return within

    def calls(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is handler_code:
            return counting(None)
        caller = frame.f_back
        if caller is not None and caller.f_code is handler_code:
            return counting(SEEN_PER_CALL)
        return None

    outcome: list[BaseException | None] = []

    def first_signal() -> None:
        sys.settrace(calls)
        try:
            driver._on_signal(signal.SIGINT, None)
            outcome.append(None)
        except BaseException as raised:  # what the handler raised is the result
            outcome.append(raised)
        finally:
            sys.settrace(None)

    thread = threading.Thread(target=first_signal, daemon=True)
    thread.start()
    thread.join(10)
    return bool(came), thread.is_alive(), outcome[0] if outcome else None


@pytest.mark.parametrize("stage", [Stage.RUN, Stage.POST_PROCESS])
@pytest.mark.parametrize(
    "second", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"]
)
def test_a_second_signal_at_any_line_of_the_first_handler_is_only_noted(
    expkit_workspace, expkit_plugins, tmp_path, stage, second
):
    for step in range(500):
        driver = _driver(expkit_workspace, expkit_plugins, tmp_path / f"step-{step}")
        driver.current_stage = stage
        driver._interruptible = stage is Stage.RUN
        came, blocked, raised = _first_handler_with_a_second_at(driver, second, step)
        assert not blocked, f"the driver blocked: a second signal at step {step} of the first"
        assert driver.canceled()
        if not came:
            break  # every line of the first handler had its turn
        # The first signal to claim the run names it (the second, if it came first of all).
        assert driver.terminated_by in ("SIGINT", second.name), step
        if stage is Stage.RUN:  # the stage stops at once
            assert isinstance(raised, KeyboardInterrupt | Canceled), (step, raised)
        else:  # post-process goes on: the outputs are still sealed
            assert raised is None, (step, raised)
    else:
        pytest.fail("the first handler never ended")
    assert step > 3  # the handler and what it calls were walked line by line


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_second_signal_while_a_download_cleans_up_lets_it_finish(sig):
    """A download stopped by SIGTERM (or Ctrl-C) removes its temporary files (in the user's
    destination folder) even when the service manager sends SIGTERM again meanwhile (or the
    user presses Ctrl-C again)."""
    snippet = textwrap.dedent(
        """
        import os, signal, sys, time
        from expkit import downloads

        sig = getattr(signal, sys.argv[1])
        cleaned = []
        try:
            with downloads._signals_interrupt():
                try:
                    os.kill(os.getpid(), sig)
                    time.sleep(5)
                finally:
                    os.kill(os.getpid(), sig)  # while the temporary files go
                    time.sleep(0.1)
                    cleaned.append("tmp")
        except KeyboardInterrupt:
            print("stopped, cleaned:", cleaned)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", snippet, sig], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "stopped, cleaned: ['tmp']", result.stdout + result.stderr
    assert "temporary files" in result.stderr
