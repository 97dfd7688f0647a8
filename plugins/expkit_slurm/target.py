"""The `slurm` compute target: the job goes to Slurm with `sbatch`; srun starts the ranks.

The lifecycle, as Slurm sees it (Slurm's own commands only; see expkit_slurm.batch and
expkit_slurm.states):

* scale (`acquire`): the batch script (expkit_slurm.batch) is written to the run's folder and
  submitted; the job's id is recorded on the run (`ctx.set_remote_job("slurm:ID")`), so the job
  outlives this driver. While the job is pending the run is `queued` with Slurm's reason
  ("Priority", "Resources"); a reason that can never clear (the partition is too small, an
  unknown account) cancels the job and fails the run with Slurm's word for it.
* run (`execute`): the job runs `launch.py` on its first node, which starts every rank with one
  srun step (expkit_slurm.launch); each rank writes `logs/rank-N.log` itself, on the file
  system the nodes share, and this driver shows their lines as they come. The job's `timeout`
  (per attempt) is enforced here to the second (Slurm's own `--time`, in minutes, is the
  backstop when no driver follows the job). Ctrl-C and `expkit runs cancel` call `scancel`.
  For a job with `checkpoints:`, the timeout and a cancel are planned stops: each rank gets
  the job's stop signal first (relayed by launch.py) and `ctx.stop_grace` seconds to write a
  checkpoint and exit; Slurm's time limit does the same without a driver (`--signal`).
* Attempts (the job's `retry:`): a job submitted with `--requeue` that Slurm starts again (a
  preemption, `scontrol requeue`, a node failure: its restart count grows) is the run's next
  attempt (`ctx.requeued`), in the same run folder; the ranks see EXPKIT_ATTEMPT = the attempt
  it was submitted as + SLURM_RESTART_COUNT. A job that ends PREEMPTED, NODE_FAIL, BOOT_FAIL
  or TIMEOUT (or stopped at its time limit) raises Interrupted, which the lifecycle may retry
  with a new job.
* A driver that dies leaves the job running: the next expkit command starts a driver that
  re-attaches (`reattach`) and finishes the run when the job ends.

Only the machine expkit runs on writes the run history (SQLite must not be shared over a
network file system); the nodes write files in the run's folder only (logs, the metric
channel, outputs), which therefore must be on a file system the nodes share.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expkit.plugin import (
    Allocation,
    Canceled,
    ComputeTarget,
    Detached,
    Interrupted,
    JobSpec,
    Process,
    RankFailure,
    RunContext,
    StageFailed,
    UserError,
)
from expkit_slurm import batch, states
from expkit_slurm.options import TAKES

BACKENDS = ("none", "torchrun", "horovod")
TAIL_SECONDS = 0.1  # how often the ranks' logs are read for new lines
CANCEL_WAIT_SECONDS = 30.0  # how long a cancel waits for Slurm to end the job
# How long a following driver keeps asking a controller that does not answer (a restart, an
# overloaded slurmctld) before it lets go of the run (Detached) for a later driver.
UNREACHABLE_SECONDS = 300.0
INSTALL = "apt-get install slurm-client (or load your cluster's Slurm module)"


@dataclass
class SlurmAllocation(Allocation):
    """The nodes Slurm gave the job, and the job's id."""

    job_id: str = ""


class SlurmTarget(ComputeTarget):
    name = "slurm"
    description = "a Slurm cluster: sbatch from this machine, one srun step starts the ranks"
    launches_ranks = True  # srun starts the ranks; the job's backend says how they meet
    takes = TAKES

    # -- before any run -----------------------------------------------------------------
    def check(self, job: JobSpec) -> None:
        backend, res = job.distributed.backend, job.resources
        if backend not in BACKENDS:
            raise UserError(
                f"distributed: the slurm target starts the ranks of none, torchrun or horovod, "
                f"not {backend!r}"
            )
        if backend == "none" and res.processes != 1:
            raise UserError(
                f"distributed: none runs one process, but resources ask for {res.processes}; "
                "set `distributed: torchrun` or `distributed: horovod`"
            )
        if 0 < res.gpus_per_node < res.processes_per_node:
            raise UserError(
                f"resources.gpus_per_node: each of the {res.processes_per_node} processes per "
                f"node needs its own GPU, but the job asks for {res.gpus_per_node}"
            )

    def preflight(self, job: JobSpec) -> None:
        """Slurm's commands are here, the controller answers and the request fits the
        cluster (`sbatch --test-only`): a job that can never start is refused before a run
        exists, with Slurm's own reason."""
        if shutil.which("sbatch") is None:
            raise UserError(f"compute: the slurm target needs Slurm's commands here: {INSTALL}")
        conf = os.environ.get("SLURM_CONF")
        if conf and not Path(conf).is_file():  # Slurm's commands would retry it for 60 s
            raise UserError(f"compute: SLURM_CONF={conf}: there is no such file")
        directives = batch.directives(job, job.compute.options, "preflight", Path.cwd())
        try:
            batch.test_only(directives, dict(os.environ))
        except StageFailed as down:  # no run exists yet: nothing to fail but the command
            which = f"SLURM_CONF={conf}" if conf else "the cluster's slurm.conf (SLURM_CONF)"
            raise UserError(f"compute: {down}; check {which} and that slurmctld runs") from None

    def dry_run(self, job: JobSpec) -> str:
        """The batch script and the sbatch command as a run would have them, with three
        names only a run knows: WORKSPACE (the workspace's folder), N (the run's number) and
        PYTHON (the job environment's interpreter, once prepare has built it)."""
        run_id = f"{job.experiment}_N"
        run_dir = Path("/WORKSPACE") / "runs" / run_id
        command = ["PYTHON", job.entry_script, *job.command_args({k: k for k in job.data})]
        script = self._script(job, run_id, run_dir, command)
        submit = shlex.join(batch.command_line(run_dir / "slurm" / "job.sh"))
        names = (
            "where /WORKSPACE is the workspace folder, N the run number, PYTHON the job's python"
        )
        return f"{script}\n$ {submit}\n({names})"

    def _script(self, job: JobSpec, run_id: str, run_dir: Path, command: list[str]) -> str:
        from expkit_slurm import launch  # the node side: loaded when a job is submitted

        res = job.resources
        body = launch.launcher_argv(
            command[0],
            job.distributed.backend,
            res.nodes,
            res.processes_per_node,
            res.gpus_per_node,
            run_dir / "logs",
            command,
            stop_signal=job.checkpoints.signal if job.checkpoints else None,
            state_dir=run_dir / "slurm" if job.checkpoints else None,
        )
        return batch.script(batch.directives(job, job.compute.options, run_id, run_dir), body)

    # -- scale ------------------------------------------------------------------------------
    def acquire(self, ctx: RunContext) -> SlurmAllocation:
        if ctx.command is None:
            raise RuntimeError("the slurm target needs the script's command (RunContext.command)")
        folder = ctx.run_dir / "slurm"
        folder.mkdir(exist_ok=True)
        path = folder / "job.sh"
        path.write_text(self._script(ctx.job, ctx.run_id, ctx.run_dir, ctx.command.argv))
        # An earlier attempt's lines stay in the ranks' logs: this job's start after them.
        sizes = {p.name: p.stat().st_size for p in RankLogs.logs(ctx.log_dir)}
        # The ranks' EXPKIT_ATTEMPT is this plus Slurm's restart count (launch.py).
        job_id = batch.submit(path, {**self._env(ctx), "EXPKIT_ATTEMPT": str(ctx.attempt)})
        _submitted_as(ctx, job_id).write_text(f"{ctx.attempt}\n", encoding="utf-8")
        _logs_at(ctx, job_id).write_text(json.dumps(sizes), encoding="utf-8")
        ctx.set_remote_job(f"slurm:{job_id}")
        ctx.set_tags({"slurm.job_id": job_id})
        ctx.say(f"submitted Slurm job {job_id}: {shlex.join(batch.command_line(path))}")
        return self._started(ctx, job_id)

    def reattach(self, ctx: RunContext, remote_job: str) -> SlurmAllocation:
        job_id = remote_job.removeprefix("slurm:")
        try:
            found = states.query(job_id, self._env(ctx))
        except StageFailed as lost:  # the controller does not answer: try again later
            raise Detached(str(lost)) from None
        if found is None:
            raise StageFailed(
                f"Slurm no longer knows job {job_id}: it ended while no expkit process "
                "followed it, and the cluster keeps no record of it (accounting)"
            )
        ctx.say(f"re-attached to Slurm job {job_id} ({found.state})")
        return self._started(ctx, job_id)

    def _started(self, ctx: RunContext, job_id: str) -> SlurmAllocation:
        """Wait while the job is pending (the run queued, with Slurm's reason), until it
        runs or has ended; its nodes. A run stopped while it waits (Ctrl-C, SIGTERM, an
        error) takes its job out of the queue: no allocation exists yet, so `release` is
        never called, and the job would otherwise start after the run ended. Only a driver
        that lets go of the job (Detached: the terminal closed) leaves it queued."""
        try:
            return self._wait_until_started(ctx, job_id)
        except Detached:
            raise
        except BaseException:
            try:
                self._cancel(ctx, job_id)
            except StageFailed as failure:  # the run's own reason stays the one recorded
                ctx.say(f"Slurm job {job_id} may still be queued: {failure}")
            raise

    def _wait_until_started(self, ctx: RunContext, job_id: str) -> SlurmAllocation:
        env, poll = self._env(ctx), float(ctx.job.compute.options["poll_seconds"])
        said = None
        while True:
            state = self._query(job_id, env)
            text = states.waiting_text(state)
            if text is None or state.finished:
                break
            never = states.never_starts(state)
            if never:
                states.cancel(job_id, env)
                raise UserError(f"compute: Slurm job {job_id} can never start: {never}")
            if said is None:
                ctx.say(f"Slurm job {job_id} waits in the queue")
            if text != said:
                ctx.waiting(text)  # the run shows as `queued: Priority`
                said = text
            if self._wait(ctx, poll):
                self._cancel(ctx, job_id)
                raise Canceled()
        if said:
            ctx.waiting(None)
        nodes = ", ".join(state.nodes) or "?"
        ctx.status(f"slurm {state.state} on {nodes}")
        ctx.set_tags({"slurm.nodes": ",".join(state.nodes)})
        return SlurmAllocation(
            hosts=list(state.nodes),
            slots=[],
            description=f"Slurm job {job_id} on {nodes}",
            job_id=job_id,
        )

    # -- run --------------------------------------------------------------------------------
    def execute(self, ctx: RunContext, processes: list[Process], allocation: Allocation) -> int:
        """Follow the job to its end: show the ranks' lines, enforce the timeout of each
        attempt, cancel on request, record each restart by Slurm as the next attempt; the
        exit code of the job (srun's: the first failed rank's). Raises Interrupted when the
        attempt ended by the machine (time limit, node failure, preemption), Canceled when
        canceled."""
        job_id = _job_id(allocation)
        env, poll = self._env(ctx), float(ctx.job.compute.options["poll_seconds"])
        timeout = ctx.job.timeout
        tails = RankLogs(ctx, _read_json(_logs_at(ctx, job_id)))
        state = self._query(job_id, env)
        # Restarts already recorded as attempts (a driver that re-attaches): the attempt now
        # recorded minus the one the job was submitted as.
        seen = max(0, ctx.attempt - _read_number(_submitted_as(ctx, job_id), ctx.attempt))
        nodes, deadline = list(state.nodes), None
        asked = silent = 0.0  # when Slurm was last asked; since when it has not answered
        while True:
            if state.restarts > seen:
                self._restarted(ctx, job_id, seen, state.restarts, nodes, env)
                seen, deadline = state.restarts, None
            if state.finished:
                break
            if state.state == "RUNNING":
                nodes = list(state.nodes) or nodes
                if deadline is None and timeout is not None:
                    deadline = self._deadline(ctx, timeout, job_id, state.restarts)
            tails.show()
            if ctx.canceled():
                self._stop(ctx, job_id, tails, "the run is canceled")
                raise Canceled()
            if deadline is not None and time.monotonic() > deadline:
                self._stop(ctx, job_id, tails, f"the attempt reached its timeout ({timeout:g}s)")
                raise Interrupted(
                    "time_limit",
                    f"timed out after {timeout:g}s (the job's `timeout`); Slurm job {job_id} "
                    "canceled",
                )
            time.sleep(TAIL_SECONDS)
            if time.monotonic() - asked >= poll:
                asked = time.monotonic()
                try:
                    fresh = self._query(job_id, env)
                except Detached:  # the controller is busy or restarting: ask again, a while
                    silent = silent or time.monotonic()
                    if time.monotonic() - silent > UNREACHABLE_SECONDS:
                        raise
                    ctx.status(f"slurm: the controller does not answer; asking again ({job_id})")
                    continue
                silent = 0.0
                if fresh.state != state.state:
                    why = f" ({fresh.reason})" if fresh.state == "PENDING" and fresh.reason else ""
                    ctx.status(f"slurm {fresh.state}{why} on {', '.join(fresh.nodes) or '?'}")
                state = fresh
        tails.show(final=True)
        ctx.set_tags({"slurm.state": state.state})
        ctx.status(None)
        verdict, reason = states.outcome(state, timeout)
        stopped = launch_mark(ctx, job_id, state.restarts)
        if verdict in ("completed", "failed") and stopped.exists():
            # The ranks got the stop signal before Slurm's time limit and ended by themselves.
            limit = f"{timeout:g}s (the job's `timeout`)" if timeout else "Slurm's time limit"
            raise Interrupted(
                "time_limit",
                f"stopped at the time limit of {limit} to checkpoint (Slurm job {job_id})",
            )
        if verdict == "completed":
            return 0
        if verdict == "canceled":
            raise Canceled(reason or f"Slurm job {job_id} was canceled")
        if verdict in ("time_limit", "node_failure", "preempted"):
            raise Interrupted(verdict, reason or f"Slurm job {job_id} ended {state.state}")
        if state.state == "FAILED" and state.exit_code is not None:
            failure = self.failure(ctx)
            if failure and failure.exit_code is not None:
                return failure.exit_code
            said = _last_line(ctx.log_dir / "launcher.log")
            if said and not list(ctx.log_dir.glob("rank-*.log")):  # no rank ever started
                raise StageFailed(f"Slurm job {job_id} failed before its ranks started: {said}")
            return state.exit_code or 1
        raise StageFailed(reason or f"Slurm job {job_id} ended {state.state}")

    def _restarted(
        self,
        ctx: RunContext,
        job_id: str,
        seen: int,
        restarts: int,
        nodes: list[str],
        env: dict[str, str],
    ) -> None:
        """Slurm started the job again (`restarts` times, `seen` of them recorded): record
        each as the end of an attempt and the start of the next (`ctx.requeued`): a node
        failure when one of the job's `nodes` is now down or drained, else a preemption (or
        `scontrol requeue`: Slurm does not tell them apart without accounting). When the
        job's `retry` allows no more attempts, the job is canceled and Interrupted raised."""
        try:
            unwell = states.unwell_nodes(nodes, env)
        except StageFailed:
            unwell = {}
        for count in range(seen + 1, restarts + 1):
            if unwell:
                said = "; ".join(f"{name} is {why}" for name, why in unwell.items())
                outcome = "node_failure"
                reason = f"Slurm requeued job {job_id} after a node failed ({said})"
            else:
                outcome = "preempted"
                reason = f"Slurm requeued job {job_id} (preempted, or `scontrol requeue`)"
            if not ctx.requeued(outcome, reason):
                self._cancel(ctx, job_id)
                raise Interrupted(outcome, reason)
            ctx.status(f"slurm: job {job_id} requeued (restart {count}); waiting for it to run")

    def _stop(self, ctx: RunContext, job_id: str, tails: RankLogs, why: str) -> None:
        """A planned stop (the timeout, a cancel): for a job with `checkpoints`, each rank
        first gets the job's stop signal (through launch.py's relay) and up to
        `ctx.stop_grace` seconds to checkpoint and exit; then `scancel`."""
        checkpoints = ctx.job.checkpoints
        if checkpoints is not None:
            env = self._env(ctx)
            try:
                sent = states.signal_steps(job_id, batch.RELAY_SIGNAL, env)
            except StageFailed:
                sent = False
            if sent:
                grace = ctx.stop_grace or checkpoints.grace_seconds
                ctx.say(
                    f"{why}: the ranks of Slurm job {job_id} get {checkpoints.signal} and "
                    f"{grace:g}s to write a checkpoint"
                )
                end = time.monotonic() + grace
                while time.monotonic() < end:
                    tails.show()
                    try:
                        state = states.query(job_id, env)
                    except StageFailed:
                        state = None
                    if state is None or state.finished:
                        break
                    time.sleep(0.2)
        self._cancel(ctx, job_id)
        tails.show()

    def failure(self, ctx: RunContext) -> RankFailure | None:
        """The first rank srun reported failed, from the batch log (launcher.log)."""
        log = ctx.log_dir / "launcher.log"
        try:
            text = log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        from expkit_slurm import launch

        found = launch.first_failure(text)
        if found is None:
            return None
        return RankFailure(rank=found.rank, exit_code=found.exit_code, node=found.node)

    def release(self, ctx: RunContext, allocation: Allocation) -> None:
        """A job still alive (the run failed or was stopped on this side) is canceled."""
        job_id = _job_id(allocation)
        state = states.query(job_id, self._env(ctx))
        if state is not None and not state.finished:
            self._cancel(ctx, job_id)

    # -- helpers ----------------------------------------------------------------------------
    def _deadline(self, ctx: RunContext, timeout: float, job_id: str, restarts: int) -> float:
        """When the attempt's `timeout` (seconds) ends, on time.monotonic()'s clock: counted
        from the first time a driver followed the running job on this start of it (Slurm's
        `restarts`), which is written in the run's folder (`slurm/started.JOB.RESTARTS`,
        seconds since the epoch), so that a driver that re-attaches does not give the job its
        whole timeout again, and a requeued job gets a whole one."""
        mark = ctx.run_dir / "slurm" / f"started.{job_id}.{restarts}"
        try:
            started = float(mark.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            started = time.time()
            mark.write_text(f"{started}\n", encoding="utf-8")
        return time.monotonic() + timeout - max(0.0, time.time() - started)

    def _env(self, ctx: RunContext) -> dict[str, str]:
        """The environment of Slurm's commands: this process's, with the script's (sbatch
        hands it to the job: `--export=ALL`)."""
        extra = ctx.command.env if ctx.command is not None else {}
        return {**os.environ, **extra}

    def _query(self, job_id: str, env: dict[str, str]) -> states.JobState:
        """The job's state; Detached when the controller does not answer (the job may well
        go on: a later driver re-attaches), StageFailed when Slurm forgot the job."""
        try:
            state = states.query(job_id, env)
        except StageFailed as lost:
            raise Detached(f"{lost}; Slurm job {job_id} may go on") from None
        if state is None:
            raise StageFailed(f"Slurm no longer knows job {job_id}")
        return state

    def _wait(self, ctx: RunContext, seconds: float) -> bool:
        """Sleep `seconds`, waking to check for a cancel; True when the run is canceled."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if ctx.canceled():
                return True
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))
        return ctx.canceled()

    def _cancel(self, ctx: RunContext, job_id: str) -> None:
        """scancel, then wait (a bounded time) until Slurm says the job ended."""
        env = self._env(ctx)
        states.cancel(job_id, env)
        end = time.monotonic() + CANCEL_WAIT_SECONDS
        while time.monotonic() < end:
            state = states.query(job_id, env)
            if state is None or state.finished:
                return
            time.sleep(0.2)
        ctx.say(f"Slurm job {job_id} still ends after {CANCEL_WAIT_SECONDS:g}s of scancel")


class RankLogs:
    """New lines of each rank's log (written by srun on the nodes), shown with ctx.echo.

    Cheap enough to call every TAIL_SECONDS: the folder is listed once a second, and a log is
    read only when its size grew."""

    def __init__(self, ctx: RunContext, start: dict[str, int] | None = None) -> None:
        self.ctx = ctx
        self.offsets: dict[Path, int] = {}
        self.listed = 0.0
        self.start = start or {}  # where this job's lines begin, by log name

    @staticmethod
    def logs(log_dir: Path) -> list[Path]:
        """The ranks' logs in `log_dir` (`rank-N.log`, no links), by name."""
        return [
            path
            for path in sorted(log_dir.glob("rank-*.log"))
            if path.stem.removeprefix("rank-").isdigit() and not path.is_symlink()
        ]

    def show(self, final: bool = False) -> None:
        """Echo each rank's new complete lines (and, when `final`, a last unfinished one)."""
        if final or time.monotonic() - self.listed >= 1.0:
            self.listed = time.monotonic()
            for path in self.logs(self.ctx.log_dir):
                start = self.start.get(path.name, 0)
                self.offsets.setdefault(path, start if isinstance(start, int) else 0)
        for path, offset in self.offsets.items():
            try:
                size = path.stat().st_size
                if size < offset:  # written anew (a requeued job on a cluster that truncates)
                    offset = 0
                if size <= offset:
                    continue
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            end = len(data) if final else data.rfind(b"\n") + 1
            self.offsets[path] = offset + end
            rank = int(path.stem.removeprefix("rank-"))
            for line in data[:end].splitlines(keepends=True):
                self.ctx.echo(rank, line)


def _submitted_as(ctx: RunContext, job_id: str) -> Path:
    """The file that keeps the attempt Slurm job `job_id` was submitted as."""
    return ctx.run_dir / "slurm" / f"attempt.{job_id}"


def launch_mark(ctx: RunContext, job_id: str, restarts: int) -> Path:
    """The file launch.py writes when Slurm's time-limit signal reached it (see there)."""
    from expkit_slurm import launch

    return launch.time_limit_mark(ctx.run_dir / "slurm", job_id, restarts)


def _logs_at(ctx: RunContext, job_id: str) -> Path:
    """The file that keeps the sizes of the ranks' logs when Slurm job `job_id` was
    submitted: where its own lines begin."""
    return ctx.run_dir / "slurm" / f"logs.{job_id}.json"


def _read_json(path: Path) -> dict:
    """The mapping a small JSON file holds, else an empty one."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _read_number(path: Path, default: int) -> int:
    """The whole number a small file holds, else `default`."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return default
    return int(text) if text.isdigit() else default


def _last_line(path: Path) -> str | None:
    """The last non-empty line of a log (its last 4 KiB), or None."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    return next((line.strip() for line in reversed(lines) if line.strip()), None)


def _job_id(allocation: Any) -> str:
    job_id = getattr(allocation, "job_id", "")
    if not job_id:
        raise RuntimeError("the slurm target got an allocation it did not make")
    return str(job_id)
