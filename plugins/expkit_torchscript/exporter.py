"""The `torchscript` exporter: model.torchscript.pt, reloaded and checked against eager.

    exports:
      - format: torchscript
        options: {method: trace}   # trace (default) or script

`trace` records the operations run on one example input: any model that runs, but Python
control flow is frozen to the branch the example took (the check inputs catch that when they
take another). `script` compiles the forward's code, control flow included, but only the
Python that TorchScript understands. torch 2.14 deprecates both in favour of torch.export;
the format stays useful for C++ (libtorch) deployment.
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

METHODS = ("trace", "script")


class TorchScriptExporter(Exporter):
    name = "torchscript"
    description = "model.torchscript.pt via torch.jit.trace or script, checked against eager"
    takes = declare_options(
        method=Option(
            str,
            choices=METHODS,
            default=METHODS[0],
            help="trace (runs one example; any model) or script (compiles the code)",
        )
    )

    def export(self, request: ExportRequest) -> ExportResult:
        return exportkit.run_worker(request, "expkit_torchscript.worker")
