"""A Slurm job's state as the driver sees it, and what that state means for the run.

`query` asks the cheapest source that still knows the job: `squeue` for a live job (every
poll), `scontrol show job` for one that ended less than MinJobAge ago, then `sacct` (slurmdbd)
or `sacct -c` (the jobcomp file, on clusters without slurmdbd). `outcome` maps Slurm's final
state onto the run's; `never_starts` spots a pending job Slurm will never start.

How Slurm's states end a run (the README's table):

| Slurm state   | run state | reason shown                                                  |
|---------------|-----------|---------------------------------------------------------------|
| PENDING       | queued    | `queued: <reason>` (Priority, Resources, ...); a reason that  |
|               |           | never clears (PartitionNodeLimit, InvalidQOS, ...) ends the   |
|               |           | run at once: see `never_starts`                               |
| CONFIGURING   | queued    | `queued: configuring nodes` (nodes booting)                   |
| RUNNING       | running   |                                                               |
| COMPLETING    | running   | (the job's processes are ending)                              |
| COMPLETED     | completed |                                                               |
| FAILED        | failed    | `Slurm job failed with exit code N` (or `killed by signal N`) |
| CANCELLED     | canceled  | `canceled by Slurm (scancel)`                                 |
| TIMEOUT       | failed (*)| `time limit of N s reached` (N: the job's `timeout`)          |
| NODE_FAIL     | failed (*)| `node n2 failed (Slurm: NODE_FAIL; n2 is DOWN: <why>)`        |
| OUT_OF_MEMORY | failed    | `out of memory on n1 (Slurm: OUT_OF_MEMORY)`                  |
| PREEMPTED     | failed (*)| `preempted by another job (Slurm: PREEMPTED)`                 |
| BOOT_FAIL     | failed (*)| `node n1 failed to boot (Slurm: BOOT_FAIL)`                   |
| DEADLINE      | failed    | `the job's deadline passed (Slurm: DEADLINE)`                 |

(*) the attempt ends `time_limit` (TIMEOUT), `node_failure` (NODE_FAIL, BOOT_FAIL) or
`preempted` (PREEMPTED): the target raises Interrupted, and the job's `retry.on` may start
another attempt (a new Slurm job); the run fails when it does not. A job Slurm itself starts
again (`--requeue`: a preemption, `scontrol requeue`, a node failure; `Restarts=N` in
`scontrol show job`) goes back to PENDING and stays the same run: the next attempt.

Every command takes `env`: the environment Slurm's commands run with (the caller's plus
SLURM_CONF).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

from expkit.plugin import StageFailed
from expkit_slurm.batch import controller

# States after which the job never runs again (a requeued job goes back to PENDING instead).
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "REVOKED",
        "SPECIAL_EXIT",
    }
)

# Pending reasons that never clear by waiting (squeue(1), "JOB REASON CODES"): the job asks
# for more than its partition, account or QOS will ever give, or names something that does
# not exist. Reasons that clear as other jobs end or an admin acts (Resources, Priority,
# ReqNodeNotAvail, PartitionDown, JobHeldAdmin, AssocGrp*, QOSGrp*, ...) are waits, shown live.
NEVER_REASONS = {
    "PartitionNodeLimit": "the job asks for more nodes than its partition allows",
    "PartitionTimeLimit": "the job's time limit is longer than its partition allows",
    "PartitionConfig": "the partition's configuration cannot serve the request",
    "BadConstraints": "no node has the features the job asks for (constraint)",
    "InvalidAccount": "the account is not valid",
    "InvalidQOS": "the QOS is not valid",
    "AccountNotAllowed": "the account may not use this partition",
    "QOSNotAllowed": "the QOS may not be used in this partition",
    "DependencyNeverSatisfied": "a job it depends on can never let it start",
}
# Seconds one command may take: Slurm's clients retry an unreachable controller for about
# 18 s (squeue, scontrol) before they say so; a command still silent past this is stuck.
_TIMEOUT = 30.0
_UNREACHABLE = "Unable to contact slurm controller"
_EXPANDED: dict[str, list[str]] = {}  # host lists expanded by Slurm (pure syntax: no cluster)


@dataclass
class JobState:
    """What Slurm says of one job: `state` is Slurm's word (PENDING, RUNNING, COMPLETED,
    TIMEOUT, ...), `reason` the pending reason (Priority, Resources, ...; None when Slurm
    gives none), `nodes` the node names once it has them, `exit_code` and `signal` the batch
    step's (None when unknown, or no signal), `finished` true for a final state,
    `failed_nodes` which of its nodes Slurm says are unwell after a node failure,
    `restarts` how often Slurm started the job again (Slurm's restart count: a requeue, a
    preemption or a node failure of a job submitted with --requeue; 0 when unknown)."""

    job_id: str
    state: str
    reason: str | None = None
    nodes: list[str] = field(default_factory=list)
    exit_code: int | None = None
    signal: int | None = None
    finished: bool = False
    # After NODE_FAIL or BOOT_FAIL: the job's nodes Slurm now holds down, drained or not
    # responding, each with its state and Slurm's reason (`IDLE+DRAIN: testing`).
    failed_nodes: dict[str, str] = field(default_factory=dict)
    restarts: int = 0


def query(job_id: str, env: Mapping[str, str]) -> JobState | None:
    """The job's state from the cheapest source that still knows it: `squeue` while it is
    live, `scontrol show job` for MinJobAge seconds after it ends, then `sacct` with slurmdbd
    or `sacct -c` (the jobcomp file) without; None when none knows the job. Measured here:
    about 10 ms for a live job, 16 ms once it ended, 22 ms from the jobcomp file.

    Raises StageFailed when the controller does not answer, after Slurm's own retries (about
    18 s): a reason to ask again later, not the job's end."""
    live = _squeue(job_id, env)
    if live is not None and not live.finished:
        return live
    # An ended job (squeue shows one only when SQUEUE_STATES asks for it) has its exit code
    # in scontrol's record or in accounting.
    ended = _scontrol(job_id, env) or _sacct(job_id, env) or live
    if ended is not None and ended.state in ("NODE_FAIL", "BOOT_FAIL"):
        ended.failed_nodes = unwell_nodes(ended.nodes, env)
    return ended


def waiting_text(state: JobState) -> str | None:
    """What a run waiting for its job shows after `queued: ` (`ctx.waiting`): Slurm's pending
    reason (`Priority`, `Resources`, ...), `configuring nodes` while nodes boot; None once the
    job runs or ended."""
    if state.state == "PENDING":
        return state.reason or "pending"
    if state.state == "CONFIGURING":
        return "configuring nodes"
    return None


def never_starts(state: JobState) -> str | None:
    """For a PENDING job whose reason never clears by waiting (see NEVER_REASONS, and any
    per-job limit of the account or QOS: QOSMaxNodePerJobLimit, AssocMaxCpuPerJobLimit, the
    QOSMin* ones), the one-line reason; else None."""
    if state.state != "PENDING" or not state.reason:
        return None
    word = re.split(r"[\s,]", state.reason, maxsplit=1)[0]
    why = NEVER_REASONS.get(word)
    if why is None and (word.startswith("QOSMin") or "PerJob" in word):
        why = "the job asks for more than its account's or QOS's limit per job"
    if why is None:
        return None
    return f"Slurm can never start the job: {why} (pending reason {word})"


def outcome(state: JobState, timeout: float | None) -> tuple[str, str | None]:
    """How a finished job ended the attempt: ("completed" | "failed" | "canceled" |
    "time_limit" | "node_failure" | "preempted", the one-line reason or None); the last three
    are the attempt outcomes (expkit.stages.AttemptOutcome) that the job's `retry.on` may
    retry. `timeout` is the job's `timeout` in seconds, named when Slurm's time limit stopped
    it. See the table in this module's docstring.

    Raises ValueError for a job that has not finished."""
    if not state.finished:
        raise ValueError(f"Slurm job {state.job_id} has not finished (state {state.state})")
    nodes = ", ".join(state.nodes) or "its node"
    name = state.state
    if name == "COMPLETED":
        return "completed", None
    if name == "CANCELLED":
        return "canceled", "canceled by Slurm (scancel)"
    if name == "TIMEOUT":
        if timeout is None:  # a limit the user set through sbatch_args or the partition's
            return "time_limit", "Slurm's time limit for the job reached (Slurm: TIMEOUT)"
        return "time_limit", f"time limit of {timeout:g} s reached"
    if name in ("NODE_FAIL", "BOOT_FAIL"):
        how = "failed" if name == "NODE_FAIL" else "failed to boot"
        return "node_failure", f"{_failed(state)} {how} (Slurm: {name}{_said(state)})"
    if name == "PREEMPTED":
        return "preempted", "preempted by another job (Slurm: PREEMPTED)"
    reasons = {
        "FAILED": _exit_text(state),
        "OUT_OF_MEMORY": f"out of memory on {nodes} (Slurm: OUT_OF_MEMORY)",
        "DEADLINE": "the job's deadline passed (Slurm: DEADLINE)",
    }
    return "failed", reasons.get(name, f"Slurm ended the job with state {name}")


def cancel(job_id: str, env: Mapping[str, str]) -> None:
    """Cancel the job (`scancel`): Slurm signals its steps and the batch script, then kills
    them after KillWait. Nothing happens for a job that already ended.

    Raises StageFailed when the controller does not answer or Slurm refuses."""
    done = _run(["scancel", job_id], env)
    if done.returncode != 0:
        text = done.stderr.strip()
        if not re.search(r"already completing or completed|Invalid job id", text):
            raise StageFailed(f"scancel {job_id} failed: {text.splitlines()[-1]}")


def signal_steps(job_id: str, signal_name: str, env: Mapping[str, str]) -> bool:
    """Send `signal_name` (`URG`) to every process of the job's steps, not to the batch
    script (`scancel --signal`, Slurm's default for a signal). True when Slurm took it; False
    for a job that has no step running (pending, ended) or that Slurm refuses to signal.

    Raises StageFailed when the controller does not answer."""
    return _run(["scancel", f"--signal={signal_name}", job_id], env).returncode == 0


def unwell_nodes(nodes: list[str], env: Mapping[str, str]) -> dict[str, str]:
    """Those of `nodes` that Slurm holds down, drained, failing or not responding, each with
    its state and Slurm's reason (`DOWN+DRAIN: testing`): after a node failure, the node to
    blame. Empty when Slurm lists none (a node back in service already)."""
    if not nodes:
        return {}
    done = _run(["scontrol", "show", "node", "-o", ",".join(nodes)], env)
    found = {}
    for line in done.stdout.splitlines():
        fields = _fields(line)
        name, state = fields.get("NodeName"), fields.get("State", "")
        if name in nodes and re.search(r"DOWN|DRAIN|FAIL|NOT_RESPONDING", state):
            reason = re.search(r"(?:^|\s)Reason=(.*?)(?:\s+\w+=|$)", line)
            # "testing [root@2026-11-29T22:38:58]": who set it and when is noise here
            said = re.sub(r"\s*\[[^\]]*@[^\]]*\]$", "", reason.group(1)) if reason else ""
            found[name] = f"{state}: {said}" if said else state
    return found


def hostnames(hostlist: str, env: Mapping[str, str]) -> list[str]:
    """Slurm's compressed host list (`n[1-3],gpu7`) as names, in Slurm's order; the
    expansion is Slurm's own (`scontrol show hostnames`), asked only when there is a range."""
    hostlist = hostlist.strip()
    if not hostlist or hostlist in ("(null)", "None"):
        return []
    if "[" not in hostlist:
        return hostlist.split(",")
    if hostlist not in _EXPANDED:  # the same list on every poll of a running job: ask once
        names = _run(["scontrol", "show", "hostnames", hostlist], env).stdout.split()
        if not names:
            return []
        if len(_EXPANDED) > 256:
            _EXPANDED.clear()
        _EXPANDED[hostlist] = names
    return list(_EXPANDED[hostlist])


# -- the sources, cheapest first -------------------------------------------------------------
def _squeue(job_id: str, env: Mapping[str, str]) -> JobState | None:
    """A live job from `squeue` (PENDING, RUNNING, COMPLETING, ...); None once it ended.
    The long format (-O; width 0: nothing cut) is the one that has the restart count."""
    form = "JobID:0|,State:0|,RestartCnt:0|,NodeList:0|,Reason:0"
    done = _asked(["squeue", "-h", "-j", job_id, "-O", form], env)
    for line in done.stdout.splitlines():
        got, state, restarts, nodes, reason = [*line.split("|", 4), "", "", "", ""][:5]
        if got.strip() == job_id:
            return JobState(
                job_id,
                state.strip(),
                reason=_reason(reason),
                nodes=hostnames(nodes, env),
                finished=state.strip() in FINAL_STATES,
                restarts=int(restarts) if restarts.strip().isdigit() else 0,
            )
    return None


def _scontrol(job_id: str, env: Mapping[str, str]) -> JobState | None:
    """A job slurmctld still holds (for MinJobAge seconds after it ended), with its exit code."""
    done = _asked(["scontrol", "show", "job", "-o", job_id], env)
    for line in done.stdout.splitlines():
        fields = _fields(line)
        if fields.get("JobId") == job_id and "JobState" in fields:
            return _state(
                job_id,
                fields["JobState"],
                fields.get("ExitCode", ""),
                fields.get("NodeList", ""),
                env,
                reason=fields.get("Reason"),
                restarts=fields.get("Restarts", ""),
            )
    return None


def _sacct(job_id: str, env: Mapping[str, str]) -> JobState | None:
    """An ended job from accounting: slurmdbd (`sacct -X`), else the jobcomp file
    (`sacct -c`), where `sacct` without slurmdbd says accounting is disabled."""
    fields = "JobID,State,ExitCode,NodeList"
    done = _run(["sacct", "-P", "-n", "-X", "-j", job_id, "-o", fields], env)
    if done.returncode != 0 or not done.stdout.strip():
        done = _run(["sacct", "-c", "-P", "-n", "-j", job_id, "-o", fields], env)
    return parse_sacct(job_id, done.stdout, env)


def parse_sacct(job_id: str, text: str, env: Mapping[str, str]) -> JobState | None:
    """The job's state from `sacct -P -n -o JobID,State,ExitCode,NodeList` lines, as slurmdbd
    and the jobcomp file both give them (`123|CANCELLED by 1000|0:15|n[1-2]`); the last line
    of the job (the newest, after a requeue); None when no line is about it."""
    found = None
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) >= 4 and parts[0].strip() == job_id:
            found = parts
    if found is None:
        return None
    return _state(job_id, found[1], found[2], found[3], env)


# -- helpers -------------------------------------------------------------------------------
def _state(
    job_id: str,
    state: str,
    exit_code: str,
    nodes: str,
    env: Mapping[str, str],
    reason: str | None = None,
    restarts: str = "",
) -> JobState:
    word = state.split()[0] if state.split() else "UNKNOWN"  # "CANCELLED by 1000"
    code, signal = _exit_code(exit_code)
    return JobState(
        job_id,
        word,
        reason=_reason(reason or ""),
        nodes=hostnames(nodes, env),
        exit_code=code,
        signal=signal,
        finished=word in FINAL_STATES,
        restarts=int(restarts) if restarts.isdigit() else 0,
    )


def _exit_code(text: str) -> tuple[int | None, int | None]:
    """Slurm's `code:signal` (`3:0`, `0:9`) as (exit code, signal or None)."""
    code, _, signal = text.strip().partition(":")
    if not code.isdigit():
        return None, None
    return int(code), int(signal) if signal.isdigit() and int(signal) else None


def _failed(state: JobState) -> str:
    """The node to blame: those Slurm holds unwell, else the job's only node, else all."""
    names = list(state.failed_nodes) or state.nodes
    if len(names) == 1:
        return f"node {names[0]}"
    return f"a node of {', '.join(names)}" if names else "a node"


def _said(state: JobState) -> str:
    return "".join(f"; {name} is {said}" for name, said in state.failed_nodes.items())


def _exit_text(state: JobState) -> str:
    if state.signal:
        return f"Slurm job failed: killed by signal {state.signal}"
    if state.exit_code is not None:
        return f"Slurm job failed with exit code {state.exit_code}"
    return "Slurm job failed"


def _reason(text: str) -> str | None:
    text = text.strip()
    return None if text in ("", "None", "(null)") else text


def _fields(line: str) -> dict[str, str]:
    """`Key=value` pairs of one `scontrol show ... -o` line (values without spaces)."""
    return dict(re.findall(r"(?:^|\s)([A-Za-z][\w/:]*)=(\S*)", line))


def _run(argv: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess:
    """Run one of Slurm's commands; StageFailed when the controller does not answer."""
    try:
        done = subprocess.run(argv, env=dict(env), capture_output=True, text=True, timeout=_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise StageFailed(f"{argv[0]} did not answer within {_TIMEOUT:.0f}s") from None
    if _UNREACHABLE in done.stderr:
        raise StageFailed(f"{controller(env)} does not answer (scontrol ping)")
    return done


def _asked(argv: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess:
    """`_run` for a command that asks slurmctld about a job (squeue, scontrol): a failure
    other than "Invalid job id" (a job the controller no longer holds) is no news of the job
    ("Socket timed out on send/recv operation" from a paused or overloaded controller), so
    it is a StageFailed like an unreachable controller, never taken for the job's end."""
    done = _run(argv, env)
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        said = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise StageFailed(f"{controller(env)} does not answer {argv[0]}: {said[0]}")
    return done
