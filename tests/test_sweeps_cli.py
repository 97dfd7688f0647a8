"""A sweep's records as a user reads them: `expkit sweeps list`, `expkit sweeps show` (the
trials sorted by the objective, --json, --plot), `expkit runs list --sweep`, the best trial,
and registering its model (`register_best`).

The sweeps here are recorded as the sweep driver records them (a sweep record, its trials
runs that name it, their parameters and metrics, their ends), with a real Optuna study in the
sweep's journal for the pictures; the best-trial tests run real trials through the lifecycle.
"""

from __future__ import annotations

import io
import json
import time

import pytest

import expkit
from conftest import error_line
from expkit import lifecycle
from expkit.console import Console
from expkit.errors import UserError
from expkit.history import params as params_source
from expkit.job import JobSpec
from expkit.sweeps.best import NoBestTrial, best_trial, register_best
from expkit.sweeps.report import render, space_names, trial_rows

SPACE = {
    "lr": {"type": "uniform", "min_value": 0.001, "max_value": 0.1},
    "batch_size": {"type": "choice", "values": [16, 32]},
}
REASON = "early termination: bandit, step 2: 0.3 outside slack of best 0.8"


def sweep_spec(job: dict, goal: str = "maximize", **more) -> dict:
    """A sweep spec as its record keeps it (`SweepSpec.to_dict`: the job inline)."""
    return {
        "job": job,
        "search_space": SPACE,
        "sampling_algorithm": {"type": "random", "seed": 7},
        "objective": {"primary_metric": "acc", "goal": goal},
        "early_termination": {"type": "bandit", "slack_factor": 0.1, "evaluation_interval": 1},
        "limits": {"max_total_trials": 5, "max_concurrent_trials": 2},
        **more,
    }


JOB = {
    "experiment": "birds",
    "source_directory": "/src",
    "entry_script": "train.py",
    "args": {"epochs": 2},
}


def add_trial(history, sweep, trial, lr, batch_size, values, state="completed", error=None):
    """One trial as the driver leaves it: a run of the sweep's job with the sampled args,
    its parameters (the job's), what it logged of the primary metric, its end."""
    job = {**JOB, "args": {"epochs": 2, "lr": lr, "batch_size": batch_size}}
    run = history.runs.create("birds", job, sweep=sweep.id, trial=trial)
    history.params.set(
        run.id, {"epochs": "2", "lr": str(lr), "batch_size": str(batch_size)}, params_source.JOB
    )
    now = time.time()
    history.metrics.add(run.id, [("acc", i, v, None, now, 0) for i, v in enumerate(values)])
    history.metrics.add(run.id, [("loss", 0, 1.0, None, now, 0)])
    if state == "early-terminated":
        history.runs.request_cancel(run.id, REASON)
        history.runs.finish(run.id, "canceled", REASON)
    elif state != "running":
        history.runs.finish(run.id, state, error)
    return run


@pytest.fixture
def sweep(expkit_workspace):
    """A finished sweep of five trials: 0 completed 0.5 then 0.7, 1 completed 0.6 then 0.9, 2
    early-terminated at 0.2 then 0.3, 3 failed without a value, 4 completed 0.95 then 0.8 (the
    best: a trial's value is the best it logged, as HyperDrive ranks child runs); and its
    Optuna study in the journal (the same values told)."""
    history = expkit_workspace.history
    record = history.sweeps.create("birds", sweep_spec(JOB))
    add_trial(history, record, 0, 0.01, 16, [0.5, 0.7])
    add_trial(history, record, 1, 0.05, 32, [0.6, 0.9])
    add_trial(history, record, 2, 0.002, 16, [0.2, 0.3], state="early-terminated")
    add_trial(history, record, 3, 0.09, 32, [], state="failed", error="run: exit code 1")
    add_trial(history, record, 4, 0.03, 16, [0.95, 0.8])
    history.sweeps.finish(record.id, "completed")
    write_study(expkit_workspace, record.id, [(0.01, 16, 0.7), (0.05, 32, 0.9), (0.03, 16, 0.95)])
    return history.sweeps.get(record.id)


def write_study(workspace, sweep_id, trials, params=("lr", "batch_size")):
    """The sweep's study in its journal, as the driver writes it: ask, then tell."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from expkit.sweeps.study import JOURNAL

    folder = workspace.sweep_dir(sweep_id)
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=JournalStorage(JournalFileBackend(str(folder / JOURNAL))),
        study_name=sweep_id,
        direction="maximize",
        load_if_exists=True,
    )
    space = {"lr": FloatDistribution(0.001, 0.1), "batch_size": CategoricalDistribution([16, 32])}
    for lr, batch_size, value in trials:
        given = {"lr": lr, "batch_size": batch_size}
        study.enqueue_trial({name: given[name] for name in params})
        trial = study.ask({name: space[name] for name in params})
        study.tell(trial, value)
    return study


# -- the table ------------------------------------------------------------------------------
def test_trial_rows_give_state_params_and_values(expkit_workspace, sweep):
    rows = {row.trial: row for row in trial_rows(expkit_workspace, sweep)}

    assert [rows[n].state for n in range(5)] == [
        "completed",
        "completed",
        "early-terminated",
        "failed",
        "completed",
    ]
    # The sampled values only: the job's own `epochs` is not a parameter of the sweep.
    assert rows[1].params == {"lr": "0.05", "batch_size": "32"}
    assert (rows[4].latest, rows[4].best, rows[4].steps) == (0.8, 0.95, 2)
    assert rows[3].latest is None and rows[3].error == "run: exit code 1"
    assert rows[2].error == REASON


def test_a_completed_run_without_the_metric_is_a_failed_trial(expkit_workspace):
    """As the driver tells Optuna FAIL: the table, the counts and --json say failed."""
    history = expkit_workspace.history
    record = history.sweeps.create("birds", sweep_spec(JOB))
    add_trial(history, record, 0, 0.01, 16, [])
    add_trial(history, record, 1, 0.02, 32, [0.5])

    rows = {row.trial: row for row in trial_rows(expkit_workspace, record)}

    assert (rows[0].state, rows[0].error) == ("failed", "completed without logging acc")
    assert rows[1].state == "completed" and rows[1].error is None


def test_non_finite_values_are_never_a_trials_value(expkit_workspace, expkit_cli):
    """inf/-inf are left out like NaN: never the best, and --json has numbers or null."""
    history = expkit_workspace.history
    record = history.sweeps.create("birds", sweep_spec(JOB))
    add_trial(history, record, 0, 0.01, 16, [0.5, float("inf"), 0.6, float("nan")])
    add_trial(history, record, 1, 0.02, 32, [float("inf")])

    rows = {row.trial: row for row in trial_rows(expkit_workspace, record)}
    assert (rows[0].best, rows[0].latest, rows[0].steps) == (0.6, 0.6, 2)
    assert rows[1].best is None and rows[1].state == "failed"

    result = expkit_cli("sweeps", "show", record.id, "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"{c} in --json"))
    assert shown["trials"][0]["value"] == 0.6


def test_the_table_is_sorted_by_the_objective_the_best_marked(expkit_workspace, sweep):
    rows = trial_rows(expkit_workspace, sweep)

    lines = render(rows, ("acc", "maximize"), space_names(sweep.spec))
    assert lines[0].split()[:7] == ["TRIAL", "RUN", "STATE", "lr", "batch_size", "acc", "BEST"]
    # By the best value each logged (0.95, 0.9, 0.7, 0.3), the trial without a value last.
    assert [line.split()[0] for line in lines[1:]] == ["*4", "1", "0", "2", "3"]
    assert "exit code 1" in lines[-1]

    lines = render(rows, ("acc", "minimize"), space_names(sweep.spec))
    assert [line.split()[0].lstrip("*") for line in lines[1:]] == ["2", "0", "1", "4", "3"]


def test_the_table_reads_a_sweep_in_a_few_queries(expkit_workspace, sweep):
    """The live table is drawn again every half second: the number of queries does not grow
    with the number of trials (a query or two per kind, none per trial)."""

    def selects() -> int:
        queries: list[str] = []
        db = expkit_workspace.history.db
        db.set_trace_callback(queries.append)
        try:
            trial_rows(expkit_workspace, sweep)
        finally:
            db.set_trace_callback(None)
        return len([q for q in queries if q.lstrip().upper().startswith("SELECT")])

    few = selects()
    for n in range(5, 15):
        add_trial(expkit_workspace.history, sweep, n, 0.01, 16, [0.1, 0.2])
    assert len(trial_rows(expkit_workspace, sweep)) == 15
    assert selects() == few <= 4


def test_a_list_args_job_shows_its_sampled_values(expkit_workspace):
    """A job whose `args` is a list records one parameter (`args`): the values are read from
    the trial's command line (`--lr 0.01`), also before the trial is prepared."""
    history = expkit_workspace.history
    record = history.sweeps.create("birds", sweep_spec(JOB))
    job = {**JOB, "args": ["--epochs", "2", "--lr", "0.01", "--batch_size=32"]}
    history.runs.create("birds", job, sweep=record.id, trial=0)

    (row,) = trial_rows(expkit_workspace, record)
    assert row.params == {"lr": "0.01", "batch_size": "32"}
    assert row.state == "queued"


def test_paired_parameters_show_each_argument(expkit_workspace):
    spec = sweep_spec(JOB)
    spec["search_space"] = {
        "arch": {"type": "choice", "values": [{"depth": 2, "width": 64}, {"depth": 4}]},
        "lr": SPACE["lr"],
    }
    assert space_names(spec) == ["depth", "width", "lr"]


# -- the command line -----------------------------------------------------------------------
def test_sweeps_list(sweep, expkit_cli):
    result = expkit_cli("sweeps", "list")

    assert result.returncode == 0, result.stderr
    header, line = result.stdout.splitlines()
    assert header.split() == ["SWEEP", "STATE", "CREATED", "TRIALS", "BEST"]
    assert line.startswith("birds_sweep_1  completed")
    assert "5 (3 completed, 1 early-terminated, 1 failed)" in line
    assert line.endswith("trial 4 (birds_5): acc 0.95")


def test_sweeps_list_names_a_running_sweep_whose_driver_is_gone(expkit_workspace, expkit_cli):
    record = expkit_workspace.history.sweeps.create("birds", sweep_spec(JOB))
    expkit_workspace.history.sweeps.claim(record.id, 2**22 + 12345)  # no such process

    result = expkit_cli("sweeps", "list")

    assert result.returncode == 0, result.stderr
    assert "running (driver gone: expkit sweeps resume 1)" in result.stdout


def test_sweeps_list_without_sweeps(expkit_cli):
    result = expkit_cli("sweeps", "list")
    assert result.returncode == 0
    assert "no sweeps yet" in result.stdout


def test_sweeps_show(sweep, expkit_cli):
    result = expkit_cli("sweeps", "show", "1")

    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in (
        "sweep              birds_sweep_1",
        "state              completed",
        "job                train.py in /src (experiment birds)",
        "search space       lr: uniform(min_value=0.001, max_value=0.1)",
        "batch_size: choice(16, 32)",
        "sampling           random (seed 7)",
        "objective          maximize acc",
        "early termination  bandit (slack_factor 0.1, evaluation_interval 1)",
        "limits             max_total_trials 5, max_concurrent_trials 2",
        "trials             5 (3 completed, 1 early-terminated, 1 failed)",
        "best trial         4 (run birds_5): acc 0.95",
        "parameters       lr=0.03, batch_size=16",
    ):
        assert expected in out, out
    table = out[out.index(" TRIAL") :].splitlines()
    assert [line.split()[0] for line in table[1:]] == ["*4", "1", "0", "2", "3"]
    assert REASON in out


def test_sweeps_show_json_is_strict_and_sorted(sweep, expkit_cli, expkit_workspace):
    expkit_workspace.history.sweeps.update(sweep.id, model="birds-net:3")

    result = expkit_cli("sweeps", "show", sweep.id, "--json")

    assert result.returncode == 0, result.stderr

    def refuse(word):
        raise ValueError(word)

    details = json.loads(result.stdout, parse_constant=refuse)
    assert details["id"] == sweep.id and details["state"] == "completed"
    assert details["objective"] == {"primary_metric": "acc", "goal": "maximize"}
    assert details["best"] == {
        "trial": 4,
        "run_id": "birds_5",
        "value": 0.95,
        "params": {"lr": "0.03", "batch_size": "16"},
    }
    assert details["model"] == "birds-net:3"
    assert [t["trial"] for t in details["trials"]] == [4, 1, 0, 2, 3]
    assert details["trials"][3]["state"] == "early-terminated"
    assert details["counts"] == {"completed": 3, "early-terminated": 1, "failed": 1}
    assert details["spec"]["search_space"] == SPACE


def test_sweeps_show_plot_writes_a_png(sweep, expkit_cli, tmp_path):
    picture = tmp_path / "sweep.png"

    result = expkit_cli("sweeps", "show", sweep.id, "--plot", str(picture))

    assert result.returncode == 0, result.stderr
    assert f"wrote {picture} (optimization history, importances)" in result.stdout
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    assert imread(picture).shape[0] > 500  # two panels, one above the other


def test_plot_falls_back_to_parallel_coordinates(expkit_workspace, tmp_path):
    """One completed trial: no importances can be computed."""
    from expkit.sweeps.plot import plot_sweep

    history = expkit_workspace.history
    record = history.sweeps.create("birds", sweep_spec(JOB))
    write_study(expkit_workspace, record.id, [(0.01, 16, 0.7)])

    panel = plot_sweep(expkit_workspace, record, tmp_path / "one.png")

    assert panel == "parallel coordinates"
    assert (tmp_path / "one.png").stat().st_size > 0


def test_plot_errors_are_one_line(sweep, expkit_cli, expkit_workspace, tmp_path):
    result = expkit_cli("sweeps", "show", sweep.id, "--plot", str(tmp_path / "no" / "x.png"))
    assert result.returncode == 2
    assert "folder" in error_line(result) and "does not exist" in error_line(result)

    result = expkit_cli("sweeps", "show", sweep.id, "--plot", str(tmp_path / "x.unknown"))
    assert result.returncode == 2
    assert "known extension" in error_line(result)

    fresh = expkit_workspace.history.sweeps.create("birds", sweep_spec(JOB))
    result = expkit_cli("sweeps", "show", fresh.id, "--plot", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert "has no study yet" in error_line(result)

    write_study(expkit_workspace, fresh.id, [])  # a study, no trial completed
    result = expkit_cli("sweeps", "show", fresh.id, "--plot", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert error_line(result).endswith("no completed trial to plot yet")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no Optuna warning
    assert not (tmp_path / "x.png").exists()


def test_plot_without_matplotlib_names_the_extra(sweep, expkit_cli, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "matplotlib.py").write_text("raise ImportError('no matplotlib here')\n")
    import os

    path = os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])
    result = expkit_cli(
        "sweeps", "show", sweep.id, "--plot", str(tmp_path / "x.png"), env={"PYTHONPATH": path}
    )
    assert result.returncode == 2
    assert "pip install 'expkit[sweep,plot]'" in error_line(result)


def test_unknown_sweep_is_one_line(expkit_cli):
    for args in (("sweeps", "show", "nope"), ("runs", "list", "--sweep", "7")):
        result = expkit_cli(*args)
        assert result.returncode == 2
        assert "`expkit sweeps list`" in error_line(result)


def test_runs_list_sweep_shows_the_trials(sweep, expkit_cli, expkit_workspace):
    expkit_workspace.history.runs.create("birds", JOB)  # not a trial: not listed

    result = expkit_cli("runs", "list", "--sweep", sweep.id)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["TRIAL", "RUN"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["0", "birds_1", "completed"],
        ["1", "birds_2", "completed"],
        ["2", "birds_3", "canceled"],
        ["3", "birds_4", "failed"],
        ["4", "birds_5", "completed"],
    ]
    with_metric = expkit_cli("runs", "list", "--sweep", "latest", "--metric", "acc")
    assert with_metric.stdout.splitlines()[2].split()[-1] == "0.9"


def test_runs_show_names_the_sweep_and_trial(sweep, expkit_cli):
    result = expkit_cli("runs", "show", "birds_3")

    assert result.returncode == 0, result.stderr
    assert "sweep       birds_sweep_1 (trial 2)" in result.stdout
    assert f"error       {REASON}" in result.stdout

    details = json.loads(expkit_cli("runs", "show", "birds_3", "--json").stdout)
    assert (details["sweep"], details["trial"]) == ("birds_sweep_1", 2)


# -- the best trial and its model -----------------------------------------------------------
def test_best_trial_is_the_best_value_it_logged_by_the_goal(expkit_workspace, sweep):
    # Trial 4 logged 0.95, then 0.8: its value is its best (0.95), as HyperDrive ranks runs.
    assert best_trial(expkit_workspace, sweep.id).trial == 4

    history = expkit_workspace.history
    low = history.sweeps.create("birds", sweep_spec(JOB, goal="minimize"))
    add_trial(history, low, 0, 0.01, 16, [0.4])
    add_trial(history, low, 1, 0.02, 16, [0.1], state="early-terminated")  # not completed
    add_trial(history, low, 2, 0.03, 16, [0.2])
    add_trial(history, low, 3, 0.04, 16, [0.2])  # a tie: the lower trial number wins
    assert best_trial(expkit_workspace, low.id).trial == 2

    none = history.sweeps.create("birds", sweep_spec(JOB))
    add_trial(history, none, 0, 0.01, 16, [0.5], state="running")
    assert best_trial(expkit_workspace, none.id) is None
    with pytest.raises(NoBestTrial, match="no trial completed"):
        register_best(expkit_workspace, none.id)
    with pytest.raises(UserError, match="no sweep 'nope'"):
        best_trial(expkit_workspace, "nope")


TRAIN = """
import os, sys
from expkit import Run
run = Run.get_context()
lr = float(sys.argv[sys.argv.index("--lr") + 1])
for epoch in range(2):
    run.log("acc", round(1 - abs(lr - 0.05) * (2 - epoch), 4))
os.makedirs("outputs", exist_ok=True)
with open("outputs/model.pt", "w") as f:
    f.write(f"weights for lr {lr}")
"""


class RememberingRegistry(expkit.ModelRegistry):
    """A model registry that keeps what it was given: (model, version, run id, sweep)."""

    name = "remember"

    def __init__(self) -> None:
        self.registered: list[tuple] = []

    def register(self, model, run, options):
        self.registered.append((model.name, model.version, run.run_id, run.sweep))
        return f"remember:{model.name}/{model.version}"


class RememberingPlugin:
    def __init__(self) -> None:
        self.registry = RememberingRegistry()

    @expkit.hookimpl
    def expkit_model_registries(self):
        return [self.registry]


def run_trials(workspace, plugins, sweep_id, lrs, tmp_path, model=None):
    """Each lr a real trial of the sweep, run to its end through the lifecycle."""
    source = tmp_path / "src"
    source.mkdir(exist_ok=True)
    (source / "train.py").write_text(TRAIN)
    records = []
    for trial, lr in enumerate(lrs):
        spec = {
            "experiment": "birds",
            "source_directory": str(source),
            "entry_script": "train.py",
            "args": ["--lr", str(lr)],
            **({"model": model} if model else {}),
        }
        job = JobSpec.from_dict(spec, source="<trial>", base_dir=tmp_path)
        record = lifecycle.submit(workspace, job, sweep=sweep_id, trial=trial)
        final = lifecycle.drive(workspace, record.id, Console(io.StringIO()), plugins)
        assert final.state == "completed", final.error
        records.append(final)
    return records


def test_register_best_registers_the_best_trials_model(
    expkit_workspace, expkit_plugins, register_plugin, tmp_path
):
    plugin = RememberingPlugin()
    register_plugin(plugin, "remembering")
    remembering = plugin.registry
    model = {"name": "birds-net", "registries": [{"name": "remember"}]}
    history = expkit_workspace.history
    record = history.sweeps.create("birds", sweep_spec(JOB, register_best=True))
    trials = run_trials(
        expkit_workspace, expkit_plugins, record.id, [0.01, 0.05, 0.08], tmp_path, model
    )
    # A trial registers no model itself: the sweep registers its best.
    assert history.models.versions() == []
    assert remembering.registered == []
    stages = {s.stage: s for s in history.stages.of(trials[0].id)}
    assert stages["register"].state == "skipped"

    version = register_best(expkit_workspace, record.id)

    best = trials[1]  # lr 0.05: acc 1.0
    assert (version.name, version.version) == ("birds-net", 1)
    assert version.lineage["run_id"] == best.id
    assert version.lineage["sweep"] == record.id
    assert version.lineage["trial"] == 1
    assert version.lineage["primary_metric"] == {"name": "acc", "goal": "maximize", "value": 1.0}
    assert version.lineage["metrics"] == {"acc": 1.0}
    assert version.lineage["entry_script"] == "train.py"
    assert (version.path / "model.pt").read_text() == "weights for lr 0.05"
    assert remembering.registered == [("birds-net", 1, best.id, record.id)]
    after = history.sweeps.get(record.id)
    assert (after.model, after.best_run) == ("birds-net:1", best.id)

    # Asked again (a resumed driver): the same version, none made.
    again = register_best(expkit_workspace, record.id)
    assert again.version == 1 and len(history.models.versions()) == 1


def test_register_best_without_a_model_in_the_job(expkit_workspace, expkit_plugins, tmp_path):
    record = expkit_workspace.history.sweeps.create("birds", sweep_spec(JOB))
    run_trials(expkit_workspace, expkit_plugins, record.id, [0.02], tmp_path)

    with pytest.raises(UserError, match="its job names no model"):
        register_best(expkit_workspace, record.id)


def test_show_names_the_registered_model(expkit_workspace, expkit_plugins, tmp_path, expkit_cli):
    record = expkit_workspace.history.sweeps.create("birds", sweep_spec(JOB))
    run_trials(expkit_workspace, expkit_plugins, record.id, [0.02, 0.05], tmp_path, {"name": "net"})
    register_best(expkit_workspace, record.id)
    expkit_workspace.history.sweeps.finish(record.id, "completed")

    out = expkit_cli("sweeps", "show", record.id).stdout
    assert "registered model   net:1" in out
    assert "best trial         1 (run birds_2): acc 1" in out
    assert "parameters       lr=0.05" in out
    models = expkit_cli("models", "show", "net:1")
    assert record.id in models.stdout, models.stdout


def test_show_reads_the_spec_as_the_sweep_spec_writes_it(expkit_workspace, expkit_cli, tmp_path):
    """A record holding `SweepSpec.to_dict()` (HyperDrive's form, a paired choice): the spec
    in brief, and a column per argument the trials were given."""
    from expkit.sweeps.space import trial_job
    from expkit.sweeps.spec import SweepSpec

    (tmp_path / "train.py").write_text("")
    raw = {
        "job": {
            "experiment": "birds",
            "source_directory": str(tmp_path),
            "entry_script": "train.py",
            "args": {"epochs": 2},
            "model": {"name": "birds-net", "path": "outputs/"},
        },
        "search_space": {
            "lr": "loguniform(-9.2, -2.3)",
            "arch": {"type": "choice", "values": [{"depth": 2, "width": 64}, {"depth": 4}]},
        },
        "sampling_algorithm": {"type": "random", "seed": 3},
        "objective": {"primary_metric": "val_loss", "goal": "minimize"},
        "early_termination": {"type": "median_stopping", "delay_evaluation": 2},
        "limits": {"max_total_trials": 4, "timeout": 600},
        "register_best": True,
    }
    spec = SweepSpec.from_dict(raw, base_dir=tmp_path)
    history = expkit_workspace.history
    record = history.sweeps.create("birds", spec.to_dict())
    for trial, (lr, arch) in enumerate([(0.001, {"depth": 2, "width": 64}), (0.01, {"depth": 4})]):
        job = trial_job(spec, {"lr": lr, **arch})
        run = history.runs.create("birds", job.to_dict(), sweep=record.id, trial=trial)
        history.metrics.add(run.id, [("val_loss", 0, 0.5 - lr, None, time.time(), 0)])

    out = expkit_cli("sweeps", "show", record.id).stdout

    for expected in (
        "search space       lr: loguniform(min_value=-9.2, max_value=-2.3)",
        "arch: choice({'depth': 2, 'width': 64}, {'depth': 4})",
        "sampling           random (seed 3, rule random)",
        "objective          minimize val_loss",
        "early termination  median_stopping (evaluation_interval 1, delay_evaluation 2)",
        "limits             max_total_trials 4, max_concurrent_trials 1, timeout 600 s",
        "register best      yes",
    ):
        assert expected in out, out
    table = out[out.index(" TRIAL") :].splitlines()
    assert table[0].split()[:6] == ["TRIAL", "RUN", "STATE", "lr", "depth", "width"]
    # Sorted by val_loss, lowest first (0.49, then 0.499).
    assert table[1].split()[:5] == ["1", "birds_2", "queued", "0.01", "4"]
    assert table[2].split()[:8] == ["0", "birds_1", "queued", "0.001", "2", "64", "0.499", "0.499"]
    rows = trial_rows(expkit_workspace, history.sweeps.get(record.id))
    assert [row.params for row in rows] == [
        {"lr": "0.001", "depth": "2", "width": "64"},
        {"lr": "0.01", "depth": "4"},
    ]
