"""A run's parameters: the job's `args` (data placeholders resolved to paths) and what the
script logs as parameters, shown by `runs show` (and --json), as `runs list --param/--metric`
columns, and naming the runs that `expkit metrics RUN1 RUN2` compares."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from expkit import JobSpec, plot
from expkit.cli.metrics import run_labels

# Logs a parameter of its own, one that replaces the job's `epochs`, and its metrics.
TRAIN = """
import sys
from expkit import Run

run = Run.get_context()
run.log_params({"optimizer": "adam", "epochs": 5})
lr = float(sys.argv[sys.argv.index("--lr") + 1])
for epoch in range(3):
    run.log("loss", lr / (epoch + 1), step=epoch)
run.log("acc", 1 - lr)
"""

ARGS = {
    "lr": 0.1,
    "data-dir": "${data.digits}",
    "epochs": 3,
    "augment": True,
    "sizes": [224, 112],
}


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def digits_job(write_job):
    """`digits_job(**args)`: a job running TRAIN with data `digits` and ARGS (plus `args`)."""

    def make(**args) -> Path:
        job = write_job(
            {"args": {**ARGS, **args}, "data": {"digits": {"source": "images"}}}, script=TRAIN
        )
        (job.parent / "images").mkdir()
        return job

    return make


# -- JobSpec.params: the job's `args` as parameters ------------------------------------------
def job_with(args) -> JobSpec:
    return JobSpec(experiment="digits", entry_script="train.py", args=args)


def test_args_as_a_mapping_are_a_parameter_each_as_text():
    job = job_with({"num_epochs": 30, "--lr": 0.001, "-q": "x", "name": "two words"})

    assert job.params({}) == {"num_epochs": "30", "lr": "0.001", "q": "x", "name": "two words"}


def test_flags_and_lists_are_written_as_in_yaml():
    job = job_with(
        {"pretrained": True, "freeze": False, "checkpoint": None, "classes": ["crow", "robin"]}
    )

    assert job.params({}) == {
        "pretrained": "true",
        "freeze": "false",
        "checkpoint": "null",
        "classes": "crow robin",
    }


def test_data_placeholders_are_the_datas_paths():
    job = job_with({"data": "${data.birds}", "pair": ["${data.birds}/train", "${data.extra}"]})

    params = job.params({"birds": "/runs/r_1/data/birds", "extra": "/x"})

    assert params == {"data": "/runs/r_1/data/birds", "pair": "/runs/r_1/data/birds/train /x"}


def test_args_as_a_list_are_one_parameter_the_command_line():
    job = job_with(["--data=${data.birds}", "fit", 3, "two words", "${data.birds}"])

    assert job.params({"birds": "/d"}) == {"args": "--data=/d fit 3 'two words' /d"}
    # as the script gets it: a list's items are written as Python writes them
    assert job_with(["--flag", True, None]).params({}) == {"args": "--flag True None"}
    assert job_with([]).params({}) == {} == job_with({}).params({})


# -- expkit run records them; runs show lists them ------------------------------------------
def test_a_run_records_the_jobs_args_and_the_scripts_params(
    expkit_cli, expkit_workspace, digits_job
):
    ok(expkit_cli("run", str(digits_job())))

    data_path = str(expkit_workspace.run_dir("test_1") / "work" / "data" / "digits")
    shown = ok(expkit_cli("runs", "show", "test_1"))
    section = shown.split("\nparams\n")[1].split("\n\n")[0].splitlines()
    assert [line.split(None, 1) for line in section] == [
        ["lr", "0.1"],
        ["data-dir", data_path],
        ["augment", "true"],
        ["sizes", "224 112"],
        ["optimizer", "adam  (logged by the script)"],
        ["epochs", "5  (logged by the script)"],  # the script's value replaced the job's 3
    ]
    assert shown.index("\nparams\n") < shown.index("\nmetrics (latest value)\n")

    details = json.loads(ok(expkit_cli("runs", "show", "test_1", "--json")))
    assert details["params"] == {
        "lr": "0.1",
        "data-dir": data_path,
        "augment": "true",
        "sizes": "224 112",
        "optimizer": "adam",
        "epochs": "5",
    }
    assert details["param_sources"] == {
        "lr": "job",
        "data-dir": "job",
        "augment": "job",
        "sizes": "job",
        "optimizer": "script",
        "epochs": "script",
    }


def test_a_run_without_params_shows_no_params_section(expkit_cli, write_job):
    ok(expkit_cli("run", str(write_job({}, script="print('hi')\n"))))

    assert "\nparams\n" not in ok(expkit_cli("runs", "show", "latest"))
    details = json.loads(ok(expkit_cli("runs", "show", "latest", "--json")))
    assert (details["params"], details["param_sources"]) == ({}, {})


def test_a_params_value_on_several_lines_is_shown_on_one(run_job, expkit_cli):
    script = "from expkit import Run\nRun.get_context().log_params({'note': 'a\\nb'})\n"
    run_job({}, script=script)

    shown = ok(expkit_cli("runs", "show", "latest"))
    assert re.search(r"^  note\s+a\\nb  \(logged by the script\)$", shown, re.M), shown


# -- runs list --param KEY --metric NAME ------------------------------------------------------
def test_runs_list_has_a_column_per_param_and_metric_in_the_order_given(expkit_cli, digits_job):
    ok(expkit_cli("run", str(digits_job(lr=0.1))))
    ok(expkit_cli("run", str(digits_job(lr=0.01))))

    out = ok(
        expkit_cli(
            "runs", "list", "--param", "lr", "--metric", "acc", "--param", "nope",
            "--metric", "loss", "--param", "optimizer",
        )
    )  # fmt: skip

    lines = out.splitlines()
    header = lines[0]
    assert header.split() == [
        "RUN", "STATE", "CREATED", "DURATION", "EXIT", "lr", "acc", "nope", "loss", "optimizer",
    ]  # fmt: skip
    # cells by the header's columns: "nope" is no parameter of either run, so blank
    starts = [header.index(name) for name in ("lr", "acc", "nope", "loss", "optimizer")]
    ends = [*starts[1:], None]
    cells = {
        line.split()[0]: [line[a:b].strip() for a, b in zip(starts, ends, strict=True)]
        for line in lines[1:]
    }
    assert cells == {
        "test_2": ["0.01", "0.99", "", "0.003333", "adam"],  # latest loss: step 2
        "test_1": ["0.1", "0.9", "", "0.03333", "adam"],
    }


def test_runs_list_names_a_param_and_a_metric_of_the_same_name(expkit_cli, run_job):
    script = "from expkit import Run\nRun.get_context().log('lr', 0.5)\n"
    run_job({"args": {"lr": 0.1}}, script=script)

    lines = ok(expkit_cli("runs", "list", "--param", "lr", "--metric", "lr")).splitlines()

    assert lines[0].endswith("lr (param)  lr (metric)")
    assert lines[1].split()[-2:] == ["0.1", "0.5"]


def test_runs_list_help_explains_the_columns(expkit_cli):
    text = " ".join(ok(expkit_cli("runs", "list", "--help")).split())
    assert "--param KEY" in text and "--metric NAME" in text
    assert "blank for a run that has none" in text
    assert "the latest value of its metric NAME" in text


# -- expkit metrics RUN1 RUN2: runs named by the parameters that differ ---------------------
def test_runs_compared_are_named_by_the_params_that_differ(expkit_cli, digits_job, tmp_path):
    ok(expkit_cli("run", str(digits_job(lr=0.1))))
    ok(expkit_cli("run", str(digits_job(lr=0.01, seed=7))))

    lines = ok(expkit_cli("metrics", "test_1", "test_2")).splitlines()

    # lr and seed differ (test_1 has no seed); data-dir, a path in each run's own folder, and
    # the rest do not
    assert re.split(r"\s{2,}", lines[0]) == [
        "METRIC",
        "test_1 (lr=0.1)",
        "test_2 (lr=0.01, seed=7)",
    ]
    assert re.split(r"\s{2,}", lines[2]) == ["acc", "0.9", "0.99"]

    picture = tmp_path / "compare.png"
    out = ok(expkit_cli("metrics", "1", "2", "--plot", str(picture)))
    assert "  runs     test_1 (lr=0.1), test_2 (lr=0.01, seed=7)" in out.splitlines()
    assert picture.stat().st_size > 0


def test_runs_with_the_same_params_are_named_by_id(expkit_cli, digits_job):
    ok(expkit_cli("run", str(digits_job())))
    ok(expkit_cli("run", str(digits_job())))

    lines = ok(expkit_cli("metrics", "test_1", "test_2", "acc")).splitlines()

    assert lines[0].split() == ["METRIC", "test_1", "test_2"]


def test_the_plots_legend_and_bars_carry_the_labels(run_job, expkit_workspace, tmp_path):
    script = "from expkit import Run\nrun = Run.get_context()\nrun.log('acc', 0.5)\n"
    for step in range(2):
        script += f"run.log('loss', 1 / ({step} + 1), step={step})\n"
    run_job({"args": {"lr": 0.1, "batch": 8}}, script=script)
    run_job({"args": {"lr": 0.2, "batch": 8}}, script=script)
    history = expkit_workspace.history
    runs = {run: plot.curves(history, run)[0] for run in ("test_1", "test_2")}

    labels = run_labels(expkit_workspace, list(runs))
    figure = plot.plot_runs(runs, tmp_path / "compare.svg", labels)

    assert labels == {"test_1": "test_1 (lr=0.1)", "test_2": "test_2 (lr=0.2)"}
    assert [t.get_text() for t in figure.legends[0].get_texts()] == list(labels.values())
    axes = {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}
    assert [line.get_label() for line in axes["loss"].get_lines()] == list(labels.values())
    assert [t.get_text() for t in axes["acc"].get_xticklabels()] == list(labels.values())


def test_a_long_differing_value_is_shortened_in_the_label(run_job, expkit_workspace):
    run_job({"args": {"note": "a" * 40 + "-first"}}, script="print()\n")
    run_job({"args": {"note": "a" * 40 + "-second"}}, script="print()\n")

    labels = run_labels(expkit_workspace, ["test_1", "test_2"])

    assert labels["test_1"] == "test_1 (note=aaaaaaaaaaaaaaaaaa...aaaaaaaaaaaa-first)"
    assert labels["test_2"].endswith("...aaaaaaaaaaa-second)")
