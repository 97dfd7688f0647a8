"""Planned stops on this machine (the job's `checkpoints:`), `expkit runs cancel --requeue` and
`expkit runs resume`.

What a user relies on: at the job's timeout, on a cancel or a requeue, each rank's own process
gets the job's stop signal (SIGUSR1) and the grace period to write a checkpoint before SIGTERM;
what a rank started (DataLoader workers) and a launcher (torchrun) do not get it, and the
siblings of a failing rank are stopped at once. The runner-level tests drive
`expkit.runner.ProcessGroup` as a compute target does, with real processes and signals.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import error_line, eventually
from expkit.api import Run
from expkit.capabilities import Process, RunContext
from expkit.errors import Canceled, Interrupted, UserError
from expkit.job import JobSpec
from expkit.procs import run_processes
from expkit.runner import ProcessGroup

# On the stop signal: notes it in `signals-<rank>.txt`, sleeps a moment (a checkpoint takes
# time), then writes `saved-<rank>.txt`
# with whether its parent and its own child were still alive then, and exits 0. Starts a child
# (in its process group, as a DataLoader worker is) with no handler: SIGUSR1 would kill it.
HANDLES = """
    import os
    import signal
    import subprocess
    import sys
    import time

    rank = os.environ.get("RANK", sys.argv[1] if len(sys.argv) > 1 else "0")
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])


    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
        except OSError:
            return False


    def save(signum, frame):
        with open(f"signals-{rank}.txt", "a") as f:
            f.write("stop signal\\n")
        time.sleep(0.5)
        text = f"parent {alive(os.getppid())} worker {alive(worker.pid)}"
        with open(f"saved-{rank}.txt.tmp", "w") as f:
            f.write(text)
        os.replace(f"saved-{rank}.txt.tmp", f"saved-{rank}.txt")
        worker.kill()
        sys.exit(0)


    signal.signal(signal.SIGUSR1, save)
    open(f"ready-{rank}", "w").close()
    print(f"rank {rank} training", flush=True)
    while True:
        time.sleep(0.05)
"""

# No handler: SIGUSR1's default action ends it.
NO_HANDLER = """
    import sys
    import time

    open(f"ready-{sys.argv[1]}", "w").close()
    while True:
        time.sleep(0.05)
"""

# Rank 1 fails once rank 0 is ready; rank 0 handles the stop signal as HANDLES does.
ONE_FAILS = """
    import os
    import signal
    import sys
    import time

    rank = sys.argv[1]
    if rank == "1":
        while not os.path.exists("ready-0"):
            time.sleep(0.05)
        sys.exit(3)


    def save(signum, frame):
        open("saved-0.txt", "w").close()
        sys.exit(0)


    signal.signal(signal.SIGUSR1, save)
    open("ready-0", "w").close()
    while True:
        time.sleep(0.05)
"""


def context(tmp_path: Path, *, grace: float, canceled=lambda: False, **job: object) -> RunContext:
    """The RunContext of a run whose working folder is tmp_path/work, stop signal SIGUSR1."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    spec = JobSpec.from_dict(
        {"experiment": "test", "source_directory": ".", "entry_script": "train.py", **job},
        source="<test job>",
    )
    return RunContext(
        run_id="r1",
        job=spec,
        run_dir=tmp_path,
        work_dir=work,
        log_dir=tmp_path / "logs",
        script_env={},
        say=lambda text: None,
        waiting=lambda text: None,
        canceled=canceled,
        echo=lambda rank, line: None,
        stop_signal=signal.SIGUSR1,
        stop_grace=grace,
    )


def ranks(work: Path, script: str, count: int = 1) -> list[Process]:
    """`count` plain ranks running `script` (written to work/train.py), their rank as argument."""
    (work / "train.py").write_text(textwrap.dedent(script))
    return [Process([sys.executable, "train.py", str(r)], rank=r) for r in range(count)]


def cancel_when(*paths: Path):
    """A `ctx.canceled` that turns true once every file in `paths` exists."""
    return lambda: all(p.exists() for p in paths)


# -- the runner ------------------------------------------------------------------------------
def test_at_the_timeout_each_rank_gets_the_stop_signal_and_writes_its_checkpoint(tmp_path):
    ctx = context(tmp_path, grace=60, timeout=2)
    work = ctx.work_dir
    with ProcessGroup(ctx, dict(os.environ)) as group, pytest.raises(Interrupted) as stop:
        for process in ranks(work, HANDLES, count=2):
            group.start(process)
        group.wait(ctx.job.timeout)
    assert stop.value.outcome == "time_limit"
    assert str(stop.value).startswith("timed out after 2s (the job's `timeout`); still running:")
    for rank in (0, 1):  # its own process only: the worker in its group was still there
        assert (work / f"saved-{rank}.txt").read_text() == "parent True worker True"


def test_a_cancel_is_a_planned_stop_too(tmp_path):
    work = tmp_path / "work"
    ctx = context(tmp_path, grace=60, canceled=cancel_when(work / "ready-0"))
    with ProcessGroup(ctx, dict(os.environ)) as group, pytest.raises(Canceled):
        for process in ranks(work, HANDLES):
            group.start(process)
        group.wait(None)
    assert (work / "saved-0.txt").read_text() == "parent True worker True"


def test_a_script_without_a_handler_is_stopped_by_the_signal_without_waiting_the_grace(tmp_path):
    work = tmp_path / "work"
    ctx = context(tmp_path, grace=300, canceled=cancel_when(work / "ready-0", work / "ready-1"))
    started = time.monotonic()
    with ProcessGroup(ctx, dict(os.environ)) as group, pytest.raises(Canceled):
        for process in ranks(work, NO_HANDLER, count=2):
            group.start(process)
        group.wait(None)
    assert time.monotonic() - started < 60  # not the 300 s of grace
    assert [popen.returncode for _, popen in group.children] == [-signal.SIGUSR1] * 2


def test_a_failing_rank_s_siblings_are_stopped_at_once_without_the_stop_signal(tmp_path):
    ctx = context(tmp_path, grace=60)
    with ProcessGroup(ctx, dict(os.environ)) as group:
        for process in ranks(ctx.work_dir, ONE_FAILS, count=2):
            group.start(process)
        assert group.wait(None) == 3
    assert not (ctx.work_dir / "saved-0.txt").exists()
    assert group.children[0][1].returncode == -signal.SIGTERM


def test_without_checkpoints_a_cancel_sends_sigterm_at_once(tmp_path):
    work = tmp_path / "work"
    ctx = context(tmp_path, grace=60, canceled=cancel_when(work / "ready-0"))
    ctx.stop_signal = None  # the job has no `checkpoints:`
    with ProcessGroup(ctx, dict(os.environ)) as group, pytest.raises(Canceled):
        for process in ranks(work, HANDLES):
            group.start(process)
        group.wait(None)
    assert not (work / "saved-0.txt").exists()
    assert group.children[0][1].returncode == -signal.SIGTERM


@contextmanager
def driver_signalled_after(seconds: float) -> Iterator[None]:
    """A SIGALRM in `seconds` raising Canceled in this process, as a Ctrl-C or SIGTERM of the
    driver raises it from its handler; the previous handler is put back on leaving."""

    def raise_canceled(signum, frame):
        raise Canceled("canceled by the user")

    previous = signal.signal(signal.SIGALRM, raise_canceled)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_signal_to_the_driver_stops_the_ranks_as_planned(tmp_path):
    """The driver's Ctrl-C or SIGTERM handler raises Canceled wherever the driver is (here
    in `wait`, before it saw the cancel): leaving the block is then a planned stop."""
    work = tmp_path / "work"
    ctx = context(tmp_path, grace=60)
    with pytest.raises(Canceled), ProcessGroup(ctx, dict(os.environ)) as group:
        for process in ranks(work, HANDLES):
            group.start(process)
        eventually((work / "ready-0").exists, what="the rank started")
        with driver_signalled_after(0.1):
            group.wait(None)
    assert (work / "saved-0.txt").read_text() == "parent True worker True"
    assert group.children[0][1].returncode == 0


def test_a_signal_to_the_driver_during_the_grace_period_does_not_cut_it_short(tmp_path):
    """Ctrl-C while a planned stop waits leaves the block, whose stop goes on waiting for the
    same grace period: the script's handler runs once and is not cut short."""
    work = tmp_path / "work"
    ctx = context(tmp_path, grace=60, canceled=cancel_when(work / "ready-0"))
    with pytest.raises(Canceled) as stop, ProcessGroup(ctx, dict(os.environ)) as group:
        for process in ranks(work, HANDLES):
            group.start(process)
        eventually((work / "ready-0").exists, what="the rank started")
        with driver_signalled_after(0.2):  # during the handler's 0.5 s
            group.wait(None)
    assert str(stop.value) == "canceled by the user"  # the signal's, not wait's own
    assert (work / "signals-0.txt").read_text() == "stop signal\n"
    assert (work / "saved-0.txt").read_text() == "parent True worker True"
    assert group.children[0][1].returncode == 0


# -- expkit runs cancel --requeue: what is refused -------------------------------------------
QUICK = """
    print("done", flush=True)
"""

# Prints a line, then sleeps until stopped.
WAITS = """
    import time

    print("training", flush=True)
    while True:
        time.sleep(0.05)
"""


def test_requeue_of_a_finished_run_is_refused_in_one_line(expkit_cli, write_job):
    job = write_job({"environment": "inherit", "retry": {"max_attempts": 3}}, script=QUICK)
    assert expkit_cli("run", str(job)).returncode == 0
    result = expkit_cli("runs", "cancel", "latest", "--requeue")
    assert result.returncode == 2
    assert error_line(result) == "expkit: error: run 1 is already completed: nothing to requeue"


def test_requeue_of_a_run_on_its_last_attempt_is_refused_and_leaves_it_running(
    background, expkit_cli, expkit_workspace, write_job
):
    job = write_job({"environment": "inherit"}, script=WAITS)  # retry.max_attempts: 1
    live = background("run", str(job))
    live.wait_for("training", timeout=60)
    result = expkit_cli("runs", "cancel", "1", "--requeue")
    assert result.returncode == 2
    assert error_line(result) == (
        "expkit: error: run 1 is on its last attempt (1 of 1); a requeue needs one left (the "
        "job's `retry.max_attempts`): `expkit runs cancel 1` stops it, then `expkit runs "
        "resume 1` starts its next attempt"
    )
    record = expkit_workspace.history.runs.get(live.run_id)
    assert record.state == "running" and not record.cancel_requested
    live.interrupt()
    assert live.wait(timeout=60) == 130


# -- end to end: the planned stop through `expkit run` (the checkpoint kept in the run) -------
# On SIGUSR1 writes ckpt/saved.txt (as a checkpoint) and exits; else runs until stopped.
CHECKPOINTS_ON_SIGNAL = """
    import os
    import signal
    import sys
    import time

    folder = os.environ["EXPKIT_CHECKPOINT_DIR"]


    def save(signum, frame):
        with open(os.path.join(folder, "saved.txt"), "w") as f:
            f.write(f"step 7 of attempt {os.environ['EXPKIT_ATTEMPT']}")
        sys.exit(0)


    signal.signal(signal.SIGUSR1, save)
    print("training", flush=True)
    while True:
        time.sleep(0.05)
"""


def run_id_of(output: str) -> str:
    return re.search(r"^run (\S+) in workspace ", output, re.M).group(1)


def test_at_the_timeout_the_script_writes_its_checkpoint_kept_in_the_run(
    expkit_cli, expkit_workspace, write_job
):
    spec = {
        "environment": "inherit",
        "timeout": 3,
        "checkpoints": {"path": "ckpt", "grace_seconds": 20},
    }
    result = expkit_cli("run", str(write_job(spec, script=CHECKPOINTS_ON_SIGNAL)), timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    record = expkit_workspace.history.runs.get(run_id_of(result.stdout))
    assert record.state == "failed"
    assert record.error.startswith("run: timed out after 3s (the job's `timeout`); still running")
    saved = expkit_workspace.run_dir(record.id) / "checkpoints" / "saved.txt"
    assert saved.read_text() == "step 7 of attempt 1"
    [attempt] = expkit_workspace.history.attempts.of(record.id)
    assert attempt.outcome == "time_limit"
    # the summary says how to go on from there
    assert f"resume        expkit runs resume {record.id} (from its last checkpoint)" in (
        result.stdout
    )


def test_a_script_without_a_handler_is_still_stopped_at_the_timeout(
    expkit_cli, expkit_workspace, write_job
):
    spec = {
        "environment": "inherit",
        "timeout": 2,
        "checkpoints": {"path": "ckpt", "grace_seconds": 300},
    }
    started = time.monotonic()
    result = expkit_cli("run", str(write_job(spec, script=WAITS)), timeout=200)
    assert time.monotonic() - started < 100  # SIGUSR1's default action, not 300 s of grace
    assert result.returncode == 1, result.stdout + result.stderr
    record = expkit_workspace.history.runs.get(run_id_of(result.stdout))
    assert record.error.startswith("run: timed out after 2s")


# Each rank: on SIGUSR1, after a moment, writes ckpt/rank-R.txt saying whether torchrun (its
# parent) is still alive, and exits.
TORCHRUN_RANKS = """
    import os
    import signal
    import sys
    import time

    rank = os.environ["RANK"]


    def save(signum, frame):
        time.sleep(0.5)
        launcher = os.path.exists(f"/proc/{os.getppid()}") and os.getppid() != 1
        with open(os.path.join(os.environ["EXPKIT_CHECKPOINT_DIR"], f"rank-{rank}.txt"), "w") as f:
            f.write(f"torchrun alive: {launcher}")
        sys.exit(0)


    signal.signal(signal.SIGUSR1, save)
    print(f"rank {rank} training", flush=True)
    while True:
        time.sleep(0.05)
"""


def test_a_cancel_of_a_torchrun_job_signals_both_ranks_not_torchrun(
    background, expkit_cli, expkit_workspace, write_job
):
    spec = {
        "environment": "inherit",
        "resources": {"processes_per_node": 2},
        "distributed": "torchrun",
        "checkpoints": {"path": "ckpt", "grace_seconds": 30},
    }
    live = background("run", str(write_job(spec, script=TORCHRUN_RANKS)), "--all-ranks")
    live.wait_for("[rank 0] rank 0 training", timeout=60)
    live.wait_for("[rank 1] rank 1 training", timeout=60)
    assert expkit_cli("runs", "cancel", live.run_id).returncode == 0
    assert live.wait(timeout=120) == 130
    record = expkit_workspace.history.runs.get(live.run_id)
    assert record.state == "canceled"
    saved = expkit_workspace.run_dir(record.id) / "checkpoints"
    for rank in (0, 1):
        assert (saved / f"rank-{rank}.txt").read_text() == "torchrun alive: True"
    assert run_processes(record.id, expkit_workspace.path) == []


# Each rank checkpoints on SIGUSR1 and exits 75; a rank torchrun starts again (in place) waits.
RESTARTED_IN_PLACE = """
    import os
    import signal
    import sys
    import time

    rank = os.environ["RANK"]
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        print(f"rank {rank} restarted in place", flush=True)
        while True:
            time.sleep(0.05)


    def save(signum, frame):
        with open(os.path.join(os.environ["EXPKIT_CHECKPOINT_DIR"], f"rank-{rank}.txt"), "w") as f:
            f.write("saved")
        sys.exit(75)


    signal.signal(signal.SIGUSR1, save)
    print(f"rank {rank} training", flush=True)
    while True:
        time.sleep(0.05)
"""


def test_a_planned_stop_ends_torchrun_once_its_ranks_exit_not_after_the_grace(
    background, expkit_cli, expkit_workspace, write_job
):
    """With `retry.in_place`, torchrun would start the ranks that exit after the stop signal
    again, and they would run on until the grace period ends: once the ranks it was sent to
    have exited, torchrun is stopped at once (the run ends long before its 120 s grace)."""
    spec = {
        "environment": "inherit",
        "resources": {"processes_per_node": 2},
        "distributed": "torchrun",
        "retry": {"in_place": 2},
        "checkpoints": {"path": "ckpt", "grace_seconds": 120},
    }
    live = background("run", str(write_job(spec, script=RESTARTED_IN_PLACE)), "--all-ranks")
    live.wait_for("[rank 0] rank 0 training", timeout=60)
    live.wait_for("[rank 1] rank 1 training", timeout=60)
    assert expkit_cli("runs", "cancel", live.run_id).returncode == 0
    assert live.wait(timeout=60) == 130, live.output
    record = expkit_workspace.history.runs.get(live.run_id)
    assert record.state == "canceled"
    saved = expkit_workspace.run_dir(record.id) / "checkpoints"
    assert sorted(p.name for p in saved.iterdir()) == ["rank-0.txt", "rank-1.txt"]
    assert run_processes(record.id, expkit_workspace.path) == []


# -- end to end: a requeue and a resume go on from the checkpoint ----------------------------
# Attempt 1 trains until SIGUSR1, then checkpoints "step 7"; a later attempt says where it
# resumes from, writes it to outputs/resumed.txt, and waits for the file its argument names.
RESUMES = """
    import os
    import signal
    import sys
    import time

    checkpoint = os.path.join(os.environ["EXPKIT_CHECKPOINT_DIR"], "state.txt")
    attempt = os.environ["EXPKIT_ATTEMPT"]
    if os.path.exists(checkpoint):
        with open(checkpoint) as f:
            state = f.read()
        print(f"attempt {attempt} resuming from {state}", flush=True)
        os.makedirs("outputs", exist_ok=True)
        with open("outputs/resumed.txt", "w") as f:
            f.write(state)
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.05)
        sys.exit(0)


    def save(signum, frame):
        with open(checkpoint, "w") as f:
            f.write("step 7")
        sys.exit(0)


    signal.signal(signal.SIGUSR1, save)
    print(f"attempt {attempt} training", flush=True)
    if len(sys.argv) > 2:  # fails once it has checkpointed
        with open(checkpoint, "w") as f:
            f.write("step 7")
        sys.exit(1)
    while True:
        time.sleep(0.05)
"""


def test_a_requeue_stops_the_attempt_with_its_checkpoint_and_the_next_resumes_from_it(
    background, expkit_cli, expkit_workspace, write_job, tmp_path
):
    finish = tmp_path / "finish"
    spec = {
        "environment": "inherit",
        "args": [str(finish)],
        "retry": {"max_attempts": 2},
        "checkpoints": {"path": "ckpt", "grace_seconds": 30},
    }
    live = background("run", str(write_job(spec, script=RESUMES)))
    live.wait_for("attempt 1 training", timeout=60)
    requeued = expkit_cli("runs", "cancel", live.run_id, "--requeue")
    assert requeued.returncode == 0, requeued.stderr
    assert requeued.stdout == (
        "asked run 1 to stop attempt 1 (the script gets its stop signal to write a "
        "checkpoint) and start attempt 2 of 2\n"
    )
    live.wait_for("attempt 2 resuming from step 7", timeout=60)
    again = expkit_cli("runs", "cancel", live.run_id, "--requeue")  # 2 of 2: none left
    assert again.returncode == 2
    assert "run 1 is on its last attempt (2 of 2)" in error_line(again)
    finish.touch()
    assert live.wait(timeout=60) == 0, live.output
    record = expkit_workspace.history.runs.get(live.run_id)
    assert record.state == "completed" and record.attempt == 2
    attempts = expkit_workspace.history.attempts.of(record.id)
    assert [a.outcome for a in attempts] == ["preempted", "completed"]
    run_dir = expkit_workspace.run_dir(record.id)
    assert (run_dir / "outputs" / "resumed.txt").read_text() == "step 7"


def test_resume_of_a_failed_run_completes_from_its_checkpoint(
    expkit_cli, expkit_workspace, write_job, tmp_path
):
    finish = tmp_path / "finish"
    finish.touch()
    spec = {"environment": "inherit", "args": [str(finish), "fail"], "checkpoints": "ckpt"}
    failed = expkit_cli("run", str(write_job(spec, script=RESUMES)), timeout=120)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    run_id = run_id_of(failed.stdout)

    resumed = expkit_cli("runs", "resume", "1", timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "attempt 2 resuming from step 7" in resumed.stdout
    assert f"run {run_id}: completed" in resumed.stdout  # the summary, as `expkit run` ends
    record = expkit_workspace.history.runs.get(run_id)
    assert record.state == "completed" and record.attempt == 2
    attempts = expkit_workspace.history.attempts.of(run_id)
    assert [a.outcome for a in attempts] == ["failed", "completed"]
    outputs = expkit_workspace.run_dir(run_id) / "outputs"
    assert (outputs / "resumed.txt").read_text() == "step 7"

    refused = expkit_cli("runs", "resume", "1")  # completed: nothing to resume
    assert refused.returncode == 2
    error_line(refused)


def test_resume_detach_drives_the_next_attempt_in_the_background(
    expkit_cli, expkit_workspace, write_job, tmp_path
):
    finish = tmp_path / "finish"
    finish.touch()
    spec = {"environment": "inherit", "args": [str(finish), "fail"], "checkpoints": "ckpt"}
    assert expkit_cli("run", str(write_job(spec, script=RESUMES))).returncode == 1

    resumed = expkit_cli("runs", "resume", "1", "--detach")
    assert resumed.returncode == 0, resumed.stderr
    assert "goes on in the background" in resumed.stdout
    followed = expkit_cli("runs", "follow", "1", timeout=120)
    assert followed.returncode == 0, followed.stdout + followed.stderr
    record = expkit_workspace.history.runs.get(expkit_workspace.history.runs.find("1").id)
    assert record.state == "completed" and record.attempt == 2


def test_run_resume_in_python_completes_from_the_checkpoint(
    expkit_cli, expkit_workspace, write_job, tmp_path
):
    finish = tmp_path / "finish"
    finish.touch()
    spec = {"environment": "inherit", "args": [str(finish), "fail"], "checkpoints": "ckpt"}
    assert expkit_cli("run", str(write_job(spec, script=RESUMES))).returncode == 1
    run = Run(expkit_workspace, expkit_workspace.history.runs.find("1").id)

    details = run.resume().wait_for_completion(timeout=120)
    assert details["state"] == "completed"
    assert (run.run_dir / "outputs" / "resumed.txt").read_text() == "step 7"
    with pytest.raises(UserError):  # completed: nothing to resume
        run.resume()
