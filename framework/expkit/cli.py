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
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would run, and the compute target's exact submission, "
        "without starting or contacting anything",
    )
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
    download.add_argument(
        "dest",
        metavar="DEST",
        nargs="?",
        help="file or folder to write (a folder when it ends in / or exists; default: here)",
    )
    download.add_argument("--force", action="store_true", help="replace a file already there")
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
    mdown.add_argument("dest", metavar="DEST", help="folder to write into (created if needed)")
    mdown.add_argument("--force", action="store_true", help="replace files already there")
    mdown.set_defaults(handler=cmd_models_download)

    export = commands.add_parser(
        "export",
        help="export a run's model or a model version (ONNX, TorchScript, ...)",
        description="Export the model of RUN (id, number or `latest`) or of a registered "
        "MODEL[:VERSION] with the exporter FORMAT, check it against the PyTorch model, and "
        "add the exported files to the run's outputs or to the model version when the check "
        "passes. The run's job spec says how to load the model (model.load) and what it "
        "takes (model.input); change or add those with --set.",
        epilog="example: expkit export pt-dnn:2 --format onnx --option opset=18",
    )
    export.add_argument("ref", metavar="RUN_OR_MODEL", help="run id or number, or NAME[:VERSION]")
    export.add_argument("--format", required=True, help="the exporter, e.g. onnx or torchscript")
    export.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an exporter option, e.g. --option opset=18",
    )
    export.add_argument("--atol", type=float, help="absolute tolerance of the check")
    export.add_argument("--rtol", type=float, help="relative tolerance of the check")
    export.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the job spec used, e.g. --set model.input.shape=[1,3,32,32]",
    )
    export.set_defaults(handler=_later("expkit.cli_export", "cmd_export"))

    importer = commands.add_parser(
        "import",
        help="turn another tool's job (an Azure ML estimator, ...) into a job spec",
        usage="expkit import FROM REF [-o JOB.yaml] [--experiment NAME] [--set KEY=VALUE]",
        description="Turn the job definition REF of another tool into an expkit job spec, "
        "written to -o or printed. FROM names a job importer (`expkit plugins` lists them), "
        "e.g. `expkit import azureml train_azure.py:estimator -o job.yaml`; "
        "`expkit import-azureml REF` is the same as `expkit import azureml REF`.",
    )
    importer.add_argument("source", metavar="FROM", help="the importer, e.g. azureml")
    importer.add_argument("ref", metavar="REF", help="what to import, e.g. FILE.py:NAME")
    importer.add_argument("-o", "--output", metavar="JOB.yaml", help="write the job spec here")
    importer.add_argument("--experiment", help="the experiment name (default: the importer's)")
    importer.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a field of the imported job, e.g. --set compute=local",
    )
    importer.set_defaults(handler=cmd_import)

    plugins = commands.add_parser("plugins", help="installed plugins and what they supply")
    plugins.set_defaults(handler=cmd_plugins)

    init = commands.add_parser("init", help="create a workspace (.expkit/) in a folder")
    init.add_argument("path", nargs="?", default=".", help="the folder (default: here)")
    init.set_defaults(handler=cmd_init)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, word in enumerate(argv):  # `import-azureml REF` is `import azureml REF`
        if not word.startswith("-"):
            if word.startswith("import-") and len(word) > len("import-"):
                argv[i : i + 1] = ["import", word.removeprefix("import-")]
            break
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
def _later(module: str, name: str) -> Any:
    """A command handler imported only when its command runs (start-up stays light)."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(args)

    return handler


def _workspace(args: argparse.Namespace, create: bool = False) -> Any:
    from expkit.errors import UserError
    from expkit.workspace import Workspace

    try:
        workspace = Workspace.find(args.workspace)
    except UserError:
        if not create or args.workspace:
            raise
    else:
        workspace.history  # noqa: B018 - a damaged history.db is named before anything else
        return workspace
    workspace = Workspace.init(Path.cwd())
    print(
        f"expkit: created workspace {workspace.path} (`expkit init` makes one elsewhere)",
        file=sys.stderr,
    )
    return workspace


def _run_record(workspace: Any, ref: str) -> Any:
    from expkit.errors import UserError, quoted

    record = workspace.history.runs.find(ref)
    if record is None:
        raise UserError(
            f"no run {quoted(ref)} in {workspace.path}; `expkit runs list` shows the runs"
        )
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
    from expkit.errors import NoSpace, UserError
    from expkit.job import JobSpec

    job = JobSpec.from_yaml(args.job, args.overrides)
    if args.dry_run:
        return dry_run(args.job, job)
    workspace = _workspace(args, create=True)
    early: list[str] = []  # a signal from now on cancels the run once it is recorded
    lifecycle.note_signals(early)
    try:
        record = lifecycle.submit(workspace, job)
    except UserError as error:  # a plugin the job names is missing or refuses the job
        raise UserError(f"{args.job}: {error}") from None
    except Exception as error:
        if not lifecycle.disk_full(error):
            raise
        raise NoSpace(
            f"No space left on device on {lifecycle.mount_point(workspace.path)}: the run "
            "cannot be recorded; free some space and run again (reading runs still works)"
        ) from None
    console = Console(ranks="all" if args.all_ranks else "0", quiet=args.quiet)
    try:
        record = lifecycle.execute(workspace, record.id, console, own_process=True, early=early)
    finally:
        console.close()
    print_summary(workspace, record, console)  # to nobody, if the terminal has gone
    return EXIT_FOR_STATE.get(record.state, 1)


def dry_run(source: str, job: Any) -> int:
    """The plan of `job`, stage by stage, then what its compute target would submit."""
    import shlex

    from expkit import lifecycle
    from expkit.errors import UserError
    from expkit.plugins import get_plugins

    try:
        choice = lifecycle.choose(job, get_plugins())
    except UserError as error:
        raise UserError(f"{source}: {error}") from None

    def named(capability: Any) -> str:
        return f"{capability.name} ({capability.plugin})"

    env = job.environment
    res = job.resources
    launcher = (
        named(choice.backend)
        if choice.backend
        else (f"{job.distributed.backend} (launched by {choice.compute.name})")
    )
    command = ["python", job.entry_script, *job.command_args({k: f"<data {k}>" for k in job.data})]
    model = job.model
    plan = [
        ("prepare", f"snapshot of {job.source_directory}; environment {named(choice.builder)}"
                    + (f" {' '.join(env.packages)}" if env.packages else "")
                    + "".join(f"; data {k}" for k in job.data)),
        ("scale", f"compute {named(choice.compute)}: {_count(res.nodes, 'node')} x "
                  f"{_count(res.processes_per_node, 'process')}, "
                  f"{_count(res.gpus_per_node, 'GPU')} per node"),
        ("run", f"distributed {launcher}: {shlex.join(command)}"),
        ("post-process", "outputs/ sealed; metrics to "
                         + (", ".join(named(s) for _, s in choice.sinks) or "the run history")
                         + "".join(f"; export {named(e)}" for _, e in choice.exporters)),
        ("register", f"model {model.name} from {model.path}"
                     + "".join(f"; registry {named(r)}" for r in choice.registries)
                     if model else "no model named"),
    ]  # fmt: skip
    print(f"dry run of {source} (nothing is started)")
    for stage, text in plan:
        print(f"  {stage:<13} {text}")
    submission = choice.compute.dry_run(job)
    if submission:
        print(f"\n{choice.compute.kind} {choice.compute.name!r} would submit:\n{submission}")
    return 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "es" if noun.endswith("s") else "s")


def cmd_import(args: argparse.Namespace) -> int:
    import contextlib
    import os

    import yaml

    from expkit.errors import PluginError, UserError
    from expkit.job import JobSpec, apply_override
    from expkit.plugins import get_plugins

    importer = get_plugins().get("job_importers", args.source, "FROM")
    options = {"experiment": args.experiment} if args.experiment else {}
    try:
        with contextlib.redirect_stdout(sys.stderr):  # what the imported code prints, aside
            raw = importer.import_job(args.ref, options)
    except UserError:
        raise
    except Exception as error:
        hook = f"{importer.kind} {importer.name!r} import_job"
        raise PluginError(importer.plugin, hook, error) from error
    for item in args.overrides:
        apply_override(raw, item)
    output = Path(args.output) if args.output else None
    base = (output.parent if output else Path.cwd()).resolve()
    JobSpec.from_dict(raw, source=args.ref, base_dir=base)  # checked before anything is written
    folder = raw.get("source_directory")
    if output and folder and Path(folder).is_absolute():  # the job file moves with its code
        raw["source_directory"] = os.path.relpath(folder, base)
    text = f"# imported from {args.ref} by `expkit import {args.source}`\n"
    text += yaml.safe_dump(raw, sort_keys=False)
    if output is None:
        print(text, end="")
        return 0
    output.write_text(text, encoding="utf-8")
    print(f"wrote {output}; run it with: expkit run {output}", file=sys.stderr)
    return 0


def print_summary(workspace: Any, record: Any, console: Any) -> None:
    from expkit.console import format_value, human_seconds, human_size
    from expkit.exports import describe as describe_export

    history = workspace.history
    state_color = {"completed": "32", "failed": "31", "canceled": "33"}.get(record.state, "0")
    console.line()
    console.line(f"run {console.style(record.id, '1')}: {console.style(record.state, state_color)}")
    rows: list[tuple[str, Any]] = []
    for stage in history.stages.of(record.id):
        when = human_seconds(stage.seconds) if stage.state != "skipped" else "-"
        rows.append((stage.stage, f"{stage.state:<9} {when:>8}  {stage.message or ''}".rstrip()))
    metrics = history.metrics.latest(record.id)
    if metrics:
        shown = [f"{k} {format_value(v)}" for k, v in metrics.items() if not isinstance(v, dict)]
        rows.append(("metrics", ", ".join(shown)))
    outputs = history.outputs.of(record.id)
    links = history.outputs.links(record.id)
    note = (
        f"; {len(links)} link{'s' * (len(links) != 1)} out of the run, not stored" if links else ""
    )
    rows.append(
        (
            "outputs",
            f"{len(outputs)} files, {human_size(sum(s for s, _ in outputs.values()))}{note}",
        )
    )
    for export in history.exports.of(record.id):
        note = "" if export.ok else " (not registered)"
        rows.append(("export", describe_export(export) + note))
    if record.error:
        rows.append(("error", record.error))
    rows.append(("details", f"expkit runs show {record.id}"))
    console.table(rows)


def cmd_runs_list(args: argparse.Namespace) -> int:
    from expkit.console import human_seconds

    workspace = _workspace(args)
    records = workspace.history.runs.recent(args.experiment, args.limit)
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
    from expkit.exports import describe as describe_export

    workspace = _workspace(args)
    record = _run_record(workspace, args.run_id)
    history = workspace.history
    if args.json:
        details = Run(workspace, record.id).get_details()
        details["metrics"] = history.metrics.latest(record.id)
        details["outputs"] = {
            p: {"size": s, "sha256": d} for p, (s, d) in history.outputs.of(record.id).items()
        }
        details["output_links"] = history.outputs.links(record.id)
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
    for stage in history.stages.of(record.id):
        took = human_seconds(stage.seconds) if stage.state != "skipped" else "-"
        print(f"  {stage.stage:<13} {stage.state:<9} {took:>8}  {stage.message or ''}".rstrip())
    metrics = history.metrics.latest(record.id)
    if metrics:
        print("\nmetrics (latest value)")
        for name, value in metrics.items():
            print(f"  {name:<24} {format_value(value)}")
    tags = history.tags.of(record.id)
    if tags:
        print("\ntags")
        for key, value in tags.items():
            print(f"  {key:<24} {value}")
    found = history.exports.of(record.id)
    if found:
        print("\nexports")
        for export in found:
            print(f"  {describe_export(export)}")
    outputs = history.outputs.of(record.id)
    if outputs:
        print("\noutputs")
        for path, (size, digest) in outputs.items():
            print(f"  {path:<40} {human_size(size):>10}  sha256:{digest[:12]}")
    links = history.outputs.links(record.id)
    if links:
        print("\nlinks in outputs (recorded, not stored)")
        for path, target in links.items():
            print(f"  {'outputs' if path == '.' else path} -> {target}")
    for event in history.events.of(record.id, "warning") + history.events.of(
        record.id, "sink-failed"
    ):
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
    from expkit.outputs import open_own_log

    log = open_own_log(run_dir, f"rank-{args.rank}.log")
    if log is None:
        if record.finished or args.rank != 0:
            raise UserError(f"run {record.id} has no output for rank {args.rank}")
        return 0
    with log:
        sys.stdout.buffer.write(log.read())
    return 0


def cmd_runs_cancel(args: argparse.Namespace) -> int:
    workspace = _workspace(args)
    record = _run_record(workspace, args.run_id)
    if record.finished:
        print(f"run {record.id} already {record.state}")
        return 0
    workspace.history.runs.request_cancel(record.id)
    print(f"asked run {record.id} to stop; its driver stops the script and keeps its outputs")
    return 0


def cmd_runs_files(args: argparse.Namespace) -> int:
    from expkit.api import Run
    from expkit.outputs import escaped

    def shown(name: str) -> str:
        # One line per entry, and a file's line never reads as a link's: a name that is not
        # printable is escaped, one holding " -> " is quoted (as Python writes a string).
        text = escaped(name)
        return repr(name) if text == name and " -> " in name else text

    workspace = _workspace(args)
    run = Run(workspace, _run_record(workspace, args.run_id).id)
    for name in run.get_file_names():
        print(shown(name))
    for name, target in run.get_links().items():
        print(f"{shown(name)} -> {escaped(target)}  (a link out of the run: recorded, not stored)")
    return 0


def cmd_runs_download(args: argparse.Namespace) -> int:
    from expkit.api import Run

    workspace = _workspace(args)
    run = Run(workspace, _run_record(workspace, args.run_id).id)
    print(run.download_file(args.name, args.dest, overwrite=args.force))
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
    rows = workspace.history.metrics.of(record.id, name)
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
        record = workspace.history.runs.find(ref)
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

    latest = {r.id: workspace.history.metrics.latest(r.id) for r in records}
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
    rows = workspace.history.models.versions()
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
        if key == "exports":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {format_value(v)}" for k, v in value.items()) or "-"
        print(f"  {key:<17} {value}")
    found = workspace.history.exports.of(model=model.name, version=model.version)
    exported = model.lineage.get("exports", {})
    if exported or found:
        print("exports")
    for name, entry in exported.items():
        figures = ", ".join(
            f"{k} {entry['checks'][k]:.2g}"
            for k in ("max_abs_error", "max_rel_error")
            if isinstance(entry.get("checks", {}).get(k), int | float)
        )
        print(f"  {name:<17} {', '.join(entry.get('files', []))}  ({figures or 'checked'})")
    for export in found:
        if not export.ok:
            print(f"  {export.format:<17} failed, not added: {export.message}")
    if model.tags:
        print("tags")
        for key, value in model.tags.items():
            print(f"  {key:<17} {value}")
    return 0


def cmd_models_download(args: argparse.Namespace) -> int:
    from expkit.api import Model
    from expkit.registry import parse_model_ref

    workspace = _workspace(args)
    name, version = parse_model_ref(args.ref)
    for path in Model(workspace, name, version).download(Path(args.dest), args.force):
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
