"""Importing Azure ML jobs: the seed's own estimator code (training/azureml/) run offline by the
`azureml` job importer and turned into expkit job specs, then run here."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from expkit.errors import UserError
from expkit.job import JobSpec, apply_override

pytest.importorskip("azureml.core")
pytest.importorskip("azureml.train")

from expkit_azureml import job_from_azureml
from expkit_azureml.importer import AzureMLImporter
from expkit_azureml.target import AzureMLTarget
from test_azureml_submission import BY_DESIGN, compare, estimator_config, expkit_config

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
TRAINING = REPO / "training"
SAMPLES = TRAINING / "azureml"
ARGS = {"num_epochs": 30, "output_dir": "./outputs"}


def import_job(ref: str, **options: str) -> dict:
    return AzureMLImporter().import_job(ref, options)


def test_the_seeds_estimator_becomes_a_job_spec(capsys):
    raw = import_job(f"{SAMPLES}/seed_estimator.py:estimator")
    assert raw == {
        "experiment": "pytorch-birds",  # Experiment(ws, name=experiment_name)
        "source_directory": str(TRAINING),
        "entry_script": "pytorch_train.py",
        "args": ARGS,
        "environment": {"pip": ["pillow==5.4.1"]},  # the user's packages, not the framework's
        "compute": {  # the get-or-create's provisioning configuration
            "target": "azureml",
            "options": {"cluster": "gpucluster", "vm_size": "STANDARD_NC6", "max_nodes": 4},
        },
        "resources": {"nodes": 1, "processes_per_node": 1, "gpus_per_node": 1},  # use_gpu
        "distributed": "none",
    }
    out, err = capsys.readouterr()
    assert out == ""  # stdout may be the job spec: the module's prints go to stderr
    assert "Creating a new compute target..." in err

    # What expkit submits for the imported job is the estimator's submission (the by-design
    # differences aside), and the job is one the azureml target takes.
    job = JobSpec.from_dict(raw, base_dir=REPO)
    AzureMLTarget().check(job)
    theirs = estimator_config(
        compute_target="gpucluster", use_gpu=True, pip_packages=["pillow==5.4.1"]
    )
    compare(expkit_config(job), theirs, BY_DESIGN)


def test_the_seeds_distributed_estimator_becomes_a_horovod_job():
    raw = import_job(f"{SAMPLES}/seed_estimator_horovod.py:estimator", experiment="birds-hvd")
    assert raw["experiment"] == "birds-hvd"
    assert raw["distributed"] == "horovod"  # MpiConfiguration()
    assert raw["resources"] == {"nodes": 2, "processes_per_node": 1, "gpus_per_node": 1}
    assert raw["environment"] == "inherit"  # the estimator's own horovod 0.18 is not carried
    assert raw["compute"]["options"]["cluster"] == "gpucluster"
    JobSpec.from_dict(raw, base_dir=REPO)


def test_a_script_run_config_with_pytorch_configuration_becomes_a_torchrun_job():
    raw = import_job(f"{SAMPLES}/script_run_config.py:src")
    assert raw == {
        "experiment": "script_run_config",  # no Experiment in the file: its name
        "source_directory": str(TRAINING),
        "entry_script": "pytorch_train.py",
        "args": ARGS,
        "environment": {"pip": ["pillow", "torch==2.14.1", "torchvision==0.29.1"]},
        "compute": {"target": "azureml", "options": {"cluster": "gpu-cluster"}},
        "resources": {"nodes": 2, "processes_per_node": 4, "gpus_per_node": 4},  # a GPU image
        "distributed": "torchrun",
        "timeout": 3600,
    }
    assert import_job(f"{SAMPLES}/script_run_config.py") == raw  # the one object it defines


SEED_WITH_SUBMIT = """
    from azureml.core import Environment, Experiment, ScriptRunConfig, Workspace
    from azureml.core.runconfig import MpiConfiguration

    ws = Workspace.from_config()
    experiment = Experiment(ws, name="curated-hvd")
    env = Environment.get(workspace=ws, name="AzureML-pytorch-1.10-ubuntu18.04-py38-cuda11-gpu")
    src = ScriptRunConfig(source_directory=".", script="train.py", arguments=["--lr", 0.1, "-v"],
                          compute_target="local", environment=env,
                          distributed_job_config=MpiConfiguration(process_count_per_node=2))
    run = experiment.submit(src)
    run.wait_for_completion(show_output=True)
    model = run.register_model(model_name="m", model_path="outputs/")
"""


def test_a_module_that_submits_stops_there_and_a_curated_environment_is_named(tmp_path):
    (tmp_path / "train.py").write_text("print('hi')\n")
    (tmp_path / "submit.py").write_text(textwrap.dedent(SEED_WITH_SUBMIT))
    raw = import_job(f"{tmp_path}/submit.py")  # no NAME: what it submitted
    assert raw["experiment"] == "curated-hvd"
    assert raw["args"] == ["--lr", 0.1, "-v"]  # not --flag value pairs: kept as a list
    assert raw["compute"] == "local"  # Azure ML's local run: this machine
    assert raw["environment"] == "inherit"
    assert raw["distributed"] == "horovod"
    assert raw["resources"] == {"nodes": 1, "processes_per_node": 2, "gpus_per_node": 2}
    assert import_job(f"{tmp_path}/submit.py:src") == raw

    (tmp_path / "aml.py").write_text(
        textwrap.dedent(SEED_WITH_SUBMIT).replace('"local"', '"gpu-cluster"')
    )
    options = import_job(f"{tmp_path}/aml.py")["compute"]["options"]
    assert options == {
        "cluster": "gpu-cluster",
        "curated_environment": "AzureML-pytorch-1.10-ubuntu18.04-py38-cuda11-gpu",
    }


def test_the_python_api_converts_an_estimator_built_in_this_process(monkeypatch):
    from azureml.train.dnn import PyTorch

    monkeypatch.chdir(REPO)
    estimator = PyTorch(
        source_directory="training",
        script_params={"--num_epochs": 2},
        compute_target="cpu-cluster",
        entry_script="pytorch_train.py",
        pip_packages=["pillow", "scikit-learn"],
        conda_packages=["libjpeg-turbo"],
        environment_variables={"OMP_NUM_THREADS": "2"},
    )
    job = job_from_azureml(estimator, experiment="api")
    assert isinstance(job, JobSpec)
    assert (job.experiment, job.source_directory) == ("api", str(TRAINING))
    assert job.environment.packages == ["pillow", "scikit-learn"]
    assert job.compute.options == {
        "cluster": "cpu-cluster",
        "conda_packages": ["libjpeg-turbo"],
        "environment_variables": {"OMP_NUM_THREADS": "2"},
    }
    assert job.resources.gpus_per_node == 0
    with pytest.raises(UserError, match="job_from_azureml: dict is not an azureml"):
        job_from_azureml({})


@pytest.mark.parametrize(
    ("name", "source", "message"),
    [
        ("x.txt", None, "{ref}: expected FILE.py:NAME, e.g. train_azure.py:estimator"),
        ("missing.py:estimator", None, "{ref}: no such file {path}"),
        (
            "m.py:estimator",
            "from azureml.core import Workspace\nws = Workspace.from_config()\n",
            "{ref}: m.py defines no 'estimator'",
        ),
        (
            "m.py:ws",
            "from azureml.core import Workspace\nws = Workspace.from_config()\n",
            "{ref}: ws is a Workspace, not an azureml.train.dnn.PyTorch estimator",
        ),
        (
            "m.py:x",
            "x = 1\n\nraise ValueError('no data here')\n",
            "{path}, line 3: ValueError: no data here (while importing it)",
        ),
        ("m.py:x", "import sys\nsys.exit(4)\n", "{path}: exited (code 4) while it was imported"),
        ("m.py:x", "def f(:\n", "{path}, line 1: invalid syntax"),
        (
            "m.py:x",
            "from azureml.core import Workspace\nfrom azureml.core.compute import ComputeTarget\n"
            "ct = ComputeTarget(workspace=Workspace.from_config(), name='gpu')\n",
            "{path}, line 3: a compute target is not looked up in Azure during an import",
        ),
        ("m.py", "x = 1\n", "{ref}: name the object to import as m.py:NAME (it defines no an"),
    ],
    ids=[
        "not-py",
        "missing",
        "no-name",
        "wrong-type",
        "raises",
        "exits",
        "syntax",
        "lookup",
        "none",
    ],
)
def test_a_bad_reference_is_one_clear_line(tmp_path, name, source, message):
    if source is not None:
        (tmp_path / "m.py").write_text(source)
    ref = f"{tmp_path}/{name}"
    path = tmp_path / name.split(":")[0]
    with pytest.raises(UserError) as error:
        import_job(ref)
    assert str(error.value).startswith(message.format(ref=ref, path=path)), str(error.value)
    assert error.value.exit_code == 2 and "\n" not in str(error.value)


def test_azure_is_left_as_it_was_after_an_import():
    """The offline stand-ins exist only while FILE.py runs."""
    from azureml.core import Experiment, Workspace
    from azureml.core.compute import ComputeTarget

    before = (Workspace.__init__, Workspace.from_config, Experiment.submit, ComputeTarget.create)
    import_job(f"{SAMPLES}/seed_estimator.py:estimator")
    after = (Workspace.__init__, Workspace.from_config, Experiment.submit, ComputeTarget.create)
    assert before == after
    assert "_get" in ComputeTarget.__dict__  # restored, not deleted


@pytest.mark.slow
def test_the_seeds_estimator_runs_here_to_completed(run_job):
    """Convert the seed's estimator unchanged, then run it here with `--set`: no GPU here,
    the digits instead of the chickens-and-turkeys download, one epoch on 16-pixel images
    (a quarter of the work of the default 32), and `pillow` for the seed's `pillow==5.4.1` (a
    2019 release with no wheel for Python 3.11, whose source does not build here), and the
    model registered as the seed does."""
    raw = import_job(f"{SAMPLES}/seed_estimator.py:estimator")
    for override in (
        "compute=local",
        "resources.gpus_per_node=0",
        "environment={pip: [pillow]}",
        "args.num_epochs=1",
        "args.image_size=16",
        "args.data_dir=${data.digits}",
        "data.digits.prepare=python prepare_digits.py --out {dest}",
        "model.name=pt-dnn",
    ):
        apply_override(raw, override)
    result = run_job(raw)
    assert result.state == "completed", result.output
    assert result.run.get_metrics()["best_val_acc"] > 0
    assert "outputs/model.pt" in result.run.get_file_names()
    assert result.workspace.history.models.find("pt-dnn")["version"] == 1


# -- a notebook's cells saved as a .py ----------------------------------------------------------
NOTEBOOK = SAMPLES / "notebook_cells.py"


def test_a_notebook_s_cells_import_with_offline_workspace_details_and_cluster_status(capsys):
    raw = import_job(str(NOTEBOOK))  # no NAME: what it submitted
    assert raw == {
        "experiment": "pytorch-digits-notebook",
        "source_directory": str(TRAINING),
        "entry_script": "pytorch_train.py",
        "args": ARGS,
        "environment": {"pip": ["pillow"]},  # the conda yaml's pip section
        "compute": {  # conda's own python and pip are not carried as conda packages
            "target": "azureml",
            "options": {"cluster": "gpu-cluster", "vm_size": "STANDARD_NC6s_v3", "max_nodes": 4},
        },
        "resources": {"nodes": 1, "processes_per_node": 1, "gpus_per_node": 1},  # a GPU image
        "distributed": "none",
    }
    out, err = capsys.readouterr()
    assert out == ""
    # print(ws.name, ws.location, ws.subscription_id, ws.resource_group): placeholders
    assert "Workspace name: offline\nAzure region: offline\n" in err
    assert "Subscription id: offline\nResource group: offline\n" in err
    # print(compute_target.get_status().serialize()): an idle cluster as it was created
    assert "'allocationState': 'Steady'" in err and "'currentNodeCount': 0" in err
    assert "'vmSize': 'STANDARD_NC6s_v3'" in err
    assert "'scaleSettings': {'minNodeCount': 0, 'maxNodeCount': 4" in err
    AzureMLTarget().check(JobSpec.from_dict(raw, base_dir=REPO))


def test_the_workspace_details_come_from_config_json(tmp_path, capsys):
    (tmp_path / "conda_dependencies.yml").write_text(
        (SAMPLES / "conda_dependencies.yml").read_text()
    )
    (tmp_path / "nb.py").write_text(NOTEBOOK.read_text())
    (tmp_path / "config.json").write_text(
        '{"subscription_id": "sub-1", "resource_group": "rg-1", "workspace_name": "ws-1"}'
    )
    import_job(f"{tmp_path}/nb.py")
    err = capsys.readouterr().err
    assert "Workspace name: ws-1\nAzure region: offline\nSubscription id: sub-1\n" in err
    assert "Resource group: rg-1\n" in err


def test_the_notebook_imports_with_the_expkit_command(expkit_cli, tmp_path):
    result = expkit_cli("import", "azureml", str(NOTEBOOK), "-o", str(tmp_path / "job.yaml"))
    assert result.returncode == 0, result.stderr
    assert "Azure region: offline" in result.stderr
    assert "AttributeError" not in result.stderr and "ComputeTargetException" not in result.stderr
    job = JobSpec.from_yaml(tmp_path / "job.yaml")
    assert (job.experiment, job.entry_script) == ("pytorch-digits-notebook", "pytorch_train.py")


def _conda_variant(tmp_path: Path, conda_python: str) -> str:
    """The notebook with its conda yaml's `python=3.11` replaced by `conda_python`."""
    yml = (SAMPLES / "conda_dependencies.yml").read_text()
    assert "  - python=3.11\n" in yml
    (tmp_path / "conda_dependencies.yml").write_text(
        yml.replace("  - python=3.11\n", f"  - {conda_python}\n")
    )
    (tmp_path / "nb.py").write_text(NOTEBOOK.read_text())
    return f"{tmp_path}/nb.py"


def _here() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@pytest.mark.parametrize("pin", ["python=3.6", "python>=3.12.99", "python==3.7.4", "python<3.8"])
def test_a_conda_python_pin_this_interpreter_does_not_fit_is_one_line_up_front(tmp_path, pin):
    ref = _conda_variant(tmp_path, pin)
    with pytest.raises(UserError) as error:
        import_job(ref)
    spec = pin.removeprefix("python")
    assert str(error.value) == (
        f"ScriptRunConfig: its conda specification pins python{spec}, but expkit runs the job "
        f"with this interpreter, Python {_here()}, and installs the job's packages for it; "
        f"import with a Python that fits python{spec}, or remove the pin (python_version=, "
        f"python=...) if the packages work on {_here()}"
    )
    assert error.value.exit_code == 2


@pytest.mark.parametrize(
    "pin",
    [
        "python=3.11",  # the sample's own: this interpreter's
        "python=3.11.2",  # another micro version of the same Python
        "python>=3.8,<4",
        "python",
    ],
)
def test_a_conda_python_pin_that_fits_this_interpreter_imports(tmp_path, pin):
    if sys.version_info[:2] != (3, 11) and pin.startswith("python=3.11"):
        pytest.skip("the pin is this interpreter's only on Python 3.11")
    raw = import_job(_conda_variant(tmp_path, pin))
    assert raw["environment"] == {"pip": ["pillow"]}


def test_a_python_version_pin_of_conda_dependencies_is_checked_and_the_sdk_default_is_not(
    tmp_path,
):
    source = (SAMPLES / "script_run_config.py").read_text()
    assert 'python_version="3.11"' in source
    (tmp_path / "pinned.py").write_text(
        source.replace('python_version="3.11"', 'python_version="3.6"')
    )
    with pytest.raises(UserError, match=r"pins python=3\.6, but expkit runs the job"):
        import_job(f"{tmp_path}/pinned.py:src")
    # CondaDependencies.create() without python_version pins the SDK's default: not the user's
    (tmp_path / "default.py").write_text(source.replace('python_version="3.11", ', ""))
    assert import_job(f"{tmp_path}/default.py:src")["entry_script"] == "pytorch_train.py"


def test_the_conda_pin_error_is_exit_2_from_the_command(expkit_cli, tmp_path):
    ref = _conda_variant(tmp_path, "python=3.6")
    result = expkit_cli("import", "azureml", ref)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("expkit: error: ScriptRunConfig: its conda specification pins python=3.6")
    )
    assert "Traceback" not in result.stderr and "ResolutionImpossible" not in result.stderr


def test_a_compute_target_looked_up_outside_the_file_is_not_told_to_use_except(tmp_path):
    (tmp_path / "clusters.py").write_text(
        "from azureml.core.compute import ComputeTarget\n\n"
        "def cluster(ws, name):\n    return ComputeTarget(workspace=ws, name=name)\n"
    )
    (tmp_path / "m.py").write_text(
        "from azureml.core import Workspace\nimport clusters\n\n"
        "ct = clusters.cluster(Workspace.from_config(), 'gpu')\n"
    )
    with pytest.raises(UserError) as error:
        import_job(f"{tmp_path}/m.py:ct")
    message = str(error.value)
    assert message.startswith(
        f"{tmp_path}/m.py, line 4: this call looks a compute target up in Azure, which an "
        "import does not do (ComputeTargetNotFound"
    ), message
    assert message.endswith('remove it, or put it under `if __name__ == "__main__":`')
    assert "except ComputeTargetException" not in message


COMPUTE_TARGETS_CELLS = """
from azureml.core import Environment, ScriptRunConfig, Workspace
from azureml.core.compute import AmlCompute, ComputeTarget

ws = Workspace.from_config()
print(ws.get_details())

cluster_name = "cpu-cluster"
if cluster_name in ws.compute_targets:
    compute_target = ws.compute_targets[cluster_name]
else:
    config = AmlCompute.provisioning_configuration(vm_size="STANDARD_D2_V2", max_nodes=2)
    compute_target = ComputeTarget.create(ws, cluster_name, config)
    compute_target.wait_for_completion(show_output=True)
print("known:", sorted(ws.compute_targets))

src = ScriptRunConfig(source_directory=".", script="train.py", compute_target=compute_target,
                      environment=Environment.get(ws, "AzureML-sklearn-1.0-ubuntu20.04-py38-cpu"))
"""


def test_ws_compute_targets_and_get_details_answer_offline(tmp_path, capsys):
    (tmp_path / "train.py").write_text("print('hi')\n")
    (tmp_path / "cells.py").write_text(textwrap.dedent(COMPUTE_TARGETS_CELLS))
    raw = import_job(f"{tmp_path}/cells.py:src")
    assert raw["compute"]["options"]["cluster"] == "cpu-cluster"
    assert raw["compute"]["options"]["max_nodes"] == 2
    err = capsys.readouterr().err
    assert "'location': 'offline'" in err and "'name': 'offline'" in err
    assert "known: ['cpu-cluster']" in err  # what the module created, nothing from Azure


def test_an_estimator_s_own_python_pin_is_checked_its_framework_s_is_not(monkeypatch):
    from azureml.train.dnn import PyTorch
    from azureml.train.estimator import Estimator

    monkeypatch.chdir(REPO)
    common = {"source_directory": "training", "entry_script": "pytorch_train.py"}
    pinned = Estimator(compute_target="cpu-cluster", conda_packages=["python=3.6"], **common)
    with pytest.raises(UserError, match=r"^Estimator: its conda specification pins python=3\.6"):
        job_from_azureml(pinned, experiment="pinned")
    # PyTorch 1.4's own Python 3.6 is the framework's, not carried and not checked
    assert (
        job_from_azureml(PyTorch(compute_target="cpu-cluster", **common), "fw").experiment == "fw"
    )
    plain = Estimator(compute_target="cpu-cluster", **common)  # the SDK's default pin
    assert job_from_azureml(plain, experiment="plain").experiment == "plain"


# -- a HyperDriveConfig: a sweep spec and its trial's job ---------------------------------------
HYPERDRIVE = SAMPLES / "hyperdrive.py"
SEED_SWEEP = {  # the seed notebook's HyperDrive cell, in Azure ML v2's names
    "search_space": {
        "learning_rate": {"type": "uniform", "min_value": 0.0005, "max_value": 0.005},
        "momentum": {"type": "uniform", "min_value": 0.9, "max_value": 0.99},
    },
    "sampling_algorithm": {"type": "random"},
    "objective": {"primary_metric": "best_val_acc", "goal": "maximize"},
    "early_termination": {
        "type": "bandit",
        "slack_factor": 0.15,
        "evaluation_interval": 1,
        "delay_evaluation": 10,
    },
    "limits": {"max_total_trials": 8, "max_concurrent_trials": 4},
}


def test_the_seed_notebook_s_hyperdrive_becomes_a_sweep_with_the_estimator_as_its_trial():
    raw = import_job(str(HYPERDRIVE))  # no NAME: what it submitted, the HyperDriveConfig
    job = raw.pop("job")
    assert raw == SEED_SWEEP
    assert job == {  # the estimator, as `expkit import` of it alone gives it
        **import_job(f"{SAMPLES}/seed_estimator.py:estimator"),
        "args": {"num_epochs": 30, "output_dir": "./outputs"},  # the sampled ones come on top
    }
    assert import_job(f"{HYPERDRIVE}:hyperdrive_config") == {"job": job, **raw}
    # the trial's script takes the parameters the sweep gives it
    script = (TRAINING / "pytorch_train.py").read_text()
    assert '"--learning_rate"' in script and '"--momentum"' in script


SWEEP_CELLS = """
from azureml.core import Experiment, ScriptRunConfig, Workspace
from azureml.train.hyperdrive import *

ws = Workspace.from_config()
experiment = Experiment(ws, "tune")
src = ScriptRunConfig(source_directory=".", script="train.py",
                      arguments=["--epochs", 3, "--lr", 0.1], compute_target="local")
sampling = {sampling}
policy = {policy}
config = HyperDriveConfig(run_config=src, hyperparameter_sampling=sampling, policy=policy,
                          primary_metric_name="loss", primary_metric_goal=PrimaryMetricGoal.{goal},
                          max_total_runs=6, {more})
run = experiment.submit(config)
"""


def sweep_file(tmp_path: Path, **cells: str) -> str:
    """A notebook-style file whose HyperDriveConfig has the given sampling, policy, ..."""
    given = {
        "sampling": "RandomParameterSampling({'--lr': uniform(0.01, 0.1)})",
        "policy": "None",
        "goal": "MINIMIZE",
        "more": "max_concurrent_runs=2",
        **cells,
    }
    (tmp_path / "train.py").write_text("print('hi')\n")
    (tmp_path / "tune.py").write_text(textwrap.dedent(SWEEP_CELLS).format(**given))
    return f"{tmp_path}/tune.py"


def test_a_script_run_config_sweep_keeps_the_job_s_args_and_its_limits(tmp_path):
    raw = import_job(sweep_file(tmp_path, more="max_duration_minutes=90"))
    assert raw["job"]["experiment"] == "tune"
    assert raw["job"]["args"] == {"epochs": 3, "lr": 0.1}  # --lr is overridden by each trial
    assert raw["job"]["compute"] == "local"
    assert raw["search_space"] == {"lr": {"type": "uniform", "min_value": 0.01, "max_value": 0.1}}
    assert raw["objective"] == {"primary_metric": "loss", "goal": "minimize"}
    assert "early_termination" not in raw  # policy=None: HyperDrive's NoTerminationPolicy
    # max_concurrent_runs defaults to max_total_runs; minutes become seconds
    assert raw["limits"] == {"max_total_trials": 6, "max_concurrent_trials": 6, "timeout": 5400}
    renamed = import_job(sweep_file(tmp_path), experiment="tune-lr")  # --experiment: the job's
    assert renamed["job"]["experiment"] == "tune-lr"


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("choice(16, 32, 64)", {"type": "choice", "values": [16, 32, 64]}),
        ("choice([16, 32])", {"type": "choice", "values": [16, 32]}),
        ("choice(range(3))", {"type": "choice", "values": [0, 1, 2]}),
        ("choice('adam', 'sgd')", {"type": "choice", "values": ["adam", "sgd"]}),
        ("randint(10)", {"type": "randint", "upper": 10}),
        ("uniform(0.8, 0.99)", {"type": "uniform", "min_value": 0.8, "max_value": 0.99}),
        (
            "quniform(8, 64, 8)",
            {"type": "quniform", "min_value": 8, "max_value": 64, "q": 8},
        ),
        (
            "loguniform(-9.2, -2.3)",  # the bounds are exponents, in both versions
            {"type": "loguniform", "min_value": -9.2, "max_value": -2.3},
        ),
        (
            "qloguniform(1, 5, 2)",
            {"type": "qloguniform", "min_value": 1, "max_value": 5, "q": 2},
        ),
        ("normal(0.5, 0.1)", {"type": "normal", "mu": 0.5, "sigma": 0.1}),
        ("qnormal(10, 3, 2)", {"type": "qnormal", "mu": 10, "sigma": 3, "q": 2}),
        ("lognormal(-3, 1)", {"type": "lognormal", "mu": -3, "sigma": 1}),
        ("qlognormal(2, 1, 4)", {"type": "qlognormal", "mu": 2, "sigma": 1, "q": 4}),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_each_parameter_expression_maps_to_its_v2_form(tmp_path, expression, expected):
    sampling = f"RandomParameterSampling({{'--x': {expression}, 'y': choice(1, 2)}})"
    raw = import_job(sweep_file(tmp_path, sampling=sampling))
    assert raw["search_space"] == {"x": expected, "y": {"type": "choice", "values": [1, 2]}}


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        ("RandomParameterSampling({'lr': uniform(0, 1)})", {"type": "random"}),
        (
            "RandomParameterSampling({'lr': uniform(0, 1)}, properties={'seed': 42})",
            {"type": "random", "seed": 42},
        ),
        (
            "RandomParameterSampling({'lr': uniform(0, 1)}, "
            "properties={'rule': 'sobol', 'seed': 7})",
            {"type": "random", "seed": 7, "rule": "sobol"},
        ),
        ("GridParameterSampling({'lr': choice(0.1, 0.01)})", {"type": "grid"}),
        ("BayesianParameterSampling({'lr': uniform(0, 1)})", {"type": "bayesian"}),
    ],
    ids=["random", "random-seed", "random-sobol", "grid", "bayesian"],
)
def test_each_sampling_maps_to_its_sampling_algorithm(tmp_path, sampling, expected):
    raw = import_job(sweep_file(tmp_path, sampling=sampling))
    assert raw["sampling_algorithm"] == expected


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            "BanditPolicy(slack_factor=0.1, evaluation_interval=2, delay_evaluation=5)",
            {
                "type": "bandit",
                "slack_factor": 0.1,
                "evaluation_interval": 2,
                "delay_evaluation": 5,
            },
        ),
        (
            "BanditPolicy(slack_amount=0.05)",
            {
                "type": "bandit",
                "slack_amount": 0.05,
                "evaluation_interval": 1,
                "delay_evaluation": 0,
            },
        ),
        (
            "MedianStoppingPolicy(evaluation_interval=1, delay_evaluation=3)",
            {"type": "median_stopping", "evaluation_interval": 1, "delay_evaluation": 3},
        ),
        (
            "TruncationSelectionPolicy(truncation_percentage=20, delay_evaluation=2)",
            {
                "type": "truncation_selection",
                "truncation_percentage": 20,
                "evaluation_interval": 1,
                "delay_evaluation": 2,
            },
        ),
        ("NoTerminationPolicy()", None),
    ],
    ids=["bandit-factor", "bandit-amount", "median", "truncation", "none"],
)
def test_each_policy_maps_to_its_early_termination(tmp_path, policy, expected):
    raw = import_job(sweep_file(tmp_path, policy=policy, goal="MAXIMIZE"))
    assert raw.get("early_termination") == expected
    assert raw["objective"]["goal"] == "maximize"


CUSTOM_POLICY = """
from azureml.train.hyperdrive import EarlyTerminationPolicy

class PatiencePolicy(EarlyTerminationPolicy):
    def __init__(self):
        super().__init__("Patience", {"patience": 3})
"""


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        (
            {"policy": "PatiencePolicy()"},
            "HyperDriveConfig: the early termination policy 'PatiencePolicy' is not converted; "
            "use one of BanditPolicy, MedianStoppingPolicy, TruncationSelectionPolicy, "
            "NoTerminationPolicy",
        ),
        (
            {"sampling": "RandomParameterSampling({'lr': ['beta', [1, 2]]})"},
            "HyperDriveConfig: parameter 'lr': the expression 'beta' is not converted; use one "
            "of azureml.train.hyperdrive's choice, randint, uniform",
        ),
        (
            {"sampling": "RandomParameterSampling({'lr': uniform(0, 1)}, {'jitter': 1})"},
            "HyperDriveConfig: RandomParameterSampling's properties jitter are not converted "
            "(it takes seed, rule); remove them",
        ),
        (
            {"sampling": "RandomParameterSampling({'lr': uniform(0, 1), '--lr': uniform(0, 2)})"},
            "HyperDriveConfig: parameters '--lr' and another name the same argument --lr",
        ),
    ],
    ids=["policy", "expression", "property", "twice"],
)
def test_what_a_sweep_cannot_convert_is_one_line_naming_it(tmp_path, cells, message):
    ref = sweep_file(tmp_path, **cells)
    Path(ref).write_text(CUSTOM_POLICY + Path(ref).read_text())
    with pytest.raises(UserError) as error:
        import_job(ref)
    assert str(error.value).startswith(message), str(error.value)
    assert error.value.exit_code == 2 and "\n" not in str(error.value)


def test_an_unknown_policy_is_exit_2_from_the_command(expkit_cli, tmp_path):
    ref = sweep_file(tmp_path, policy="PatiencePolicy()")
    Path(ref).write_text(CUSTOM_POLICY + Path(ref).read_text())
    result = expkit_cli("import", "azureml", ref, "-o", str(tmp_path / "sweep.yaml"))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("expkit: error: HyperDriveConfig: the early termination policy "), last
    assert "'PatiencePolicy'" in last and "Traceback" not in result.stderr
    assert not (tmp_path / "sweep.yaml").exists() and not (tmp_path / "sweep-job.yaml").exists()


def test_job_from_azureml_points_a_hyperdrive_config_to_the_command():
    from azureml.core import ScriptRunConfig
    from azureml.train.hyperdrive import (
        HyperDriveConfig,
        PrimaryMetricGoal,
        RandomParameterSampling,
        uniform,
    )

    config = HyperDriveConfig(
        run_config=ScriptRunConfig(source_directory=str(TRAINING), script="pytorch_train.py"),
        hyperparameter_sampling=RandomParameterSampling({"lr": uniform(0, 1)}),
        primary_metric_name="best_val_acc",
        primary_metric_goal=PrimaryMetricGoal.MAXIMIZE,
        max_total_runs=2,
    )
    with pytest.raises(UserError, match="a HyperDriveConfig is a sweep, not a job"):
        job_from_azureml(config)


@pytest.fixture(scope="module")
def imported_sweep(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`expkit import azureml hyperdrive.py -o sweep.yaml`, run once for the tests of this
    module that read what it wrote (each run of the command imports the SDK's estimators,
    which parse its package metadata for about 10 s): its result, and sweep.yaml's path."""
    folder = tmp_path_factory.mktemp("imported-sweep")
    output = folder / "sweep.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "expkit", "import", "azureml", str(HYPERDRIVE), "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=folder,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result, output


def test_the_command_writes_the_sweep_and_its_trial_s_job_which_load(expkit_cli, imported_sweep):
    import yaml

    from expkit.sweeps.spec import SweepSpec

    result, output = imported_sweep
    assert result.stderr.strip().splitlines()[-1] == (
        f"wrote {output} (the sweep) and {output.parent / 'sweep-job.yaml'} (its trial's job); "
        f"run it with: expkit sweep {output}"
    )
    assert yaml.safe_load(output.read_text()) == {"job": "sweep-job.yaml", **SEED_SWEEP}
    job = JobSpec.from_yaml(output.parent / "sweep-job.yaml")  # its code where it was
    assert (job.source_directory, job.entry_script) == (str(TRAINING), "pytorch_train.py")

    spec = SweepSpec.from_yaml(output)  # what `expkit sweep sweep.yaml` reads
    assert spec.job == job
    assert [(p.name, p.type, p.min_value, p.max_value) for p in spec.search_space] == [
        ("learning_rate", "uniform", 0.0005, 0.005),
        ("momentum", "uniform", 0.9, 0.99),
    ]
    assert (spec.objective.primary_metric, spec.objective.goal) == ("best_val_acc", "maximize")
    assert spec.sampling.type == "random"
    assert spec.early_termination is not None
    assert (spec.early_termination.type, spec.early_termination.slack_factor) == ("bandit", 0.15)
    assert spec.early_termination.delay_evaluation == 10
    assert (spec.limits.max_total_trials, spec.limits.max_concurrent_trials) == (8, 4)

    # without -o: the sweep spec printed, its job inline; --set changes the sweep's fields
    printed = expkit_cli("import", "azureml", str(HYPERDRIVE), "--set", "limits.max_total_trials=2")
    assert printed.returncode == 0, printed.stderr
    raw = yaml.safe_load(printed.stdout)
    assert raw["limits"] == {"max_total_trials": 2, "max_concurrent_trials": 4}
    assert raw["job"]["entry_script"] == "pytorch_train.py"


def test_the_sample_sweep_tunes_what_the_notebook_s_hyperdrive_tunes():
    """training/sweep.yaml is the notebook's HyperDrive over job.yaml, scaled down: the same
    arguments (which pytorch_train.py takes), primary metric, goal and policy."""
    from expkit.sweeps.spec import SweepSpec

    sample = SweepSpec.from_yaml(TRAINING / "sweep.yaml")
    imported = import_job(str(HYPERDRIVE))
    assert sample.job == JobSpec.from_yaml(TRAINING / "job.yaml")
    tuned = {p.name for p in sample.search_space if p.type != "choice" or len(p.values) > 1}
    assert tuned == set(imported["search_space"])
    assert sample.objective.primary_metric == imported["objective"]["primary_metric"]
    assert sample.objective.goal == imported["objective"]["goal"]
    assert sample.early_termination is not None
    assert sample.early_termination.type == imported["early_termination"]["type"]
    script = (TRAINING / "pytorch_train.py").read_text()
    assert all(f'"--{p.name}"' in script for p in sample.search_space)


def test_a_single_run_submitted_before_the_sweep_is_left_out_with_what_uses_it(capsys):
    """The notebook's first training run (`run = experiment.submit(estimator)`, then
    `run.wait_for_completion()`, `print(run.get_metrics())`) comes before its HyperDrive cell:
    the import goes on to the sweep, and says which lines it left out."""
    source = HYPERDRIVE.read_text()
    lines = source.splitlines()
    submit = lines.index("run = experiment.submit(estimator)") + 1
    import_job(str(HYPERDRIVE))
    err = capsys.readouterr().err
    assert (
        f"hyperdrive.py: left out lines {submit}, {submit + 1}, {submit + 2}: a run submitted "
        "before the sweep, and what uses it"
    ) in err
    # the module ran on to the sweep's submit: the estimator is there by its name too
    assert import_job(f"{HYPERDRIVE}:estimator")["entry_script"] == "pytorch_train.py"


def test_a_name_error_of_something_else_is_still_the_module_s_error(tmp_path):
    ref = sweep_file(tmp_path)
    text = Path(ref).read_text()
    before = "run = experiment.submit(src)\nrun.wait_for_completion()\nprint(missing)\n"
    changed = text.replace("sampling = ", before + "sampling = ", 1)
    Path(ref).write_text(changed)
    with pytest.raises(UserError) as error:
        import_job(ref)
    line = changed.splitlines().index("print(missing)") + 1
    assert str(error.value) == (
        f"{ref}, line {line}: NameError: name 'missing' is not defined (while importing it)"
    )


def test_a_bad_sweep_from_set_is_exit_2_and_nothing_is_written(expkit_cli, tmp_path):
    output = tmp_path / "sweep.yaml"
    result = expkit_cli(
        "import",
        "azureml",
        str(HYPERDRIVE),
        "-o",
        str(output),
        "--set",
        "limits.max_total_trials=0",
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("expkit: error: ") and "limits.max_total_trials" in last, last
    assert "Traceback" not in result.stderr
    assert not output.exists() and not (tmp_path / "sweep-job.yaml").exists()


# -- the imported sweep, run by `expkit sweep` ---------------------------------------------------
HERE = [  # the seed's estimator on this machine: no GPU, the digits, pillow of today
    "job.compute=local",
    "job.resources.gpus_per_node=0",
    "job.environment={pip: [pillow]}",
    "job.args.data_dir=${data.digits}",
    "job.data.digits.prepare=python prepare_digits.py --out {dest}",
]


def test_the_imported_sweep_dry_runs(expkit_cli, imported_sweep):
    _, output = imported_sweep
    sets = [item for override in HERE for item in ("--set", override)]
    result = expkit_cli("sweep", str(output), "--dry-run", *sets)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "learning_rate" in result.stdout and "momentum" in result.stdout
    assert expkit_cli("sweeps", "list").stdout.count("_sweep_") == 0  # nothing started


@pytest.mark.slow
def test_the_imported_sweep_runs_the_sample_script_here(
    expkit_cli, expkit_workspace, imported_sweep
):
    """The notebook's HyperDrive, imported unchanged, then run here with `--set`: two trials
    of one epoch on 16-pixel images, each an ordinary run of pytorch_train.py with the
    sampled arguments."""
    _, output = imported_sweep
    changes = [
        *HERE,
        "job.args.num_epochs=1",
        "job.args.image_size=16",
        "job.exports=[]",
        "limits.max_total_trials=2",
        "limits.max_concurrent_trials=2",
    ]
    sets = [item for override in changes for item in ("--set", override)]
    result = expkit_cli("sweep", str(output), *sets, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = expkit_workspace.history
    sweep = history.sweeps.find("latest")
    assert sweep is not None and sweep.state == "completed", sweep
    trials = history.runs.of_sweep(sweep.id)
    assert [t.state for t in trials] == ["completed", "completed"]
    for trial in trials:
        args = trial.job["args"]
        assert 0.0005 <= args["learning_rate"] <= 0.005 and 0.9 <= args["momentum"] <= 0.99
        assert history.metrics.latest(trial.id)["best_val_acc"] > 0
