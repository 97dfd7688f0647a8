"""Plugin: the `onnx` exporter (`exports: [onnx]`): torch.onnx.export, checked in ONNX Runtime.

onnx, onnxruntime and onnxscript (which torch's exporter needs) are found without importing
them, as expkit_horovod does: `expkit plugins` loads every plugin and must stay fast. When one
is missing the plugin is unavailable, with the install hint as its reason. The export runs in
the run's environment (`expkit_onnx.worker`), which sees this interpreter's packages.
"""

from __future__ import annotations

import importlib.util

from expkit.plugin import Exporter, PluginUnavailable, hookimpl

NEEDS = ("onnx", "onnxruntime", "onnxscript")

missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
if missing:
    raise PluginUnavailable(
        f"onnx export needs onnx, onnxruntime and onnxscript ({', '.join(missing)} missing): "
        "pip install 'expkit[onnx]'"
    )


@hookimpl
def expkit_exporters() -> list[Exporter]:
    from expkit_onnx.exporter import OnnxExporter  # called for a job that exports only

    return [OnnxExporter()]
