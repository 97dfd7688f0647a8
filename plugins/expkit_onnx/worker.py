"""Runs in the run's environment: `python -m expkit_onnx.worker REQUEST.json` (see exportkit).

Why the torch.export-based ("dynamo") exporter and not the TorchScript-based one: it is
torch's default since 2.9 and the other is deprecated; it refuses what it cannot capture
(data-dependent control flow, an operator without an ONNX function) with an error instead of
quietly freezing it; and the check below catches what it does get wrong (a branch on the
batch size is frozen to the example's branch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expkit.plugin import ExportRequest, ExportResult, exportkit
from expkit_onnx.exporter import DEFAULT_OPSET

FILE = "model.onnx"
INPUT, OUTPUT = "input", "output"
LARGE = 1.8e9  # bytes of weights from which they go to model.onnx.data (protobuf's 2 GB cap)


def axis_name(axis: int) -> str:
    return "batch" if axis == 0 else f"axis{axis}"


def export_and_check(req: ExportRequest) -> ExportResult:
    import onnx
    import onnxruntime
    import torch

    opset = req.options.get("opset", DEFAULT_OPSET)
    req.say("loading the model")
    model = exportkit.load_model(req)
    inputs = exportkit.check_inputs(req)
    expected = exportkit.eager_outputs(req, model, inputs)
    dynamic = {axis: axis_name(axis) for axis in req.input.get("dynamic_axes", [0])}
    path = Path(req.out_dir) / FILE
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    req.say(f"torch.onnx.export (dynamo, opset {opset})")
    try:
        torch.onnx.export(
            model,
            (torch.from_numpy(inputs[0][1]),),
            path,
            input_names=[INPUT],
            output_names=[OUTPUT],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=(dynamic,),  # names as text: symbolic sizes called so in the graph
            external_data=weights > LARGE,
            verbose=False,
        )
    except Exception as error:
        raise exportkit.ExportFailed(
            f"torch.onnx.export failed: {exportkit.describe_error(error)}"
        ) from error
    files = sorted(p for p in Path(req.out_dir).glob(f"{FILE}*") if p.is_file())
    checks: dict[str, Any] = {"exporter": "torch.onnx.export (dynamo)"}
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:
        message = f"onnx.checker rejected {FILE}: {exportkit.describe_error(error)}"
        raise exportkit.ExportFailed(message, checks) from error
    graph = onnx.load(str(path), load_external_data=False)
    written = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    checks |= {
        "opset": written,
        "onnxruntime": onnxruntime.__version__,
        "model_inputs": [_value_info(v) for v in graph.graph.input],
        "model_outputs": [_value_info(v) for v in graph.graph.output],
    }
    req.say(f"checking {FILE} in onnxruntime {onnxruntime.__version__} on {len(inputs)} inputs")
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:
        message = f"onnxruntime cannot load {FILE}: {exportkit.describe_error(error)}"
        raise exportkit.ExportFailed(message, checks) from error
    name = session.get_inputs()[0].name
    parity, message = exportkit.check_parity(
        req, expected, lambda x: session.run(None, {name: x})[0], inputs, "onnxruntime"
    )
    checks |= parity | exportkit.file_checks(files)
    fixed = [
        (axis, size)
        for axis, size in enumerate(checks["model_inputs"][0]["shape"])
        if axis in dynamic and isinstance(size, int)
    ]
    if fixed:  # the clearer reason for the mismatch the check found
        axis, size = fixed[0]
        message = (
            f"{FILE} fixes input axis {axis} to {size} although model.input.dynamic_axes lists "
            f"it: the model's code specialises that axis (e.g. a branch on x.shape[{axis}])"
        )
    if written != opset:
        message = (
            f"opset {opset} was asked for but torch.onnx.export wrote opset {written} "
            "(its version conversion failed); ask for 18 or later"
        )
    return ExportResult(files, checks, ok=not message, message=message)


def _value_info(value: Any) -> dict[str, Any]:
    """{name, shape (symbolic sizes by name), type} of a graph input or output."""
    import onnx

    tensor = value.type.tensor_type
    shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in tensor.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return {"name": value.name, "shape": shape, "type": dtype}


if __name__ == "__main__":
    exportkit.worker_main(export_and_check)
