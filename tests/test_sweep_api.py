"""The Python API of sweeps, as an Azure ML SDK v1 user drives a HyperDrive run:

sweep_run = Experiment(ws, "birds").submit(SweepSpec.from_yaml("sweep.yaml"))
sweep_run.wait_for_completion(show_output=True)
best = sweep_run.get_best_run_by_primary_metric()
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from expkit import Experiment, Run, SweepRun
from expkit.api import RunFailed, _is_sweep_file
from test_sweeps_cli import JOB, add_trial, sweep_spec


@pytest.fixture
def sweep_run(expkit_workspace):
    """A finished sweep of three trials (1 is the best) as a SweepRun."""
    history = expkit_workspace.history
    record = history.sweeps.create("birds", sweep_spec(JOB))
    add_trial(history, record, 0, 0.01, 16, [0.5, 0.7])
    add_trial(history, record, 1, 0.05, 32, [0.6, 0.9])
    add_trial(history, record, 2, 0.002, 16, [0.2, 0.3], state="early-terminated")
    history.sweeps.update(record.id, best_run="birds_2")
    history.sweeps.finish(record.id, "completed")
    return SweepRun(expkit_workspace, record.id)


def test_a_sweep_run_gives_its_trials_and_the_best(sweep_run, capsys):
    assert sweep_run.get_status() == "completed"
    children = sweep_run.get_children()
    assert [run.id for run in children] == ["birds_1", "birds_2", "birds_3"]
    assert all(isinstance(run, Run) for run in children)
    assert [run.get_details()["trial"] for run in children] == [0, 1, 2]
    assert children[0].get_details()["sweep"] == sweep_run.id

    best = sweep_run.get_best_run_by_primary_metric()
    assert best is not None and best.id == "birds_2"
    assert best.get_params()["lr"] == "0.05"

    metrics = sweep_run.get_metrics()
    assert metrics["birds_2"] == {"acc": [0.6, 0.9], "loss": 1.0}

    details = sweep_run.wait_for_completion(show_output=True)
    assert details["state"] == "completed"
    assert details["best_run"] == "birds_2"
    assert details["trials"] == {"completed": 2, "early-terminated": 1}
    out = capsys.readouterr().out
    assert "trial 2 (birds_3): early-terminated" in out
    assert out.splitlines()[-3].split()[0] == "*1"  # the table, the best first


def test_no_best_run_before_a_trial_completes(expkit_workspace):
    history = expkit_workspace.history
    record = history.sweeps.create("birds", sweep_spec(JOB))
    add_trial(history, record, 0, 0.01, 16, [0.5], state="failed", error="run: exit code 1")
    assert SweepRun(expkit_workspace, record.id).get_best_run_by_primary_metric() is None


def test_wait_raises_for_a_sweep_that_did_not_complete(expkit_workspace):
    history = expkit_workspace.history
    record = history.sweeps.create("birds", sweep_spec(JOB))
    history.sweeps.finish(record.id, "canceled", "canceled by the user")
    sweep = SweepRun(expkit_workspace, record.id)

    with pytest.raises(RunFailed, match="canceled: canceled by the user"):
        sweep.wait_for_completion()
    assert sweep.wait_for_completion(raise_on_error=False)["state"] == "canceled"


def test_wait_says_when_the_sweeps_driver_is_gone(expkit_workspace):
    history = expkit_workspace.history
    record = history.sweeps.create("birds", sweep_spec(JOB))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    history.sweeps.claim(record.id, pid=gone.pid)

    with pytest.raises(RunFailed, match=r"driver process .* is gone; `expkit sweeps resume"):
        SweepRun(expkit_workspace, record.id).wait_for_completion(timeout=30)


def test_wait_times_out(expkit_workspace):
    record = expkit_workspace.history.sweeps.create("birds", sweep_spec(JOB))  # driven by us
    with pytest.raises(TimeoutError, match="still running"):
        SweepRun(expkit_workspace, record.id).wait_for_completion(timeout=0.3)


def test_cancel_asks_the_sweeps_driver(sweep_run, expkit_workspace):
    sweep_run.cancel()
    assert expkit_workspace.history.sweeps.cancel_requested(sweep_run.id)


def test_a_sweep_file_is_told_from_a_job_file(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps(sweep_spec("job.yaml")))
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(JOB))
    assert _is_sweep_file(sweep)
    assert not _is_sweep_file(job)
    assert not _is_sweep_file(tmp_path / "missing.yaml")  # left to the job spec's error


TRAIN = """
import sys
from expkit import Run
run = Run.get_context()
lr = float(sys.argv[sys.argv.index("--lr") + 1])
run.log("acc", round(1 - abs(lr - 0.05), 4))
"""


def test_submit_a_sweep_file(expkit_workspace, tmp_path):
    """Experiment.submit of a sweep YAML starts its driver in the background and returns a
    SweepRun at once; its trials are runs of this experiment."""
    pytest.importorskip("expkit.sweeps.driver", reason="the sweep driver is not merged yet")
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.py").write_text(TRAIN)
    job = {"experiment": "other", "source_directory": "src", "entry_script": "train.py"}
    (tmp_path / "job.yaml").write_text(json.dumps(job))
    spec = {
        "job": "job.yaml",
        "search_space": {"lr": {"type": "choice", "values": [0.01, 0.05]}},
        "sampling_algorithm": {"type": "grid"},
        "objective": {"primary_metric": "acc", "goal": "maximize"},
        "limits": {"max_total_trials": 2, "max_concurrent_trials": 2},
    }
    (tmp_path / "sweep.yaml").write_text(json.dumps(spec))

    sweep = Experiment(expkit_workspace, "birds").submit(str(tmp_path / "sweep.yaml"))

    assert isinstance(sweep, SweepRun)
    try:
        details = sweep.wait_for_completion(timeout=120)
    finally:
        if sweep.get_status() == "running":
            sweep.cancel()
    assert details["state"] == "completed"
    children = sweep.get_children()
    assert len(children) == 2
    assert {run.experiment for run in children} == {"birds"}
    best = sweep.get_best_run_by_primary_metric()
    assert best is not None and best.get_metrics()["acc"] == 1.0
    assert os.path.isdir(expkit_workspace.sweep_dir(sweep.id))
