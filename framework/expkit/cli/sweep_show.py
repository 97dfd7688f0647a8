"""Handlers of `expkit sweeps list` and `expkit sweeps show` (reading the records).

Both read the run history only (`expkit.sweeps.report`); `show --plot` reads the sweep's
Optuna study too (`expkit.sweeps.plot`). Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from expkit.cli.common import open_workspace, print_table, when


def cmd_sweeps_list(args: argparse.Namespace) -> int:
    """The latest sweeps: id, state, created, trials (by state), best trial and its primary
    metric's value."""
    from expkit.sweeps.report import best_row, count_states, objective_of, trial_rows

    workspace = open_workspace(args)
    sweeps = workspace.history.sweeps.recent(args.experiment, args.limit)
    if not sweeps and args.experiment:
        if args.experiment not in workspace.history.runs.experiments():
            from expkit.cli.runs import no_such_experiment

            no_such_experiment(workspace, args.experiment)  # as `runs list --experiment`
        print(f"experiment {args.experiment} has no sweeps yet")
        return 0
    if not sweeps:
        print("no sweeps yet; start one with `expkit sweep SWEEP.yaml`")
        return 0
    rows = []
    for sweep in sweeps:
        trials = trial_rows(workspace, sweep)
        metric, goal = objective_of(sweep.spec)
        best = best_row(trials, goal)
        rows.append(
            [
                sweep.id,
                sweep.state + _driver_gone(sweep),
                when(sweep.created),
                count_states(trials),
                _best_cell(best, metric),
            ]
        )
    print_table(["SWEEP", "STATE", "CREATED", "TRIALS", "BEST"], rows)
    return 0


def _driver_gone(sweep: Any) -> str:
    """For a running sweep whose driver is dead: how to go on with it (`sweeps list`)."""
    from expkit.history import driver_alive

    if sweep.finished or driver_alive(sweep.driver_pid, sweep.driver_start):
        return ""
    return f" (driver gone: expkit sweeps resume {sweep.number})"


def _best_cell(best: Any, metric: str) -> str:
    if best is None:
        return "-"
    return f"trial {best.trial} ({best.run_id}): {metric} {best.best:.4g}"


def cmd_sweeps_show(args: argparse.Namespace) -> int:
    """One sweep: its spec in brief, state, best trial, the trials sorted by the objective;
    --json: the same as strict JSON; --plot FILE.png: the optimization history and the
    parameters' importances (or parallel coordinates) drawn into FILE."""
    from expkit.sweeps.best import sweep_record
    from expkit.sweeps.report import (
        best_row,
        count_states,
        objective_of,
        render,
        space_names,
        trial_rows,
    )

    workspace = open_workspace(args)
    sweep = sweep_record(workspace, args.sweep_id)
    if args.plot:  # first: a picture that cannot be drawn is the one error, before any output
        from expkit.sweeps.plot import plot_sweep

        panel = plot_sweep(workspace, sweep, Path(args.plot))
        drawn = f"wrote {args.plot} (optimization history, {panel})"
    trials = trial_rows(workspace, sweep)
    metric, goal = objective_of(sweep.spec)
    best = best_row(trials, goal)
    if args.json:
        from expkit.cli import jsonout

        print(jsonout.dumps(_details(workspace, sweep, trials, best)))
        return 0
    spec = sweep.spec
    print(f"sweep              {sweep.id}")
    print(f"experiment         {sweep.experiment}")
    print(f"state              {sweep.state}" + _driver_note(sweep))
    print(f"created            {when(sweep.created)}")
    if sweep.ended:
        print(f"ended              {when(sweep.ended)}")
    if sweep.error:
        print(f"error              {sweep.error}")
    for label, text in _spec_lines(spec):
        print(f"{label:<18} {text}")
    print(f"trials             {count_states(trials)}")
    if best is not None:
        print(f"best trial         {best.trial} (run {best.run_id}): {metric} {best.best:.4g}")
        if best.params:
            shown = ", ".join(f"{k}={v}" for k, v in best.params.items())
            print(f"  parameters       {shown}")
    else:
        print("best trial         - (no trial completed with a value yet)")
    if sweep.model:
        print(f"registered model   {sweep.model}")
    if trials:
        print()
        for line in render(trials, (metric, goal), space_names(spec), best):
            print(line)
    if args.plot:
        print(f"\n{drawn}")
    return 0


def _details(workspace: Any, sweep: Any, trials: list[Any], best: Any) -> dict[str, Any]:
    """`sweeps show --json`: the record, the trials sorted by the objective, the best."""
    from expkit.history import driver_alive
    from expkit.sweeps.report import objective_of, sorted_rows

    metric, goal = objective_of(sweep.spec)
    counts: dict[str, int] = {}
    for row in trials:
        counts[row.state] = counts.get(row.state, 0) + 1
    return {
        "id": sweep.id,
        "number": sweep.number,
        "experiment": sweep.experiment,
        "state": sweep.state,
        "created": sweep.created,
        "ended": sweep.ended,
        "error": sweep.error,
        "objective": {"primary_metric": metric, "goal": goal},
        "spec": sweep.spec,
        "best": None
        if best is None
        else {
            "trial": best.trial,
            "run_id": best.run_id,
            "value": best.best,
            "params": best.params,
        },
        "model": sweep.model,
        "driver": {
            "pid": sweep.driver_pid,
            "host": sweep.driver_host,
            "alive": driver_alive(sweep.driver_pid, sweep.driver_start),
        },
        "counts": counts,
        "trials": [row.to_dict() for row in sorted_rows(trials, goal)],
    }


def _driver_note(sweep: Any) -> str:
    """For a running sweep: whether its driver still runs (else `expkit sweeps resume`)."""
    from expkit.history import driver_alive

    if sweep.finished:
        return ""
    if driver_alive(sweep.driver_pid, sweep.driver_start):
        return f" (driver pid {sweep.driver_pid})"
    return " (its driver is gone: `expkit sweeps resume` goes on with it)"


def _spec_lines(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """The sweep spec in brief, (label, text) per line: the job, the search space, the
    sampling, the objective, the early termination policy, the limits."""
    lines = [("job", _job(spec.get("job")))]
    space = spec.get("search_space") or {}
    items = (
        list(space.items())
        if isinstance(space, dict)
        else [(p.get("name", "?"), p) for p in space if isinstance(p, dict)]
    )
    for i, (name, parameter) in enumerate(items):
        lines.append(("search space" if i == 0 else "", f"{name}: {_expression(parameter)}"))
    sampling = spec.get("sampling_algorithm", spec.get("sampling"))
    lines.append(("sampling", _settings(sampling) if sampling else "random"))
    objective = spec.get("objective") or {}
    lines.append(
        ("objective", f"{objective.get('goal', 'maximize')} {objective.get('primary_metric')}")
    )
    policy = spec.get("early_termination")
    lines.append(("early termination", _settings(policy) if policy else "none"))
    limits = spec.get("limits")
    if limits:
        lines.append(("limits", _settings(limits, named=False)))
    if spec.get("register_best"):
        lines.append(("register best", "yes"))
    return lines


def _job(job: Any) -> str:
    if isinstance(job, dict):
        where = job.get("source_directory", "")
        return f"{job.get('entry_script', '?')} in {where} (experiment {job.get('experiment')})"
    return str(job)


def _expression(parameter: Any) -> str:
    """A search-space entry as HyperDrive writes it: `loguniform(-9.2, -2.3)`, or its text."""
    if not isinstance(parameter, dict):
        return str(parameter)
    kind = parameter.get("type", "?")
    fields = {k: v for k, v in parameter.items() if k not in ("type", "name") and v is not None}
    if fields.get("values") == [] or fields.get("values") == ():
        fields.pop("values")
    if set(fields) == {"values"}:
        return f"{kind}({', '.join(map(repr, fields['values']))})"
    return f"{kind}(" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"


def _setting(name: str, value: Any) -> str:
    """One setting's value: a number as written (600, not 600.0), timeouts in seconds."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{text} s" if name in ("timeout", "trial_timeout") else text


def _settings(value: Any, named: bool = True) -> str:
    """A mapping of settings on one line: `bandit (slack_factor 0.1, delay_evaluation 2)`
    (`named`: its `type` first), unset ones left out."""
    if not isinstance(value, dict):
        return str(value)
    rest = {k: v for k, v in value.items() if k != "type" and v is not None}
    text = ", ".join(f"{k} {_setting(k, v)}" for k, v in rest.items())
    if named:
        kind = str(value.get("type", "?"))
        return f"{kind} ({text})" if text else kind
    return text or "-"
