"""The `onnx` exporter: one self-contained model.onnx, checked in ONNX Runtime on CPU.

    exports:
      - format: onnx
        options: {opset: 18}   # the ONNX opset to write (default 18)

The export itself runs in the run's environment (`expkit_onnx.worker`): torch.onnx.export
with the torch.export-based ("dynamo") exporter and a symbolic size for each of
`model.input.dynamic_axes`, onnx.checker, then the model in onnxruntime on the check inputs
of `expkit.exportkit.check_inputs`, compared with the eager model.
"""

from __future__ import annotations

from typing import Any

from expkit import exportkit
from expkit.capabilities import Exporter, ExportRequest, ExportResult
from expkit.errors import UserError

OPTIONS = ("opset",)
# torch's ONNX functions (torchlib) are written for opset 18, so 18 needs no version
# conversion (a lower one may silently stay 18: the worker checks), and every ONNX Runtime
# since 1.14 runs it, as do most other runtimes. Ask for a newer one for newer operators.
DEFAULT_OPSET = 18
MIN_OPSET = 7


class OnnxExporter(Exporter):
    name = "onnx"
    description = "model.onnx via torch.onnx.export (dynamo), checked in onnxruntime"

    def check_options(self, options: dict[str, Any], field: str) -> None:
        self.reject_unknown_options(options, OPTIONS, field)
        opset = options.get("opset", DEFAULT_OPSET)
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
            raise UserError(
                f"{field}.opset: must be an ONNX opset number, e.g. {DEFAULT_OPSET}, not {opset!r}"
            )

    def export(self, request: ExportRequest) -> ExportResult:
        try:
            self.check_options(request.options, "options")
        except UserError as error:
            return ExportResult([], {}, False, str(error))
        return exportkit.run_worker(request, "expkit_onnx.worker")
