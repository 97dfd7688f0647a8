"""The plugin contract of expkit: everything a plugin needs, from this one module.

Import from here and nothing else of expkit (besides the in-script API, `expkit.context`, and
the test kit, `expkit.testing`): every other module is internal and may change in any
release. The built-in plugins (`plugins/expkit_*`) do the same, so they are examples to copy.

    from expkit.plugin import ComputeTarget, Option, declare_options, hookimpl, runner

Hooks
    A plugin is a module with functions marked `@hookimpl`, registered under the entry-point
    group `expkit`. The hooks (`HOOKS`; each is documented in `expkit.hookspecs`):
    `expkit_compute_targets`, `expkit_distributed_backends`, `expkit_environment_builders`,
    `expkit_metric_sinks`, `expkit_model_registries`, `expkit_exporters`,
    `expkit_job_importers` return lists of capabilities (called once, at load);
    `expkit_import_hooks` names functions to call in a run's processes when they import a
    module (how another tracker's in-script API records into the run: `expkit.importhooks`);
    `expkit_stage_started`, `expkit_stage_finished`, `expkit_run_finished` are events, sent
    to every plugin (one that raises is reported and does not fail the run). A plugin module
    that cannot load (a missing optional dependency) raises `PluginUnavailable("pip install
    ...")` at import.

Capabilities (subclass one, set `name`, declare `takes`, return an instance from its hook)
    ComputeTarget (where processes run: prepare, acquire, execute, release, dry_run),
    DistributedBackend (one command -> the Processes of a launch), EnvironmentBuilder (the
    job's `environment:` -> an Environment), MetricSink with its MetricWriter (metrics as they
    are logged), ModelRegistry (each registered ModelVersion), Exporter (ExportRequest ->
    ExportResult, with the shared tools of `exportkit`), JobImporter (another tool's job ->
    an expkit job spec). Each method's docstring states its obligations. `takes =
    declare_options(name=Option(int, minimum=1, help=...))` declares the options a job may
    give it; they are checked before any run exists.

What flows between the stages
    prepare:  EnvironmentBuilder.build(spec, ctx) or ComputeTarget.prepare(ctx) -> Environment
    scale:    ComputeTarget.acquire(ctx) -> Allocation
    run:      DistributedBackend.launch(ctx, command, allocation) -> [Process]  (RankPieces
              splits a launcher's output by rank); ComputeTarget.execute(ctx, processes,
              allocation) -> exit code; each Metric to every MetricWriter.send
    end:      MetricWriter.close(RunOutcome); ModelRegistry.register(ModelVersion, RunInfo)
    A compute target, backend or builder gets a RunContext (folders, callbacks, services:
    leases, status, tags, cache_dir, plugin_config); a sink, registry or event hook a RunInfo.
    The JobSpec in both is read-only.
    A job that outlives its driver (a batch scheduler's): the target records its id with
    `ctx.set_remote_job`; a later driver calls `ComputeTarget.reattach(ctx, id)` in place of
    acquire; `ComputeTarget.failure(ctx)` -> RankFailure names the rank and node that failed.

Errors
    UserError: bad input, one line, exit 2. StageFailed: the stage cannot finish (one-line
    reason). Interrupted(outcome, message): a StageFailed for an attempt that ended because
    of the machine, not the script ("preempted", "node_failure", "time_limit"), which the
    job's `retry.on` may retry. Canceled: raise it when `ctx.canceled()` turns true. Detached
    (a BaseException): the driver lets go of a job that goes on without it; never cancel the
    job for it. Anything else a plugin raises is reported as a PluginError naming the plugin
    and the method.

The process runner (`runner`)
    `runner.run(ctx, processes, env, wrap=..., preexec=...)` starts processes on this
    machine and keeps every obligation of `ComputeTarget.execute` (timeout, cancel, the
    planned stop with the job's stop signal, logs, exit codes, nothing left behind);
    `ProcessGroup` is the same in pieces. `run_markers(ctx)`
    and `die_with_parent` are for anything else a plugin starts for a run, `guarded(argv)`
    for such a helper that starts processes of its own (pip).

The test kit (`expkit.testing`, a pytest plugin installed with expkit)
    Fixtures `expkit_workspace`, `register_plugin`, `run_job`, `expkit_cli`,
    `expkit_cli_background`; conformance checks `check_compute_target`,
    `check_distributed_backend`, `check_metric_sink`, `check_environment_builder`;
    `assert_no_processes_left`. They are
    also importable from here, without pytest (from `expkit.conformance`).

Everything is imported on first use: `import expkit.plugin` costs next to nothing, and a name
costs what its module needs (`hookimpl` loads pluggy; nothing here loads torch or a service's
SDK).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

HOOKS = (
    "expkit_compute_targets",
    "expkit_distributed_backends",
    "expkit_environment_builders",
    "expkit_metric_sinks",
    "expkit_model_registries",
    "expkit_exporters",
    "expkit_job_importers",
    "expkit_import_hooks",
    "expkit_stage_started",
    "expkit_stage_finished",
    "expkit_run_finished",
)
"""The name of every hook a plugin can implement (see expkit.hookspecs), in firing order."""

_CAPABILITIES = (
    "Capability",
    "ComputeTarget",
    "DistributedBackend",
    "EnvironmentBuilder",
    "MetricSink",
    "MetricWriter",
    "ModelRegistry",
    "Exporter",
    "JobImporter",
    "Option",
    "declare_options",
    "RunContext",
    "RunInfo",
    "RunOutcome",
    "Allocation",
    "Process",
    "RankPieces",
    "RankFailure",
    "Environment",
    "Metric",
    "ModelVersion",
    "Registration",
    "ExportRequest",
    "ExportResult",
    "ENV_COMPLETE",
)
_ERRORS = (
    "UserError",
    "Canceled",
    "Detached",
    "StageFailed",
    "Interrupted",
    "PluginUnavailable",
    "PluginError",
    "quoted",
)
_TEST_KIT = (
    "check_compute_target",
    "check_distributed_backend",
    "check_metric_sink",
    "check_environment_builder",
    "assert_no_processes_left",
)

_EXPORTS: dict[str, str] = {
    "hookimpl": "expkit.hookspecs",
    **dict.fromkeys(_CAPABILITIES, "expkit.capabilities"),
    **dict.fromkeys(_ERRORS, "expkit.errors"),
    "JobSpec": "expkit.job",
    "EnvironmentSpec": "expkit.job",
    "NAME": "expkit.job",
    "NAME_RULE": "expkit.job",
    "with_defaults": "expkit.options",
    "RunLeases": "expkit.leases",
    "ProcessGroup": "expkit.runner",
    "run_markers": "expkit.runner",
    "guarded": "expkit.runner",
    "die_with_parent": "expkit.procs",
    **dict.fromkeys(_TEST_KIT, "expkit.conformance"),
}
_MODULES = {"runner": "expkit.runner", "exportkit": "expkit.exportkit"}

__all__ = ["HOOKS", *_EXPORTS, *_MODULES]

if TYPE_CHECKING:  # pragma: no cover - what type checkers and editors see
    from expkit import exportkit, runner
    from expkit.capabilities import (
        ENV_COMPLETE,
        Allocation,
        Capability,
        ComputeTarget,
        DistributedBackend,
        Environment,
        EnvironmentBuilder,
        Exporter,
        ExportRequest,
        ExportResult,
        JobImporter,
        Metric,
        MetricSink,
        MetricWriter,
        ModelRegistry,
        ModelVersion,
        Option,
        Process,
        RankFailure,
        RankPieces,
        Registration,
        RunContext,
        RunInfo,
        RunOutcome,
        declare_options,
    )
    from expkit.conformance import (
        assert_no_processes_left,
        check_compute_target,
        check_distributed_backend,
        check_environment_builder,
        check_metric_sink,
    )
    from expkit.errors import (
        Canceled,
        Detached,
        Interrupted,
        PluginError,
        PluginUnavailable,
        StageFailed,
        UserError,
        quoted,
    )
    from expkit.hookspecs import hookimpl
    from expkit.job import NAME, NAME_RULE, EnvironmentSpec, JobSpec
    from expkit.leases import RunLeases
    from expkit.options import with_defaults
    from expkit.procs import die_with_parent
    from expkit.runner import ProcessGroup, guarded, run_markers


def __getattr__(name: str) -> Any:
    """Import a name of the contract on first use (see the module's docstring)."""
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'expkit.plugin' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
