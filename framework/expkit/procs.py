"""Finding and stopping every process of a run, wherever it went.

Processes started for a run carry `EXPKIT_RUN_ID` in their environment; that survives process
groups, sessions and daemonizing, so a sweep of /proc finds what a crashed driver left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
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
        pids = [p for p in pids if pid_alive(p)]
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    return pids


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def process_start(pid: int) -> str | None:
    """The start time of live process `pid` (Linux clock ticks since boot), to tell it from a
    later process given the same pid. None when there is no such process, only its zombie, or
    no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] == b"Z":
        return None
    return fields[19].decode()


def pid_alive(pid: int | None, start: str | None = None) -> bool:
    """Whether process `pid` still runs (a zombie does not) and, given its `start`
    (`process_start`), is still that process and not a reused pid. Without /proc (not Linux)
    `start` cannot be checked: whether a signal could reach `pid`. The one liveness check of
    expkit (drivers, temporary files' writers, a run's processes)."""
    if not pid:
        return False
    if os.path.exists("/proc/self/stat"):
        now = process_start(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True


# -- processes that escape the marker -------------------------------------------------------
# A script can start a daemon that clears its environment (double fork, setsid, `env -i`): the
# marker above cannot find it. A driver that is a child subreaper gets such orphans as its own
# children, so "every descendant of the driver" finds them, whatever their environment.
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # not a system with a C library we can load
    _libc = None


def _prctl(option: int, value: int) -> bool:
    if _libc is None or not hasattr(_libc, "prctl"):
        return False
    return _libc.prctl(option, value, 0, 0, 0) == 0


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """In a child (`preexec_fn`): get `sig` when the parent dies (Linux; else nothing).

    Used for every process a driver starts, so that a kill -9 of the driver stops them too.
    Only that process: what it starts in turn does not inherit it (see `expkit.guard`).
    Returns False where the system has no such thing.
    """
    return _prctl(_PR_SET_PDEATHSIG, sig)


def become_subreaper() -> bool:
    """Make this process the child subreaper of its descendants (Linux 3.4+).

    Orphans among them are then re-parented here instead of to init, so they stay findable
    with `descendants()`. Returns False where the system has no such thing.
    """
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _stats() -> dict[int, list[bytes]] | None:
    """{pid: the fields of /proc/<pid>/stat after the command name (state, parent, group,
    ...)} of every process; None without /proc (not Linux)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    found = {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                found[int(entry)] = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
    return found


def _parents() -> dict[int, tuple[int, bytes]]:
    """{pid: (parent pid, state letter)} of every process in /proc (Linux; else empty)."""
    return {pid: (int(f[1]), f[0]) for pid, f in (_stats() or {}).items()}


def group_alive(group: int) -> bool:
    """Whether a process of process group `group` is left; a zombie not yet reaped (by
    init, for one whose parent is gone) counts as gone. Without /proc, the kernel is asked,
    and a zombie counts."""
    stats = _stats()
    if stats is None:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True
    return any(int(f[2]) == group and f[0] != b"Z" for f in stats.values())


def descendants(root: int | None = None) -> list[int]:
    """Pids of the live (not zombie) descendants of `root` (default: this process)."""
    return _descendants(_parents(), os.getpid() if root is None else root)


def _descendants(table: dict[int, tuple[int, bytes]], root: int) -> list[int]:
    """`descendants` of `root` in `table` (a `_parents()`)."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if table[pid][1] != b"Z":
            found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def stop_descendants(grace: float = 2.0) -> list[int]:
    """SIGTERM every descendant of this process, SIGKILL what is left after `grace` seconds,
    then reap the zombies this process inherited. Returns the pids that were signalled.

    Only for a process that drives one run and nothing else (`expkit run`, the background
    driver): there, every descendant left after the run stage belongs to the run.
    """
    signalled: list[int] = []
    deadline = time.monotonic() + grace
    while True:
        table = _parents()
        left = _descendants(table, os.getpid())
        if not left:
            break
        late = time.monotonic() > deadline
        for pid in left:
            _signal(pid, signal.SIGKILL if late else signal.SIGTERM)
            if pid not in signalled:
                signalled.append(pid)
        reap_zombies()
        if late and time.monotonic() > deadline + 5:  # unkillable (uninterruptible sleep)
            reap_zombies()
            return signalled  # give up rather than hang
        time.sleep(0.05)
    _reap(table)  # the look that found none alive: /proc is read once when nothing is left
    return signalled


def reap_zombies() -> list[int]:
    """Collect the exit status of this process's children that are zombies and that no
    `subprocess.Popen` is waiting for (orphans it inherited as a subreaper)."""
    return _reap(_parents())


def _reap(table: dict[int, tuple[int, bytes]]) -> list[int]:
    """`reap_zombies` of the zombies in `table` (a `_parents()`)."""
    me = os.getpid()
    reaped = []
    for pid, (parent, state) in table.items():
        if parent != me or state != b"Z":
            continue
        with contextlib.suppress(ChildProcessError, OSError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                reaped.append(pid)
    return reaped
