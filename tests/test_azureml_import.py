"""Importing Azure ML jobs: the seed's own estimator code (training/azureml/) run offline by the
`azureml` job importer and turned into expkit job specs, then run here."""

from __future__ import annotations

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
    the digits instead of the chickens-and-turkeys download, one epoch, and `pillow` for the
    seed's `pillow==5.4.1` (a 2019 release with no wheel for Python 3.11, whose source does
    not build here), and the model registered as the seed does."""
    raw = import_job(f"{SAMPLES}/seed_estimator.py:estimator")
    for override in (
        "compute=local",
        "resources.gpus_per_node=0",
        "environment={pip: [pillow]}",
        "args.num_epochs=1",
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
