"""Starting, watching and stopping the processes of one run on this machine."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import BinaryIO

from expkit.capabilities import Process, RunContext
from expkit.errors import Canceled, StageFailed
from expkit.procs import die_with_parent

STOP_GRACE_SECONDS = 10
LAUNCHER = -1  # the rank number the console shows a launcher's own lines under


class ProcessGroup:
    """The run's processes, each in its own session, their output streamed line by line."""

    def __init__(self, ctx: RunContext, base_env: dict[str, str]) -> None:
        self.ctx, self.base_env = ctx, base_env
        self.children: list[tuple[Process, subprocess.Popen]] = []
        self.readers: list[threading.Thread] = []
        self._log_dir: int | None = None  # the run's logs folder, opened once (see _open_log)

    def start(self, process: Process) -> None:
        if self._log_dir is None:
            self._log_dir = _open_folder(self.ctx.log_dir)
        popen = subprocess.Popen(
            process.argv,
            cwd=self.ctx.work_dir,
            env={**self.base_env, **process.env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,  # a kill -9 of the driver leaves nothing
        )
        self.children.append((process, popen))
        reader = threading.Thread(target=self._stream, args=(popen, process), daemon=True)
        reader.start()
        self.readers.append(reader)

    def _stream(self, popen: subprocess.Popen, process: Process) -> None:
        """Copy every line to its rank's log as bytes (kept even if not UTF-8) and echo it.

        A launcher's lines are split by rank; its own lines go to `launcher.log`.
        """
        logs: dict[int | None, BinaryIO | None] = {}
        try:
            for line in iter(popen.stdout.readline, b""):
                rank, text = (
                    process.split_output(line) if process.split_output else (process.rank, line)
                )
                if rank not in logs:
                    name = "launcher.log" if rank is None else f"rank-{rank}.log"
                    logs[rank] = _open_log(self._log_dir, name)
                log = logs[rank]
                if log is not None:
                    try:
                        log.write(text)
                    except OSError:  # a full disk: keep reading, or the script would block
                        log.close()
                        logs[rank] = None
                self.ctx.echo(LAUNCHER if rank is None else rank, text)
        finally:
            for log in logs.values():
                if log is not None:
                    log.close()

    def wait(self, timeout: float | None) -> int:
        """The exit code: 0 when all succeed, else the first failure (which stops the rest)."""
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            codes = [popen.poll() for _, popen in self.children]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                self.stop()
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            if self.ctx.canceled():
                raise Canceled()
            if deadline and time.monotonic() > deadline:
                self.stop()
                raise StageFailed(f"timed out after {timeout:g}s (the job's `timeout`)")
            running = next((p for _, p in self.children if p.poll() is None), None)
            if running is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    running.wait(timeout=0.1)  # returns as soon as it exits

    def stop(self) -> None:
        """SIGTERM every process group, SIGKILL what is still there after the grace period."""
        alive = [p for _, p in self.children if p.poll() is None]
        for popen in alive:
            _killpg(popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p for p in alive if p.poll() is None]
        for _, popen in self.children:
            _killpg(popen.pid, signal.SIGKILL)  # also what the leaders left in their groups
            popen.wait()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        for reader in self.readers:
            reader.join(timeout=5)
        if self._log_dir is not None:
            os.close(self._log_dir)
            self._log_dir = None


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
