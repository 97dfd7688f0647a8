"""The sweep's driver end to end, through the `expkit sweep` command: trials as runs, the
limits (total, at once, timeout), grid sweeps, early termination, cancel (Ctrl-C, `expkit
sweeps cancel`, a trial canceled by the user), resume after kill -9, --dry-run.

The trial's script logs `acc = 1 - 100 * (lr - 0.01) ** 2` once a step, so the best trial
is known (lr nearest 0.01), and writes outputs/started.txt first (kept when it is canceled).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import alive, error_line, eventually
from expkit.workspace import Workspace

TRAIN = """\
import argparse
import os
import time

from expkit import Run

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.01)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--sleep", type=float, default=0.1)
parser.add_argument("--bad_sleep", type=float, default=None)
parser.add_argument("--batch", type=int, default=16)
args = parser.parse_args()
os.makedirs("outputs", exist_ok=True)
with open("outputs/started.txt", "w") as f:
    f.write(str(args.lr))
run = Run.get_context()
acc = 1 - 100 * (args.lr - 0.01) ** 2
pause = args.sleep if args.bad_sleep is None or acc > 0.5 else args.bad_sleep
for step in range(args.steps):
    time.sleep(pause)
    run.log("acc", acc)
"""


def write_sweep(tmp_path: Path, sweep: dict, args: dict | None = None) -> Path:
    """sweep.yaml (with `sweep`'s fields) next to job.yaml, which runs TRAIN with `args`."""
    source = tmp_path / "project" / "src"
    source.mkdir(parents=True, exist_ok=True)
    (source / "train.py").write_text(TRAIN)
    job = {
        "experiment": "sw",
        "entry_script": "train.py",
        "source_directory": "src",
        "environment": "inherit",
        "compute": "local",
        "args": {"steps": 3, "sleep": 0.1, **(args or {})},
    }
    (tmp_path / "project" / "job.yaml").write_text(yaml.safe_dump(job))
    spec = {
        "job": "job.yaml",
        "search_space": {"lr": {"type": "uniform", "min_value": 0.0, "max_value": 0.05}},
        "sampling_algorithm": {"type": "random", "seed": 3},
        "objective": {"primary_metric": "acc", "goal": "maximize"},
        **sweep,
    }
    path = tmp_path / "project" / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def study_of(workspace: Workspace, sweep_id: str):
    """The sweep's Optuna study, loaded from its journal as another process would."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = workspace.sweep_dir(sweep_id) / "study.journal"
    storage = JournalStorage(JournalFileBackend(str(journal)))
    return optuna.load_study(study_name=sweep_id, storage=storage)


def trial_states(workspace: Workspace, sweep_id: str) -> dict[int, str]:
    """Trial number -> Optuna state name (COMPLETE, PRUNED, FAIL, RUNNING)."""
    return {t.number: t.state.name for t in study_of(workspace, sweep_id).get_trials()}


def most_at_once(runs) -> int:
    """The most runs that were unfinished at one time (from created to ended)."""
    edges = sorted([(r.created, 1) for r in runs] + [(r.ended, -1) for r in runs])
    most = now = 0
    for _, change in edges:
        now += change
        most = max(most, now)
    return most


def lr_of(run) -> float:
    return float(run.job["args"]["lr"])


# -- a sweep from start to end ----------------------------------------------------------------
def test_a_sweep_runs_its_trials_as_runs_within_its_limits(expkit_workspace, expkit_cli, tmp_path):
    sweep = write_sweep(tmp_path, {"limits": {"max_total_trials": 5, "max_concurrent_trials": 2}})
    result = expkit_cli("sweep", str(sweep))
    assert result.returncode == 0, result.stdout + result.stderr

    history = expkit_workspace.history
    record = history.sweeps.find("latest")
    assert record.state == "completed" and record.error is None
    runs = history.runs.of_sweep(record.id)
    assert [r.trial for r in runs] == [0, 1, 2, 3, 4]
    assert {r.state for r in runs} == {"completed"}
    assert most_at_once(runs) <= 2
    assert trial_states(expkit_workspace, record.id) == dict.fromkeys(range(5), "COMPLETE")
    # Each trial's args got its sampled value; the best is the one nearest 0.01.
    study = study_of(expkit_workspace, record.id)
    for run, trial in zip(runs, study.trials, strict=True):
        assert lr_of(run) == trial.params["lr"]
        assert trial.user_attrs["run_id"] == run.id
        assert trial.value == pytest.approx(1 - 100 * (lr_of(run) - 0.01) ** 2)
    best = min(runs, key=lambda r: abs(lr_of(r) - 0.01))
    assert record.best_run == best.id
    # The user saw each trial queued (it may wait for a slot), run and end, then the best.
    assert "up to 5 trials, 2 at once" in result.stdout
    for run in runs:
        assert f"trial {run.trial} (run {run.id}) queued: lr=" in result.stdout
        assert f"trial {run.trial} (run {run.id}) completed: value " in result.stdout
    assert f"best trial: {best.trial} (run {best.id}), acc " in result.stdout
    assert f"sweep {record.id}: completed" in result.stdout


def test_max_concurrent_trials_beyond_the_local_slots_wait_as_runs_do(
    expkit_workspace, expkit_cli, tmp_path
):
    sweep = write_sweep(tmp_path, {"limits": {"max_total_trials": 3, "max_concurrent_trials": 3}})
    job = tmp_path / "project" / "job.yaml"
    raw = yaml.safe_load(job.read_text())
    raw["compute"] = {"target": "local", "options": {"slots": 1}}
    job.write_text(yaml.safe_dump(raw))
    result = expkit_cli("sweep", str(sweep))
    assert result.returncode == 0, result.stdout + result.stderr
    runs = expkit_workspace.history.runs.of_sweep("sw_sweep_1")
    assert [r.state for r in runs] == ["completed"] * 3
    # One slot: the script of one trial ran at a time, the others waited.
    spans = []
    for run in runs:
        (stage,) = [s for s in expkit_workspace.history.stages.of(run.id) if s.stage == "run"]
        spans.append((stage.started, stage.ended))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))


def test_a_grid_sweep_runs_every_combination_once(expkit_workspace, expkit_cli, tmp_path):
    sweep = write_sweep(
        tmp_path,
        {
            "search_space": {
                "lr": {"type": "choice", "values": [0.0, 0.01, 0.03]},
                "batch": {"type": "choice", "values": [16, 32]},
            },
            "sampling_algorithm": {"type": "grid"},
            "limits": {"max_concurrent_trials": 3},
        },
        {"steps": 1, "sleep": 0.0},
    )
    result = expkit_cli("sweep", str(sweep))
    assert result.returncode == 0, result.stdout + result.stderr
    runs = expkit_workspace.history.runs.of_sweep("sw_sweep_1")
    combinations = sorted((lr_of(r), r.job["args"]["batch"]) for r in runs)
    assert combinations == sorted(itertools.product([0.0, 0.01, 0.03], [16, 32]))
    best = expkit_workspace.history.runs.get(
        expkit_workspace.history.sweeps.get("sw_sweep_1").best_run
    )
    assert lr_of(best) == 0.01
    # Ties (two trials with lr 0.01): the lower trial number is the best.
    assert best.trial == min(r.trial for r in runs if lr_of(r) == 0.01)


def test_early_termination_cancels_the_trials_the_policy_names(
    expkit_workspace, expkit_cli, tmp_path
):
    # Two trials at once: lr 0.01 (acc 1.0) and 0.3 (acc -7.4, logged more slowly, so that
    # the good trial's value at each step is there when the bad one reports its own).
    sweep = write_sweep(
        tmp_path,
        {
            "search_space": {"lr": {"type": "choice", "values": [0.01, 0.3]}},
            "sampling_algorithm": {"type": "grid"},
            "early_termination": {"type": "bandit", "slack_factor": 0.1},
            "limits": {"max_concurrent_trials": 2},
        },
        {"steps": 12, "sleep": 0.1, "bad_sleep": 0.3},
    )
    result = expkit_cli("sweep", str(sweep))
    assert result.returncode == 0, result.stdout + result.stderr
    history = expkit_workspace.history
    runs = {lr_of(r): r for r in history.runs.of_sweep("sw_sweep_1")}
    good, bad = runs[0.01], runs[0.3]
    assert good.state == "completed"
    assert bad.state == "canceled"
    assert bad.error.startswith("early termination: bandit, step "), bad.error
    assert "started.txt" in history.outputs.of(bad.id)  # its outputs are kept
    assert trial_states(expkit_workspace, "sw_sweep_1") == {
        good.trial: "COMPLETE",
        bad.trial: "PRUNED",
    }
    said = f"trial {bad.trial} (run {bad.id}) early-terminated: early termination: bandit"
    assert said in result.stdout
    assert history.sweeps.get("sw_sweep_1").best_run == good.id


# -- stopping a sweep -------------------------------------------------------------------------
def test_the_sweep_timeout_cancels_its_running_trials(expkit_workspace, expkit_cli, tmp_path):
    """As Azure ML's timeout: the sweep ends completed (exit 0), its running trials canceled."""
    sweep = write_sweep(
        tmp_path,
        {"limits": {"max_total_trials": 6, "max_concurrent_trials": 2, "timeout": 2}},
        {"steps": 40, "sleep": 0.1},
    )
    result = expkit_cli("sweep", str(sweep))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopped at limits.timeout (2 s)" in result.stdout
    record = expkit_workspace.history.sweeps.get("sw_sweep_1")
    assert (record.state, record.error) == ("completed", None)
    runs = expkit_workspace.history.runs.of_sweep(record.id)
    assert len(runs) == 2
    for run in runs:
        assert (run.state, run.error) == ("canceled", "sweep timeout (2 s)")
    assert set(trial_states(expkit_workspace, record.id).values()) == {"FAIL"}


def test_ctrl_c_cancels_the_sweep_and_its_running_trials(expkit_workspace, background, tmp_path):
    sweep = write_sweep(
        tmp_path,
        {"limits": {"max_total_trials": 4, "max_concurrent_trials": 2}},
        {"steps": 100, "sleep": 0.1},
    )
    live = background("sweep", str(sweep))
    live.wait_for("trial 1 (run ")
    run_ids = [r.id for r in expkit_workspace.history.runs.of_sweep("sw_sweep_1")]
    eventually(
        lambda: all(expkit_workspace.history.metrics.of(r, "acc") for r in run_ids),
        what="both trials logging",
    )
    for run_id in run_ids:  # said once its run runs
        live.wait_for(re.compile(rf"trial \d \(run {run_id}\) running\n"))
    os.killpg(live.proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
    assert live.wait(timeout=60) == 130, live.output
    history = expkit_workspace.history
    record = history.sweeps.get("sw_sweep_1")
    assert (record.state, record.error) == ("canceled", "canceled by Ctrl-C")
    for run in history.runs.of_sweep(record.id):
        assert (run.state, run.error) == ("canceled", "sweep sw_sweep_1 canceled")
        assert "started.txt" in history.outputs.of(run.id)
    assert len(history.runs.of_sweep(record.id)) == 2  # none started after the cancel
    assert "sweep sw_sweep_1: canceled by Ctrl-C\n" in live.output


def test_sweeps_cancel_stops_a_detached_sweep(expkit_workspace, expkit_cli, tmp_path):
    sweep = write_sweep(
        tmp_path,
        {"limits": {"max_total_trials": 4, "max_concurrent_trials": 2}},
        {"steps": 100, "sleep": 0.1},
    )
    started = expkit_cli("sweep", str(sweep), "--detach")
    assert started.returncode == 0, started.stderr
    assert "sweep 1 (sw_sweep_1) goes on in the background" in started.stdout
    history = expkit_workspace.history
    eventually(lambda: len(history.runs.of_sweep("sw_sweep_1")) == 2, what="two trials")
    record = history.sweeps.get("sw_sweep_1")
    assert record.driver_pid != os.getpid() and alive(record.driver_pid)

    canceled = expkit_cli("sweeps", "cancel", "1")
    assert canceled.returncode == 0, canceled.stderr
    assert "sweep sw_sweep_1 canceled" in canceled.stdout
    record = history.sweeps.get("sw_sweep_1")
    assert (record.state, record.error) == ("canceled", "canceled by `expkit sweeps cancel`")
    runs = history.runs.of_sweep(record.id)
    assert [(r.state, r.error) for r in runs] == [("canceled", "sweep sw_sweep_1 canceled")] * 2
    log = (expkit_workspace.sweep_dir(record.id) / "driver.log").read_text()
    assert "trial 0 (run " in log
    again = expkit_cli("sweeps", "cancel", "1")
    assert (again.returncode, again.stdout.strip()) == (0, "sweep sw_sweep_1 already canceled")


def test_a_trial_canceled_by_the_user_fails_and_the_sweep_goes_on(
    expkit_workspace, expkit_cli, background, tmp_path
):
    sweep = write_sweep(
        tmp_path,
        {"limits": {"max_total_trials": 3, "max_concurrent_trials": 1}},
        {"steps": 8, "sleep": 0.1},
    )
    live = background("sweep", str(sweep))
    first = live.wait_for(re.compile(r"trial 0 \(run (\S+)\) queued")).group(1)
    canceled = expkit_cli("runs", "cancel", first)
    assert canceled.returncode == 0, canceled.stderr
    assert live.wait(timeout=60) == 0, live.output
    runs = expkit_workspace.history.runs.of_sweep("sw_sweep_1")
    assert [(r.trial, r.state) for r in runs] == [
        (0, "canceled"),
        (1, "completed"),
        (2, "completed"),
    ]
    assert runs[0].error == "canceled by the user"
    assert trial_states(expkit_workspace, "sw_sweep_1") == {0: "FAIL", 1: "COMPLETE", 2: "COMPLETE"}
    assert expkit_workspace.history.sweeps.get("sw_sweep_1").state == "completed"


# -- resume -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_kill_9_reattaches_the_running_trials(
    expkit_workspace, expkit_cli, background, tmp_path
):
    sweep = write_sweep(
        tmp_path,
        {"limits": {"max_total_trials": 4, "max_concurrent_trials": 2}},
        {"steps": 20, "sleep": 0.1},
    )
    live = background("sweep", str(sweep))
    live.wait_for("trial 1 (run ")
    history = expkit_workspace.history
    eventually(
        lambda: all(history.metrics.of(r.id, "acc") for r in history.runs.of_sweep("sw_sweep_1")),
        what="both trials logging",
    )
    refused = expkit_cli("sweeps", "resume", "1")  # its driver still runs
    assert refused.returncode == 2
    assert "sweep sw_sweep_1 is still driven (pid " in error_line(refused)

    os.kill(live.proc.pid, signal.SIGKILL)
    live.wait()
    before = {r.trial: r.id for r in history.runs.of_sweep("sw_sweep_1")}
    assert sorted(before) == [0, 1]
    assert {r.state for r in history.runs.of_sweep("sw_sweep_1")} <= {
        "queued",
        "scaling",
        "running",
    }

    resumed = expkit_cli("sweeps", "resume", "1")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    runs = history.runs.of_sweep("sw_sweep_1")
    assert [r.trial for r in runs] == [0, 1, 2, 3]  # numbering intact, the total respected
    assert {r.trial: r.id for r in runs if r.trial < 2} == before  # re-attached, not re-run
    assert {r.state for r in runs} == {"completed"}
    study = study_of(expkit_workspace, "sw_sweep_1")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    for trial in study.trials[:2]:  # each value reported once, at steps 1..20
        assert sorted(trial.intermediate_values) == list(range(1, 21))
    assert history.sweeps.get("sw_sweep_1").state == "completed"

    finished = expkit_cli("sweeps", "resume", "1")
    assert finished.returncode == 2
    assert "sweep sw_sweep_1 already completed; nothing to resume" in error_line(finished)


def test_resume_reasks_a_trial_whose_run_was_never_recorded(expkit_workspace, expkit_cli, tmp_path):
    from expkit.sweeps.driver import start
    from expkit.sweeps.spec import SweepSpec
    from expkit.sweeps.study import open_study

    path = write_sweep(tmp_path, {"limits": {"max_total_trials": 2, "max_concurrent_trials": 1}})
    spec = SweepSpec.from_yaml(path)
    record = start(expkit_workspace, spec)
    study = open_study(expkit_workspace, record.id, spec)
    asked = study.ask()
    lr = asked.suggest_float("lr", 0.0, 0.05)  # the driver died here, before submitting
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    expkit_workspace.history.sweeps.claim(record.id, gone.pid)

    resumed = expkit_cli("sweeps", "resume", record.id, "--detach")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"sweep 1 ({record.id}) goes on in the background" in resumed.stdout
    history = expkit_workspace.history
    eventually(lambda: history.sweeps.get(record.id).finished, what="the resumed sweep's end")
    assert history.sweeps.get(record.id).state == "completed"
    log = (expkit_workspace.sweep_dir(record.id) / "driver.log").read_text()
    assert "trial 0: never started; its parameters asked again" in log
    runs = expkit_workspace.history.runs.of_sweep(record.id)
    assert [r.trial for r in runs] == [1, 2]  # limits count trials that ran
    assert lr_of(runs[0]) == lr  # the same parameters, asked again
    assert trial_states(expkit_workspace, record.id) == {0: "FAIL", 1: "COMPLETE", 2: "COMPLETE"}


def test_resume_reasks_a_trial_whose_run_died_with_the_sweeps_driver(
    expkit_workspace, expkit_cli, tmp_path
):
    """kill -9 of the sweep and its trials' drivers: the run is reaped (failed), the trial
    told FAIL and its grid point asked again, counted once against the limits."""
    from expkit import lifecycle
    from expkit.sweeps.driver import RUN_ID, start
    from expkit.sweeps.space import suggest, trial_job
    from expkit.sweeps.spec import SweepSpec
    from expkit.sweeps.study import open_study

    path = write_sweep(
        tmp_path,
        {
            "search_space": {"lr": {"type": "choice", "values": [0.01, 0.02]}},
            "sampling_algorithm": {"type": "grid"},
            "limits": {"max_concurrent_trials": 1},
        },
    )
    spec = SweepSpec.from_yaml(path)
    record = start(expkit_workspace, spec)
    study = open_study(expkit_workspace, record.id, spec)
    asked = study.ask()
    values = suggest(asked, spec)
    history = expkit_workspace.history
    run = lifecycle.submit(
        expkit_workspace, trial_job(spec, values), sweep=record.id, trial=asked.number
    )
    asked.set_user_attr(RUN_ID, run.id)
    history.runs.finish(run.id, "failed", "the driver process (pid 4321) ended without finishing")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    history.sweeps.claim(record.id, gone.pid)

    result = expkit_cli("sweeps", "resume", record.id)

    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        f"trial 0 (run {run.id}): its run died with the sweep's driver; its parameters asked again"
        in result.stdout
    )
    assert "trial 0: asked again as trial 1" in result.stdout
    runs = history.runs.of_sweep(record.id)
    assert [r.trial for r in runs] == [0, 1, 2]  # the grid's 2 points, none lost
    assert sorted(lr_of(r) for r in runs[1:]) == [0.01, 0.02]
    assert lr_of(runs[1]) == lr_of(run)
    assert trial_states(expkit_workspace, record.id) == {0: "FAIL", 1: "COMPLETE", 2: "COMPLETE"}
    assert history.sweeps.get(record.id).state == "completed"


# -- dry run ----------------------------------------------------------------------------------
def test_dry_run_shows_the_first_trials_and_starts_nothing(expkit_workspace, expkit_cli, tmp_path):
    sweep = write_sweep(
        tmp_path,
        {
            "search_space": {
                "lr": {"type": "choice", "values": [0.001, 0.01]},
                "batch": {"type": "choice", "values": [16, 32]},
            },
            "sampling_algorithm": {"type": "grid"},
            "early_termination": {"type": "bandit", "slack_factor": 0.2},
            "limits": {"max_total_trials": 3, "max_concurrent_trials": 2},
        },
    )
    result = expkit_cli("sweep", str(sweep), "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"dry run of {sweep} (nothing is started)\n")
    assert re.search(r"objective\s+maximize acc", out)
    assert re.search(r"sampling\s+grid \(4 combinations\)", out)
    assert re.search(r"early stop\s+bandit \(.*slack_factor 0.2", out)
    trials = re.findall(r"trial \d: batch=(\d+) lr=(\S+)\n\s+python train.py (.*)", out)
    assert len(trials) == 3  # max_total_trials caps the preview
    for batch, lr, command in trials:
        assert f"--lr {lr}" in command and f"--batch {batch}" in command
        assert "--steps 3" in command
    assert expkit_workspace.history.sweeps.recent() == []
    assert not (expkit_workspace.path / "sweeps").exists()


# -- the live table -----------------------------------------------------------------------------
def test_on_a_terminal_the_trials_are_a_table_redrawn_in_place(expkit_workspace, tmp_path):
    import pty

    sweep = write_sweep(tmp_path, {"limits": {"max_total_trials": 2, "max_concurrent_trials": 2}})
    pid, fd = pty.fork()
    if pid == 0:  # the child: `expkit sweep` with a terminal as its output
        os.environ["EXPKIT_WORKSPACE"] = str(expkit_workspace.path)
        os.execv(sys.executable, [sys.executable, "-m", "expkit", "sweep", str(sweep)])
    shown = bytearray()
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # the child ended: the terminal closed
            break
        if not data:
            break
        shown.extend(data)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, shown.decode(errors="replace")
    text = shown.decode(errors="replace").replace("\r\n", "\n")
    assert "\x1b[J" in text  # redrawn in place
    runs = expkit_workspace.history.runs.of_sweep("sw_sweep_1")
    best = min(runs, key=lambda r: abs(lr_of(r) - 0.01))
    last = text.rsplit("\x1b[J", 1)[1]  # the table as it was left on the screen
    assert re.match(rf"2 trials, 0 running; best so far: trial {best.trial}, acc ", last), last
    assert re.search(r"^trial\s+run\s+parameters\s+state\s+acc$", last, re.M)
    for run in runs:
        mark = r"\s+\*" if run is best else ""
        assert re.search(rf"^{run.trial}\s+{run.id}\s+lr=\S+\s+completed\s+\S+{mark}$", last, re.M)
    assert f"best trial: {best.trial} (run {best.id}), acc " in last


def test_sweeps_cancel_of_a_sweep_whose_driver_died_cancels_its_trials_itself(
    expkit_workspace, expkit_cli, tmp_path
):
    sweep = write_sweep(
        tmp_path,
        {"limits": {"max_total_trials": 4, "max_concurrent_trials": 2}},
        {"steps": 100, "sleep": 0.1},
    )
    assert expkit_cli("sweep", str(sweep), "--detach").returncode == 0
    history = expkit_workspace.history
    eventually(
        lambda: [r.state for r in history.runs.of_sweep("sw_sweep_1")] == ["running"] * 2,
        what="two trials running",
    )
    driver = history.sweeps.get("sw_sweep_1").driver_pid
    os.kill(driver, signal.SIGKILL)
    eventually(lambda: not alive(driver), what="the sweep's driver gone")

    canceled = expkit_cli("sweeps", "cancel", "sw_sweep_1")
    assert canceled.returncode == 0, canceled.stderr
    assert "sweep sw_sweep_1 canceled (its driver was gone)" in canceled.stdout
    record = history.sweeps.get("sw_sweep_1")
    assert (record.state, record.error) == ("canceled", "canceled by `expkit sweeps cancel`")
    assert set(trial_states(expkit_workspace, record.id).values()) == {"FAIL"}
    # The trials' own drivers stop them, with the sweep's reason.
    for run in history.runs.of_sweep(record.id):
        eventually(lambda run=run: history.runs.get(run.id).finished, what=f"{run.id} stopping")
        stopped = history.runs.get(run.id)
        assert (stopped.state, stopped.error) == ("canceled", "sweep sw_sweep_1 canceled")


def test_a_trial_past_its_trial_timeout_fails_and_the_sweep_goes_on(
    expkit_workspace, expkit_cli, tmp_path
):
    sweep = write_sweep(
        tmp_path,
        {"limits": {"max_total_trials": 2, "max_concurrent_trials": 2, "trial_timeout": 1}},
        {"steps": 100, "sleep": 0.1},
    )
    result = expkit_cli("sweep", str(sweep))
    assert result.returncode == 1, result.stdout + result.stderr  # every trial failed
    runs = expkit_workspace.history.runs.of_sweep("sw_sweep_1")
    assert [r.job["timeout"] for r in runs] == [1, 1]
    assert f"trial 0 (run {runs[0].id}) failed: past limits.trial_timeout (1 s): run: " in (
        result.stdout
    )
    assert [r.state for r in runs] == ["failed", "failed"]
    assert all(r.error.startswith("run: timed out after 1s") for r in runs), runs[0].error
    assert trial_states(expkit_workspace, "sw_sweep_1") == {0: "FAIL", 1: "FAIL"}
    assert expkit_workspace.history.sweeps.get("sw_sweep_1").best_run is None
    assert "best trial: none completed" in result.stdout


def test_register_best_registers_the_best_trials_model(expkit_workspace, expkit_cli, tmp_path):
    from expkit.registry import ModelStore

    sweep = write_sweep(
        tmp_path,
        {
            "search_space": {"lr": {"type": "choice", "values": [0.0, 0.01, 0.03]}},
            "sampling_algorithm": {"type": "grid"},
            "limits": {"max_concurrent_trials": 2},
            "register_best": True,
        },
        {"steps": 1, "sleep": 0.0},
    )
    job = tmp_path / "project" / "job.yaml"
    job.write_text(job.read_text() + "model: {name: swmodel, path: outputs/}\n")
    result = expkit_cli("sweep", str(sweep))
    assert result.returncode == 0, result.stdout + result.stderr
    record = expkit_workspace.history.sweeps.get("sw_sweep_1")
    best = expkit_workspace.history.runs.get(record.best_run)
    assert lr_of(best) == 0.01
    assert record.model == "swmodel:1"
    model = ModelStore(expkit_workspace).get("swmodel", 1)
    assert model.lineage["run_id"] == best.id
    assert model.lineage["sweep"] == record.id
    assert "registered model: swmodel:1" in result.stdout
    # The trials themselves registered nothing: the sweep registers its best.
    for run in expkit_workspace.history.runs.of_sweep(record.id):
        register = [s for s in expkit_workspace.history.stages.of(run.id) if s.stage == "register"]
        assert register[0].state == "skipped"


def test_a_sweep_whose_every_trial_failed_ends_failed(expkit_workspace, expkit_cli, tmp_path):
    sweep = write_sweep(
        tmp_path, {"limits": {"max_total_trials": 2, "max_concurrent_trials": 2}}, {"steps": "x"}
    )
    result = expkit_cli("sweep", str(sweep))

    assert result.returncode == 1, result.stdout + result.stderr
    record = expkit_workspace.history.sweeps.find("latest")
    assert record.state == "failed"
    assert record.error.startswith("every trial failed (trial 0: run: ")
    assert trial_states(expkit_workspace, record.id) == {0: "FAIL", 1: "FAIL"}


def test_a_sweep_whose_trials_logged_no_primary_metric_ends_failed(
    expkit_workspace, expkit_cli, tmp_path
):
    """A run that completed without logging the primary metric is a failed trial everywhere:
    Optuna's FAIL, the live log, `sweeps show`; no trial completed: the sweep failed."""
    sweep = write_sweep(tmp_path, {"limits": {"max_total_trials": 1}}, {"steps": 0})
    result = expkit_cli("sweep", str(sweep))

    assert result.returncode == 1, result.stdout + result.stderr
    assert ": 1 trial, 1 at once;" in result.stdout
    record = expkit_workspace.history.sweeps.find("latest")
    assert record.state == "failed"
    assert "completed without logging acc" in record.error
    assert trial_states(expkit_workspace, record.id) == {0: "FAIL"}
    shown = expkit_cli("sweeps", "show", record.id)
    assert "1 (1 failed)" in shown.stdout, shown.stdout


RETRIED = """\
import argparse
import os

from expkit import Run

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.01)
args = parser.parse_args()
run = Run.get_context()
folder = run.checkpoint_dir
done = int(open(os.path.join(folder, "step")).read()) if os.listdir(folder) else 0
for step in range(done, 5):
    run.log("acc", step / 10 + args.lr, step=step)
    if step == 1:
        open(os.path.join(folder, "step"), "w").write("1")  # a checkpoint of step 0 done
    if step == 2 and run.attempt == 1:
        raise SystemExit(75)
"""


def test_a_retried_trials_repeated_steps_are_not_new_intervals(
    expkit_workspace, expkit_cli, tmp_path
):
    """Attempt 1 logs steps 0-2 and fails retryably; attempt 2 resumes at step 1 and logs 1-4.
    The trial reports 5 intervals (steps 0-4), not 7, and its value is its best."""
    sweep = write_sweep(
        tmp_path,
        {
            "search_space": {"lr": {"type": "choice", "values": [0.01]}},
            "sampling_algorithm": {"type": "grid"},
        },
    )
    (sweep.parent / "src" / "train.py").write_text(RETRIED)
    job = yaml.safe_load((sweep.parent / "job.yaml").read_text())
    job["args"] = {}
    job["retry"] = {"max_attempts": 2, "on": [{"exit_codes": [75]}]}
    job["checkpoints"] = "./ckpt"
    (sweep.parent / "job.yaml").write_text(yaml.safe_dump(job))
    result = expkit_cli("sweep", str(sweep))
    assert result.returncode == 0, result.stdout + result.stderr
    (run,) = expkit_workspace.history.runs.of_sweep("sw_sweep_1")
    assert run.state == "completed" and run.attempt == 2
    (trial,) = study_of(expkit_workspace, "sw_sweep_1").get_trials()
    assert trial.state.name == "COMPLETE"
    assert sorted(trial.intermediate_values) == [1, 2, 3, 4, 5]
    assert trial.value == pytest.approx(0.41)
    # `sweeps show` counts the trial's steps as the policy does: 5, not the 7 values logged
    shown = expkit_cli("sweeps", "show", "sw_sweep_1", "--json")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    (row,) = json.loads(shown.stdout)["trials"]
    assert row["steps"] == 5
