"""Metrics across attempts: each value is kept with the attempt that logged it, and a step a
later attempt logged again supersedes the earlier value in the run's current curve
(`expkit metrics`, `Run.get_metrics`, plots), while `expkit metrics --all-attempts` and the
history keep both. Also how `expkit runs list` / `runs show` show a run's attempts."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import bare_env, error_line
from expkit import plot
from expkit.api import Run
from expkit.context import ATTEMPT_ENV, CHANNEL_ENV, RUN_ID_ENV
from expkit.metrics import MetricPump, attempt_of_file

LOG_STEPS = """
import os
import sys
from expkit import Run

run = Run.get_context()
first, last = int(sys.argv[1]), int(sys.argv[2])
for step in range(first, last + 1):
    run.log("loss", 100.0 * run.attempt + step, step=step)
run.log("note", f"attempt {run.attempt}")
pid = os.fork()  # a forked child (a DataLoader worker) records into a file of its own
if pid == 0:
    run.log("child", float(run.attempt))
    os._exit(0)
os.waitpid(pid, 0)
run.flush()
"""

TRAIN = """
from expkit import Run
run = Run.get_context()
for step in range(10):
    run.log("loss", 10.0 - step, step=step)
run.log("lap", 1.0)  # no step
"""


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def script_process(tmp_path, channel, run_id: str, attempt: int | None, first: int, last: int):
    """The script run by a real process writing to `channel`, as attempt `attempt` of the
    run (EXPKIT_ATTEMPT; None: not set, as in attempt 1 of a job started before attempts)."""
    script = tmp_path / "log_steps.py"
    script.write_text(textwrap.dedent(LOG_STEPS))
    env = bare_env(**{CHANNEL_ENV: str(channel), RUN_ID_ENV: run_id})
    if attempt is not None:
        env[ATTEMPT_ENV] = str(attempt)
    done = subprocess.run(
        [sys.executable, str(script), str(first), str(last)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


# -- the pump: each value with its attempt --------------------------------------------------------
def test_the_channel_file_name_says_the_attempt():
    assert attempt_of_file("rank-0.4242.jsonl") == 1
    assert attempt_of_file("rank-3.4242.a2.jsonl") == 2
    assert attempt_of_file("rank-0.4242.a12.jsonl") == 12
    assert attempt_of_file("rank-0.4242.a0.jsonl") == 1  # not a name expkit writes
    assert attempt_of_file("other.jsonl") == 1


def test_the_pump_stores_the_attempt_each_script_process_ran_as(expkit_workspace, tmp_path):
    history = expkit_workspace.history
    channel = tmp_path / "metrics"
    channel.mkdir()
    # Attempt 2's process runs first: its file is older, its pid likely lower. Its values
    # still come after attempt 1's, because the pump reads attempt by attempt.
    script_process(tmp_path, channel, "run_1", 2, 3, 4)
    script_process(tmp_path, channel, "run_1", None, 0, 4)

    pump = MetricPump(history, "run_1", channel)
    stored = pump.pump()

    names = sorted(p.name for p in channel.iterdir())
    assert sum(name.endswith(".a2.jsonl") for name in names) == 2  # the script's and its child's
    assert len(names) == 4
    rows = history.metrics.of("run_1")
    assert stored == len(rows) == (5 + 1 + 1) + (2 + 1 + 1)  # loss, note, child per attempt
    got = [(r["attempt"], r["name"], r["step"], r["value"]) for r in rows]
    by_attempt = [r["attempt"] for r in rows]
    assert by_attempt == sorted(by_attempt), got  # row ids follow the attempts
    assert [(r["step"], r["value"]) for r in rows if r["name"] == "loss" and r["attempt"] == 2] == [
        (3, 203.0),
        (4, 204.0),
    ]
    assert [r["value"] for r in rows if r["name"] == "loss" and r["attempt"] == 1] == [
        100.0,
        101.0,
        102.0,
        103.0,
        104.0,
    ]
    assert {(r["attempt"], r["value"]) for r in rows if r["name"] == "child"} == {
        (1, 1.0),
        (2, 2.0),
    }
    assert {(r["attempt"], json.loads(r["payload"])) for r in rows if r["name"] == "note"} == {
        (1, "attempt 1"),
        (2, "attempt 2"),
    }
    # What the run shows: attempt 1's steps 0..2, then attempt 2's 3..4.
    current = history.metrics.current("run_1", "loss")
    assert [(r["step"], r["value"]) for r in current] == [
        (0, 100.0),
        (1, 101.0),
        (2, 102.0),
        (3, 203.0),
        (4, 204.0),
    ]
    assert history.metrics.latest("run_1")["loss"] == 204.0
    assert history.metrics.latest("run_1")["note"] == "attempt 2"


# -- the rule: what a later attempt supersedes ----------------------------------------------------
def rows(attempt: int, steps, name: str = "loss", rank: int = 0):
    """History rows (name, step, value, payload, ts, rank, attempt): value = 100*attempt + step
    (100*attempt for a value without a step)."""
    now = time.time()
    return [(name, s, 100.0 * attempt + (s or 0), None, now, rank, attempt) for s in steps]


@pytest.fixture
def history(expkit_workspace):
    return expkit_workspace.history


def curve(history, run_id: str, name: str, rank: int = 0):
    return [
        (r["attempt"], r["step"], r["value"])
        for r in history.metrics.current(run_id, name)
        if r["rank"] == rank
    ]


def test_a_later_attempt_supersedes_the_steps_it_logged_again(history):
    history.metrics.add("r", rows(1, range(10)))
    history.metrics.add("r", rows(1, [None], name="lap"))  # unstepped: never superseded
    history.metrics.add("r", rows(1, range(10), rank=1))  # rank 1: attempt 2 logged nothing
    history.metrics.add("r", rows(1, range(4), name="acc"))  # attempt 2 does not log acc
    history.metrics.add("r", rows(2, [6, 7, 8]))
    history.metrics.add("r", rows(2, [None], name="lap"))

    assert curve(history, "r", "loss") == [(1, s, 100.0 + s) for s in range(6)] + [
        (2, s, 200.0 + s) for s in (6, 7, 8)
    ]
    assert curve(history, "r", "loss", rank=1) == [(1, s, 100.0 + s) for s in range(10)]
    assert curve(history, "r", "acc") == [(1, s, 100.0 + s) for s in range(4)]
    assert curve(history, "r", "lap") == [(1, None, 100.0), (2, None, 200.0)]  # both kept
    # Any metric name (the rule's cutoffs go to SQLite as JSON).
    history.metrics.add("r", rows(1, range(3), name='val/ácc "✓"'))
    history.metrics.add("r", rows(2, [1], name='val/ácc "✓"'))
    assert curve(history, "r", 'val/ácc "✓"') == [(1, 0, 100.0), (2, 1, 201.0)]
    # The whole run at once: the same rows, in the order they arrived.
    every = history.metrics.current("r")
    assert [r["id"] for r in every] == sorted(r["id"] for r in every)
    assert len(every) == 6 + 3 + 10 + 4 + 2 + 2
    # Both attempts' values stay in the history.
    assert history.metrics.count("r", "loss") == 10 + 3 + 10
    assert len(history.metrics.of("r", "loss")) == 23
    # The last values are the current ones.
    assert history.metrics.latest("r")["loss"] == 208.0
    assert history.metrics.last_of(["r"], "loss") == {"r": 208.0}


def test_each_attempt_is_cut_where_the_next_ones_went_back_to(history):
    history.metrics.add("r", rows(1, range(10)))
    history.metrics.add("r", rows(2, [5, 6, 7]))
    history.metrics.add("r", rows(3, [6, 7, 8]))

    assert curve(history, "r", "loss") == [
        *[(1, s, 100.0 + s) for s in range(5)],
        (2, 5, 205.0),
        *[(3, s, 300.0 + s) for s in (6, 7, 8)],
    ]


def test_an_attempt_that_goes_further_supersedes_nothing(history):
    """A run resumed from a checkpoint at its last step, or a later attempt that went back
    further than an attempt before it (attempt 3 from step 2 drops attempt 2's steps too)."""
    history.metrics.add("r", rows(1, range(5)))
    history.metrics.add("r", rows(2, range(5, 8)))
    assert curve(history, "r", "loss") == [(1, s, 100.0 + s) for s in range(5)] + [
        (2, s, 200.0 + s) for s in range(5, 8)
    ]
    history.metrics.add("r", rows(3, [2, 3]))
    assert curve(history, "r", "loss") == [
        (1, 0, 100.0),
        (1, 1, 101.0),
        (3, 2, 302.0),
        (3, 3, 303.0),
    ]


def test_other_runs_and_one_attempt_runs_are_left_as_logged(history):
    history.metrics.add("a", rows(1, [0, 1, 2, 1, 2]))  # one attempt logging a step twice
    history.metrics.add("b", rows(2, [0]))
    assert curve(history, "a", "loss") == [(1, s, 100.0 + s) for s in [0, 1, 2, 1, 2]]
    assert [r["attempt"] for r in history.metrics.of("a")] == [1] * 5
    # Rows added without their attempt (a 6-tuple) are attempt 1's.
    history.metrics.add("c", [("x", 0, 1.0, None, time.time(), 0)])
    assert history.metrics.of("c")[0]["attempt"] == 1


def test_get_metrics_and_plots_show_the_current_curve(history, expkit_workspace):
    history.metrics.add("r", rows(1, range(10)))
    history.metrics.add("r", rows(2, [6, 7, 8]))

    got = Run(expkit_workspace, "r").get_metrics()
    assert got["loss"] == [100.0 + s for s in range(6)] + [206.0, 207.0, 208.0]

    curves, _ = plot.curves(history, "r")
    assert curves["loss"].xs == list(range(9))
    assert curves["loss"].ys == got["loss"]


# -- expkit metrics on a run whose second attempt went back to a checkpoint ----------------------
# Attempt 1 logs steps 0..9, checkpointing after step 5, and exits 75 (retryable); attempt 2
# resumes from the checkpoint at step 6 and logs steps 6..8. loss = 100 * attempt + step.
RESUMING = """
import json, os, sys
from expkit import Run

run = Run.get_context()
path = os.path.join(run.checkpoint_dir, "step.json")
start = json.load(open(path))["step"] if os.path.exists(path) else 0
for step in range(start, 10 if run.attempt == 1 else 9):
    run.log("loss", 100.0 * run.attempt + step, step=step)
    if step == 5:
        with open(path, "w") as f:
            json.dump({"step": step + 1}, f)
run.log("lap", float(run.attempt))  # no step
print(f"attempt {run.attempt} from step {start}", flush=True)
sys.exit(75 if run.attempt == 1 else 0)
"""

RETRY = {"retry": {"max_attempts": 3, "on": [{"exit_codes": [75]}]}, "checkpoints": "./checkpoints"}


@pytest.fixture
def retried(expkit_cli, expkit_workspace, write_job):
    """A run completed on its second attempt, which resumed from attempt 1's checkpoint."""
    out = ok(expkit_cli("run", str(write_job(RETRY, script=RESUMING))))
    assert "attempt 2 from step 6" in out, out
    (record,) = expkit_workspace.history.runs.recent(limit=10)
    assert (record.state, record.attempt) == ("completed", 2)
    return record


def test_expkit_metrics_shows_the_current_curve_and_all_attempts_on_request(
    retried, expkit_cli, expkit_workspace
):
    out = ok(expkit_cli("metrics", retried.id, "loss"))
    lines = out.splitlines()
    assert lines[0].split() == ["METRIC", "STEP", "ATTEMPT", "VALUE", "TIME"]
    shown = [line.split()[:4] for line in lines[1:-1]]
    assert shown == [["loss", str(s), "1", f"{100 + s}"] for s in range(6)] + [
        ["loss", str(s), "2", f"{200 + s}"] for s in (6, 7, 8)
    ]
    assert lines[-1] == (
        "(not shown: 4 values of earlier attempts, logged again by a later attempt; "
        "--all-attempts shows them)"
    )

    everything = ok(expkit_cli("metrics", retried.id, "loss", "--all-attempts")).splitlines()
    assert everything[0].split() == ["METRIC", "STEP", "ATTEMPT", "VALUE", "TIME"]
    assert [line.split()[:4] for line in everything[1:]] == [
        ["loss", str(s), "1", f"{100 + s}"] for s in range(10)
    ] + [["loss", str(s), "2", f"{200 + s}"] for s in (6, 7, 8)]

    # The whole run: the unstepped values of both attempts are kept.
    whole = ok(expkit_cli("metrics", retried.id)).splitlines()
    assert [line.split()[:4] for line in whole if line.startswith("lap")] == [
        ["lap", "-", "1", "1"],
        ["lap", "-", "2", "2"],
    ]
    # The latest values are the current ones; the API gives the current curve.
    assert "  loss                     208" in ok(expkit_cli("runs", "show", retried.id))
    got = Run(expkit_workspace, retried.id).get_metrics()
    assert got["loss"] == [100.0 + s for s in range(6)] + [206.0, 207.0, 208.0]
    assert got["lap"] == [1.0, 2.0]


def test_a_run_with_one_attempt_shows_no_attempt_column(run_job, expkit_cli):
    result = run_job({}, script=TRAIN)
    lines = ok(expkit_cli("metrics", result.record.id, "loss")).splitlines()
    assert lines[0].split() == ["METRIC", "STEP", "VALUE", "TIME"]
    assert len(lines) == 11
    everything = ok(expkit_cli("metrics", result.record.id, "--all-attempts")).splitlines()
    assert everything[0].split() == ["METRIC", "STEP", "ATTEMPT", "VALUE", "TIME"]
    assert {line.split()[2] for line in everything[1:]} == {"1"}


def test_all_attempts_is_for_one_run_listed(run_job, expkit_cli, tmp_path):
    run_job({}, script=TRAIN)
    run_job({}, script=TRAIN)
    for args in (["test_1", "test_2"], ["test_1", "--plot", str(tmp_path / "x.png")]):
        result = expkit_cli("metrics", *args, "--all-attempts")
        assert result.returncode == 2
        assert "--all-attempts: lists one run's values" in error_line(result)


# -- the run's attempts in runs list / runs show ---------------------------------------------------
def test_runs_show_lists_the_attempts_and_json_has_them(retried, expkit_cli, expkit_workspace):
    out = ok(expkit_cli("runs", "show", retried.id)).splitlines()
    assert "state       completed (attempt 2 of 3)" in out
    start = out.index("attempts (at most 3)")
    table = out[start + 1 : start + 4]
    assert table[0].split() == ["#", "STARTED", "DURATION", "OUTCOME", "EXIT", "REASON"]
    # #, STARTED (a date and a time), DURATION, OUTCOME, EXIT, REASON
    first, second = (line.split() for line in table[1:])
    assert first[0] == "1" and first[4:6] == ["failed", "75"]
    assert "the script exited with code 75" in table[1]
    assert second[0] == "2" and second[4:6] == ["completed", "0"]

    details = json.loads(ok(expkit_cli("runs", "show", retried.id, "--json")))
    assert details["attempt"] == 2
    attempts = details["attempts"]
    assert [(a["attempt"], a["outcome"], a["exit_code"]) for a in attempts] == [
        (1, "failed", 75),
        (2, "completed", 0),
    ]
    assert "the script exited with code 75" in attempts[0]["reason"]
    assert all(a["ended"] >= a["started"] > 0 for a in attempts)
    assert set(attempts[0]) == {"attempt", "started", "ended", "outcome", "reason", "exit_code"}
    assert details["metrics"]["loss"] == 208.0
    assert Run(expkit_workspace, retried.id).get_details()["attempts"] == attempts

    listing = ok(expkit_cli("runs", "list")).splitlines()
    assert listing[1].split()[:5] == [retried.id, "completed", "(attempt", "2", "of"]


def test_a_run_with_one_attempt_and_no_retries_shows_no_attempts(run_job, expkit_cli):
    result = run_job({}, script=TRAIN)
    out = ok(expkit_cli("runs", "show", result.record.id))
    assert "attempts" not in out
    assert "state       completed\n" in out
    listing = ok(expkit_cli("runs", "list")).splitlines()
    assert listing[1].split()[:2] == ["test_1", "completed"]
    assert "attempt" not in listing[1]


# Attempt N waits for the file ARG + N, then exits 75 (retryable) in attempt 1, 0 after.
WAIT_FOR_GO = """
import os
import sys
import time

attempt = int(os.environ["EXPKIT_ATTEMPT"])
print(f"attempt {attempt} waits", flush=True)
while not os.path.exists(sys.argv[1] + str(attempt)):
    time.sleep(0.05)
sys.exit(75 if attempt == 1 else 0)
"""


def test_runs_list_shows_the_attempt_of_a_running_run(background, write_job, expkit_cli, tmp_path):
    go = tmp_path / "go"
    job = write_job({**RETRY, "args": [str(go)]}, script=WAIT_FOR_GO)
    live = background("run", str(job))
    try:
        live.wait_for("attempt 1 waits")
        listing = ok(expkit_cli("runs", "list")).splitlines()
        assert "running (attempt 1 of 3)" in listing[1], listing
        (tmp_path / "go1").touch()
        live.wait_for("attempt 2 waits")
        listing = ok(expkit_cli("runs", "list")).splitlines()
        assert "running (attempt 2 of 3)" in listing[1], listing
        shown = ok(expkit_cli("runs", "show", "test_1"))
        assert "state       running (attempt 2 of 3)" in shown
        lines = shown.splitlines()
        table = lines[lines.index("attempts (at most 3)") + 1 :][:3]
        assert [line.split()[0] for line in table] == ["#", "1", "2"]
        assert table[1].split()[4:6] == ["failed", "75"]
        assert table[2].split()[4:] == ["running", "-"]
    finally:
        (tmp_path / "go2").touch()
        assert live.wait() == 0
    listing = ok(expkit_cli("runs", "list")).splitlines()
    assert "completed (attempt 2 of 3)" in listing[1], listing
