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

from expkit.plugin import (
    Exporter,
    ExportRequest,
    ExportResult,
    Option,
    declare_options,
    exportkit,
)

# torch's ONNX functions (torchlib) are written for opset 18, so 18 needs no version
# conversion (a lower one may silently stay 18: the worker checks), and every ONNX Runtime
# since 1.14 runs it, as do most other runtimes. Ask for a newer one for newer operators.
DEFAULT_OPSET = 18
MIN_OPSET = 7
MAX_OPSET = 99  # far above any opset yet (23 in 2025): a bound for typos, not a support claim


class OnnxExporter(Exporter):
    name = "onnx"
    description = "model.onnx via torch.onnx.export (dynamo), checked in onnxruntime"
    takes = declare_options(
        opset=Option(
            int,
            minimum=MIN_OPSET,
            maximum=MAX_OPSET,
            text=f"an ONNX opset number from {MIN_OPSET} to {MAX_OPSET}, e.g. {DEFAULT_OPSET}",
            default=DEFAULT_OPSET,
            help="the ONNX opset to write (a newer one for newer operators)",
        )
    )

    def export(self, request: ExportRequest) -> ExportResult:
        return exportkit.run_worker(request, "expkit_onnx.worker")
