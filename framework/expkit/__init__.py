"""expkit: one job spec through one lifecycle, prepare -> scale -> run -> post-process -> register.

Everything here is imported on first use, so that `from expkit import Run` inside a training
script costs almost nothing and pulls in no third-party package. The plugin names here
(`hookimpl`, the capabilities) stay for plugins written against them; the plugin contract is
`expkit.plugin`.
"""

from __future__ import annotations

# typing.TYPE_CHECKING without importing typing: a run's every Python process imports this
# package at start-up (bootstrap/sitecustomize.py), and typing costs it ~3 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Run": "expkit.api",
    "Workspace": "expkit.api",
    "Experiment": "expkit.api",
    "Model": "expkit.api",
    "SweepRun": "expkit.api",
    "JobSpec": "expkit.job",
    "SweepSpec": "expkit.sweeps.spec",
    "hookimpl": "expkit.hookspecs",
    "ComputeTarget": "expkit.capabilities",
    "DistributedBackend": "expkit.capabilities",
    "EnvironmentBuilder": "expkit.capabilities",
    "MetricSink": "expkit.capabilities",
    "ModelRegistry": "expkit.capabilities",
    "Exporter": "expkit.capabilities",
    "ExportRequest": "expkit.capabilities",
    "ExportResult": "expkit.capabilities",
    "JobImporter": "expkit.capabilities",
    "PluginUnavailable": "expkit.errors",
    "UserError": "expkit.errors",
}

__all__ = [  # noqa: RUF022 - grouped by what they are for
    "Run",
    "Workspace",
    "Experiment",
    "Model",
    "SweepRun",
    "JobSpec",
    "SweepSpec",
    "hookimpl",
    "ComputeTarget",
    "DistributedBackend",
    "EnvironmentBuilder",
    "MetricSink",
    "ModelRegistry",
    "Exporter",
    "ExportRequest",
    "ExportResult",
    "JobImporter",
    "PluginUnavailable",
    "UserError",
]

if TYPE_CHECKING:  # pragma: no cover
    from expkit.api import Experiment, Model, Run, SweepRun, Workspace
    from expkit.capabilities import (
        ComputeTarget,
        DistributedBackend,
        EnvironmentBuilder,
        Exporter,
        ExportRequest,
        ExportResult,
        JobImporter,
        MetricSink,
        ModelRegistry,
    )
    from expkit.errors import PluginUnavailable, UserError
    from expkit.hookspecs import hookimpl
    from expkit.job import JobSpec
    from expkit.sweeps.spec import SweepSpec


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'expkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
