"""The batch job: its #SBATCH directives, the script text, and its submission with sbatch.

`directives` turns the job spec and its `compute.options` into sbatch flags; `script` writes
them into the batch script that `expkit run --dry-run` prints and `submit` hands to
`sbatch --parsable`. A request Slurm refuses (too many nodes or CPUs for the partition, an
unknown partition) is a UserError carrying Slurm's own reason; a controller that does not
answer is a StageFailed. `test_only` asks the same of Slurm without submitting, so the target's
preflight refuses a job that can never start before any run exists.

Every function that calls Slurm takes `env`: the environment its commands run with (the
caller's plus SLURM_CONF), never this process's own implicitly.
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
from collections.abc import Mapping
from pathlib import Path

from expkit.plugin import JobSpec, StageFailed, UserError

# Slurm's time limit is the driver's timeout plus this margin, so the driver's own timeout
# (to the second, with its own message) fires first and Slurm's limit only stops a job whose
# driver is gone.
TIME_MARGIN_MINUTES = 1
# sbatch retries an unreachable controller for about 9 s before it gives up; past this,
# something else is wrong (a hung file system, a stuck munged).
SBATCH_TIMEOUT = 60.0
_NOT_INSTALLED = (
    "compute: {command} is not installed here; run expkit on a machine that can submit "
    "Slurm jobs (a login node)"
)
_UNREACHABLE = "Unable to contact slurm controller"
_NO_CONFIG = "Could not establish a configuration source"
_SET_CONF = "export SLURM_CONF=<your cluster's slurm.conf>"
# The signal Slurm sends the batch script (the launcher, expkit_slurm.launch) before the time
# limit, for a job with `checkpoints:`: the launcher then has each rank's wrapper pass the
# job's stop signal to its rank's own process (see launch.py). SIGURG, whose default action is
# to do nothing, so that no other process of the job is stopped by it.
RELAY_SIGNAL = "URG"
# The longest warning Slurm's --signal takes (sbatch(1): sig_time is 0 to 65535 seconds).
_MAX_SIGNAL_SECONDS = 65535


def time_limit(timeout: float | None, grace: float = 0.0) -> int | None:
    """Slurm's time limit in whole minutes for an attempt of `timeout` seconds whose script
    gets `grace` seconds to checkpoint after it (the job's `checkpoints.grace_seconds`; 0
    without checkpoints): rounded up, plus TIME_MARGIN_MINUTES; None (no limit) for None."""
    if timeout is None:
        return None
    return math.ceil((timeout + grace) / 60) + TIME_MARGIN_MINUTES


def signal_seconds(timeout: float | None, grace: float) -> int:
    """How long before Slurm's time limit Slurm signals the launcher (`--signal=B:URG@N`) for
    an attempt of `timeout` seconds with `grace` seconds to checkpoint: at `timeout` into
    the attempt (when the driver's own timeout would stop it), so that the ranks have their
    grace period and the margin before the limit; `grace` before the limit when the job has
    no `timeout` (the partition's limit). Slurm may send it up to 60 s earlier than asked
    (sbatch(1), --signal)."""
    minutes = time_limit(timeout, grace)
    if minutes is None or timeout is None:
        return min(math.ceil(grace), _MAX_SIGNAL_SECONDS)
    return min(minutes * 60 - math.floor(timeout), _MAX_SIGNAL_SECONDS)


def directives(job: JobSpec, options: Mapping, run_id: str, run_dir: Path) -> list[str]:
    """The sbatch flags of `job`'s batch job, in the order the script shows them: the job's
    name and shape (nodes, processes and GPUs per node, time limit), where it writes and runs
    (`run_dir`'s logs/launcher.log and work/), whether Slurm may start it again (`--requeue`
    when the job's `retry` allows more than one attempt) and, for a job with `checkpoints`,
    the signal before the time limit; then `options` (`compute.options`, checked, with
    defaults filled in) and the user's own `sbatch_args` last."""
    res = job.resources
    flags = [
        f"--job-name=expkit-{run_id}",
        f"--nodes={res.nodes}",
        f"--ntasks-per-node={res.processes_per_node}",
    ]
    extra = list(options.get("sbatch_args") or [])
    if res.gpus_per_node:
        kind = f"{options['gpu_type']}:" if options.get("gpu_type") else ""
        if options.get("gpus", "gpus-per-node") == "gres":
            gres = f"gpu:{kind}{res.gpus_per_node}"
            # The user's other generic resources (--gres=nvme:1) join the GPUs in one flag.
            for arg in [a for a in extra if a.startswith("--gres=")]:
                extra.remove(arg)
                gres += "," + arg.split("=", 1)[1]
            flags.append(f"--gres={gres}")
        else:
            flags.append(f"--gpus-per-node={kind}{res.gpus_per_node}")
    grace = job.checkpoints.grace_seconds if job.checkpoints else 0.0
    minutes = time_limit(job.timeout, grace)
    if minutes is not None:
        flags.append(f"--time={minutes}")
    flags += [
        # Slurm reads %j, %N, ... in --output as patterns: a % of the path is written %%
        f"--output={str(run_dir / 'logs' / 'launcher.log').replace('%', '%%')}",
        "--open-mode=append",  # a requeued job adds to its log
        # With `retry` (more than one attempt), Slurm starts the job again after a preemption,
        # a node failure or `scontrol requeue`, in the same run folder: the driver sees the
        # restart count grow and records the next attempt. Without it a node failure or a
        # preemption ends the run (NODE_FAIL, PREEMPTED) instead of Slurm silently starting
        # the training again (most clusters requeue by default).
        "--requeue" if job.retry.max_attempts > 1 else "--no-requeue",
        f"--chdir={run_dir / 'work'}",
        "--export=ALL",
    ]
    if job.checkpoints is not None:
        # To the batch script only (B:): the launcher relays the job's stop signal to each
        # rank's own process, not to every process of the job (data loader workers).
        flags.append(f"--signal=B:{RELAY_SIGNAL}@{signal_seconds(job.timeout, grace)}")
    for name in ("partition", "account", "qos", "constraint", "mem", "reservation"):
        if options.get(name) is not None:
            flags.append(f"--{name}={options[name]}")
    if options.get("cpus_per_task") is not None:
        flags.append(f"--cpus-per-task={options['cpus_per_task']}")
    return flags + extra


def script(directives: list[str], body: list[str]) -> str:
    """The batch script: one `#SBATCH` line per directive, a comment naming the run, then
    `exec` of `body` (the launcher's argv, shell-quoted), so the launcher is the batch step's
    own process and gets Slurm's signals directly."""
    name = next((d.split("=", 1)[1] for d in directives if d.startswith("--job-name=")), None)
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {shlex.quote(d)}" for d in directives]
    lines += ["", f"# expkit run {name[len('expkit-') :]}" if name else "# expkit run"]
    lines.append(f"exec {shlex.join(body)}")
    return "\n".join(lines) + "\n"


def command_line(script_path: Path) -> list[str]:
    """The exact command `submit` runs for `script_path` (shown by the dry run)."""
    return ["sbatch", "--parsable", str(script_path)]


def submit(script_path: Path, env: Mapping[str, str]) -> str:
    """Submit the batch script at `script_path` and return Slurm's job id.

    Raises UserError with Slurm's reason when Slurm refuses the job (more nodes or CPUs than
    the partition has, an unknown partition, account or QOS), StageFailed when the controller
    does not answer."""
    out = _sbatch(command_line(script_path), env, _directives_of(script_path))
    job_id = out.strip().splitlines()[-1].split(";")[0] if out.strip() else ""
    if not job_id.isdigit():
        raise StageFailed(f"sbatch printed no job id ({out.strip()[:200]!r})")
    return job_id


def test_only(directives: list[str], env: Mapping[str, str]) -> None:
    """Ask Slurm whether it would take a job with these `directives` (`sbatch --test-only`),
    without submitting anything; the same errors as `submit`. The controller is pinged
    first: an unreachable one is said at once instead of after sbatch's retries (about 9 s)."""
    ping(env)
    flags = [d for d in directives if not d.startswith(("--output=", "--chdir=", "--open-mode="))]
    _sbatch(["sbatch", "--test-only", *flags, "--wrap=true"], env, directives)


def ping(env: Mapping[str, str]) -> None:
    """Raise StageFailed unless the controller answers `scontrol ping` (a few ms either way).

    Raises UserError when Slurm has no configuration to read: SLURM_CONF names a file that
    does not exist (checked here: Slurm's commands retry a missing one for 60 s), or neither
    SLURM_CONF, /etc/slurm/slurm.conf nor a configless controller (DNS SRV) gives one."""
    conf = env.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        raise UserError(f"compute: SLURM_CONF is {conf}, which does not exist; {_SET_CONF}")
    try:
        done = subprocess.run(
            ["scontrol", "ping"], env=dict(env), capture_output=True, text=True, timeout=30
        )
    except FileNotFoundError:
        raise UserError(_NOT_INSTALLED.format(command="scontrol")) from None
    except subprocess.TimeoutExpired:
        done = None
    if done is not None and _NO_CONFIG in done.stderr:
        raise UserError(
            "compute: Slurm finds no slurm.conf here (SLURM_CONF is not set, "
            f"/etc/slurm/slurm.conf does not exist, no configless controller); {_SET_CONF}"
        )
    if done is None or done.returncode != 0 or " is UP" not in done.stdout:
        raise StageFailed(f"{controller(env)} does not answer (scontrol ping)")


def _sbatch(argv: list[str], env: Mapping[str, str], flags: list[str]) -> str:
    """Run sbatch; its stdout, or the error its refusal means."""
    try:
        done = subprocess.run(
            argv, env=dict(env), capture_output=True, text=True, timeout=SBATCH_TIMEOUT
        )
    except FileNotFoundError:
        raise UserError(_NOT_INSTALLED.format(command="sbatch")) from None
    except subprocess.TimeoutExpired:
        raise StageFailed(
            f"sbatch did not answer within {SBATCH_TIMEOUT:.0f}s "
            f"({controller(env)} may be overloaded)"
        ) from None
    if done.returncode == 0:
        return done.stdout
    reason = slurm_reason(done.stderr)
    if _UNREACHABLE in done.stderr:
        raise StageFailed(f"{controller(env)} does not answer (scontrol ping)")
    raise UserError(f"compute: Slurm refuses the job: {reason}{_hint(reason, flags, env)}")


def slurm_reason(stderr: str) -> str:
    """Slurm's reason in sbatch's error output, one line without its prefixes: the lines
    `sbatch: error: Batch job submission failed: Node count specification invalid` and
    `allocation failure: ...` (--test-only) give `Node count specification invalid`."""
    reasons: list[str] = []
    for line in stderr.splitlines():
        line = line.strip()
        for prefix in (
            "sbatch: ",
            "error: ",
            "Batch job submission failed: ",
            "allocation failure: ",
        ):
            if line.startswith(prefix):
                line = line[len(prefix) :]
        if not line or line.startswith(('Try "sbatch --help"', "warning: ")):
            continue
        # "invalid partition specified: nope" then "Invalid partition name specified": the
        # second says the first again, less precisely.
        if line.lower().split()[:2] not in [r.lower().split()[:2] for r in reasons]:
            reasons.append(line)
    return "; ".join(reasons) or "sbatch failed without saying why"


def _hint(reason: str, flags: list[str], env: Mapping[str, str]) -> str:
    """What the partition has, for a reason about nodes, CPUs or the partition itself: cheap
    (one `scontrol show partition`), and what the user needs to fix the job."""
    low = reason.lower()
    if not any(
        word in low for word in ("node count", "processors", "invalid partition", "time limit")
    ):
        return ""
    wanted = next((f.split("=", 1)[1] for f in flags if f.startswith("--partition=")), None)
    parts = partitions(env)
    if not parts:
        return ""
    if "invalid partition" in low:
        return f" (partitions: {', '.join(sorted(parts))})"
    name = (
        wanted.split(",")[0] if wanted else next((n for n, p in parts.items() if p["default"]), "")
    )
    part = parts.get(name or "")
    if part is None:
        return ""
    if "time limit" in low:
        asked = next((f.split("=", 1)[1] for f in flags if f.startswith("--time=")), None)
        if asked is None or part["max_time"] == "UNLIMITED":
            return ""
        return (
            f" (partition {name} allows {part['max_time']}; the job asks --time={asked} "
            f"minutes: its `timeout` rounded up to minutes, plus {TIME_MARGIN_MINUTES} so that "
            "expkit's own timeout comes first)"
        )
    if "node count" in low:
        count = part["nodes"]
        return f" (partition {name} has {count} node{'s' if count != 1 else ''})"
    return f" (partition {name} has {part['cpus']} CPUs on {part['nodes']} node(s))"


def partitions(env: Mapping[str, str]) -> dict[str, dict]:
    """The cluster's partitions by name, each with `nodes`, `cpus`, `default` and `max_time`
    (Slurm's MaxTime as it writes it: `00:10:00`, `1-00:00:00`, `UNLIMITED`), from
    `scontrol show partition -o`; empty when Slurm does not say."""
    try:
        done = subprocess.run(
            ["scontrol", "show", "partition", "-o"],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=SBATCH_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found = {}
    for line in done.stdout.splitlines():
        fields = dict(re.findall(r"(\S+?)=(\S*)", line))
        if "PartitionName" in fields:
            found[fields["PartitionName"]] = {
                "nodes": int(fields.get("TotalNodes", "0") or 0),
                "cpus": int(fields.get("TotalCPUs", "0") or 0),
                "default": fields.get("Default") == "YES",
                "max_time": fields.get("MaxTime", "UNLIMITED"),
            }
    return found


def controller(env: Mapping[str, str]) -> str:
    """The controller as a message names it, `slurmctld at localhost:6817`, read from the
    slurm.conf that SLURM_CONF (or /etc/slurm/slurm.conf) names: no daemon is asked, since
    this is for when none answers."""
    path = Path(env.get("SLURM_CONF") or "/etc/slurm/slurm.conf")
    host, port = None, "6817"
    try:
        text = path.read_text()
    except OSError:
        return "the Slurm controller"
    for line in text.splitlines():
        key, _, value = line.split("#", 1)[0].strip().partition("=")
        key = key.strip().lower()
        if key in ("slurmctldhost", "controlmachine") and host is None:
            host = value.strip().split("(", 1)[0]
        elif key == "slurmctldport":
            port = value.strip()
    return f"slurmctld at {host}:{port}" if host else "the Slurm controller"


def _directives_of(script_path: Path) -> list[str]:
    """The #SBATCH flags written in the script at `script_path`."""
    try:
        lines = script_path.read_text().splitlines()
    except OSError:
        return []
    return [
        shlex.split(line[len("#SBATCH ") :])[0]
        for line in lines
        if line.startswith("#SBATCH ") and line[len("#SBATCH ") :].strip()
    ]
