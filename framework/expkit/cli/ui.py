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
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_PORT = 5000  # `mlflow server`'s own default, and the one run links assume
LOG = "mlflow-ui.log"  # in the workspace
START_TIMEOUT = 180.0  # seconds for the server to answer: mlflow imports slowly on a busy host
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL of the server's processes


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `ui`."""
    ui = commands.add_parser(
        "ui",
        help="MLflow's UI on the workspace's MLflow store (127.0.0.1:5000)",
        description="Start MLflow's UI (`mlflow server`) on the workspace's MLflow store: "
        "the one the `mlflow` sink and registry write to without options (config.json's "
        "mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else mlflow.db in the workspace). "
        "Prints the address once it answers; Ctrl-C stops it. The run links in the run "
        "summary and `expkit runs show` point at the default address. A tracking server "
        "(http://...) has a UI of its own: open its address instead.",
        epilog="example: expkit ui --port 5001 (then open http://127.0.0.1:5001)",
    )
    ui.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})"
    )
    ui.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    ui.set_defaults(handler=cmd_ui)


class _Stop(Exception):
    """SIGTERM or SIGHUP arrived: stop the server as Ctrl-C does."""


def cmd_ui(args: argparse.Namespace) -> int:
    """Start the server, print its address once it answers, and wait; Ctrl-C, SIGTERM or
    SIGHUP stop it and every process it started (exit 0). UserError (exit 2) when there is
    nothing to serve, mlflow is missing, or the port is taken; the server dying on its own
    is exit 1 with the last line of its log."""
    from expkit.cli.common import open_workspace
    from expkit.errors import UserError

    workspace = open_workspace(args)
    store, artifacts = workspace_store(workspace)
    check_can_serve(store, args.host, args.port)
    log_path = workspace.path / LOG
    address = f"http://{args.host}:{args.port}"
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    server = None
    try:
        print(f"starting MLflow's UI on {store} (its log: {log_path})", flush=True)
        with open(log_path, "wb") as log:
            server = start_server(store, artifacts, args.host, args.port, log)
            wait_until_answering(server, address, log_path)
            print(f"MLflow UI: {address}  (Ctrl-C stops it)", flush=True)
            code = server.wait()
        raise UserError(
            f"MLflow's server stopped on its own (exit code {code}): {last_line(log_path)}"
        )
    except (KeyboardInterrupt, _Stop):
        if server is not None:
            stop_server(server)
        print("stopped the MLflow UI")
        return 0
    finally:
        if server is not None and server.poll() is None:
            stop_server(server)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop


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
    import socket

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
    if not 0 < port < 65536:
        raise UserError(f"--port {port}: not a port number (1 to 65535)")
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(
                f"cannot listen on {host}:{port} ({error.strerror}): choose another port, "
                f"e.g. `expkit ui --port {port + 1}`"
            ) from None


def start_server(
    store: str, artifacts: str | None, host: str, port: int, log: Any
) -> subprocess.Popen[bytes]:
    """`python -m mlflow server` on `store`, one worker, in a session of its own (a Ctrl-C in
    the terminal reaches this process, which stops it) that gets SIGTERM when this process
    dies; its output goes to `log`. MLflow's background job runner is off unless the user
    turned it on: a UI for one workspace has no use for it."""
    from expkit.procs import die_with_parent

    command = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", store),
        *(("--default-artifact-root", artifacts) if artifacts else ()),
        *("--host", host, "--port", str(port), "--workers", "1"),
    ]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: die_with_parent(signal.SIGTERM),
    )


def wait_until_answering(server: subprocess.Popen[bytes], address: str, log_path: Path) -> None:
    """Return once `address`/health answers 200; UserError when the server exits first
    (naming the last line of its log) or does not answer within START_TIMEOUT seconds."""
    import urllib.request

    from expkit.errors import UserError

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        code = server.poll()
        if code is not None:
            raise UserError(
                f"MLflow's server did not start (exit code {code}): {last_line(log_path)}"
            )
        try:
            with urllib.request.urlopen(f"{address}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise UserError(
                f"MLflow's server did not answer at {address} within {START_TIMEOUT:.0f}s; "
                f"its log: {log_path}"
            )
        time.sleep(0.25)


def stop_server(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after STOP_GRACE
    seconds; returns once none of its processes is left."""
    group = server.pid
    _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline:
        if server.poll() is not None and not _group_alive(group):
            return
        time.sleep(0.05)
    _signal_group(group, signal.SIGKILL)
    server.wait()
    while _group_alive(group):  # killed: the kernel takes them away at once
        time.sleep(0.05)


def _signal_group(group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, sig)


def _group_alive(group: int) -> bool:
    """Whether a process of the group is left (a zombie not yet reaped by init counts
    as gone)."""
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc: ask the kernel (zombies count there)
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != b"Z":
            return True
    return False


def last_line(log_path: Path) -> str:
    """The last non-empty line of the server's log (where its error is), or where the log
    is when it has none."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    found = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return found or f"see {log_path}"
