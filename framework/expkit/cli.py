"""The `expkit` command.

Start-up stays light: argparse only; each command imports what it needs when it runs.
Exit codes: 0 done, 1 the run failed (or an internal error), 2 bad input, 130 canceled.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

EXIT_FOR_STATE = {"completed": 0, "failed": 1, "canceled": 130}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expkit",
        description="Run PyTorch training jobs through prepare -> scale -> run -> post-process "
        "-> register, recorded in a workspace.",
        epilog="Start with `expkit run training/job.yaml`. Every command takes --help.",
    )
    parser.add_argument(
        "--workspace",
        metavar="PATH",
        help="the workspace folder (default: $EXPKIT_WORKSPACE, else the "
        "nearest .expkit/ above the current folder)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and trace hooks")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run a job spec through the whole lifecycle",
        description="Run JOB (a YAML job spec) in the workspace, showing "
        "stage progress and the script's output live. Ctrl-C stops the "
        "script, keeps its outputs and marks the run canceled.",
    )
    run.add_argument("job", metavar="JOB", help="the job spec, e.g. training/job.yaml")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set args.num_epochs=2 --set compute=local",
    )
    run.add_argument("--all-ranks", action="store_true", help="show every rank's output")
    run.add_argument("--quiet", action="store_true", help="show the script's output only")
    run.set_defaults(handler=cmd_run)

    runs = commands.add_parser("runs", help="list and inspect runs").add_subparsers(
        dest="runs_command", metavar="ACTION", required=True
    )
    listing = runs.add_parser("list", help="the latest runs, newest first")
    listing.add_argument("--experiment", help="only this experiment's runs")
    listing.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    listing.set_defaults(handler=cmd_runs_list)
    show = runs.add_parser("show", help="a run's state, stages, metrics and outputs")
    show.add_argument("run_id", metavar="RUN", help="run id, run number, or `latest`")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=cmd_runs_show)
    logs = runs.add_parser("logs", help="a run's output (--follow to watch it live)")
    logs.add_argument("run_id", metavar="RUN")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until it ends")
    logs.add_argument("--rank", type=int, default=0, help="which rank's output (default 0)")
    logs.set_defaults(handler=cmd_runs_logs)
    cancel = runs.add_parser("cancel", help="stop a run (its outputs are kept)")
    cancel.add_argument("run_id", metavar="RUN")
    cancel.set_defaults(handler=cmd_runs_cancel)
    files = runs.add_parser("files", help="the run's files (outputs/ and logs/)")
    files.add_argument("run_id", metavar="RUN")
    files.set_defaults(handler=cmd_runs_files)
    download = runs.add_parser("download", help="copy one of a run's files")
    download.add_argument("run_id", metavar="RUN")
    download.add_argument("name", metavar="NAME", help="a name from `expkit runs files RUN`")
    download.add_argument("dest", metavar="DEST", help="file or folder to write")
    download.set_defaults(handler=cmd_runs_download)

    metrics = commands.add_parser(
        "metrics",
        help="a run's metrics, or several runs side by side (--plot: a picture)",
        usage="expkit metrics RUN [RUN ...] [NAME] [--plot FILE.png]",
        description="One RUN: every logged value with its step. Several: the latest value of "
        "each metric, one column per run. NAME (a last argument that is not a run) keeps "
        "that metric only. --plot draws the numeric metrics' curves instead, one subplot per "
        "metric, the runs overlaid.",
    )
    metrics.add_argument(
        "refs", nargs="+", metavar="RUN", help="run id, run number, or `latest`; then NAME"
    )
    metrics.add_argument("--plot", metavar="FILE", help="write a picture (.png, .svg, .pdf)")
    metrics.set_defaults(handler=cmd_metrics)

    models = commands.add_parser("models", help="registered models").add_subparsers(
        dest="models_command", metavar="ACTION", required=True
    )
    models.add_parser("list", help="every model and its versions").set_defaults(
        handler=cmd_models_list
    )
    mshow = models.add_parser("show", help="a model version's files and lineage")
    mshow.add_argument("ref", metavar="NAME[:VERSION]", help="latest version unless given")
    mshow.set_defaults(handler=cmd_models_show)
    mdown = models.add_parser("download", help="copy a model version's files")
    mdown.add_argument("ref", metavar="NAME[:VERSION]")
    mdown.add_argument("dest", metavar="DEST", help="folder to write into")
    mdown.set_defaults(handler=cmd_models_download)

    plugins = commands.add_parser("plugins", help="installed plugins and what they supply")
    plugins.set_defaults(handler=cmd_plugins)

    init = commands.add_parser("init", help="create a workspace (.expkit/) in a folder")
    init.add_argument("path", nargs="?", default=".", help="the folder (default: here)")
    init.set_defaults(handler=cmd_init)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from expkit.errors import PluginError, UserError

    if args.debug:
        import os

        os.environ.setdefault("EXPKIT_TRACE", "1")
    try:
        return args.handler(args) or 0
    except UserError as error:
        print(f"expkit: error: {error}", file=sys.stderr)
        return error.exit_code
    except PluginError as error:
        if args.debug:
            raise
        print(f"expkit: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as error:
        if args.debug:
            raise
        print(
            f"expkit: internal error: {type(error).__name__}: {error} (rerun with --debug "
            "for the traceback)",
            file=sys.stderr,
        )
        return 1


def _version() -> str:
    from expkit import __version__

    return f"expkit {__version__}"


# -- helpers ---------------------------------------------------------------------------------
def _workspace(args: argparse.Namespace, create: bool = False) -> Any:
    from expkit.errors import UserError
    from expkit.workspace import Workspace

    try:
        return Workspace.find(args.workspace)
    except UserError:
        if not create or args.workspace:
            raise
    workspace = Workspace.init(Path.cwd())
    print(
        f"expkit: created workspace {workspace.path} (`expkit init` makes one elsewhere)",
        file=sys.stderr,
    )
    return workspace


def _run_record(workspace: Any, ref: str) -> Any:
    from expkit.errors import UserError

    record = workspace.history.find_run(ref)
    if record is None:
        raise UserError(f"no run {ref!r} in {workspace.path}; `expkit runs list` shows the runs")
    return record


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip())


# -- commands --------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from expkit import lifecycle
    from expkit.console import Console
    from expkit.errors import UserError
    from expkit.job import JobSpec

    job = JobSpec.from_yaml(args.job, args.overrides)
    workspace = _workspace(args, create=True)
    try:
        record = lifecycle.submit(workspace, job)
    except UserError as error:  # a plugin the job names is missing or refuses the job
        raise UserError(f"{args.job}: {error}") from None
    console = Console(ranks="all" if args.all_ranks else "0", quiet=args.quiet)
    try:
        record = lifecycle.execute(workspace, record.id, console)
    finally:
        console.close()
    print_summary(workspace, record, console)
    return EXIT_FOR_STATE.get(record.state, 1)


def print_summary(workspace: Any, record: Any, console: Any) -> None:
    from expkit.console import format_value, human_seconds, human_size

    history = workspace.history
    state_color = {"completed": "32", "failed": "31", "canceled": "33"}.get(record.state, "0")
    console.line()
    console.line(f"run {console.style(record.id, '1')}: {console.style(record.state, state_color)}")
    rows: list[tuple[str, Any]] = []
    for stage in history.stages(record.id):
        when = human_seconds(stage.seconds) if stage.state != "skipped" else "-"
        rows.append((stage.stage, f"{stage.state:<9} {when:>8}  {stage.message or ''}".rstrip()))
    metrics = history.latest_metrics(record.id)
    if metrics:
        shown = [f"{k} {format_value(v)}" for k, v in metrics.items() if not isinstance(v, dict)]
        rows.append(("metrics", ", ".join(shown)))
    outputs = history.outputs(record.id)
    rows.append(
        ("outputs", f"{len(outputs)} files, {human_size(sum(s for s, _ in outputs.values()))}")
    )
    if record.error:
        rows.append(("error", record.error))
    rows.append(("details", f"expkit runs show {record.id}"))
    console.table(rows)


def cmd_runs_list(args: argparse.Namespace) -> int:
    from expkit.console import human_seconds

    workspace = _workspace(args)
    records = workspace.history.runs(args.experiment, args.limit)
    if not records:
        print("no runs yet; start one with `expkit run JOB`")
        return 0
    rows = []
    for r in records:
        took = (r.ended or time.time()) - r.created
        rows.append(
            [
                r.id,
                r.state,
                _when(r.created),
                human_seconds(took),
                "-" if r.exit_code is None else str(r.exit_code),
            ]
        )
    _print_table(["RUN", "STATE", "CREATED", "DURATION", "EXIT"], rows)
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    from expkit.api import Run
    from expkit.console import format_value, human_seconds, human_size

    workspace = _workspace(args)
    record = _run_record(workspace, args.run_id)
    history = workspace.history
    if args.json:
        details = Run(workspace, record.id).get_details()
        details["metrics"] = history.latest_metrics(record.id)
        details["outputs"] = {
            p: {"size": s, "sha256": d} for p, (s, d) in history.outputs(record.id).items()
        }
        print(json.dumps(details, indent=2, default=str))
        return 0
    print(f"run         {record.id}")
    print(f"experiment  {record.experiment}")
    print(f"state       {record.state}" + (f" ({record.status})" if record.status else ""))
    print(f"created     {_when(record.created)}")
    if record.ended:
        print(f"ended       {_when(record.ended)}")
    if record.exit_code is not None:
        print(f"exit code   {record.exit_code}")
    if record.error:
        print(f"error       {record.error}")
    print(f"script      {record.job['entry_script']} in {record.job['source_directory']}")
    if record.snapshot_hash:
        print(f"snapshot    {record.snapshot_hash[:16]}")
    if record.environment_hash:
        print(f"environment {record.environment_hash}")
    print("\nstages")
    for stage in history.stages(record.id):
        took = human_seconds(stage.seconds) if stage.state != "skipped" else "-"
        print(f"  {stage.stage:<13} {stage.state:<9} {took:>8}  {stage.message or ''}".rstrip())
    metrics = history.latest_metrics(record.id)
    if metrics:
        print("\nmetrics (latest value)")
        for name, value in metrics.items():
            print(f"  {name:<24} {format_value(value)}")
    tags = history.tags(record.id)
    if tags:
        print("\ntags")
        for key, value in tags.items():
            print(f"  {key:<24} {value}")
    outputs = history.outputs(record.id)
    if outputs:
        print("\noutputs")
        for path, (size, digest) in outputs.items():
            print(f"  {path:<40} {human_size(size):>10}  sha256:{digest[:12]}")
    for event in history.events(record.id, "warning") + history.events(record.id, "sink-failed"):
        print(f"\nwarning: {event['message']}")
    return 0


def cmd_runs_logs(args: argparse.Namespace) -> int:
    from expkit.console import Console
    from expkit.errors import UserError
    from expkit.follow import follow

    workspace = _workspace(args)
    record = _run_record(workspace, args.run_id)
    run_dir = workspace.run_dir(record.id)
    if args.follow:
        follow(workspace, record.id, Console(), rank=args.rank)
        return 0
    log = run_dir / "logs" / f"rank-{args.rank}.log"
    if not log.exists():
        if record.finished or args.rank != 0:
            raise UserError(f"run {record.id} has no output for rank {args.rank}")
        return 0
    with open(log, "rb") as f:
        sys.stdout.buffer.write(f.read())
    return 0


def cmd_runs_cancel(args: argparse.Namespace) -> int:
    workspace = _workspace(args)
    record = _run_record(workspace, args.run_id)
    if record.finished:
        print(f"run {record.id} already {record.state}")
        return 0
    workspace.history.request_cancel(record.id)
    print(f"asked run {record.id} to stop; its driver stops the script and keeps its outputs")
    return 0


def cmd_runs_files(args: argparse.Namespace) -> int:
    from expkit.api import Run

    workspace = _workspace(args)
    for name in Run(workspace, _run_record(workspace, args.run_id).id).get_file_names():
        print(name)
    return 0


def cmd_runs_download(args: argparse.Namespace) -> int:
    from expkit.api import Run

    workspace = _workspace(args)
    run = Run(workspace, _run_record(workspace, args.run_id).id)
    print(run.download_file(args.name, args.dest))
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from expkit.console import format_value
    from expkit.history import metric_value

    workspace = _workspace(args)
    records, name = _metric_refs(workspace, args.refs)
    if args.plot:
        return _plot_metrics(workspace, records, name, Path(args.plot))
    if len(records) > 1:
        return _compare_metrics(workspace, records, name)
    record = records[0]
    rows = workspace.history.metrics(record.id, name)
    if not rows:
        print(f"run {record.id} has no metrics" + _named(name))
        return 0
    table = [
        [
            r["name"],
            "-" if r["step"] is None else str(r["step"]),
            format_value(metric_value(r)),
            _when(r["ts"]),
        ]
        for r in rows
    ]
    _print_table(["METRIC", "STEP", "VALUE", "TIME"], table)
    return 0


def _metric_refs(workspace: Any, refs: list[str]) -> tuple[list[Any], str | None]:
    """`RUN [RUN ...] [NAME]`: the runs, and the metric name if the last word is not a run."""
    records: dict[str, Any] = {}
    for i, ref in enumerate(refs):
        record = workspace.history.find_run(ref)
        if record is None and 0 < i == len(refs) - 1:
            return list(records.values()), ref
        record = record or _run_record(workspace, ref)  # raises: no such run
        records.setdefault(record.id, record)
    return list(records.values()), None


def _named(name: str | None) -> str:
    """' named NAME', and a hint when NAME looks like a mistyped run (`metrics 1 7`)."""
    if name is None:
        return ""
    looks_like_run = name == "latest" or name.isdigit() or re.fullmatch(r".+_\d+", name)
    return f" named {name!r}" + (f" (and there is no run {name!r})" if looks_like_run else "")


def _compare_metrics(workspace: Any, records: list[Any], name: str | None) -> int:
    """Runs side by side: a row per metric, each run's latest value."""
    from expkit.console import format_value

    def cell(value: Any) -> str:
        if isinstance(value, dict):  # a table row (log_row): its columns
            return " ".join(f"{k}={format_value(v)}" for k, v in value.items())
        return format_value(value)

    latest = {r.id: workspace.history.latest_metrics(r.id) for r in records}
    names = dict.fromkeys(n for values in latest.values() for n in values if name in (None, n))
    if not names:
        print(f"runs {', '.join(latest)} have no metrics" + _named(name))
        return 0
    rows = [[n, *(cell(v[n]) if n in v else "-" for v in latest.values())] for n in names]
    _print_table(["METRIC", *latest], rows)
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
    plot.plot_runs(runs, path)
    names = list(dict.fromkeys(n for curves in runs.values() for n in curves))
    print(f"wrote {path}")
    print(f"  runs     {', '.join(runs)}")
    print(f"  metrics  {', '.join(names)}")
    if empty:
        print(f"  no numeric metrics in {', '.join(empty)}: not shown")
    if skipped:
        print(f"  not numeric, not plotted: {', '.join(skipped)}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    workspace = _workspace(args)
    rows = workspace.history.models()
    if not rows:
        print("no models yet; a job with `model: {name: ...}` registers one")
        return 0
    table = [[r["name"], str(r["version"]), r["run_id"] or "-", _when(r["created"])] for r in rows]
    _print_table(["MODEL", "VERSION", "RUN", "REGISTERED"], table)
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    from expkit.console import format_value
    from expkit.registry import ModelStore, parse_model_ref

    workspace = _workspace(args)
    model = ModelStore(workspace).get(*parse_model_ref(args.ref))
    print(f"model    {model.name}")
    print(f"version  {model.version}")
    print(f"path     {model.path}")
    print("files")
    for rel, digest in model.files.items():
        print(f"  {rel:<40} sha256:{digest[:12]}")
    print("lineage")
    for key, value in model.lineage.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {format_value(v)}" for k, v in value.items()) or "-"
        print(f"  {key:<17} {value}")
    if model.tags:
        print("tags")
        for key, value in model.tags.items():
            print(f"  {key:<17} {value}")
    return 0


def cmd_models_download(args: argparse.Namespace) -> int:
    from expkit.registry import ModelStore, parse_model_ref

    workspace = _workspace(args)
    name, version = parse_model_ref(args.ref)
    for path in ModelStore(workspace).download(name, version, Path(args.dest)):
        print(path)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from expkit.capabilities import KINDS
    from expkit.plugins import get_plugins

    plugins = get_plugins()
    supplied: dict[str, list[str]] = {}
    for kind, base in KINDS.items():
        for name, capability in plugins.all(kind).items():
            supplied.setdefault(capability.plugin, []).append(f"{base.kind} {name!r}")
    for info in sorted(plugins.infos.values(), key=lambda i: i.name):
        origin = f"{info.distribution} {info.version}".strip() or "registered in-process"
        if info.error and info.hooks:
            status = "loaded, with an error: " + info.error
        else:
            status = "not loaded: " + info.error if info.error else "loaded"
        print(f"{info.name}  ({origin})  {status}")
        if info.hooks:
            print(f"    hooks:    {', '.join(info.hooks)}")
        if supplied.get(info.name):
            print(f"    supplies: {', '.join(supplied[info.name])}")
    for conflict in plugins.conflicts:
        print(f"error: {conflict}")
    return 2 if plugins.conflicts else 0


def cmd_init(args: argparse.Namespace) -> int:
    from expkit.workspace import Workspace

    workspace = Workspace.init(args.path)
    print(f"workspace ready: {workspace.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
