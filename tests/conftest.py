"""Shared test helpers. The main fixtures (expkit_workspace, run_job, register_plugin,
expkit_cli) come from expkit's own pytest plugin, `expkit.testing`."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from expkit import plugins as plugin_manager
from expkit.procs import stop_run_processes
from expkit.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def write_job(tmp_path: Path):
    """`write_job(spec, script=..., files=...)` -> path of a job.yaml next to a source folder."""
    counter = iter(range(1000))

    def write(spec: dict, script: str | None = None, files: dict[str, str] | None = None) -> Path:
        folder = tmp_path / f"project-{next(counter)}"
        source = folder / "src"
        source.mkdir(parents=True)
        spec = {"experiment": "test", "source_directory": "src", "entry_script": "train.py", **spec}
        if script is not None:
            (source / spec["entry_script"]).write_text(textwrap.dedent(script))
        for name, text in (files or {}).items():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_text(textwrap.dedent(text))
        job = folder / "job.yaml"
        job.write_text(yaml.safe_dump(spec, sort_keys=False))
        return job

    return write


# -- processes ------------------------------------------------------------------------------
def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def eventually(check, timeout: float = 30, what: str = "condition") -> None:
    """Wait until `check()` is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(0.05)


def bare_env(*drop: str, **extra: str) -> dict[str, str]:
    """This environment without the variables `drop` (every EXPKIT_ one if none is named),
    plus `extra`."""

    def dropped(name: str) -> bool:
        return name in drop if drop else name.startswith("EXPKIT_")

    return {**{k: v for k, v in os.environ.items() if not dropped(k)}, **extra}


# -- plugins installed for a test -----------------------------------------------------------
class FakeSite:
    """A folder standing in for site-packages, into which tests install plugin distributions."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.modules: list[str] = []

    def install(self, dist: str, plugins: dict[str, str]) -> None:
        """Install `dist` 1.0 with one `expkit` entry point per {name: module source}."""
        stem = dist.replace("-", "_")
        info = self.path / f"{stem}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        lines = ["[expkit]"]
        for entry, source in plugins.items():
            module = f"{stem}_{entry.replace('-', '_')}"
            (self.path / f"{module}.py").write_text(textwrap.dedent(source))
            lines.append(f"{entry} = {module}")
            self.modules.append(module)
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")

    @property
    def env(self) -> dict[str, str]:
        """The environment that makes a subprocess (the `expkit` command) see this folder."""
        paths = [str(self.path), os.environ.get("PYTHONPATH", "")]
        return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fake site-packages folder on this process's path; forgotten (modules too) afterwards."""
    folder = tmp_path / "site-packages"
    folder.mkdir()
    fake = FakeSite(folder)
    monkeypatch.syspath_prepend(str(folder))
    plugin_manager.reset()
    yield fake
    plugin_manager.reset()
    for module in fake.modules:
        sys.modules.pop(module, None)


# -- files ----------------------------------------------------------------------------------
def read_only(path: Path) -> bool:
    return not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


# -- the expkit command ---------------------------------------------------------------------
def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a failing command printed on stderr (and nothing like a traceback)."""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("expkit: error: ")
    return lines[0]


class Live:
    """An `expkit` command in its own session (as from a terminal), running in the background;
    its output is read as it comes."""

    def __init__(self, args: list[str], workspace: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "expkit", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "EXPKIT_WORKSPACE": str(workspace)},
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            with self._changed:
                self.lines.append(raw.decode("utf-8", errors="replace"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    @property
    def run_id(self) -> str:
        self.wait_for(" in workspace ")
        return re.search(r"^run (\S+) in workspace ", self.output, re.M).group(1)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(text in line for line in self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(f"{text!r} never appeared; output:\n{''.join(self.lines)}")
                self._changed.wait(left)

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def background(expkit_workspace: Workspace):
    """`background(*args)`: start `expkit ARGS`; whatever is left is killed at the end."""
    started: list[Live] = []

    def start(*args: str) -> Live:
        live = Live(list(args), expkit_workspace.path)
        started.append(live)
        return live

    yield start
    for live in started:
        live.kill()
    for record in expkit_workspace.history.runs.recent(limit=1000):
        stop_run_processes(record.id, grace=1, workspace=expkit_workspace.path)
