"""Runs in the run's environment: `python -m expkit_mlflow.worker REQUEST.json` (see
`expkit.exportkit` and `expkit_mlflow.exporter`): writes the MLflow model folder and checks it
through mlflow.pyfunc (and the ONNX flavor in ONNX Runtime) against the eager model."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expkit.plugin import ExportRequest, ExportResult, exportkit
from expkit_mlflow.exporter import FOLDER

if TYPE_CHECKING:
    import numpy as np
    import torch

ONNX_FILE = "model.onnx"  # what the onnx exporter writes (expkit_onnx.worker.FILE)
ONNX_DATA = "model.onnx.data"  # its weights, when they are too large for one protobuf


def export_and_check(req: ExportRequest) -> ExportResult:
    import mlflow.pyfunc
    import mlflow.pytorch

    model = exportkit.load_model(req)
    inputs = exportkit.check_inputs(req)
    expected = exportkit.eager_outputs(req, model, inputs)
    folder = Path(req.out_dir) / FOLDER
    example = inputs[-1][1] if req.input.get("examples") else inputs[0][1]
    req.say("mlflow.pytorch.save_model")
    mlflow.pytorch.save_model(
        model,
        str(folder),
        code_paths=code_paths(req, model),
        signature=signature(req, expected[0]),
        input_example=example[: min(len(example), 5)],
        # The module pickled whole, its class from `code/`: any module loads again, where
        # "pt2" (torch.export) freezes what it cannot trace, such as a branch on a size.
        serialization_format="pickle",
        # Named, not inferred: inference loads the model again in a subprocess (slow).
        pip_requirements=requirements(mlflow.pytorch.get_default_pip_requirements(), model),
    )
    checks: dict[str, Any] = {"mlflow": mlflow.__version__, "flavors": ["pytorch"]}
    onnx_file = Path(req.model_dir) / ONNX_FILE
    if onnx_file.is_file():
        add_onnx_flavor(folder, Path(req.model_dir))
        checks["flavors"].append("onnx")
    req.say("checking through mlflow.pyfunc.load_model")
    loaded = mlflow.pyfunc.load_model(str(folder))
    checks_pyfunc, message = exportkit.check_parity(
        req, expected, lambda x: loaded.predict(x), inputs, "mlflow.pyfunc"
    )
    checks.update(checks_pyfunc)
    if not message and onnx_file.is_file():
        onnx_checks, message = check_onnx(req, folder, expected, inputs)
        checks["onnx_max_abs_error"] = onnx_checks["max_abs_error"]
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    checks |= exportkit.file_checks(files)
    return ExportResult(files, checks, ok=not message, message=message)


def code_paths(req: ExportRequest, model: torch.nn.Module) -> list[str]:
    """The files of the model's own code in the run's snapshot (`req.code_dir`): the
    factory's module and the module of the model's class, each whole package or file, so
    that the model folder loads without the snapshot (MLflow copies them into `code/`)."""
    if req.code_dir is None:
        return []
    root = Path(req.code_dir).resolve()
    names = {type(model).__module__.split(".")[0]}
    factory = req.load.get("factory")
    if factory:
        names.add(factory.partition(":")[0].split(".")[0])
    found = []
    for name in sorted(names):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin).resolve()
        if root not in origin.parents:
            continue  # an installed package: the environment's, not the model's code
        path = origin.parent if origin.name == "__init__.py" else origin
        found.append(str(path))
    return found


def requirements(default: list[str], model: torch.nn.Module) -> list[str]:
    """MLflow's default requirements of the PyTorch flavor (mlflow, torch, cloudpickle) plus
    each installed distribution a class of the model comes from (torchvision for its
    ResNet), pinned as MLflow pins them, so that an environment made from the model's
    requirements.txt (`mlflow models serve`, a virtualenv) can unpickle it. The model's own
    code is in `code/`, not a requirement."""
    from importlib.metadata import packages_distributions

    from mlflow.utils.requirements_utils import _get_pinned_requirement

    named = {line.split("==")[0].strip().lower().replace("_", "-") for line in default}
    distributions = packages_distributions()
    found = list(default)
    for top in sorted({type(m).__module__.split(".")[0] for m in model.modules()}):
        for dist in distributions.get(top, []):
            key = dist.lower().replace("_", "-")
            if key not in named:
                named.add(key)
                found.append(_get_pinned_requirement(dist))
    return found


def signature(req: ExportRequest, output: np.ndarray) -> Any:
    """The model signature: one tensor in (`model.input`: shape and dtype, -1 on each
    dynamic axis), one tensor out (its shape as the eager model gives it, -1 on the batch
    axis when that is dynamic): MLflow's TensorSpec (column-less tensor-based signature)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    dynamic = list(req.input.get("dynamic_axes", [0]))
    shape = [-1 if axis in dynamic else size for axis, size in enumerate(req.input["shape"])]
    out_shape = list(output.shape)
    if 0 in dynamic and out_shape:
        out_shape[0] = -1
    dtype = np.dtype(req.input.get("dtype", "float32"))
    return ModelSignature(
        inputs=Schema([TensorSpec(dtype, tuple(shape))]),
        outputs=Schema([TensorSpec(output.dtype, tuple(out_shape))]),
    )


def add_onnx_flavor(folder: Path, model_dir: Path) -> None:
    """The onnx export's model.onnx (and its weights file) as the model folder's ONNX flavor,
    as mlflow.onnx.save_model writes it: `data` names the file, CPU first."""
    import onnx
    from mlflow.models import Model

    for name in (ONNX_FILE, ONNX_DATA):
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, folder / name)  # the same bytes: one blob later
    mlmodel = Model.load(str(folder / "MLmodel"))
    mlmodel.add_flavor(
        "onnx",
        onnx_version=onnx.__version__,
        data=ONNX_FILE,
        providers=["CPUExecutionProvider"],
        code=None,
    )
    mlmodel.save(str(folder / "MLmodel"))


def check_onnx(
    req: ExportRequest,
    folder: Path,
    expected: list[np.ndarray],
    inputs: list[tuple[str, np.ndarray]],
) -> tuple[dict[str, Any], str]:
    """The ONNX flavor loaded as MLflow loads it (mlflow.onnx.load_model), run in ONNX
    Runtime on the check inputs, compared with the eager model."""
    import mlflow.onnx
    import onnxruntime

    proto = mlflow.onnx.load_model(str(folder))
    session = onnxruntime.InferenceSession(
        proto.SerializeToString() if not (folder / ONNX_DATA).exists() else str(folder / ONNX_FILE),
        providers=["CPUExecutionProvider"],
    )
    (name,) = [i.name for i in session.get_inputs()]
    return exportkit.check_parity(
        req, expected, lambda x: session.run(None, {name: x})[0], inputs, "the ONNX flavor"
    )


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    sys.dont_write_bytecode = True
    exportkit.worker_main(export_and_check)
