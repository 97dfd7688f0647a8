"""Metric sink and model registry `mlflow`: every run mirrored as an MLflow run, every
registered model version as an MLflow model version: a real MLflow model (a logged model with
the PyTorch flavor, loadable with `mlflow.pyfunc.load_model`) when the `mlflow` export, which
the registry adds to the job's exports, passed: see `expkit_mlflow.exporter`.

    metrics: [mlflow]                     # or {name: mlflow, options: {tracking_uri: ...}}
    model: {name: pt-dnn, registries: [mlflow]}

The tracking URI comes from the sink's options, else the workspace's config.json
(`{"mlflow": {"tracking_uri": ...}}`), else `$MLFLOW_TRACKING_URI`, else a SQLite store inside
the workspace (`mlflow.db`, artifacts in `mlartifacts/`); see `expkit_mlflow.tracking`.

A sweep's trials are child runs of one parent run per sweep (tag `mlflow.parentRunId`),
which holds the sweep spec in brief, its best so far and a status kept true by the trials'
ends: see `expkit_mlflow.sweeps`.

mlflow takes seconds to import, so this module only checks that it is installed: the sink
talks to an http(s) tracking server through MLflow's REST API without it (`expkit_mlflow.rest`)
and imports it for any other store, on its own thread; `registry.py` imports it at register.
The capabilities' modules (and the tracking helpers they share, with the HTTP client) are
imported by their hooks, which expkit calls only for the kinds a command uses: a run without
MLflow in it imports none of them.

A script's own MLflow calls (`mlflow.log_metric`, `start_run`, `log_artifact`, ...) record into
the expkit run: the import hook on `mlflow` points them at the store in `inscript.py`.
"""

from __future__ import annotations

import importlib.util

from expkit.plugin import (
    Exporter,
    MetricSink,
    ModelRegistry,
    PluginUnavailable,
    RunInfo,
    hookimpl,
)

if importlib.util.find_spec("mlflow") is None:
    raise PluginUnavailable("mlflow is not installed; pip install 'expkit[mlflow]'")


@hookimpl
def expkit_metric_sinks() -> list[MetricSink]:
    from expkit_mlflow.sink import MlflowSink

    return [MlflowSink()]


@hookimpl
def expkit_stage_started(run: RunInfo, stage: str) -> None:
    """As a run that reports to MLflow starts, import mlflow and connect in the background
    (`expkit_mlflow.sink.warm_up`), so that the sink is ready by the time the script ends.
    A run without the sink imports nothing for it (every plugin hears every event)."""
    if stage == "prepare" and any(spec.name == "mlflow" for spec in run.job.metrics):
        from expkit_mlflow.sink import warm_up

        warm_up(run)


@hookimpl
def expkit_import_hooks() -> dict[str, str]:
    return {"mlflow": "expkit_mlflow.inscript:install"}


@hookimpl
def expkit_model_registries() -> list[ModelRegistry]:
    from expkit_mlflow.registry import MlflowRegistry

    return [MlflowRegistry()]


@hookimpl
def expkit_exporters() -> list[Exporter]:
    from expkit_mlflow.exporter import MlflowExporter

    return [MlflowExporter()]
