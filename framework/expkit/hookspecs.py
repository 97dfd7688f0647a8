# mypy: disable-error-code="empty-body"
# (a hook spec has only a docstring for a body: pluggy calls the plugins' implementations)
"""The plugin API of expkit: every hook a plugin can implement, in the order they fire.

A plugin is a module (or object) with functions marked `@hookimpl` (imported, like everything
a plugin uses, from `expkit.plugin`), registered under the entry-point group `expkit` in its
distribution's metadata::

    [project.entry-points.expkit]
    slurm = "expkit_slurm"

Two kinds of hooks:

* Capability hooks (plural nouns) are called once when the plugin manager starts. Each returns
  a list of objects from `expkit.capabilities`, each with a `name` that job specs refer to. Two
  plugins supplying the same kind under one name is an error that names both. A hook that
  raises marks its plugin "loaded, with an error", and a job naming what it would have
  supplied is told so.
* Event hooks (`expkit_stage_started`, `expkit_stage_finished`, `expkit_run_finished`) are
  broadcast to every plugin. An observer that raises is reported with its plugin's name and
  does not fail the run.

A plugin implementing a hook that is not here (`expkit_compute_target`, singular), or asking
for an argument its hook does not pass, is not loaded: `expkit plugins` names the hook and
the closest real one. What the core does when each capability method raises is in the
README ("When a plugin raises") and each method's docstring.

The lifecycle of one run, and where each hook fires::

    expkit run job.yaml
      expkit_stage_started(stage="prepare")     snapshot, ComputeTarget.prepare (a cluster's own
                                                environment) or EnvironmentBuilder.build, data
      expkit_stage_finished(stage="prepare")
      expkit_stage_started(stage="scale")       ComputeTarget.acquire
      expkit_stage_finished(stage="scale")
      expkit_stage_started(stage="run")         DistributedBackend.launch, ComputeTarget.execute,
                                                metrics to every MetricSink as they are logged
      expkit_stage_finished(stage="run")
      expkit_stage_started(stage="post-process")  outputs sealed (always), Exporter.export
                                                (when the script succeeded), per `exports:`
      expkit_stage_finished(stage="post-process")
      expkit_stage_started(stage="register")    local registry, then every ModelRegistry
      expkit_stage_finished(stage="register")
      expkit_run_finished(state="completed" | "failed" | "canceled")

A stage that fails skips the stages after it, except post-process, which always runs once
the run stage has started, so that outputs are kept. Two stages can end without starting:
post-process when the script never started, and register when the run did not complete or
the job names no model; each fires only `expkit_stage_finished(outcome="skipped",
error=<why>)`. Stages, outcomes and states are the string enums of `expkit.stages` (`Stage`,
`Outcome`, `RunState`): each equals its text, so comparing with strings works.

Outside a run: `expkit run JOB --dry-run` calls ComputeTarget.dry_run, `expkit export` calls
Exporter.export, `expkit import FROM REF` calls JobImporter.import_job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from expkit.capabilities import (
        ComputeTarget,
        DistributedBackend,
        EnvironmentBuilder,
        Exporter,
        JobImporter,
        MetricSink,
        ModelRegistry,
        RunInfo,
    )
    from expkit.stages import Outcome, RunState, Stage

PROJECT = "expkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- capability hooks: called once, results collected from every plugin -------------------------
@hookspec
def expkit_compute_targets() -> list[ComputeTarget]:
    """Compute targets this plugin supplies: where a job's processes run.

    Example::

        @hookimpl
        def expkit_compute_targets():
            return [LocalTarget()]   # name = "local"; a job spec selects it with `compute: local`
    """


@hookspec
def expkit_distributed_backends() -> list[DistributedBackend]:
    """Distributed backends this plugin supplies: how one command becomes N ranks.

    Example: `return [HorovodBackend()]`, selected with `distributed: horovod`.
    """


@hookspec
def expkit_environment_builders() -> list[EnvironmentBuilder]:
    """Environment builders this plugin supplies: how `environment:` becomes an interpreter.

    Example: `return [PipBuilder()]`, selected with `environment: {pip: [pillow]}`.
    """


@hookspec
def expkit_metric_sinks() -> list[MetricSink]:
    """Metric sinks this plugin supplies: where logged metrics go besides the run history.

    Example: `return [MlflowSink()]`, selected with `metrics: [mlflow]`.
    """


@hookspec
def expkit_model_registries() -> list[ModelRegistry]:
    """Model registries this plugin supplies, besides the workspace's own registry.

    Example: `return [MlflowRegistry()]`, selected with `model: {registries: [mlflow]}`.
    """


@hookspec
def expkit_exporters() -> list[Exporter]:
    """Export formats this plugin supplies, run in post-process and by `expkit export`.

    Example: `return [OnnxExporter()]`, selected with `exports: [onnx]`. Each successful
    export's files are written into the run's outputs and registered with the model version;
    a failed one is recorded with its reason and not registered.
    """


@hookspec
def expkit_job_importers() -> list[JobImporter]:
    """Job importers this plugin supplies: another tool's job definition -> an expkit job spec.

    Example: `return [AzureMLImporter()]`, used by `expkit import azureml train.py:estimator`
    (also spelled `expkit import-azureml train.py:estimator`).
    """


@hookspec
def expkit_import_hooks() -> dict[str, str]:
    """Functions to call inside a run's Python processes right after they import a module:
    `{module: "package.module:function"}`, each called with the module just imported.

    Example: `return {"azureml.core.run": "expkit_azureml.inscript:install"}` makes Azure ML's
    `Run.get_context()` record into the expkit run, with no change to the script. The function
    runs in the script's interpreter, before the script's own code sees the module: it must
    be quick, import only what the module already did, and never raise into the script (one
    that raises is one notice on stderr). See `expkit.importhooks` for how it gets there.
    Called once, at load, for every loaded plugin, whatever the job uses.
    """


# -- event hooks: broadcast, each observer isolated -----------------------------------------------
@hookspec
def expkit_stage_started(run: RunInfo, stage: Stage) -> None:
    """A stage of `run` starts: one of prepare, scale, run, post-process, register.

    Example::

        @hookimpl
        def expkit_stage_started(run, stage):
            print(f"{run.run_id}: {stage}")
    """


@hookspec
def expkit_stage_finished(run: RunInfo, stage: Stage, outcome: Outcome, error: str | None) -> None:
    """A stage of `run` ended; `outcome` is completed, failed, canceled or skipped.

    `error` is the one-line reason when the stage failed, was canceled or was skipped (a
    skipped stage did not start: no `expkit_stage_started` came before), else None.
    """


@hookspec
def expkit_run_finished(run: RunInfo, state: RunState, error: str | None) -> None:
    """`run` reached its final state: completed, failed or canceled (`error` says why)."""
