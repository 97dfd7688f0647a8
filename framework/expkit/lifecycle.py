"""The lifecycle of one run: prepare -> scale -> run -> post-process -> register.

Read top to bottom, this file is the order things happen in. Every stage transition is
committed to the run history before the next stage starts; post-process runs whenever the
script may have started, so that outputs are kept even when it failed or was canceled.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expkit import checkpoints as checkpoint_folder
from expkit import data as data_inputs
from expkit import importhooks, options, services, snapshot
from expkit import outputs as run_outputs
from expkit.blobs import BlobStore
from expkit.capabilities import (
    Allocation,
    Capability,
    ComputeTarget,
    DistributedBackend,
    Environment,
    EnvironmentBuilder,
    Process,
    RankFailure,
)
from expkit.console import Console, count_files, human_seconds, short_hash
from expkit.context import (
    ATTEMPT_ENV,
    CHANNEL_ENV,
    CHECKPOINT_ENV,
    RUN_ID_ENV,
    STOP_SIGNAL_ENV,
)
from expkit.errors import (
    Canceled,
    Detached,
    Interrupted,
    NoSpace,
    PluginError,
    StageFailed,
    UserError,
)
from expkit.history import RunRecord, no_room
from expkit.history import params as params_source
from expkit.job import ExportSpec, JobSpec
from expkit.metrics import SINK_OUTCOME, MetricPump, SinkWorker, cursor_keys
from expkit.plugins import Plugins, call, get_plugins
from expkit.procs import (
    WORKSPACE_ENV,
    become_subreaper,
    run_processes,
    stop_descendants,
    stop_run_processes,
)
from expkit.recovery import RESERVE_NAME
from expkit.stages import AttemptOutcome, Outcome, RunState, Stage
from expkit.workspace import Workspace

CANCEL_POLL_SECONDS = 0.5
BACKOFF_POLL_SECONDS = 0.1  # how often a wait between attempts looks for a cancel
# Room set aside on the workspace's disk while a run goes (a file in the run's folder, see
# `Lifecycle.reserve_room`): when the disk fills, it is freed so that the run's record can
# be finished, however full the script left the disk (its outputs are kept).
RESERVE_BYTES = 1 << 20
LOG_TAIL_LINES = 5
# The reason of an attempt stopped by `expkit runs cancel --requeue`.
REQUEUE_REASON = "a requeue was asked for (`expkit runs cancel --requeue`)"
# What prepare made, kept in the run's folder for a driver that re-attaches to the run (the
# environment and the script's command line): it does not prepare again.
PREPARED_NAME = "prepared.json"
# Signals that end a run as canceled: Ctrl-C (SIGINT), a `kill` or a service manager stopping
# the driver (SIGTERM), a closed terminal or SSH session (SIGHUP). The first one names the
# reason; any number after it are noted, never fatal, until the run is recorded.
TERMINATING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# The stages a terminating signal interrupts at once; in the others (post-process) it is noted
# and the run finishes its bookkeeping first, so that the outputs are sealed.
INTERRUPTIBLE_STAGES = (Stage.PREPARE, Stage.SCALE, Stage.RUN, Stage.REGISTER)
# What each stage is doing, for a "No space left on device while ..." reason.
DOING = {
    None: "starting the run",
    Stage.PREPARE: "preparing the run (snapshot, environment, data)",
    Stage.SCALE: "acquiring the run's resources",
    Stage.RUN: "running the script",
    Stage.POST_PROCESS: "sealing outputs",
    Stage.REGISTER: "registering the model",
}


# How the line between two attempts says an attempt's outcome (AttemptOutcome's words).
ENDED: dict[str, str] = {
    AttemptOutcome.PREEMPTED: "preempted",
    AttemptOutcome.NODE_FAILURE: "lost a node",
    AttemptOutcome.TIME_LIMIT: "reached its time limit",
}


@dataclass
class Choice:
    """The capabilities a job uses, looked up before any run is created, and the job as they
    see it: its options checked, with their defaults filled in."""

    job: JobSpec
    builder: EnvironmentBuilder
    compute: ComputeTarget
    backend: DistributedBackend | None  # None: the compute target launches the ranks itself
    sinks: list[tuple[Any, Any]] = field(default_factory=list)  # (SinkSpec, MetricSink)
    registries: list[Any] = field(default_factory=list)  # ModelRegistry, as job.model.registries
    exporters: list[tuple[Any, Any]] = field(default_factory=list)  # (ExportSpec, Exporter)
    # the export formats the registries added (`ModelRegistry.exports`), for registering alone
    for_registries: frozenset[str] = frozenset()


def choose(job: JobSpec, plugins: Plugins) -> Choice:
    """Find every plugin the job names, check every option the job gives against what its
    plugin declares (in one pass, see `expkit.options`), then each plugin's rules for the
    whole job; a UserError names the field, or two plugins that claim a name of a kind the
    job uses (only the kinds it uses are collected: see `Plugins.get`)."""
    compute = plugins.get("compute_targets", job.compute.target, "compute")
    backend = None
    if not compute.launches_ranks:
        backend = plugins.get("distributed_backends", job.distributed.backend, "distributed")
    launcher = backend if backend is not None else compute  # who starts the ranks
    if job.retry.in_place and not getattr(launcher, "restarts_in_place", False):
        if backend is None:  # e.g. Slurm: srun starts every rank, torchrun's agent does not
            raise UserError(
                f"retry.in_place: compute: {job.compute.target} starts the ranks itself, "
                "without torchrun's agent, so nothing restarts them within an attempt; use "
                "retry.max_attempts for a new attempt instead"
            )
        raise UserError(
            f"retry.in_place: distributed: {job.distributed.backend} on compute: "
            f"{job.compute.target} does not restart the ranks within an attempt (torchrun "
            "does); use retry.max_attempts for a new attempt instead"
        )
    builder = plugins.get("environment_builders", job.environment.builder, "environment")
    sinks = [plugins.get("metric_sinks", s.name, f"metrics.{i}") for i, s in enumerate(job.metrics)]
    named = job.model.registries if job.model else []
    registries = [
        plugins.get("model_registries", r.name, f"model.registries.{i}")
        for i, r in enumerate(named)
    ]
    listed = {e.format for e in job.exports}
    job = _with_registry_exports(job, registries)
    exporters = [
        plugins.get("exporters", e.format, f"exports.{i}") for i, e in enumerate(job.exports)
    ]
    job = _with_checked_options(job, compute, backend, builder, sinks, registries, exporters)
    for capability in (builder, compute, backend, *sinks, *registries, *exporters):
        if capability is not None:  # the rules of the whole job, its options known good
            call(capability, "check", job)
    return Choice(
        job=job,
        builder=builder,
        compute=compute,
        backend=backend,
        sinks=list(zip(job.metrics, sinks, strict=True)),
        registries=registries,
        exporters=list(zip(job.exports, exporters, strict=True)),
        for_registries=frozenset(e.format for e in job.exports if e.format not in listed),
    )


def _with_registry_exports(job: JobSpec, registries: list[Any]) -> JobSpec:
    """`job` with each export format its registries register with a version
    (`ModelRegistry.exports`, e.g. the `mlflow` registry's MLflow model folder) added at the
    end (after the job's own: the mlflow export takes in a passing onnx export), not
    required, when the job does not list it and its model says how to load it and what it
    takes (`model.load` and `model.input`); else the registry registers the files alone."""
    model = job.model
    if model is None or model.load is None or model.input is None:
        return job
    listed = {e.format for e in job.exports}
    added = []
    for registry in registries:
        for name in getattr(registry, "exports", ()):  # a duck-typed registry has none
            if name not in listed:
                listed.add(name)
                added.append(ExportSpec(format=name))
    return job.replace(exports=[*job.exports, *added]) if added else job


def _with_checked_options(
    job: JobSpec,
    compute: ComputeTarget,
    backend: DistributedBackend | None,
    builder: EnvironmentBuilder,
    sinks: list[Any],
    registries: list[Any],
    exporters: list[Any],
) -> JobSpec:
    """`job` with the options of each plugin it names checked and their declared defaults
    filled in. Raises UserError with one line per problem, of every plugin, in the order of
    the job's fields (`compute.options.slots: ...`)."""
    found: list[tuple[str, str]] = []

    def checked(capability: Capability, spec: Any, where: str) -> Any:
        found.extend(options.problems(capability, spec.options, f"{where}.options"))
        return spec.replace(options=options.with_defaults(capability.takes, spec.options))

    changes: dict[str, Any] = {"compute": checked(compute, job.compute, "compute")}
    if backend is not None:  # else the target's service starts the ranks: options not used
        changes["distributed"] = checked(backend, job.distributed, "distributed")
    changes["environment"] = checked(builder, job.environment, "environment")
    changes["metrics"] = [
        checked(sink, spec, f"metrics.{i}")
        for i, (spec, sink) in enumerate(zip(job.metrics, sinks, strict=True))
    ]
    if job.model is not None:
        changes["model"] = job.model.replace(
            registries=[
                checked(registry, spec, f"model.registries.{i}")
                for i, (spec, registry) in enumerate(
                    zip(job.model.registries, registries, strict=True)
                )
            ]
        )
    changes["exports"] = [
        checked(exporter, spec, f"exports.{i}")
        for i, (spec, exporter) in enumerate(zip(job.exports, exporters, strict=True))
    ]
    if found:
        raise UserError("\n".join(f"{where}: {reason}" for where, reason in found))
    return job.replace(**changes)


def submit(
    workspace: Workspace, job: JobSpec, sweep: str | None = None, trial: int | None = None
) -> RunRecord:
    """Record a new run of `job` (state queued) after checking every plugin it names;
    `sweep` and `trial`: the sweep it is a trial of and its trial number there."""
    compute = choose(job, get_plugins()).compute  # first: a target may refuse data outright
    check_data_sources(workspace, job)
    call(compute, "preflight", job)
    return workspace.history.runs.create(job.experiment, job.to_dict(), sweep, trial)


def note_signals(early: list[str]) -> Any:
    """From now on a terminating signal is only noted (its name appended to `early`), for
    `drive(..., early=early)` to end the run canceled with it: `expkit run` calls this
    before it records the run, so that a signal while the plugins are checked is not fatal.
    Returns the handlers that were there."""
    return _on_signals(lambda signum, frame: early.append(signal.Signals(signum).name))


def check_data_sources(workspace: Workspace, job: JobSpec) -> None:
    """Raise UserError for a data `source` that holds the workspace or lies inside it:
    copying or linking it into a run (itself inside the workspace) would copy the workspace
    into itself, or hand the script the workspace's own files."""
    home = workspace.path.resolve()
    for name, item in job.data.items():
        if not item.source or item.prepare:
            continue
        origin = Path(item.source).resolve()
        if home == origin or home.is_relative_to(origin):
            what = "holds the workspace"
        elif origin.is_relative_to(home):
            what = "is inside the workspace"
        else:
            continue
        raise UserError(
            f"data.{name}.source: {origin} {what} {home}; name a folder of the data alone "
            "(or keep the workspace elsewhere with --workspace)"
        )


def reopen(workspace: Workspace, run_id: str) -> RunRecord:
    """Make failed or canceled run `run_id` queued for its next attempt (`expkit runs
    resume`), after checking that it can be: its snapshot, prepared environment and data are
    still there. Raises UserError naming what is missing (a completed run, a trial of a
    sweep, a run made before attempts were recorded, a run still going). The caller then
    drives it with `drive(..., resume=True)`."""
    history = workspace.history
    try:
        record = history.runs.get(run_id)
    except KeyError:
        raise UserError(f"run {run_id}: no such run; `expkit runs list` lists them") from None
    number = record.number
    if record.state == RunState.COMPLETED:
        raise UserError(
            f"run {run_id} completed: there is nothing to resume; start a new run with `expkit run`"
        )
    if not record.finished:
        raise UserError(
            f"run {run_id} is {record.state}: only a failed or canceled run can be resumed; "
            f"wait for it, or stop it with `expkit runs cancel {number}`"
        )
    if record.sweep is not None:
        raise UserError(
            f"run {run_id} is trial {record.trial} of sweep {record.sweep}: resume the sweep "
            f"(`expkit sweeps resume {record.sweep}`), not one of its trials"
        )
    run_dir = workspace.run_dir(run_id)
    prepared = _read_prepared(run_dir)
    snap = run_dir / "snapshot"
    if prepared is None or not snap.is_dir() or snap.is_symlink():
        what = "its snapshot" if prepared is not None else f"what prepare made ({PREPARED_NAME})"
        raise UserError(
            f"run {run_id} cannot be resumed: {what} is missing (it failed before its script "
            "started, or was made by an expkit that did not record it); start a new run with "
            "`expkit run`"
        )
    for name, entry in prepared["data"].items():
        origin = Path(entry["origin"])
        if not origin.exists():
            raise UserError(
                f"run {run_id} cannot be resumed: data.{name}: {origin} is gone; put it back, "
                "or start a new run with `expkit run`"
            )
    python = Path(prepared["environment"].get("python") or "")
    if python.is_absolute() and not python.exists():
        raise UserError(
            f"run {run_id} cannot be resumed: its environment's interpreter {python} is gone; "
            "start a new run with `expkit run` (it builds the environment again)"
        )
    try:
        return history.runs.reopen(run_id)
    except ValueError as changed:  # another command resumed it first
        raise UserError(f"run {run_id} cannot be resumed: {changed}") from None


def _read_prepared(run_dir: Path) -> dict[str, Any] | None:
    """What prepare recorded (prepared.json) when it holds all a resume needs (the data's
    origins included), else None."""
    path = run_dir / PREPARED_NAME
    if path.is_symlink() or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or not all(
        isinstance(saved.get(key), dict) for key in ("environment", "command", "data")
    ):
        return None
    return saved


def drive(
    workspace: Workspace,
    run_id: str,
    console: Console,
    plugins: Plugins | None = None,
    own_process: bool = False,
    early: list[str] | None = None,
    reattach: bool = False,
    resume: bool = False,
) -> RunRecord:
    """Drive a queued run through every stage in this process; returns the final record.

    `reattach`: take over a run whose driver died after its compute target recorded a job
    that goes on without it (`RunContext.set_remote_job`): prepare is not done again, the
    target's `reattach` replaces `acquire`, and the run goes on from its scale or run stage.
    A driver that lets go of such a run (SIGHUP: the terminal closed) starts a background
    driver that re-attaches (`expkit.driver`) and returns the record still unfinished.

    `resume`: the next attempt of a run `reopen` made queued again: prepare is not done
    again (the working copy is made again from the snapshot, the data placed and the
    checkpoint folder put back), then scale, run, post-process and register as usual.

    `own_process`: this process drives this one run and nothing else (`expkit run`, the
    background driver). It then becomes the subreaper of what the script starts, and every
    process still below it when the run stage ends is stopped, daemons that cleared their
    environment included. `early`: the signals `note_signals` noted before this call.
    """
    early = [] if early is None else early  # a signal while the plugins load is kept
    previous = note_signals(early)
    try:
        record = workspace.history.runs.get(run_id)
        job = JobSpec.from_dict(record.job, source=f"run {run_id}")
        plugins = plugins or get_plugins()
        choice = choose(job, plugins)  # the run's plugins see choice.job: defaults filled in
        lifecycle = Lifecycle(workspace, record, choice.job, choice, plugins, console)
    except BaseException:
        _on_signals(previous)
        raise
    lifecycle.own_process = own_process
    lifecycle.terminated_by = early[0] if early else None
    lifecycle.reattaching = reattach
    if resume:  # the attempt after the last one recorded
        lifecycle.resuming = True
        done = workspace.history.attempts.of(run_id)
        lifecycle.set_attempt(max((a.attempt for a in done), default=0) + 1)
    # The run's own handler replaces the early one with no gap in between, and puts back
    # `previous` when the run is recorded.
    record = lifecycle.drive(previous)
    if lifecycle.hand_over:
        from expkit.driver import start_driver

        start_driver(workspace, run_id, reattach=True)
    return record


class Lifecycle:
    def __init__(
        self,
        ws: Workspace,
        record: RunRecord,
        job: JobSpec,
        choice: Choice,
        plugins: Plugins,
        console: Console,
    ) -> None:
        self.ws, self.job, self.choice, self.plugins, self.console = (
            ws,
            job,
            choice,
            plugins,
            console,
        )
        self.history = ws.history
        self.run_id = record.id
        self.run_dir = ws.run_dir(record.id)
        self.work_dir = self.run_dir / "work"
        self.blobs = BlobStore(ws.blobs_dir)
        self.info = services.run_info(ws, record.id, job)
        self.data_paths: dict[str, str] = {}
        self.stage_note = ""
        self.current_stage: Stage | None = None
        # A plain flag, not a threading.Event: the signal handler sets it, and a handler may
        # run inside any bytecode of the main thread, another handler's included, so it must
        # take no lock (Event.set takes one: a second signal there deadlocked the driver).
        self._cancel = False
        self._signals = 0  # how many signals came (a plain int, for the same reason)
        self._last_poll = 0.0
        self.pump: MetricPump | None = None
        self.sinks: list[SinkWorker] = []
        self.released = False  # ComputeTarget.release was called
        self.own_process = False
        self.terminated_by: str | None = None  # the name of the signal that ended the run
        self._interruptible = False
        self.remote_job = record.remote_job  # a job that goes on without this driver
        self.sweep = record.sweep  # the sweep this run is a trial of: it registers no model
        self.reattaching = False  # this driver took over the run from one that died
        self.resuming = False  # the next attempt of a failed or canceled run (runs resume)
        self.hand_over = False  # let go of the run: a background driver re-attaches
        self.allocation: Allocation | None = None  # what the current attempt holds
        self.attempt = record.attempt or 1  # the current attempt (a re-attaching driver's)
        script_env = {
            RUN_ID_ENV: record.id,
            CHANNEL_ENV: str(self.run_dir / "metrics"),
            "EXPKIT_RUN_DIR": str(self.run_dir),
            "EXPKIT_WORKSPACE": str(ws.path),
            "PYTHONUNBUFFERED": "1",
            ATTEMPT_ENV: str(self.attempt),
            # other trackers' in-script APIs (Azure ML's, MLflow's) record into this run
            **importhooks.script_env(plugins.import_hooks(), dict(os.environ)),
        }
        if job.checkpoints is not None:
            folder = checkpoint_folder.working_folder(self.work_dir, job.checkpoints)
            script_env[CHECKPOINT_ENV] = str(folder)
            script_env[STOP_SIGNAL_ENV] = job.checkpoints.signal  # what a planned stop sends
        self.ctx = services.run_context(
            ws,
            record.id,
            job,
            script_env=script_env,
            say=self.say,
            waiting=self.waiting,
            canceled=self.canceled,
            echo=console.output,
        )
        self.ctx.attempt = self.attempt
        self.ctx.requeued = self.requeued
        recorded = self.ctx.set_remote_job

        def set_remote_job(remote_job: str) -> None:
            recorded(remote_job)
            self.remote_job = remote_job
            self.history.attempts.set_remote_job(self.run_id, self.attempt, remote_job)

        self.ctx.set_remote_job = set_remote_job

    # -- the whole run ----------------------------------------------------------------------
    def drive(self, previous: Any = None) -> RunRecord:
        """Every stage, then the final record. `previous`: the signal handlers to put back
        at the end (default: those found now)."""
        installed = _on_signals(self._on_signal)
        previous = installed if previous is None else previous
        try:
            self.history.runs.claim(self.run_id)
            self.reserve_room()
            if self.own_process:
                become_subreaper()
            state: str = RunState.COMPLETED
            error: str | None = None
            script_started = out_of_room = False
            self.console.info(f"run {self.run_id} in workspace {self.ws.path}")
            try:
                try:
                    if self.reattaching:
                        self.allocation = self.reattach_scale()
                    else:
                        with self.stage(Stage.PREPARE):
                            if self.resuming:
                                self.restore()
                            else:
                                self.prepare()
                        with self.stage(Stage.SCALE):
                            self.allocation = self.scale()
                    script_started = True
                    with self.stage(Stage.RUN, resumed=self.reattaching):
                        self.run_attempts()
                finally:
                    letting_go = isinstance(sys.exc_info()[1], Detached)
                    allocation = self.allocation
                    if allocation is not None and not self.released and not letting_go:
                        self.release(allocation, failing=True)  # stopped before the run stage
                    if not letting_go:  # the job's processes go on (on this host, too)
                        self.stop_processes()
            except Detached as letting_go:
                self.let_go(str(letting_go))
                return self.history.runs.get(self.run_id)
            except (Canceled, KeyboardInterrupt) as stop:
                state, error = RunState.CANCELED, self._canceled_because(stop)
            except Exception as failure:
                if disk_full(failure):  # first: the record may not be writable yet
                    state, error, out_of_room = RunState.FAILED, self._no_space(failure), True
                elif isinstance(failure, StageFailed | UserError | PluginError):
                    state, error = RunState.FAILED, f"{self.current_stage}: {failure}"
                else:  # a bug: record it, then let the traceback show
                    self.history.runs.finish(
                        self.run_id, RunState.FAILED, f"{self.current_stage}: {failure!r}"
                    )
                    raise
            # The script may have written outputs: keep them whatever happened. A signal now
            # (see _on_signal) is noted, never fatal, until the run is recorded.
            if out_of_room:
                self.make_room(error)
            state, error = self.finish(state, error, script_started)
        finally:
            self.release_room()
            if self.own_process:
                stop_descendants(grace=2)  # what an export or a late daemon left
                # This process drives this run only: what is left is printing the summary
                # and exiting with the recorded state's code, which a late signal must not
                # turn into "killed by SIGTERM". Ignored, not handled: Python puts back the
                # default action of its handled signals while it exits.
                _on_signals({sig: signal.SIG_IGN for sig in TERMINATING_SIGNALS})
            else:
                _on_signals(previous)
            self.hand_over_sinks()
        return self.history.runs.get(self.run_id)

    def hand_over_sinks(self) -> None:
        """Start the background process that sends the rest to the sinks a signal stopped in
        post-process (`SinkWorker.handed_over`) and closes them: once the run's record is
        final (it closes them with its outcome), and after this driver stopped its
        descendants (it is one, and must outlive this process)."""
        handed = [worker.key for worker in self.sinks if worker.handed_over]
        if handed:
            from expkit import sinkrecovery

            sinkrecovery.start(self.ws, self.run_id, handed)

    def let_go(self, reason: str) -> None:
        """Leave the run unfinished, its job going on (Detached): what was logged is
        recorded, and the record says how to follow the run again. After a signal (the
        terminal closed), a background driver re-attaches at once (`hand_over`)."""
        if self.pump is not None:
            self.pump.stop()
        self.hand_over = self.terminated_by is not None
        number = self.history.runs.get(self.run_id).number
        text = (
            f"the driver let go of {self.remote_job} ({reason}); it goes on, and "
            f"`expkit runs follow {number}` follows it again"
        )
        self.history.events.add(self.run_id, "progress", text, self.current_stage)
        self.history.runs.update(self.run_id, status=f"detached: {reason}")
        _note(text)

    def reattach_scale(self) -> Allocation | None:
        """A driver taking over the run: what prepare made, read back, then the job found
        again by the compute target; in the scale stage when the job was still queued
        (None when it was running: the run stage finds it, see `reattach_job`)."""
        self.load_prepared()
        self.console.info(f"re-attaching to {self.remote_job}")
        scale = {s.stage: s for s in self.history.stages.of(self.run_id)}.get(Stage.SCALE)
        if scale is not None and scale.state == Outcome.COMPLETED:
            return None
        with self.stage(Stage.SCALE, resumed=True):
            allocation = self.reattach_job()
            self.history.runs.update(self.run_id, state="scaling", status=None)
            self.stage_note = allocation.description
        return allocation

    def load_prepared(self) -> dict[str, Any]:
        """What prepare made, read back from prepared.json by a driver that does not prepare
        (one that re-attaches, or resumes): the environment and the script's command, with
        the current attempt's EXPKIT_ATTEMPT (the file keeps attempt 1's); the whole record."""
        saved: dict[str, Any] = json.loads(
            (self.run_dir / PREPARED_NAME).read_text(encoding="utf-8")
        )
        self.ctx.environment = Environment(**saved["environment"])
        self.ctx.command = Process(argv=saved["command"]["argv"], env=saved["command"]["env"])
        self.set_attempt(self.attempt)
        return saved

    def reattach_job(self) -> Allocation:
        """ComputeTarget.reattach for the job the run recorded."""
        assert self.remote_job is not None
        return call(self.choice.compute, "reattach", self.ctx, self.remote_job)

    def release(self, allocation: Allocation, failing: bool) -> None:
        """ComputeTarget.release, once, whatever happened; never cut short by a signal.

        A release that raises fails the run stage ("release failed: ...") when nothing else
        failed (the target may still hold what it acquired, and the user must know); when
        the run is already failing or canceled, it is a warning and that first reason stays
        the run's."""
        self._interruptible = False
        self.released = True
        compute = self.choice.compute
        try:
            call(compute, "release", self.ctx, allocation)
        except (PluginError, StageFailed, UserError) as failure:
            if not failing:
                raise StageFailed(f"release failed: {failure}") from failure
            self.warn(f"release failed: {failure}")

    def stop_processes(self) -> None:
        """Stop what the run started: its processes (found by their environment marker, from
        the data-prepare command and pip to the script's children), and, when this process
        drives this run only, every process still below it."""
        stop_run_processes(self.run_id, grace=2, workspace=self.ws.path)
        if self.own_process:
            stop_descendants(grace=2)

    def finish(self, state: str, error: str | None, script_started: bool) -> tuple[str, str | None]:
        """Post-process and register (as far as the run got), then the run's final record.

        A full disk on the way fails the run: what the run no longer needs is removed and
        the outputs are sealed again, now that there is room; if there still is none, they
        are kept unsealed in the run's folder and the record says so."""
        for attempt in (1, 2):
            try:
                state, error = self.wrap_up(state, error, script_started)
            except (Canceled, KeyboardInterrupt) as stop:  # a signal in register: no version
                state, error = RunState.CANCELED, self._canceled_because(stop)
            except Exception as failure:
                if not disk_full(failure):
                    if not isinstance(failure, StageFailed | UserError | PluginError):
                        self.history.runs.finish(
                            self.run_id, RunState.FAILED, f"{self.current_stage}: {failure!r}"
                        )
                        raise  # a bug: recorded, and its traceback shows
                    if state == RunState.COMPLETED:
                        state, error = RunState.FAILED, f"{self.current_stage}: {failure}"
                    break
                if not (state == RunState.FAILED and error and "No space left" in error):
                    state, error = RunState.FAILED, self._no_space(failure)
                self.make_room(error)
                if attempt == 1 and script_started:
                    continue  # seal the outputs, now that there is room
                with suppress(Exception):  # outputs out of work/ (unsealed), said in the record
                    from expkit.recovery import salvage

                    salvage(self.ws, self.history, self.run_id)
            break

        state, error = self.close_sinks(state, error)
        if state != RunState.COMPLETED:
            self.withdraw_versions(state)
        if script_started:  # an attempt a full disk or a bug left open
            with suppress(Exception):
                canceled = state == RunState.CANCELED
                outcome = AttemptOutcome.CANCELED if canceled else AttemptOutcome.FAILED
                self.history.attempts.finish(self.run_id, self.attempt, outcome, error)
        try:
            self.history.runs.finish(self.run_id, state, error)
        except Exception as failure:
            if not disk_full(failure):
                raise
            raise NoSpace(
                f"{self._no_space(failure)}; the run's record could not be finished either "
                "(free some space: the next expkit command marks the run failed)"
            ) from None
        for problem in self.plugins.notify(
            "expkit_run_finished", run=self.info, state=RunState(state), error=error
        ):
            self._report(problem)
        return state, error

    def close_sinks(self, state: str, error: str | None) -> tuple[str, str | None]:
        """Tell every sink the run's final state, after the last stage. A close that raises
        is a warning and a sink-failed event; a required sink's fails a completed run (its
        model version is then not kept). Required sinks are told first, so that the others
        are told "failed" when one of those fails. Each sink's outcome is recorded for the
        run's summary (a SINK_OUTCOME event: `mlflow ok (1,234 values)`)."""
        for worker in sorted(self.sinks, key=lambda w: not w.required):
            problem = worker.close(services.run_outcome(self.ws, self.run_id, state, error))
            if problem is None:
                continue
            self.warn(str(problem))
            self.history.events.add(self.run_id, "sink-failed", str(problem))
            if worker.required and state == RunState.COMPLETED:
                state, error = RunState.FAILED, f"required {problem}"
        for worker in self.sinks:
            self.history.events.add(self.run_id, SINK_OUTCOME, worker.outcome())
        return state, error

    def wrap_up(
        self, state: str, error: str | None, script_started: bool
    ) -> tuple[str, str | None]:
        """Post-process (when the script may have started) and register (a completed run)."""
        if script_started:
            with self.stage(Stage.POST_PROCESS):
                self.post_process(state)
        else:
            self.keep_checkpoints()  # those a resumed run put back
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.skip(Stage.POST_PROCESS, "the script never started")
        if self.terminated_by and state == RunState.COMPLETED:  # the signal came in post-process
            state, error = RunState.CANCELED, self.stop_reason()
            self.say(f"{self.terminated_by}: outputs sealed; the run ends canceled")
        if state == RunState.COMPLETED and self.job.model and not self.sweep:
            refused = self.register_if()
            if refused:
                self.skip(Stage.REGISTER, f"not registered: {refused}")
            else:
                with self.stage(Stage.REGISTER):
                    self.register()
        elif state == RunState.COMPLETED and self.job.model:
            self.skip(Stage.REGISTER, f"a trial of {self.sweep}: the sweep registers its best")
        else:
            reason = "no model named in the job" if state == RunState.COMPLETED else f"run {state}"
            self.skip(Stage.REGISTER, reason)
        return state, error

    def reserve_room(self) -> None:
        """Set aside RESERVE_BYTES in the run's folder (nothing when the disk is already too
        full: the run then fails on its own, by name). Freed by `make_room`."""
        path = self.run_dir / RESERVE_NAME
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
        except (OSError, AttributeError):  # no room, or no fallocate: no reserve
            with suppress(OSError):
                path.unlink()

    def release_room(self) -> None:
        """Free the room `reserve_room` set aside."""
        with suppress(OSError):
            (self.run_dir / RESERVE_NAME).unlink()

    def make_room(self, error: str | None) -> None:
        """After "no space left": free what the run no longer needs, so that its outputs can
        be sealed and its record written. The room set aside goes, and the working copy
        (outputs/ and logs/ stay for post-process, the checkpoint folder for a resume), then
        stages the full disk left open are closed as failed."""
        self.release_room()
        kept = {"outputs", "logs"}
        if self.job.checkpoints is not None:
            kept.add(Path(self.job.checkpoints.folder).parts[0])
        if self.work_dir.is_dir() and not self.work_dir.is_symlink():
            for path in self.work_dir.iterdir():
                if path.name in kept and not path.is_symlink():
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with suppress(OSError):
                        path.unlink()
        with suppress(Exception):  # still no room: the final record says it all
            for stage in self.history.stages.of(self.run_id):
                if stage.state == "running":
                    self.history.stages.finish(self.run_id, stage.stage, Outcome.FAILED, error)

    def _no_space(self, failure: BaseException) -> str:
        """ "<stage>: No space left on device on <mount> while <doing>", for the record."""
        stage = self.current_stage
        where = mount_point(self.ws.path)
        text = f"No space left on device on {where} while {DOING.get(stage, stage)}"
        cause = _first(failure, StageFailed)
        if cause is not None:
            text += f" ({cause})"
        return f"{stage}: {text}" if stage else text

    def skip(self, name: Stage, reason: str) -> None:
        """Record stage `name` as skipped for `reason`, and tell the observers so
        (`expkit_stage_finished` with outcome skipped and the reason as its error)."""
        self.history.stages.skip(self.run_id, name, reason)
        for problem in self.plugins.notify(
            "expkit_stage_finished",
            run=self.info,
            stage=name,
            outcome=Outcome.SKIPPED,
            error=reason,
        ):
            self._report(problem)

    @contextmanager
    def stage(self, name: Stage, resumed: bool = False) -> Iterator[None]:
        """Record a stage's start and end (with its outcome) around its work. `resumed`: a
        driver that re-attaches goes on with a stage its predecessor started (its start, as
        recorded, stays; the observers were told of it then)."""
        self.current_stage, self.stage_note = name, ""
        if self.terminated_by and name in INTERRUPTIBLE_STAGES:  # it came between two stages
            raise Canceled(self.stop_reason())
        recorded = None  # read only by a driver that re-attaches: no query on every stage
        if resumed:
            recorded = {s.stage: s for s in self.history.stages.of(self.run_id)}.get(name)
        started = time.monotonic()
        if recorded is not None and recorded.started is not None:
            self.history.runs.update(self.run_id, state=name.state)
            started -= max(0.0, time.time() - recorded.started)
            self.console.stage_started(name)
        else:
            self.history.stages.start(self.run_id, name)
            self.console.stage_started(name)
            for problem in self.plugins.notify("expkit_stage_started", run=self.info, stage=name):
                self._report(problem)
        outcome: Outcome | None = Outcome.COMPLETED
        message: str | None = None
        try:
            self._interruptible = name in INTERRUPTIBLE_STAGES
            yield
        except Detached:
            outcome = None  # the stage goes on without this driver: its record stays running
            raise
        except (Canceled, KeyboardInterrupt) as stop:
            outcome, message = Outcome.CANCELED, self._canceled_because(stop)
            raise
        except BaseException as failure:
            outcome, message = Outcome.FAILED, str(failure) or type(failure).__name__
            raise
        finally:
            self._interruptible = False  # the bookkeeping below is never cut short
            if outcome is not None:
                self._stage_ended(name, outcome, message, time.monotonic() - started)

    def _stage_ended(
        self, name: Stage, outcome: Outcome, message: str | None, seconds: float
    ) -> None:
        """Record and show how stage `name` ended, and tell the observers."""
        recorded = self.history.stages.finish(
            self.run_id, name, outcome, message or self.stage_note
        )
        shown = seconds if recorded is None else recorded  # as `runs show` will say it
        self.console.stage_finished(name, outcome, shown, message or self.stage_note)
        for problem in self.plugins.notify(
            "expkit_stage_finished", run=self.info, stage=name, outcome=outcome, error=message
        ):
            self._report(problem)

    # -- prepare: snapshot, environment, working copy, data ---------------------------------
    def prepare(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "job.yaml").write_text(self.job.to_yaml(), encoding="utf-8")
        for folder in ("logs", "metrics"):
            (self.run_dir / folder).mkdir(exist_ok=True)
        source = Path(self.job.source_directory)
        started = time.monotonic()
        index = self.ws.path / snapshot.INDEX_FOLDER  # a cache: files unchanged are not read
        snap = snapshot.take(source, self.run_dir / "snapshot", self.blobs, index)
        self.say(
            f"snapshot of {run_outputs.escaped(str(source))}: "
            f"{count_files(len(snap.files), snap.size)}, "
            f"{snap.rehashed} re-hashed, {human_seconds(time.monotonic() - started)} "
            f"(hash {short_hash(snap.hash)})"
        )
        for warning in snap.warnings:
            self.warn(warning)
        self.history.runs.update(self.run_id, snapshot_hash=snap.hash)
        self.info.snapshot_hash = snap.hash

        builder, compute = self.choice.builder, self.choice.compute
        started = time.monotonic()
        env = call(compute, "prepare", self.ctx) or call(
            builder, "build", self.job.environment, self.ctx
        )
        if not env.cache_hit:  # the build's time, as every duration is shown
            env.reason += f" in {human_seconds(time.monotonic() - started)}"
        self.ctx.environment = env
        self.say(env.reason)
        self.history.runs.update(self.run_id, environment_hash=env.hash)
        self.info.environment_hash = env.hash

        snapshot.working_copy(self.run_dir / "snapshot", self.work_dir)
        if self.job.checkpoints is not None:
            checkpoint_folder.make_empty(self.work_dir, self.job.checkpoints)
        process_env = {**os.environ, **env.env, **self._markers()}
        placed_data = {}
        for name, item in self.job.data.items():
            origin = data_inputs.prepare(
                name, item, source, self.ws.data_dir, env.python, self.say, process_env,
                self.ctx.log,
            )  # fmt: skip
            placed = data_inputs.place(name, origin, item.mode, self.work_dir)
            self.data_paths[name] = str(placed)
            placed_data[name] = {"origin": str(origin), "mode": item.mode}
            self.say(f"data {name!r}: {item.mode} {origin}")
        command = [env.python, self.job.entry_script, *self.job.command_args(self.data_paths)]
        self.history.params.set(self.run_id, self.job.params(self.data_paths), params_source.JOB)
        self.ctx.command = Process(argv=command, env={**env.env, **self.ctx.script_env})
        saved = {
            "environment": vars(env),
            "command": {"argv": command, "env": self.ctx.command.env},
            "data": placed_data,  # where each input came from: `expkit runs resume` places it
        }
        (self.run_dir / PREPARED_NAME).write_text(json.dumps(saved, indent=1), encoding="utf-8")
        self.stage_note = env.reason

    def restore(self) -> None:
        """Prepare for a resumed run (`expkit runs resume`): what prepare made is read back
        (prepared.json), the working copy made again from the run's snapshot, the data placed
        again from where prepare found it, and the checkpoint folder put back. A working copy
        its dead driver left is removed first, its checkpoint folder kept."""
        saved = self.load_prepared()
        spec = self.job.checkpoints
        if self.work_dir.is_symlink():
            self.work_dir.unlink()
        elif self.work_dir.is_dir():
            if spec is not None:
                for warning in checkpoint_folder.rescue(self.work_dir, self.run_dir, spec):
                    self.warn(warning)
            shutil.rmtree(self.work_dir)
        snapshot.working_copy(self.run_dir / "snapshot", self.work_dir)
        self.say(f"working copy made again from the run's snapshot for attempt {self.attempt}")
        sealed = self.run_dir / "outputs"
        if sealed.is_dir() and not sealed.is_symlink():  # the next attempt goes on from them
            shutil.copytree(sealed, self.work_dir / "outputs", copy_function=_copy_writable)
        for name, entry in saved["data"].items():
            origin = Path(entry["origin"])
            placed = data_inputs.place(name, origin, entry["mode"], self.work_dir)
            self.data_paths[name] = str(placed)
            self.say(f"data {name!r}: {entry['mode']} {origin}")
        if spec is not None:
            count, warnings = checkpoint_folder.restore(self.work_dir, self.run_dir, spec)
            for warning in warnings:
                self.warn(warning)
            if count:
                files = "1 file" if count == 1 else f"{count} files"
                self.say(f"checkpoint folder {spec.folder} put back: {files}")
        self.stage_note = f"resumed for attempt {self.attempt}"

    # -- scale: hold the resources ----------------------------------------------------------
    def scale(self) -> Allocation:
        compute = self.choice.compute
        allocation = call(compute, "acquire", self.ctx)
        self.history.runs.update(self.run_id, state="scaling", status=None)
        self.stage_note = allocation.description
        return allocation

    # -- run: every attempt of the script, its output and metrics streamed -------------------
    def run_attempts(self) -> None:
        """The run stage: attempt after attempt of the script until one completes, one ends
        in a way the job's `retry` does not retry, or no attempts are left (StageFailed with
        the last attempt's reason). One metric pump and one set of sink workers serve every
        attempt. Between two attempts the allocation is released, the attempt's end recorded
        and said, `retry.backoff_seconds` waited (a cancel then cancels the run) and the
        resources acquired again; the working copy, with its checkpoint folder, stays."""
        self.start_metrics()
        self.history.attempts.start(self.run_id, self.attempt, self.remote_job)
        try:
            if self.allocation is None:  # the job was running when its driver died
                self.allocation = self.reattach_job()
            while True:
                outcome, reason, code = self.one_attempt(self.allocation)
                self.history.attempts.finish(self.run_id, self.attempt, outcome, reason, code)
                if outcome == AttemptOutcome.COMPLETED:
                    self.release(self.allocation, failing=False)  # a failure is the stage's
                    self.stage_note = "exit code 0" + self.of_attempts()
                    return
                if not self.retrying(outcome, code):
                    raise StageFailed(reason + self.of_attempts())
                self.next_attempt(outcome, reason)
        except Detached:
            raise  # the job goes on: nothing is released, its attempt goes on
        except BaseException as stop:
            canceled = isinstance(stop, Canceled | KeyboardInterrupt)
            outcome = AttemptOutcome.CANCELED if canceled else AttemptOutcome.FAILED
            with suppress(Exception):  # a full disk: the run's own record says it
                reason = self._canceled_because(stop) if canceled else str(stop)
                self.history.attempts.finish(self.run_id, self.attempt, outcome, reason)
            if self.allocation is not None and not self.released:
                self.release(self.allocation, failing=True)
            raise

    def one_attempt(self, allocation: Allocation) -> tuple[str, str, int | None]:
        """Run the script once; how the attempt ended: (AttemptOutcome, reason, exit code).
        Exit code 0 completes it, another fails it; Interrupted gives its own outcome; a
        cancel asked for as a requeue (`expkit runs cancel --requeue`) preempts it (the
        request is then cleared); another StageFailed fails it. A cancel raises Canceled."""
        try:
            code = self.execute(allocation)
        except Interrupted as stop:
            return stop.outcome, str(stop), stop.exit_code
        except StageFailed as failure:
            return AttemptOutcome.FAILED, str(failure), None
        except Canceled:
            if self.take_requeue():
                return AttemptOutcome.PREEMPTED, REQUEUE_REASON, None
            raise
        if code == 0:
            return AttemptOutcome.COMPLETED, "exit code 0", 0
        return AttemptOutcome.FAILED, self._failure(code), code

    def retrying(self, outcome: str, exit_code: int | None) -> bool:
        """Whether an attempt that ended so starts another: the job's `retry.on` names it and
        attempts are left (`retry.max_attempts` counts them all)."""
        retry = self.job.retry
        return retry.retryable(outcome, exit_code) and self.attempt < retry.max_attempts

    def of_attempts(self) -> str:
        """The text " (attempt 2 of 3)" for a job that allows more than one attempt (or a run on its
        second), else ""."""
        most = self.job.retry.max_attempts
        if most <= 1 and self.attempt <= 1:
            return ""
        if self.attempt > most:  # resumed past what `retry` allows by itself
            return f" (attempt {self.attempt}, resumed)"
        return f" (attempt {self.attempt} of {most})"

    def next_attempt(self, outcome: str, reason: str) -> None:
        """Between two attempts: release the allocation, say why the attempt ended, wait
        the job's backoff (a cancel cancels the run, a requeue request ends the wait), then
        start the next attempt and acquire its resources (within the run stage)."""
        allocation = self.allocation
        assert allocation is not None
        self.release(allocation, failing=False)
        stop_run_processes(self.run_id, grace=2, workspace=self.ws.path)  # what it left
        if self.remote_job is not None:  # that job ended: a driver dying now is reaped
            self.remote_job = None
            self.history.runs.update(self.run_id, remote_job=None)
        backoff = self.job.retry.backoff_seconds
        most = self.job.retry.max_attempts
        self.attempt_ended(outcome, reason, f"attempt {self.attempt + 1} in {backoff:g}s")
        self._interruptible = True  # release made the stage's work uninterruptible
        if self.terminated_by:  # the signal came while releasing
            raise Canceled(self.stop_reason())
        self.wait_backoff(backoff)
        self.set_attempt(self.attempt + 1)
        self.history.attempts.start(self.run_id, self.attempt)
        self.allocation, self.released = None, False
        self.allocation = call(self.choice.compute, "acquire", self.ctx)
        # The exit code is the run's once it ends; the last attempt's stays in its own row.
        self.history.runs.update(self.run_id, state=RunState.RUNNING, status=None, exit_code=None)
        self.say(f"attempt {self.attempt} of {most}: {self.allocation.description}")

    def wait_backoff(self, seconds: float) -> None:
        """Wait `seconds` before the next attempt. Canceled when the run is canceled
        meanwhile; a requeue asked for meanwhile ends the wait (the next attempt starts)."""
        deadline = time.monotonic() + seconds
        while True:
            if self.canceled():
                if self.take_requeue():
                    return
                raise Canceled(self.stop_reason())
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, BACKOFF_POLL_SECONDS))

    def take_requeue(self) -> bool:
        """Whether the cancel that came is a requeue request (`expkit runs cancel --requeue`),
        not a signal to this driver; if so the request is cleared, and so is the cancel."""
        if self.terminated_by is not None:
            return False
        if not self.history.runs.get(self.run_id).requeue_requested:
            return False
        self.history.runs.clear_requeue(self.run_id)
        self._cancel = False
        return True

    def attempt_ended(self, outcome: str, reason: str, then: str) -> None:
        """Say how the current attempt ended and what comes next (`then`): "attempt 1 of 3
        reached its time limit: ...; attempt 2 in 30s"."""
        most = self.job.retry.max_attempts
        self.say(
            f"attempt {self.attempt} of {most} {ENDED.get(outcome, outcome)}: {reason}; {then}"
        )

    def set_attempt(self, attempt: int) -> None:
        """Make `attempt` the current one for what starts from now on: ctx.attempt and
        EXPKIT_ATTEMPT in the script's environment (prepared.json keeps attempt 1's)."""
        self.attempt = self.ctx.attempt = attempt
        self.ctx.script_env[ATTEMPT_ENV] = str(attempt)
        if self.ctx.command is not None:
            self.ctx.command.env[ATTEMPT_ENV] = str(attempt)

    def requeued(self, outcome: str, reason: str) -> bool:
        """RunContext.requeued: the compute target's service started the job again by
        itself (a Slurm requeue after a preemption). Records the end of the current attempt
        and the start of the next, and says so; False (nothing recorded) when the job's
        `retry` does not retry `outcome` or no attempts are left."""
        if not self.retrying(outcome, None):
            return False
        self.history.attempts.finish(self.run_id, self.attempt, outcome, reason)
        self.attempt_ended(
            outcome, reason, f"attempt {self.attempt + 1} started by {self.choice.compute.name}"
        )
        self.set_attempt(self.attempt + 1)
        self.history.attempts.start(self.run_id, self.attempt, self.remote_job)
        return True

    def start_metrics(self) -> None:
        """The metric pump and one sink worker per sink, for the whole run stage."""
        self.pump = MetricPump(self.history, self.run_id, self.run_dir / "metrics")
        # A driver that re-attaches sends each sink what it did not get yet (its cursor).
        keys = cursor_keys([spec.name for spec, _ in self.choice.sinks])
        for (spec, sink), key in zip(self.choice.sinks, keys, strict=True):
            worker = SinkWorker(self.history, self.info, sink, spec.options, spec.required, key)
            self.pump.listeners.append(worker.wake)
            self.sinks.append(worker)
            worker.start()
        self.pump.start()

    def execute(self, allocation: Allocation) -> int:
        """Launch the script's processes for the current attempt and wait for them
        (ComputeTarget.execute); returns the exit code, which the record keeps."""
        script = self.ctx.command
        assert script is not None
        command = script.argv
        if not self.reattaching and self.attempt == 1:  # as run in the working copy, which
            work = f"{self.work_dir}{os.sep}"  # goes with the run: no path of it is shown
            shown = [arg.replace(work, f".{os.sep}") for arg in command[1:]]
            self.say("$ " + shlex.join([Path(command[0]).name, *shown]))
        backend = self.choice.backend
        if backend is None:  # the target's service starts the ranks from the job spec
            processes = [Process(argv=list(command), env=dict(script.env))]
        else:
            processes = call(backend, "launch", self.ctx, list(command), allocation)
            for process in processes:
                process.env = {**script.env, **process.env}
        compute = self.choice.compute
        code: int = call(compute, "execute", self.ctx, processes, allocation)
        self.history.runs.update(self.run_id, exit_code=code)
        return code

    def _failure(self, code: int) -> str:
        """Why the run stage failed: the rank that failed first and its node (when the
        compute target or the backend can tell), the exit code, and that rank's last line
        of output."""
        backend = self.choice.backend
        failure = call(self.choice.compute, "failure", self.ctx)
        if failure is None and backend is not None:
            failure = RankFailure(
                rank=call(backend, "failed_rank", self.ctx),
                exit_code=call(backend, "failed_exit_code", self.ctx),
            )
        failure = failure or RankFailure()
        rank, own = failure.rank, failure.exit_code
        name = f"rank-{0 if rank is None else rank}.log"
        lines = [line for line in _tail(self.run_dir, name, LOG_TAIL_LINES) if line.strip()]
        message = f"rank {rank}" if rank is not None else ""
        if failure.node:
            message += f" on node {failure.node}" if message else f"on node {failure.node}"
        message += ": " if message else ""
        message += _describe_exit(code if own is None else own)
        return f"{message}; last output: {lines[-1].strip()}" if lines else message

    # -- post-process: metrics flushed, outputs sealed, exports made ------------------------
    def post_process(self, state: str) -> None:
        if self.pump is not None:
            self.pump.stop()
            for problem in self.pump.problems():
                self.warn(problem)
        signals = self._signals  # a signal from now on hands the sinks' rest over
        for worker in self.sinks:
            worker.drain(stopped=lambda: self._signals > signals, report=self._drain_report)
            if worker.handed_over:
                self.say(
                    f"{worker.sink.name}: {worker.delivered:,} values sent; a background "
                    f"process sends the rest and closes it (driver.log)"
                )
            if worker.error is not None:
                self.warn(str(worker.error))
                self.history.events.add(self.run_id, "sink-failed", str(worker.error))
        for warning in run_outputs.own_folders(self.run_dir):  # never through a link
            self.warn(warning)
        if self.resuming:  # the working copy's outputs/ holds the earlier ones, and newer
            _drop_sealed(self.work_dir, self.run_dir / "outputs")
        outputs = self.seal_outputs()
        self.collect_script_logs()
        self.keep_checkpoints()
        shutil.rmtree(self.work_dir, ignore_errors=True)
        size = sum(s for s, _ in outputs.values())
        self.stage_note = f"outputs {count_files(len(outputs), size)}"
        count = self.pump.count if self.pump else 0
        self.say(f"{count} metric value{'s' * (count != 1)} recorded; {self.stage_note}")
        required = [w for w in self.sinks if w.required and w.error is not None]
        if required:
            raise StageFailed(f"required {required[0].error}")
        if self.choice.exporters and state == RunState.COMPLETED:
            self.export()
        elif self.choice.exporters:
            self.say(f"exports skipped: the run {state}")

    def _drain_report(self, worker: SinkWorker) -> None:
        """A long drain's progress line: how many values reached the sink so far."""
        self.say(
            f"{worker.sink.name}: {worker.delivered:,} values sent so far; Ctrl-C leaves the "
            "rest to a background process"
        )

    def export(self) -> None:
        """Each of the job's exports; a passing one's files join the model's folder in outputs."""
        from expkit import exports
        from expkit.registry import check_register_if, unmet

        assert self.job.model is not None and self.ctx.environment is not None
        python = exports.interpreter(self.ctx.environment.python)
        env = {**self.ctx.environment.env, **self.ctx.script_env}
        notes, required = [], None
        refused: str | None = None
        if self.choice.for_registries and not self.sweep:  # a sweep registers a trial's
            refused = unmet(check_register_if(self.ws, self.job, self.run_id))
        for spec, exporter in self.choice.exporters:
            if self.terminated_by:
                self.say(f"export {spec.format} skipped: {self.stop_reason()}")
                notes.append(f"{spec.format} skipped")
                continue
            if refused and spec.format in self.choice.for_registries:
                # only there for a registry to register with: no version, so no use
                self.say(f"export {spec.format} skipped: not registered ({refused})")
                notes.append(f"{spec.format} skipped")
                continue
            self.say(f"export {spec.format} ({exporter.plugin})")
            record = exports.into_run(
                self.history, self.blobs, self.run_id, self.run_dir, self.job.model, spec,
                exporter, python, env, self.say, self._stopped_by,
            )  # fmt: skip
            if record.ok:
                self.say(f"export {exports.describe(record)}")
                notes.append(f"{spec.format} ok")
                continue
            if self.terminated_by:  # stopped by the signal, not a failure of the exporter
                self.say(f"export {spec.format} {record.message}")
                notes.append(f"{spec.format} stopped")
                continue
            notes.append(f"{spec.format} FAILED")
            outcome = "the run fails" if spec.required else "not registered"
            log = self.run_dir / "exports" / spec.format / "export.log"
            more = f" (details: {log})" if log.is_file() else ""
            self.warn(f"export {spec.format} failed: {record.message}; {outcome}{more}")
            if spec.required and required is None:
                required = f"required export {spec.format} failed: {record.message}"
        outputs = self.history.outputs.of(self.run_id)  # with the exports' files
        size = sum(s for s, _ in outputs.values())
        self.stage_note = f"outputs {count_files(len(outputs), size)}; exports: {', '.join(notes)}"
        if required:
            raise StageFailed(required)

    def seal_outputs(self) -> dict[str, tuple[int, str]]:
        """Move ./outputs into the run, hash every file and keep it read-only in the store;
        links out of the run are recorded, never followed (see `expkit.outputs`)."""
        sealed = run_outputs.seal(self.work_dir, self.run_dir / "outputs", self.blobs)
        for warning in sealed.warnings:
            self.warn(warning)
        self.history.outputs.set(self.run_id, sealed.files, sealed.links)
        return sealed.files

    def keep_checkpoints(self) -> None:
        """The checkpoint folder, as the last attempt left it, moved to the run's folder
        (`<run_dir>/checkpoints`) for `expkit runs resume`; never through a link."""
        spec = self.job.checkpoints
        if spec is None or not self.work_dir.is_dir() or self.work_dir.is_symlink():
            return
        for warning in checkpoint_folder.keep(self.work_dir, self.run_dir, spec):
            self.warn(warning)

    def collect_script_logs(self) -> None:
        """The script's own ./logs folder joins the run's logs (as Azure ML streams it)."""
        for warning in run_outputs.collect_logs(self.work_dir, self.ctx.log_dir):
            self.warn(warning)

    # -- register: the next version of the job's model ----------------------------------------
    def register_if(self) -> str | None:
        """Why the job's `model.register_if` keeps this run from making a version (None: it
        does not); each condition's verdict is said on the way, in post-process's lines."""
        from expkit.registry import check_register_if, unmet

        verdicts = check_register_if(self.ws, self.job, self.run_id)
        for verdict in verdicts:
            self.say(f"register_if {'met' if verdict.ok else 'not met'}: {verdict.text}")
        return unmet(verdicts)

    def register(self) -> None:
        """The next version of the job's model from the sealed outputs (see
        `expkit.registry.register_run_model`), then in each of the job's registries (each
        registration recorded), then the job's `model.aliases`, mirrored to those registries
        (one that refuses is a warning: the version is kept)."""
        from expkit.registry import (
            NoModelFiles,
            record_registration,
            register_run_model,
            set_alias,
        )

        spec = self.job.model
        assert spec is not None
        try:
            model = register_run_model(self.ws, self.run_id, self.job)
        except NoModelFiles as nothing:
            raise StageFailed(str(nothing)) from None
        self.stage_note = f"model {model.name} version {model.version}"
        for entry, registry in zip(spec.registries, self.choice.registries, strict=True):
            try:
                ref = call(registry, "register", model, self.info, entry.options)
            except (StageFailed, UserError, PluginError) as failure:
                # The run fails, so the version made above is not kept (see
                # expkit.history.models.VISIBLE).
                raise StageFailed(
                    f"{failure}; {model.name}:{model.version} is not kept, as the run failed"
                ) from failure
            found = record_registration(self.ws, model, registry.name, ref)
            self.say(f"{registry.kind} {registry.name!r}: {found.reference}")
        registries = {r.name: r for r in self.choice.registries}
        for alias in spec.aliases:
            said, warnings = set_alias(self.ws, model, alias, self.run_id, registries)
            for line in said:
                self.say(line)
            for line in warnings:
                self.warn(line)
        if spec.aliases:
            self.stage_note += ", " + ", ".join(f"@{alias}" for alias in spec.aliases)
        # Said once every registry has it: a signal before this withdraws the version.
        sizes = {digest: size for size, digest in self.history.outputs.of(self.run_id).values()}
        size = sum(sizes.get(digest, 0) for digest in model.files.values())
        self.say(f"registered {model.name}:{model.version} ({count_files(len(model.files), size)})")

    def withdraw_versions(self, state: str) -> None:
        """A run that does not complete keeps no model version (expkit.history.models.VISIBLE
        hides the rows): remove the folders its register stage laid out, and say so, as a
        warning (`expkit runs show` says it next to a register stage that completed before
        the run failed). Only this run's versions' folders, never a link."""
        try:
            rows = self.history.db.execute(
                "SELECT name, version FROM models WHERE run_id = ?", (self.run_id,)
            ).fetchall()
        except sqlite3.Error:
            return
        for name, version in rows:
            base = self.ws.models_dir / name
            for folder in (base / str(version), base / f".{version}.tmp"):
                if folder.is_dir() and not folder.is_symlink():
                    shutil.rmtree(folder, ignore_errors=True)
            self.warn(f"{name}:{version} not kept: the run {state}")

    # -- what plugins and stages call back ----------------------------------------------------
    def say(self, text: str) -> None:
        stage = self.current_stage or Stage.RUN
        self.console.stage_line(stage, text)
        self.history.events.add(self.run_id, "progress", text, stage)

    def warn(self, text: str) -> None:
        self.console.warn(text)
        self.history.events.add(self.run_id, "warning", text, self.current_stage)

    def waiting(self, text: str | None) -> None:
        if text is None:
            self.history.runs.update(self.run_id, state="scaling", status=None)
        else:
            self.history.runs.update(self.run_id, state="queued", status=text)
            self.say(text)

    def canceled(self) -> bool:
        if self._cancel:
            return True
        now = time.monotonic()
        if now - self._last_poll >= CANCEL_POLL_SECONDS:
            self._last_poll = now
            if self.history.runs.cancel_requested(self.run_id):
                self._cancel = True
        return self._cancel

    def _markers(self) -> dict[str, str]:
        """The environment that marks a process as this run's (see expkit.procs)."""
        return {RUN_ID_ENV: self.run_id, WORKSPACE_ENV: str(self.ws.path)}

    def stop_reason(self) -> str:
        """What the record says about the signal that stopped the run: Ctrl-C (SIGINT) is
        "canceled by the user", the others "terminated by SIGTERM" (or SIGHUP); a cancel asked
        for with a reason (a sweep's early termination, `Runs.request_cancel`) is that reason."""
        if self.terminated_by is None and self._cancel:
            reason = self.history.runs.get(self.run_id).cancel_reason
            if reason:
                return reason
        if self.terminated_by in (None, "SIGINT"):
            return "canceled by the user"
        return f"terminated by {self.terminated_by}"

    def _stopped_by(self) -> str | None:
        """Why the run is being stopped (a signal came), or None."""
        return self.stop_reason() if self.terminated_by else None

    def _canceled_because(self, stop: BaseException) -> str:
        """The reason a cancel is recorded with: the first signal's, else the exception's, else
        the one it was asked for with (`stop_reason`)."""
        if self.terminated_by or not (isinstance(stop, Canceled) and str(stop)):
            return self.stop_reason()
        return str(stop)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Ctrl-C, SIGTERM or SIGHUP: the run ends canceled, for the first signal's reason.
        In prepare, scale, run and register the stage stops at once; in post-process (and
        between stages) the signal is noted, exports in progress are stopped, and the outputs
        are still sealed. Every later signal is only noted: it must not cut short the
        bookkeeping that keeps the outputs and records the run.

        CPython runs a handler between any two bytecodes of the main thread, inside another
        handler too (two signals sent together: the second interrupts the first). So the
        first line claims "first", and nothing here takes a lock or waits."""
        name = signal.Signals(signum).name
        self._signals += 1
        first = self.terminated_by is None
        if first:
            self.terminated_by = name
        if (
            signum == signal.SIGHUP
            and first
            and self.remote_job
            and self._interruptible
            and self.current_stage in (Stage.SCALE, Stage.RUN)
        ):  # the terminal closed: the job goes on without this driver, not canceled
            self._interruptible = False
            raise Detached("the terminal closed (SIGHUP)")
        self._cancel = True
        if not first:
            _note(f"{name}: the run is being saved and recorded; it takes a moment")
            return
        if self._interruptible:
            self._interruptible = False
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise Canceled(self.stop_reason())
        if self.current_stage == Stage.POST_PROCESS:
            for pid in run_processes(self.run_id, self.ws.path):  # an exporter: it fails
                with suppress(OSError):
                    os.kill(pid, signal.SIGTERM)

    def _report(self, problem: PluginError) -> None:
        self.warn(str(problem))


def _note(text: str) -> None:
    """One line on stderr from a signal handler: no lock (the console may hold its own while
    the signal comes), and nothing raised when the terminal has gone."""
    with suppress(OSError):
        os.write(2, f"expkit: {text}\n".encode(errors="replace"))


def _copy_writable(source: str, dest: str) -> str:
    """A copy of a sealed output for the working copy of a resumed run: a file of its own
    (never the store's), which the script may change."""
    shutil.copyfile(source, dest)
    os.chmod(dest, stat.S_IMODE(os.stat(source).st_mode) | stat.S_IWUSR)
    return dest


def _drop_sealed(work_dir: Path, sealed: Path) -> None:
    """Remove the run's sealed outputs/ of an earlier driver once the working copy has an
    outputs/ of its own to seal instead (a resumed run: copies of them, and what the
    resumed attempt wrote). The store keeps their content; nothing through a link."""
    source = work_dir / "outputs"
    real = sealed.is_dir() and not sealed.is_symlink()
    if source.is_dir() and not source.is_symlink() and real:
        shutil.rmtree(sealed)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"the script was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"the script was killed by signal {-code}"
    return f"the script exited with code {code}"


def _tail(run_dir: Path, name: str, count: int) -> list[str]:
    """The last `count` lines of the run's log `name`, read only from the run's own logs/
    folder (never through a link a script put there); none when there is no such log."""
    f = run_outputs.open_own_log(run_dir, name)
    if f is None:
        return []
    with f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 8192))
        data = f.read().decode("utf-8", errors="replace")
    return data.splitlines()[-count:]


def _on_signals(handler: Any) -> Any:
    """Install `handler` (a function, or what an earlier call returned) for the terminating
    signals; returns what was there, to put back. Only the main thread can do it.

    A signal this process was started ignoring stays ignored: `nohup expkit run ...` goes on
    when its terminal closes."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if not isinstance(handler, dict):
        handler = {
            sig: signal.SIG_IGN if signal.getsignal(sig) == signal.SIG_IGN else handler
            for sig in TERMINATING_SIGNALS
        }
    return {
        sig: signal.signal(sig, handler.get(sig) or signal.SIG_DFL) for sig in TERMINATING_SIGNALS
    }


def _first(error: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """`error`, or the first exception of `kind` it was raised from or during."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        inner = getattr(error, "error", None)  # a PluginError's own
        error = inner if isinstance(inner, BaseException) else error.__cause__ or error.__context__
    return None


def disk_full(error: BaseException | None) -> bool:
    """True when `error` (or what it came from) is "no space left" from the OS or SQLite.

    A history that could only be opened read-only counts: it was, because the disk is full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if no_room(error) or (
            isinstance(error, sqlite3.OperationalError)
            and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_READONLY
        ):  # read-only: the history was opened on a full disk (see expkit.history)
            return True
        inner = getattr(error, "error", None)
        error = inner if isinstance(inner, BaseException) else error.__cause__ or error.__context__
    return False


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding `path` (the disk a user must free)."""
    path = Path(path).resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path
