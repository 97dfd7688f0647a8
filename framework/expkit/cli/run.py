"""`expkit run JOB` (and `--dry-run`) and `expkit import FROM REF`: the commands that run
a job spec or write one."""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from expkit.cli.common import examples_epilog, open_workspace

EXIT_FOR_STATE = {"completed": 0, "failed": 1, "canceled": 130}
# `expkit run` whose driver let go of a cluster job that goes on (the controller stopped
# answering): neither success nor failure yet; `expkit runs follow RUN` gives the end.
EXIT_DETACHED = 3


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `run` and `import` with their arguments."""
    run = commands.add_parser(
        "run",
        help="run a job spec through the whole lifecycle",
        description="Run JOB (a YAML job spec) in the workspace, showing "
        "stage progress and the script's output live. Ctrl-C stops the "
        "script, keeps its outputs and marks the run canceled. JOB is the path of a job "
        "spec; --set KEY=VALUE changes one of its fields (a YAML value: a list is [a, b]).",
        epilog=examples_epilog(
            "expkit run training/job.yaml",
            "expkit run training/job.yaml --set args.num_epochs=2 --set metrics=[mlflow]",
            "expkit run training/job.yaml --dry-run",
        ),
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
    run.add_argument(
        "--detach",
        action="store_true",
        help="record the run and drive it in the background, then return: follow it with "
        "`expkit runs follow RUN`, stop it with `expkit runs cancel RUN`",
    )
    run.add_argument("--quiet", action="store_true", help="show the script's output only")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would run, and the compute target's exact submission, "
        "without starting or contacting anything",
    )
    run.set_defaults(handler=cmd_run)

    importer = commands.add_parser(
        "import",
        help="turn another tool's job (an Azure ML estimator, ...) into a job spec, or its "
        "sweep (a HyperDriveConfig) into a sweep spec",
        usage="expkit import FROM REF [-o JOB.yaml] [--experiment NAME] [--set KEY=VALUE]",
        description="Turn the job definition REF of another tool into an expkit job spec, "
        "written to -o or printed. FROM names a job importer (`expkit plugins` lists them), "
        "e.g. `expkit import azureml train_azure.py:estimator -o job.yaml`; "
        "`expkit import-azureml REF` is the same as `expkit import azureml REF`.",
        epilog=examples_epilog(
            "expkit import azureml train_azure.py:estimator -o job.yaml",
            "expkit import-azureml train_azure.py:hyperdrive_config -o sweep.yaml",
        ),
    )
    importer.add_argument("source", metavar="FROM", help="the importer, e.g. azureml")
    importer.add_argument("ref", metavar="REF", help="what to import, e.g. FILE.py:NAME")
    importer.add_argument(
        "-o",
        "--output",
        metavar="JOB.yaml",
        help="write the job spec here (a sweep's spec, and its trial's job beside it as "
        "NAME-job.yaml)",
    )
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


@contextlib.contextmanager
def starting() -> Iterator[None]:
    """No garbage collection while `expkit run` starts (imports, the job, plugin loading):
    what it makes then (modules, classes, plugins) lives as long as the process, so the ~40
    collections start-up triggers find nothing and cost ~10 ms. Afterwards those objects
    are frozen (`gc.freeze`: left out of every later collection, which also keeps the
    long-running driver's full collections short) and collection goes on as before. Once per
    process: one that runs several commands (tests) freezes only at the first."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc.get_freeze_count() == 0:
            gc.freeze()
        if enabled:
            gc.enable()


def cmd_run(args: argparse.Namespace) -> int:
    """Run the job spec through the lifecycle in the workspace (made here if there is none),
    showing it live; the exit code is the run's state (0 completed, 1 failed, 130 canceled;
    3 when the driver let go of a cluster job that goes on).
    With --dry-run, print the plan instead (`dry_run`)."""
    with starting():  # until the run is recorded and its plugins loaded
        from expkit import lifecycle
        from expkit.errors import NoSpace, UserError
        from expkit.job import JobSpec, blame_overrides

        job = JobSpec.from_yaml(args.job, args.overrides)
        if args.dry_run:
            return dry_run(args.job, job, args.overrides)
        workspace = open_workspace(args, create=True)
        early: list[str] = []  # a signal from now on cancels the run once it is recorded
        lifecycle.note_signals(early)
        try:
            record = lifecycle.submit(workspace, job)
        except UserError as error:  # a plugin the job names is missing or refuses the job
            raise UserError(
                blame_overrides(each_line(args.job, error), args.job, args.overrides)
            ) from None
        except Exception as error:
            if not lifecycle.disk_full(error):
                raise
            raise NoSpace(
                f"No space left on device on {lifecycle.mount_point(workspace.path)}: the run "
                "cannot be recorded; free some space and run again (reading runs still works)"
            ) from None
    return drive_here(args, workspace, record, early)


def drive_here(
    args: argparse.Namespace, workspace: Any, record: Any, early: list[str], resume: bool = False
) -> int:
    """Drive the queued run `record` (`expkit run`, `expkit runs resume`): with --detach, by
    a background driver, returning 0 at once; else in this process, showing it live, then
    its summary; the exit code is the run's state (0 completed, 1 failed, 130 canceled; 3
    when the driver let go of a cluster job that goes on). `early`: the signals noted since
    the run was recorded (`lifecycle.note_signals`); `resume`: the next attempt of a run
    `lifecycle.reopen` made queued again."""
    import contextlib

    from expkit import lifecycle
    from expkit.console import Console

    if args.detach:
        from expkit.driver import DRIVER_LOG, start_driver

        start_driver(workspace, record.id, resume=resume)
        print(f"run {record.number} ({record.id}) goes on in the background")
        print(f"  follow it:  expkit runs follow {record.number}")
        print(f"  stop it:    expkit runs cancel {record.number}")
        print(f"  its driver's log: {workspace.run_dir(record.id) / DRIVER_LOG}")
        return 0
    console = Console(ranks="all" if args.all_ranks else "0", quiet=args.quiet)
    try:
        record = lifecycle.drive(
            workspace, record.id, console, own_process=True, early=early, resume=resume
        )
    finally:
        console.close()
    if not record.finished:  # the driver let go: the job goes on without it
        with contextlib.suppress(OSError):  # the terminal may have gone (SIGHUP)
            print(f"run {record.number}: {record.status}; `expkit runs follow {record.number}`")
        return EXIT_DETACHED
    print_summary(workspace, record, console)  # to nobody, if the terminal has gone
    return EXIT_FOR_STATE.get(record.state, 1)


def dry_run(source: str, job: Any, overrides: Sequence[str] = ()) -> int:
    """The plan of `job`, stage by stage, then what its compute target would submit."""
    import shlex

    from expkit import lifecycle
    from expkit.errors import UserError
    from expkit.job import blame_overrides
    from expkit.plugins import call, get_plugins

    try:
        choice = lifecycle.choose(job, get_plugins())
    except UserError as error:
        raise UserError(blame_overrides(each_line(source, error), source, overrides)) from None

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
        ("run", f"distributed {launcher}: {shlex.join(command)}" + _attempts(job)),
        ("post-process", "outputs/ sealed; metrics to "
                         + (", ".join(named(s) for _, s in choice.sinks) or "the run history")
                         + "".join(f"; export {named(e)}" for _, e in choice.exporters)),
        ("register", f"model {model.name} from {model.path}"
                     + "".join(f"; registry {named(r)}" for r in choice.registries)
                     + _register_if(model)
                     if model else "no model named"),
    ]  # fmt: skip
    print(f"dry run of {source} (nothing is started)")
    for stage, text in plan:
        print(f"  {stage:<13} {text}")
    submission = call(choice.compute, "dry_run", choice.job)
    if submission:
        print(f"\n{choice.compute.kind} {choice.compute.name!r} would submit:\n{submission}")
    return 0


def _register_if(model: Any) -> str:
    """What the dry run says of `model.register_if` and `model.aliases` (empty without them):
    `; only if best_val_acc > 0.9 and best_val_acc better than @champion (maximize); aliases
    @champion`."""
    from expkit import register_if

    conditions = register_if.parse(model.register_if)
    text = "; only if " + " and ".join(map(str, conditions)) if conditions else ""
    if model.aliases:
        text += "; aliases " + ", ".join(f"@{alias}" for alias in model.aliases)
    return text


def _attempts(job: Any) -> str:
    """What the dry run says of the job's `retry:` and `checkpoints:` (empty without them):
    `; up to 3 attempts (retried on preempted, exit codes 75; 5s apart), 2 restarts in place;
    checkpoints ckpt (SIGUSR1, 30s to write one)`."""
    retry, checkpoints, text = job.retry, job.checkpoints, ""
    if retry.max_attempts > 1:
        on = ", ".join(
            entry
            if isinstance(entry, str)
            else "exit codes " + ", ".join(str(c) for c in entry.get("exit_codes", []))
            for entry in retry.on
        )
        apart = f"; {retry.backoff_seconds:g}s apart" if retry.backoff_seconds else ""
        text += f"; up to {retry.max_attempts} attempts (retried on {on}{apart})"
    if retry.in_place:
        text += (";" if not text else ",") + f" {_count(retry.in_place, 'restart')} in place"
    if checkpoints is not None:
        text += (
            f"; checkpoints {checkpoints.folder} ({checkpoints.signal}, "
            f"{checkpoints.grace_seconds:g}s to write one)"
        )
    return text


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "es" if noun.endswith("s") else "s")


def cmd_import(args: argparse.Namespace) -> int:
    """Turn another tool's job into a job spec with the importer FROM, checked as `expkit
    run` would check it, and write it to -o (or print it); a sweep into a sweep spec and its
    trial's job spec (cli/sweep_import.py)."""
    import contextlib
    import os

    import yaml

    from expkit.cli.sweep_import import is_sweep, write_sweep
    from expkit.job import JobSpec, apply_override
    from expkit.options import check as check_options
    from expkit.plugins import call, get_plugins

    importer = get_plugins().get("job_importers", args.source, "FROM")
    given = {"experiment": args.experiment} if args.experiment else {}
    options = check_options(importer, given, "options")
    with contextlib.redirect_stdout(sys.stderr):  # what the imported code prints, aside
        raw = call(importer, "import_job", args.ref, options)
    if is_sweep(raw):  # a sweep (Azure ML's HyperDriveConfig): sweep.yaml and its trial's job
        return write_sweep(args, raw)
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
    """The summary under a finished run: its stages, latest metrics, how each metric sink
    fared and where it put the run's data, outputs, exports, and how to resume a failed or
    canceled run that kept a checkpoint folder."""
    from expkit.console import count_files, format_value, human_seconds
    from expkit.errors import printable
    from expkit.metrics import SINK_OUTCOME

    history = workspace.history
    state_color = {"completed": "32", "failed": "31", "canceled": "33"}.get(record.state, "0")
    console.line()
    console.line(f"run {console.style(record.id, '1')}: {console.style(record.state, state_color)}")
    rows: list[tuple[str, Any]] = []
    for stage in history.stages.of(record.id):
        when = human_seconds(stage.seconds) if stage.state != "skipped" else "-"
        rows.append((stage.stage, f"{stage.state:<9} {when:>8}  {stage.message or ''}".rstrip()))
    rows.append(("total", f"{'':<9} {total_seconds(record):>8}  {total_note(record)}"))
    metrics = history.metrics.latest(record.id)
    if metrics:
        shown = [  # a name with a newline or a tab kept on the line, escaped
            f"{printable(k)} {printable(format_value(v))}"
            for k, v in metrics.items()
            if not isinstance(v, dict)
        ]
        rows.append(("metrics", ", ".join(shown)))
    sinks = history.events.of(record.id, SINK_OUTCOME)
    attempts = history.attempts.of(record.id)
    if attempts:  # a resumed run: how each sink fared in this drive, not in the earlier ones
        sinks = [event for event in sinks if event["ts"] >= attempts[-1].started]
    if sinks:
        rows.append(("sinks", ", ".join(event["message"] for event in sinks)))
    from expkit.sinkwhere import sink_places

    rows.extend(sink_places(workspace, record))  # where each sink put the run's data
    outputs = history.outputs.of(record.id)
    links = history.outputs.links(record.id)
    note = (
        f"; {len(links)} link{'s' * (len(links) != 1)} out of the run, not stored" if links else ""
    )
    rows.append(("outputs", count_files(len(outputs), sum(s for s, _ in outputs.values())) + note))
    for export in history.exports.of(record.id):
        from expkit.exports import describe as describe_export

        note = "" if export.ok else " (not registered)"
        rows.append(("export", describe_export(export) + note))
    if record.error:
        rows.append(("error", record.error))
    kept = workspace.run_dir(record.id) / "checkpoints"
    resumable = record.state in ("failed", "canceled") and not record.sweep and kept.is_dir()
    if resumable and "expkit runs resume" not in (record.error or ""):  # not said twice
        rows.append(("resume", f"expkit runs resume {record.id} (from its last checkpoint)"))
    rows.append(("details", f"expkit runs show {record.id}"))
    console.table(rows)


def total_seconds(record: Any) -> str:
    """A run's wall time, from its submission to its end (so far, for one not ended), as
    every duration is shown; the DURATION of `expkit runs list`."""
    import time

    from expkit.console import human_seconds

    return human_seconds((record.ended or time.time()) - record.created)


def total_note(record: Any) -> str:
    """What the total time of `total_seconds` spans, beside it."""
    return "from submission to end" if record.ended else "since submission, so far"


def each_line(source: str, error: Exception) -> str:
    """`error`'s message with `source: ` before each of its lines (one line per problem)."""
    return "\n".join(f"{source}: {line}" for line in str(error).splitlines())
