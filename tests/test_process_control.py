"""Stopping runs (Ctrl-C, SIGTERM, kill -9, `expkit runs cancel`) and runs sharing a machine.

Every test drives the real `expkit` command in its own session, signals it as a terminal or
an operator would, and checks what is left: the run's record, its outputs and its processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
from pathlib import Path

import pytest

from conftest import alive, eventually
from expkit.leases import Leases
from expkit.procs import run_processes
from expkit.workspace import Workspace

# Writes outputs/progress.txt, starts a `sleep 300` child, writes both pids to the file named by
# its first argument, then prints a line every 0.2 s forever.
FOREVER = """
    import os
    import subprocess
    import sys
    import time

    os.makedirs("outputs", exist_ok=True)
    with open("outputs/progress.txt", "w") as f:
        f.write("epoch 1 done\\n")
    child = subprocess.Popen(["sleep", "300"])
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    print("training started", flush=True)
    tick = 0
    while True:
        print(f"tick {tick}", flush=True)
        tick += 1
        time.sleep(0.2)
"""

# Records the slots table when the file `<arg>.read` exists, then holds until `<arg>.end` does.
HOLD_SLOTS = """
    import json
    import os
    import sys
    import time

    from expkit.workspace import Workspace

    base = sys.argv[1]
    print("holding", flush=True)
    while not os.path.exists(base + ".read"):
        time.sleep(0.05)
    history = Workspace(os.environ["EXPKIT_WORKSPACE"]).history
    rows = history.db.execute("select kind, slot, run_id from slots").fetchall()
    os.makedirs("outputs", exist_ok=True)
    with open("outputs/slots.json", "w") as f:
        json.dump([list(row) for row in rows], f)
    print("recorded", flush=True)
    while not os.path.exists(base + ".end"):
        time.sleep(0.05)
"""


def hold_slots_job(write_job, base: Path, slots: int) -> Path:
    """A job running HOLD_SLOTS (signal files `base`.read, `base`.end) on `slots` local slots."""
    return write_job(
        {"args": [str(base)], "compute": {"target": "local", "options": {"slots": slots}}},
        script=HOLD_SLOTS,
    )


@pytest.fixture
def forever_run(background, write_job, tmp_path):
    """`expkit run` of FOREVER, once its output shows: (live command, run id, script, sleep)."""
    pids = tmp_path / "pids"
    job = write_job({"args": [str(pids)]}, script=FOREVER)
    live = background("run", str(job))
    live.wait_for("tick 1")
    script_pid, sleep_pid = map(int, pids.read_text().split())
    assert alive(script_pid) and alive(sleep_pid)
    return live, live.run_id, script_pid, sleep_pid


def stages(workspace: Workspace, run_id: str) -> dict[str, str]:
    return {s.stage: s.state for s in workspace.history.stages.of(run_id)}


def assert_stopped_and_kept(workspace: Workspace, run_id: str, script: int, sleep: int) -> None:
    record = workspace.history.runs.get(run_id)
    assert record.state == "canceled"
    assert stages(workspace, run_id) == {
        "prepare": "completed",
        "scale": "completed",
        "run": "canceled",
        "post-process": "completed",
        "register": "skipped",
    }
    assert "progress.txt" in workspace.history.outputs.of(run_id)
    progress = workspace.run_dir(run_id) / "outputs" / "progress.txt"
    assert progress.read_text() == "epoch 1 done\n"
    assert run_processes(run_id, workspace.path) == []
    assert not alive(script)
    assert not alive(sleep)
    assert workspace.history.db.execute("select * from slots").fetchall() == []


# -- Ctrl-C and SIGTERM ---------------------------------------------------------------------
def test_ctrl_c_cancels_the_run_keeps_outputs_and_leaves_no_process(expkit_workspace, forever_run):
    live, run_id, script, sleep = forever_run
    os.killpg(live.proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
    assert live.wait(timeout=20) == 130
    assert_stopped_and_kept(expkit_workspace, run_id, script, sleep)
    assert f"run {run_id}: canceled" in live.output
    assert "canceled by the user" in live.output


def test_sigterm_to_the_driver_cancels_the_run(expkit_workspace, forever_run):
    live, run_id, script, sleep = forever_run
    live.proc.send_signal(signal.SIGTERM)
    assert live.wait(timeout=20) == 130
    assert_stopped_and_kept(expkit_workspace, run_id, script, sleep)
    # A signal is not the user: the record names it (it said "canceled by the user").
    assert expkit_workspace.history.runs.get(run_id).error == "terminated by SIGTERM"


# -- kill -9 --------------------------------------------------------------------------------
def test_kill_9_of_the_driver_is_found_and_cleaned_up_on_the_next_open(
    expkit_workspace, expkit_cli, forever_run
):
    live, run_id, script, sleep = forever_run
    live.proc.kill()
    live.wait()

    # The script dies with its parent; the record cannot know yet.
    eventually(lambda: not alive(script), timeout=10, what="the script dying with its driver")
    with sqlite3.connect(expkit_workspace.path / "history.db") as db:
        (state,) = db.execute("select state from runs where id = ?", (run_id,)).fetchone()
    assert state == "running"

    listing = expkit_cli("runs", "list")
    assert listing.returncode == 0, listing.stderr
    assert re.search(rf"^{run_id}\s+failed\s", listing.stdout, re.M), listing.stdout
    shown = expkit_cli("runs", "show", run_id)
    assert re.search(r"^error\s+the driver process \(pid \d+\) ended", shown.stdout, re.M), (
        shown.stdout
    )
    assert run_processes(run_id, expkit_workspace.path) == []
    eventually(lambda: not alive(sleep), timeout=10, what="the orphaned sleep being stopped")
    # Its slots are free: a lease is held only while its run is unfinished.
    assert Leases(expkit_workspace.history).holders("process") == {}


# -- expkit runs cancel ---------------------------------------------------------------------
def test_runs_cancel_stops_a_running_run_and_keeps_its_outputs(
    expkit_workspace, expkit_cli, forever_run
):
    live, run_id, script, sleep = forever_run
    asked = expkit_cli("runs", "cancel", run_id)
    assert asked.returncode == 0, asked.stderr
    assert f"asked run {run_id} to stop" in asked.stdout

    assert live.wait(timeout=10) == 130
    assert_stopped_and_kept(expkit_workspace, run_id, script, sleep)

    again = expkit_cli("runs", "cancel", run_id)
    assert again.returncode == 0
    assert f"run {run_id} already canceled" in again.stdout


def test_cancelling_a_finished_run_says_so(expkit_cli, run_job):
    result = run_job({}, script="print('done')\n")
    assert result.state == "completed"
    answer = expkit_cli("runs", "cancel", result.record.id)
    assert answer.returncode == 0
    assert f"run {result.record.id} already completed" in answer.stdout
    assert expkit_cli("runs", "show", result.record.id, "--json").returncode == 0
    assert result.workspace.history.runs.get(result.record.id).state == "completed"


# -- sharing the machine --------------------------------------------------------------------
def test_concurrent_runs_get_disjoint_slots_and_a_third_waits(
    expkit_workspace, background, write_job, tmp_path
):
    base = tmp_path / "signal"
    job = hold_slots_job(write_job, base, slots=2)
    first = background("run", str(job))
    first.wait_for("holding")
    second = background("run", str(job))
    second.wait_for("holding")
    third = background("run", str(job))
    a, b, c = first.run_id, second.run_id, third.run_id

    def third_waits() -> bool:
        record = expkit_workspace.history.runs.get(c)
        return record.state == "queued" and record.status is not None

    eventually(third_waits, what="the third run waiting for a slot")
    status = expkit_workspace.history.runs.get(c).status
    assert "waiting for 1 process slot" in status
    assert a in status and b in status
    assert "holding" not in third.output

    Path(f"{base}.read").touch()
    first.wait_for("recorded")
    second.wait_for("recorded")
    assert expkit_workspace.history.runs.get(c).state == "queued"  # nobody has let go yet

    Path(f"{base}.end").touch()
    assert first.wait() == 0, first.output
    assert second.wait() == 0, second.output
    assert third.wait() == 0, third.output
    assert [expkit_workspace.history.runs.get(r).state for r in (a, b, c)] == ["completed"] * 3

    for run_id in (a, b):
        seen = json.loads((expkit_workspace.run_dir(run_id) / "outputs" / "slots.json").read_text())
        process_slots = {slot: holder for kind, slot, holder in seen if kind == "process"}
        assert sorted(process_slots) == [0, 1], seen
        assert sorted(process_slots.values()) == sorted([a, b]), seen
    # Its slots are free: a lease is held only while its run is unfinished.
    assert Leases(expkit_workspace.history).holders("process") == {}


def test_a_queued_run_can_be_canceled_before_its_script_starts(
    expkit_workspace, expkit_cli, background, write_job, tmp_path
):
    base = tmp_path / "signal"
    job = hold_slots_job(write_job, base, slots=1)
    holder = background("run", str(job))
    holder.wait_for("holding")
    waiter = background("run", str(job))
    waiting = waiter.run_id
    eventually(lambda: expkit_workspace.history.runs.get(waiting).state == "queued", what="queued")

    assert expkit_cli("runs", "cancel", waiting).returncode == 0
    assert waiter.wait(timeout=10) == 130
    assert expkit_workspace.history.runs.get(waiting).state == "canceled"
    assert stages(expkit_workspace, waiting) == {
        "prepare": "completed",
        "scale": "canceled",
        "post-process": "skipped",
        "register": "skipped",
    }
    assert "holding" not in waiter.output
    held = expkit_workspace.history.db.execute("select run_id from slots").fetchall()
    assert [tuple(row) for row in held] == [(holder.run_id,)]

    Path(f"{base}.read").touch()
    Path(f"{base}.end").touch()
    assert holder.wait() == 0, holder.output


def test_asking_for_more_slots_than_the_machine_has_fails_at_once(expkit_cli, write_job):
    job = write_job(
        {
            "compute": {"target": "local", "options": {"slots": 2}},
            "resources": {"processes_per_node": 3},
        },
        script="print('never')\n",
    )
    result = expkit_cli("run", str(job), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "processes_per_node" in result.stderr
    assert "2 slots" in result.stderr
    assert "no runs yet" in expkit_cli("runs", "list").stdout


def test_a_failing_script_leaves_no_slot_leased(expkit_workspace, run_job):
    result = run_job(
        {"compute": {"target": "local", "options": {"slots": 2}}},
        script="import sys\nprint('boom')\nsys.exit(1)\n",
    )
    assert result.state == "failed"
    # Its slots are free: a lease is held only while its run is unfinished.
    assert Leases(expkit_workspace.history).holders("process") == {}
