"""Start-up stays light: what each command imports, and what a training script pays for
`from expkit import Run`.

The time itself is measured by benchmarks/bench_core.py; these tests pin down the behaviour
that keeps it low, by the modules a real process holds when it exits: `expkit --help` reads no
YAML and loads no plugin; `expkit run` of a local job imports no module of a plugin capability
the job does not use (MLflow's client, the exporters, Azure ML's stage helpers) and none of the
heavy libraries; a script in a run imports none of the driver's bookkeeping (SQLite, YAML,
pluggy). Each check has a positive control, so that a renamed module cannot make it pass.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import expkit
from expkit.cli.entry import GROUPS, build_parser, main, subcommands

# Runs the `expkit` command in this interpreter and writes sorted(sys.modules) at its exit to
# the file named by the first argument.
WITH_MODULES = """
import atexit, json, sys
out = sys.argv[1]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["expkit", *sys.argv[2:]]
from expkit.cli import main
sys.exit(main())
"""

# Libraries a local no-op job never needs (seconds to import, some of them).
LIBRARIES = ("mlflow", "torch", "optuna", "azureml.core", "tensorboard", "onnx", "onnxruntime")
# Modules of capabilities a local job without sinks, exports or registries does not use.
UNUSED_CAPABILITIES = (
    "expkit_mlflow.sink",
    "expkit_mlflow.registry",
    "expkit_mlflow.exporter",
    "expkit_mlflow.tracking",
    "expkit_azureml.importer",
    "expkit_azureml.registry",
    "expkit_azureml.cluster",
    "expkit_azureml.monitor",
    "expkit_azureml.submission",
    "expkit_onnx.exporter",
    "expkit_torchscript.exporter",
    "expkit_tensorboard.sink",
    "urllib.request",  # the HTTP client MLflow's tracking helpers import
    "http.client",
)
# What only some runs use (exports, model registration, data downloads, sweeps, plots), what
# the plugin scan imports (importlib.metadata, with email and zipfile; socket for a host name)
# once it is remembered, PyYAML once the job file was read before (expkit.yamlcache), and the
# thread pool (with logging) that only a snapshot reading many bytes uses: a local no-op run
# imports none of them.
UNUSED_BY_A_NOOP_RUN = (
    "expkit.exports",
    "expkit.exportkit",
    "expkit.registry",
    "expkit.modelrefs",
    "expkit.downloads",
    "expkit.sweeps",
    "expkit.plot",
    "importlib.metadata",
    "email",
    "zipfile",
    "socket",
    "yaml",
    "concurrent.futures",
    "logging",
)
# The driver's bookkeeping, which neither `expkit --help` nor a training script needs.
BOOKKEEPING = (
    "yaml",
    "pluggy",
    "sqlite3",
    "importlib.metadata",
    "expkit.plugins",
    "expkit.lifecycle",
    "expkit.history",
    "expkit.job",
)


def imported(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """Those of `names` that are in `modules`, a package counted with its submodules."""
    return sorted({m for m in modules for name in names if m == name or m.startswith(f"{name}.")})


def installed(plugin_package: str, needs: str) -> bool:
    """Whether the built-in plugin `plugin_package` can load here (its library is installed)."""
    return importlib.util.find_spec(needs) is not None and bool(
        importlib.util.find_spec(plugin_package)
    )


@pytest.fixture
def modules_of(tmp_path: Path, expkit_workspace):
    """`modules_of(*args, cwd=...)`: the modules `expkit ARGS` held at its exit (it must
    succeed)."""
    counter = iter(range(1000))

    def run(*args: str, cwd: Path | None = None) -> set[str]:
        out = tmp_path / f"modules-{next(counter)}.json"
        done = subprocess.run(
            [sys.executable, "-c", WITH_MODULES, str(out), *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            env={**os.environ, "EXPKIT_WORKSPACE": str(expkit_workspace.path)},
            stdin=subprocess.DEVNULL,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return set(json.loads(out.read_text()))

    return run


@pytest.fixture
def bare_modules() -> set[str]:
    """What this interpreter imports at start-up by itself (site, .pth files)."""
    done = subprocess.run(
        [sys.executable, "-c", "import json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(done.stdout))


# -- expkit --help -------------------------------------------------------------------------------
def test_expkit_help_reads_no_yaml_and_loads_no_plugin(modules_of, bare_modules):
    modules = modules_of("--help") - bare_modules

    assert "expkit.cli.entry" in modules
    assert imported(modules, BOOKKEEPING) == []
    assert [m for m in modules if m.startswith("expkit_")] == []  # no plugin package


def test_a_command_imports_the_parser_of_its_own_group_only(modules_of):
    modules = modules_of("init", "--help")

    assert "expkit.cli.workspace" in modules
    others = [f"expkit.cli.{group}" for group in GROUPS if group != "workspace"]
    assert sorted(set(others) & modules) == []


# -- expkit run of a local job -------------------------------------------------------------------
def test_a_local_run_imports_no_unused_capability_and_no_heavy_library(modules_of, write_job):
    job = write_job({}, script="print('noop')\n")

    modules = modules_of("run", str(job), "--quiet")

    assert "expkit.lifecycle" in modules and "expkit_local.target" in modules
    assert imported(modules, LIBRARIES) == []
    assert imported(modules, UNUSED_CAPABILITIES) == []


def test_a_local_noop_run_imports_nothing_it_does_not_use(
    modules_of, write_job, tmp_path, monkeypatch
):
    """Once the plugin scan and the job's YAML are remembered (the first run stores them), a
    run of a job without exports, model or data imports neither their modules, nor
    importlib.metadata, nor PyYAML."""
    from expkit.entrycache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    job = write_job({}, script="print('noop')\n")
    first = modules_of("run", str(job), "--quiet")

    modules = modules_of("run", str(job), "--quiet")

    assert "importlib.metadata" in first and "yaml" in first  # the control: read, then stored
    assert "expkit.lifecycle" in modules and "expkit_local.target" in modules
    assert imported(modules, UNUSED_BY_A_NOOP_RUN) == []


def test_the_modules_named_here_exist():
    """The control of the checks here: a renamed module would make them pass for nothing."""
    names = (*UNUSED_CAPABILITIES, *BOOKKEEPING, *UNUSED_BY_A_NOOP_RUN)
    for name in (*names, "expkit.cli.entry", "expkit.context"):
        assert importlib.util.find_spec(name) is not None, name


@pytest.mark.skipif(
    not (installed("expkit_mlflow", "mlflow") and installed("expkit_azureml", "azureml.core")),
    reason="the mlflow and azureml plugins need their libraries (pip install 'expkit[dev]')",
)
def test_expkit_plugins_collects_every_kind_and_imports_their_modules(modules_of):
    modules = modules_of("plugins")

    collected = (
        "expkit_mlflow.sink",
        "expkit_mlflow.registry",
        "expkit_mlflow.exporter",
        "expkit_azureml.importer",
        "expkit_azureml.registry",
        "expkit_torchscript.exporter",
        "expkit_tensorboard.sink",
    )
    assert imported(modules, collected) == sorted(collected)
    assert imported(modules, LIBRARIES) == []  # listing a plugin does not import its library


# -- a training script -----------------------------------------------------------------------
SCRIPT_RECORDING_ITS_MODULES = """
import json, os, sys
from expkit import Run

run = Run.get_context()
run.log("loss", 0.5)
os.makedirs("outputs", exist_ok=True)
with open("outputs/modules.json", "w") as out:
    json.dump(sorted(sys.modules), out)
"""


def test_a_script_in_a_run_imports_none_of_the_drivers_bookkeeping(run_job, bare_modules):
    result = run_job({}, script=SCRIPT_RECORDING_ITS_MODULES)

    assert result.state == "completed", result.output
    modules = set(json.loads((result.run_dir / "outputs" / "modules.json").read_text()))
    modules -= bare_modules
    assert "expkit.context" in modules and "expkit.importhooks" in modules  # in a run, hooked
    assert imported(modules, BOOKKEEPING) == []
    assert imported(modules, LIBRARIES) == []
    assert result.run.get_metrics()["loss"] == 0.5


# Writes the modules this process holds before it imports anything, with what start-up loaded
# only (os and sys).
SCRIPT_RECORDING_ITS_START = """
import os, sys
os.makedirs("outputs", exist_ok=True)
with open(os.path.join("outputs", "modules.txt"), "w") as out:
    out.write("\\n".join(sorted(sys.modules)))
"""
# What a Python process would import for the import hooks alone if they used the usual tools
# (typing, pathlib, importlib.util with contextlib and collections, re): ~3 ms at the start of
# every process of a run with an editable install, ~16 ms with a wheel's.
HOOK_START_UP = ("typing", "pathlib", "importlib.util", "contextlib", "collections", "re")


def test_the_import_hooks_cost_a_runs_processes_no_heavy_module(run_job, tmp_path):
    bare_run = tmp_path / "bare"
    bare_run.mkdir()
    (bare_run / "start.py").write_text(SCRIPT_RECORDING_ITS_START)
    subprocess.run([sys.executable, "start.py"], cwd=bare_run, check=True, timeout=60)
    bare = set((bare_run / "outputs" / "modules.txt").read_text().split())

    result = run_job({}, script=SCRIPT_RECORDING_ITS_START)

    assert result.state == "completed", result.output
    hooked = set((result.run_dir / "outputs" / "modules.txt").read_text().split())
    assert "expkit.importhooks" in hooked  # the control: the hooks are installed
    assert imported(hooked - bare, HOOK_START_UP) == []


# -- the command table -------------------------------------------------------------------------
def test_the_command_table_names_each_groups_commands():
    full = {command.split()[1] for command, _, _ in subcommands(build_parser())}

    assert full == {word for words in GROUPS.values() for word in words}
    for group, words in GROUPS.items():
        for word in words:
            alone = {command.split()[1] for command, _, _ in subcommands(build_parser(word))}
            assert alone == set(words), group


def test_a_commands_parser_alone_is_the_same_as_in_the_whole_parser():
    whole = {command: (sub, line) for command, sub, line in subcommands(build_parser())}
    for words in GROUPS.values():
        for command, sub, line in subcommands(build_parser(words[0])):
            assert sub.format_help() == whole[command][0].format_help(), command
            assert line == whole[command][1], command


@pytest.mark.parametrize(
    "argv",
    [["--help", "run"], ["--debug", "--help"], ["--workspace", "w", "--help", "runs"]],
)
def test_help_before_the_command_lists_every_command(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(argv)

    assert done.value.code == 0
    for words in GROUPS.values():
        for word in words:
            assert f"\n    {word} " in out.getvalue(), word


def test_global_options_before_the_command_reach_it(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--workspace", "w", "--debug", "plugins", "--help"])

    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: expkit plugins")


# -- capabilities are collected by kind, when used --------------------------------------------
class Counting:
    """A plugin that supplies nothing and counts the calls of two capability hooks."""

    def __init__(self) -> None:
        self.calls = {"compute_targets": 0, "exporters": 0}

    @expkit.hookimpl
    def expkit_compute_targets(self):
        self.calls["compute_targets"] += 1
        return []

    @expkit.hookimpl
    def expkit_exporters(self):
        self.calls["exporters"] += 1
        return []


def test_a_kinds_hooks_are_called_once_and_only_when_a_command_uses_it(
    expkit_plugins, register_plugin, run_job
):
    counting = Counting()
    register_plugin(counting, "counting")

    first = run_job({}, script="print('one')\n")
    second = run_job({}, script="print('two')\n")

    assert first.state == second.state == "completed"
    assert counting.calls == {"compute_targets": 1, "exporters": 0}
    assert "torchscript" in expkit_plugins.all("exporters")
    assert counting.calls == {"compute_targets": 1, "exporters": 1}


class TwinExporter:
    """Supplies an exporter named like a built-in one."""

    @expkit.hookimpl
    def expkit_exporters(self):
        from expkit_torchscript.exporter import TorchScriptExporter

        return [TorchScriptExporter()]


def test_a_name_conflict_fails_the_jobs_using_that_kind_only(
    expkit_plugins, register_plugin, run_job
):
    register_plugin(TwinExporter(), "twin")

    result = run_job({}, script="print('no export')\n")

    assert result.state == "completed", result.output
    conflicts = expkit_plugins.conflicts
    assert len(conflicts) == 1
    assert "exporter 'torchscript' is supplied by two plugins" in conflicts[0]
    with pytest.raises(expkit.UserError, match="supplied by two plugins"):
        expkit_plugins.get("exporters", "onnx")
