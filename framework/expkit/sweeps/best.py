"""The best trial of a sweep, and registering its model (`register_best: true`).

As HyperDrive's `get_best_run_by_primary_metric` and the seed's notebook, which registers the
best run's model: the best trial is the completed one with the best value of the primary
metric by the goal (its LAST logged value, the one the driver tells Optuna; ties: the lower
trial number). Its model is registered exactly as a run's register stage does
(`expkit.registry.register_run_model`), its lineage naming the sweep, the trial and the value,
when the job's `model.register_if` holds for that trial, and it takes the job's `model.aliases`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from expkit.errors import PluginError, StageFailed, UserError, quoted
from expkit.sweeps.report import best_row, objective_of, trial_rows

if TYPE_CHECKING:
    from expkit.capabilities import ModelVersion
    from expkit.history import RunRecord, SweepRecord
    from expkit.job import JobSpec
    from expkit.workspace import Workspace


class NoBestTrial(UserError):
    """`register_best` on a sweep none of whose trials completed with a value of its primary
    metric: there is no model to register."""


class NotRegistered(UserError):
    """The best trial's metrics do not meet the job's `model.register_if`: no version is
    made (the sweep still completes); the message says which condition failed."""


def sweep_record(workspace: Workspace, ref: str) -> SweepRecord:
    """The sweep `ref` names (id, number or `latest`); UserError when there is none."""
    found = workspace.history.sweeps.find(ref)
    if found is None:
        raise UserError(
            f"no sweep {quoted(ref)} in {workspace.path}; `expkit sweeps list` shows the sweeps"
        )
    return found


def best_trial(workspace: Workspace, sweep_id: str) -> RunRecord | None:
    """The sweep's best completed trial (a run), or None while none completed with a value
    of the primary metric. UserError when there is no such sweep."""
    sweep = sweep_record(workspace, sweep_id)
    row = best_row(trial_rows(workspace, sweep), objective_of(sweep.spec)[1])
    return workspace.history.runs.get(row.run_id) if row else None


def register_best(
    workspace: Workspace, sweep_id: str, warn: Callable[[str], None] | None = None
) -> ModelVersion:
    """Register the model of the sweep's best completed trial as the next version of the
    job's `model.name` (and in the job's model registries), its lineage adding {"sweep":
    id, "trial": n, "primary_metric": {"name", "goal", "value"}}; record it on the sweep
    (`model`, `best_run`). Called again for the same best trial, returns the version already
    registered. Raises NoBestTrial when no trial completed with a value, NotRegistered when
    the best trial does not meet the job's `model.register_if`, UserError when the job names
    no model or its files are missing, or a registry refused it (the version stays
    registered in the workspace). The job's `model.aliases` are set on the new version (a
    registry that refuses one is not a failure: `warn` is told, when given)."""
    from expkit.job import JobSpec
    from expkit.registry import (
        ModelStore,
        check_register_if,
        parse_model_ref,
        register_run_model,
        set_alias,
        unmet,
    )

    sweep = sweep_record(workspace, sweep_id)
    metric, goal = objective_of(sweep.spec)
    row = best_row(trial_rows(workspace, sweep), goal)
    if row is None:
        raise NoBestTrial(
            f"sweep {sweep.id}: no trial completed with a value of its primary metric "
            f"{metric!r}; there is no best trial to register"
        )
    best = workspace.history.runs.get(row.run_id)
    job = JobSpec.from_dict(best.job, source=f"run {best.id}")
    if job.model is None:
        raise UserError(
            f"sweep {sweep.id}: its job names no model; add `model: {{name: NAME, path: "
            "outputs/}` to the trial's job to register the best trial's model"
        )
    if sweep.model:  # registered already (a resumed driver, a second call)
        ref = parse_model_ref(sweep.model)
        name, version = ref.name, ref.version
        store = ModelStore(workspace)
        if workspace.history.models.find(name, version) is not None:
            existing = store.get(name, version)
            if existing.lineage.get("run_id") == best.id:
                return existing
    refused = unmet(check_register_if(workspace, job, best.id))
    if refused:
        raise NotRegistered(f"not registered (model.register_if): {refused}")
    registries = _registries(job) if job.model.registries else []
    lineage = {
        "sweep": sweep.id,
        "trial": best.trial,
        "primary_metric": {"name": metric, "goal": goal, "value": row.best},
    }
    model = register_run_model(workspace, best.id, job, lineage)
    workspace.history.sweeps.update(
        sweep.id, best_run=best.id, model=f"{model.name}:{model.version}"
    )
    if registries:
        _to_registries(workspace, best.id, model, registries)
    for alias in job.model.aliases:  # as the register stage: a registry refusing is no failure
        mirrors = {r.name: r for _, r, _ in registries}
        _, warnings = set_alias(workspace, model, alias, best.id, mirrors)
        for line in warnings:
            if warn is not None:
                warn(f"warning: {line}")
    return model


def _registries(job: JobSpec) -> list[tuple[Any, Any, JobSpec]]:
    """The job's model registries, found and their options checked as a run's are:
    (RegistrySpec, ModelRegistry, checked job) each. UserError names a missing plugin."""
    from expkit.lifecycle import choose
    from expkit.plugins import get_plugins

    choice = choose(job, get_plugins())
    assert choice.job.model is not None
    return [
        (entry, registry, choice.job)
        for entry, registry in zip(choice.job.model.registries, choice.registries, strict=True)
    ]


def _to_registries(
    workspace: Workspace,
    run_id: str,
    model: ModelVersion,
    registries: list[tuple[Any, Any, JobSpec]],
) -> None:
    """Hand `model` to each registry, as the register stage does, told of the best trial's
    run (`RunInfo.sweep`, `RunInfo.trial`)."""
    from expkit import services
    from expkit.plugins import call
    from expkit.registry import record_registration

    for entry, registry, job in registries:
        info = services.run_info(workspace, run_id, job)
        try:
            returned = call(registry, "register", model, info, entry.options)
        except (StageFailed, UserError, PluginError) as failure:
            raise UserError(
                f"{failure}; {model.name}:{model.version} is registered in this workspace only"
            ) from None
        record_registration(workspace, model, registry.name, returned)
