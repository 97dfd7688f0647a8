"""`model.register_if`: a run that trained badly completes but makes no model version, and the
summary says why in one line; a better one becomes the newest version (and takes the job's
aliases). Driven through the `expkit` command, on a script that logs the value it is given."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import error_line
from test_sweep_driver import write_sweep

TRAIN = """
import os, sys
from expkit import Run
run = Run.get_context()
acc = float(sys.argv[1])
if not acc < 0:  # NaN too
    run.log("best_val_acc", acc)
run.log("val_loss", round(1 - abs(acc), 4))
os.makedirs("outputs", exist_ok=True)
open("outputs/model.pt", "w").write(f"weights {acc}")
"""


def summary(stdout: str) -> dict[str, str]:
    """The rows of the summary `expkit run` prints at the end: {"register": "skipped ..."}."""
    rows = [line.strip().split(None, 1) for line in stdout.split("\nrun ")[-1].splitlines()[1:]]
    return {row[0]: " ".join(row[1].split()) for row in rows if len(row) == 2}


def versions(expkit_cli) -> list[list[str]]:
    """`expkit models list`'s rows, each split into its cells (blank ones dropped)."""
    out = expkit_cli("models", "list").stdout
    return [line.split() for line in out.splitlines()[1:]] if "no models" not in out else []


@pytest.fixture
def job(write_job):
    """`job(register_if, **model)`: the path of a job registering `pt-dnn` on that condition."""

    def make(condition, **model) -> Path:
        spec = {"name": "pt-dnn", "path": "outputs/model.pt", "register_if": condition, **model}
        return write_job({"model": spec}, script=TRAIN)

    return make


def run(expkit_cli, job: Path, value: float):
    result = expkit_cli("run", str(job), "--set", f"args=[{value}]")
    assert result.returncode == 0, result.stdout + result.stderr  # completed either way
    return result


def test_a_run_below_the_threshold_completes_without_a_version(job, expkit_cli):
    threshold = job("best_val_acc > 0.9")

    low = run(expkit_cli, threshold, 0.84)
    rows = summary(low.stdout)
    assert rows["register"] == "skipped - not registered: best_val_acc 0.84 is not > 0.9"
    assert versions(expkit_cli) == []
    assert "register_if not met: best_val_acc 0.84 is not > 0.9" in low.stdout

    high = run(expkit_cli, threshold, 0.95)
    assert summary(high.stdout)["register"].startswith("completed")
    assert [row[:2] for row in versions(expkit_cli)] == [["pt-dnn", "1"]]
    shown = expkit_cli("runs", "show", "test_1").stdout  # the reason stays with the run
    assert "not registered: best_val_acc 0.84 is not > 0.9" in shown


def test_better_than_the_champion_or_not_registered(job, expkit_cli):
    better = job({"better": "best_val_acc", "than": "champion"}, aliases=["champion"])

    first = run(expkit_cli, better, 0.8)  # nothing to compare with yet: registered
    assert "no version of pt-dnn has alias 'champion' to compare with" in first.stdout
    worse = run(expkit_cli, better, 0.7)
    assert summary(worse.stdout)["register"] == (
        "skipped - not registered: best_val_acc 0.7 is not better than 0.8 "
        "(pt-dnn@champion, version 1; goal maximize)"
    )
    run(expkit_cli, better, 0.9)

    # A worse version is visible at a glance: key metrics, and where the alias is.
    listed = expkit_cli("models", "list").stdout.splitlines()
    assert listed[0].split()[-3:] == ["best_val_acc", "val_loss", "ALIASES"]
    assert [row[:3] + row[5:] for row in versions(expkit_cli)] == [  # [3:5]: date and time
        ["pt-dnn", "1", "test_1", "0.8", "0.2"],
        ["pt-dnn", "2", "test_3", "0.9", "0.1", "@champion"],
    ]


def test_better_than_the_latest_version_when_minimizing(job, expkit_cli):
    lower = job([{"better": "val_loss", "goal": "minimize"}], metrics=["val_loss"])
    for value in (0.6, 0.5, 0.7):  # losses 0.4, 0.5 (worse: not registered), 0.3
        run(expkit_cli, lower, value)
    listed = expkit_cli("models", "list").stdout.splitlines()
    assert listed[0].split() == ["MODEL", "VERSION", "RUN", "REGISTERED", "val_loss", "ALIASES"]
    assert [(row[1], row[2], row[-1]) for row in versions(expkit_cli)] == [
        ("1", "test_1", "0.4"),
        ("2", "test_3", "0.3"),
    ]


def test_a_metric_the_run_never_logged_fails_the_condition_by_name(job, expkit_cli):
    threshold = job(["val_loss < 2", "best_val_acc >= 0.5"])

    plan = expkit_cli("run", str(threshold), "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "only if val_loss < 2 and best_val_acc >= 0.5" in plan.stdout

    silent = run(expkit_cli, threshold, -1)  # logs val_loss only
    assert summary(silent.stdout)["register"] == (
        "skipped - not registered: the run logged no metric 'best_val_acc'"
    )
    assert versions(expkit_cli) == []


def test_each_reason_is_said_once(job, expkit_cli):
    both = job(["best_val_acc >= 0.5", {"better": "best_val_acc"}])

    silent = run(expkit_cli, both, -1)  # logs val_loss only: both fail for one reason

    assert summary(silent.stdout)["register"] == (
        "skipped - not registered: the run logged no metric 'best_val_acc'"
    )


def test_a_nan_metric_meets_no_condition(job, expkit_cli):
    # NaN != 0 is true in Python: a diverged run must not pass `!=`.
    diverged = run(expkit_cli, job(["best_val_acc != 0", "best_val_acc > 0.5"]), "nan")

    assert summary(diverged.stdout)["register"] == "skipped - not registered: best_val_acc is NaN"
    assert versions(expkit_cli) == []


def test_a_champion_whose_metric_is_nan_is_beaten(job, expkit_cli):
    run(expkit_cli, job(None), "nan")  # no condition: version 1, best_val_acc NaN
    assert expkit_cli("models", "alias", "pt-dnn:1", "champion").returncode == 0

    better = run(expkit_cli, job({"better": "best_val_acc", "than": "champion"}), 0.7)

    assert summary(better.stdout)["register"].startswith("completed")
    assert (
        "register_if met: best_val_acc 0.7: pt-dnn@champion, version 1 has no value of "
        "best_val_acc to compare with" in better.stdout
    )
    assert [row[:2] for row in versions(expkit_cli)] == [["pt-dnn", "1"], ["pt-dnn", "2"]]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            {"register_if": "best_val_acc >> 0.9"},
            "model.register_if: 'best_val_acc >> 0.9' is not a condition; write METRIC OP "
            "NUMBER with OP one of > >= < <= == !=, e.g. `best_val_acc > 0.9` or {better: "
            "best_val_acc, than: champion}",
        ),
        (
            {"register_if": ["acc > 1", {"better": "acc", "goal": "max"}]},
            "model.register_if.1.goal: must be 'maximize' or 'minimize', not 'max'",
        ),
        (
            {"register_if": {"better": "acc", "than": "latest"}},
            "model.register_if.than: alias 'latest' is reserved by MLflow (the latest "
            "version); choose another, e.g. champion",
        ),
        (
            {"register_if": {"bettr": "acc"}},
            "model.register_if.bettr: unknown field; allowed: better, than, goal",
        ),
        (
            {"aliases": ["v2"]},
            "model.aliases.0: alias 'v2' is reserved by MLflow (a version); choose another, "
            "e.g. champion",
        ),
        ({"aliases": ["a", "a"]}, "model.aliases: each alias may be listed once"),
        ({"metrics": [""]}, "model.metrics.0: is empty; name a metric, e.g. best_val_acc"),
    ],
    ids=["not-a-condition", "bad-goal", "reserved-than", "unknown-key", "v2", "twice", "empty"],
)
def test_a_bad_condition_alias_or_metric_is_one_line(write_job, expkit_cli, model, message):
    job = write_job({"model": {"name": "pt-dnn", **model}}, script=TRAIN)

    for args in (["run", str(job)], ["run", str(job), "--dry-run"]):
        result = expkit_cli(*args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert error_line(result) == f"expkit: error: {job}: {message}"
    assert expkit_cli("runs", "list").stdout.startswith("no runs")


def test_a_sweep_registers_its_best_trial_only_if_it_meets_register_if(
    expkit_workspace, expkit_cli, tmp_path
):
    """The best trial's acc is about 1; a threshold above it keeps the sweep from making a
    version (the sweep still completes and says why), one below it registers it."""
    sweep = write_sweep(
        tmp_path,
        {
            "search_space": {"lr": {"type": "choice", "values": [0.0, 0.01]}},
            "sampling_algorithm": {"type": "grid"},
            "limits": {"max_concurrent_trials": 2},
            "register_best": True,
        },
        {"steps": 1, "sleep": 0.0},
    )
    job = tmp_path / "project" / "job.yaml"
    spec = yaml.safe_load(job.read_text())
    spec["model"] = {"name": "swmodel", "register_if": "acc > 1.5", "aliases": ["champion"]}
    job.write_text(yaml.safe_dump(spec))

    refused = expkit_cli("sweep", str(sweep))
    assert refused.returncode == 0, refused.stdout + refused.stderr
    assert "not registered (model.register_if): acc 1 is not > 1.5" in refused.stdout
    assert expkit_workspace.history.sweeps.find("latest").state == "completed"
    assert versions(expkit_cli) == []

    spec["model"]["register_if"] = "acc > 0.9"
    job.write_text(yaml.safe_dump(spec))
    registered = expkit_cli("sweep", str(sweep))
    assert registered.returncode == 0, registered.stdout + registered.stderr
    assert "registered model: swmodel:1" in registered.stdout
    assert "registered the best trial's model as swmodel:1, @champion\n" in registered.stdout
    assert expkit_workspace.history.aliases.of_model("swmodel") == {"champion": 1}


def test_a_registry_s_export_is_skipped_when_no_version_will_be_made(write_job, expkit_cli):
    """The `mlflow` registry's export (added only for it to register with, a minute for the
    sample's model) is not made when register_if does not hold: no version, no use; the
    line says why."""
    model = {
        "name": "pt-dnn",
        "path": "outputs/",
        "load": {"file": "model.pt"},
        "input": {"shape": [1, 4]},
        "registries": ["mlflow"],
        "register_if": "best_val_acc > 0.9",
    }
    low = run(expkit_cli, write_job({"model": model}, script=TRAIN), 0.84)
    out = low.stdout
    assert "export mlflow skipped: not registered (best_val_acc 0.84 is not > 0.9)" in out, out
    assert "export mlflow (mlflow)" not in out
    rows = summary(out)
    assert rows["post-process"].endswith("exports: mlflow skipped")
    assert rows["register"] == "skipped - not registered: best_val_acc 0.84 is not > 0.9"
    assert "warning" not in low.stderr + out
