"""A sweep in MLflow: one parent run per sweep, its trials nested child runs, the parent's best
so far and status kept by the trials' sinks. Against the embedded store (SQLite in the
workspace), read back through MLflow's own client.

A trial is what the sweep's driver makes of it: a run submitted with its sweep and trial
number (`lifecycle.submit(..., sweep=, trial=)`), driven by its own background driver
(`expkit.driver.start_driver`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from mlflow import MlflowClient

from conftest import eventually
from expkit import lifecycle
from expkit.driver import start_driver
from expkit.job import JobSpec
from expkit_mlflow.tracking import HTTP_DEFAULTS
from test_mlflow import serving

SCRIPT = """
import argparse, os, sys, time
from expkit import Run

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float)
parser.add_argument("--wait")
parser.add_argument("--exit", type=int, default=0)
args = parser.parse_args()
run = Run.get_context()
for epoch in range(3):
    run.log("val_acc", round(args.lr * (epoch + 1), 6))  # lr, 2 * lr, 3 * lr
if args.wait:
    run.flush()
    while not os.path.exists(args.wait):
        time.sleep(0.05)
sys.exit(args.exit)
"""


def sweep_spec(goal: str = "maximize") -> dict:
    """A sweep spec as its record keeps it (Azure ML v2's names)."""
    return {
        "job": {"experiment": "sw", "entry_script": "train.py"},
        "search_space": {
            "lr": {"type": "choice", "values": [0.1, 0.2, 0.3]},
            "momentum": {"type": "uniform", "min_value": 0.8, "max_value": 0.99},
            "wd": {"type": "loguniform", "min_value": -9.2, "max_value": -2.3},
        },
        "sampling_algorithm": {"type": "random", "seed": 7},
        "objective": {"primary_metric": "val_acc", "goal": goal},
        "early_termination": {"type": "bandit", "slack_factor": 0.1, "delay_evaluation": 2},
        "limits": {"max_total_trials": 3, "max_concurrent_trials": 3},
        "register_best": False,
    }


@pytest.fixture(autouse=True)
def mlflow_env(monkeypatch):
    """The embedded store, whatever this environment says; no telemetry."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", *HTTP_DEFAULTS):
        monkeypatch.delenv(name, raising=False)
    yield
    for name in HTTP_DEFAULTS:
        os.environ.pop(name, None)


@pytest.fixture
def trials(expkit_workspace, tmp_path):
    """`trials.start(args, sweep=None, trial=None)`: submit a run of the test job with `args`
    (a trial of `sweep` when given) and start its background driver; `trials.wait(ids)`
    waits until those runs have ended."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.py").write_text(textwrap.dedent(SCRIPT))
    job = JobSpec.from_dict(
        {"experiment": "sw", "entry_script": "train.py", "metrics": ["mlflow"]},
        source="<test job>",
        base_dir=source,
    )
    history = expkit_workspace.history

    class Trials:
        def start(self, args: dict, sweep: str | None = None, trial: int | None = None) -> str:
            record = lifecycle.submit(expkit_workspace, job.replace(args=args), sweep, trial)
            start_driver(expkit_workspace, record.id)
            return record.id

        def wait(self, run_ids: list[str]) -> None:
            eventually(
                lambda: all(history.runs.get(r).finished for r in run_ids),
                timeout=300,
                what="the runs ended",
            )

    return Trials()


def client_of(workspace) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{workspace.path / 'mlflow.db'}")


def parents(client: MlflowClient, sweep_id: str) -> list:
    return client.search_runs(
        [client.get_experiment_by_name("sw").experiment_id],
        f"tags.`expkit.sweep` = '{sweep_id}' and tags.`expkit.sweep_parent` = 'true'",
    )


def children(client: MlflowClient, parent_id: str) -> list:
    return client.search_runs(
        [client.get_experiment_by_name("sw").experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_id}'",
    )


def best_history(client: MlflowClient, parent_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(parent_id, "best_val_acc"))


@pytest.fixture(params=["embedded", "server"])
def store(request, expkit_workspace, tmp_path_factory) -> Iterator[str]:
    """The tracking URI the workspace's runs report to (its config.json): the embedded store
    (through MLflow's library), or a real `mlflow server` (through the REST client)."""
    if request.param == "embedded":
        yield f"sqlite:///{expkit_workspace.path / 'mlflow.db'}"
        return
    config_file = expkit_workspace.path / "config.json"
    with serving(tmp_path_factory.mktemp("server")) as (url, _):
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**config, "mlflow": {"tracking_uri": url}}))
        yield url


def test_trials_started_at_once_nest_under_one_parent_run_and_a_plain_run_does_not(
    expkit_workspace, trials, store
):
    history = expkit_workspace.history
    sweep = history.sweeps.create("sw", sweep_spec())
    ids = [trials.start({"lr": lr}, sweep.id, n) for n, lr in enumerate((0.1, 0.3, 0.2))]
    plain = trials.start({"lr": 0.5})
    trials.wait([*ids, plain])

    assert [history.runs.get(r).state for r in [*ids, plain]] == ["completed"] * 4
    client = MlflowClient(tracking_uri=store)
    (parent,) = parents(client, sweep.id)
    assert parent.info.run_name == sweep.id
    assert parent.info.status == "FINISHED"
    assert parent.data.params == {
        "search_space.lr": "choice(0.1, 0.2, 0.3)",
        "search_space.momentum": "uniform(0.8, 0.99)",
        "search_space.wd": "loguniform(-9.2, -2.3)",
        "sampling_algorithm": "random",
        "sampling_algorithm.seed": "7",
        "objective.primary_metric": "val_acc",
        "objective.goal": "maximize",
        "early_termination": "bandit",
        "early_termination.slack_factor": "0.1",
        "early_termination.delay_evaluation": "2",
        "limits.max_total_trials": "3",
        "limits.max_concurrent_trials": "3",
        "register_best": "false",
    }
    kids = children(client, parent.info.run_id)
    by_trial = {int(k.data.tags["expkit.trial"]): k for k in kids}
    assert sorted(by_trial) == [0, 1, 2]
    for number, run_id in enumerate(ids):
        kid = by_trial[number]
        assert kid.info.run_id == history.tags.of(run_id)["mlflow.run_id"]
        assert kid.info.run_name == f"{run_id} (trial {number})"
        assert kid.data.tags["expkit.sweep"] == sweep.id
        assert kid.info.experiment_id == parent.info.experiment_id
        assert kid.info.status == "FINISHED"
    # The best so far after each of the three trials ended, in whatever order they did.
    steps = best_history(client, parent.info.run_id)
    assert [s for s, _ in steps] == [1, 2, 3]
    assert [v for _, v in steps] == sorted(v for _, v in steps)
    assert steps[-1] == (3, pytest.approx(0.9))
    assert parent.data.tags["expkit.best_trial"] == "1"
    assert parent.data.tags["expkit.best_run"] == ids[1]
    assert parent.data.tags["expkit.best_mlflow_run"] == by_trial[1].info.run_id
    # A run of its own: a run at the top, named as before, under no parent.
    mine = client.get_run(history.tags.of(plain)["mlflow.run_id"])
    assert mine.info.run_name == plain
    assert "mlflow.parentRunId" not in mine.data.tags
    assert "expkit.sweep" not in mine.data.tags
    assert len(client.search_runs([parent.info.experiment_id])) == 5


def test_the_parent_runs_while_a_trial_does_and_ends_with_the_best_completed_trial(
    expkit_workspace, trials, tmp_path
):
    """Goal minimize, so a trial's value is the least it logged (lr, its first). Trial 0 completes
    while trial 1 still runs: the parent stays RUNNING with trial 0 the best; trial 1 fails:
    the parent FINISHED (a trial completed), the best unchanged. A trial started afterwards
    (a resumed sweep) joins the same parent, which ends FINISHED again with the new best."""
    history = expkit_workspace.history
    sweep = history.sweeps.create("sw", sweep_spec(goal="minimize"))
    release = tmp_path / "release"
    first = trials.start({"lr": 0.2}, sweep.id, 0)
    waiting = trials.start({"lr": 0.1, "wait": str(release), "exit": 1}, sweep.id, 1)
    trials.wait([first])
    eventually(lambda: "mlflow.run_id" in history.tags.of(waiting), what="trial 1 in MLflow")

    client = client_of(expkit_workspace)
    (parent,) = parents(client, sweep.id)
    parent_id = parent.info.run_id
    assert parent.info.status == "RUNNING"
    assert best_history(client, parent_id) == [(1, pytest.approx(0.2))]
    assert parent.data.tags["expkit.best_trial"] == "0"

    release.touch()
    trials.wait([waiting])
    assert history.runs.get(waiting).state == "failed"
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert best_history(client, parent_id) == [(1, pytest.approx(0.2))]
    assert parent.data.tags["expkit.best_trial"] == "0"

    later = trials.start({"lr": 0.05}, sweep.id, 2)
    trials.wait([later])
    assert [p.info.run_id for p in parents(client, sweep.id)] == [parent_id]
    statuses = {k.data.tags["expkit.trial"]: k.info.status for k in children(client, parent_id)}
    assert statuses == {"0": "FINISHED", "1": "FAILED", "2": "FINISHED"}
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert best_history(client, parent_id) == [(1, pytest.approx(0.2)), (2, pytest.approx(0.05))]
    assert parent.data.tags["expkit.best_trial"] == "2"
    assert parent.data.tags["expkit.best_run"] == later


OPEN_AND_CLOSE = """
import sys, time
from pathlib import Path
from expkit.job import JobSpec
from expkit.plugin import Metric, RunInfo, RunOutcome
from expkit_mlflow.sink import MlflowWriter
from expkit_mlflow.tracking import connect, ensure_run, resolve

workspace, source, go, trial = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
spec = {"objective": {"primary_metric": "val_acc", "goal": "maximize"}}
tags = {}
job = JobSpec.from_dict({"experiment": "sw", "entry_script": "train.py"}, base_dir=Path(source))
info = RunInfo(
    run_id=f"sw_{trial + 1}", experiment="sw", run_dir=workspace / "runs" / f"sw_{trial + 1}",
    job=job, created=time.time(), workspace_dir=workspace, tags=lambda: dict(tags),
    set_tags=tags.update, sweep="sw_sweep_1", trial=trial, sweep_spec=lambda: spec,
)
tracking = resolve(info, {})
client = connect(tracking)  # what takes time and holds the store's lock, before the start
made = client.create_run
def create_run(*args, **kwargs):  # a slow store: looking for the parent and making it are
    time.sleep(0.3)               # far apart, so that every process would make one unless
    return made(*args, **kwargs)  # they take turns
client.create_run = create_run
(go.parent / f"ready-{trial}").touch()
while not go.exists():
    time.sleep(0.005)
writer = MlflowWriter(client, ensure_run(client, info, tracking)[0], info)  # as the sink opens
writer.send([Metric("val_acc", 0.1 * (trial + 1), None, time.time())])
writer.close(RunOutcome("completed"))
"""


def test_trials_opening_at_the_same_moment_in_separate_processes_make_one_parent(
    expkit_workspace, tmp_path
):
    """Three processes open a trial's sink at once (each as a trial's driver does, its store
    connected beforehand, MLflow's create_run slowed down to widen the race): one parent,
    three children, and the best so far logged once per completed trial."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.py").write_text("")
    go = tmp_path / "go"
    count = 3
    folders = [str(expkit_workspace.path), str(source), str(go)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AND_CLOSE, *folders, str(trial)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for trial in range(count)
    ]
    eventually(
        lambda: (
            all((tmp_path / f"ready-{t}").exists() for t in range(count))
            or any(p.poll() is not None for p in processes)
        ),
        timeout=300,
        what="the processes ready",
    )
    go.touch()  # all at once
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0] * count, "\n".join(outputs)

    client = client_of(expkit_workspace)
    found = parents(client, "sw_sweep_1")
    assert len(found) == 1, [p.info.run_id for p in found]  # one parent, made once
    parent = found[0]
    kids = children(client, parent.info.run_id)
    assert sorted(int(k.data.tags["expkit.trial"]) for k in kids) == list(range(count))
    assert len(client.search_runs([parent.info.experiment_id])) == count + 1
    assert parent.info.status == "FINISHED"
    steps = best_history(client, parent.info.run_id)
    assert [s for s, _ in steps] == list(range(1, count + 1))
    assert steps[-1][1] == pytest.approx(0.1 * count)
    assert parent.data.tags["expkit.best_trial"] == str(count - 1)


def test_trials_whose_driver_died_nest_when_their_sinks_are_closed_later(
    expkit_workspace, tmp_path
):
    """The sinks of a trial whose driver died are closed by `expkit.sinkrecovery`: a trial
    that had no MLflow run yet gets one under the sweep's parent, and one whose MLflow run
    was made without the parent's tag gets it; both end FAILED, and so does the parent."""
    from expkit.sinkrecovery import close_sinks

    source = tmp_path / "src"
    source.mkdir()
    (source / "train.py").write_text("")
    job = JobSpec.from_dict(
        {"experiment": "sw", "entry_script": "train.py", "metrics": ["mlflow"]},
        source="<test job>",
        base_dir=source,
    )
    history = expkit_workspace.history
    sweep = history.sweeps.create("sw", sweep_spec())
    unseen, unnested = (
        lifecycle.submit(expkit_workspace, job, sweep.id, trial).id for trial in (0, 1)
    )
    client = client_of(expkit_workspace)
    experiment = client.create_experiment("sw")
    made = client.create_run(experiment, tags={"expkit.run_id": unnested}).info.run_id
    history.tags.set(unnested, {"mlflow.run_id": made})
    for run_id in (unseen, unnested):
        history.runs.finish(run_id, "failed", "the driver died")

        workers = close_sinks(expkit_workspace, run_id)

        assert [w.error for w in workers] == [None]
    (parent,) = parents(client, sweep.id)
    kids = {k.data.tags["expkit.run_id"]: k for k in children(client, parent.info.run_id)}
    assert sorted(kids) == sorted([unseen, unnested])
    assert kids[unnested].info.run_id == made
    assert {k.data.tags["expkit.trial"] for k in kids.values()} == {"0", "1"}
    assert {k.info.status for k in kids.values()} == {"FAILED"}
    assert parent.info.status == "FAILED"
    assert client.get_metric_history(parent.info.run_id, "best_val_acc") == []


def test_the_parent_s_params_read_as_the_sweep_s_yaml_in_any_of_its_forms():
    """HyperDrive's function forms are kept as written, paired parameters (a choice of
    mappings) shown whole, a sweep without early termination says so, and a spec that
    names no objective gives no best to keep."""
    from expkit_mlflow.sweeps import objective, spec_params

    spec = {
        "search_space": {
            "batch_size": "choice(16, 32, 64)",
            "pair": {"type": "choice", "values": [{"lr": 0.1, "bs": 16}, {"lr": 0.01, "bs": 64}]},
            "act": {"type": "choice", "values": ["relu", "tanh"]},
            "steps": {"type": "quniform", "min_value": 1, "max_value": 9, "q": 2},
            "noise": {"type": "normal", "mu": 0, "sigma": 1.5},
            "layers": {"type": "randint", "upper": 4},
        },
        "sampling_algorithm": "grid",
        "objective": {"primary_metric": "loss", "goal": "Minimize"},
        "early_termination": None,
    }

    assert spec_params(spec) == {
        "search_space.batch_size": "choice(16, 32, 64)",
        "search_space.pair": 'choice({"lr": 0.1, "bs": 16}, {"lr": 0.01, "bs": 64})',
        "search_space.act": 'choice("relu", "tanh")',
        "search_space.steps": "quniform(1, 9, 2)",
        "search_space.noise": "normal(0, 1.5)",
        "search_space.layers": "randint(4)",
        "sampling_algorithm": "grid",
        "objective.primary_metric": "loss",
        "objective.goal": "Minimize",
        "early_termination": "none",
    }
    assert objective(spec) == ("loss", "minimize")
    assert objective({}) == (None, "maximize")
    assert spec_params({}) == {}
