"""The real exporters through the `expkit` command: a small model with a dynamic batch is
exported to ONNX and TorchScript in post-process, registered with its model version, and
gives the PyTorch model's answers in ONNX Runtime; a model whose export changes its answers
is reported by the exporter's name and not registered; a run is exported after the fact.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from expkit.registry import ModelStore

TRAIN = """
import os, sys
import numpy as np
import torch
from net import build

torch.manual_seed(0)
model = build(hidden=int(sys.argv[1]) if len(sys.argv) > 1 else 8)
os.makedirs("outputs", exist_ok=True)
torch.save(model.state_dict(), "outputs/model.pt")
np.save("outputs/examples.npy", np.random.default_rng(1).normal(size=(6, 4)).astype("float32"))
"""

NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, hidden, odd):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        self.odd = odd

    def forward(self, x):
        y = self.body(x)
        if self.odd and x.shape[0] > 2:  # a branch on the batch size: exports freeze it
            y = y * 2
        return y


def build(hidden=8, odd=False):
    return Net(hidden, odd)
"""


def spec(exports, **load_args):
    return {
        "model": {
            "name": "mlp",
            "load": {"file": "model.pt", "factory": "net:build", "args": load_args},
            "input": {"shape": [1, 4], "dynamic_axes": [0], "examples": "examples.npy"},
        },
        "exports": exports,
    }


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_onnx_and_torchscript_exports_are_registered_and_agree(write_job, expkit_cli, tmp_path):
    import onnxruntime
    import torch

    path = write_job(spec(["onnx", "torchscript"]), script=TRAIN, files={"net.py": NET})
    done = expkit_cli("run", str(path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "export onnx: model.onnx (max_abs_error" in done.stdout
    assert "export torchscript: model.torchscript.pt (max_abs_error" in done.stdout

    shown = json.loads(expkit_cli("runs", "show", "latest", "--json").stdout)
    assert {"model.onnx", "model.torchscript.pt"} <= set(shown["outputs"])
    dest = tmp_path / "mlp"
    assert expkit_cli("models", "download", "mlp:1", str(dest)).returncode == 0
    assert {p.name for p in dest.iterdir()} == {
        "model.pt",
        "examples.npy",
        "model.onnx",
        "model.torchscript.pt",
    }

    # the PyTorch model, rebuilt as the job says, against both exported forms, on 5 rows
    import importlib.util

    loader = importlib.util.spec_from_file_location("net_under_test", path.parent / "src/net.py")
    net = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(net)
    model = net.build()
    model.load_state_dict(torch.load(dest / "model.pt", weights_only=True))
    model.eval()
    x = np.random.default_rng(7).normal(size=(5, 4)).astype("float32")
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    session = onnxruntime.InferenceSession(
        str(dest / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (name,) = [i.name for i in session.get_inputs()]
    np.testing.assert_allclose(session.run(None, {name: x})[0], expected, atol=1e-4, rtol=1e-3)
    scripted = torch.jit.load(str(dest / "model.torchscript.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(scripted(torch.from_numpy(x)).numpy(), expected, atol=1e-5)

    models = expkit_cli("models", "show", "mlp:1").stdout
    assert "onnx" in models and "torchscript" in models


def test_an_export_that_changes_the_answers_is_not_registered(write_job, expkit_cli):
    path = write_job(spec(["onnx", "torchscript"], odd=True), script=TRAIN, files={"net.py": NET})
    done = expkit_cli("run", str(path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]  # the run completes
    out = done.stdout + done.stderr
    assert "export onnx failed: " in out and "; not registered" in out
    assert "export torchscript failed: " in out
    files = registered_files(expkit_cli, "mlp:1")
    assert "model.onnx" not in files and "model.torchscript.pt" not in files
    assert "model.pt" in files


def registered_files(expkit_cli, ref):
    shown = expkit_cli("models", "show", ref).stdout
    return {line.split()[0] for line in shown.splitlines() if "sha256:" in line}


def test_a_required_export_that_changes_the_answers_fails_the_run(write_job, expkit_cli):
    exports = [{"format": "onnx", "required": True}]
    path = write_job(spec(exports, odd=True), script=TRAIN, files={"net.py": NET})
    done = expkit_cli("run", str(path))
    assert done.returncode == 1
    assert "post-process: required export onnx failed: " in done.stdout
    assert expkit_cli("models", "list").stdout.startswith("no models yet")


def test_export_a_run_after_the_fact_with_the_real_exporter(
    write_job, expkit_cli, expkit_workspace
):
    job = spec([])
    del job["exports"]
    path = write_job(job, script=TRAIN, files={"net.py": NET})
    assert expkit_cli("run", str(path)).returncode == 0
    done = expkit_cli("export", "latest", "--format", "onnx", "--option", "opset=18")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "random batch 1" in done.stdout and "examples examples.npy" in done.stdout
    assert "added to the outputs of run test_1: model.onnx" in done.stdout
    (export,) = expkit_workspace.history.exports.of("test_1")
    assert export.ok and export.checks["opset"] == 18
    assert export.checks["model_inputs"][0]["shape"][0] == "batch"
    # the version registered before the export is unchanged: versions never change by a run
    assert "model.onnx" not in ModelStore(expkit_workspace).get("mlp", 1).files
