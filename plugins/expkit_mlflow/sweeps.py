"""A sweep in MLflow: one parent run per sweep, each trial a nested child run of it (the tag
`mlflow.parentRunId`), so that MLflow's UI shows a sweep's trials together under it.

The parent run is named like the sweep (`pytorch-digits_sweep_1`) and lives in the job's
experiment, as its trials do. Its params are the sweep spec in brief, under the names of the
sweep's YAML (`search_space.lr: loguniform(-9.2, -2.3)`, `sampling_algorithm: bayesian`,
`objective.primary_metric`, `objective.goal`, `early_termination: bandit`,
`early_termination.slack_factor`, `limits.max_total_trials`, ...): the columns a user sorts
and compares sweeps by. After each trial ends, its metric `best_<primary metric>` is the best
value so far among the completed trials (step: how many trials completed), and its tags
`expkit.best_trial`, `expkit.best_run` (the expkit run) and `expkit.best_mlflow_run` name
that trial. A trial's value is the best value it logged of the primary metric, by the goal
(as Azure ML's HyperDrive ranks child runs, and as the sweep's own best does), read from its
metric history once when it ends and kept as its tag `expkit.value`; ties go to the lower
trial number.

Every trial of the sweep is a separate driver process, and several start at once: the parent
is found (by its tags `expkit.sweep` and `expkit.sweep_parent`, and the workspace) or created
under an exclusive flock on `mlflow-sweeps.lock` in the workspace, held until the trial's own
run exists, so that there is exactly one parent per sweep in a tracking store. A trial's end
(its status set, then the parent's updated) holds the same lock.

The parent's status, kept true by the trials alone (the sweep's own driver never talks to
MLflow, and a plugin does not see the sweep's state): RUNNING while any of its trials is
RUNNING in MLflow; when the last running trial ends, FINISHED if a trial completed (FAILED if
every trial failed, KILLED if they were all canceled). A trial that starts later (a sweep that
runs one trial at a time, or one resumed) sets it RUNNING again. So between two trials the
parent shows FINISHED for the moment the sweep's driver takes to start the next one.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expkit_mlflow.api import Point

if TYPE_CHECKING:
    from expkit.plugin import RunInfo
    from expkit_mlflow.api import RunRecord as Run
    from expkit_mlflow.api import Tracker

LOCK_NAME = "mlflow-sweeps.lock"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a run under its parent
SWEEP_TAG = "expkit.sweep"
TRIAL_TAG = "expkit.trial"
VALUE_TAG = "expkit.value"  # a completed trial's value: the best it logged of the primary metric
PARENT_MARK = "expkit.sweep_parent"  # "true" on the parent: trials carry expkit.sweep too
WORKSPACE_TAG = "expkit.workspace"
UNFINISHED = ("RUNNING", "SCHEDULED")
# The arguments of a search-space expression, in HyperDrive's order: `quniform(0, 1, 0.1)`.
_ARGUMENTS = ("values", "upper", "min_value", "max_value", "mu", "sigma", "q")


@contextmanager
def sweep_lock(workspace_dir: Path) -> Iterator[None]:
    """Hold `workspace_dir/mlflow-sweeps.lock` (an exclusive flock) while the block runs: one
    trial at a time finds or creates its sweep's parent run, or ends. Raises OSError when the
    workspace is not writable (no run could start there either)."""
    fd = os.open(workspace_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def trial_name(run: RunInfo) -> str:
    """The MLflow run name of a trial: the expkit run id and its trial number."""
    return f"{run.run_id} (trial {run.trial})" if run.trial is not None else run.run_id


def trial_tags(run: RunInfo, parent_id: str) -> dict[str, Any]:
    """The tags that make a trial's MLflow run a child of its sweep's parent run."""
    return {PARENT_TAG: parent_id, SWEEP_TAG: run.sweep, TRIAL_TAG: run.trial}


def parent_run(
    client: Tracker, run: RunInfo, experiment_id: str, workspace: str, tags: dict[str, Any]
) -> str:
    """The id of the parent run of `run`'s sweep in `experiment_id`, created if this
    workspace's sweep has none there yet (`tags`: what the trials are tagged with in common:
    user, source), and set RUNNING if it had ended. Call it holding `sweep_lock`."""
    from expkit_mlflow.tracking import clean_tags, log_params

    assert run.sweep is not None
    found = find_parent(client, experiment_id, run.sweep, workspace)
    if found is None:
        spec = run.sweep_spec()
        parent_tags = {
            **tags,
            SWEEP_TAG: run.sweep,
            PARENT_MARK: "true",
            "expkit.experiment": run.experiment,
            WORKSPACE_TAG: workspace,
            "mlflow.note.content": note(run.sweep, run.experiment, spec),
        }
        created = client.create_run(
            experiment_id,
            start_time=int(run.created * 1000) if run.created else None,
            tags=clean_tags(parent_tags),
            run_name=run.sweep,
        )
        parent_id: str = created.run_id
        log_params(client, parent_id, spec_params(spec))
        return parent_id
    parent_id = found.run_id
    if not found.params:  # created by a process that died before it logged them
        log_params(client, parent_id, spec_params(run.sweep_spec()))
    if found.status != "RUNNING":
        client.update_run(parent_id, "RUNNING")
    return parent_id


def find_parent(client: Tracker, experiment_id: str, sweep: str, workspace: str) -> Run | None:
    """The parent run of sweep `sweep` of the workspace `workspace` ("host:/path": two
    workspaces may share a tracking server and each have a sweep of that name), the oldest
    if there were several; None when there is none."""
    query = f"tags.`{SWEEP_TAG}` = '{_quoted(sweep)}' and tags.`{PARENT_MARK}` = 'true'"
    found = [
        r
        for r in _search(client, experiment_id, query, ["attributes.start_time ASC"])
        if r.tags.get(WORKSPACE_TAG) == workspace
    ]
    return found[0] if found else None


def children(client: Tracker, experiment_id: str, parent_id: str) -> list[Run]:
    """Every (not deleted) child run of `parent_id`: the sweep's trials in MLflow."""
    return _search(client, experiment_id, f"tags.`{PARENT_TAG}` = '{_quoted(parent_id)}'")


def trial_ended(client: Tracker, mlflow_run_id: str, run: RunInfo) -> None:
    """After trial `run` (the MLflow run `mlflow_run_id`, now ended) ended: the parent's best
    so far and its status, from its children as MLflow holds them. Call it holding
    `sweep_lock`, with the trial's status already set."""
    from expkit_mlflow.tracking import log_tags, mlflow_key

    trial = client.get_run(mlflow_run_id)
    parent_id = trial.tags.get(PARENT_TAG)
    if not parent_id:
        return
    primary, goal = objective(run.sweep_spec())
    if primary and trial.status == "FINISHED":
        keep_value(client, mlflow_run_id, mlflow_key(primary), goal)
    parent = client.get_run(parent_id)
    trials = children(client, parent.experiment_id, parent_id)
    if primary:
        key = mlflow_key(primary)
        completed = [t for t in trials if t.status == "FINISHED" and key in t.metrics]
        best = best_trial(completed, key, goal)
        if best is not None:
            log_best(client, parent_id, mlflow_key(f"best_{primary}"), best, key, len(completed))
            log_tags(
                client,
                parent_id,
                {
                    "expkit.best_trial": best.tags.get(TRIAL_TAG),
                    "expkit.best_run": best.tags.get("expkit.run_id"),
                    "expkit.best_mlflow_run": best.run_id,
                },
            )
    status = parent_status([t.status for t in trials])
    if status != parent.status:
        if status in UNFINISHED:
            client.update_run(parent_id, status)
        else:
            client.set_terminated(parent_id, status, int(time.time() * 1000))


def log_best(
    client: Tracker, parent_id: str, name: str, best: Run, key: str, completed: int
) -> None:
    """Log the best value as metric `name` of the parent at step `completed` (the number of
    completed trials), unless that step holds it already (a trial's end handled twice)."""
    if any(m.step == completed for m in client.get_metric_history(parent_id, name)):
        return
    point = Point(name, trial_value(best, key), int(time.time() * 1000), completed)
    client.log_batch(parent_id, metrics=[point])  # as MlflowClient.log_metric sends it


def keep_value(client: Tracker, mlflow_run_id: str, key: str, goal: str) -> None:
    """Tag the completed trial `mlflow_run_id` with its value (`VALUE_TAG`): the best finite
    value of its metric `key` by `goal`; nothing when it logged none."""
    values = [m.value for m in client.get_metric_history(mlflow_run_id, key)]
    finite = [v for v in values if _finite(v)]
    if finite:
        best = max(finite) if goal == "maximize" else min(finite)
        client.set_tag(mlflow_run_id, VALUE_TAG, repr(best))


def _finite(value: float) -> bool:
    """Whether a value MLflow gives back was finite when logged: a tracking store on SQL
    (`mlflow server`'s) stores +-inf as +-sys.float_info.max, which is taken for +-inf."""
    return math.isfinite(value) and abs(value) != sys.float_info.max


def trial_value(trial: Run, key: str) -> float:
    """A trial's value: its `VALUE_TAG`, else (a trial ended before the tag existed) the latest
    value of its metric `key`."""
    tagged = trial.tags.get(VALUE_TAG)
    try:
        return float(tagged) if tagged is not None else trial.metrics[key]
    except ValueError:
        return trial.metrics[key]


def parent_status(statuses: list[str]) -> str:
    """The parent's MLflow status from its trials' statuses: RUNNING while one is unfinished,
    then FINISHED if one completed, else FAILED if one failed, else KILLED."""
    for status in (*UNFINISHED, "FINISHED", "FAILED"):
        if status in statuses:
            return "RUNNING" if status in UNFINISHED else status
    return "KILLED" if statuses else "RUNNING"


def best_trial(completed: list[Run], key: str, goal: str) -> Run | None:
    """The best of the `completed` trials by their value of metric `key` and `goal`
    (maximize or minimize); a tie goes to the lower trial number."""
    sign = -1.0 if goal == "maximize" else 1.0

    def rank(trial: Run) -> tuple[float, float]:
        number = trial.tags.get(TRIAL_TAG, "")
        return sign * trial_value(trial, key), float(number) if number.isdigit() else 1e18

    # A trial that logged no finite value has no value (expkit tells it failed).
    valued = [t for t in completed if _finite(trial_value(t, key))]
    return min(valued, key=rank) if valued else None


def objective(spec: dict[str, Any]) -> tuple[str | None, str]:
    """The sweep spec's primary metric (None when it names none) and goal (default maximize)."""
    section = spec.get("objective")
    if not isinstance(section, dict) or not section.get("primary_metric"):
        return None, "maximize"
    goal = str(section.get("goal") or "maximize").lower()
    return str(section["primary_metric"]), goal


def spec_params(spec: dict[str, Any]) -> dict[str, str]:
    """The sweep spec in brief, as the parent run's params, each named by its place in the
    sweep's YAML: `search_space.<name>` (the expression as HyperDrive writes it,
    `loguniform(-9.2, -2.3)`), `sampling_algorithm` (its type) and its settings
    (`sampling_algorithm.seed`), `objective.primary_metric`, `objective.goal`,
    `early_termination` (the policy, or none) and its settings, `limits.<limit>`,
    `register_best`. The trial's job is not repeated: each trial holds its own params."""
    params: dict[str, str] = {}
    space = spec.get("search_space")
    if isinstance(space, dict):
        items = list(space.items())
    elif isinstance(space, list):  # a list of parameters, each naming itself
        items = [(str(p.get("name")), p) for p in space if isinstance(p, dict)]
    else:
        items = []
    for name, entry in items:
        params[f"search_space.{name}"] = expression(entry)
    for section in ("sampling_algorithm", "objective", "early_termination", "limits"):
        value = spec.get(section)
        if isinstance(value, dict):
            if "type" in value:
                params[section] = _text(value["type"])
            for key, setting in value.items():
                if key != "type" and setting is not None:
                    params[f"{section}.{key}"] = _text(setting)
        elif value is not None:
            params[section] = _text(value)
    if spec and spec.get("early_termination") is None:
        params["early_termination"] = "none"
    if "register_best" in spec:
        params["register_best"] = _text(spec["register_best"])
    return params


def expression(entry: Any) -> str:
    """A search-space entry as HyperDrive writes it: `choice(16, 32, 64)`, `uniform(0.8, 0.99)`
    (an entry given in that form already is kept as written)."""
    if isinstance(entry, dict):
        arguments: list[str] = []
        for key in _ARGUMENTS:
            value = entry.get(key)
            if value is None:
                continue
            if key == "values" and isinstance(value, list | tuple):
                arguments.extend(_literal(v) for v in value)
            else:
                arguments.append(_literal(value))
        return f"{entry.get('type', '?')}({', '.join(arguments)})"
    if isinstance(entry, list | tuple):
        return f"choice({', '.join(_literal(v) for v in entry)})"
    return _text(entry)


def note(sweep: str, experiment: str, spec: dict[str, Any]) -> str:
    """The parent run's description in MLflow's UI (the tag `mlflow.note.content`)."""
    primary, goal = objective(spec)
    lines = [f"expkit sweep `{sweep}` of experiment `{experiment}`: each trial is a child run."]
    if primary:
        lines.append(f"Objective: {goal} `{primary}` (the best so far: `best_{primary}`).")
    lines.append(f"`expkit sweeps show {sweep}` lists the trials by the objective.")
    return "\n\n".join(lines)


def _search(
    client: Tracker, experiment_id: str, query: str, order_by: list[str] | None = None
) -> list[Run]:
    """Every run of `experiment_id` that `query` selects, page after page."""
    return client.search_runs(experiment_id, query, order_by or ())


def _quoted(value: str) -> str:
    """`value` inside a quoted string of an MLflow search filter."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _literal(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str | dict | list | bool) else str(value)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, dict | list | bool) else str(value)
