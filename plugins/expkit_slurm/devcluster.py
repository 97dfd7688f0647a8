"""A private Slurm cluster in a folder: for trying the `slurm` target and for its tests.

    python -m expkit_slurm.devcluster start DIR [--nodes 2]   # prints: export SLURM_CONF=...
    python -m expkit_slurm.devcluster status DIR
    python -m expkit_slurm.devcluster stop DIR

`start` runs munged (with its own key and socket), slurmctld and one slurmd per simulated node
as foreground child processes of a small supervisor that keeps running in the background; `stop`
drains the queue, shuts the cluster down and waits for every daemon. Everything lives in DIR:

    DIR/etc/slurm.conf   DIR/munge/   DIR/state/   DIR/spool/<node>/   DIR/log/   DIR/run/
    DIR/devcluster.json (the supervisor's pid, while it runs)   DIR/supervisor.log

The nodes are named n1, n2, ...; all are this machine (NodeAddr 127.0.0.1), each with its own
slurmd port, `cpus_per_node` CPUs and `memory_mb` MB (what the node *says* it has:
`SlurmdParameters=config_overrides` lets a node claim more than the machine). Two partitions:
`debug` (every node, the default) and `small` (the first node only, at most 10 minutes), so that
the choice of partition visibly matters. `EnforcePartLimits=ALL` makes a request a partition can
never satisfy fail at submit instead of pending forever. A batch job starts within about a second
of its submission (`batch_sched_delay=0`; Slurm's default waits up to 3 s), and a requeued one
starts again about 6 s after `scontrol requeue` (`cred_expire=5`, `sched_interval=1`; with
Slurm's defaults, 120 s plus up to a minute).

What it needs: Slurm's daemons and munge (as root: `bash .ci/install`, which runs
`apt-get install slurmctld slurmd slurm-client munge`). Not root: any user can start one (checked
as `nobody`); SlurmUser and SlurmdUser are whoever starts it, and its jobs run as that user.
munged insists that the folder of its socket and every folder above it are searchable by all
(o+x): DIR itself is made so (it belongs to the cluster); a parent that is not is an error naming
it (a user's folder is never chmod-ed).
Ports are picked free at start; the daemons listen on every address (Slurm has no loopback-only
setting) but only talk to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

INSTALL = "bash .ci/install (as root; it runs apt-get install slurmctld slurmd slurm-client munge)"
DAEMONS = ("munged", "slurmctld", "slurmd")
SBIN = ("/usr/sbin", "/sbin")
STATE_FILE = "devcluster.json"  # written by the CLI's supervisor: its pid, the nodes, the conf


class DevClusterError(RuntimeError):
    """The cluster could not be started or stopped; the message says why (and shows logs)."""


def _search_path() -> str:
    """PATH and the sbin folders, where the daemons are (not on most users' PATH)."""
    return os.pathsep.join([os.environ.get("PATH", ""), *SBIN])


def missing_programs() -> list[str]:
    """The Slurm and munge programs this module needs that are not installed."""
    search = _search_path()
    needed = (*DAEMONS, "scontrol", "sinfo", "squeue", "scancel", "sbatch", "srun")
    return [name for name in needed if shutil.which(name, path=search) is None]


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def check_parents(folder: Path) -> None:
    """Raise DevClusterError unless every existing folder above `folder` is searchable by all
    (munged refuses a socket below one that is not; we never change a user's folder)."""
    for parent in Path(folder).absolute().parents:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            raise DevClusterError(
                f"{folder}: munged needs every folder above its socket to be searchable by "
                f"all, and {parent} is not (mode {stat.S_IMODE(parent.stat().st_mode):o}); "
                "pick a folder whose parents are, e.g. one under /tmp"
            )


def _program(name: str) -> str:
    found = shutil.which(name, path=_search_path())
    if found is None:
        raise DevClusterError(f"`{name}` is not installed; install Slurm with: {INSTALL}")
    return found


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"\n--- {path} (last {len(text)} lines) ---\n" + "\n".join(text)


class DevCluster:
    """A Slurm cluster of `nodes` simulated nodes on this machine, kept entirely in `folder`.

    `start()` brings it up (the daemons are this process's children), `stop()` takes it down;
    it is also a context manager. Every Slurm command must run with `env` added to its
    environment (SLURM_CONF names this cluster's slurm.conf).
    """

    def __init__(
        self, folder: Path, nodes: int = 1, cpus_per_node: int = 2, memory_mb: int = 2048
    ) -> None:
        if nodes < 1 or cpus_per_node < 1 or memory_mb < 1:
            raise ValueError("nodes, cpus_per_node and memory_mb must be at least 1")
        self.folder = Path(folder).absolute()
        self.nodes, self.cpus_per_node, self.memory_mb = nodes, cpus_per_node, memory_mb
        self.conf = self.folder / "etc" / "slurm.conf"
        self.node_names = [f"n{i}" for i in range(1, nodes + 1)]
        self.env = {"SLURM_CONF": str(self.conf)}
        self._children: dict[str, subprocess.Popen] = {}

    # -- layout -------------------------------------------------------------------------------
    @property
    def munge_socket(self) -> Path:
        """The socket of this cluster's own munged (AuthInfo=socket=... in slurm.conf)."""
        return self.folder / "munge" / "munge.socket"

    def _prepare_folder(self) -> None:
        """A fresh cluster folder: new state, key and configuration; old logs are kept."""
        check_parents(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o755)
        for old in ("state", "spool", "run", "munge"):
            shutil.rmtree(self.folder / old, ignore_errors=True)
        for sub in ("etc", "state", "spool", "run", "log", "munge"):
            (self.folder / sub).mkdir(mode=0o755, exist_ok=True)
            (self.folder / sub).chmod(0o755)
        key = self.folder / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(128))
        key.chmod(0o600)
        self.conf.write_text(self._slurm_conf())

    def _slurm_conf(self) -> str:
        d, user = self.folder, pwd.getpwuid(os.getuid()).pw_name
        nodes = "\n".join(
            f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={free_port()} "
            f"CPUs={self.cpus_per_node} RealMemory={self.memory_mb} State=UNKNOWN"
            for name in self.node_names
        )
        return f"""\
# A private development cluster made by expkit_slurm.devcluster; rewritten at every start.
ClusterName=expkit
SlurmctldHost=localhost(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job (`scontrol requeue`, a preemption) is held that long (+1 s) before
# it may start again (Slurm's default 120 s); it is also how long a step's credential is good
# for, which needs well under a second here.
AuthInfo=socket={d}/munge/munge.socket,cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmdParameters=config_overrides
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule a submitted batch job at the next pass (about 1 s) rather than up to 3 s later, and
# try the whole queue every second (default 60 s): a requeued job whose hold (cred_expire)
# ends is started by that pass, nothing else wakes the scheduler for it.
SchedulerParameters=batch_sched_delay=0,sched_interval=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/log/jobcomp.txt
MpiDefault=none
ReturnToService=2
EnforcePartLimits=ALL
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=small Nodes={self.node_names[0]} MaxTime=10 State=UP
"""

    # -- commands -----------------------------------------------------------------------------
    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm command against this cluster; its output as text (never raises on exit
        status; `timeout` in seconds)."""
        return subprocess.run(
            argv,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        out = open(self.folder / "log" / f"{name}.out", "ab")  # noqa: SIM115 (kept by the child)
        with out:
            self._children[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env, **(env or {})},
            )

    def _failure(self, what: str) -> DevClusterError:
        logs = ["munge/munged.log", "log/munged.out", "log/slurmctld.log", "log/slurmctld.out"]
        logs += [f"log/slurmd-{n}.log" for n in self.node_names]
        logs += [f"log/slurmd-{n}.out" for n in self.node_names]
        tails = "".join(_tail(self.folder / log) for log in logs if (self.folder / log).exists())
        return DevClusterError(f"{self.folder}: {what}{tails}")

    def _check_children(self) -> None:
        for name, child in self._children.items():
            if child.poll() is not None:
                raise self._failure(f"{name} exited with status {child.returncode}")

    def _wait(self, ready: Callable[[], bool], deadline: float, timeout: float) -> None:
        while not ready():
            self._check_children()
            if time.monotonic() > deadline:
                raise self._failure(f"the cluster was not up within {timeout} s")
            time.sleep(0.02)

    def _nodes_idle(self) -> bool:
        result = self.run("sinfo", "-h", "-N", "-o", "%N %T")
        states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
        return all(states.get(node) == "idle" for node in self.node_names)

    # -- start and stop -----------------------------------------------------------------------
    def start(self, timeout: float = 30) -> None:
        """Start munged, slurmctld and the slurmds; return when every node is idle.

        Raises DevClusterError (a RuntimeError) with the daemons' log tails when a daemon exits
        or the cluster is not up within `timeout` seconds; the daemons already started are
        stopped first.
        """
        programs = {name: _program(name) for name in DAEMONS}
        self._prepare_folder()
        m = self.folder / "munge"
        try:
            self._spawn(
                "munged",
                [
                    programs["munged"],
                    "--foreground",
                    "--force",
                    f"--socket={self.munge_socket}",
                    f"--key-file={m}/munge.key",
                    f"--log-file={m}/munged.log",
                    f"--pid-file={m}/munged.pid",
                    f"--seed-file={m}/munged.seed",
                ],
            )
            deadline = time.monotonic() + timeout
            self._wait(self.munge_socket.exists, deadline, timeout)
            self._spawn("slurmctld", [programs["slurmctld"], "-D", "-i"])
            # slurmds started before the controller answers retry their registration a second
            # later: start them once it does.
            self._wait(lambda: self.run("scontrol", "ping").returncode == 0, deadline, timeout)
            for node in self.node_names:
                self._spawn(f"slurmd-{node}", [programs["slurmd"], "-D", "-N", node])
            self._wait(self._nodes_idle, deadline, timeout)
        except BaseException:
            self.stop()
            raise

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job of the cluster and wait until the queue is empty (`timeout` s)."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.run("squeue", "-h", "-o", "%i").stdout.split()
            if not jobs:
                return
            if time.monotonic() > deadline:
                raise DevClusterError(f"jobs {' '.join(jobs)} still in the queue after {timeout} s")
            self.run("scancel", *jobs)
            time.sleep(0.1)

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, shut the daemons down and wait for them (SIGKILL for a daemon of
        this cluster still there after `timeout` seconds). Safe to call twice."""
        slurm = [name for name in self._children if name != "munged"]
        if any(self._children[name].poll() is None for name in slurm):
            with contextlib.suppress(DevClusterError, subprocess.TimeoutExpired):
                if self.run("scontrol", "ping", timeout=5).returncode == 0:
                    self.cancel_all(timeout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.run("scontrol", "shutdown", timeout=5)
        deadline = time.monotonic() + timeout
        for name in [*slurm, "munged"]:
            child = self._children.get(name)
            if child is None:
                continue
            if name == "munged" and child.poll() is None:
                child.terminate()
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self._children.clear()

    def __enter__(self) -> DevCluster:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


# -- the command line ------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _running(folder: Path) -> dict | None:
    """The supervisor's state file of a cluster running in `folder`, else None."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if _pid_alive(state["pid"]) else None


def _supervise(folder: Path, nodes: int, ready_fd: int) -> int:
    """The background process of `start`: run the cluster until SIGTERM, then stop it.
    Writes "ok" or the error to `ready_fd`."""
    stopping = False

    def on_signal(number: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cluster = DevCluster(folder, nodes=nodes)
    with os.fdopen(ready_fd, "w") as ready:
        try:
            cluster.start()
        except DevClusterError as error:
            ready.write(str(error))
            return 1
        state = {"pid": os.getpid(), "nodes": cluster.node_names, "conf": str(cluster.conf)}
        (folder / STATE_FILE).write_text(json.dumps(state) + "\n")
        ready.write("ok")
    try:
        while not stopping:
            time.sleep(0.2)
    finally:
        cluster.stop()
        (folder / STATE_FILE).unlink(missing_ok=True)
    return 0


def _start(folder: Path, nodes: int) -> int:
    if _running(folder):
        return _error(f"{folder}: a cluster is already running there; stop it first")
    if folder.exists() and not folder.is_dir():
        return _error(f"{folder}: not a folder")
    if folder.exists() and any(folder.iterdir()) and not (folder / "etc" / "slurm.conf").exists():
        return _error(f"{folder}: not empty and not a dev cluster's folder; pick a new folder")
    missing = missing_programs()
    if missing:
        return _error(f"Slurm is not installed ({', '.join(missing)} missing): run {INSTALL}")
    try:
        check_parents(folder)
    except DevClusterError as error:
        return _error(str(error))
    read_fd, write_fd = os.pipe()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "supervisor.log", "ab") as log:
        argv = [sys.executable, "-m", "expkit_slurm.devcluster", "_supervise", str(folder)]
        subprocess.Popen(
            [*argv, "--nodes", str(nodes), "--ready-fd", str(write_fd)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    os.close(write_fd)
    with os.fdopen(read_fd) as ready:
        answer = ready.read()
    if answer != "ok":
        detail = answer or _tail(folder / "supervisor.log") or "no message"
        print(f"devcluster: error: the cluster did not start: {detail}", file=sys.stderr)
        return 1
    print(f"export SLURM_CONF={folder / 'etc' / 'slurm.conf'}")
    return 0


def _stop(folder: Path, timeout: float = 60) -> int:
    state = _running(folder)
    if state is None:
        return _error(f"{folder}: no cluster is running there")
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(state["pid"]):
        if time.monotonic() > deadline:
            return _error(f"{folder}: the cluster did not stop within {timeout} s")
        time.sleep(0.05)
    print(f"stopped the cluster in {folder}")
    return 0


def _status(folder: Path) -> int:
    state = _running(folder)
    if state is None:
        print(f"{folder}: not running")
        return 1
    ping = subprocess.run(
        ["scontrol", "ping"],
        env={**os.environ, "SLURM_CONF": state["conf"]},
        capture_output=True,
        check=False,
    )
    if ping.returncode != 0:
        print(f"{folder}: the supervisor (pid {state['pid']}) runs but slurmctld does not answer")
        return 1
    print(f"{folder}: running (supervisor pid {state['pid']}), nodes {' '.join(state['nodes'])}")
    print(f"export SLURM_CONF={state['conf']}")
    return 0


def _error(message: str) -> int:
    print(f"devcluster: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """`python -m expkit_slurm.devcluster start|stop|status DIR`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m expkit_slurm.devcluster",
        description="A private Slurm cluster in DIR (munged, slurmctld, one slurmd per node).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start a cluster in DIR and print SLURM_CONF")
    start.add_argument("folder", metavar="DIR", type=Path)
    start.add_argument("--nodes", type=int, default=1, help="simulated nodes (default 1)")
    for name, text in (("stop", "stop the cluster in DIR"), ("status", "is it running?")):
        commands.add_parser(name, help=text).add_argument("folder", metavar="DIR", type=Path)
    supervise = commands.add_parser("_supervise")
    supervise.add_argument("folder", type=Path)
    supervise.add_argument("--nodes", type=int, required=True)
    supervise.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args(argv)
    folder = args.folder.absolute()
    if args.command == "start":
        if not 1 <= args.nodes <= 64:
            return _error(f"--nodes {args.nodes}: give 1 to 64 nodes")
        return _start(folder, args.nodes)
    if args.command == "stop":
        return _stop(folder)
    if args.command == "status":
        return _status(folder)
    return _supervise(folder, args.nodes, args.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
