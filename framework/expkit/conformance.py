"""Conformance checks for plugins: drive a capability through its contract with small real
scripts in a real temporary workspace, and name the obligation it breaks.

    from expkit.testing import check_compute_target

    def test_my_target_keeps_the_contract():
        check_compute_target(MyTarget())

Each check raises AssertionError("<kind> '<name>' breaks its contract: <obligation>: ...")
and returns the names of the obligations it checked. A compute target's methods are called
directly, not through the lifecycle, so that the core's own clean-up (which stops whatever a
run left) cannot hide a target that leaks processes: leftovers are looked for as soon as
`execute` has returned or raised. The obligations are those the capabilities' docstrings
state (see `expkit.capabilities`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expkit.capabilities import (
    Allocation,
    ComputeTarget,
    DistributedBackend,
    Environment,
    EnvironmentBuilder,
    Metric,
    MetricSink,
    Process,
    RunContext,
    RunInfo,
    RunOutcome,
)
from expkit.errors import Canceled, StageFailed
from expkit.procs import run_processes, stop_run_processes

# The obligations `check_compute_target` can check, in the order it checks them.
COMPUTE_OBLIGATIONS = (
    "check",  # `check` accepts a plain job
    "dry_run",  # `dry_run` returns text or None, contacting nothing
    "acquire_release",  # prepare, acquire -> Allocation; release gives every lease back
    "exit_codes",  # 0 for success, the script's code, -N for a script killed by signal N
    "logs",  # each rank's output in logs/rank-N.log, byte for byte, and echoed
    "timeout",  # the job's timeout enforced: StageFailed "timed out after Ns"
    "cancel",  # ctx.canceled() turning true -> Canceled within `cancel_within` seconds
    "no_leftovers",  # no process of the run left once execute returned or raised
)
LEFTOVER_GRACE = 2.0  # seconds a process killed at the end of execute may take to be gone
STARTED = b"conformance: started\n"  # what a long script prints once it runs

# A script's rank: its argument when the target started each Process it was given, else the
# RANK variable of a target that starts the ranks itself from `ctx.command` (Slurm's srun).
_RANK = "(sys.argv[1] if len(sys.argv) > 1 else os.environ['RANK'])"
# rank r writes this (stdout and stderr mixed, bytes that are not UTF-8, a last line with
# no newline), then starts a child that outlives it in its process group, then exits.
_OUTPUT = (
    "import os, subprocess, sys\n"
    f"rank = int({_RANK})\n"
    "os.write(1, b'rank %d: line one\\n' % rank)\n"
    "os.write(2, b'rank %d: to stderr\\n' % rank)\n"
    "os.write(1, b'\\xff\\xfe not UTF-8\\n')\n"
    "os.write(1, b'rank %d: no newline at the end' % rank)\n"
)
_CHILD = (
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
    " stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
)
SCRIPTS = {
    "succeed.py": _OUTPUT + _CHILD + "sys.exit(0)\n",
    "fail.py": (  # rank 0 fails with 3 at once; the others run on until stopped
        "import os, subprocess, sys, time\n" + _CHILD + f"if {_RANK} == '0':\n"
        "    sys.exit(3)\n"
        "time.sleep(300)\n"
    ),
    "killed.py": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "sleep.py": (
        "import os, subprocess, sys, time\n" + _CHILD + f"os.write(1, {STARTED!r})\n"
        "time.sleep(300)\n"
    ),
}


def expected_log(rank: int) -> bytes:
    """What `succeed.py` writes as rank `rank`: its log must hold exactly this."""
    return (
        f"rank {rank}: line one\nrank {rank}: to stderr\n".encode()
        + b"\xff\xfe not UTF-8\n"
        + f"rank {rank}: no newline at the end".encode()
    )


class ContractBroken(AssertionError):
    """A plugin broke an obligation of its capability's contract (named in the message)."""


def _broken(capability: Any, obligation: str, what: str) -> ContractBroken:
    return ContractBroken(
        f"{capability.kind} {capability.name!r} breaks its contract: {obligation}: {what}"
    )


# -- the run a check drives --------------------------------------------------------------
@dataclass
class TrialRun:
    """One run recorded in the check's workspace, with the RunContext a target gets."""

    ctx: RunContext
    cancel: threading.Event
    echoed: list[tuple[int, bytes]] = field(default_factory=list)

    def echoed_by(self, rank: int) -> bytes:
        return b"".join(line for r, line in list(self.echoed) if r == rank)


class Trials:
    """Runs of one job in one real workspace, made one at a time for the check."""

    def __init__(self, folder: Path, spec: dict[str, Any], capability: Any, field: str) -> None:
        """`capability` is what is checked, and `field` the job's section holding its
        options ("compute", "distributed", "metrics"): filled with their declared defaults
        as the core does before a plugin sees a job."""
        from expkit.job import JobSpec
        from expkit.workspace import Workspace

        self.folder = folder
        source = folder / "source"
        source.mkdir(parents=True, exist_ok=True)
        for name, text in SCRIPTS.items():
            (source / name).write_text(text, encoding="utf-8")
        self.spec = {
            "experiment": "conformance",
            "source_directory": str(source),
            "entry_script": "succeed.py",
            **spec,
        }
        self.workspace = Workspace.init(folder / "workspace")
        self.job_type = JobSpec
        self.capability, self.field = capability, field

    def job(self, **changes: Any) -> Any:
        """The check's job spec, with `changes` (e.g. timeout=2), the checked capability's
        options filled in (a bad one raises UserError, as `expkit run` would)."""
        from expkit.options import check

        job = self.job_type.from_dict({**self.spec, **changes}, source="<conformance job>")
        capability, field = self.capability, self.field
        if field == "metrics":
            sinks = [
                s.replace(options=check(capability, s.options, f"metrics.{i}.options"))
                if s.name == capability.name
                else s
                for i, s in enumerate(job.metrics)
            ]
            return job.replace(metrics=sinks)
        section = getattr(job, field)
        filled = check(capability, section.options, f"{field}.options")
        return job.replace(**{field: section.replace(options=filled)})

    @contextmanager
    def run(self, job: Any) -> Iterator[TrialRun]:
        """A new run of `job`: its record, folders (the scripts in its work folder) and
        context; afterwards whatever it left is stopped and the run is recorded finished."""
        import shutil

        from expkit import services
        from expkit.context import RUN_ID_ENV
        from expkit.procs import WORKSPACE_ENV

        history = self.workspace.history
        record = history.runs.create(job.experiment, job.to_dict())
        run_dir = self.workspace.run_dir(record.id)
        for folder in ("logs", "metrics"):
            (run_dir / folder).mkdir(parents=True, exist_ok=True)
        shutil.copytree(job.source_directory, run_dir / "work")
        cancel = threading.Event()
        trial: TrialRun
        ctx = services.run_context(
            self.workspace,
            record.id,
            job,
            script_env={
                RUN_ID_ENV: record.id,
                WORKSPACE_ENV: str(self.workspace.path),
                "EXPKIT_RUN_DIR": str(run_dir),
                "PYTHONUNBUFFERED": "1",
            },
            say=lambda text: None,
            waiting=lambda text: None,
            canceled=cancel.is_set,
            echo=lambda rank, line: trial.echoed.append((rank, line)),
        )
        trial = TrialRun(ctx, cancel)
        try:
            yield trial
        finally:
            stop_run_processes(record.id, grace=1, workspace=self.workspace.path)
            history.runs.finish(record.id, "completed", None)

    def held(self, run_id: str) -> list[str]:
        """The leases `run_id` still holds, as "kind slot"."""
        rows = self.workspace.history.db.execute(
            "SELECT kind, slot FROM slots WHERE run_id = ?", (run_id,)
        ).fetchall()
        return [f"{kind} {slot}" for kind, slot in rows]


def _call(limit: float, function: Callable[[], Any]) -> tuple[bool, Any, BaseException | None]:
    """Run `function` on a thread: (returned in time, its value, what it raised)."""
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            result["value"] = function()
        except BaseException as error:  # handed to the caller
            result["error"] = error

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(limit)
    return not thread.is_alive(), result.get("value"), result.get("error")


def _describe(value: Any, error: BaseException | None) -> str:
    if error is not None:
        return f"raised {type(error).__name__}: {error}"
    return f"returned {value!r}"


# -- compute targets -------------------------------------------------------------------------
def check_compute_target(
    target: ComputeTarget,
    *,
    only: Iterable[str] | None = None,
    job: dict[str, Any] | None = None,
    folder: Path | None = None,
    cancel_within: float = 10.0,
    limit: float = 120.0,
) -> list[str]:
    """Drive `target` through the compute-target contract and return the obligations
    checked (see COMPUTE_OBLIGATIONS); AssertionError naming the first one broken.

    Small real scripts run as a 2-rank job (`processes_per_node: 2`) in a temporary
    workspace (under `folder`, default a new temporary folder): one succeeds writing known
    bytes to stdout and stderr, one fails with exit code 3 while the other rank sleeps, one
    kills itself with SIGKILL, one sleeps until the job's 2-second timeout, one until it is
    canceled from another thread; each starts a child that outlives it. `job`: job-spec keys
    merged over the check's own (e.g. `{"compute": {"target": "slurm", "options": {...}}}`).
    `only`: the obligations to check, for a target that cannot run everything here (a cloud
    target without its service: `only=("check", "dry_run")`). `cancel_within`: seconds a
    cancel may take; `limit`: seconds any one call may take before it counts as hung.
    """
    wanted = tuple(COMPUTE_OBLIGATIONS if only is None else only)
    unknown = [name for name in wanted if name not in COMPUTE_OBLIGATIONS]
    if unknown:
        raise ValueError(f"unknown obligation {unknown[0]!r}; known: {COMPUTE_OBLIGATIONS}")
    spec = {
        "compute": target.name,
        "distributed": "torchrun",
        "resources": {"processes_per_node": 2},
        **(job or {}),
    }
    with _folder(folder) as where:
        checker = _TargetCheck(
            target, Trials(where, spec, target, "compute"), wanted, cancel_within, limit
        )
        return checker.check()


@contextmanager
def _folder(folder: Path | None) -> Iterator[Path]:
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="expkit-conformance-") as name:
        yield Path(name)


class _TargetCheck:
    def __init__(
        self,
        target: ComputeTarget,
        trials: Trials,
        wanted: tuple[str, ...],
        cancel_within: float,
        limit: float,
    ) -> None:
        self.target, self.trials, self.wanted = target, trials, wanted
        self.cancel_within, self.limit = cancel_within, limit

    def broken(self, obligation: str, what: str) -> ContractBroken:
        return _broken(self.target, obligation, what)

    def check(self) -> list[str]:
        job = self.trials.job()
        if "check" in self.wanted:
            done, _, error = _call(self.limit, lambda: self.target.check(job))
            if not done or error is not None:
                what = _describe(None, error) if done else "did not return"
                ranks = job.resources.processes
                raise self.broken("check", f"check(job) of a plain {ranks}-rank job {what}")
        if "dry_run" in self.wanted:
            done, text, error = _call(self.limit, lambda: self.target.dry_run(job))
            if not done or error is not None or not (text is None or isinstance(text, str)):
                what = _describe(text, error) if done else "did not return"
                raise self.broken("dry_run", f"dry_run(job) must return text or None; {what}")
        if "acquire_release" in self.wanted:
            with self.trials.run(job) as trial:
                self.hold(trial, lambda allocation: None)
        self.scripts()
        return list(self.wanted)

    def hold(self, trial: TrialRun, body: Callable[[Allocation], None]) -> None:
        """prepare and acquire, `body(allocation)`, then release: as the lifecycle does."""
        ctx = trial.ctx
        done, env, error = _call(self.limit, lambda: self.target.prepare(ctx))
        if not done or error is not None or not (env is None or isinstance(env, Environment)):
            what = _describe(env, error) if done else "did not return"
            what = f"prepare(ctx) must return None or an Environment; {what}"
            raise self.broken("acquire_release", what)
        ctx.environment = env or Environment(sys.executable, "conformance", True, "this python")
        environment = ctx.environment
        # The script's command as prepare leaves it, for a target that submits it in acquire.
        ctx.command = Process(
            argv=[environment.python, ctx.job.entry_script],
            env={**environment.env, **ctx.script_env},
        )
        done, allocation, error = _call(self.limit, lambda: self.target.acquire(ctx))
        if not done or error is not None or not isinstance(allocation, Allocation):
            what = _describe(allocation, error) if done else "did not return"
            raise self.broken("acquire_release", f"acquire(ctx) must return an Allocation; {what}")
        try:
            body(allocation)
        except BaseException:
            _call(self.limit, lambda: self.target.release(ctx, allocation))
            raise  # the obligation body found broken comes first
        done, _, error = _call(self.limit, lambda: self.target.release(ctx, allocation))
        if not done or error is not None:
            what = _describe(None, error) if done else "did not return"
            raise self.broken("acquire_release", f"release(ctx, allocation) {what}")
        held = self.trials.held(ctx.run_id)
        if held and "acquire_release" in self.wanted:
            raise self.broken(
                "acquire_release", f"release left leases of the run held: {', '.join(held)}"
            )

    def scripts(self) -> None:
        """The obligations checked by running scripts: exit codes, logs, timeout, cancel."""
        checks = self.wanted
        expected = {"succeed.py": 0, "fail.py": 3, "killed.py": -signal.SIGKILL}
        for script, code in expected.items():
            needed = ("exit_codes", "logs") if script == "succeed.py" else ("exit_codes",)
            if not any(obligation in checks for obligation in needed):
                continue
            value, error, trial = self.execute(self.trials.job(entry_script=script))
            if "exit_codes" in checks and (error is not None or value != code):
                what = {
                    "succeed.py": "every rank exited 0",
                    "fail.py": "rank 0 exited 3 (rank 1 sleeping)",
                    "killed.py": "each rank was killed by SIGKILL",
                }[script]
                raise self.broken(
                    "exit_codes", f"{what}: execute must return {code}; {_describe(value, error)}"
                )
            if script == "succeed.py" and "logs" in checks:
                self.logs(trial)
        if "timeout" in checks:
            value, error, _ = self.execute(self.trials.job(entry_script="sleep.py", timeout=2))
            if not (isinstance(error, StageFailed) and "timed out" in str(error)):
                raise self.broken(
                    "timeout",
                    "a script running past the job's 2s timeout: execute must raise "
                    f"StageFailed('timed out after 2s ...'); {_describe(value, error)}",
                )
        if "cancel" in checks:
            self.execute(self.trials.job(entry_script="sleep.py"), cancel=True)

    def execute(self, job: Any, cancel: bool = False) -> tuple[Any, BaseException | None, TrialRun]:
        """One run of `job` through prepare, acquire, execute and release; with `cancel`,
        ctx.canceled() turns true once every rank has started. Checks no_leftovers."""
        outcome: dict[str, Any] = {}
        with self.trials.run(job) as trial:

            def body(allocation: Allocation) -> None:
                ctx = trial.ctx
                processes = [
                    Process(
                        argv=[ctx.environment.python, job.entry_script, str(rank)],  # type: ignore[union-attr]
                        env={**ctx.environment.env, **ctx.script_env},  # type: ignore[union-attr]
                        rank=rank,
                    )
                    for rank in range(job.resources.processes)
                ]
                if cancel:
                    outcome.update(self.canceled(trial, processes, allocation))
                    return
                done, value, error = _call(
                    self.limit, lambda: self.target.execute(ctx, processes, allocation)
                )
                if not done:
                    trial.cancel.set()
                    obligation = "timeout" if job.timeout else "exit_codes"
                    raise self.broken(
                        obligation,
                        f"execute did not return within {self.limit:g}s "
                        f"({job.entry_script}, job timeout {job.timeout})",
                    )
                outcome.update(value=value, error=error)
                self.leftovers(trial, f"after execute {_describe(value, error)}")

            self.hold(trial, body)
        return outcome.get("value"), outcome.get("error"), trial

    def canceled(
        self, trial: TrialRun, processes: list[Process], allocation: Allocation
    ) -> dict[str, Any]:
        ctx = trial.ctx
        result: dict[str, Any] = {}

        def call() -> None:
            done, value, error = _call(
                self.limit, lambda: self.target.execute(ctx, processes, allocation)
            )
            result.update(done=done, value=value, error=error)

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        deadline = time.monotonic() + self.limit
        while not all(STARTED in self.log(trial, p.rank) for p in processes):
            if not thread.is_alive() or time.monotonic() > deadline:
                raise self.broken(
                    "cancel",
                    f"sleep.py never printed its first line to logs/rank-N.log (execute "
                    f"{_describe(result.get('value'), result.get('error'))})",
                )
            time.sleep(0.05)
        trial.cancel.set()
        thread.join(self.cancel_within)
        if thread.is_alive():
            raise self.broken(
                "cancel",
                f"execute did not raise Canceled within {self.cancel_within:g}s of "
                "ctx.canceled() turning true",
            )
        value, error = result.get("value"), result.get("error")
        if not isinstance(error, Canceled):
            raise self.broken(
                "cancel",
                f"once ctx.canceled() is true execute must raise Canceled; "
                f"{_describe(value, error)}",
            )
        self.leftovers(trial, "after execute raised Canceled")
        return {"value": value, "error": error}

    @staticmethod
    def log(trial: TrialRun, rank: int) -> bytes:
        path = trial.ctx.log_dir / f"rank-{rank}.log"
        try:
            return path.read_bytes()
        except OSError:
            return b""

    def logs(self, trial: TrialRun) -> None:
        for rank in range(trial.ctx.job.resources.processes):
            want, got = expected_log(rank), self.log(trial, rank)
            if got != want:
                raise self.broken(
                    "logs",
                    f"logs/rank-{rank}.log must hold rank {rank}'s output byte for byte: "
                    f"expected {want!r}, found {got!r}",
                )
            echoed = trial.echoed_by(rank)
            if echoed != want:
                what = (
                    f"ctx.echo must show rank {rank}'s lines: expected {want!r}, echoed {echoed!r}"
                )
                raise self.broken("logs", what)

    def leftovers(self, trial: TrialRun, when: str) -> None:
        if "no_leftovers" not in self.wanted:
            return
        try:
            assert_no_processes_left(trial.ctx.run_id, self.trials.workspace.path)
        except AssertionError as left:
            raise self.broken("no_leftovers", f"{when}: {left}") from None


# -- processes of a run ---------------------------------------------------------------------
def assert_no_processes_left(
    run_id: str, workspace: str | os.PathLike[str], grace: float = LEFTOVER_GRACE
) -> None:
    """AssertionError listing the processes of run `run_id` (found by the environment
    markers every process of a run carries, see `expkit.procs`) still alive `grace` seconds
    from now (the time a process killed just before may take to go)."""
    deadline = time.monotonic() + grace
    while True:
        pids = run_processes(run_id, workspace)
        if not pids or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if pids:
        shown = ", ".join(f"{pid} ({_command(pid)})" for pid in pids[:5])
        raise AssertionError(f"{len(pids)} process(es) of run {run_id} still running: {shown}")


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:100]
    except OSError:
        return "?"


# -- distributed backends ----------------------------------------------------------------------
def check_distributed_backend(
    backend: DistributedBackend,
    *,
    processes: int = 2,
    job: dict[str, Any] | None = None,
    folder: Path | None = None,
) -> list[str]:
    """Check that `backend` accepts a job of `processes` ranks and launches it as the
    contract says: a list of Processes whose argv runs the command, either one per rank
    with ranks 0..N-1, or one launcher whose `split_output` splits its output by rank.
    Returns the obligations checked; AssertionError naming the one broken."""
    spec = {
        "compute": "local",
        "distributed": backend.name,
        "resources": {"processes_per_node": processes},
        **(job or {}),
    }
    with _folder(folder) as where:
        trials = Trials(where, spec, backend, "distributed")
        the_job = trials.job()
        try:
            backend.check(the_job)
        except Exception as error:
            raise _broken(
                backend, "check", f"check(job) of a {processes}-rank job {_describe(None, error)}"
            ) from error
        with trials.run(the_job) as trial:
            command = [sys.executable, "succeed.py", "--flag"]
            allocation = Allocation(["localhost"], list(range(processes)), [], "conformance")
            launched = backend.launch(trial.ctx, command, allocation)
        if not isinstance(launched, list) or not all(isinstance(p, Process) for p in launched):
            raise _broken(backend, "launch", f"must return a list of Process; got {launched!r}")
        for process in launched:
            if not all(isinstance(a, str) for a in process.argv) or "succeed.py" not in " ".join(
                process.argv
            ):
                raise _broken(
                    backend, "launch", f"a process must run the command; argv {process.argv!r}"
                )
        ranks = sorted(p.rank for p in launched)
        launcher = len(launched) == 1 and launched[0].split_output is not None
        if not launcher and ranks != list(range(processes)):
            raise _broken(
                backend,
                "launch",
                f"{processes} ranks must be processes of ranks 0..{processes - 1} or one "
                f"launcher with split_output; got ranks {ranks}",
            )
    return ["check", "launch"]


# -- metric sinks ---------------------------------------------------------------------------
def check_metric_sink(
    sink: MetricSink, options: dict[str, Any] | None = None, *, folder: Path | None = None
) -> list[str]:
    """Check that `sink` opens a writer for a run, takes batches of every kind of metric
    (numbers with and without a step, text, a table row, several ranks), closes with a
    RunOutcome, and that a second close does nothing; no thread the writer started may
    outlive its close. Returns the obligations checked; AssertionError naming the broken one.
    """
    from expkit import services

    options = dict(options or {})
    with _folder(folder) as where:
        trials = Trials(
            where, {"compute": "local", "metrics": [{"name": sink.name}]}, sink, "metrics"
        )
        job = trials.job()
        before = set(threading.enumerate())
        with trials.run(job) as trial:
            info: RunInfo = services.run_info(trials.workspace, trial.ctx.run_id, job)
            try:
                writer = sink.open(info, options)
            except Exception as error:
                raise _broken(sink, "open", _describe(None, error)) from error
            now = time.time()
            batches = [
                [Metric("loss", 0.5, 0, now), Metric("loss", 0.25, 1, now + 1)],
                [Metric("acc", 0.9, None, now + 2), Metric("note", "best so far", None, now + 2)],
                [Metric("table", {"epoch": 1, "acc": 0.9}, 1, now + 3, rank=1)],
            ]
            for batch in batches:
                try:
                    writer.send(batch)
                except Exception as error:
                    names = ", ".join(f"{m.name}={m.value!r}" for m in batch)
                    raise _broken(
                        sink, "send", f"a batch of {names} {_describe(None, error)}"
                    ) from error
            outcome = RunOutcome(
                "completed", exit_code=0, stage_seconds={"run": 1.0}, tags={"team": "vision"}
            )
            for attempt in ("close", "a second close"):
                try:
                    writer.close(outcome)
                except Exception as error:
                    raise _broken(sink, "close", f"{attempt} {_describe(None, error)}") from error
        left = _threads_left(before)
        if left:
            raise _broken(sink, "close", f"threads still running after close: {left}")
    return ["open", "send", "close"]


def check_environment_builder(
    builder: EnvironmentBuilder,
    environment: dict[str, Any] | None = None,
    *,
    folder: Path | None = None,
    limit: float = 600.0,
) -> list[str]:
    """Check that `builder` turns the job's `environment:` (default: the builder with no
    packages) into an interpreter that runs with the Environment's variables, says why in one
    line, gives the same spec the same hash and finds it in its cache the second time, and
    leaves no process of the run behind. `limit`: seconds one build may take. Returns the
    obligations checked; AssertionError naming the broken one."""
    spec = environment or {"builder": builder.name}
    with _folder(folder) as where:
        trials = Trials(where, {"environment": spec}, builder, "environment")
        job = trials.job()
        with trials.run(job) as trial:
            envs = []
            for attempt in ("build", "a second build"):
                finished, env, error = _call(
                    limit, lambda: builder.build(job.environment, trial.ctx)
                )
                if not finished:
                    raise _broken(builder, "build", f"{attempt} took more than {limit:g}s")
                if error is not None or not isinstance(env, Environment):
                    raise _broken(builder, "build", f"{attempt} {_describe(env, error)}")
                envs.append(env)
            first, second = envs
            if not first.reason or "\n" in first.reason:
                raise _broken(builder, "build", f"reason must be one line, not {first.reason!r}")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in first.env.items()):
                raise _broken(builder, "build", f"env must map strings to strings: {first.env}")
            variables = {**os.environ, **first.env}
            try:
                ran = subprocess.run(
                    [first.python, "-c", "import sys; print(sys.prefix)"],
                    env=variables,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            except (OSError, subprocess.SubprocessError) as error:
                raise _broken(builder, "python", f"{first.python}: {error}") from error
            if ran.returncode != 0:
                raise _broken(
                    builder, "python", f"{first.python} exited {ran.returncode}: {ran.stderr}"
                )
            if not first.hash or second.hash != first.hash:
                raise _broken(
                    builder, "hash", f"one spec gave hashes {first.hash!r} and {second.hash!r}"
                )
            if not second.cache_hit:
                raise _broken(builder, "cache", "the second build of one spec missed the cache")
            left = run_processes(trial.ctx.run_id, trials.workspace.path)
            if left:
                raise _broken(builder, "no_leftovers", f"processes left: {left}")
    return ["build", "python", "hash", "cache", "no_leftovers"]


def _threads_left(before: set[threading.Thread], grace: float = LEFTOVER_GRACE) -> list[str]:
    deadline = time.monotonic() + grace
    while True:
        left = [t for t in threading.enumerate() if t not in before and not t.daemon]
        if not left or time.monotonic() > deadline:
            return [t.name for t in left]
        time.sleep(0.05)
