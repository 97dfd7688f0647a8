"""The process runner: start a run's processes on this machine, stream their output into the
run's logs, wait for them within the job's timeout and cancel, and stop every one of them.

It keeps every obligation of `ComputeTarget.execute` for processes started here, so that a
compute target that runs processes on this machine is only what differs from `local`:

    def execute(self, ctx, processes, allocation):
        return runner.run(ctx, processes, {**os.environ, "CUDA_VISIBLE_DEVICES": "0"})

How each child starts is customised with `wrap(process) -> argv` (a prefix such as `["nice",
"-n", "10", *process.argv]`) and `preexec()`, a function run in the child between fork and
exec (e.g. `os.sched_setaffinity(0, {0})`); the child always also gets `die_with_parent`, so
that a kill -9 of the driver stops it. Each process runs in its own session, and stopping one
signals its whole process group, so what a script starts in its group goes with it.

A planned stop (the job's timeout, a cancel, a requeue) of a job with `checkpoints:` first
sends `ctx.stop_signal` (SIGUSR1 by default) to each rank's own process and waits up to
`ctx.stop_grace` seconds for every process to exit, so that the script can write a checkpoint;
then SIGTERM and SIGKILL as above. Only the rank's own process gets it, not its group (a
DataLoader worker dies on SIGUSR1's default action), and for a launcher (`split_output`, e.g.
torchrun) the ranks it started, not the launcher itself (torchrun dies on it). A `wrap` must
therefore exec the command (as `nice` and `taskset` do), or the wrapper gets the signal. The
siblings of a rank that failed are stopped at once: that stop is not planned. A subclass that
overrides `stop()` keeps this: `stop_planned()` signals, waits, then calls it.

Two consequences for `wrap` and `preexec`: the child already leads its session, so
`os.setsid()` in `preexec` fails (EPERM); and a wrapper that leaves the group (`setsid`,
`nohup ... &`, anything that daemonises) returns at once, so the runner sees the rank end and
cannot enforce the timeout on what it left (the conformance check reports such processes as
left behind). A `preexec` that raises fails the start with Python's "Exception occurred in
preexec_fn" (the child cannot send its exception back): check what it needs (the CPUs
exist, the user may lower priority) in the target's `check` or before calling the runner.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from expkit.capabilities import Process, RunContext
from expkit.errors import Canceled, Interrupted
from expkit.pieces import LivePieces, cut
from expkit.procs import (
    RUN_ID_ENV,
    WORKSPACE_ENV,
    descendants,
    die_with_parent,
    pid_alive,
    process_start,
)

STOP_GRACE_SECONDS = 10  # between SIGTERM and SIGKILL when the processes are stopped
LAUNCHER = -1  # the rank number the console shows a launcher's own lines under
READ_BYTES = 65536  # the most output read at once

Wrap = Callable[[Process], list[str]]


def run_markers(ctx: RunContext) -> dict[str, str]:
    """The environment variables that mark a process as this run's: a process started with
    them (and whatever it starts) is found and stopped by the core's clean-up, wherever it
    went (see `expkit.procs`). The lifecycle puts them in every `Process.env`; add them to
    the environment of anything else a plugin starts for the run (pip, a helper)."""
    return {k: v for k, v in ctx.script_env.items() if k in (RUN_ID_ENV, WORKSPACE_ENV)}


def guarded(argv: list[str]) -> list[str]:
    """`argv` run under expkit's guard (`python -m expkit.guard`): everything the command
    starts, not only the command, dies with the process that started it, and is stopped
    when the command ends. For a helper a plugin starts that starts processes of its own
    (pip, a data-prepare command); a run's ranks need no guard (their process group is
    stopped). The exit code is the command's (128 + N for a signal N)."""
    return [sys.executable, "-m", "expkit.guard", *argv]


class ProcessGroup:
    """The run's processes, each in its own session, their output streamed line by line into
    `ctx.log_dir/rank-N.log` (bytes as written) and echoed with `ctx.echo`.

    Use it as a context manager: leaving the block stops every process still there (and what
    each left in its process group) and closes the logs, whatever happened; as planned
    (`stop_planned`) when the block raised Canceled or KeyboardInterrupt (the driver's Ctrl-C
    or SIGTERM), at once otherwise.

    `base_env`: the environment of every process (each `Process.env` is added to it).
    `wrap(process)`: the argv to start instead of `process.argv` (a prefix such as `nice`).
    `preexec()`: run in each child before exec, after `die_with_parent` (keep it to system
    calls: no locks, no threads, no imports). `stop_grace`: seconds between SIGTERM and
    SIGKILL when stopping.
    """

    def __init__(
        self,
        ctx: RunContext,
        base_env: dict[str, str],
        *,
        wrap: Wrap | None = None,
        preexec: Callable[[], object] | None = None,
        stop_grace: float = STOP_GRACE_SECONDS,
    ) -> None:
        self.ctx, self.base_env = ctx, base_env
        self.wrap, self.preexec, self.stop_grace = wrap, preexec, stop_grace
        self.children: list[tuple[Process, subprocess.Popen[bytes]]] = []
        self.readers: list[threading.Thread] = []
        self._log_dir: int | None = None  # the run's logs folder, opened once (see _open_log)
        self.last_lines = LastLines()
        self._ranks: dict[int, set[int | None]] = {}  # by pid: the ranks its output named
        # A planned stop under way: the processes sent the stop signal, each with the rank
        # processes it was sent to (a launcher's; [] for a rank of its own), and when their
        # grace ends (a later stop, e.g. on a signal to the driver, goes on waiting for it).
        self._stopping: list[tuple[subprocess.Popen[bytes], list[tuple[int, str | None]]]] = []
        self._grace_ends: float | None = None

    def start(self, process: Process) -> subprocess.Popen[bytes]:
        """Start `process` in the run's working folder; its output goes to its rank's log."""
        if self._log_dir is None:
            self._log_dir = _open_folder(self.ctx.log_dir)
        argv = self.wrap(process) if self.wrap else process.argv
        popen = subprocess.Popen(
            argv,
            cwd=self.ctx.work_dir,
            env={**self.base_env, **process.env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=self._child_setup,  # a kill -9 of the driver leaves nothing
        )
        self.children.append((process, popen))
        reader = threading.Thread(target=self._stream, args=(popen, process), daemon=True)
        reader.start()
        self.readers.append(reader)
        return popen

    def _child_setup(self) -> None:
        die_with_parent()
        if self.preexec is not None:
            self.preexec()

    def _stream(self, popen: subprocess.Popen[bytes], process: Process) -> None:
        """Copy the output to its rank's log as bytes (kept even if not UTF-8) and echo it.

        The log gets the bytes as they arrive; `ctx.echo` gets whole lines, and the states
        of a line redrawn with carriage returns (a tqdm bar) as they come (see
        `expkit.pieces`): the console shows a progress bar while it moves. A launcher's
        output is split by rank (`split_output`) line by line; its own lines go to
        `launcher.log`.
        """
        assert popen.stdout is not None
        fd = popen.stdout.fileno()
        logs: dict[int | None, BinaryIO | None] = {}
        pending = b""  # a launcher's line not yet ended
        live = LivePieces()
        try:
            while chunk := os.read(fd, READ_BYTES):
                if process.split_output is None:
                    self._write_log(process.rank, chunk, logs)
                    self.last_lines.add(process.rank, chunk)
                    for piece in live.feed(chunk):
                        self._echo(process.rank, piece)
                    continue
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._piece(*process.split_output(line + b"\n"), logs)
            if pending and process.split_output is not None:
                self._piece(*process.split_output(pending), logs)
            if rest := live.rest():
                self._echo(process.rank, rest)
        finally:
            for log in logs.values():
                if log is not None:
                    log.close()

    def _piece(
        self, rank: int | None, text: bytes, logs: dict[int | None, BinaryIO | None]
    ) -> None:
        """A launcher's line, split by rank (None: its own), to its log and the console."""
        self._write_log(rank, text, logs)
        self.last_lines.add(rank, text)
        self._echo(rank, text)

    def _write_log(
        self, rank: int | None, data: bytes, logs: dict[int | None, BinaryIO | None]
    ) -> None:
        if rank not in logs:
            name = "launcher.log" if rank is None else f"rank-{rank}.log"
            logs[rank] = _open_log(self._log_dir, name)
        log = logs[rank]
        if log is not None:
            try:
                log.write(data)
            except OSError:  # a full disk: keep reading, or the script would block
                log.close()
                logs[rank] = None

    def _echo(self, rank: int | None, text: bytes) -> None:
        self.ctx.echo(LAUNCHER if rank is None else rank, text)

    def wait(self, timeout: float | None) -> int:
        """The exit code once every process has ended: 0 when all succeed, else the first
        failure's (which stops the rest at once; negative -N for a process killed by signal
        N). Raises Canceled when `ctx.canceled()` turns true, and Interrupted("time_limit",
        "timed out after Ns ...") after `timeout` seconds (None: no limit), both after a
        planned stop (`stop_planned`) of every process."""
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            codes = [popen.poll() for _, popen in self.children]
            failed = [c for c in codes if c is not None and c != 0]
            if failed:
                self.stop()
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            if self.ctx.canceled():
                self.stop_planned()
                raise Canceled()
            if deadline and time.monotonic() > deadline:
                running = self._still_running()
                self.stop_planned()
                message = f"timed out after {timeout:g}s (the job's `timeout`); {running}"
                raise Interrupted("time_limit", message)
            alive = next((p for _, p in self.children if p.poll() is None), None)
            if alive is not None:
                wait_for_exit(alive, 0.1)

    def _still_running(self) -> str:
        """Which ranks are still running and the last line each wrote, for the timeout error:
        "still running: rank 1 (last output: epoch 3)"."""
        ranks: list[int | None] = []
        for process, popen in self.children:
            if popen.poll() is None:
                if process.split_output is None:
                    ranks.append(process.rank)
                else:  # a launcher: the ranks of its live processes, else the launcher
                    launched: list[int | None] = list(_launched_ranks(popen.pid))
                    ranks.extend(launched or [None])
        described = []
        for rank in dict.fromkeys(ranks):
            name = "the launcher" if rank is None else f"rank {rank}"
            last = self.last_lines.of(rank)
            described.append(f"{name} (last output: {last})" if last else f"{name} (no output)")
        return "still running: " + ", ".join(described) if described else "nothing running"

    def stop_planned(self) -> None:
        """A planned stop (a timeout, a cancel, a requeue: not a rank's failure): with
        `ctx.stop_signal` set (the job's `checkpoints:`), first send that signal to each
        rank's own process (a launcher's ranks, not the launcher) and wait up to
        `ctx.stop_grace` seconds for every process to exit, for the script to write a
        checkpoint; then `stop()`. The signal is sent once: a later call goes on waiting."""
        if self.ctx.stop_signal is not None and self._grace_ends is None:
            self._signal_ranks(self.ctx.stop_signal, self.ctx.stop_grace)
        self.stop()

    def stop(self) -> None:
        """SIGTERM every process group, SIGKILL what is still there after `stop_grace`
        seconds (also what the processes that ended left in their groups). A planned stop
        under way (`stop_planned`) is never cut short: its grace period is waited for first."""
        self._wait_for_ranks()
        alive = [p for _, p in self.children if p.poll() is None]
        for popen in alive:
            _killpg(popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p for p in alive if p.poll() is None]
        for _, popen in self.children:
            _killpg(popen.pid, signal.SIGKILL)  # also what the leaders left in their groups
            popen.wait()

    def _signal_ranks(self, signum: int, grace: float) -> None:
        """Send `signum` to each live rank's own process (for a launcher: the ranks it
        started, found by their RANK variable; a launcher with none yet gets nothing and is
        not waited for), and give them until `grace` seconds from now to exit."""
        self._grace_ends = time.monotonic() + grace
        for process, popen in self.children:
            if popen.poll() is not None:
                continue
            launched = process.split_output is not None
            own = _rank_processes(popen.pid) if launched else [popen.pid]
            for pid in own:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signum)
            if own:
                ranks = [(pid, process_start(pid)) for pid in own] if launched else []
                self._stopping.append((popen, ranks))

    def _wait_for_ranks(self) -> None:
        """Wait until the processes sent the stop signal have exited or their grace period
        has passed (at once when there is no planned stop). A launcher is done when the ranks
        it was sent to have exited: it is then stopped at once, before it starts them again
        (torchrun restarts ranks that fail, up to `retry.in_place` times)."""

        def done(popen: subprocess.Popen[bytes], ranks: list[tuple[int, str | None]]) -> bool:
            if popen.poll() is not None:
                return True
            return bool(ranks) and not any(pid_alive(pid, start) for pid, start in ranks)

        while self._grace_ends is not None and time.monotonic() < self._grace_ends:
            if all(done(popen, ranks) for popen, ranks in self._stopping):
                return
            time.sleep(0.05)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        if isinstance(exc[1], (Canceled, KeyboardInterrupt)):  # the driver's Ctrl-C, SIGTERM
            self.stop_planned()
        else:
            self.stop()
        for reader in self.readers:
            reader.join(timeout=5)
        if self._log_dir is not None:
            os.close(self._log_dir)
            self._log_dir = None


def wait_for_exit(popen: subprocess.Popen[bytes], timeout: float) -> None:
    """Return once `popen` has exited or `timeout` seconds have passed, without reaping it.

    On a pidfd (Linux 5.3+, pidfd_open(2): it turns readable when the process exits), so that
    the run stage ends as soon as the script does; elsewhere Popen.wait, which polls and
    notices an exit up to 50 ms late (CPython's subprocess: it sleeps up to 0.05 s between
    looks).
    """
    try:
        pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):  # not Linux, an old kernel, or already reaped
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=timeout)
        return
    try:
        select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)


def run(
    ctx: RunContext,
    processes: list[Process],
    env: dict[str, str],
    timeout: float | None = None,
    *,
    wrap: Wrap | None = None,
    preexec: Callable[[], object] | None = None,
) -> int:
    """Start `processes` with environment `env` (see ProcessGroup), wait for them and stop
    what is left: the body of a `ComputeTarget.execute` for processes on this machine.

    Returns the exit code (see `ProcessGroup.wait`); `timeout` defaults to the job's
    (`ctx.job.timeout`). Raises Canceled or Interrupted (the timeout) as `wait` does, with
    every process already stopped.
    """
    limit = ctx.job.timeout if timeout is None else timeout
    with ProcessGroup(ctx, env, wrap=wrap, preexec=preexec) as group:
        for process in processes:
            group.start(process)
        return group.wait(limit)


class LastLines:
    """The last line of output each rank wrote (a progress bar's latest state counts), for
    saying where a rank that never ended was."""

    LIMIT = 4096  # bytes of a line kept

    def __init__(self) -> None:
        self._line: dict[int | None, bytes] = {}  # the line being written
        self._last: dict[int | None, bytes] = {}  # the last one with something in it

    def add(self, rank: int | None, data: bytes) -> None:
        """Take more of `rank`'s output, as it was written."""
        for piece in cut(data):
            line = (self._line.get(rank, b"") + piece)[-self.LIMIT :]
            if line.strip():
                self._last[rank] = line
            self._line[rank] = b"" if piece.endswith((b"\n", b"\r")) else line

    def of(self, rank: int | None) -> str:
        """`rank`'s last line, decoded and stripped; "" when it wrote nothing."""
        text = self._last.get(rank, b"").decode("utf-8", errors="replace")
        parts = [part.strip() for part in text.replace("\r\n", "\n").split("\r")]
        return next((part for part in reversed(parts) if part), "")


_RANK_VARS = (b"RANK=", b"HOROVOD_RANK=", b"OMPI_COMM_WORLD_RANK=", b"PMI_RANK=")


def _launched_ranks(launcher: int) -> list[int]:
    """The global ranks of a launcher's live processes (their RANK variable, as a launcher
    sets it); empty where /proc cannot tell (not Linux)."""
    return sorted(set(_ranks_of(descendants(launcher)).values()))


def _rank_processes(launcher: int) -> list[int]:
    """The pids of the rank processes a launcher started: its live descendants with a RANK
    variable whose parent has none (not what a rank started itself, such as DataLoader
    workers, which inherit it); empty where /proc cannot tell (not Linux)."""
    ranked = _ranks_of(descendants(launcher))
    return [pid for pid in ranked if _parent(pid) not in ranked]


def _ranks_of(pids: list[int]) -> dict[int, int]:
    """{pid: global rank} of those of `pids` with a RANK variable (as a launcher sets it)."""
    ranks = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(_RANK_VARS) and entry.partition(b"=")[2].isdigit():
                ranks[pid] = int(entry.partition(b"=")[2])
                break
    return ranks


def _parent(pid: int) -> int | None:
    """The parent pid of `pid`, from /proc; None when it has gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _open_folder(path: Path) -> int | None:
    """The run's logs folder, created if needed and opened once, never through a link: a
    script that later swaps ../logs for a link to a folder of the user's does not redirect
    what is written (the logs are opened relative to this descriptor). None when it cannot
    be created (a full disk)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None


def _open_log(folder: int | None, name: str) -> BinaryIO | None:
    """A rank's log in the run's logs `folder` (a descriptor), opened once, appended to,
    unbuffered, never through a link; None when it cannot be created (a full disk)."""
    if folder is None:
        return None
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o644, dir_fd=folder)
    except OSError:
        return None
    return os.fdopen(fd, "ab", buffering=0)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
