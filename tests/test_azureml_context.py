"""The in-script API on Azure ML, and the plugin without its optional dependency.

On Azure ML the target sets EXPKIT_FORWARDER=expkit_azureml.forward:AzureMLForwarder and
uploads that module next to expkit's package, so `Run.get_context().log(...)` also goes to the
Azure ML run, through azureml's `Run.get_context()`, on a thread of its own. A real Azure ML
run cannot be had here: the forwarding is checked with a recording object in place of azureml's
Run (the service boundary), and end to end with the real azureml, in a folder staged as the
target uploads it, where (AZUREML_RUN_ID but no service) azureml finds no run; either way the
script is never slowed or broken. The generic EXPKIT_FORWARDER mechanism: test_forwarder.py.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import channel_calls
from expkit.context import ScriptRun
from expkit_azureml.forward import FORWARDER, AzureMLForwarder
from expkit_azureml.target import add_in_script_api

# azureml missing, as in an environment without `expkit[azureml]`
WITHOUT_AZUREML = """
import sys
class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name == "azureml" or name.startswith("azureml."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NotInstalled())
"""


@pytest.fixture
def script_run():
    """`script_run(channel, azure_run)`: a ScriptRun forwarding to `azure_run`; what it left
    for the end of this test process (exit handlers, pending sends) is undone after the test."""
    made = []

    def make(channel, azure_run, connect=None):
        forwarder = AzureMLForwarder(connect=connect or (lambda: azure_run))
        run = ScriptRun(None, str(channel) if channel else None, forwarder)
        made.append(run)
        return run

    yield make
    for run in made:
        atexit.unregister(run._at_exit)
        forwarder = run._forwarder
        forwarder.failed = "the test is over"
        forwarder._pending.clear()
        atexit.unregister(forwarder._exit)


class RecordingRun:
    """Stands in for azureml.core.Run where it would reach the service."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls: list[tuple] = []
        self.delay, self.fail = delay, fail
        self.flushed = False

    def log(self, name, value, step=None):
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("HTTP 503 from the run history service")
        self.calls.append(("log", name, value, step))

    def log_row(self, name, **columns):
        self.calls.append(("log_row", name, columns))

    def set_tags(self, tags):
        self.calls.append(("set_tags", tags))

    def flush(self, timeout_seconds=300):
        self.flushed = True


def test_the_script_logs_to_the_azure_ml_run_and_to_expkits_channel(tmp_path, script_run):
    azure = RecordingRun()
    channel = tmp_path / "rank-0.1.jsonl"
    run = script_run(channel, azure)
    run.log("val_acc", 0.9, step=1)
    run.log("best_val_acc", 0.95)
    run.log_list("loss", [1.0, 0.5])
    run.log_row("per_class", cls=1, acc=0.9)
    run.set_tags({"model": "resnet18"})
    run._at_exit()

    assert azure.calls == [
        ("log", "val_acc", 0.9, 1),
        ("log", "best_val_acc", 0.95, None),
        ("log", "loss", 1.0, 0),
        ("log", "loss", 0.5, 1),
        ("log_row", "per_class", {"cls": 1, "acc": 0.9}),
        ("set_tags", {"model": "resnet18"}),
    ]
    assert azure.flushed
    assert len(channel_calls(channel)) == 6  # expkit's channel has them too
    assert not run.offline


def test_without_expkits_channel_the_calls_still_reach_azure_ml(script_run):
    """A script given the forwarder but no channel (EXPKIT_METRICS_DIR unset): nothing to
    write locally, Azure gets it."""
    azure = RecordingRun()
    run = script_run(None, azure)
    run.log("acc", 1.0)
    run._at_exit()
    assert azure.calls == [("log", "acc", 1.0, None)]
    assert ScriptRun(None, None).offline


def test_a_slow_or_failing_azure_ml_run_never_slows_or_breaks_the_script(
    tmp_path, capfd, script_run
):
    slow = RecordingRun(delay=0.01)
    run = script_run(tmp_path / "c.jsonl", slow)
    started = time.perf_counter()
    for step in range(20_000):
        run.log("loss", 1.0 / (step + 1), step=step)
    assert time.perf_counter() - started < 1.0  # 20,000 calls; Azure takes 10 ms each
    run.flush()
    assert len(channel_calls(tmp_path / "c.jsonl")) == 20_000

    failing = script_run(None, RecordingRun(fail=True))
    for step in range(3):
        failing.log("acc", 0.5, step=step)
    failing._at_exit()
    err = capfd.readouterr().err
    assert err.count("expkit: azureml:") == 1  # one notice, however many calls fail
    assert "the Azure ML run refused 'acc' (HTTP 503 from the run history service)" in err


def test_azureml_that_cannot_be_imported_is_one_notice(tmp_path, capfd, script_run):
    def missing():
        raise ModuleNotFoundError("No module named 'azureml'")

    run = script_run(tmp_path / "c.jsonl", None, connect=missing)
    run.log("acc", 0.5)
    run._at_exit()
    assert len(channel_calls(tmp_path / "c.jsonl")) == 1
    err = capfd.readouterr().err
    assert err == (
        "expkit: azureml: cannot reach the Azure ML run (ModuleNotFoundError: No module named "
        "'azureml'); metrics are recorded by expkit only\n"
    )


SCRIPT = """
    import sys
    import time
    from expkit import Run
    run = Run.get_context()
    started = time.perf_counter()
    for step in range(1000):
        run.log("acc", step / 1000, step=step)
    print(f"logged in {time.perf_counter() - started:.3f}s")
    print("expkit from", sys.modules["expkit"].__file__)
    print("forwarder from", sys.modules["expkit_azureml.forward"].__file__)
    print("pluggy imported:", "pluggy" in sys.modules)
"""


def run_script(tmp_path: Path, prelude: str = "", **env: str) -> subprocess.CompletedProcess:
    """The script in a folder staged as the azureml target uploads it (expkit/ and
    expkit_azureml/forward.py beside it), with the run's variables on Azure ML."""
    add_in_script_api(tmp_path)
    script = tmp_path / "train.py"
    script.write_text(prelude + textwrap.dedent(SCRIPT))
    variables = {k: v for k, v in os.environ.items() if not k.startswith(("EXPKIT_", "AZUREML_"))}
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**variables, "EXPKIT_FORWARDER": FORWARDER, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_on_azure_ml_the_metric_channel_is_written_inside_logs(tmp_path):
    """What the azureml target sets up: EXPKIT_METRICS_DIR=logs/expkit-metrics, relative to
    the run's folder on the node, and the forwarder. The real azureml here finds no Azure ML
    run (no service): one notice, the script's output untouched (azureml's offline run would
    print each value)."""
    result = run_script(
        tmp_path, AZUREML_RUN_ID="recorded_1", EXPKIT_METRICS_DIR="logs/expkit-metrics"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("logged in ") and "Attempted to log" not in result.stdout
    # what was uploaded is what the script imported: not the installed plugin, no pluggy
    assert f"expkit from {tmp_path / 'expkit' / '__init__.py'}" in result.stdout
    assert f"forwarder from {tmp_path / 'expkit_azureml' / 'forward.py'}" in result.stdout
    assert "pluggy imported: False" in result.stdout
    assert result.stderr == (
        "expkit: azureml: azureml finds no Azure ML run in this process (an offline run); "
        "metrics are recorded by expkit only\n"
    )
    (channel,) = (tmp_path / "logs" / "expkit-metrics").glob("rank-0.*.jsonl")
    assert len(channel_calls(channel)) == 1000


def test_on_azure_ml_without_azureml_installed_the_script_still_runs(tmp_path):
    result = run_script(
        tmp_path,
        prelude=WITHOUT_AZUREML,
        AZUREML_RUN_ID="recorded_1",
        EXPKIT_METRICS_DIR="logs/expkit-metrics",
    )
    assert result.returncode == 0, result.stderr
    assert "cannot reach the Azure ML run (ModuleNotFoundError" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    (channel,) = (tmp_path / "logs" / "expkit-metrics").glob("rank-0.*.jsonl")
    assert len(channel_calls(channel)) == 1000


def test_the_target_uploads_only_the_forwarder_of_the_plugin(tmp_path):
    assert add_in_script_api(tmp_path) == []
    staged = tmp_path / "expkit_azureml"
    assert sorted(p.name for p in staged.iterdir()) == ["__init__.py", "forward.py"]
    assert (staged / "__init__.py").read_text() == ""
    forward = (staged / "forward.py").read_text()
    imports = {line.split()[1] for line in forward.splitlines() if line.startswith("import ")}
    imports |= {line.split()[1] for line in forward.splitlines() if line.startswith("from ")}
    assert all(name.split(".")[0] in sys.stdlib_module_names for name in imports - {"__future__"})
    module, _, attribute = FORWARDER.partition(":")
    assert (module, attribute) == ("expkit_azureml.forward", "AzureMLForwarder")
    # a snapshot with folders of these names keeps its own
    assert add_in_script_api(tmp_path) == ["expkit", "expkit_azureml"]


def test_the_forwarder_imports_azureml_off_the_scripts_thread():
    seen = []

    def connect():
        seen.append(threading.current_thread().name)
        return RecordingRun()

    forwarder = AzureMLForwarder(connect=connect)
    forwarder.close(5)
    atexit.unregister(forwarder._exit)
    assert seen == ["expkit-azureml"]


# -- the plugin without `expkit[azureml]` ----------------------------------------------------
def expkit_without_azureml(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    code = WITHOUT_AZUREML + "from expkit.cli import main\nraise SystemExit(main(sys.argv[1:]))\n"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if not k.startswith("EXPKIT_")},
    )


def test_expkit_plugins_shows_how_to_install_the_azure_ml_plugin():
    result = expkit_without_azureml("plugins")
    assert result.returncode == 0, result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("azureml ")]
    assert line.endswith(
        "not loaded: azureml-core and azureml-train-core are not installed; "
        "pip install 'expkit[azureml]'"
    )


def test_a_job_on_azureml_without_the_plugin_is_exit_code_2(tmp_path):
    (tmp_path / "train.py").write_text("print('hi')\n")
    (tmp_path / "job.yaml").write_text("experiment: e\nentry_script: train.py\ncompute: azureml\n")
    assert expkit_without_azureml("init", cwd=tmp_path).returncode == 0
    result = expkit_without_azureml("run", "job.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("expkit: error: job.yaml: compute: no compute target named 'azureml'")
    assert line.endswith(
        "plugin azureml did not load: azureml-core and azureml-train-core are not installed; "
        "pip install 'expkit[azureml]'"
    )


def test_the_plugin_imports_no_azureml_module():
    code = (
        "import sys, time; t = time.perf_counter(); import expkit_azureml; "
        "print(time.perf_counter() - t, sorted(m for m in sys.modules if m.startswith('azureml.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds, modules = result.stdout.split(" ", 1)
    assert modules.strip() == "[]", modules
    assert float(seconds) < 0.5
