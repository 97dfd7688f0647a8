"""Plugin: the `torchscript` exporter (`exports: [torchscript]`): torch.jit.trace or script.

Nothing to check at import: the export runs in the run's environment (`expkit_torchscript.
worker`), where torch is, so the plugin loads wherever expkit does, like expkit_torchrun.
"""

from __future__ import annotations

from expkit.plugin import Exporter, hookimpl


@hookimpl
def expkit_exporters() -> list[Exporter]:
    from expkit_torchscript.exporter import TorchScriptExporter  # for a job that exports only

    return [TorchScriptExporter()]
