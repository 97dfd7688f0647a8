"""A pytest plugin for people writing expkit plugins (and for expkit's own tests).

Installed with expkit (entry point `pytest11`), so its fixtures are available in any test:

    def test_my_sink_gets_metrics(expkit_workspace, register_plugin, run_job, tmp_path):
        register_plugin(MySinkPlugin(), "my-sink")
        result = run_job({"entry_script": "train.py", "metrics": ["my-sink"]},
                         script="from expkit import Run\\nRun.get_context().log('acc', 0.9)\\n")
        assert result.state == "completed"
        assert result.run.get_metrics() == {"acc": 0.9}

Fixtures: `expkit_workspace`, `expkit_plugins`, `register_plugin`, `run_job`, `expkit_cli`,
`expkit_cli_background`. Conformance checks (from `expkit.conformance`, also exported by
`expkit.plugin`): `check_compute_target`, `check_distributed_backend`, `check_metric_sink`,
`check_environment_builder`, and `assert_no_processes_left(run_id, workspace)`.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from expkit import plugins as plugin_manager
from expkit.api import Run
from expkit.conformance import (
    assert_no_processes_left,
    check_compute_target,
    check_distributed_backend,
    check_environment_builder,
    check_metric_sink,
)
from expkit.console import Console
from expkit.history import RunRecord
from expkit.procs import stop_run_processes
from expkit.workspace import Workspace

__all__ = [
    "BackgroundCLI",
    "JobResult",
    "assert_no_processes_left",
    "check_compute_target",
    "check_distributed_backend",
    "check_environment_builder",
    "check_metric_sink",
]


@dataclass
class JobResult:
    """What `run_job` returns: the final record, what the user saw, and the API's Run."""

    record: RunRecord
    output: str
    run: Run
    workspace: Workspace

    @property
    def state(self) -> str:
        return self.record.state

    @property
    def run_dir(self) -> Path:
        return self.workspace.run_dir(self.record.id)


@pytest.fixture
def expkit_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """A new, empty workspace in the test's temporary folder (also in $EXPKIT_WORKSPACE)."""
    workspace = Workspace.init(tmp_path / "workspace")
    monkeypatch.setenv("EXPKIT_WORKSPACE", str(workspace.path))
    return workspace


@pytest.fixture
def expkit_plugins() -> Any:
    """The installed plugins, freshly loaded for this test and forgotten after it."""
    plugin_manager.reset()
    loaded = plugin_manager.get_plugins()
    yield loaded
    plugin_manager.reset()


@pytest.fixture
def register_plugin(expkit_plugins: Any) -> Any:
    """`register_plugin(obj, name)`: a plugin that exists for this test only."""
    names = []

    def register(plugin: object, name: str) -> None:
        expkit_plugins.register(plugin, name)
        names.append(name)

    yield register
    for name in names:
        if expkit_plugins.pm.has_plugin(name):
            expkit_plugins.unregister(name)


@pytest.fixture
def run_job(expkit_workspace: Workspace, expkit_plugins: Any, tmp_path: Path) -> Any:
    """`run_job(spec, script=None, files=None)`: write the job's source folder, run it in-process.

    `spec` is a job spec dict (experiment defaults to "test", source_directory to a fresh
    folder holding `script` as the entry script and any extra `files` {name: text}).
    """
    from expkit import lifecycle
    from expkit.job import JobSpec

    counter = iter(range(1_000_000))

    def run(
        spec: dict[str, Any], script: str | None = None, files: dict[str, str] | None = None
    ) -> JobResult:
        spec = {"experiment": "test", **spec}
        if "source_directory" not in spec:
            source = tmp_path / f"source-{next(counter)}"
            source.mkdir()
            spec["source_directory"] = str(source)
            if script is not None:
                (source / spec.get("entry_script", "train.py")).write_text(textwrap.dedent(script))
            for name, text in (files or {}).items():
                path = source / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(textwrap.dedent(text))
        spec.setdefault("entry_script", "train.py")
        job = JobSpec.from_dict(spec, source="<test job>", base_dir=tmp_path)
        record = lifecycle.submit(expkit_workspace, job)
        stream = io.StringIO()
        final = lifecycle.drive(expkit_workspace, record.id, Console(stream), expkit_plugins)
        return JobResult(
            final, stream.getvalue(), Run(expkit_workspace, final.id), expkit_workspace
        )

    return run


@pytest.fixture
def expkit_cli(expkit_workspace: Workspace) -> Any:
    """`expkit_cli(*args, timeout=...)`: run the real `expkit` command in a subprocess."""

    def call(
        *args: str, timeout: float = 600, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "expkit", *args],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            cwd=cwd,
            env={**os.environ, "EXPKIT_WORKSPACE": str(expkit_workspace.path), **(env or {})},
            stdin=subprocess.DEVNULL,
        )

    return call


class BackgroundCLI:
    """An `expkit` command running in the background in its own session (as from a
    terminal: Ctrl-C reaches it alone), its output (stdout and stderr) read as it comes."""

    def __init__(self, args: list[str], workspace: Path, env: dict[str, str] | None = None):
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "expkit", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "EXPKIT_WORKSPACE": str(workspace), **(env or {})},
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._changed:
                self.lines.append(raw.decode("utf-8", errors="replace"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        """Everything the command printed so far."""
        with self._changed:
            return "".join(self.lines)

    @property
    def run_id(self) -> str:
        """The id of the run the command started (waits for its first line)."""
        match = self.wait_for(re.compile(r"^run (\S+) in workspace "))
        assert isinstance(match, re.Match)
        return match.group(1)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30) -> str | re.Match[str]:
        """Wait until a line holds `pattern` (a string, or a compiled regex searched in each
        line) and return that line (the match, for a regex); AssertionError with the output
        so far when it does not come within `timeout` seconds or the command ends first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if isinstance(pattern, re.Pattern):
                        found = pattern.search(line)
                        if found:
                            return found
                    elif pattern in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    shown = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
                    raise AssertionError(
                        f"{shown!r} never appeared; output:\n{''.join(self.lines)}"
                    )
                self._changed.wait(left)

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to the command (not to the processes of its run)."""
        self.proc.send_signal(signal.SIGINT)

    def terminate(self) -> None:
        """SIGTERM to the command, as `kill` or a service manager sends it."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30) -> int:
        """Wait for the command to end; returns its exit code (`output` then holds all it
        printed)."""
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        """SIGKILL the command's whole process group, if it still runs."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def expkit_cli_background(expkit_workspace: Workspace) -> Any:
    """`expkit_cli_background(*args, env=None) -> BackgroundCLI`: start `python -m expkit
    ARGS` in the background, in its own process group. At the end of the test whatever is
    left is killed, the command and every process of the workspace's runs."""
    started: list[BackgroundCLI] = []

    def start(*args: str, env: dict[str, str] | None = None) -> BackgroundCLI:
        live = BackgroundCLI(list(args), expkit_workspace.path, env)
        started.append(live)
        return live

    yield start
    for live in started:
        live.kill()
    for record in expkit_workspace.history.runs.recent(limit=1000):
        stop_run_processes(record.id, grace=1, workspace=expkit_workspace.path)
