"""Handlers of `expkit sweep FILE`, `expkit sweeps resume` and `expkit sweeps cancel`: the
driver's side of the CLI (starting, watching, resuming, stopping a sweep).

`expkit sweep` drives the sweep in this process (`expkit.sweeps.driver.drive`) and shows a
live table of its trials, redrawn in place on a terminal, one line per change otherwise;
`--detach` leaves it to a background driver. Exit codes are the sweep's end: 0 completed,
1 failed, 130 canceled (Ctrl-C, `expkit sweeps cancel`); a sweep stopped by its
`limits.timeout` ends completed (0), as Azure ML's.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from expkit.cli.common import open_workspace

EXIT_FOR_STATE = {"completed": 0, "failed": 1, "canceled": 130}
PREVIEW_TRIALS = 5  # how many trials `--dry-run` shows at most
CANCEL_WAIT_SECONDS = 15.0  # how long `expkit sweeps cancel` waits for a live driver to act


def cmd_sweep(args: argparse.Namespace) -> int:
    """Start (or with --dry-run, preview) the sweep `args.file`; drive it here (live table)
    or with --detach in the background."""
    from expkit import lifecycle
    from expkit.plugins import get_plugins
    from expkit.sweeps.driver import start, start_background
    from expkit.sweeps.spec import SweepSpec

    spec = SweepSpec.from_yaml(args.file, args.overrides)
    if args.dry_run:
        return dry_run(args.file, spec)
    lifecycle.choose(spec.job, get_plugins())  # a plugin the job names is missing: exit 2 now
    workspace = open_workspace(args, create=True)
    record = start(workspace, spec)
    if args.detach:
        start_background(workspace, record.id)
        return _detached(workspace, record.id)
    return watch(workspace, record.id)


def cmd_sweeps_resume(args: argparse.Namespace) -> int:
    """Take over sweep `args.sweep_id`, whose driver is gone, and drive it to its end."""
    from expkit.errors import UserError
    from expkit.history import driver_alive
    from expkit.sweeps.driver import start_background, take_over

    workspace = open_workspace(args)
    record = sweep_record(workspace, args.sweep_id)
    if record.finished:
        raise UserError(f"sweep {record.id} already {record.state}; nothing to resume")
    if driver_alive(record.driver_pid, record.driver_start) or not take_over(workspace, record.id):
        raise UserError(
            f"sweep {record.id} is still driven (pid {record.driver_pid}); "
            f"`expkit sweeps show {record.number}` shows it, `expkit sweeps cancel` stops it"
        )
    if args.detach:
        start_background(workspace, record.id)
        return _detached(workspace, record.id)
    return watch(workspace, record.id)


def cmd_sweeps_cancel(args: argparse.Namespace) -> int:
    """Ask sweep `args.sweep_id`'s driver to stop it (and its running trials), waiting a
    little for it to do so; a sweep whose driver is gone is canceled here."""
    from expkit.history import driver_alive
    from expkit.sweeps.driver import take_over

    workspace = open_workspace(args)
    record = sweep_record(workspace, args.sweep_id)
    if record.finished:
        print(f"sweep {record.id} already {record.state}")
        return 0
    history = workspace.history
    history.sweeps.request_cancel(record.id)
    if driver_alive(record.driver_pid, record.driver_start):
        print(f"asked sweep {record.id} to stop; its driver cancels its running trials")
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        while time.monotonic() < deadline:
            if history.sweeps.get(record.id).finished:
                print(f"sweep {record.id} canceled")
                return 0
            time.sleep(0.25)
        print(f"sweep {record.id} is still stopping; `expkit sweeps show {record.number}`")
        return 0
    if not take_over(workspace, record.id):  # a resume took it over meanwhile: it acts
        print(f"asked sweep {record.id} to stop")
        return 0
    cancel_orphaned(workspace, record.id)
    print(f"sweep {record.id} canceled (its driver was gone); its running trials asked to stop")
    return 0


def cancel_orphaned(workspace: Any, sweep_id: str) -> None:
    """Cancel sweep `sweep_id`, whose driver is gone, here: its unfinished trials' runs are
    asked to stop, its running Optuna trials told FAIL, the sweep ended canceled."""
    from optuna.trial import TrialState

    from expkit.sweeps.spec import SweepSpec
    from expkit.sweeps.study import open_study

    history = workspace.history
    reason = f"sweep {sweep_id} canceled"
    for run in history.runs.of_sweep(sweep_id):
        if not run.finished:
            history.runs.request_cancel(run.id, reason)
    spec = SweepSpec.from_dict(history.sweeps.get(sweep_id).spec, source=f"sweep {sweep_id}")
    study = open_study(workspace, sweep_id, spec)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
    history.sweeps.finish(sweep_id, "canceled", "canceled by `expkit sweeps cancel`")


def sweep_record(workspace: Any, ref: str) -> Any:
    """The sweep `ref` names (id, number or `latest`); UserError when there is none."""
    from expkit.errors import UserError, quoted

    record = workspace.history.sweeps.find(ref)
    if record is None:
        raise UserError(
            f"no sweep {quoted(ref)} in {workspace.path}; `expkit sweeps list` shows the sweeps"
        )
    return record


def _detached(workspace: Any, sweep_id: str) -> int:
    from expkit.sweeps.driver import DRIVER_LOG

    number = workspace.history.sweeps.get(sweep_id).number
    print(f"sweep {number} ({sweep_id}) goes on in the background")
    print(f"  see it:     expkit sweeps show {number}")
    print(f"  stop it:    expkit sweeps cancel {number}")
    print(f"  its driver's log: {workspace.sweep_dir(sweep_id) / DRIVER_LOG}")
    return 0


def watch(workspace: Any, sweep_id: str) -> int:
    """Drive sweep `sweep_id` here, showing its trials live; then the best trial, its
    parameters, value and registered model. Returns the exit code for its end."""
    from expkit.sweeps.driver import LineReporter, Reporter, drive, format_number, format_values
    from expkit.sweeps.live import LiveTable

    record = workspace.history.sweeps.get(sweep_id)
    limits = record.spec.get("limits", {})
    total = limits.get("max_total_trials")
    at_once = limits.get("max_concurrent_trials", 1)
    print(
        f"sweep {sweep_id} in workspace {workspace.path}: "
        + (f"up to {total} trials, " if total and total > 1 else "1 trial, " if total else "")
        + f"{at_once} at once; Ctrl-C cancels it",
        flush=True,
    )
    metric = record.spec["objective"]["primary_metric"]
    reporter: Reporter = (
        LiveTable(sys.stdout, metric) if sys.stdout.isatty() else LineReporter(sys.stdout)
    )
    try:
        record = drive(workspace, sweep_id, reporter)
    finally:
        if isinstance(reporter, LiveTable):
            reporter.close()
    print()
    said = record.error or ""
    if said.startswith(record.state):
        print(f"sweep {record.id}: {said}")  # "canceled by Ctrl-C"
    else:
        print(f"sweep {record.id}: {record.state}" + (f" ({said})" if said else ""))
    best = reporter.best
    if record.best_run:
        run = workspace.history.runs.get(record.best_run)
        from expkit.sweeps.report import trial_rows

        # The trial's value: the best it logged of the primary metric (as `sweeps show`).
        found = [r for r in trial_rows(workspace, record) if r.run_id == run.id]
        value = found[0].best if found else None
        values = best.values if best is not None and best.run_id == run.id else _values(run)
        print(f"best trial: {run.trial} (run {run.id}), {metric} {format_number(value)}")
        print(f"  parameters: {format_values(values)}")
    else:
        print("best trial: none completed")
    if record.model:
        print(f"  registered model: {record.model}")
    return EXIT_FOR_STATE.get(record.state, 1)


def _values(run: Any) -> dict[str, Any]:
    """A trial run's arguments, as its job recorded them (a dict's, or a list's pairs)."""
    import itertools

    args = run.job.get("args") or {}
    if isinstance(args, dict):
        return dict(args)
    pairs = {}
    for name, value in itertools.pairwise(args):
        if str(name).startswith("--"):
            pairs[str(name)[2:]] = value
    return pairs


def dry_run(source: str, spec: Any) -> int:
    """Print the checked spec in brief and the first trials it would start, each with the
    arguments its run would get; start nothing, write nothing."""
    import dataclasses
    import shlex

    from expkit.sweeps.driver import format_values
    from expkit.sweeps.space import grid_size, preview, trial_job

    limits = spec.limits
    policy = spec.early_termination
    described = []
    for parameter in spec.search_space:
        fields = {
            k: v
            for k, v in dataclasses.asdict(parameter).items()
            if k not in ("name", "type") and v not in (None, ())
        }
        shown = ", ".join(
            ", ".join(map(repr, v)) if k == "values" else f"{k}={v}" for k, v in fields.items()
        )
        described.append(f"{parameter.name}: {parameter.type}({shown})")
    sampling = spec.sampling.type + (f", seed {spec.sampling.seed}" if spec.sampling.seed else "")
    if spec.sampling.type == "random" and spec.sampling.rule != "random":
        sampling += f", rule {spec.sampling.rule}"
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
    size = grid_size(spec)
    caps = [n for n in (limits.max_total_trials, size) if n is not None]
    count = min([PREVIEW_TRIALS, *caps])
    lines = [
        ("job", f"{spec.job.experiment}: python {spec.job.entry_script} "
                f"(compute {spec.job.compute.target})"),
        ("search space", "; ".join(described)),
        ("sampling", sampling + (f" ({size} combinations)" if size is not None else "")),
        ("objective", f"{spec.objective.goal} {spec.objective.primary_metric}"),
        ("early stop", _policy(policy) if policy else "none"),
        ("limits", ", ".join(
            f"{k} {v:g}{' s' if 'timeout' in k else ''}" if isinstance(v, float) else f"{k} {v}"
            for k, v in dataclasses.asdict(limits).items() if v is not None)),
        ("register", "the best trial's model" if spec.register_best else "nothing"),
    ]  # fmt: skip
    print(f"dry run of {source} (nothing is started)")
    for name, text in lines:
        print(f"  {name:<13} {text}")
    print(f"the first {count} trial{'s' * (count != 1)}:")
    for number, values in enumerate(preview(spec, count)):
        job = trial_job(spec, values)
        command = [
            "python",
            job.entry_script,
            *job.command_args({k: f"<data {k}>" for k in job.data}),
        ]
        print(f"  trial {number}: {format_values(values)}")
        print(f"    {shlex.join(command)}")
    return 0


def _policy(policy: Any) -> str:
    import dataclasses

    halving = policy.type in ("successive_halving", "hyperband")
    fields = {
        k: v
        for k, v in dataclasses.asdict(policy).items()
        if k != "type" and v is not None and (halving or k != "reduction_factor")
    }
    return f"{policy.type} (" + ", ".join(f"{k} {v}" for k, v in fields.items()) + ")"
