"""MLflow-native models: a version registered in MLflow's registry is an MLflow model that
`mlflow.pyfunc.load_model("models:/NAME/VERSION")` loads and that predicts the PyTorch
model's outputs (the `mlflow` export, added by the `mlflow` registry, then a logged model of
the run); aliases mirrored as MLflow registered model aliases; the run's files linked, not
copied, into a local artifact store; the experiment made for model training. All on real
MLflow stores (SQLite in the workspace), driven through `expkit run`.
"""

from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from expkit.plugin import Registration, UserError
from expkit_mlflow.registry import MlflowRegistry
from expkit_mlflow.tracking import HTTP_DEFAULTS, KIND_TAG, MODEL_TRAINING

TRAIN = """
import os
import numpy as np
import torch
from expkit import Run
from net import build

torch.manual_seed(0)
model = build(hidden=8)
os.makedirs("outputs", exist_ok=True)
torch.save(model.state_dict(), "outputs/model.pt")
np.save("outputs/examples.npy", np.random.default_rng(1).normal(size=(6, 4)).astype("float32"))
Run.get_context().log("best_val_acc", 0.91)
"""

NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x):
        return self.body(x)


def build(hidden=8):
    return Net(hidden)
"""

MODEL = {
    "name": "pt-dnn",
    "load": {"file": "model.pt", "factory": "net:build", "args": {"hidden": 8}},
    "input": {"shape": [1, 4], "dynamic_axes": [0], "examples": "examples.npy"},
    "registries": ["mlflow"],
}


@pytest.fixture(autouse=True)
def mlflow_env(monkeypatch):
    """No tracking URI from the environment; no telemetry; the sink's HTTP settings gone."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", *HTTP_DEFAULTS):
        monkeypatch.delenv(name, raising=False)
    yield
    for name in HTTP_DEFAULTS:
        os.environ.pop(name, None)


def store(workspace: Path) -> str:
    return f"sqlite:///{workspace / 'mlflow.db'}"


def torch_outputs(source: Path, weights: Path, x: np.ndarray) -> np.ndarray:
    """The PyTorch model, rebuilt from the job's own code and the registered weights."""
    import torch

    loader = importlib.util.spec_from_file_location("net_under_test", source / "net.py")
    assert loader is not None and loader.loader is not None
    net = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(net)
    model = net.build(hidden=8)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def files_under(folder: Path) -> dict[str, os.stat_result]:
    return {
        p.relative_to(folder).as_posix(): os.lstat(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def distinct_bytes(folder: Path) -> int:
    """Bytes on disk of the files under `folder`, each inode once (what `du` counts)."""
    seen: dict[tuple[int, int], int] = {}
    for info in files_under(folder).values():
        seen[(info.st_dev, info.st_ino)] = info.st_size
    return sum(seen.values())


def run_through_cli(write_job, expkit_cli, exports):
    path = write_job(
        {"experiment": "mnist", "metrics": ["mlflow"], "model": MODEL, "exports": exports},
        script=TRAIN,
        files={"net.py": NET},
    )
    done = expkit_cli("run", str(path))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return path, done


def check_version_loads_and_predicts(uri: str, source: Path, workspace: Path) -> None:
    """models:/pt-dnn/1 through mlflow.pyfunc gives the torch model's outputs, on a batch
    size other than the input example's."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.pyfunc.load_model("models:/pt-dnn/1")
    finally:
        mlflow.set_tracking_uri(None)
    batch = np.random.default_rng(7).normal(size=(5, 4)).astype("float32")
    weights = workspace / "models" / "pt-dnn" / "1" / "model.pt"
    np.testing.assert_allclose(
        loaded.predict(batch), torch_outputs(source, weights, batch), rtol=1e-6, atol=1e-6
    )
    inputs = loaded.metadata.signature.inputs.to_dict()
    assert inputs == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 4)}}]
    assert loaded.metadata.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3)


def check_the_onnx_flavor(uri: str, source: Path, workspace: Path) -> None:
    """The same version's ONNX flavor (the onnx export's file) through mlflow.onnx, in ONNX
    Runtime, gives the torch model's outputs too; pyfunc loads through PyTorch."""
    import mlflow
    import mlflow.onnx
    import onnxruntime
    from mlflow.models import Model

    mlflow.set_tracking_uri(uri)
    try:
        proto = mlflow.onnx.load_model("models:/pt-dnn/1")
        flavors = Model.load("models:/pt-dnn/1").flavors
    finally:
        mlflow.set_tracking_uri(None)
    assert {"pytorch", "onnx", "python_function"} <= set(flavors)
    assert flavors["python_function"]["loader_module"] == "mlflow.pytorch"
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (name,) = [i.name for i in session.get_inputs()]
    batch = np.random.default_rng(8).normal(size=(3, 4)).astype("float32")
    weights = workspace / "models" / "pt-dnn" / "1" / "model.pt"
    np.testing.assert_allclose(
        session.run(None, {name: batch})[0],
        torch_outputs(source, weights, batch),
        atol=1e-4,
        rtol=1e-3,
    )


@pytest.mark.slow  # about 80 s: the run, the onnx and mlflow exports, MLflow's store
def test_a_registered_version_is_an_mlflow_model_that_predicts_like_the_torch_model(
    write_job, expkit_cli, expkit_workspace
):
    path, done = run_through_cli(write_job, expkit_cli, ["onnx"])
    workspace = expkit_workspace.path
    uri = store(workspace)
    # the registry added its export to the job's, and it passed through pyfunc
    assert "export mlflow: mlflow-model/ (10 files) (max_abs_error" in done.stdout
    assert "pt-dnn version 1 in sqlite:///" in done.stdout
    assert "files only" not in done.stdout

    check_version_loads_and_predicts(uri, path.parent / "src", workspace)
    check_the_onnx_flavor(uri, path.parent / "src", workspace)

    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version("pt-dnn", "1")
    assert version.source.startswith("models:/m-")  # a logged model, as log_model makes it
    model_id = version.source.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    assert str(logged.status) in ("READY", "LoggedModelStatus.READY")
    run = client.get_run(version.run_id)  # the run page's "Logged models"
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    assert logged.source_run_id == version.run_id
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[KIND_TAG] == MODEL_TRAINING

    # no second copy of the bytes: the logged model's and the run's artifacts are the
    # version's and the run's own files, hard-linked; none can be written through
    model_dir = workspace / "models" / "pt-dnn" / "1" / "mlflow-model"
    logged_dir = Path(logged.artifact_location.removeprefix("file://"))
    ours, theirs = files_under(model_dir), files_under(logged_dir)
    # (MLflow adds registered_model_meta of its own when the version is made)
    assert set(ours) <= set(theirs) and {"MLmodel", "data/model.pth"} <= set(ours)
    for name, info in ((n, theirs[n]) for n in ours):
        assert (info.st_dev, info.st_ino) == (ours[name].st_dev, ours[name].st_ino), name
        assert info.st_nlink >= 3, name  # the blob, the version's name, the artifact's
        assert stat.S_IMODE(info.st_mode) & 0o222 == 0, name
    (record,) = expkit_workspace.history.runs.recent()
    outputs = files_under(expkit_workspace.run_dir(record.id) / "outputs")
    artifacts = files_under(Path(run.info.artifact_uri.removeprefix("file://")) / "outputs")
    assert set(artifacts) == set(outputs)
    for name, info in artifacts.items():
        assert info.st_ino == outputs[name].st_ino, name
    # what MLflow's store adds on disk: none of the outputs' or the model's bytes again
    elsewhere = {
        (i.st_dev, i.st_ino)
        for p, i in files_under(workspace).items()
        if not p.startswith("mlartifacts/")
    }
    added = {
        name
        for name, info in files_under(workspace / "mlartifacts").items()
        if (info.st_dev, info.st_ino) not in elsewhere
    }
    assert all(
        "/artifacts/logs/" in name or name.endswith("/registered_model_meta") for name in added
    ), added
    size = sum(i.st_size for i in outputs.values())
    new = sum(i.st_size for n, i in files_under(workspace / "mlartifacts").items() if n in added)
    print(f"outputs {size} bytes; bytes MLflow's artifact store adds on disk: {new}")


FILES_ONLY = """
import os
os.makedirs("outputs", exist_ok=True)
with open("outputs/model.pt", "wb") as f:
    f.write(os.urandom(200_000))
# a file of the user's, outside the run, hard-linked into the outputs
os.link(os.environ["USER_FILE"], "outputs/theirs.bin")
print("trained")
"""


def test_files_only_version_linked_not_copied_and_the_user_s_file_untouched(
    run_job, tmp_path, monkeypatch
):
    theirs = tmp_path / "theirs.bin"
    theirs.write_bytes(b"the user's own bytes" * 1000)
    theirs.chmod(0o644)
    monkeypatch.setenv("USER_FILE", str(theirs))
    result = run_job(
        {
            "experiment": "plain",
            "metrics": ["mlflow"],
            "model": {"name": "raw", "registries": ["mlflow"]},
        },
        script=FILES_ONLY,
    )
    assert result.state == "completed", result.output
    assert (
        "raw version 1 in sqlite:///" in result.output
        and "(files only: not loadable with mlflow.pyfunc (the job's model has no model.load "
        "and model.input))"
        in result.output
    )
    client = MlflowClient(tracking_uri=store(result.workspace.path))
    version = client.get_model_version("raw", "1")
    assert version.source.startswith("runs:/")
    run = client.get_run(version.run_id)
    assert client.get_experiment(run.info.experiment_id).tags[KIND_TAG] == MODEL_TRAINING

    outputs = files_under(result.run_dir / "outputs")
    artifacts = files_under(Path(run.info.artifact_uri.removeprefix("file://")) / "outputs")
    assert set(artifacts) == set(outputs) == {"model.pt", "theirs.bin"}
    for name, info in artifacts.items():  # one inode: the sealed output's, read-only
        assert (info.st_dev, info.st_ino) == (outputs[name].st_dev, outputs[name].st_ino)
        assert info.st_nlink >= 3 and stat.S_IMODE(info.st_mode) & 0o222 == 0
    # the user's file: never a name of what MLflow holds, its mode and links as they were
    mine = os.stat(theirs)
    assert mine.st_ino != artifacts["theirs.bin"].st_ino
    assert stat.S_IMODE(mine.st_mode) == 0o644 and mine.st_nlink == 1
    assert theirs.read_bytes() == b"the user's own bytes" * 1000
    # the logs, writable, are copies: writing one in MLflow's store leaves the run's alone
    logs = files_under(Path(run.info.artifact_uri.removeprefix("file://")) / "logs")
    run_logs = files_under(result.run_dir / "logs")
    assert logs and all(info.st_ino != run_logs[n].st_ino for n, info in logs.items())


def test_an_existing_experiment_becomes_a_model_training_one(run_job, expkit_workspace):
    client = MlflowClient(tracking_uri=store(expkit_workspace.path))
    # as an earlier expkit made it: no kind
    made = client.create_experiment(
        "older", artifact_location=(expkit_workspace.path / "mlartifacts" / "older").as_uri()
    )
    assert KIND_TAG not in client.get_experiment(made).tags
    result = run_job({"experiment": "older", "metrics": ["mlflow"]}, script="print('hi')")
    assert result.state == "completed", result.output
    assert client.get_experiment(made).tags[KIND_TAG] == MODEL_TRAINING
    # a kind chosen otherwise (in MLflow's UI) is left as it is
    client.set_experiment_tag(made, KIND_TAG, "genai_development")
    run_job({"experiment": "older", "metrics": ["mlflow"]}, script="print('hi')")
    assert client.get_experiment(made).tags[KIND_TAG] == "genai_development"


def test_aliases_are_mlflow_registered_model_aliases(run_job):
    result = run_job(
        {"model": {"name": "raw", "registries": ["mlflow"]}},
        script=FILES_ONLY.replace('os.link(os.environ["USER_FILE"], "outputs/theirs.bin")', ""),
    )
    assert result.state == "completed", result.output
    uri = store(result.workspace.path)
    client = MlflowClient(tracking_uri=uri)
    registration = Registration(
        "raw version 1", {"tracking_uri": uri, "name": "raw", "version": "1"}
    )
    registry = MlflowRegistry()
    said = registry.set_alias("champion", model_version("raw", 1), registration)
    assert said == "MLflow alias raw@champion -> version 1"
    assert str(client.get_model_version_by_alias("raw", "champion").version) == "1"
    assert (
        registry.delete_alias("champion", "raw", registration)
        == "MLflow alias raw@champion deleted"
    )
    assert "champion" not in client.get_registered_model("raw").aliases
    registry.delete_alias("champion", "raw", registration)  # gone already: nothing to do
    with pytest.raises(UserError, match="cannot set alias 'champion' of raw version 7"):
        registry.set_alias(
            "champion",
            model_version("raw", 7),
            Registration("", {**registration.locator, "version": "7"}),
        )
    with pytest.raises(UserError, match="no MLflow version is known"):
        registry.set_alias("champion", model_version("raw", 1), Registration("raw version 1"))


def model_version(name: str, number: int):
    from expkit.plugin import ModelVersion

    return ModelVersion(name=name, version=number, path=Path("."), files={}, lineage={})


TORCHVISION_NET = """
from torchvision.ops import MLP


def build():
    return MLP(4, [8, 3])  # a class of torchvision's: unpickling it needs torchvision
"""


@pytest.mark.slow  # about 60 s: a run and the mlflow export
def test_the_mlflow_model_requires_the_packages_its_classes_come_from(
    write_job, expkit_cli, expkit_workspace
):
    """A model whose class comes from an installed package (torchvision, as the sample's
    ResNet-18) names that package in the MLflow model's requirements, pinned, besides
    MLflow's own (mlflow, torch, cloudpickle): an environment made from them (`mlflow models
    serve`) unpickles it. The model's own code is in code/, not a requirement."""
    from importlib.metadata import version

    model = {
        "name": "mlp",
        "load": {"file": "model.pt", "factory": "net:build"},
        "input": {"shape": [1, 4], "dynamic_axes": [0]},
    }
    path = write_job(
        {"experiment": "mnist", "model": model, "exports": ["mlflow"]},
        script=TRAIN.replace("build(hidden=8)", "build()"),
        files={"net.py": TORCHVISION_NET},
    )
    done = expkit_cli("run", str(path))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "export mlflow: mlflow-model/ (9 files)" in done.stdout, done.stdout[-3000:]
    folder = expkit_workspace.path / "models" / "mlp" / "1" / "mlflow-model"
    wanted = (folder / "requirements.txt").read_text().split()
    assert f"torchvision=={version('torchvision')}" in wanted, wanted
    assert {w.split("==")[0] for w in wanted} >= {"mlflow", "torch", "cloudpickle"}
    assert not any(w.startswith("net") for w in wanted)
    assert "torchvision" in (folder / "conda.yaml").read_text()
