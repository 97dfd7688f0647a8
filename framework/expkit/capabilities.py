"""The typed objects that plugins supply through the capability hooks.

Each capability has a `name` (what a job spec writes, e.g. `compute: local`) and, once the
plugin manager has collected it, the `plugin` that supplied it. Subclass the one you need
(import it from `expkit.plugin`, the public contract), implement its methods and return an
instance from the matching hook in `expkit.hookspecs`. Each method's docstring states what
the core relies on; `expkit.testing`'s conformance checks test it.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from expkit.job import EnvironmentSpec, JobSpec
    from expkit.leases import RunLeases


@dataclass(frozen=True)
class Option:
    """One option a capability takes (see `Capability.takes`): its type and range, checked
    before any run starts, so that a wrong value is one line naming the field, not a
    plugin's crash or a value silently rounded.

    `kind` is int, float (an int is accepted), bool, str, list (of `items`), dict (names to
    strings, numbers or booleans) or object (any value: `validate` decides). Numbers lie
    within `minimum`..`maximum`; a str or a list is at most `max_length` long; a str is one of
    `choices`, or fully matches `pattern`. `text` replaces the generated description in
    messages ("an ONNX opset number, e.g. 18"). `validate`, for a shape the rest cannot say
    (a path or a mapping of three names), gets a value of the right kind and raises
    ValueError with the reason ("needs resource_group; give ...") when it is still wrong.

    `default` is the value a job that leaves the option out gets: the core hands the plugin
    its options with the defaults filled in (see `expkit.options`). None: the option is left
    out and the capability decides (e.g. this machine's CPU count), which `help` then says.
    `help` is the one line `expkit plugins NAME` shows for the option.
    """

    kind: type
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] = ()
    pattern: str | None = None
    items: type = str
    max_length: int = 4096
    text: str = ""
    default: Any = None
    help: str = ""
    validate: Callable[[Any], None] | None = None

    def describe(self) -> str:
        """What a value must be, as the message says it: "a whole number from 1 to 4096"."""
        if self.text:
            return self.text
        if self.choices:
            names = [str(c) for c in self.choices]
            return " or ".join(names) if len(names) <= 2 else f"one of {', '.join(names)}"
        base = {
            int: "a whole number",
            float: "a number",
            bool: "true or false",
            str: "a string",
            list: f"a list of {_KIND_NAMES.get(self.items, 'values')}",
            dict: "a mapping of names to values",
        }.get(self.kind, self.kind.__name__)
        if self.kind in (int, float):
            low, high = _number(self.minimum), _number(self.maximum)
            if low is not None and high is not None:
                base += f" from {low} to {high}"
            elif low is not None:
                base += f" of at least {low}"
            elif high is not None:
                base += f" of at most {high}"
        elif self.pattern and self.kind is str:
            base += f" like {self.pattern}"
        return base

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` ("must be a whole number from 1 to 4096, not 0"), or
        None for a good one."""
        if not self._fits(value):
            from expkit.errors import quoted

            return f"must be {self.describe()}, not {quoted(value)}"
        if self.validate is not None:
            try:
                self.validate(value)
            except ValueError as error:
                return str(error)
        return None

    def _fits(self, value: Any) -> bool:
        if self.choices:
            return any(value == c and type(value) is type(c) for c in self.choices)
        if self.kind is int:
            return _is_int(value) and _within(value, self.minimum, self.maximum)
        if self.kind is float:
            if not (_is_int(value) or isinstance(value, float)):
                return False
            return math.isfinite(value) and _within(value, self.minimum, self.maximum)
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is str:
            return _is_text(value, self.max_length) and (
                self.pattern is None or re.fullmatch(self.pattern, value) is not None
            )
        if self.kind is list:
            return (
                isinstance(value, list)
                and len(value) <= self.max_length
                and all(Option(self.items)._fits(item) for item in value)
            )
        if self.kind is dict:
            return (
                isinstance(value, dict)
                and len(value) <= self.max_length
                and all(_is_text(k, 256) for k in value)
                and all(_is_scalar(v) for v in value.values())
            )
        return isinstance(value, self.kind)


def declare_options(**options: Option) -> Mapping[str, Option]:
    """A capability's `takes`, read-only: `takes = declare_options(slots=Option(int, ...))`;
    `declare_options()` for a capability that takes no options.

    Raises ValueError, when the plugin is imported, for a declared default that its own
    option refuses (`Option(int, minimum=1, default=0)`): every job would get a value the
    plugin says is wrong."""
    for name, option in options.items():
        if option.default is not None:
            wrong = option.problem(option.default)
            if wrong:
                raise ValueError(f"option {name}: the declared default {wrong}")
    return MappingProxyType(options)


_KIND_NAMES = {str: "strings", int: "whole numbers", float: "numbers"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: Any, max_length: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= max_length and "\0" not in value


def _is_scalar(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= 4096 and "\0" not in value
    return isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value))


def _within(value: float, low: float | None, high: float | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


def _number(bound: float | None) -> str | None:
    if bound is None:
        return None
    return str(int(bound)) if float(bound).is_integer() else str(bound)


class Capability:
    """Something a plugin supplies under a name."""

    kind: ClassVar[str] = "capability"
    name: str = ""
    description: str = ""
    plugin: str = ""  # set by the plugin manager: the plugin that returned this object
    # The options this capability takes, by name (see `Option`): the core checks the job's
    # `compute.options`, `distributed.options`, `environment.options`, `metrics[i].options`,
    # `model.registries[i].options` and `exports[i].options` against it before any run, and
    # hands the plugin its options with the declared defaults filled in (`expkit.options`).
    takes: ClassVar[Mapping[str, Option]] = MappingProxyType({})

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name!r} from {self.plugin or '?'}>"

    def check(self, job: JobSpec) -> None:
        """Reject a job this capability can never serve (raise UserError) before any work:
        the rules of the whole job (local: one node), its options already checked and
        their defaults filled in."""


# -- what flows between the stages -------------------------------------------------------------
@dataclass
class Environment:
    """An interpreter ready to run the job, as built (or found in the cache) by a builder."""

    python: str
    hash: str
    cache_hit: bool
    reason: str
    env: dict[str, str] = field(default_factory=dict)  # variables the processes need


@dataclass
class Allocation:
    """What the scale stage acquired: process slots and GPUs on one or more hosts."""

    hosts: list[str]
    slots: list[int]
    gpus: list[int] = field(default_factory=list)
    description: str = ""


@dataclass
class Process:
    """One process the compute target starts; `env` is added to the run's environment.

    A launcher (horovodrun, torchrun) is one process whose output mixes every rank's lines:
    `split_output` turns one of its lines into (rank, line as the rank wrote it), or (None,
    line) for the launcher's own lines, so that each rank gets its own log (`RankPieces`
    does it for launchers that prefix each piece with the rank).
    """

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    rank: int = 0
    split_output: Callable[[bytes], tuple[int | None, bytes]] | None = None


class RankPieces:
    """A launcher's output -> (rank, the rank's line) or (None, the launcher's own line).

    Launchers prefix each piece of a rank's output, and a piece is not always a whole line:
    torchrun prefixes each chunk it reads, horovodrun each piece ending in "\r". Pieces of
    several ranks can share one launcher line (`[1]:loss [0]:ok\n`), so a rank's pieces
    without a newline wait for the rest of its line. `prefix` matches one prefix, with the
    rank as its first group. Use an instance as `Process.split_output`.
    """

    def __init__(self, prefix: re.Pattern[bytes]) -> None:
        self.prefix = prefix
        self.pending: dict[int, bytes] = defaultdict(bytes)

    def __call__(self, line: bytes) -> tuple[int | None, bytes]:
        pieces = self.prefix.split(line)  # [before, rank, text, rank, text, ...]
        if pieces[0] or len(pieces) == 1:
            return None, line  # the launcher's own line
        ranks, texts = [int(r) for r in pieces[1::2]], pieces[2::2]
        for rank, text in zip(ranks[:-1], texts[:-1], strict=True):
            self.pending[rank] += text
        rank = ranks[-1]
        return rank, self.pending.pop(rank, b"") + texts[-1]


def _no_tags() -> dict[str, str]:
    return {}


def _ignore(*args: Any) -> None:
    return None


def _never(*args: Any) -> bool:
    return False


def _no_config(section: str) -> dict[str, Any]:
    return {}


def _no_spec() -> dict[str, Any]:
    return {}


@dataclass
class RunInfo:
    """What a metric sink, a model registry or an event hook is told about the run it serves.

    The hashes are known once prepare has taken the snapshot and built the environment (a
    sink opens in the run stage, a registry registers after it). `workspace_dir` is the
    workspace's folder, for a plugin that keeps its own store next to the runs (the `mlflow`
    plugin's default `mlflow.db`); the run history in it is expkit's own: read and write what
    the run records through `tags`, `set_tags`, `outputs` and the `RunOutcome` a writer
    gets at close. `outputs()` is the sealed outputs manifest once post-process has run,
    {path relative to outputs/: (size in bytes, sha256)}: the files a plugin may copy from
    `run_dir/outputs`, never a link the script left there.
    """

    run_id: str
    experiment: str
    run_dir: Path
    job: JobSpec
    created: float = 0.0  # when the run was recorded, seconds since the epoch
    snapshot_hash: str | None = None
    environment_hash: str | None = None
    workspace_dir: Path = Path()
    tags: Callable[[], dict[str, str]] = _no_tags  # the run's tags as recorded now
    set_tags: Callable[[dict[str, str]], None] = _ignore  # add or replace tags of the run
    outputs: Callable[[], dict[str, tuple[int, str]]] = dict
    # The run's parameters as recorded now: the job's `args` (data placeholders resolved to
    # paths, once prepare placed the data) and what the script logged as parameters.
    params: Callable[[], dict[str, str]] = _no_tags
    # The workspace config.json's section named `section` (e.g. the plugin's name), {} if none.
    plugin_config: Callable[[str], dict[str, Any]] = _no_config
    # The sweep this run is a trial of (its id, e.g. "pytorch-digits_sweep_1") and its trial
    # number there, None for a run of its own: a sink may group trials (MLflow: child runs of
    # the sweep's parent run).
    sweep: str | None = None
    trial: int | None = None
    # That sweep's spec as its record keeps it (`SweepSpec.to_dict`: Azure ML v2's names,
    # `objective`, `search_space`, ...), read when asked; {} for a run of its own.
    sweep_spec: Callable[[], dict[str, Any]] = _no_spec


@dataclass
class RunOutcome:
    """How a run ended, as a metric writer is told at close (`MetricWriter.close`).

    `stage_seconds` holds each stage that ran ({"prepare": 1.2, "run": 30.5, ...});
    `stage_failure` is "<stage>: <reason>" of the stage that failed or was canceled, if one
    did (`error` is the run's reason as its record says it); `tags` are the run's
    tags (the job's and the script's) as recorded at the end.
    """

    state: str  # completed, failed or canceled
    error: str | None = None  # why, when the run did not complete: "<stage>: <reason>"
    exit_code: int | None = None  # the script's (negative: the signal that killed it)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_failure: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Metric:
    """One logged value: a number, a string, or a table row (a dict)."""

    name: str
    value: Any
    step: int | None
    timestamp: float
    rank: int = 0


@dataclass
class ModelVersion:
    """A registered model version: immutable files with their lineage."""

    name: str
    version: int
    path: Path
    files: dict[str, str]  # relative path -> sha256
    lineage: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)

    def lineage_tags(self) -> dict[str, str]:
        """Tags and lineage flattened to string tags, for a registry that takes only tags:
        `expkit.run_id`, ..., `expkit.metrics.<name>`, `expkit.exports` (the exported
        formats, e.g. `onnx,torchscript`) and `expkit.version`; the model's own tags last."""
        tags: dict[str, Any] = {"expkit.version": self.version}
        for key, value in self.lineage.items():
            if key == "exports":
                tags["expkit.exports"] = ",".join(sorted(value))
            elif isinstance(value, dict):
                tags.update({f"expkit.{key}.{k}": v for k, v in value.items()})
            else:
                tags[f"expkit.{key}"] = value
        tags.update(self.tags)
        return {str(k): str(v) for k, v in tags.items() if v is not None}


@dataclass
class RunContext:
    """What the lifecycle hands to compute targets, backends and builders during one run.

    Folders: `run_dir` is the run's own folder; the script runs in `work_dir` (a copy of the
    snapshot, with the data placed); each rank's output belongs in `log_dir/rank-N.log`.
    Callbacks: `say` a progress line of the stage (shown and recorded); `log` a line for the
    run's log only (`logs/prepare.log`: a tool's own output, e.g. pip's index lines, which
    the terminal does not show); `waiting` says the
    run waits for resources ("queued" with that reason; None when it no longer waits);
    `status` sets the short status `expkit runs` shows (a service's own state, e.g.
    "azureml Running"; None clears it); `canceled` is polled while blocking (then raise
    expkit.errors.Canceled); `echo` shows one output line of a rank in the terminal;
    `set_tags` records tags on the run; `set_remote_job` records the id of a job the target
    submitted to a service that runs it without this process ("slurm:1234"): from then on a
    driver that dies (kill -9, a closed SSH session) leaves the run to a later driver, which
    re-attaches with `ComputeTarget.reattach`, instead of failing it. `command` is the
    script's command line and its environment, known once prepare has placed the data: for
    a target that submits the job when it acquires resources (a batch scheduler), and for
    `launches_ranks` targets, which run it as it is.
    Attempts (the job's `retry:` and `checkpoints:`): `attempt` is the current attempt's number
    (from 1; the script sees it as EXPKIT_ATTEMPT); `stop_signal` and `stop_grace` (seconds)
    say how to stop the ranks when the stop is planned (a timeout, a requeue, a cancel): send
    `stop_signal` to each rank's own process (not its process group, not a launcher) and wait
    up to `stop_grace` for them to exit, before SIGTERM (`runner` does it; None: no checkpoints,
    SIGTERM at once); `requeued(outcome, reason)` is for a target whose service starts the job
    again by itself (a Slurm requeue): it records the end of the current attempt and the start
    of the next, and returns False when the job's `retry` allows no more (the target then ends
    the job and raises Interrupted(outcome, ...)). Services: `leases` (slots and GPUs of
    this machine, shared with concurrent runs, see expkit.leases); `cache_dir`, the
    workspace's folder of built environments, kept across runs (a builder keeps each in a
    subfolder named by its hash); `plugin_config(section)`, the workspace config.json's
    section (e.g. the plugin's name), {} if none.
    """

    run_id: str
    job: JobSpec
    run_dir: Path
    work_dir: Path
    log_dir: Path
    script_env: dict[str, str]
    say: Callable[[str], None]
    waiting: Callable[[str | None], None]
    canceled: Callable[[], bool]
    echo: Callable[[int, bytes], None]
    status: Callable[[str | None], None] = _ignore
    set_tags: Callable[[dict[str, str]], None] = _ignore
    leases: RunLeases | None = None
    cache_dir: Path = Path()
    plugin_config: Callable[[str], dict[str, Any]] = _no_config
    environment: Environment | None = None
    set_remote_job: Callable[[str], None] = _ignore
    command: Process | None = None
    attempt: int = 1
    stop_signal: int | None = None
    stop_grace: float = 0.0
    requeued: Callable[[str, str], bool] = _never
    log: Callable[[str], None] = _ignore


@dataclass
class RankFailure:
    """Which rank failed first, where and how, as a compute target or a backend knows it
    after a failed run stage: each field None when unknown. `exit_code` is the rank's own
    (negative: the signal that killed it), which a launcher's own code may hide."""

    rank: int | None = None
    exit_code: int | None = None
    node: str | None = None


# -- the capabilities --------------------------------------------------------------------------
# The file an environment builder writes into its folder of `RunContext.cache_dir` last: a
# folder without it is a build that did not finish, removed by the next command unless a build
# holds an flock on `<folder>.lock` (see expkit.recovery).
ENV_COMPLETE = ".expkit-complete"


class EnvironmentBuilder(Capability, ABC):
    """Turns the job's `environment:` into an interpreter (prepare stage)."""

    kind = "environment builder"

    @abstractmethod
    def build(self, spec: EnvironmentSpec, ctx: RunContext) -> Environment:
        """Prepare stage: build, or find in the cache, the interpreter for `spec` (the job's
        `environment:`) and return it as an Environment whose `reason` says why the cache
        hit or missed (shown and recorded).

        Obligations: keep what is built under `ctx.cache_dir/<hash>/` (the hash of what
        decides the result), hold an flock on `<folder>.lock` while building and write
        ENV_COMPLETE into the folder last, so that concurrent runs share one build and a
        build cut short is removed; start every process with `runner.run_markers(ctx)` in
        its environment (and `die_with_parent` as preexec), so that a cancel or a dead
        driver stops it; poll `ctx.canceled()` in long waits (raise Canceled); raise
        UserError for a spec that cannot be built (a missing package: say which)."""


class ComputeTarget(Capability, ABC):
    """Where the processes run: acquires resources (scale) and runs processes (run).

    The lifecycle calls, for one run: `prepare`, `acquire`, `execute` (if acquire returned),
    then `release` whatever happened; `check`, `preflight` and `dry_run` before any run
    exists. A target that runs processes on this machine keeps every obligation of
    `execute` by calling `expkit.runner.run` (see `expkit.plugin`). Check a target with
    `expkit.testing.check_compute_target`, which tests each obligation stated here.
    """

    kind = "compute target"
    # True for a target whose service starts the ranks itself (Azure ML's MPI or PyTorch
    # launch): the job's backend is then only a name it reads, not a local launcher.
    launches_ranks: ClassVar[bool] = False

    def preflight(self, job: JobSpec) -> None:
        """Before a run is created (not for --dry-run): check what needs contacting the
        target (credentials, a cluster that must exist); raise UserError naming the problem.
        Nothing may be left held or started: no run exists yet to clean up after."""

    def prepare(self, ctx: RunContext) -> Environment | None:
        """Prepare stage, for a target that builds the environment where the job runs (a
        cluster's image): return that Environment and the environment builder is not called;
        None (the default) lets the job's builder build it here.

        Obligations: hold nothing that `release` would have to give back (release is only
        called once `acquire` returned); keep what later stages need per run (by
        `ctx.run_id`); raise UserError for a job this target cannot prepare, StageFailed
        when the service fails, Canceled when `ctx.canceled()` turns true in a long wait."""
        return None

    @abstractmethod
    def acquire(self, ctx: RunContext) -> Allocation:
        """Scale stage: block until the job's resources are held and return what was
        acquired (hosts, slots, GPUs and a short description shown with the stage).

        Obligations: take shared resources of this machine through `ctx.leases` (never more
        than its capacity across concurrent runs); while waiting, say why with
        `ctx.waiting(text)` (the run shows as queued) and `ctx.waiting(None)` once held;
        poll `ctx.canceled()` at least every second or so and raise Canceled, holding
        nothing; raise StageFailed when the resources can never come (a cluster that failed
        to provision). Whatever is held once it returns is given back by `release`."""

    @abstractmethod
    def execute(self, ctx: RunContext, processes: list[Process], allocation: Allocation) -> int:
        """Run stage: start `processes` on `allocation`, stream their output, wait for them
        and return the exit code.

        Obligations (each tested by `expkit.testing.check_compute_target`):

        * Start each process with argv `process.argv`, in `ctx.work_dir`, with `process.env`
          added to the environment (it carries the run's markers, which let the core find
          the run's processes).
        * Write each rank's output, byte for byte as written (stdout and stderr together),
          to `ctx.log_dir/rank-N.log` (N: `process.rank`, or the rank `process.split_output`
          gives for a launcher's line; a launcher's own lines to `launcher.log`) while it
          runs, and show each line with `ctx.echo(rank, line)`.
        * Return 0 when every process succeeded; else the exit code of the first process
          that failed (then stop the others); -N for a process killed by signal N (as
          `subprocess` reports it, never a shell's 128 + N).
        * Enforce the job's timeout, `ctx.job.timeout` seconds (None: no limit): stop the
          processes and raise Interrupted("time_limit", "timed out after Ns (the job's
          `timeout`)"), a StageFailed.
        * Poll `ctx.canceled()` (at least every second or so) and, once it is true, stop the
          processes and raise Canceled.
        * Stop them as planned at the timeout and on a cancel: with `ctx.stop_signal` set,
          that signal to each rank's own process and up to `ctx.stop_grace` seconds to exit
          before SIGTERM (`expkit.runner` does it).
        * Leave no process behind when it returns or raises: every process started, and
          what they started in their process groups, has ended by then.
        * Raise StageFailed with a one-line reason when the service fails (a lost contact,
          a submission refused); keep any resources for `release`, which gives them back.
        """

    def release(self, ctx: RunContext, allocation: Allocation) -> None:
        """Give back what `acquire` took (leases, nodes, a remote run still going): called
        once whatever happened after `acquire` returned (not when `acquire` raised), also
        after a cancel, and never cut short by Ctrl-C. After it, `ctx.leases` holds nothing
        of this run. Raising fails the run stage ("release failed: ...") when nothing else
        failed, else it is a warning."""

    def reattach(self, ctx: RunContext, remote_job: str) -> Allocation:
        """In place of `acquire`, in a driver that takes over a run whose driver died after
        the target recorded `remote_job` (`ctx.set_remote_job`): find the job again, wait as
        `acquire` does while it is still queued, and return its Allocation; the lifecycle
        then calls `execute` (which follows the job to its end) and `release` as for any
        run. Raise StageFailed when the service no longer knows the job, and Detached
        (expkit.errors) when it cannot be reached now: the run stays unfinished for a later
        driver. Only targets that call `set_remote_job` need it."""
        from expkit.errors import StageFailed

        raise StageFailed(f"the {self.name} target cannot re-attach to {remote_job}")

    def failure(self, ctx: RunContext) -> RankFailure | None:
        """After `execute` returned a nonzero code: the rank that failed first, its own exit
        code and its node, when the target's service says (Slurm names them); None lets the
        job's backend say (`DistributedBackend.failed_rank`)."""
        return None

    def dry_run(self, job: JobSpec) -> str | None:
        """`expkit run JOB --dry-run`: the exact submission this target would make, as text,
        without contacting anything or starting a process. None: the lifecycle's own plan is
        all there is to show. UserError for a job this target cannot run."""
        return None


class DistributedBackend(Capability, ABC):
    """Turns one command into the processes of a (possibly distributed) launch."""

    kind = "distributed backend"
    # Whether `launch` honours the job's `retry.in_place` (restarting every rank within one
    # attempt, as torchrun's --max-restarts does); a job asking for it of a backend that does
    # not is refused before any run.
    restarts_in_place: bool = False

    @abstractmethod
    def launch(self, ctx: RunContext, command: list[str], allocation: Allocation) -> list[Process]:
        """The processes that run `command` (python, script, args) on the allocation, without
        starting them (the compute target does). One Process per rank, ranks 0..N-1 for the
        job's `resources.processes`, or one launcher process whose `split_output` gives
        each line's rank (`RankPieces`); each `env` holds the variables of its rank (the
        run's markers are added by the lifecycle). Raise UserError for a job it cannot
        launch (better: in `check`, before any run)."""

    def failed_rank(self, ctx: RunContext) -> int | None:
        """After a failed run: the rank that failed first, if the launcher's output says."""
        return None

    def failed_exit_code(self, ctx: RunContext) -> int | None:
        """After a failed run: that rank's own exit code (negative: the signal that killed it),
        when the launcher exits with a code of its own (horovodrun exits 1 whatever the rank's)."""
        return None


class MetricWriter(ABC):
    """An open connection of a metric sink to one run."""

    @abstractmethod
    def send(self, metrics: list[Metric]) -> None:
        """Deliver a batch, in the order logged; may be slow (it runs on the sink's own
        background thread, never the script's) and may raise.

        A send that raises is called again with the very same list (the same object) after
        each of `expkit.metrics.RETRY_DELAYS` (0.5, 1 and 2 s: four tries in all); after the
        last, the sink is reported failed and gets no more batches and no `close`. So a
        writer that may have delivered part of a batch before raising must not deliver that
        part twice: skip what it already sent of this list (the MLflow writer does).
        """

    def log_params(self, params: dict[str, str]) -> None:  # noqa: B027
        """Parameters of the run that are new or changed since the last call (all of them at
        the first): the job's `args` once prepare resolved them, then what the script logs as
        parameters. Called on the sink's thread, between batches of `send`, retried as `send`
        is; by default ignored."""

    def close(self, outcome: RunOutcome) -> None:  # noqa: B027
        """The run ended (`outcome.state`, its error, exit code, stage times, tags): send what
        is left and close. Called once, after the last stage, before the run's record is
        final, and not retried: raising is a warning and a `sink-failed` event, or fails the
        run when the sink is `required`. A second call does nothing; no thread of the writer
        may be left running after it."""


class MetricSink(Capability, ABC):
    """Receives the run's metrics as they are logged (MLflow, TensorBoard, ...)."""

    kind = "metric sink"

    @abstractmethod
    def open(self, run: RunInfo, options: dict[str, Any]) -> MetricWriter:
        """Start sending metrics of `run` (`options`: the job's `metrics[i].options`, checked
        against `takes`, with the declared defaults filled in): connect, create the
        service's run, return its writer. Called on the sink's own thread when the run stage
        starts; one that raises is tried again like `MetricWriter.send`, so leave nothing
        half-open behind."""

    def where(self, run: RunInfo, options: dict[str, Any]) -> str | None:
        """Where this sink put `run`'s data, in one line for the run's summary and `expkit
        runs show` (MLflow: the run's link and the tracking URI; TensorBoard: the log folder);
        None when it cannot say (the sink never opened). Called in expkit's own process,
        during or after the run: from what the run recorded (`run.tags()`) and `options`,
        without importing the service's library or contacting it."""
        return None


@dataclass
class Registration:
    """Where a model registry put one model version, as `ModelRegistry.register` returns it
    and the run history keeps it (`expkit models show` lists it).

    `reference` is shown ("pt-dnn version 3 in http://mlflow:5000"); `locator` is what the
    registry needs to find that version again later, without the run's job or options (for
    `set_alias`): strings only, e.g. {"tracking_uri": ..., "version": "3"}."""

    reference: str
    locator: dict[str, str] = field(default_factory=dict)


class ModelRegistry(Capability, ABC):
    """Receives each registered model version (besides the workspace's own registry)."""

    kind = "model registry"
    # Export formats this registry registers with a version when they pass (the `mlflow`
    # registry: "mlflow", an MLflow model folder): the lifecycle adds each to the job's
    # `exports` (not required) when a job naming this registry does not list it and its
    # model says how to load it (`model.load`).
    exports: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def register(
        self, model: ModelVersion, run: RunInfo, options: dict[str, Any]
    ) -> str | Registration:
        """Register `model` (its files under `model.path`, lineage and tags) as made by `run`;
        return where it went (a bare string is a Registration without a locator), whose
        reference is shown in the summary. `options`: its `model.registries[i].options`,
        checked against `takes`, defaults filled in. Raising (StageFailed or UserError with
        a one-line reason) fails the register stage, and the run then keeps no model
        version."""

    def set_alias(self, alias: str, model: ModelVersion, registration: Registration) -> str | None:
        """Point `alias` of model `model.name` at `model` in this registry too (`expkit
        models alias`, or the job's `model.aliases`), as `registration` (what `register`
        returned for this version) locates it; return a short line shown to the user, or
        None when this registry has no aliases (the workspace's alias is set anyway).
        Raise UserError with a one-line reason when the service refuses."""
        return None

    def delete_alias(self, alias: str, model_name: str, registration: Registration) -> str | None:
        """Remove `alias` of model `model_name` in this registry (`expkit models alias
        --delete`); `registration` locates the version it pointed at. As `set_alias`."""
        return None


@dataclass
class ExportRequest:
    """One export to make: the trained model, how to rebuild it, what it takes, how to check it.

    Exporters run torch in `python` (the run's environment), not in expkit's own process: the
    model's code and its packages live there. `expkit.exportkit` has the pieces both built-in
    exporters use: running a worker module in that interpreter, loading the model, making inputs
    and comparing outputs.
    """

    format: str  # the exporter's name, e.g. "onnx"
    model_dir: Path  # the model's files: the run's outputs/<model.path> or a version's folder
    load: dict[str, Any]  # job spec `model.load`: file, factory ("module:function"), args
    input: dict[str, Any]  # job spec `model.input`: shape, dtype, dynamic_axes, examples
    options: dict[str, Any]  # the export entry's options (e.g. opset): checked, defaults filled
    atol: float  # outputs match when |exported - eager| <= atol + rtol * |eager|, everywhere
    rtol: float
    out_dir: Path  # write the exported files here (an empty folder)
    python: str  # the interpreter with torch and the model's packages
    code_dir: Path | None = None  # where `load.factory`'s module is found (the run's snapshot)
    timeout: float = 600.0  # seconds the export and its check may take
    env: dict[str, str] = field(default_factory=dict)  # variables for that interpreter
    say: Callable[[str], None] = print  # a progress line, shown and recorded


@dataclass
class ExportResult:
    """What an exporter produced and how it checked it.

    `ok` is False when the export or its parity check failed; `message` then says why in one
    line. `checks` holds the figures shown and recorded with the export (error figures, the
    inputs checked, opset, input and output names and shapes, ...); it must be JSON-able.
    """

    files: list[Path]  # inside the request's out_dir
    checks: dict[str, Any]
    ok: bool
    message: str = ""


class Exporter(Capability, ABC):
    """Writes the trained model in another format and checks it against the eager model.

    Selected by `exports: [{format: <name>, options: {...}}]` in a job spec, and by
    `expkit export RUN_OR_MODEL --format <name>`. Declare the options it takes in `takes`; a
    failure during `export` is reported as a failed export, not a crash (return ok=False with
    the reason, or raise).
    """

    kind = "exporter"

    @abstractmethod
    def export(self, request: ExportRequest) -> ExportResult:
        """Export the model of `request` into `request.out_dir` and check it against the
        eager model within `request.atol`/`rtol`; return what was written and the checks.
        Run torch in `request.python`, not here (`exportkit.run_worker`), within
        `request.timeout` seconds, leaving no process behind."""


class JobImporter(Capability, ABC):
    """Turns another tool's job definition into an expkit job spec (`expkit import NAME REF`).

    Example: the `azureml` importer turns an `azureml.train.dnn.PyTorch` estimator or a
    `ScriptRunConfig`, named as `FILE.py:NAME`, into a job spec.
    """

    kind = "job importer"

    @abstractmethod
    def import_job(self, ref: str, options: dict[str, Any]) -> dict[str, Any]:
        """The job spec (as the dict a job.yaml holds) for what `ref` names, valid for
        `JobSpec.from_dict`; for a sweep (e.g. Azure ML's HyperDriveConfig), the sweep spec's
        dict with its trial's job spec inline as `job` (valid for `SweepSpec.from_dict`); a
        UserError naming `ref` if there is none. `options` (e.g. the
        experiment's name) are checked against `takes`. Must not contact a service or run
        the user's code beyond what naming `ref` requires."""


KINDS: dict[str, type[Capability]] = {
    "compute_targets": ComputeTarget,
    "distributed_backends": DistributedBackend,
    "environment_builders": EnvironmentBuilder,
    "metric_sinks": MetricSink,
    "model_registries": ModelRegistry,
    "exporters": Exporter,
    "job_importers": JobImporter,
}
