"""`expkit ui`: MLflow's UI on the workspace's MLflow store, on this machine.

It runs `mlflow server` (the UI and its REST API; `mlflow ui` is the same command) on the store
the `mlflow` sink writes to when a job gives it no options: config.json's
`mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI, else `mlflow.db` in the workspace (see
`expkit_mlflow.tracking.resolve`), with the workspace's `mlartifacts/` as the default artifact
root, so that a run's artifacts and models open from its page (each experiment keeps its own
artifact location, which the server reads directly). The server is a child process group of
its own: Ctrl-C, SIGTERM or SIGHUP here stop all of it, and it also gets SIGTERM if this
process dies. Its own lines (uvicorn's requests, MLflow's notices) go to `mlflow-ui.log` in
the workspace, not to the terminal.

`--tensorboard` also starts TensorBoard on the workspace's `runs/` (each run's event files,
`runs/<id>/tensorboard/`, are one run there), stopped with it, its lines in
`tensorboard-ui.log`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from expkit.cli.common import described

if TYPE_CHECKING:  # imported where used: `expkit --help` imports this module too
    import subprocess

DEFAULT_PORT = 5000  # `mlflow server`'s own default, and the one run links assume
LOG = "mlflow-ui.log"  # in the workspace
TENSORBOARD_PORT = 6006  # TensorBoard's own default
TENSORBOARD_LOG = "tensorboard-ui.log"  # in the workspace
# What uvicorn (MLflow's server) and TensorBoard print once they listen on their port.
LISTENING = "(Press CTRL+C to quit)"
START_TIMEOUT = 180.0  # seconds for the server to answer: mlflow imports slowly on a busy host
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL of the server's processes


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `ui`."""
    ui = commands.add_parser(
        "ui",
        help="MLflow's UI on the workspace's MLflow store (127.0.0.1:5000)",
        **described(
            "Start MLflow's UI (`mlflow server`) on the workspace's MLflow store: the one the "
            "`mlflow` sink and registry write to without options (config.json's "
            "mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else mlflow.db in the "
            "workspace). Prints the address once it answers; Ctrl-C stops it. The run links "
            "in the run summary and `expkit runs show` point at the default address. A "
            "tracking server (http://...) has a UI of its own: open its address instead. "
            "--tensorboard also starts TensorBoard on every run's event files.",
            "expkit ui",
            "expkit ui --port 5001 --tensorboard",
        ),
    )
    ui.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})"
    )
    ui.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    ui.add_argument(
        "--tensorboard",
        action="store_true",
        help=f"also TensorBoard on the runs' event files (port {TENSORBOARD_PORT})",
    )
    ui.add_argument(
        "--tensorboard-port",
        type=int,
        default=TENSORBOARD_PORT,
        metavar="PORT",
        help=f"TensorBoard's port with --tensorboard (default {TENSORBOARD_PORT})",
    )
    ui.set_defaults(handler=cmd_ui)


class Server(NamedTuple):
    """A UI server this command started: its name, process (a group of its own), address,
    and log file."""

    name: str
    process: subprocess.Popen[bytes]
    address: str
    log: Path


def cmd_ui(args: argparse.Namespace) -> int:
    """Start the server(s), print each address once it answers, and wait; Ctrl-C, SIGTERM
    or SIGHUP stop them and every process they started (exit 0). UserError (exit 2) when
    there is nothing to serve, mlflow (or tensorboard) is missing, or a port is taken; a
    server that dies on its own is exit 1, with the last line of its log."""
    from expkit.cli.common import open_workspace
    from expkit.interrupts import like_ctrl_c

    workspace = open_workspace(args)
    store, artifacts = workspace_store(workspace)
    check_can_serve(store, args.host, args.port)
    if args.tensorboard:
        check_tensorboard(args.host, args.tensorboard_port, args.port)
    log = workspace.path / LOG
    holder = hold_log(log)
    servers: list[Server] = []
    # SIGTERM and SIGHUP as Ctrl-C; a second signal while the servers stop is only noted.
    with like_ctrl_c():
        try:
            print(f"starting MLflow's UI on {store} (its log: {log})", flush=True)
            servers.append(start_mlflow(store, artifacts, args.host, args.port, holder))
            if args.tensorboard:
                runs, log = workspace.path / "runs", workspace.path / TENSORBOARD_LOG
                print(f"starting TensorBoard on {runs} (its log: {log})", flush=True)
                servers.append(start_tensorboard(runs, args.host, args.tensorboard_port, log))
            for server in servers:
                wait_until_answering(server)
                print(f"{server.name}: {server.address}  (Ctrl-C stops it)", flush=True)
            if args.port != DEFAULT_PORT:
                print(f"(run links name port {DEFAULT_PORT}: use port {args.port} instead)")
            while all(server.process.poll() is None for server in servers):
                time.sleep(0.5)
            gone = next(server for server in servers if server.process.poll() is not None)
            print(
                f"expkit: error: {gone.name} stopped on its own (exit code "
                f"{gone.process.returncode}): {last_line(gone.log)}",
                file=sys.stderr,
            )
            return 1
        except KeyboardInterrupt:
            for server in servers:
                stop_server(server.process)
            if servers:
                print("stopped the " + " and ".join(server.name for server in servers))
            servers = []
            return 0
        finally:
            for server in servers:
                stop_server(server.process)
            holder.close()  # the lock with it


def hold_log(log: Path) -> BinaryIO:
    """The MLflow server's log, emptied and locked (flock) for as long as this command and
    its server run: one `expkit ui` per workspace, and a log that only its server writes
    to. UserError when another `expkit ui` holds it."""
    import fcntl

    from expkit.errors import UserError

    holder = open(log, "ab")  # noqa: SIM115 - held until the command ends
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder.close()
        raise UserError(
            f"another `expkit ui` serves this workspace (its log: {log}): open its address, "
            "or stop it first"
        ) from None
    holder.truncate(0)
    return holder


def workspace_store(workspace: Any) -> tuple[str, str | None]:
    """(tracking URI, default artifact root) of the workspace's MLflow store, resolved as
    the `mlflow` sink resolves it for a job that gives no options."""
    from expkit.services import plugin_config

    config = plugin_config(workspace)("mlflow")
    uri = config.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    default_root = (workspace.path / "mlartifacts").as_uri()
    if uri:
        return str(uri), str(config.get("artifact_location") or default_root)
    return f"sqlite:///{workspace.path / 'mlflow.db'}", default_root


def check_can_serve(store: str, host: str, port: int) -> None:
    """UserError with one line saying what to do when the UI cannot start: a store that is
    a server or a service (it has its own UI), a SQLite store not made yet, mlflow not
    installed in this interpreter, or the port taken."""
    import importlib.util

    from expkit.errors import UserError

    if store.startswith(("http://", "https://")):
        raise UserError(
            f"the workspace's MLflow store is the tracking server {store}: open that address "
            "in a browser (`expkit ui` serves a store on this machine)"
        )
    if not store.startswith(("sqlite:", "file:", "/", ".")):
        raise UserError(
            f"the workspace's MLflow store is {store}, not on this machine: use its own UI "
            "(`expkit ui` serves a store on this machine)"
        )
    if store.startswith("sqlite:///"):
        database = Path(store[len("sqlite:///") :].split("?", 1)[0])
        if not database.is_file():
            raise UserError(
                f"no MLflow store yet ({database} does not exist): run a job with "
                "`metrics: [mlflow]` or `model.registries: [mlflow]` first"
            )
    if importlib.util.find_spec("mlflow") is None:
        raise UserError(
            f"mlflow is not installed in {sys.executable}; pip install 'expkit[mlflow]'"
        )
    check_port(host, port, "--port")


def check_tensorboard(host: str, port: int, mlflow_port: int) -> None:
    """UserError when TensorBoard cannot start: not installed, or its port taken."""
    import importlib.util

    from expkit.errors import UserError

    if importlib.util.find_spec("tensorboard") is None:
        raise UserError(
            f"tensorboard is not installed in {sys.executable}; pip install "
            "'expkit[tensorboard]' (or leave out --tensorboard)"
        )
    if port == mlflow_port:
        raise UserError(f"--tensorboard-port {port}: MLflow's UI takes that port; choose another")
    check_port(host, port, "--tensorboard-port")


def check_port(host: str, port: int, option: str) -> None:
    """UserError when `port` is not a port number or cannot be listened on at `host`."""
    import socket

    from expkit.errors import UserError

    if not 0 < port < 65536:
        raise UserError(f"{option} {port}: not a port number (1 to 65535)")
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(
                f"cannot listen on {host}:{port} ({error.strerror}): choose another port, "
                f"e.g. `expkit ui {option} {port + 1}`"
            ) from None


def start_mlflow(store: str, artifacts: str | None, host: str, port: int, log: BinaryIO) -> Server:
    """`python -m mlflow server` on `store`, one worker. MLflow's background job runner is
    off unless the user turned it on: a UI for one workspace has no use for it."""
    command = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", store),
        *(("--default-artifact-root", artifacts) if artifacts else ()),
        *("--host", host, "--port", str(port), "--workers", "1"),
    ]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    process = _start(command, env, log)
    return Server("MLflow UI", process, f"http://{host}:{port}", Path(log.name))


def start_tensorboard(runs: Path, host: str, port: int, log: Path) -> Server:
    """TensorBoard on every run's event files (`runs/<id>/tensorboard/`: one run each)."""
    command = [
        *(sys.executable, "-m", "tensorboard.main", "--logdir", str(runs)),
        *("--host", host, "--port", str(port)),
    ]
    with open(log, "wb") as out:
        process = _start(command, dict(os.environ), out)
    return Server("TensorBoard", process, f"http://{host}:{port}", log)


def _start(command: list[str], env: dict[str, str], log: BinaryIO) -> subprocess.Popen[bytes]:
    """`command` in a session of its own (a Ctrl-C in the terminal reaches this process,
    which stops it), that gets SIGTERM when this process dies; its output goes to `log`."""
    import signal
    import subprocess

    from expkit.procs import die_with_parent

    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: die_with_parent(signal.SIGTERM),
    )


def wait_until_answering(server: Server) -> None:
    """Return once the server says in its log that it listens (LISTENING: uvicorn's and
    TensorBoard's line, so that another server that took the port meanwhile is not taken
    for this one) and answers 200 at its address; UserError when it exits first (naming
    the error in its log) or does not answer within START_TIMEOUT seconds."""
    import urllib.request

    from expkit.errors import UserError

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        code = server.process.poll()
        if code is not None:
            raise UserError(
                f"{server.name} did not start (exit code {code}): {last_line(server.log)}"
            )
        try:
            listening = LISTENING in server.log.read_text(errors="replace")
            if listening:
                with urllib.request.urlopen(server.address, timeout=2) as answer:
                    if answer.status == 200:
                        return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise UserError(
                f"{server.name} did not answer at {server.address} within "
                f"{START_TIMEOUT:.0f}s; its log: {server.log}"
            )
        time.sleep(0.25)


def stop_server(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after STOP_GRACE
    seconds; returns once none of its processes is left."""
    import signal

    from expkit.procs import group_alive

    group = server.pid
    _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline:
        if server.poll() is not None and not group_alive(group):
            return
        time.sleep(0.05)
    _signal_group(group, signal.SIGKILL)
    server.wait()
    while group_alive(group):  # killed: the kernel takes them away at once
        time.sleep(0.05)


def _signal_group(group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, sig)


def last_line(log_path: Path) -> str:
    """The server's error from its log: its last line that names an error (e.g. uvicorn's
    "[Errno 98] ... address already in use"), else its last line, else where the log is."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()]
    except OSError:
        lines = []
    errors = [line for line in lines if "error" in line.lower()]
    found = (errors or [line for line in lines if line] or [""])[-1]
    return found or f"see {log_path}"
