"""Finding and stopping every process of a run, wherever it went.

Processes started for a run carry `EXPKIT_RUN_ID` in their environment; that survives process
groups, sessions and daemonizing, so a sweep of /proc finds what a crashed driver left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

RUN_ID_ENV = "EXPKIT_RUN_ID"
WORKSPACE_ENV = "EXPKIT_WORKSPACE"


def run_processes(run_id: str, workspace: str | os.PathLike | None = None) -> list[int]:
    """Pids of live processes whose environment names `run_id` (Linux; else empty).

    Run ids are unique within a workspace only (`test_1` exists in many), so with `workspace`
    a process must also carry that workspace's path: another workspace's run is left alone.
    """
    markers = [f"{RUN_ID_ENV}={run_id}".encode()]
    if workspace is not None:
        markers.append(f"{WORKSPACE_ENV}={workspace}".encode())
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    me = os.getpid()
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            if all(marker in environ for marker in markers):
                found.append(int(entry))
        except OSError:
            continue
    return found


def stop_run_processes(
    run_id: str, grace: float = 5.0, workspace: str | os.PathLike | None = None
) -> list[int]:
    """SIGTERM every process of the run, then SIGKILL what is left after `grace` seconds."""
    pids = run_processes(run_id, workspace)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = [p for p in pids if _alive(p)]
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    return pids


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False
