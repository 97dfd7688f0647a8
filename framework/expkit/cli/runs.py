"""`expkit runs ACTION`: list runs, and show, follow, cancel or copy the files of one."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from expkit.cli.common import (
    RUN_HELP,
    described,
    examples_epilog,
    how_many,
    metric_cell,
    open_workspace,
    print_table,
    run_record,
    when,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `runs` and its actions (list, show, logs, follow, cancel, files, download)."""
    runs = commands.add_parser(
        "runs",
        help="list and inspect runs",
        **described(
            "List the workspace's runs, and show, follow, cancel, resume or copy the files "
            "of one. ACTION is one of the commands below; each takes --help. A run is named "
            "by its id (pytorch-digits_3), its number (3) or `latest`.",
            "expkit runs list",
            "expkit runs show latest",
        ),
    ).add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    listing = runs.add_parser(
        "list",
        help="the latest runs, newest first",
        description="The latest runs, newest first: state, creation time, duration, exit "
        "code. --param KEY and --metric NAME add a column each, in the order given (both "
        "may be repeated): the run's parameter KEY (from the job's `args`, or logged by the "
        "script: `expkit runs show RUN` lists them) and the latest value of its metric NAME; "
        "blank for a run that has none. --sweep SWEEP lists that sweep's trials instead, by "
        "trial number, with a TRIAL column.",
        epilog=examples_epilog(
            "expkit runs list --experiment pytorch-digits --limit 5",
            "expkit runs list --param lr --metric best_val_acc",
            "expkit runs list --sweep latest",
        ),
    )
    listing.add_argument("--experiment", help="only this experiment's runs")
    listing.add_argument(
        "--sweep",
        metavar="SWEEP",
        help="only the trials of this sweep (id, number or `latest`), by trial number",
    )
    listing.add_argument(
        "--limit", type=how_many, default=None, help="how many (default 20; with --sweep: all)"
    )
    listing.add_argument(
        "--param",
        metavar="KEY",
        action=_Column,
        dest="columns",
        const="param",
        help="a column with each run's parameter KEY (repeatable)",
    )
    listing.add_argument(
        "--metric",
        metavar="NAME",
        action=_Column,
        dest="columns",
        const="metric",
        help="a column with the latest value of each run's metric NAME (repeatable)",
    )
    listing.set_defaults(handler=cmd_runs_list)
    show = runs.add_parser(
        "show",
        help="a run's state, stages, params, metrics and outputs",
        **described(
            "Show RUN: its state, each stage with its time and the total, attempts, "
            "parameters, the latest value of each metric, tags, exports, and its outputs "
            "with their sizes and hashes. RUN is a run id, number or `latest`.",
            "expkit runs show latest",
            "expkit runs show pytorch-digits_3 --json",
        ),
    )
    show.add_argument("run_id", metavar="RUN", help=RUN_HELP)
    show.add_argument(
        "--json",
        action="store_true",
        help="machine-readable output: strict JSON (NaN and infinities as the strings "
        '"NaN", "Infinity", "-Infinity")',
    )
    show.set_defaults(handler=cmd_runs_show)
    logs = runs.add_parser(
        "logs",
        help="a run's output (--follow to watch it live)",
        **described(
            "Print what RUN's script wrote (one rank's output, byte for byte); --follow "
            "keeps printing until the run ends. RUN is a run id, number or `latest`.",
            "expkit runs logs latest",
            "expkit runs logs 3 --rank 1 --follow",
        ),
    )
    logs.add_argument("run_id", metavar="RUN", help=RUN_HELP)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until it ends")
    logs.add_argument("--rank", type=int, default=0, help="which rank's output (default 0)")
    logs.set_defaults(handler=cmd_runs_logs)
    follow = runs.add_parser(
        "follow",
        help="watch a run live until it ends (re-attaches to a cluster job whose driver died)",
        description="Print RUN's stages, progress and output live until it ends; the exit code "
        "is the run's (0 completed, 1 failed, 130 canceled). A run whose job goes on without "
        "its driver (a Slurm job after `expkit run` was killed or its terminal closed) gets a "
        "new driver in the background, which finishes it: Ctrl-C here stops following only. "
        "RUN is a run id, number or `latest`.",
        epilog=examples_epilog("expkit runs follow latest", "expkit runs follow 3 --all-ranks"),
    )
    follow.add_argument("run_id", metavar="RUN", help=RUN_HELP)
    follow.add_argument("--rank", type=int, default=0, help="which rank's output (default 0)")
    follow.add_argument("--all-ranks", action="store_true", help="show every rank's output")
    follow.set_defaults(handler=cmd_runs_follow)
    cancel = runs.add_parser(
        "cancel",
        help="stop a run (its outputs are kept)",
        description="Stop a run: its script gets the job's stop signal and grace period "
        "(`checkpoints:`) to write a checkpoint, then SIGTERM. Its outputs are kept, and "
        "`expkit runs resume RUN` starts it again from its last checkpoint. RUN is a run id, "
        "number or `latest`.",
        epilog=examples_epilog("expkit runs cancel latest", "expkit runs cancel 3 --requeue"),
    )
    cancel.add_argument("run_id", metavar="RUN", help=RUN_HELP)
    cancel.add_argument(
        "--requeue",
        action="store_true",
        help="stop only the current attempt and start the next one, from the checkpoint the "
        "script writes on the stop signal (counts as a preemption; needs attempts left in "
        "the job's `retry.max_attempts`)",
    )
    cancel.set_defaults(handler=cmd_runs_cancel)
    resume = runs.add_parser(
        "resume",
        help="start a failed or canceled run again from its last checkpoint",
        description="Start the next attempt of a failed or canceled run, with the same "
        "snapshot, environment and data, its checkpoint folder (`checkpoints:`) as the last "
        "attempt left it. The run's metrics, attempts and outputs so far are kept; a step "
        "logged again supersedes the earlier value in `expkit metrics`. RUN is a run id, "
        "number or `latest`.",
        epilog=examples_epilog("expkit runs resume latest", "expkit runs resume 3 --detach"),
    )
    resume.add_argument("run_id", metavar="RUN", help=RUN_HELP)
    resume.add_argument(
        "--detach",
        action="store_true",
        help="drive the run in the background and return at once (follow it with "
        "`expkit runs follow RUN`)",
    )
    resume.add_argument("--all-ranks", action="store_true", help="show every rank's output")
    resume.add_argument("--quiet", action="store_true", help="show the script's output only")
    resume.set_defaults(handler=cmd_runs_resume)
    files = runs.add_parser(
        "files",
        help="the run's files (outputs/ and logs/)",
        **described(
            "List RUN's files, one a line (outputs/ and logs/, logs/prepare.log included), "
            "then the links out of the run (recorded, not stored). RUN is a run id, number or "
            "`latest`; a name listed here is what `expkit runs download` takes.",
            "expkit runs files latest",
        ),
    )
    files.add_argument("run_id", metavar="RUN", help=RUN_HELP)
    files.set_defaults(handler=cmd_runs_files)
    download = runs.add_parser(
        "download",
        help="copy one of a run's files",
        **described(
            "Copy NAME, one of RUN's files (`expkit runs files RUN` lists them), to DEST, "
            "verified against its sha256; prints where it went. RUN is a run id, number or "
            "`latest`.",
            "expkit runs download latest outputs/model.pt ./model/",
            "expkit runs download 3 logs/rank-0.log --force",
        ),
    )
    download.add_argument("run_id", metavar="RUN", help=RUN_HELP)
    download.add_argument("name", metavar="NAME", help="a name from `expkit runs files RUN`")
    download.add_argument(
        "dest",
        metavar="DEST",
        nargs="?",
        help="file or folder to write (a folder when it ends in / or exists; default: here)",
    )
    download.add_argument("--force", action="store_true", help="replace a file already there")
    download.set_defaults(handler=cmd_runs_download)


class _Column(argparse.Action):
    """`--param KEY` / `--metric NAME`: one more column of `runs list`, kept with the others
    in the order given on the command line, as ("param" or "metric", name)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        value: Any,
        option_string: str | None = None,
    ) -> None:
        columns = [*(getattr(namespace, self.dest, None) or []), (self.const, value)]
        setattr(namespace, self.dest, columns)


def cmd_runs_list(args: argparse.Namespace) -> int:
    """The latest runs, newest first: state, creation time, duration, exit code, then a
    column for each `--param KEY` and `--metric NAME` (blank where a run has none)."""
    from expkit.cli.run import total_seconds

    workspace = open_workspace(args)
    sweep = None
    if getattr(args, "sweep", None):
        from expkit.sweeps.best import sweep_record

        sweep = sweep_record(workspace, args.sweep)
        records = workspace.history.runs.of_sweep(sweep.id)
        if args.experiment and args.experiment != sweep.experiment:
            from expkit.errors import UserError, quoted

            raise UserError(
                f"--experiment: the trials of sweep {sweep.id} are runs of experiment "
                f"{quoted(sweep.experiment)}, not {quoted(args.experiment)}"
            )
        if args.limit is not None:
            records = records[: args.limit]
        if not records:
            print(f"sweep {sweep.id} has no trials yet")
            return 0
    else:
        records = workspace.history.runs.recent(
            args.experiment, 20 if args.limit is None else args.limit
        )
        if not records and args.experiment:
            no_such_experiment(workspace, args.experiment)
        if not records:
            print("no runs yet; start one with `expkit run JOB`")
            return 0
    rows = []
    for r in records:
        trial = [] if sweep is None else ["-" if r.trial is None else str(r.trial)]
        rows.append(
            [
                *trial,
                r.id,
                state_cell(r),
                when(r.created),
                total_seconds(r),
                "-" if r.exit_code is None else str(r.exit_code),
            ]
        )
    headers = ["RUN", "STATE", "CREATED", "DURATION", "EXIT"]
    if sweep is not None:
        headers.insert(0, "TRIAL")
    for header, cells in _extra_columns(workspace.history, [r.id for r in records], args):
        headers.append(header)
        for row, cell in zip(rows, cells, strict=True):
            row.append(cell)
    print_table(headers, rows)
    return 0


def no_such_experiment(workspace: Any, name: str) -> None:
    """Raise the UserError (exit 2) for `--experiment NAME` that has no runs, naming the
    experiments that have (the workspace's whole list: a name is a free choice of a job)."""
    from expkit.errors import UserError, quoted

    known = workspace.history.runs.experiments()
    listed = f"its experiments: {', '.join(known)}" if known else "it has no runs yet"
    raise UserError(f"--experiment: no experiment {quoted(name)} in {workspace.path}; {listed}")


def max_attempts(job: dict[str, Any]) -> int:
    """How many attempts the run's job allows in all (its `retry.max_attempts`; 1 for a job
    recorded without `retry:`)."""
    return int((job.get("retry") or {}).get("max_attempts", 1))


def attempt_label(record: Any) -> str:
    """`attempt 2 of 3` for a running run whose job allows retries or that is past its first
    attempt, and for a finished one past its first attempt (a run resumed beyond its job's
    `max_attempts`: `attempt 4`); "" otherwise (a queued run's next attempt is not started)."""
    most = max_attempts(record.job)
    shown = record.attempt > 1 or (record.state == "running" and most > 1)
    if not shown or record.state == "queued":
        return ""
    return f"attempt {record.attempt}" + (f" of {most}" if record.attempt <= most else "")


def state_cell(record: Any) -> str:
    """A run's state in `runs list`: `queued: Priority` (the compute target's status),
    `running (attempt 2 of 3)` (see `attempt_label`), or the state alone."""
    cell = f"{record.state}: {record.status}" if record.status else record.state
    label = attempt_label(record)
    return f"{cell} ({label})" if label else cell


def _extra_columns(
    history: Any, run_ids: list[str], args: argparse.Namespace
) -> list[tuple[str, list[str]]]:
    """The `--param`/`--metric` columns: (header, a cell per run). The header is the name
    as given; one given as both a parameter and a metric says which is which."""
    from expkit.outputs import escaped

    columns = getattr(args, "columns", None) or []
    params = history.params.of_runs(run_ids) if any(k == "param" for k, _ in columns) else {}
    both = {n for k, n in columns if k == "param"} & {n for k, n in columns if k == "metric"}
    found = []
    for kind, name in columns:
        header = f"{name} ({kind})" if name in both else name
        if kind == "param":
            cells = [escaped(params[run_id].get(name, "")) for run_id in run_ids]
        else:
            latest = history.metrics.last_of(run_ids, name)
            cells = [metric_cell(latest[r]) if r in latest else "" for r in run_ids]
        found.append((header, cells))
    return found


def cmd_runs_show(args: argparse.Namespace) -> int:
    """One run's state, stages, parameters, metrics, tags, where its sinks put its data,
    exports and outputs (--json: all of it as JSON, see `show_json`)."""
    from expkit.cli.run import total_note, total_seconds
    from expkit.console import count_files, format_value, human_seconds, human_size, short_hash
    from expkit.exports import describe as describe_export
    from expkit.sinkwhere import sink_places

    workspace = open_workspace(args)
    record = run_record(workspace, args.run_id)
    history = workspace.history
    if args.json:
        from expkit.cli import jsonout

        print(jsonout.dumps(show_json(workspace, record)))
        return 0
    print(f"run         {record.id}")
    print(f"experiment  {record.experiment}")
    label = ", ".join(x for x in (record.status, attempt_label(record)) if x)
    print(f"state       {record.state}" + (f" ({label})" if label else ""))
    print(f"created     {when(record.created)}")
    if record.ended:
        print(f"ended       {when(record.ended)}")
    if record.sweep:
        print(f"sweep       {record.sweep} (trial {record.trial})")
    if record.remote_job:
        print(f"remote job  {record.remote_job}")
    if record.exit_code is not None:
        print(f"exit code   {record.exit_code}")
    if record.error:
        print(f"error       {record.error}")
    print(f"script      {record.job['entry_script']} in {record.job['source_directory']}")
    if record.snapshot_hash:
        print(f"snapshot    {short_hash(record.snapshot_hash)}")
    if record.environment_hash:
        print(f"environment {short_hash(record.environment_hash)}")
    for name, version in model_versions(history, record.id):
        print(f"model       {name}:{version}")
    print("\nstages")
    for stage in history.stages.of(record.id):
        took = human_seconds(stage.seconds) if stage.state != "skipped" else "-"
        print(f"  {stage.stage:<13} {stage.state:<9} {took:>8}  {stage.message or ''}".rstrip())
    print(f"  {'total':<13} {'':<9} {total_seconds(record):>8}  {total_note(record)}")
    _print_attempts(record, history.attempts.of(record.id))
    params = history.params.of(record.id)
    if params:
        from expkit.outputs import escaped

        sources = history.params.sources(record.id)
        print("\nparams")
        for key, value in params.items():
            logged = "  (logged by the script)" if sources.get(key) == "script" else ""
            print(f"  {escaped(key):<24} {escaped(value)}{logged}")
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
    places = sink_places(workspace, record)
    if places:
        print("\nsinks (where the run's data went)")
        for name, where in places:
            print(f"  {name:<24} {where}")
    found = history.exports.of(record.id)
    if found:
        print("\nexports")
        for export in found:
            print(f"  {describe_export(export)}")
    outputs = history.outputs.of(record.id)
    if outputs:
        print(f"\noutputs ({count_files(len(outputs), sum(s for s, _ in outputs.values()))})")
        for path, (size, digest) in outputs.items():
            print(f"  {path:<40} {human_size(size):>10}  {short_hash(f'sha256:{digest}')}")
    links = history.outputs.links(record.id)
    if links:
        print("\nlinks in outputs (recorded, not stored)")
        for path, target in links.items():
            print(f"  {'outputs' if path == '.' else path} -> {target}")
    for message in warnings(history, record.id):
        print(f"\nwarning: {message}")
    return 0


def show_json(workspace: Any, record: Any) -> dict[str, Any]:
    """What `runs show --json` prints: everything the text view shows, as data (times in
    seconds since the epoch, durations in seconds, hashes in full): the API's
    `Run.get_details()`, plus the times, status, script, stage messages, model versions,
    metrics, where each sink put the data, exports, outputs, links and warnings."""
    import time

    from expkit.api import Run
    from expkit.exports import describe as describe_export
    from expkit.sinkwhere import sink_places

    history = workspace.history
    details = Run(workspace, record.id).get_details()
    details.update(
        {
            "status": record.status,
            "created": record.created,
            "ended": record.ended,
            "remote_job": record.remote_job,
            "script": {
                "entry_script": record.job["entry_script"],
                "source_directory": record.job["source_directory"],
            },
            "models": [
                {"name": name, "version": version}
                for name, version in model_versions(history, record.id)
            ],
            "stages": {
                s.stage: {"state": s.state, "seconds": s.seconds, "message": s.message}
                for s in history.stages.of(record.id)
            },
            # The stage list's `total` line: submission to end (to now, for a run going on).
            "total_seconds": (record.ended or time.time()) - record.created,
            "max_attempts": max_attempts(record.job),
            "metrics": history.metrics.latest(record.id),
            "sinks": [{"sink": n, "where": w} for n, w in sink_places(workspace, record)],
            "exports": [
                {
                    "format": e.format,
                    "ok": e.ok,
                    "message": e.message,
                    "summary": describe_export(e),
                    "files": {p: {"size": s, "sha256": d} for p, (s, d) in e.files.items()},
                    "checks": e.checks,
                }
                for e in history.exports.of(record.id)
            ],
            "outputs": {
                p: {"size": s, "sha256": d} for p, (s, d) in history.outputs.of(record.id).items()
            },
            "output_links": history.outputs.links(record.id),
            "warnings": warnings(history, record.id),
        }
    )
    return details


def model_versions(history: Any, run_id: str) -> list[tuple[str, int]]:
    """(name, version) of each model version the run registered (visible ones)."""
    return [(r["name"], r["version"]) for r in history.models.versions() if r["run_id"] == run_id]


def warnings(history: Any, run_id: str) -> list[str]:
    """The run's warnings, then its sinks' failures, as `runs show` lists them."""
    events = history.events.of(run_id, "warning") + history.events.of(run_id, "sink-failed")
    return [event["message"] for event in events]


def _print_attempts(record: Any, attempts: list[Any]) -> None:
    """`runs show`'s attempts table (number, start, duration, outcome, exit code, reason),
    when the run had more than one attempt or its job has `retry:` or `checkpoints:`."""
    from expkit.console import human_seconds
    from expkit.outputs import escaped

    retries = max_attempts(record.job) > 1 or record.job.get("checkpoints")
    if not attempts or (len(attempts) == 1 and not retries):
        return
    most = max_attempts(record.job)
    print(f"\nattempts (at most {most})" if most > 1 else "\nattempts")
    rows = []
    for a in attempts:
        going = a.ended is None and not record.finished
        rows.append(
            [
                str(a.attempt),
                when(a.started),
                human_seconds(a.seconds) if a.ended is not None or going else "-",
                a.outcome or ("running" if going else "-"),
                "-" if a.exit_code is None else str(a.exit_code),
                escaped(a.reason or ""),
            ]
        )
    print_table(["#", "STARTED", "DURATION", "OUTCOME", "EXIT", "REASON"], rows, indent="  ")


def cmd_runs_logs(args: argparse.Namespace) -> int:
    """A rank's output, byte for byte (--follow: live until the run ends); UserError when
    a finished run has none for that rank."""
    from expkit.console import Console
    from expkit.errors import UserError
    from expkit.follow import follow

    workspace = open_workspace(args)
    record = run_record(workspace, args.run_id)
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


def cmd_runs_follow(args: argparse.Namespace) -> int:
    """Follow a run live to its end (`expkit.follow`); the exit code is its final state's."""
    from expkit.cli.run import EXIT_FOR_STATE
    from expkit.console import Console
    from expkit.follow import follow

    workspace = open_workspace(args)
    record = run_record(workspace, args.run_id)
    console = Console(ranks="all" if args.all_ranks else "0")
    try:
        follow(workspace, record.id, console, rank=None if args.all_ranks else args.rank)
    except KeyboardInterrupt:
        console.close()
        print(f"\nstopped following; run {record.number} goes on (`expkit runs cancel` stops it)")
        return 130
    finally:
        console.close()
    record = workspace.history.runs.get(record.id)
    print(f"run {record.number}: {record.state}" + (f" ({record.error})" if record.error else ""))
    return EXIT_FOR_STATE.get(record.state, 1)


def cmd_runs_cancel(args: argparse.Namespace) -> int:
    """Ask a run's driver to stop it (its outputs are kept); a finished run is left as is.
    With --requeue, ask it to stop only the current attempt and start the next (`requeue`)."""
    workspace = open_workspace(args)
    record = run_record(workspace, args.run_id)
    if args.requeue:
        return requeue(workspace, record)
    if record.finished:
        print(f"run {record.id} already {record.state}")
        return 0
    workspace.history.runs.request_cancel(record.id)
    print(f"asked run {record.id} to stop; its driver stops the script and keeps its outputs")
    return 0


def requeue(workspace: Any, record: Any) -> int:
    """`expkit runs cancel RUN --requeue`: the driver stops the running attempt as planned
    (the stop signal and grace of the job's `checkpoints:`) and starts the next one, counted
    as a preemption. Raises UserError (exit 2) when that cannot happen: the run is finished
    or not in its run stage, it is on its last attempt (`retry.max_attempts`), or its job
    does not retry a preemption (`retry.on`)."""
    from expkit.errors import UserError

    number = record.number
    if record.finished:
        again = f"; `expkit runs resume {number}` starts its next attempt" * (
            record.state != "completed"
        )
        raise UserError(f"run {number} is already {record.state}: nothing to requeue{again}")
    if record.state != "running":
        raise UserError(
            f"run {number} is {record.state}, not running an attempt: nothing to requeue; "
            f"`expkit runs cancel {number}` stops it"
        )
    limit = max_attempts(record.job)
    if record.attempt >= limit:
        raise UserError(
            f"run {number} is on its last attempt ({record.attempt} of {limit}); a requeue "
            f"needs one left (the job's `retry.max_attempts`): `expkit runs cancel {number}` "
            f"stops it, then `expkit runs resume {number}` starts its next attempt"
        )
    if "preempted" not in (record.job.get("retry") or {}).get("on", ["preempted"]):
        raise UserError(
            f"run {number}'s job does not retry a preemption (`retry.on` has no `preempted`), "
            f"which a requeue is: `expkit runs cancel {number}` stops it, then `expkit runs "
            f"resume {number}` starts its next attempt"
        )
    workspace.history.runs.request_requeue(record.id)
    rows = workspace.history.attempts.of(record.id)
    if rows and rows[-1].attempt == record.attempt and rows[-1].ended is not None:
        # Between attempts (the backoff): the request ends the wait, nothing is stopped.
        print(
            f"asked run {number} to start attempt {record.attempt + 1} of {limit} now "
            f"(attempt {record.attempt} already ended; its backoff is cut short)"
        )
        return 0
    checkpoint = " (the script gets its stop signal to write a checkpoint)" * bool(
        record.job.get("checkpoints")
    )
    print(
        f"asked run {number} to stop attempt {record.attempt}{checkpoint} and start attempt "
        f"{record.attempt + 1} of {limit}"
    )
    return 0


def cmd_runs_resume(args: argparse.Namespace) -> int:
    """Start the next attempt of a failed or canceled run (`lifecycle.reopen` checks it can
    be resumed; UserError, exit 2, when not), in the foreground as `expkit run` does, or in
    the background (--detach); the exit code is `expkit run`'s."""
    from expkit import lifecycle
    from expkit.cli.run import drive_here

    workspace = open_workspace(args)
    record = run_record(workspace, args.run_id)
    early: list[str] = []  # a signal from now on cancels the run once it is reopened
    lifecycle.note_signals(early)
    record = lifecycle.reopen(workspace, record.id)
    return drive_here(args, workspace, record, early, resume=True)


def cmd_runs_files(args: argparse.Namespace) -> int:
    """The run's file names, one a line, then the links out of the run (recorded, not stored)."""
    from expkit.api import Run
    from expkit.outputs import escaped

    def shown(name: str) -> str:
        # One line per entry, and a file's line never reads as a link's: a name that is not
        # printable is escaped, one holding " -> " is quoted (as Python writes a string).
        text = escaped(name)
        return repr(name) if text == name and " -> " in name else text

    workspace = open_workspace(args)
    run = Run(workspace, run_record(workspace, args.run_id).id)
    for name in run.get_file_names():
        print(shown(name))
    for name, target in run.get_links().items():
        print(f"{shown(name)} -> {escaped(target)}  (a link out of the run: recorded, not stored)")
    return 0


def cmd_runs_download(args: argparse.Namespace) -> int:
    """Copy one of the run's files to DEST (verified against its sha256); print where."""
    from expkit.api import Run

    workspace = open_workspace(args)
    run = Run(workspace, run_record(workspace, args.run_id).id)
    print(run.download_file(args.name, args.dest, overwrite=args.force))
    return 0
