"""A pytest plugin for people writing expkit plugins (and for expkit's own tests).

Installed with expkit (entry point `pytest11`), so its fixtures are available in any test:

    def test_my_sink_gets_metrics(expkit_workspace, register_plugin, run_job, tmp_path):
        register_plugin(MySinkPlugin(), "my-sink")
        result = run_job({"entry_script": "train.py", "metrics": ["my-sink"]},
                         script="from expkit import Run\\nRun.get_context().log('acc', 0.9)\\n")
        assert result.state == "completed"
        assert result.run.get_metrics() == {"acc": 0.9}
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from expkit import plugins as plugin_manager
from expkit.api import Run
from expkit.console import Console
from expkit.history import RunRecord
from expkit.workspace import Workspace


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
        final = lifecycle.execute(expkit_workspace, record.id, Console(stream), expkit_plugins)
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
