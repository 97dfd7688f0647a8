"""Starts a job's ranks inside its Slurm allocation: the batch script's last line runs this file.

    exec PYTHON .../expkit_slurm/launch.py --backend torchrun --nodes 2 --processes-per-node 4 \\
        --gpus-per-node 4 --log-dir RUN/logs -- python train.py ...

It runs on the allocation's first node, in the job's own python, which need not have expkit:
the standard library only (and horovod, imported for `--backend horovod` alone). Every rank is
started by ONE job step, `srun --kill-on-bad-exit=1 --nodes=N --ntasks-per-node=P
--output=LOGDIR/rank-%t.log`: each rank's stdout and stderr go, as written, to its own file (%t
is the task's global rank; Slurm may append its own "slurmstepd: ... CANCELLED" line), and when a
rank fails, Slurm stops the others. srun's own messages go to this program's stderr, the batch
log, where `first_failure` finds the rank that failed first. Each rank runs under this file's
`--task` mode (`task`): it sets the rank's variables and, when the rank ends, stops what the
rank left running, whether or not the cluster tracks a step's processes with cgroups.

The ranks' environment, per backend (what the training script sees is what it sees under the
local target):

- `none`: one process, nothing added.
- `torchrun`: what torchrun would set: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
  GROUP_RANK and NODE_RANK, MASTER_ADDR (the first node's NodeAddr from `scontrol show node`,
  never DNS) and MASTER_PORT (free on the first node, where rank 0 runs), and
  EXPKIT_DIST_BACKEND (nccl with GPUs, else gloo).
- `horovod`: this program runs horovod's rendezvous server (what horovodrun would) and srun
  starts each rank with the HOROVOD_* variables horovodrun's gloo mode sets.

OMP_NUM_THREADS=1 when a node runs more than one rank and the job did not set it (as torchrun).
EXPKIT_ATTEMPT is the attempt the job was submitted as plus Slurm's restart count
(SLURM_RESTART_COUNT: a requeued job is the run's next attempt).
SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 sent to the batch step are passed on to srun, which
passes them to every rank.

The planned stop of a job with `checkpoints:` (`--stop-signal SIG`): Slurm delivers a signal to
every process of a step, a rank's data loader workers included, which die of SIGUSR1 (or run
the rank's handler). So the stop goes through RELAY (SIGURG, which does nothing by default):
each rank's wrapper (`task`) passes it on as the job's stop signal to its rank's own process
only. The driver sends RELAY to the steps (`scancel --signal=URG JOB`); before the time limit
Slurm sends it to this program (`sbatch --signal=B:URG@N`), which notes the time limit in
`--state-dir` (`time-limit.JOB.RESTART`, read by the driver) and relays it to the steps.
The exit status is the first failed rank's exit code (128 + N for a rank killed by signal N),
else srun's. The meaning of each srun flag used: https://slurm.schedmd.com/srun.html
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

BACKENDS = ("none", "torchrun", "horovod")
RELAY = signal.SIGURG  # see the module's docstring: the planned stop, passed on by `task`

# Set per task (`task`) from Slurm's own numbering: srun sets SLURM_PROCID (the global rank),
# SLURM_LOCALID (the rank on its node), SLURM_NODEID (the node's index in the step) and
# SLURMD_NODENAME (the node's name).
PER_TASK = {
    "none": {},
    "torchrun": {
        "RANK": "SLURM_PROCID",
        "LOCAL_RANK": "SLURM_LOCALID",
        "GROUP_RANK": "SLURM_NODEID",
        "NODE_RANK": "SLURM_NODEID",
        "ROLE_RANK": "SLURM_PROCID",
    },
    "horovod": {
        "HOROVOD_RANK": "SLURM_PROCID",
        "HOROVOD_LOCAL_RANK": "SLURM_LOCALID",
        "HOROVOD_CROSS_RANK": "SLURM_NODEID",
        "HOROVOD_HOSTNAME": "SLURMD_NODENAME",
    },
}
# Seconds a rank's leftover processes get after SIGTERM before SIGKILL (`task`).
LEFTOVER_GRACE = 2.0

# srun's line for a task that failed: `srun: error: NODE: task 3: Exited with exit code 3`,
# `srun: error: NODE: tasks 0-1: Terminated`, `...: Segmentation fault (core dumped)`: the
# signal's strsignal(3) text.
FAILED_TASKS = re.compile(r"^srun: error: (\S+): tasks? ([\d,-]+): (.+?)\s*$", re.M)
EXITED = re.compile(r"Exited with exit code (\d+)")
SIGNALS = {signal.strsignal(number): int(number) for number in signal.Signals}
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


@dataclass(frozen=True)
class Failure:
    """The first rank that failed: its node, its global rank and its exit code (negative -N
    for a rank killed by signal N)."""

    node: str
    rank: int
    exit_code: int

    @property
    def status(self) -> int:
        """As a shell reports it: the exit code, or 128 + N for signal N."""
        return 128 - self.exit_code if self.exit_code < 0 else self.exit_code


def first_failure(text: str) -> Failure | None:
    """The first failed rank srun names in `text` (its messages in the batch log), else None.

    With --kill-on-bad-exit the ranks Slurm stops afterwards are named too (`Terminated`),
    after the one that failed first.
    """
    for match in FAILED_TASKS.finditer(text):
        node, tasks, how = match.groups()
        exited = EXITED.fullmatch(how)
        if exited:
            code = int(exited[1])
        else:
            number = SIGNALS.get(how.removesuffix(" (core dumped)"))
            if number is None:
                continue
            code = -number
        rank = min(int(part.split("-")[0]) for part in tasks.split(",") if part)
        return Failure(node=node, rank=rank, exit_code=code)
    return None


def launcher_argv(
    python: str,
    backend: str,
    nodes: int,
    processes_per_node: int,
    gpus_per_node: int,
    log_dir: Path,
    command: list[str],
    stop_signal: str | None = None,
    state_dir: Path | None = None,
) -> list[str]:
    """The batch script's last command: `python` running this file (by its absolute path, so
    the job's python needs no expkit) to start `command` as nodes x processes_per_node ranks.
    `stop_signal` (`SIGUSR1`, the job's `checkpoints.signal`) is what each rank gets at a
    planned stop, `state_dir` where the time limit's signal is noted (see the docstring).

    Raises ValueError for an unknown backend, for `none` with more than one process, or for a
    log folder with a "%" in its path (srun would read it as a pattern).
    """
    _check(backend, nodes, processes_per_node, gpus_per_node)
    if "%" in str(log_dir):
        raise ValueError(f"{log_dir}: srun reads % in an output path as a pattern; rename it")
    return [
        python,
        str(Path(__file__).resolve()),
        *("--backend", backend, "--nodes", str(nodes)),
        *("--processes-per-node", str(processes_per_node), "--gpus-per-node", str(gpus_per_node)),
        *("--log-dir", str(Path(log_dir).absolute())),
        *(("--stop-signal", stop_signal) if stop_signal else ()),
        *(("--state-dir", str(Path(state_dir).absolute())) if state_dir else ()),
        "--",
        *command,
    ]


def _check(backend: str, nodes: int, processes_per_node: int, gpus_per_node: int) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if nodes < 1 or processes_per_node < 1 or gpus_per_node < 0:
        raise ValueError("nodes and processes_per_node must be at least 1, gpus_per_node >= 0")
    if backend == "none" and nodes * processes_per_node != 1:
        raise ValueError(
            f"backend none runs one process, not {nodes} x {processes_per_node}: "
            "choose torchrun or horovod"
        )


def srun_argv(nodes: int, processes_per_node: int, gpus_per_node: int, log_dir: Path) -> list[str]:
    """The job step that starts every rank (flags as https://slurm.schedmd.com/srun.html)."""
    argv = [
        "srun",
        "--kill-on-bad-exit=1",  # a rank exiting non-zero (or killed) stops the step
        f"--nodes={nodes}",
        f"--ntasks={nodes * processes_per_node}",
        f"--ntasks-per-node={processes_per_node}",
        # Ranks 0..P-1 on the first node, P..2P-1 on the next (as torchrun numbers them), even
        # when the job was submitted with another --distribution.
        "--distribution=block",
        f"--output={log_dir}/rank-%t.log",  # %t: the task id, the rank; stderr goes there too
        "--open-mode=append",  # a requeued job's next attempt adds to its ranks' logs
        "--input=none",
    ]
    if gpus_per_node:
        argv.append(f"--gpus-per-node={gpus_per_node}")
    # Slurm 22.05's srun no longer takes --cpus-per-task from the batch job's environment.
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        argv.append(f"--cpus-per-task={os.environ['SLURM_CPUS_PER_TASK']}")
    return argv


def job_nodes() -> list[str]:
    """The allocation's node names, in Slurm's order (the first runs the batch script)."""
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    ).stdout
    return out.split()


def node_address(node: str) -> str:
    """The node's NodeAddr as Slurm knows it (`scontrol show node`): node names need not
    resolve, and the address is what the daemons use."""
    out = subprocess.run(
        ["scontrol", "show", "node", node], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"\bNodeAddr=(\S+)", out)
    return match[1] if match else node


def free_port() -> int:
    """A TCP port free on this node now (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def interface_of(address: str) -> str | None:
    """The name of this machine's network interface whose IPv4 address is `address`."""
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                request = struct.pack("256s", name.encode()[:15])
                reply = fcntl.ioctl(sock.fileno(), 0x8915, request)  # SIOCGIFADDR
            except OSError:
                continue
        if socket.inet_ntoa(reply[20:24]) == address:
            return name
    return None


def ranks_env(
    backend: str, nodes: list[str], processes_per_node: int, gpus_per_node: int
) -> tuple[dict[str, str], Any]:
    """The variables every rank gets (srun passes this environment on), and for horovod the
    running rendezvous server (stop it when the step ends)."""
    env: dict[str, str] = {}
    if processes_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = "1"
    world = len(nodes) * processes_per_node
    if backend == "torchrun":
        env |= {
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(processes_per_node),
            "ROLE_WORLD_SIZE": str(world),
            "MASTER_ADDR": node_address(nodes[0]),
            "MASTER_PORT": str(free_port()),
            "EXPKIT_DIST_BACKEND": "nccl" if gpus_per_node else "gloo",
        }
        return env, None
    if backend == "horovod":
        from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
        from horovod.runner.http.http_server import RendezvousServer

        address = node_address(nodes[0])
        server = RendezvousServer()
        port = server.start()
        hosts = ",".join(f"{node}:{processes_per_node}" for node in nodes)
        server.init(get_host_assignments(parse_hosts(hosts), world))
        env |= {
            "HOROVOD_GLOO_RENDEZVOUS_ADDR": address,
            "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
            "HOROVOD_CONTROLLER": "gloo",
            "HOROVOD_CPU_OPERATIONS": "gloo",
            "HOROVOD_SIZE": str(world),
            "HOROVOD_LOCAL_SIZE": str(processes_per_node),
            "HOROVOD_CROSS_SIZE": str(len(nodes)),
        }
        iface = interface_of(address)
        if iface:
            env["HOROVOD_GLOO_IFACE"] = iface
        return env, server
    return env, None


def launch(
    backend: str,
    nodes: int,
    processes_per_node: int,
    gpus_per_node: int,
    log_dir: Path,
    command: list[str],
    stop_signal: str | None = None,
    state_dir: Path | None = None,
) -> int:
    """Run `command` as every rank of the allocation with one srun step; return the exit
    status (the first failed rank's, else srun's). The signals in FORWARDED go to srun; with
    `stop_signal`, RELAY from Slurm (the time limit's) is noted in `state_dir` and relayed to
    the ranks (see the module's docstring)."""
    _check(backend, nodes, processes_per_node, gpus_per_node)
    if not log_dir.parent.is_dir():  # the run's folder is not on this node's file systems
        node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
        raise ValueError(
            f"{log_dir.parent} does not exist on node {node}: the workspace must be on a file "
            "system every node mounts at the same path"
        )
    log_dir.mkdir(exist_ok=True)
    names = job_nodes()[:nodes]
    env, server = ranks_env(backend, names, processes_per_node, gpus_per_node)
    env["EXPKIT_ATTEMPT"] = str(attempt())
    argv = srun_argv(nodes, processes_per_node, gpus_per_node, log_dir)
    argv += [sys.executable, str(Path(__file__).resolve()), "--task", backend]
    if stop_signal:
        argv += ["--stop-signal", stop_signal]
        signal.signal(RELAY, lambda number, frame: _time_limit(state_dir))
    argv.append("--")
    # Signals for the batch step (scancel --batch, sbatch --signal=B:USR1@60, the time limit's
    # SIGTERM) are passed to srun, which passes them to every rank; one arriving before srun
    # runs waits for it.
    started: list[subprocess.Popen] = []
    early: list[int] = []

    def forward(number: int, frame: object) -> None:
        if started:
            started[0].send_signal(number)
        else:
            early.append(number)

    for forwarded in FORWARDED:
        signal.signal(forwarded, forward)
    srun = subprocess.Popen(
        [*argv, *command],
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    started.append(srun)
    for received in early:
        srun.send_signal(received)
    messages: list[bytes] = []
    copier = threading.Thread(target=_copy_stderr, args=(srun.stderr, messages), daemon=True)
    copier.start()
    code = srun.wait()
    copier.join()
    if server is not None:
        server.stop()
    failure = first_failure(b"".join(messages).decode(errors="replace"))
    if failure is not None and failure.exit_code != 0:
        return failure.status
    return 128 - code if code < 0 else code


def attempt() -> int:
    """The run's attempt this job is: the one it was submitted as (EXPKIT_ATTEMPT in the
    submitting environment, which sbatch --export=ALL passes on; 1 when unset) plus the
    times Slurm started it again (SLURM_RESTART_COUNT, set from the first restart on)."""
    submitted = os.environ.get("EXPKIT_ATTEMPT", "")
    restarts = os.environ.get("SLURM_RESTART_COUNT", "")
    return (int(submitted) if submitted.isdigit() and int(submitted) >= 1 else 1) + (
        int(restarts) if restarts.isdigit() else 0
    )


def time_limit_mark(state_dir: Path, job_id: str, restarts: int) -> Path:
    """The file that says Slurm's time-limit signal reached the launcher of job `job_id` on
    its start number `restarts` (the driver ends that attempt as `time_limit`)."""
    return state_dir / f"time-limit.{job_id}.{restarts}"


def _time_limit(state_dir: Path | None) -> None:
    """Slurm's signal before the time limit reached this program: note it, then relay the
    planned stop to every rank (`scancel --signal=URG`: the steps, not this program)."""
    job_id = os.environ.get("SLURM_JOB_ID", "")
    restarts = os.environ.get("SLURM_RESTART_COUNT", "")
    print(
        f"launch.py: Slurm's time limit is near: stopping the ranks (job {job_id})", file=sys.stderr
    )
    if state_dir is not None and job_id:
        with contextlib.suppress(OSError):
            mark = time_limit_mark(state_dir, job_id, int(restarts) if restarts.isdigit() else 0)
            mark.write_text(f"{time.time()}\n")
    if job_id:
        threading.Thread(
            target=subprocess.run,
            args=(["scancel", f"--signal={RELAY.name.removeprefix('SIG')}", job_id],),
            kwargs={"stdin": subprocess.DEVNULL},
            daemon=True,
        ).start()


def task(backend: str, command: list[str], stop_signal: str | None = None) -> int:
    """One rank, as srun starts it: `command` with the rank's variables (PER_TASK), in a
    process group of its own (Slurm signals it with the rest of the step). With
    `stop_signal` (`SIGUSR1`), RELAY reaching this process is passed on as `stop_signal` to
    the rank's own process, not its group (a planned stop). When the rank ends,
    what it started in its group and left running is stopped (SIGTERM, then SIGKILL after
    LEFTOVER_GRACE seconds), on clusters that track a step's processes by cgroup and on those
    that do not (proctrack/linuxproc loses a child whose parent exited). Returns the rank's
    exit code; a rank killed by signal N kills this process with N, so that srun reports it
    as Slurm does for any task ("Killed", "Segmentation fault")."""
    env = {**os.environ, **{name: os.environ[slurm] for name, slurm in PER_TASK[backend].items()}}
    # Slurm signals every process of a step itself (scancel, srun passing on a signal: the
    # proctrack plugin's container, a cgroup or the process tree), the rank included: passing
    # a signal on as well would deliver it twice. This process only outlives it, to clean up.
    for forwarded in FORWARDED:
        signal.signal(forwarded, lambda number, frame: None)
    ranks: list[subprocess.Popen] = []
    asked: list[int] = []
    if stop_signal:
        stop = signal.Signals[stop_signal]

        def relay(number: int, frame: object) -> None:
            if ranks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(ranks[0].pid, stop)
            else:
                asked.append(stop)

        signal.signal(RELAY, relay)
    rank = subprocess.Popen(command, env=env, preexec_fn=os.setpgrp)
    ranks.append(rank)
    for number in asked:  # a stop that came while the rank was being started
        os.kill(rank.pid, number)
    code = rank.wait()
    for number, wait in ((signal.SIGTERM, LEFTOVER_GRACE), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(rank.pid, number)
        except ProcessLookupError:
            break  # nothing left in the group
        _wait_group(rank.pid, wait)
    if code >= 0:
        return code
    for forwarded in FORWARDED:
        signal.signal(forwarded, signal.SIG_DFL)
    with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP have no handler
        signal.signal(-code, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the rank dumped its core, if any
    os.kill(os.getpid(), -code)
    return 128 - code  # a signal that does not end a process (SIGCHLD): as a shell says it


def _wait_group(pgid: int, seconds: float) -> None:
    """Wait up to `seconds` for process group `pgid` to be empty."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _copy_stderr(stream: IO[bytes], messages: list[bytes]) -> None:
    """Pass srun's messages to the batch log as they come, keeping them to read afterwards."""
    for line in stream:
        messages.append(line)
        sys.stderr.buffer.write(line)
        sys.stderr.buffer.flush()


def main(argv: list[str] | None = None) -> int:
    """The command line that `launcher_argv` builds; returns the exit status (2: bad input)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--task"]:  # one rank: --task BACKEND [--stop-signal SIG] -- COMMAND...
        if argv[2] == "--stop-signal":
            return task(argv[1], argv[5:], argv[3])
        return task(argv[1], argv[3:])
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--processes-per-node", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--log-dir", type=Path, required=True)
    parser.add_argument("--stop-signal", choices=[s.name for s in signal.Signals])
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    try:
        return launch(
            args.backend,
            args.nodes,
            args.processes_per_node,
            args.gpus_per_node,
            args.log_dir,
            args.command,
            args.stop_signal,
            args.state_dir,
        )
    except ValueError as error:
        print(f"launch.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
