"""Shared test helpers. The main fixtures (expkit_workspace, run_job, register_plugin,
expkit_cli) come from expkit's own pytest plugin, `expkit.testing`."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from expkit import plugins as plugin_manager

REPO = Path(__file__).resolve().parents[1]

# OpenMP threads that wait for work sleep instead of spinning, in this process and in every
# process the tests start (scripts, drivers, Slurm's and horovodrun's ranks inherit it). With
# the default (spinning) policy, two trainings sharing 2 cores, or one beside other busy
# processes, spend their time spinning: one epoch of the sample job took 134 s instead of 24 s
# (GNU libgomp: https://gcc.gnu.org/onlinedocs/libgomp/OMP_005fWAIT_005fPOLICY.html). It
# changes no result, and OMP_NUM_THREADS, which expkit's launchers set, is left alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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


def channel_calls(path: Path) -> list[tuple]:
    """The calls a metric channel file records (`expkit.channel`): a line each, a columns
    line's values one by one."""
    from expkit.channel import calls_in

    return list(calls_in(path))


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


@pytest.fixture
def background(expkit_cli_background):
    """`background(*args)`: start `expkit ARGS` (expkit.testing's `expkit_cli_background`)."""
    return expkit_cli_background


# -- a private Slurm cluster ----------------------------------------------------------------
SLURM_INSTALL = "`bash .ci/install` as root (apt-get install slurmctld slurmd slurm-client munge)"


def _dev_cluster(nodes: int):
    """Start a DevCluster of `nodes` nodes (2 CPUs, 2048 MB each) in a fresh folder under /tmp
    (munged needs every folder above its socket searchable by all, which pytest's tmp_path is
    not); yield it, then stop it and remove the folder. Slurm missing: skip, or fail in CI."""
    from expkit_slurm.devcluster import DevCluster, missing_programs

    missing = missing_programs()
    if missing:
        message = f"Slurm is not installed ({', '.join(missing)} missing): run {SLURM_INSTALL}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    folder = Path(tempfile.mkdtemp(prefix=f"expkit-slurm{nodes}-", dir="/tmp"))
    folder.chmod(0o755)  # made here, for the cluster alone
    cluster = DevCluster(folder, nodes=nodes, cpus_per_node=2, memory_mb=2048)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def _slurm_session():
    yield from _dev_cluster(1)


@pytest.fixture(scope="session")
def _slurm_session2():
    yield from _dev_cluster(2)


def _use_cluster(cluster, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    try:
        yield cluster
    finally:
        cluster.cancel_all()


@pytest.fixture
def slurm_cluster(_slurm_session, monkeypatch: pytest.MonkeyPatch):
    """A private Slurm cluster of one node `n1` (2 CPUs, 2048 MB) shared by the whole session:
    SLURM_CONF names it for the test (and the commands it starts); every job left is cancelled
    after the test, so each test starts with an empty queue. Partitions: `debug` (default) and
    `small` (n1 only, 10 minutes at most)."""
    yield from _use_cluster(_slurm_session, monkeypatch)


@pytest.fixture
def slurm_cluster2(_slurm_session2, monkeypatch: pytest.MonkeyPatch):
    """As `slurm_cluster`, with two simulated nodes `n1` and `n2` of 2 CPUs each (both this
    machine at 127.0.0.1): `srun -N2` puts the first ranks on n1, the next on n2."""
    yield from _use_cluster(_slurm_session2, monkeypatch)
