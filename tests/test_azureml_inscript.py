"""Azure ML's in-script API inside an expkit run: a script written for Azure ML, unchanged,
records its metrics, tables, tags, images and files into the expkit run (expkit_azureml.inscript,
installed by the import hook on azureml.core.run). On Azure ML azureml's own run is untouched;
without azureml (or with the plugin disabled) nothing changes.

The scripts run through the real `expkit run` with the real azureml-core (seconds to import:
the scripts do much each, so that there are few of them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import yaml

from expkit import importhooks
from expkit.api import Model
from expkit.api import Run as ExpkitRunRecord
from expkit.workspace import Workspace

AZUREML_SCRIPT = """
import os
import sys
from azureml.core.run import Run, _OfflineRun
from azureml.core import Run as CoreRun

run = Run.get_context()
assert CoreRun.get_context() is run, "one run per process"
print("type", type(run).__name__, "offline", isinstance(run, _OfflineRun))
print("id", run.id, "experiment", run.experiment.name)
print("offline-id", run.id.startswith("OfflineRun"))
for epoch in range(3):
    run.log("loss", 1.0 / (epoch + 1))
run.log("val_acc", 0.5, step=7)
run.log("best_val_acc", 0.93)
run.log_list("accuracies", [0.1, 0.2, 0.3])
run.log_row("per_class", cls=1, acc=0.9)
run.log_row("per_class", cls=2, acc=0.8)
run.log_table("curve", {"epoch": [1, 2], "loss": [0.5, 0.4]})
run.tag("model", "resnet")
run.set_tags({"lr": 0.01, "empty": None})
print("tags", sorted(run.get_tags().items()))

with open("weights.bin", "wb") as f:
    f.write(b"w" * 10)
run.upload_file("outputs/model/weights.bin", "weights.bin")
run.upload_file(name="config.txt", path_or_stream=open("weights.bin", "rb"))
os.makedirs("plots/sub", exist_ok=True)
open("plots/sub/a.txt", "w").write("a")
run.upload_folder("plots", "plots")
run.upload_file("../escape.txt", "weights.bin")

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
plt.plot([1, 2, 3])
run.log_image("loss curve", plot=plt)
plt.savefig("confusion.png")
run.log_image("confusion", path="confusion.png")

run.log_table("not_columns", 5)
run.set_tags("not a dict")
run.register_model("model", "outputs/model")
run.register_model("model", "outputs/model")
metrics = run.get_metrics()
print("metrics", metrics["best_val_acc"], metrics["loss"], metrics["per_class"])
print("one metric", run.get_metrics("val_acc"), "recursive", list(run.get_metrics(recursive=True)))
print("datasets", run.input_datasets, run.output_datasets)
run.log_confusion_matrix("cm", {"schema_type": "confusion_matrix"})
run.parent.log("from_parent", 1.0)
print("workspace", run.experiment.workspace)
try:
    run.no_such_method
except AttributeError:
    print("no_such_method raises AttributeError")
run.complete()
print("done")
"""


def write_job(folder: Path, script: str, **spec: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.py").write_text(textwrap.dedent(script))
    job = folder / "job.yaml"
    spec = {"experiment": "aztest", "source_directory": ".", "entry_script": "train.py", **spec}
    job.write_text(yaml.safe_dump(spec))
    return job


@pytest.fixture(scope="module")
def azureml_run(tmp_path_factory):
    """The Azure ML script above run once by `expkit run`: (result, workspace path, run id)."""
    folder = tmp_path_factory.mktemp("azureml-inscript")
    job = write_job(folder / "src", AZUREML_SCRIPT, model={"name": "aztest-model"})
    workspace = Workspace.init(folder / "ws").path
    env = {**os.environ, "EXPKIT_WORKSPACE": str(workspace)}
    env.pop(importhooks.HOOKS_ENV, None)
    result = subprocess.run(
        [sys.executable, "-m", "expkit", "run", str(job)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=folder,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result, workspace, "aztest_1"


def expkit(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "expkit", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "EXPKIT_WORKSPACE": str(workspace)},
    )


def test_the_issue_script_metrics_reach_expkit_metrics_and_get_metrics(azureml_run):
    # The issue: `Run.get_context().log(...)` ran to completed with every metric dropped.
    result, workspace, run_id = azureml_run
    assert "Attempted to log scalar" not in result.stdout
    shown = expkit(workspace, "metrics", run_id)
    assert shown.returncode == 0, shown.stderr
    assert "no metrics" not in shown.stdout
    assert "best_val_acc" in shown.stdout and "0.93" in shown.stdout
    metrics = ExpkitRunRecord(_workspace(workspace), run_id).get_metrics()
    assert metrics["best_val_acc"] == 0.93
    assert metrics["loss"] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert metrics["accuracies"] == [0.1, 0.2, 0.3]
    assert metrics["per_class"] == {"cls": [1, 2], "acc": [0.9, 0.8]}
    assert metrics["curve"] == {"epoch": [1, 2], "loss": [0.5, 0.4]}
    assert metrics["from_parent"] == 1.0  # run.parent is the run itself
    # and the registered model's lineage has them
    model = Model(_workspace(workspace), "aztest-model")
    assert model.lineage["run_id"] == run_id
    assert model.lineage["metrics"]["best_val_acc"] == 0.93


def test_steps_and_lists_keep_their_steps(azureml_run):
    _, workspace, run_id = azureml_run
    history = _workspace(workspace).history
    rows = {(r["name"], r["step"]) for r in history.metrics.of(run_id, None)}
    assert ("val_acc", 7) in rows
    assert {("accuracies", 0), ("accuracies", 1), ("accuracies", 2)} <= rows


def test_the_run_is_the_expkit_run_and_still_an_offline_run_to_azureml(azureml_run):
    result, _, _ = azureml_run
    out = result.stdout
    assert "type ExpkitRun offline True" in out
    assert "id aztest_1 experiment aztest" in out
    assert "offline-id False" in out
    assert "no_such_method raises AttributeError" in out
    assert "done" in out


def test_tags_are_recorded_and_get_tags_returns_what_was_set(azureml_run):
    result, workspace, run_id = azureml_run
    assert "tags [('empty', ''), ('lr', '0.01'), ('model', 'resnet')]" in result.stdout
    tags = ExpkitRunRecord(_workspace(workspace), run_id).get_tags()
    assert {"model": "resnet", "lr": "0.01", "empty": ""}.items() <= tags.items()
    assert tags["image.loss curve"] == "outputs/loss_curve.png"
    assert tags["image.confusion"] == "outputs/confusion.png"


def test_uploaded_files_and_images_are_sealed_outputs(azureml_run):
    _, workspace, run_id = azureml_run
    outputs = _workspace(workspace).history.outputs.of(run_id)
    assert outputs["model/weights.bin"][0] == 10
    assert outputs["config.txt"][0] == 10  # from a stream
    assert "plots/sub/a.txt" in outputs
    assert "loss_curve.png" in outputs and "confusion.png" in outputs
    assert not any("escape" in name for name in outputs)
    shown = expkit(workspace, "runs", "show", run_id)
    assert "model/weights.bin" in shown.stdout


def test_unsupported_calls_are_one_notice_each_never_an_exception(azureml_run):
    result, _, _ = azureml_run
    notices = [line for line in result.stdout.splitlines() if "expkit: azureml:" in line]
    notices += [line for line in result.stderr.splitlines() if "expkit: azureml:" in line]
    register = [n for n in notices if "Run.register_model()" in n]
    assert len(register) == 1, notices  # called twice, said once
    assert "is not supported in an expkit run outside Azure ML; ignored" in register[0]
    assert not any("Run.get_metrics()" in n for n in notices)
    assert any("Run.log_confusion_matrix()" in n for n in notices)
    assert any("Run.experiment.workspace" in n for n in notices)
    assert any("'../escape.txt' is not a path inside outputs/" in n for n in notices)
    assert "metrics 0.93 [1.0, 0.5, 0.3333333333333333] {'cls': [1, 2], 'acc': [0.9, 0.8]}" in (
        result.stdout
    )
    assert "one metric {'val_acc': 0.5} recursive ['aztest_1']" in result.stdout
    assert "datasets {} {}" in result.stdout
    assert any("Run.input_datasets is {}" in n for n in notices)
    # not supported: expkit's notice alone, not also azureml's offline "Attempted to log"
    assert "Attempted to log" not in result.stdout
    # a bad argument to a recording call: one notice, the script goes on
    assert any("Run.log_table() failed (AttributeError" in n for n in notices)
    assert any("Run.set_tags() failed (AttributeError" in n for n in notices)


def _workspace(path: Path) -> Workspace:
    return Workspace(path)


# -- nothing changes where it must not ------------------------------------------------------
def test_with_the_plugin_disabled_azureml_stays_offline(tmp_path):
    job = write_job(
        tmp_path / "src",
        """
        from azureml.core.run import Run
        run = Run.get_context()
        print("type", type(run).__name__)
        run.log("best_val_acc", 0.93)
        """,
    )
    env = {**os.environ, "EXPKIT_WORKSPACE": str(Workspace.init(tmp_path / "ws").path)}
    env["EXPKIT_DISABLE_PLUGINS"] = "azureml"
    result = subprocess.run(
        [sys.executable, "-m", "expkit", "run", str(job)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "type _OfflineRun" in result.stdout
    assert "Attempted to log scalar metric best_val_acc" in result.stdout


def test_without_azureml_the_plugin_names_no_import_hook():
    # azureml missing, as in an environment without `expkit[azureml]`
    code = textwrap.dedent(
        """
        import sys
        class _NotInstalled:
            def find_spec(self, name, path=None, target=None):
                if name == "azureml" or name.startswith("azureml."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, _NotInstalled())
        from expkit.plugins import get_plugins
        print("hooks", get_plugins().import_hooks())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "azureml" not in result.stdout.split("hooks", 1)[1]


def test_with_azureml_the_plugin_names_its_import_hook(expkit_plugins):
    hooks = expkit_plugins.import_hooks()
    assert hooks["azureml.core.run"] == ["expkit_azureml.inscript:install"]


def _stand_in_module(returns: str):
    """azureml.core.run's shape where it meets the service: Run.get_context() gives azureml's
    run on Azure ML ("azure"), its _OfflineRun elsewhere ("offline")."""
    module = types.ModuleType("azureml.core.run")

    class RunEnvironmentException(Exception):
        pass

    class _OfflineRun:
        def __init__(self, run_id=None, **kwargs):
            self._run_id = run_id or "OfflineRun_x"

        @property
        def id(self):
            return self._run_id

    calls: list[tuple] = []

    class Run:
        @classmethod
        def get_context(cls, allow_offline=True, used_for_context_manager=False, **kwargs):
            calls.append((allow_offline, used_for_context_manager))
            if returns == "azure":
                return "the Azure ML run"
            if not allow_offline:
                raise RunEnvironmentException()
            return _OfflineRun()

        def register_model(self, name, path):
            raise AssertionError("reached the service")

    module.Run, module._OfflineRun, module.calls = Run, _OfflineRun, calls
    module.RunEnvironmentException = RunEnvironmentException
    return module


def test_on_azure_ml_the_real_run_is_untouched(monkeypatch):
    from expkit_azureml import inscript

    monkeypatch.setenv("EXPKIT_RUN_ID", "exp_3")
    module = _stand_in_module("azure")
    inscript.install(module)
    inscript.install(module)  # twice: still one wrapper
    assert module.Run.get_context() == "the Azure ML run"
    assert module.Run.get_context(used_for_context_manager=True) == "the Azure ML run"
    assert module.calls == [(True, False), (True, True)]


def test_outside_an_expkit_run_azureml_s_offline_run_is_returned(monkeypatch):
    from expkit_azureml import inscript

    monkeypatch.delenv("EXPKIT_RUN_ID", raising=False)
    module = _stand_in_module("offline")
    inscript.install(module)
    assert type(module.Run.get_context()) is module._OfflineRun


def test_in_an_expkit_run_allow_offline_false_is_the_expkit_run(monkeypatch):
    from expkit_azureml import inscript

    monkeypatch.setenv("EXPKIT_RUN_ID", "my_exp_12")
    module = _stand_in_module("offline")
    inscript.install(module)
    run = module.Run.get_context(allow_offline=False)
    assert isinstance(run, module._OfflineRun) and type(run).__name__ == "ExpkitRun"
    assert run.id == "my_exp_12" and run.experiment.name == "my_exp"
    assert module.Run.get_context() is run


def test_the_azure_ml_forwarder_never_forwards_to_expkit_s_stand_in():
    # Were the hook and the Azure ML forwarder ever in one process, off Azure ML, the
    # forwarder must see an offline run (nothing to forward to), not loop back into expkit.
    code = textwrap.dedent(
        """
        import azureml.core.run as module
        from expkit_azureml import forward, inscript
        inscript.install(module)
        print("stand-in:", type(module.Run.get_context()).__name__)
        print("forwards to:", forward._azureml_run())
        """
    )
    env = {**os.environ, "EXPKIT_RUN_ID": "fwd_1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "stand-in: ExpkitRun" in result.stdout
    assert "forwards to: None" in result.stdout
