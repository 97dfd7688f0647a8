"""Runs in the run's environment: `python -m expkit_torchscript.worker REQUEST.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from expkit.plugin import ExportRequest, ExportResult, exportkit
from expkit_torchscript.exporter import METHODS

FILE = "model.torchscript.pt"


def export_and_check(req: ExportRequest) -> ExportResult:
    import torch

    method = req.options.get("method", METHODS[0])
    req.say("loading the model")
    model = exportkit.load_model(req)
    inputs = exportkit.check_inputs(req)
    expected = exportkit.eager_outputs(req, model, inputs)
    req.say(f"torch.jit.{method}")
    try:
        with exportkit.collect_warnings(torch.jit.TracerWarning) as warned, torch.no_grad():
            if method == "trace":  # check_trace would rerun the same input; ours are others
                exported = torch.jit.trace(model, torch.from_numpy(inputs[0][1]), check_trace=False)
            else:
                exported = torch.jit.script(model)
    except Exception as error:
        raise exportkit.ExportFailed(
            f"torch.jit.{method} failed: {exportkit.describe_error(error)}"
        ) from error
    path = Path(req.out_dir) / FILE
    torch.jit.save(exported, str(path))
    req.say(f"checking {FILE}, loaded back, on {len(inputs)} inputs")
    loaded = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: Any) -> Any:  # numpy arrays: [batch, ...] in, the outputs out
        with torch.inference_mode():
            return loaded(torch.from_numpy(x)).numpy()

    runtime = {"trace": "the traced model", "script": "the scripted model"}[method]
    checks, message = exportkit.check_parity(req, expected, run, inputs, runtime)
    checks |= {"method": method, "warnings": warned} | exportkit.file_checks([path])
    if message and warned:
        message += f" (the tracer warned: {warned[0].removeprefix('TracerWarning: ')})"
    return ExportResult([path], checks, ok=not message, message=message)


if __name__ == "__main__":
    exportkit.worker_main(export_and_check)
