"""What a run prints is seen as it is printed, and a run that never ends says where it was.

The tests drive the real `expkit` command: under a pseudo-terminal, as a user at a terminal
sees it, and piped. A script that draws a progress bar with carriage returns (as tqdm does)
waits until the test has seen the bar before it goes on, so a bar that is not shown live
fails the test rather than slowing it.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from conftest import eventually
from expkit.pieces import LivePieces

# Draws a progress bar, waits for the file named by its first argument, then ends the line.
PROGRESS = """
    import os
    import sys
    import time

    sys.stdout.write("loading\\n")
    sys.stdout.write("\\r  0%|          | 0/4")
    sys.stdout.write("\\r 50%|#####     | 2/4")
    sys.stdout.flush()
    deadline = time.time() + 120
    while not os.path.exists(sys.argv[1]) and time.time() < deadline:
        time.sleep(0.05)
    sys.stdout.write("\\r100%|##########| 4/4\\n")
    print("done", flush=True)
"""

WRITTEN = b"loading\n\r  0%|          | 0/4\r 50%|#####     | 2/4\r100%|##########| 4/4\ndone\n"


class Terminal:
    """A command run under a pseudo-terminal; `seen` is everything it wrote so far."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        leader, follower = pty.openpty()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env
        )
        os.close(follower)
        self.fd, self.seen = leader, b""

    def read(self) -> bytes:
        """What the command wrote until now (waits at most 0.2 s for more)."""
        if select.select([self.fd], [], [], 0.2)[0]:
            with contextlib.suppress(OSError):  # the command ended and closed the terminal
                self.seen += os.read(self.fd, 65536)
        return self.seen

    def wait_for(self, text: bytes, timeout: float = 120) -> None:
        eventually(lambda: text in self.read(), timeout=timeout, what=f"{text!r} on the terminal")

    def finish(self) -> int:
        deadline = time.monotonic() + 120
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read()
        self.read()
        os.close(self.fd)
        return self.proc.wait(timeout=10)


def _env(workspace: Path) -> dict[str, str]:
    return {**os.environ, "EXPKIT_WORKSPACE": str(workspace), "TERM": "xterm"}


def _progress_job(write_job, tmp_path: Path) -> tuple[Path, Path]:
    go = tmp_path / "go"
    job = write_job({"args": [str(go)]}, script=PROGRESS)
    return job, go


def test_a_progress_bar_is_shown_on_the_terminal_while_it_moves(
    expkit_workspace, write_job, tmp_path
):
    job, go = _progress_job(write_job, tmp_path)
    terminal = Terminal(
        [sys.executable, "-m", "expkit", "run", str(job)], _env(expkit_workspace.path)
    )

    terminal.wait_for(b"50%|#####     | 2/4")
    go.touch()

    assert terminal.finish() == 0, terminal.seen.decode(errors="replace")
    shown = terminal.seen.decode(errors="replace")
    assert "100%|##########| 4/4" in shown
    assert shown.index("loading") < shown.index("50%") < shown.index("100%") < shown.index("done")
    record = expkit_workspace.history.runs.recent()[0]
    assert (expkit_workspace.run_dir(record.id) / "logs" / "rank-0.log").read_bytes() == WRITTEN


def test_runs_logs_follow_shows_a_progress_bar_while_it_moves(
    expkit_workspace, write_job, tmp_path, background
):
    job, go = _progress_job(write_job, tmp_path)
    run = background("run", str(job))
    run_id = run.run_id
    terminal = Terminal(
        [sys.executable, "-m", "expkit", "runs", "logs", run_id, "--follow"],
        _env(expkit_workspace.path),
    )

    terminal.wait_for(b"50%|#####     | 2/4")
    go.touch()

    assert terminal.finish() == 0, terminal.seen.decode(errors="replace")
    assert run.wait(timeout=120) == 0, run.output
    assert "done" in terminal.seen.decode(errors="replace")


def test_piped_output_keeps_whole_lines(expkit_workspace, write_job, tmp_path):
    job, go = _progress_job(write_job, tmp_path)
    go.touch()

    done = subprocess.run(
        [sys.executable, "-m", "expkit", "run", str(job)],
        env=_env(expkit_workspace.path),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.split(b"\n")  # a carriage return does not end a line
    assert b"loading" in lines and b"done" in lines
    bar = next(line for line in lines if b"100%" in line)
    assert bar == b"\r  0%|          | 0/4\r 50%|#####     | 2/4\r100%|##########| 4/4"


def test_a_rank_that_never_returns_is_named_with_its_last_line(run_job):
    result = run_job(
        {"timeout": 2},
        script="""
            import sys, time
            print("epoch 1 done", flush=True)
            sys.stdout.write("waiting for the data loader")
            sys.stdout.flush()
            time.sleep(120)
        """,
    )

    assert result.state == "failed"
    assert result.record.error == (
        "run: timed out after 2s (the job's `timeout`); still running: rank 0 "
        "(last output: waiting for the data loader)"
    )


def test_a_silent_rank_that_never_returns_is_named(run_job):
    result = run_job({"timeout": 1}, script="import time\ntime.sleep(120)\n")

    assert result.state == "failed"
    assert re.search(r"still running: rank 0 \(no output\)$", result.record.error)


def test_output_is_shown_in_whole_lines_and_progress_states_whatever_the_chunks():
    written = b"3 True\nloading\r 10%\r 20%\r\nend"
    for size in (1, 2, 3, 7, len(written)):
        live = LivePieces()
        shown = [p for i in range(0, len(written), size) for p in live.feed(written[i : i + size])]
        shown.append(live.rest())

        assert b"".join(shown) == written  # nothing lost, nothing twice
        assert b"3 True\n" in shown  # an ordinary line arrives whole
        assert shown[-1] == b"end"
        assert b"loading\r" in shown  # a line's first state, shown when its "\r" comes
        newline = next(i for i, p in enumerate(shown) if p.endswith(b"\n") and i > 0)
        assert b"%" in b"".join(shown[:newline])  # the bar's states came before its end


def test_a_launched_rank_that_never_returns_is_named_with_its_last_line(run_job):
    result = run_job(
        {
            "environment": "inherit",
            "resources": {"processes_per_node": 2},
            "distributed": "torchrun",
            "timeout": 20,
        },
        script="""
            import os, time
            rank = int(os.environ["RANK"])
            print(f"rank {rank} started", flush=True)
            if rank == 1:
                print("rank 1 waits for a peer that never comes", flush=True)
                time.sleep(300)
        """,
    )

    assert result.state == "failed"
    assert result.record.error.endswith(
        "still running: rank 1 (last output: rank 1 waits for a peer that never comes)"
    ), result.record.error
