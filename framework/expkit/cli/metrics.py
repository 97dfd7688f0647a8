"""`expkit metrics RUN [RUN ...] [NAME] [--plot FILE] [--all-attempts]`: one run's metrics,
several side by side, or their curves in a picture.

A run whose later attempt resumed from a checkpoint logged some steps twice: what is shown is
the current curve (`expkit.history.metrics.Metrics.current`); `--all-attempts` lists every
value kept, with the attempt that logged it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from expkit.cli.common import (
    examples_epilog,
    metric_cell,
    open_workspace,
    print_table,
    run_record,
    when,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `metrics` with its arguments."""
    metrics = commands.add_parser(
        "metrics",
        help="a run's metrics, or several runs side by side (--plot: a picture)",
        usage="expkit metrics RUN [RUN ...] [NAME] [--plot FILE.png] [--all-attempts]",
        description="One RUN: every logged value with its step; where a later attempt of the "
        "run (a retry, a requeue, `expkit runs resume`) logged a step again, its value "
        "supersedes the earlier one (--all-attempts: both, with their attempt). Several: the "
        "latest value of "
        "each metric, one column per run, each run named by its id and the parameters whose "
        "values differ between the runs (`test_3 (lr=0.01)`). NAME (a last argument that is "
        "not a run) keeps that metric only. --plot draws the numeric metrics' curves "
        "instead, one subplot per metric, the runs overlaid. A NAME no run logged is an "
        "error that lists the metrics they did.",
        epilog=examples_epilog(
            "expkit metrics latest",
            "expkit metrics latest val_acc",
            "expkit metrics 3 4 best_val_acc --plot curves.png",
        ),
    )
    metrics.add_argument(
        "refs", nargs="+", metavar="RUN", help="run id, run number, or `latest`; then NAME"
    )
    metrics.add_argument("--plot", metavar="FILE", help="write a picture (.png, .svg, .pdf)")
    metrics.add_argument(
        "--all-attempts",
        action="store_true",
        help="one run's every value, with the attempt that logged it, also those a later "
        "attempt superseded by logging the same step again",
    )
    metrics.set_defaults(handler=cmd_metrics)


def cmd_metrics(args: argparse.Namespace) -> int:
    """One run's metrics with their steps (its current curve; --all-attempts: every value
    with its attempt), several runs' latest values side by side, or (--plot) their curves in
    a picture; UserError for an unknown run, nothing to plot, or --all-attempts with --plot
    or several runs."""
    from expkit.errors import UserError

    workspace = open_workspace(args)
    records, name = _metric_refs(workspace, args.refs)
    all_attempts = getattr(args, "all_attempts", False)
    if all_attempts and (args.plot or len(records) > 1):
        raise UserError(
            "--all-attempts: lists one run's values (plots and comparisons show the current "
            "curves); give one run, without --plot"
        )
    if args.plot:
        return _plot_metrics(workspace, records, name, Path(args.plot))
    if len(records) > 1:
        return _compare_metrics(workspace, records, name)
    return _one_run(workspace, records[0], name, all_attempts)


def _one_run(workspace: Any, record: Any, name: str | None, all_attempts: bool) -> int:
    """One run's values with their steps: its current curve, or (all_attempts) every value
    kept. An ATTEMPT column when the values shown come from more than one attempt (always
    with all_attempts), and a last line saying how many superseded values are not shown."""
    from expkit.console import format_value
    from expkit.history import metric_value

    metrics = workspace.history.metrics
    # The rows and their count (the superseded values, below) from one read transaction: a
    # pump storing values between the two reads would make them look superseded.
    with metrics.reading():
        rows = metrics.of(record.id, name) if all_attempts else metrics.current(record.id, name)
        total = 0 if all_attempts else metrics.count(record.id, name)
    if not rows and name is not None:
        raise _no_such_metric(name, [record.id], list(metrics.latest(record.id)))
    if not rows:
        print(f"run {record.id} has no metrics")
        return 0
    attempts = all_attempts or len({r["attempt"] for r in rows}) > 1
    table = [
        [
            r["name"],
            "-" if r["step"] is None else str(r["step"]),
            *([str(r["attempt"])] if attempts else []),
            format_value(metric_value(r)),
            when(r["ts"]),
        ]
        for r in rows
    ]
    print_table(["METRIC", "STEP", *(["ATTEMPT"] if attempts else []), "VALUE", "TIME"], table)
    hidden = 0 if all_attempts else total - len(rows)
    if hidden:
        values = "value" if hidden == 1 else "values"
        print(
            f"(not shown: {hidden} {values} of earlier attempts, logged again by a later "
            "attempt; --all-attempts shows them)"
        )
    return 0


def _metric_refs(workspace: Any, refs: list[str]) -> tuple[list[Any], str | None]:
    """`RUN [RUN ...] [NAME]`: the runs, and the metric name if the last word is not a run."""
    records: dict[str, Any] = {}
    for i, ref in enumerate(refs):
        record = workspace.history.runs.find(ref)
        if record is None and 0 < i == len(refs) - 1:
            return list(records.values()), ref
        record = record or run_record(workspace, ref)  # raises: no such run
        records.setdefault(record.id, record)
    return list(records.values()), None


def _no_such_metric(name: str, run_ids: list[str], known: list[str]) -> Exception:
    """The UserError (exit 2) for a metric NAME the runs never logged: it names the metrics
    they did, and says so when NAME looks like a mistyped run (`metrics 1 7`)."""
    from expkit.errors import UserError, quoted

    looks_like_run = name == "latest" or name.isdigit() or re.fullmatch(r".+_\d+", name)
    also = f" (and there is no run {quoted(name)})" if looks_like_run else ""
    if len(run_ids) == 1:
        head, logged = f"run {run_ids[0]} has", "its metrics" if known else "it logged none"
    else:
        head = f"runs {', '.join(run_ids)} have"
        logged = "their metrics" if known else "they logged none"
    listed = f": {', '.join(known)}" if known else ""
    return UserError(f"{head} no metric {quoted(name)}{also}; {logged}{listed}")


def run_labels(workspace: Any, run_ids: list[str]) -> dict[str, str]:
    """Each run's name where several are compared: its id, then the parameters whose values
    differ between the runs, `test_3 (lr=0.01, batch=64)`; the id alone when none differ.
    A parameter one run lacks differs (that run's label leaves it out). A path inside a
    run's own folder (a `${data.x}` argument) is the same in every run."""
    from expkit.outputs import escaped

    params = workspace.history.params.of_runs(run_ids)

    def compared(run_id: str, key: str) -> str | None:
        value = params[run_id].get(key)
        if value is None:
            return None
        return re.sub(rf"(?<![^/\\]){re.escape(run_id)}(?![^/\\])", "{run}", value)

    keys = dict.fromkeys(key for found in params.values() for key in found)
    differ = [k for k in keys if len({compared(run_id, k) for run_id in run_ids}) > 1]
    labels = {}
    for run_id in run_ids:
        shown = [
            f"{escaped(k)}={_short(escaped(params[run_id][k]))}"
            for k in differ
            if k in params[run_id]
        ]
        labels[run_id] = f"{run_id} ({', '.join(shown)})" if shown else run_id
    return labels


def _short(value: str, most: int = 40) -> str:
    """A long value in a label: its start and end (paths differ at the end)."""
    if len(value) <= most:
        return value
    half = (most - 3) // 2
    return f"{value[:half]}...{value[-half:]}"


def _compare_metrics(workspace: Any, records: list[Any], name: str | None) -> int:
    """Runs side by side: a row per metric, each run's latest value; the runs named by the
    parameters that differ between them (`run_labels`)."""
    latest = {r.id: workspace.history.metrics.latest(r.id) for r in records}
    names = dict.fromkeys(n for values in latest.values() for n in values if name in (None, n))
    if not names and name is not None:
        known = list(dict.fromkeys(n for values in latest.values() for n in values))
        raise _no_such_metric(name, list(latest), known)
    if not names:
        print(f"runs {', '.join(latest)} have no metrics")
        return 0
    rows = [[n, *(metric_cell(v[n]) if n in v else "-" for v in latest.values())] for n in names]
    labels = run_labels(workspace, list(latest))
    print_table(["METRIC", *labels.values()], rows)
    return 0


def _plot_metrics(workspace: Any, records: list[Any], name: str | None, path: Path) -> int:
    """The runs' numeric metric curves in one picture; says what it drew."""
    from expkit import plot
    from expkit.errors import UserError

    plot.check_file(path)  # before reading what may be millions of values
    runs, skipped = {}, {}
    for record in records:
        runs[record.id], not_numeric = plot.curves(workspace.history, record.id, name)
        skipped.update(dict.fromkeys(not_numeric))
    empty = [run for run, curves in runs.items() if not curves]
    runs = {run: curves for run, curves in runs.items() if curves}
    if not runs:
        what = f"numeric metric {name!r}" if name else "numeric metrics"
        why = f" (not numeric: {', '.join(skipped)})" if skipped else ""
        plural = "s" if len(records) > 1 else ""
        ids = ", ".join(r.id for r in records)
        raise UserError(f"nothing to plot: no {what} in run{plural} {ids}{why}")
    labels = run_labels(workspace, list(runs))
    plot.plot_runs(runs, path, labels)
    names = list(dict.fromkeys(n for curves in runs.values() for n in curves))
    print(f"wrote {path}")
    print(f"  runs     {', '.join(labels.values())}")
    print(f"  metrics  {', '.join(names)}")
    if empty:
        print(f"  no numeric metrics in {', '.join(empty)}: not shown")
    if skipped:
        print(f"  not numeric, not plotted: {', '.join(skipped)}")
    return 0
