"""Attempts of one run: retries after a retryable failure, the checkpoint folder carried from
one attempt to the next, the wait between attempts, a driver killed between attempts, and a
failed run resumed from its last checkpoint.

Each test drives a tiny script through the real `expkit` command (or, for resume, through the
lifecycle itself) and looks at what a user would: the run's record, its attempts, its model
versions and the files the script left.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal

import pytest

from conftest import alive, eventually
from expkit import lifecycle
from expkit.console import Console
from expkit.driver import start_driver
from expkit.errors import UserError
from expkit.job import JobSpec
from expkit.plugin import hookimpl
from expkit_local.target import LocalTarget

# Attempt N (EXPKIT_ATTEMPT) exits with the N-th of the codes given as args (0 past the last),
# after noting in its checkpoint folder and outputs which attempt it was and what it found.
FLAKY = """
import json, os, sys
attempt = int(os.environ["EXPKIT_ATTEMPT"])
folder = os.environ.get("EXPKIT_CHECKPOINT_DIR")
found = None
if folder:
    path = os.path.join(folder, "state.json")
    if os.path.exists(path):
        found = json.load(open(path))
    with open(path, "w") as f:
        json.dump({"epoch": attempt * 10, "written_by": attempt}, f)
config = open("config.txt").read() if os.path.exists("config.txt") else None
with open("config.txt", "a") as f:
    f.write(f"changed by attempt {attempt}\\n")
os.makedirs("outputs", exist_ok=True)
with open(os.path.join("outputs", f"attempt-{attempt}.json"), "w") as f:
    json.dump({"attempt": attempt, "found": found, "folder": folder, "config": config}, f)
codes = [int(c) for c in sys.argv[1:]]
code = codes[attempt - 1] if attempt <= len(codes) else 0
print(f"attempt {attempt} exits {code}", flush=True)
sys.exit(code)
"""

RETRY_75 = {"max_attempts": 3, "on": [{"exit_codes": [75]}]}


def attempts_of(workspace, run_id):
    return workspace.history.attempts.of(run_id)


def only_run(workspace):
    (record,) = workspace.history.runs.recent(limit=10)
    return record


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# -- retries --------------------------------------------------------------------------------
def test_a_retryable_exit_code_then_success_completes_with_two_attempts_and_one_model(
    expkit_cli, expkit_workspace, write_job
):
    job = write_job(
        {"args": ["75"], "retry": RETRY_75, "model": {"name": "m", "path": "outputs/"}},
        script=FLAKY,
    )
    out = ok(expkit_cli("run", str(job)))

    record = only_run(expkit_workspace)
    assert record.state == "completed"
    assert record.attempt == 2
    rows = attempts_of(expkit_workspace, record.id)
    assert [(a.attempt, a.outcome, a.exit_code) for a in rows] == [
        (1, "failed", 75),
        (2, "completed", 0),
    ]
    assert "the script exited with code 75" in rows[0].reason
    assert all(a.ended is not None for a in rows)
    assert re.search(r"attempt 1 of 3 failed: .*code 75.*; attempt 2 in 0s", out), out
    # Post-process and register ran once, after the last attempt: one model version.
    assert [v["version"] for v in expkit_workspace.history.models.versions("m")] == [1]
    stages = {s.stage: s for s in expkit_workspace.history.stages.of(record.id)}
    assert stages["run"].state == "completed"
    assert stages["run"].message == "exit code 0 (attempt 2 of 3)"
    # What both attempts wrote into ./outputs is sealed (the working copy was kept).
    assert set(expkit_workspace.history.outputs.of(record.id)) == {
        "attempt-1.json",
        "attempt-2.json",
    }


# Attempt 1 exits 75; attempt 2 reads the run's record (as `expkit runs list` would) while it
# runs and notes what it found in its outputs.
SEES_OWN_RECORD = """
import json, os, sqlite3, sys
attempt = int(os.environ["EXPKIT_ATTEMPT"])
if attempt == 1:
    sys.exit(75)
db = sqlite3.connect("file:" + os.environ["EXPKIT_WORKSPACE"] + "/history.db?mode=ro", uri=True)
state, code = db.execute(
    "SELECT state, exit_code FROM runs WHERE id = ?", (os.environ["EXPKIT_RUN_ID"],)
).fetchone()
os.makedirs("outputs", exist_ok=True)
with open("outputs/seen.json", "w") as f:
    json.dump({"state": state, "exit_code": code}, f)
"""


def test_a_running_retry_shows_no_exit_code_of_the_attempt_before(
    expkit_cli, expkit_workspace, write_job
):
    """`runs list` must not say `running (attempt 2 of 3) ... EXIT 75`: attempt 1's code is
    in its attempt's row, the run has none until it ends."""
    job = write_job({"retry": RETRY_75}, script=SEES_OWN_RECORD)
    ok(expkit_cli("run", str(job)))

    record = only_run(expkit_workspace)
    seen = json.loads((expkit_workspace.run_dir(record.id) / "outputs" / "seen.json").read_text())
    assert seen == {"state": "running", "exit_code": None}
    assert record.exit_code == 0
    assert [a.exit_code for a in attempts_of(expkit_workspace, record.id)] == [75, 0]


def test_a_failure_retry_does_not_name_fails_the_run_after_one_attempt(
    expkit_cli, expkit_workspace, write_job
):
    job = write_job({"args": ["3"], "retry": RETRY_75}, script=FLAKY)
    result = expkit_cli("run", str(job))

    assert result.returncode == 1, result.stdout + result.stderr
    record = only_run(expkit_workspace)
    assert record.state == "failed"
    assert record.exit_code == 3
    rows = attempts_of(expkit_workspace, record.id)
    assert [(a.attempt, a.outcome, a.exit_code) for a in rows] == [(1, "failed", 3)]
    assert record.error.startswith("run: the script exited with code 3")
    assert record.error.endswith("(attempt 1 of 3)")
    assert "attempt 2" not in result.stdout


def test_a_run_that_fails_every_attempt_fails_on_its_last_and_says_so(
    expkit_cli, expkit_workspace, write_job
):
    job = write_job({"args": ["75", "75", "75", "75"], "retry": RETRY_75}, script=FLAKY)
    result = expkit_cli("run", str(job))

    assert result.returncode == 1, result.stdout + result.stderr
    record = only_run(expkit_workspace)
    assert record.state == "failed"
    assert record.attempt == 3
    rows = attempts_of(expkit_workspace, record.id)
    assert [(a.outcome, a.exit_code) for a in rows] == [("failed", 75)] * 3
    assert record.error.endswith("(attempt 3 of 3)"), record.error
    assert "attempt 4" not in result.stdout


def test_a_job_without_retry_has_one_attempt_and_no_attempt_count_in_its_error(
    expkit_cli, expkit_workspace, write_job
):
    job = write_job({"args": ["75"]}, script=FLAKY)
    result = expkit_cli("run", str(job))

    assert result.returncode == 1
    record = only_run(expkit_workspace)
    assert [a.outcome for a in attempts_of(expkit_workspace, record.id)] == ["failed"]
    assert record.error.endswith("last output: attempt 1 exits 75"), record.error


# -- the checkpoint folder ------------------------------------------------------------------
def test_the_checkpoint_folder_is_carried_to_the_next_attempt_and_kept_in_the_run(
    expkit_cli, expkit_workspace, write_job
):
    job = write_job(
        {"args": ["75"], "retry": RETRY_75, "checkpoints": "./ckpt"},
        script=FLAKY,
        # the source's own folder of that name is not a checkpoint of this run
        files={
            "ckpt/state.json": '{"epoch": 999, "written_by": "the source folder"}',
            "config.txt": "",
        },
    )
    ok(expkit_cli("run", str(job)))

    record = only_run(expkit_workspace)
    run_dir = expkit_workspace.run_dir(record.id)
    first = json.loads((run_dir / "outputs" / "attempt-1.json").read_text())
    second = json.loads((run_dir / "outputs" / "attempt-2.json").read_text())
    assert first["attempt"] == 1 and second["attempt"] == 2  # EXPKIT_ATTEMPT as seen
    assert first["found"] is None  # made empty before attempt 1
    assert second["found"] == {"epoch": 10, "written_by": 1}  # what attempt 1 left
    assert first["folder"] == str(run_dir / "work" / "ckpt")
    assert second["config"] == "changed by attempt 1\n"  # the same working copy
    # At post-process the folder moved into the run, as the last attempt left it.
    kept = run_dir / "checkpoints" / "state.json"
    assert json.loads(kept.read_text()) == {"epoch": 20, "written_by": 2}
    assert not (run_dir / "work").exists()


# -- between attempts -----------------------------------------------------------------------
def test_the_next_attempt_starts_after_the_backoff(expkit_cli, expkit_workspace, write_job):
    job = write_job({"args": ["75"], "retry": {**RETRY_75, "backoff_seconds": 1.5}}, script=FLAKY)
    out = ok(expkit_cli("run", str(job)))

    record = only_run(expkit_workspace)
    first, second = attempts_of(expkit_workspace, record.id)
    assert second.started - first.ended >= 1.5
    assert "attempt 2 in 1.5s" in out


def test_a_cancel_during_the_backoff_cancels_the_run(
    expkit_cli, expkit_workspace, background, write_job
):
    job = write_job({"args": ["75"], "retry": {**RETRY_75, "backoff_seconds": 600}}, script=FLAKY)
    live = background("run", str(job))
    run_id = live.run_id
    live.wait_for("attempt 2 in 600s")
    ok(expkit_cli("runs", "cancel", run_id))

    assert live.wait(timeout=30) == 130, live.output
    record = expkit_workspace.history.runs.get(run_id)
    assert record.state == "canceled"
    assert [a.outcome for a in attempts_of(expkit_workspace, run_id)] == ["failed"]


def test_a_requeue_during_the_backoff_says_it_starts_the_next_attempt_now(
    expkit_cli, expkit_workspace, background, write_job
):
    """Attempt 1 has already ended: the line must not say it stops it."""
    job = write_job(
        {
            "args": ["75"],
            "retry": {
                **RETRY_75,
                "on": ["preempted", {"exit_codes": [75]}],
                "backoff_seconds": 600,
            },
        },
        script=FLAKY,
    )
    live = background("run", str(job))
    run_id = live.run_id
    live.wait_for("attempt 2 in 600s")
    out = ok(expkit_cli("runs", "cancel", "--requeue", run_id))

    assert "stop attempt 1" not in out
    assert "attempt 1 already ended" in out and "start attempt 2 of 3 now" in out
    assert live.wait(timeout=30) == 0, live.output
    outcomes = [a.outcome for a in attempts_of(expkit_workspace, run_id)]
    assert outcomes == ["failed", "completed"]


# -- a driver that dies ---------------------------------------------------------------------
def detached_run(expkit_cli, expkit_workspace, job):
    """`expkit run --detach JOB`: its run id and its background driver's pid."""
    out = ok(expkit_cli("run", "--detach", str(job)))
    run_id = re.search(r"^run \d+ \((\S+)\) goes on", out, re.M).group(1)
    return run_id, expkit_workspace.history.runs.get(run_id).driver_pid


def said(workspace, run_id, text):
    return any(text in e["message"] for e in workspace.history.events.of(run_id))


def test_kill_9_of_the_driver_between_attempts_leaves_a_failed_run_to_resume(
    expkit_cli, expkit_workspace, write_job
):
    job = write_job(
        {
            "args": ["75"],
            "retry": {**RETRY_75, "backoff_seconds": 600},
            "checkpoints": "./ckpt",
        },
        script=FLAKY,
    )
    run_id, driver = detached_run(expkit_cli, expkit_workspace, job)
    eventually(lambda: said(expkit_workspace, run_id, "attempt 2 in 600s"), what="the backoff")
    os.kill(driver, signal.SIGKILL)
    eventually(lambda: not alive(driver), timeout=10, what="the driver dying")

    listing = ok(expkit_cli("runs", "list"))
    assert re.search(rf"^{run_id}\s+failed", listing, re.M), listing
    record = expkit_workspace.history.runs.get(run_id)
    assert record.error.startswith(
        f"the driver process (pid {driver}) ended between attempts 1 and 2; "
        f"`expkit runs resume {record.number}` starts attempt 2 from its last checkpoint; "
        "its outputs were not sealed"  # what attempt 1 wrote is kept
    ), record.error
    assert [a.outcome for a in attempts_of(expkit_workspace, run_id)] == ["failed"]
    # The checkpoint folder the working copy held is kept in the run for the resume.
    kept = expkit_workspace.run_dir(run_id) / "checkpoints" / "state.json"
    assert json.loads(kept.read_text()) == {"epoch": 10, "written_by": 1}


def test_kill_9_of_the_driver_during_an_attempt_records_the_attempt_lost(
    expkit_cli, expkit_workspace, write_job
):
    script = "import os, time\nprint('attempt', os.environ['EXPKIT_ATTEMPT'], flush=True)\n"
    script += "time.sleep(600)\n"
    job = write_job({"retry": {"max_attempts": 2}}, script=script)
    run_id, driver = detached_run(expkit_cli, expkit_workspace, job)
    eventually(
        lambda: expkit_workspace.history.attempts.of(run_id) != [], what="attempt 1 starting"
    )
    os.kill(driver, signal.SIGKILL)
    eventually(lambda: not alive(driver), timeout=10, what="the driver dying")

    listing = ok(expkit_cli("runs", "list"))
    assert re.search(rf"^{run_id}\s+failed", listing, re.M), listing
    (attempt,) = attempts_of(expkit_workspace, run_id)
    assert attempt.outcome == "lost"
    assert attempt.reason == f"the driver process (pid {driver}) ended during attempt 1"
    record = expkit_workspace.history.runs.get(run_id)
    assert record.error == (
        f"the driver process (pid {driver}) ended during attempt 1; "
        f"`expkit runs resume {record.number}` starts attempt 2"
    )


# -- resume ---------------------------------------------------------------------------------
def test_resume_of_a_failed_run_restores_its_working_copy_and_checkpoints(
    expkit_cli, expkit_workspace, expkit_plugins, write_job
):
    job = write_job(
        {
            "args": ["3"],
            "checkpoints": "./ckpt",
            "model": {"name": "m", "path": "outputs/"},
        },
        script=FLAKY,
        files={"config.txt": "original\n"},
    )
    result = expkit_cli("run", str(job))
    assert result.returncode == 1
    record = only_run(expkit_workspace)
    run_dir = expkit_workspace.run_dir(record.id)
    assert (run_dir / "checkpoints" / "state.json").is_file()

    reopened = lifecycle.reopen(expkit_workspace, record.id)
    assert reopened.state == "queued"
    stream = io.StringIO()
    final = lifecycle.drive(
        expkit_workspace, record.id, Console(stream), expkit_plugins, resume=True
    )

    assert final.state == "completed", stream.getvalue() + str(final.error)
    assert final.attempt == 2
    rows = attempts_of(expkit_workspace, record.id)
    assert [(a.attempt, a.outcome) for a in rows] == [(1, "failed"), (2, "completed")]
    second = json.loads((run_dir / "outputs" / "attempt-2.json").read_text())
    assert second["found"] == {"epoch": 10, "written_by": 1}  # attempt 1's checkpoint
    assert json.loads((run_dir / "checkpoints" / "state.json").read_text())["written_by"] == 2
    # The working copy was made again from the snapshot: attempt 1's change is gone; its
    # outputs were carried and are sealed again with attempt 2's.
    assert second["config"] == "original\n"
    assert set(expkit_workspace.history.outputs.of(record.id)) == {
        "attempt-1.json",
        "attempt-2.json",
    }
    assert [v["version"] for v in expkit_workspace.history.models.versions("m")] == [1]
    stages = {s.stage: s.state for s in expkit_workspace.history.stages.of(record.id)}
    assert stages == {
        "prepare": "completed",
        "scale": "completed",
        "run": "completed",
        "post-process": "completed",
        "register": "completed",
    }
    assert "checkpoint folder ckpt put back: 1 file\n" in stream.getvalue()


def test_resume_refuses_what_cannot_be_resumed_in_one_line(
    expkit_workspace, expkit_plugins, run_job, write_job
):
    done = run_job({}, script="print('done')\n")
    with pytest.raises(UserError, match=r"completed: there is nothing to resume"):
        lifecycle.reopen(expkit_workspace, done.record.id)

    job = JobSpec.from_dict({"experiment": "test", "entry_script": "train.py"}, source="t")
    queued = expkit_workspace.history.runs.create("test", job.to_dict())
    with pytest.raises(UserError, match=r"is queued: only a failed or canceled run"):
        lifecycle.reopen(expkit_workspace, queued.id)

    failed = run_job({}, script="raise SystemExit(3)\n")
    assert failed.state == "failed"
    sweep = expkit_workspace.history.sweeps.create("test", {})
    history = expkit_workspace.history
    history.runs.update(failed.record.id, sweep=sweep.id, trial=4)
    with pytest.raises(UserError, match=rf"trial 4 of sweep {sweep.id}: resume the sweep"):
        lifecycle.reopen(expkit_workspace, failed.record.id)

    history.runs.update(failed.record.id, sweep=None, trial=None)
    prepared = failed.run_dir / "prepared.json"
    saved = json.loads(prepared.read_text())
    del saved["data"]  # as an expkit before resume wrote it
    prepared.write_text(json.dumps(saved))
    with pytest.raises(UserError, match=r"cannot be resumed: what prepare made"):
        lifecycle.reopen(expkit_workspace, failed.record.id)
    assert history.runs.get(failed.record.id).state == "failed"  # left as it was


def test_a_background_driver_resumes_a_run_reopened_for_it(expkit_cli, expkit_workspace, write_job):
    job = write_job({"args": ["3"], "checkpoints": "./ckpt"}, script=FLAKY)
    assert expkit_cli("run", str(job)).returncode == 1
    record = only_run(expkit_workspace)
    lifecycle.reopen(expkit_workspace, record.id)
    start_driver(expkit_workspace, record.id, resume=True)

    eventually(
        lambda: expkit_workspace.history.runs.get(record.id).finished, what="the resumed run"
    )
    assert expkit_workspace.history.runs.get(record.id).state == "completed"
    second = json.loads(
        (expkit_workspace.run_dir(record.id) / "outputs" / "attempt-2.json").read_text()
    )
    assert second["found"] == {"epoch": 10, "written_by": 1}


# -- a driver that re-attaches to a Slurm job -----------------------------------------------
def test_a_driver_that_re_attaches_goes_on_with_the_same_attempt(
    slurm_cluster, expkit_workspace, expkit_cli, expkit_cli_background, write_job
):
    script = """
import os, time
print("attempt", os.environ.get("EXPKIT_ATTEMPT"), flush=True)
time.sleep(6)
os.makedirs("outputs", exist_ok=True)
open("outputs/attempt.txt", "w").write(os.environ.get("EXPKIT_ATTEMPT", "?"))
"""
    spec = {
        "compute": {"target": "slurm", "options": {"poll_seconds": 0.5}},
        "distributed": "none",
        "timeout": 120,
        "retry": {"max_attempts": 2},
    }
    live = expkit_cli_background("run", str(write_job(spec, script)), env=slurm_cluster.env)
    live.wait_for("attempt 1", timeout=60)
    run_id = live.run_id
    os.killpg(live.proc.pid, signal.SIGKILL)  # the driver gone; the Slurm job goes on
    live.proc.wait()

    result = expkit_cli("runs", "follow", run_id, env=slurm_cluster.env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    record = expkit_workspace.history.runs.get(run_id)
    assert record.state == "completed", record.error
    rows = attempts_of(expkit_workspace, run_id)
    assert [(a.attempt, a.outcome) for a in rows] == [(1, "completed")]
    assert rows[0].remote_job and rows[0].remote_job.startswith("slurm:")
    outputs = expkit_workspace.run_dir(run_id) / "outputs" / "attempt.txt"
    assert outputs.read_text() == "1"


# -- the next attempt started by someone else -----------------------------------------------
def test_a_requeue_asked_for_during_an_attempt_preempts_it_and_the_next_one_starts(
    expkit_workspace, background, write_job
):
    script = """
import os, sys, time
attempt = os.environ["EXPKIT_ATTEMPT"]
print("attempt", attempt, "up", flush=True)
if attempt == "1":
    time.sleep(600)
"""
    live = background("run", str(write_job({"retry": {"max_attempts": 2}}, script=script)))
    run_id = live.run_id
    live.wait_for("attempt 1 up")
    expkit_workspace.history.runs.request_requeue(run_id)  # `expkit runs cancel --requeue`

    assert live.wait(timeout=60) == 0, live.output
    record = expkit_workspace.history.runs.get(run_id)
    assert record.state == "completed"
    assert record.requeue_requested == 0 and record.cancel_requested == 0
    rows = attempts_of(expkit_workspace, run_id)
    assert [(a.attempt, a.outcome) for a in rows] == [(1, "preempted"), (2, "completed")]
    assert "requeue" in rows[0].reason
    assert "attempt 1 of 2 preempted: a requeue was asked for" in live.output


class RequeuedByItsService(LocalTarget):
    """The local target, as a service that starts the job again by itself would tell it: a
    requeue before the processes start, asked for twice."""

    name = "requeuing"

    def __init__(self) -> None:
        self.answers: list[bool] = []

    def execute(self, ctx, processes, allocation):
        self.answers.append(ctx.requeued("preempted", "the node was taken back"))
        self.answers.append(ctx.requeued("preempted", "the node was taken back again"))
        for process in processes:  # as the service's next start would see it
            process.env["EXPKIT_ATTEMPT"] = str(ctx.attempt)
        return super().execute(ctx, processes, allocation)


def test_requeued_records_the_next_attempt_until_none_are_left(register_plugin, run_job):
    target = RequeuedByItsService()

    class Plugin:
        @hookimpl
        def expkit_compute_targets(self):
            return [target]

    register_plugin(Plugin(), "requeuing")
    script = "import os\nprint('attempt', os.environ['EXPKIT_ATTEMPT'])\n"
    result = run_job(
        {"compute": {"target": "requeuing"}, "retry": {"max_attempts": 2}}, script=script
    )

    assert result.state == "completed", result.output
    assert target.answers == [True, False]  # one requeue allowed by max_attempts: 2
    rows = attempts_of(result.workspace, result.record.id)
    assert [(a.attempt, a.outcome, a.reason) for a in rows] == [
        (1, "preempted", "the node was taken back"),
        (2, "completed", "exit code 0"),
    ]
    assert "attempt 2" in (result.run_dir / "logs" / "rank-0.log").read_text()
