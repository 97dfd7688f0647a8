"""The onnx and torchscript exporters, through the plugin manager, on real models: the sample
ResNet-18, a tiny MLP (state dict + factory, and a whole saved module), and models that an
export gets wrong or cannot handle. Real torch, onnx and onnxruntime; the exports run in a
worker subprocess exactly as in post-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import alive
from expkit import exportkit
from expkit import options as declared
from expkit.capabilities import ExportRequest
from expkit.errors import UserError
from expkit.plugins import get_plugins

torch = pytest.importorskip("torch")
onnxruntime = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")  # deprecated in 2.14

REPO = Path(__file__).resolve().parents[1]
TRAINING = REPO / "training"
ATOL, RTOL = 1e-4, 1e-3

MODELS = '''
import os
import signal

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, features=8, hidden=16, classes=4):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x):
        return self.net(x)


def build(hidden=16):
    return MLP(hidden=hidden)


class BatchStats(MLP):
    """Standardises a batch by its own statistics when it has enough rows."""

    def forward(self, x):
        if x.shape[0] > 2:
            x = (x - x.mean(0)) / (x.std(0) + 1e-5)
        return self.net(x)


class RawPixels(MLP):
    """Takes raw pixel values (0..255) as well as scaled ones."""

    def forward(self, x):
        if x.min() >= 0:
            x = x / 255
        return self.net(x)


class RunningMax(MLP):
    """Each output is the running maximum of the class scores (cummax)."""

    def forward(self, x):
        return torch.cummax(self.net(x), dim=1).values


class Guarded(MLP):
    """A forward with a try block: fine in Python and for tracing, not for torch.jit.script."""

    def forward(self, x):
        try:
            return self.net(x)
        except RuntimeError:
            return torch.zeros(x.shape[0], 4)


def build_and_die():
    os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
'''


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory):
    """A source folder with the tiny models, importable here as `tinymodels` (torch.save
    pickles a class by its module's name, so the worker imports it from the same folder)."""
    folder = tmp_path_factory.mktemp("code")
    (folder / "tinymodels.py").write_text(textwrap.dedent(MODELS))
    sys.path.insert(0, str(folder))
    try:
        yield folder
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("tinymodels", None)


def save_state(folder: Path, cls: str, seed: int = 0) -> Path:
    """A state dict of a seeded `tinymodels.<cls>` in folder/model.pt; the folder."""
    import tinymodels

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(getattr(tinymodels, cls)().state_dict(), folder / "model.pt")
    return folder


def make_request(fmt, model_dir, out_dir, load, shape, options=None, examples=None, code=None):
    return ExportRequest(
        format=fmt,
        model_dir=model_dir,
        load=load,
        input={"shape": shape, "dtype": "float32", "dynamic_axes": [0], "examples": examples},
        options=options or {},
        atol=ATOL,
        rtol=RTOL,
        out_dir=out_dir,
        python=sys.executable,
        code_dir=code,
        say=lambda line: None,
    )


def export(req: ExportRequest):
    plugins = get_plugins()
    return plugins.get("exporters", req.format).export(req)


def labels(result) -> list[str]:
    return [entry["input"] for entry in result.checks["checked"]]


def assert_one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message


# -- the sample model: ResNet-18 from training/pytorch_train.py -------------------------------
@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory):
    sys.path.insert(0, str(TRAINING))
    try:
        from pytorch_train import build_model
    finally:
        sys.path.remove(str(TRAINING))
        for name in ("pytorch_train", "distributed"):  # training/'s modules, not this process's
            sys.modules.pop(name, None)
    torch.manual_seed(0)
    model = build_model(10).eval()
    folder = tmp_path_factory.mktemp("resnet")
    torch.save(model.state_dict(), folder / "model.pt")
    return folder, model


@pytest.fixture(scope="module", params=["onnx", "torchscript"])
def resnet_export(request, resnet_dir, tmp_path_factory):
    """Each exporter on the sample ResNet-18 (state dict + build_model factory), once."""
    folder, _ = resnet_dir
    out = tmp_path_factory.mktemp(f"resnet-{request.param}")
    load = {"file": "model.pt", "factory": "pytorch_train:build_model", "args": {"num_classes": 10}}
    req = make_request(request.param, folder, out, load, [1, 3, 32, 32], code=TRAINING)
    said = []
    req.say = said.append
    return request.param, export(req), said


def test_resnet18_exports_and_matches_eager(resnet_export, resnet_dir):
    fmt, result, said = resnet_export
    assert result.ok, result.message
    assert labels(result) == ["random batch 1", "random batch 3"]
    assert all(
        entry["ok"] and entry["argmax_agreement"] == 1.0 for entry in result.checks["checked"]
    )
    assert 0 <= result.checks["max_abs_error"] <= ATOL
    assert result.checks["atol"] == ATOL and result.checks["rtol"] == RTOL
    assert result.checks["torch"] == torch.__version__
    (file,) = result.files
    assert result.checks["sha256"] == {file.name: exportkit.sha256(file)}
    assert said[0] == "loading the model" and len(said) >= 3  # progress reached `say`

    # The exported file, on its own, gives the eager model's answers on a batch of 5.
    _, model = resnet_dir
    x = np.random.default_rng(7).standard_normal((5, 3, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        eager = model(torch.from_numpy(x)).numpy()
    if fmt == "onnx":
        assert file.name == "model.onnx"
        session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input": x})[0]
        assert result.checks["opset"] == 18
        assert result.checks["onnxruntime"] == onnxruntime.__version__
        assert result.checks["model_inputs"] == [
            {"name": "input", "shape": ["batch", 3, 32, 32], "type": "float32"}
        ]
        assert result.checks["model_outputs"] == [
            {"name": "output", "shape": ["batch", 10], "type": "float32"}
        ]
    else:
        assert file.name == "model.torchscript.pt" and result.checks["method"] == "trace"
        got = torch.jit.load(str(file)).eval()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, eager, atol=ATOL, rtol=RTOL)


# -- a tiny MLP with a dynamic batch ----------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "options"), [("onnx", {"opset": 20}), ("torchscript", {"method": "script"})]
)
def test_state_dict_and_factory_with_real_examples(fmt, options, code_dir, tmp_path):
    model_dir = save_state(tmp_path / "model", "MLP")
    examples = np.random.default_rng(1).uniform(-2, 2, (20, 8)).astype(np.float64)
    np.save(model_dir / "val.npy", examples)  # float64 on disk: cast to the model's float32
    load = {"file": "model.pt", "factory": "tinymodels:build", "args": {"hidden": 16}}
    req = make_request(fmt, model_dir, tmp_path / "out", load, [1, 8], options, "val.npy", code_dir)
    result = export(req)
    assert result.ok, result.message
    assert labels(result) == ["random batch 1", "random batch 3", "examples val.npy (20 rows)"]
    real = result.checks["checked"][2]
    assert real["shape"] == [20, 8] and real["ok"] and real["argmax_agreement"] == 1.0
    if fmt == "onnx":
        assert result.checks["opset"] == 20
    else:
        assert result.checks["method"] == "script"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_whole_saved_module(fmt, code_dir, tmp_path):
    import tinymodels

    torch.manual_seed(0)
    (tmp_path / "model").mkdir()
    torch.save(tinymodels.MLP(), tmp_path / "model" / "whole.pt")
    load = {"file": "whole.pt"}
    req = make_request(fmt, tmp_path / "model", tmp_path / "out", load, [2, 8], code=code_dir)
    result = export(req)
    assert result.ok, result.message
    assert labels(result) == ["random batch 2", "random batch 4"]
    assert [p.name for p in result.files] in (["model.onnx"], ["model.torchscript.pt"])


def test_load_model_reads_a_torchscript_file(code_dir, tmp_path):
    import tinymodels

    torch.jit.save(torch.jit.script(tinymodels.MLP()), tmp_path / "scripted.pt")
    req = make_request("torchscript", tmp_path, tmp_path / "out", {"file": "scripted.pt"}, [1, 8])
    model = exportkit.load_model(req)
    assert isinstance(model, torch.jit.ScriptModule) and not model.training


# -- exports that go wrong ---------------------------------------------------------------------
def test_onnx_export_that_freezes_a_batch_size_branch_fails_the_check(code_dir, tmp_path):
    """torch.export takes the branch of the example (batch 1) and keeps the batch symbolic:
    model.onnx runs on batch 3 but computes the batch-1 path. Only the check can tell."""
    model_dir = save_state(tmp_path / "model", "BatchStats")
    load = {"file": "model.pt", "factory": "tinymodels:BatchStats"}
    result = export(make_request("onnx", model_dir, tmp_path / "out", load, [1, 8], code=code_dir))
    assert not result.ok
    assert result.message.startswith(
        "outputs differ from the eager model on random batch 3: max abs error "
    ), result.message
    assert result.message.endswith("> tolerance (atol 0.0001, rtol 0.001)")
    batch1, batch3 = result.checks["checked"]
    assert batch1["ok"] and not batch3["ok"] and batch3["max_abs_error"] > 0.01
    assert result.checks["model_inputs"][0]["shape"] == ["batch", 8]  # it claims to be dynamic
    assert [p.name for p in result.files] == ["model.onnx"]  # kept for a look, not registered


def test_trace_that_freezes_a_data_dependent_branch_fails_on_real_examples(code_dir, tmp_path):
    """Random inputs have negative values; the real examples are raw pixels (0..255), which
    take the other branch, the one the trace froze away."""
    model_dir = save_state(tmp_path / "model", "RawPixels")
    np.save(model_dir / "pixels.npy", np.random.default_rng(2).integers(0, 256, (6, 8)))
    load = {"file": "model.pt", "factory": "tinymodels:RawPixels"}
    req = make_request(
        "torchscript", model_dir, tmp_path / "out", load, [1, 8], None, "pixels.npy", code_dir
    )
    result = export(req)
    assert not result.ok
    assert result.message.startswith(
        "outputs differ from the eager model on examples pixels.npy (6 rows): max abs error "
    ), result.message
    line = 1 + textwrap.dedent(MODELS).splitlines().index("        if x.min() >= 0:")
    assert result.message.endswith(
        "(the tracer warned: Converting a tensor to a Python boolean might cause the trace to "
        f"be incorrect (at tinymodels.py:{line}))"
    ), result.message
    assert result.checks["warnings"][0].startswith("TracerWarning: Converting a tensor")
    assert [entry["ok"] for entry in result.checks["checked"]] == [True, True, False]
    assert_one_line(result.message)


@pytest.mark.parametrize(
    ("cls", "reason"),
    [
        (  # an operator torch 2.14's ONNX functions do not cover
            "RunningMax",
            "DispatchError: No ONNX function found for <OpOverload(op='aten.cummax'",
        ),
        (  # a branch on the data: refused by torch.export, where a trace freezes it (above)
            "RawPixels",
            "GuardOnDataDependentSymNode: Could not guard on data-dependent expression",
        ),
    ],
)
def test_onnx_export_refuses_what_it_cannot_capture(cls, reason, code_dir, tmp_path):
    model_dir = save_state(tmp_path / "model", cls)
    load = {"file": "model.pt", "factory": f"tinymodels:{cls}"}
    result = export(make_request("onnx", model_dir, tmp_path / "out", load, [1, 8], code=code_dir))
    assert not result.ok
    assert result.message.startswith(f"torch.onnx.export failed: {reason}"), result.message
    assert_one_line(result.message)


def test_script_of_python_torchscript_cannot_compile(code_dir, tmp_path):
    model_dir = save_state(tmp_path / "model", "Guarded")
    load = {"file": "model.pt", "factory": "tinymodels:Guarded"}
    options = {"method": "script"}
    req = make_request("torchscript", model_dir, tmp_path / "out", load, [1, 8], options, None)
    req.code_dir = code_dir
    result = export(req)
    assert not result.ok
    assert result.message.startswith(
        "torch.jit.script failed: UnsupportedNodeError: try blocks aren't supported"
    ), result.message
    assert "(at tinymodels.py:" in result.message
    assert_one_line(result.message)


@pytest.mark.parametrize(
    ("factory", "reason"),
    [
        ("nosuchmodule:build", "cannot import nosuchmodule from "),
        ("tinymodels:nosuch", "tinymodels has no nosuch"),
    ],
)
def test_bad_factory_is_a_one_line_failure(factory, reason, code_dir, tmp_path):
    model_dir = save_state(tmp_path / "model", "MLP")
    load = {"file": "model.pt", "factory": factory}
    result = export(make_request("onnx", model_dir, tmp_path / "out", load, [1, 8], code=code_dir))
    assert not result.ok
    assert result.message.startswith(f"model.load.factory {factory!r}: {reason}"), result.message
    assert_one_line(result.message)
    assert "Traceback" in (tmp_path / "out" / "export.log").read_text()  # the details: there


def test_worker_killed_without_a_result(code_dir, tmp_path):
    model_dir = save_state(tmp_path / "model", "MLP")
    load = {"file": "model.pt", "factory": "tinymodels:build_and_die"}
    req = make_request("torchscript", model_dir, tmp_path / "out", load, [1, 8], code=code_dir)
    result = export(req)
    assert not result.ok
    assert result.message == (
        "the export worker was killed by SIGKILL without a result (out of memory?)"
    )


def test_state_dict_that_does_not_fit_the_factory(code_dir, tmp_path):
    model_dir = save_state(tmp_path / "model", "MLP")
    load = {"file": "model.pt", "factory": "tinymodels:build", "args": {"hidden": 5}}
    req = make_request("torchscript", model_dir, tmp_path / "out", load, [1, 8], code=code_dir)
    result = export(req)
    assert not result.ok
    assert result.message.startswith(
        "model.load.file: model.pt does not fit tinymodels:build: RuntimeError: "
        "Error(s) in loading state_dict for MLP: size mismatch for net.0.weight"
    ), result.message


# -- the worker protocol, with worker modules of our own (no torch) ----------------------------
WORKERS = {
    "talks.py": """
        from expkit import exportkit
        from expkit.capabilities import ExportResult

        def export_and_check(req):
            req.say("step one")
            print("noise on stdout, not progress")
            (req.out_dir / "thing.bin").write_bytes(b"x")
            req.say(f"step two {req.options['n']}")
            return ExportResult([req.out_dir / "thing.bin"], {"n": req.options["n"]}, ok=True)

        exportkit.worker_main(export_and_check)
    """,
    "crashes.py": """
        import helper_that_does_not_exist
    """,
    "hangs.py": """
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        with open("pids", "w") as f:  # in the worker's folder, the request's out_dir
            f.write(f"{os.getpid()} {child.pid}")
        time.sleep(60)
    """,
}


@pytest.fixture
def worker_request(tmp_path):
    folder = tmp_path / "workers"
    folder.mkdir()
    for name, text in WORKERS.items():
        (folder / name).write_text(textwrap.dedent(text))
    env = {"PYTHONPATH": os.pathsep.join([str(folder), *sys.path])}
    req = make_request("fake", tmp_path, tmp_path / "out", {"file": "m.pt"}, [1, 8], {"n": 2})
    req.env = env
    return req


def test_run_worker_streams_progress_and_returns_the_result(worker_request):
    said = []
    worker_request.say = said.append
    result = exportkit.run_worker(worker_request, "talks")
    assert result.ok and result.files == [worker_request.out_dir / "thing.bin"]
    assert said == ["step one", "step two 2"]
    assert result.checks["n"] == 2 and result.checks["seconds"] > 0
    assert "noise on stdout" in (worker_request.out_dir / "export.log").read_text()


def test_run_worker_that_crashes_says_why_in_one_line(worker_request):
    result = exportkit.run_worker(worker_request, "crashes")
    assert not result.ok
    assert result.message == (
        "the export worker exited with code 1 without a result: "
        "ModuleNotFoundError: No module named 'helper_that_does_not_exist'"
    )


def test_run_worker_past_its_timeout_is_stopped_with_what_it_started(worker_request):
    started = time.monotonic()
    result = exportkit.run_worker(worker_request, "hangs", timeout=3)
    assert time.monotonic() - started < 15
    assert not result.ok
    assert result.message == "the export worker ran past its time limit (3 s) and was stopped"
    pids = [int(pid) for pid in (worker_request.out_dir / "pids").read_text().split()]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


# -- options and availability --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "options", "error"),
    [
        (
            "onnx",
            {"opst": 18},
            "exports.0.options.opst: unknown option of exporter 'onnx' (did you mean 'opset'?); "
            "it takes opset",
        ),
        ("onnx", {"opset": "18"}, "exports.0.options.opset: must be an ONNX opset number"),
        (
            "torchscript",
            {"method": "trace", "strict": False},
            "exports.0.options.strict: unknown option of exporter 'torchscript'; it takes method",
        ),
        ("torchscript", {"method": "compile"}, "exports.0.options.method: must be trace or script"),
    ],
)
def test_options_the_exporter_does_not_take_are_refused(fmt, options, error):
    exporter = get_plugins().get("exporters", fmt)
    with pytest.raises(UserError) as raised:
        declared.check(exporter, options, "exports.0.options")
    assert str(raised.value).startswith(error)
    defaults = {"onnx": {"opset": 18}, "torchscript": {"method": "trace"}}[fmt]
    assert declared.check(exporter, {}, "exports.0.options") == defaults


def test_onnx_plugin_unavailable_without_onnxruntime():
    """`expkit plugins` in an interpreter where onnxruntime cannot be imported."""
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from expkit.cli import main\n"
        "sys.exit(main(['plugins']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("onnx ")]
    assert (
        "onnx export needs onnx, onnxruntime and onnxscript (onnxruntime missing): "
        "pip install 'expkit[onnx]'"
    ) in line
    assert any(
        line.startswith("torchscript ") and "loaded" in line for line in out.stdout.splitlines()
    )


# -- the comparison ------------------------------------------------------------------------------
def test_compare_has_allclose_semantics_and_argmax_agreement():
    eager = np.array([[1.0, 2.0, 3.0], [100.0, 0.0, -1.0]], dtype=np.float32)
    near = eager + np.array([[5e-5, 0, 0], [0.09, 0, 0]], dtype=np.float32)  # 0.09 <= 1e-4 + 0.1
    result = exportkit.compare(eager, near, atol=1e-4, rtol=1e-3)
    assert result["ok"] and result["argmax_agreement"] == 1.0
    assert result["max_abs_error"] == pytest.approx(0.09, rel=1e-3)
    far = eager.copy()
    far[0] = [3.0, 2.0, 1.0]
    result = exportkit.compare(eager, far, atol=1e-4, rtol=1e-3)
    assert not result["ok"] and result["argmax_agreement"] == 0.5
    assert result["max_rel_error"] == pytest.approx(2.0)
    assert not exportkit.compare(eager, eager[:1], 1e-4, 1e-3)["ok"]
    json.dumps(exportkit.compare(eager, eager * np.nan, 1e-4, 1e-3))  # nan: still JSON-able


def test_check_inputs_prove_each_dynamic_axis(tmp_path):
    req = make_request("onnx", tmp_path, tmp_path, {}, [1, 3, 8, 8])
    req.input["dynamic_axes"] = [0, 2]
    inputs = exportkit.check_inputs(req)
    assert [(label, x.shape) for label, x in inputs] == [
        ("random batch 1", (1, 3, 8, 8)),
        ("random batch 3", (3, 3, 8, 8)),
        ("random axis 2 size 16", (1, 3, 16, 8)),
    ]
    again = exportkit.check_inputs(req)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(inputs, again, strict=True))


def test_check_parity_names_the_first_input_that_fails(tmp_path):
    req = make_request("onnx", tmp_path, tmp_path, {}, [1, 4])
    inputs = exportkit.check_inputs(req)
    expected = [x * 2 for _, x in inputs]

    def fixed_batch(x):  # what a runtime does with a model whose batch was fixed to 1
        if len(x) != 1:
            raise ValueError(f"Got invalid dimensions for input: index 0 got {len(x)}\nmore")
        return x * 2

    checks, message = exportkit.check_parity(req, expected, fixed_batch, inputs, "onnxruntime")
    assert message == (
        "onnxruntime failed on random batch 3: ValueError: Got invalid dimensions for input: "
        "index 0 got 3"
    )
    assert [entry["ok"] for entry in checks["checked"]] == [True, False]
    assert checks["max_abs_error"] == 0.0  # over the inputs that ran
    _, message = exportkit.check_parity(req, expected, lambda x: x[:, :2] * 2, inputs, "ort")
    assert message == "ort gave output shape [1, 2] on random batch 1; the eager model gives [1, 4]"


def save_ddp_state(folder: Path, cls: str, tmp_path: Path, **kwargs) -> Path:
    """The state dict of a `tinymodels.<cls>` wrapped in a real DistributedDataParallel (one
    gloo process), as a training script that saves `model.state_dict()` leaves it: every key
    prefixed `module.`."""
    import tinymodels
    import torch.distributed as dist

    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(getattr(tinymodels, cls)(**kwargs))
        state = model.state_dict()
    finally:
        dist.destroy_process_group()
    assert all(key.startswith("module.") for key in state)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "model.pt")
    return folder


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_state_dict_saved_from_distributed_data_parallel_exports(fmt, code_dir, tmp_path):
    model_dir = save_ddp_state(tmp_path / "model", "MLP", tmp_path, hidden=16)
    load = {"file": "model.pt", "factory": "tinymodels:build", "args": {"hidden": 16}}
    req = make_request(fmt, model_dir, tmp_path / "out", load, [1, 8], code=code_dir)
    said: list[str] = []
    req.say = said.append
    result = export(req)
    assert result.ok, result.message
    assert any("DistributedDataParallel (keys prefixed `module.`)" in line for line in said), said


def test_a_ddp_state_dict_that_does_not_fit_says_the_prefix_was_removed(code_dir, tmp_path):
    model_dir = save_ddp_state(tmp_path / "model", "MLP", tmp_path, hidden=16)
    load = {"file": "model.pt", "factory": "tinymodels:build", "args": {"hidden": 5}}
    req = make_request("torchscript", model_dir, tmp_path / "out", load, [1, 8], code=code_dir)
    result = export(req)
    assert not result.ok
    assert_one_line(result.message)
    assert result.message.startswith(
        "model.load.file: model.pt does not fit tinymodels:build (after removing the `module.` "
        "prefix of DistributedDataParallel): RuntimeError: Error(s) in loading state_dict for "
        "MLP: size mismatch for net.0.weight"
    ), result.message
