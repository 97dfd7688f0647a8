"""The sweep spec and its search space on real Optuna studies: every expression in Azure ML
v2's mapping form and HyperDrive's function form, each bad spec a one-line error naming the
file and the field, the round trip through the sweep's record, the samplers' values (inside
their bounds, reproducible when seeded, the grid's product exactly once), paired parameters
and the job each trial runs."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import error_line
from expkit.errors import JobSpecError
from expkit.sweeps import space
from expkit.sweeps.spec import (
    EXPRESSIONS,
    Parameter,
    SweepSpec,
    choice,
    loguniform,
    quniform,
    uniform,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

ISSUE_SWEEP = """\
job: training/job.yaml
search_space:
  learning_rate: {type: loguniform, min_value: -9.2, max_value: -2.3}
  momentum: {type: uniform, min_value: 0.8, max_value: 0.99}
  batch_size: {type: choice, values: [16, 32, 64]}
sampling_algorithm: {type: bayesian}
objective: {primary_metric: best_val_acc, goal: maximize}
early_termination: {type: bandit, slack_factor: 0.1, evaluation_interval: 1, delay_evaluation: 2}
limits: {max_total_trials: 20, max_concurrent_trials: 2, timeout: 7200, trial_timeout: 1800}
register_best: true
"""

# Every expression in both forms: (mapping, HyperDrive's function form).
FORMS = {
    "choice": ({"type": "choice", "values": [16, 32, 64]}, "choice(16, 32, 64)"),
    "choice-list": ({"type": "choice", "values": [16, 32]}, "choice([16, 32])"),
    "choice-range": ({"type": "choice", "values": [1, 2, 3, 4]}, "choice(range(1, 5))"),
    "choice-strings": ({"type": "choice", "values": ["sgd", "adam"]}, "choice('sgd', 'adam')"),
    "randint": ({"type": "randint", "upper": 10}, "randint(10)"),
    "uniform": ({"type": "uniform", "min_value": 0.8, "max_value": 0.99}, "uniform(0.8, 0.99)"),
    "quniform": (
        {"type": "quniform", "min_value": 0, "max_value": 1, "q": 0.1},
        "quniform(0, 1, 0.1)",
    ),
    "loguniform": (
        {"type": "loguniform", "min_value": -9.2, "max_value": -2.3},
        "loguniform(-9.2, -2.3)",
    ),
    "qloguniform": (
        {"type": "qloguniform", "min_value": 0, "max_value": 5, "q": 2},
        "qloguniform(0, 5, 2)",
    ),
    "normal": ({"type": "normal", "mu": 0, "sigma": 1}, "normal(0, 1)"),
    "lognormal": ({"type": "lognormal", "mu": 0, "sigma": 0.5}, "lognormal(0, 0.5)"),
    "qnormal": ({"type": "qnormal", "mu": 10, "sigma": 3, "q": 0.5}, "qnormal(10, 3, 0.5)"),
    "qlognormal": (
        {"type": "qlognormal", "mu": 1, "sigma": 0.5, "q": 0.25},
        "qlognormal(1, 0.5, 0.25)",
    ),
    "keywords": (
        {"type": "uniform", "min_value": 0.1, "max_value": 0.2},
        "uniform(min_value=0.1, max_value=0.2)",
    ),
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with training/job.yaml (dict args) and training/train.py."""
    training = tmp_path / "training"
    training.mkdir()
    (training / "train.py").write_text("print('train')\n")
    (training / "job.yaml").write_text(
        "experiment: sweepy\nentry_script: train.py\n"
        "args: {num_epochs: 2, learning_rate: 0.01, batch_size: 8}\n"
        "model: {name: net, path: outputs/}\n"
    )
    return tmp_path


def sweep_file(project: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = project / name
    path.write_text(text)
    return path


def spec_with(project: Path, **fields: object) -> SweepSpec:
    """The issue's sweep with `fields` replaced (a None value removes the field)."""
    raw = yaml.safe_load(ISSUE_SWEEP)
    for key, value in fields.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return SweepSpec.from_dict(raw, source="sweep.yaml", base_dir=project)


# -- parsing ----------------------------------------------------------------------------------
def test_the_issue_example_parses_with_the_job_relative_to_the_sweep_file(project, monkeypatch):
    monkeypatch.chdir("/")  # the job path is the sweep file's, not the current folder's
    spec = SweepSpec.from_yaml(sweep_file(project, ISSUE_SWEEP))
    assert spec.job.experiment == spec.experiment == "sweepy"
    assert spec.job.source_directory == str((project / "training").resolve())
    assert [p.name for p in spec.search_space] == ["learning_rate", "momentum", "batch_size"]
    assert spec.search_space[0] == Parameter(
        "learning_rate", "loguniform", min_value=-9.2, max_value=-2.3
    )
    assert spec.search_space[2].values == (16, 32, 64)
    assert (spec.sampling.type, spec.objective.goal) == ("bayesian", "maximize")
    # Bayesian with early termination is allowed (Azure ML forbids it; TPE learns from pruned)
    assert spec.early_termination is not None
    assert (spec.early_termination.type, spec.early_termination.slack_factor) == ("bandit", 0.1)
    assert spec.early_termination.delay_evaluation == 2
    assert spec.limits.max_total_trials == 20 and spec.limits.trial_timeout == 1800
    assert spec.register_best is True and spec.source.endswith("sweep.yaml")


@pytest.mark.parametrize("case", FORMS)
def test_each_expression_reads_the_same_in_both_forms(project, case):
    mapping, function = FORMS[case]
    one = spec_with(project, search_space={"x": mapping}, sampling_algorithm="random")
    other = spec_with(project, search_space={"x": function}, sampling_algorithm="random")
    assert one.search_space == other.search_space
    assert one.search_space[0].type == mapping["type"]


def test_every_expression_has_a_form_tested():
    assert {mapping["type"] for mapping, _ in FORMS.values()} == set(EXPRESSIONS)


def test_the_python_forms_match_the_yaml_forms(project):
    spec = spec_with(
        project,
        search_space={
            "a": choice(16, 32),
            "b": uniform(0.1, 0.2),
            "c": loguniform(-3, -1),
            "d": quniform(1, 9, 2),
        },
        sampling_algorithm="random",
    )
    again = spec_with(
        project,
        search_space={
            "a": "choice([16, 32])",
            "b": "uniform(0.1, 0.2)",
            "c": "loguniform(-3, -1)",
            "d": "quniform(1, 9, 2)",
        },
        sampling_algorithm="random",
    )
    assert spec.search_space == again.search_space


def test_an_inline_job_resolves_against_the_sweep_files_folder(project, monkeypatch):
    monkeypatch.chdir("/")
    text = ISSUE_SWEEP.replace(
        "job: training/job.yaml",
        "job: {experiment: inline, source_directory: training, entry_script: train.py,"
        " model: {name: net, path: outputs/}}",
    )
    spec = SweepSpec.from_yaml(sweep_file(project, text))
    assert spec.job.experiment == "inline"
    assert spec.job.source_directory == str((project / "training").resolve())


def test_set_overrides_the_sweep_and_the_trials_job(project):
    path = sweep_file(project, ISSUE_SWEEP.replace("{type: bayesian}", "random"))
    spec = SweepSpec.from_yaml(
        path,
        ["limits.max_total_trials=4", "job.args.num_epochs=1", "sampling_algorithm.seed=3"],
    )
    assert spec.limits.max_total_trials == 4
    assert spec.job.args["num_epochs"] == 1  # the job file itself is not changed
    assert "num_epochs: 2" in (project / "training" / "job.yaml").read_text()
    assert (spec.sampling.type, spec.sampling.seed) == ("random", 3)
    inline = ISSUE_SWEEP.replace(
        "job: training/job.yaml",
        "job: {experiment: x, source_directory: training, entry_script: train.py,"
        " model: {name: net, path: outputs/}}",
    )
    spec = SweepSpec.from_yaml(sweep_file(project, inline, "inline.yaml"), ["job.args.epochs=5"])
    assert spec.job.args == {"epochs": 5}


def test_a_bad_set_value_names_the_flag(project):
    path = sweep_file(project, ISSUE_SWEEP)
    with pytest.raises(JobSpecError) as error:
        SweepSpec.from_yaml(path, ["limits.max_total_trials=0"])
    assert str(error.value) == (
        f"{path} (--set limits.max_total_trials=0): limits.max_total_trials: "
        "must be at least 1, not 0"
    )


def test_defaults_follow_azure_ml(project):
    spec = spec_with(
        project, limits=None, early_termination=None, sampling_algorithm=None, register_best=None
    )
    assert spec.sampling.type == "random" and spec.sampling.seed is None
    assert spec.limits.max_total_trials == 1000  # Azure ML v2's default
    assert spec.limits.max_concurrent_trials == 1
    assert spec.limits.timeout is None and spec.limits.trial_timeout is None
    assert spec.early_termination is None and spec.register_best is False
    grid = spec_with(
        project,
        sampling_algorithm="grid",
        search_space={"a": "choice(1, 2, 3)", "b": "choice('x', 'y')"},
        limits={"max_total_trials": 50},
    )
    assert grid.limits.max_total_trials == 6  # capped at the grid's size
    grid = spec_with(
        project, sampling_algorithm="grid", search_space={"a": "choice(1, 2)"}, limits=None
    )
    assert grid.limits.max_total_trials == 2


def test_goal_and_names_are_case_insensitive_as_hyperdrive_writes_them(project):
    spec = spec_with(
        project,
        objective={"primary_metric": "acc", "goal": "MINIMIZE"},
        sampling_algorithm={"type": "Random", "rule": "Sobol", "seed": 1},
        early_termination={"type": "Median_Stopping"},
        search_space={"lr": "Uniform(0.1, 0.2)"},
    )
    assert spec.objective.goal == "minimize"
    assert (spec.sampling.type, spec.sampling.rule) == ("random", "sobol")
    assert spec.early_termination is not None and spec.early_termination.type == "median_stopping"


@pytest.mark.parametrize(
    "policy",
    [
        {"type": "bandit", "slack_amount": 0.05, "evaluation_interval": 2},
        {"type": "median_stopping", "delay_evaluation": 5},
        {"type": "truncation_selection", "truncation_percentage": 20},
        {"type": "successive_halving", "min_resource": 1, "reduction_factor": 3},
        {"type": "hyperband", "min_resource": 1, "max_resource": 9},
    ],
)
def test_every_policy_round_trips(project, policy):
    spec = spec_with(project, early_termination=policy, sampling_algorithm="random")
    assert spec.early_termination is not None and spec.early_termination.type == policy["type"]
    for key, value in policy.items():
        assert getattr(spec.early_termination, key) == value
    assert SweepSpec.from_dict(spec.to_dict(), source=spec.source) == spec


def test_the_spec_round_trips_through_json(project):
    spec = spec_with(
        project,
        search_space={case: FORMS[case][1] for case in FORMS if case != "choice-list"}
        | {
            "opt": {
                "type": "choice",
                "values": [{"optimizer": "sgd", "momentum": 0.9}, {"optimizer": "adam"}],
            }
        },
        sampling_algorithm={"type": "random", "seed": 5, "rule": "sobol"},
    )
    record = json.loads(json.dumps(spec.to_dict()))  # what the sweep's record keeps
    assert SweepSpec.from_dict(record, source=spec.source) == spec
    assert SweepSpec.from_dict(record, source=spec.source).to_dict() == record
    issue = SweepSpec.from_yaml(sweep_file(project, ISSUE_SWEEP))
    assert SweepSpec.from_dict(json.loads(json.dumps(issue.to_dict())), issue.source) == issue


# -- bad specs: one line naming the file and the field -----------------------------------------
def _replace(old: str, new: str) -> str:
    assert old in ISSUE_SWEEP
    return ISSUE_SWEEP.replace(old, new)


def _space(entry: str) -> str:
    return _replace("  batch_size: {type: choice, values: [16, 32, 64]}", f"  bad: {entry}")


def _random(text: str) -> str:
    return text.replace("sampling_algorithm: {type: bayesian}", "sampling_algorithm: random")


# name -> (sweep file text, the line after "sweep.yaml: ")
BAD: dict[str, tuple[str, str]] = {
    "min >= max": (
        _replace("min_value: -9.2, max_value: -2.3", "min_value: -2.3, max_value: -9.2"),
        "search_space.learning_rate.max_value: must be greater than min_value (-2.3)",
    ),
    "min >= max, function form": (
        _random(_space("uniform(0.99, 0.8)")),
        "search_space.bad.max_value: must be greater than min_value (0.99)",
    ),
    "q <= 0": (
        _space("{type: quniform, min_value: 0, max_value: 1, q: 0}"),
        "search_space.bad.q: must be greater than 0, not 0",
    ),
    "sigma <= 0": (
        _random(_space("normal(0, -1)")),
        "search_space.bad.sigma: must be greater than 0, not -1",
    ),
    "randint upper < 1": (
        _space("randint(0)"),
        "search_space.bad.upper: must be at least 1, not 0 (randint draws from [0, upper))",
    ),
    "empty choice": (
        _space("{type: choice, values: []}"),
        "search_space.bad.values: is empty; list the values to choose from, e.g. [16, 32, 64]",
    ),
    "empty choice, function form": (
        _space("choice()"),
        "search_space.bad.values: required field is missing (choice takes values)",
    ),
    "unknown type": (
        _space("{type: logunifrom, min_value: 1, max_value: 2}"),
        "search_space.bad.type: unknown expression 'logunifrom' (did you mean 'loguniform'?)",
    ),
    "unknown function": (
        _space("unifrom(0.1, 0.2)"),
        "search_space.bad: unknown expression 'unifrom' (did you mean 'uniform'?)",
    ),
    "not an expression": (
        _space("'uniform(0.1'"),
        "search_space.bad: 'uniform(0.1' is not an expression",
    ),
    "code, not literals": (
        _space("\"uniform(__import__('os').getpid(), 2)\""),
        "search_space.bad: \"uniform(__import__('os').getpid(), 2)\": the arguments must be "
        "literals",
    ),
    "too many arguments": (
        _space("uniform(0.1, 0.2, 0.3)"),
        "search_space.bad: 'uniform(0.1, 0.2, 0.3)': uniform takes 2 arguments",
    ),
    "unknown field": (
        _space("{type: uniform, min_value: 1, max_value: 2, maxvalue: 3}"),
        "search_space.bad.maxvalue: unknown field (did you mean 'max_value'?)",
    ),
    "a number that is text": (
        _space("{type: uniform, min_value: low, max_value: 2}"),
        "search_space.bad.min_value: must be a number, not 'low'",
    ),
    "loguniform bounds are exponents": (
        _space("loguniform(1, 1000)"),
        "search_space.bad.max_value: 1000: loguniform's bounds are exponents",
    ),
    "choice listed twice": (
        _space("choice(16, 32, 16)"),
        "search_space.bad.values.2: 16 is listed twice; list each value once",
    ),
    "paired and single values mixed": (
        _space("{type: choice, values: [{optimizer: sgd}, adam]}"),
        "search_space.bad.values: mixes mappings and single values",
    ),
    "a paired argument set twice": (
        _space("{type: choice, values: [{momentum: 0.9}, {momentum: 0.5}]}"),
        "search_space.bad: sets argument 'momentum', which search_space.momentum sets too",
    ),
    "a mapping as an argument's value": (
        _space("{type: choice, values: [{a: {b: 1}}]}"),
        "search_space.bad.values.0.a: must be a string, a number, true/false, null or a list",
    ),
    "grid with a continuous expression": (
        _replace("{type: bayesian}", "grid").replace(
            "{type: uniform, min_value: 0.8, max_value: 0.99}", "choice(0.8, 0.9)"
        ),
        "search_space.learning_rate: grid sampling takes choice only, not loguniform",
    ),
    "bayesian with an unsupported expression": (
        _space("normal(0, 1)"),
        "search_space.bad: bayesian sampling takes choice, randint, uniform, quniform, "
        "loguniform, qloguniform, not normal; use sampling_algorithm: random",
    ),
    "unknown sampling algorithm": (
        _replace("{type: bayesian}", "{type: bayes}"),
        "sampling_algorithm.type: unknown sampling algorithm 'bayes' (did you mean 'bayesian'?)",
    ),
    "sobol on grid": (
        _random(_replace("{type: bayesian}", "{type: grid, rule: sobol}")),
        "sampling_algorithm.rule: is random sampling's (random or sobol), not grid's",
    ),
    "bad rule": (
        _replace("{type: bayesian}", "{type: random, rule: halton}"),
        "sampling_algorithm.rule: must be random or sobol, not 'halton'",
    ),
    "negative seed": (
        _replace("{type: bayesian}", "{type: random, seed: -1}"),
        "sampling_algorithm.seed: must be from 0 to 4294967295, not -1",
    ),
    "missing objective": (
        _replace("objective: {primary_metric: best_val_acc, goal: maximize}\n", ""),
        "objective: required field is missing",
    ),
    "missing primary metric": (
        _replace("primary_metric: best_val_acc, ", ""),
        "objective.primary_metric: required field is missing",
    ),
    "missing goal": (
        _replace(", goal: maximize", ""),
        "objective.goal: required field is missing; give maximize or minimize",
    ),
    "bad goal": (
        _replace("goal: maximize", "goal: max"),
        "objective.goal: must be maximize or minimize, not 'max'",
    ),
    "unknown policy": (
        _replace("type: bandit", "type: bandits"),
        "early_termination.type: unknown policy 'bandits' (did you mean 'bandit'?)",
    ),
    "bandit with both slacks": (
        _replace("slack_factor: 0.1", "slack_factor: 0.1, slack_amount: 0.2"),
        "early_termination: bandit takes exactly one of slack_factor",
    ),
    "bandit with no slack": (
        _replace("slack_factor: 0.1, ", ""),
        "early_termination: bandit takes exactly one of slack_factor",
    ),
    "slack <= 0": (
        _replace("slack_factor: 0.1", "slack_factor: 0"),
        "early_termination.slack_factor: must be greater than 0, not 0",
    ),
    "truncation percentage out of range": (
        _replace(
            "{type: bandit, slack_factor: 0.1,",
            "{type: truncation_selection, truncation_percentage: 100,",
        ),
        "early_termination.truncation_percentage: must be from 1 to 99, not 100",
    ),
    "a field of another policy": (
        _replace("slack_factor: 0.1,", "truncation_percentage: 10, slack_factor: 0.1,"),
        "early_termination.truncation_percentage: unknown field",
    ),
    "evaluation_interval 0": (
        _replace("evaluation_interval: 1", "evaluation_interval: 0"),
        "early_termination.evaluation_interval: must be at least 1, not 0",
    ),
    "negative delay": (
        _replace("delay_evaluation: 2", "delay_evaluation: -1"),
        "early_termination.delay_evaluation: must be at least 0, not -1",
    ),
    "zero trials": (
        _replace("max_total_trials: 20", "max_total_trials: 0"),
        "limits.max_total_trials: must be at least 1, not 0",
    ),
    "zero concurrent trials": (
        _replace("max_concurrent_trials: 2", "max_concurrent_trials: 0"),
        "limits.max_concurrent_trials: must be at least 1, not 0",
    ),
    "negative timeout": (
        _replace("timeout: 7200", "timeout: -5"),
        "limits.timeout: must be greater than 0, not -5",
    ),
    "zero trial timeout": (
        _replace("trial_timeout: 1800", "trial_timeout: 0"),
        "limits.trial_timeout: must be greater than 0, not 0",
    ),
    "HyperDrive's name in limits": (
        _replace("max_total_trials: 20", "max_total_runs: 20"),
        "limits.max_total_runs: unknown field (expkit's name is max_total_trials)",
    ),
    "Azure ML's trial for job": (
        _replace("job: training/job.yaml", "trial: training/job.yaml"),
        "trial: unknown field (expkit's name is job",
    ),
    "unknown top-level field": (
        ISSUE_SWEEP + "register_bset: true\n",
        "register_bset: unknown field (did you mean 'register_best'?)",
    ),
    "register_best not a bool": (
        _replace("register_best: true", "register_best: yes please"),
        "register_best: must be true or false, not 'yes please'",
    ),
    "a job file that is not there": (
        _replace("job: training/job.yaml", "job: training/jobs.yaml"),
        "job: training/jobs.yaml: no such file; `job:` is the path of the trial's job spec, "
        "relative to the sweep file's folder",
    ),
    "a bad field of an inline job": (
        _replace(
            "job: training/job.yaml",
            "job: {experiment: x, entry_script: train.py, source_directory: training, timeout: -1}",
        ),
        "job.timeout: must be more than 0, not -1.0",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_spec_is_one_line_naming_the_file_and_the_field(project, case):
    text, expected = BAD[case]
    path = sweep_file(project, text)
    with pytest.raises(JobSpecError) as error:
        SweepSpec.from_yaml(path)
    message = str(error.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: {expected}"), message


def test_a_bad_job_file_is_named(project):
    (project / "training" / "job.yaml").write_text("experiment: x\nentry_script: missing.py\n")
    with pytest.raises(JobSpecError) as error:
        SweepSpec.from_yaml(sweep_file(project, ISSUE_SWEEP))
    assert str(error.value).startswith(f"{project / 'training' / 'job.yaml'}: entry_script: ")


def test_several_problems_are_one_line_each(project):
    text = _replace("goal: maximize", "goal: max").replace("timeout: 7200", "timeout: -1")
    with pytest.raises(JobSpecError) as error:
        SweepSpec.from_yaml(sweep_file(project, text))
    lines = str(error.value).splitlines()
    assert len(lines) == 2 and all(line.startswith(str(project)) for line in lines)


def test_a_function_form_never_runs_code(project, tmp_path):
    marker = tmp_path / "ran"
    entry = f"\"choice(open('{marker}', 'w'))\""
    with pytest.raises(JobSpecError):
        SweepSpec.from_yaml(sweep_file(project, _space(entry)))
    assert not marker.exists()


@pytest.mark.parametrize(
    "case", ["min >= max", "grid with a continuous expression", "bad goal", "zero trials"]
)
def test_a_bad_spec_exits_2_with_one_line_through_the_command(project, expkit_cli, case):
    text, expected = BAD[case]
    path = sweep_file(project, text)
    result = expkit_cli("sweep", str(path), "--dry-run")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{path}: {expected}" in lines[0]


# -- the samplers ---------------------------------------------------------------------------------
ALL_RANDOM = {
    "lr": "loguniform(-9.2, -2.3)",
    "momentum": "uniform(0.8, 0.99)",
    "batch": "choice(16, 32, 64)",
    "layers": "randint(4)",
    "dropout": "quniform(0.05, 0.5, 0.05)",
    "width": "qloguniform(3, 6, 16)",
    "noise": "normal(0, 1)",
    "scale": "lognormal(0, 0.5)",
    "steps": "qnormal(100, 20, 10)",
    "decay": "qlognormal(-3, 0.5, 0.01)",
    "opt": {
        "type": "choice",
        "values": [{"optimizer": "sgd", "nesterov": True}, {"optimizer": "adam", "beta1": 0.9}],
    },
}


def _multiple(value: float, q: float) -> bool:
    return math.isclose(value / q, round(value / q), abs_tol=1e-9)


def check_bounds(values: dict) -> None:
    assert math.exp(-9.2) <= values["lr"] <= math.exp(-2.3)
    assert 0.8 <= values["momentum"] <= 0.99
    assert values["batch"] in (16, 32, 64)
    assert values["layers"] in range(4) and isinstance(values["layers"], int)
    dropout = values["dropout"]
    assert 0.05 <= dropout <= 0.5 and _multiple(dropout, 0.05)
    assert repr(dropout) == repr(round(dropout, 2))  # 0.15, not 0.15000000000000002
    assert isinstance(values["width"], int) and values["width"] % 16 == 0  # whole-number q
    assert round(math.exp(3) / 16) * 16 <= values["width"] <= round(math.exp(6) / 16) * 16
    assert isinstance(values["noise"], float)
    assert values["scale"] > 0
    assert isinstance(values["steps"], int) and values["steps"] % 10 == 0
    assert _multiple(values["decay"], 0.01)
    assert "opt" not in values  # a paired parameter's name is not an argument
    assert values["optimizer"] in ("sgd", "adam")
    assert ("nesterov" in values) == (values["optimizer"] == "sgd")


@pytest.mark.parametrize("rule", ["random", "sobol"])
def test_random_and_sobol_values_stay_inside_their_bounds(project, rule):
    spec = spec_with(
        project,
        search_space=ALL_RANDOM,
        sampling_algorithm={"type": "random", "seed": 11, "rule": rule},
    )
    trials = space.preview(spec, 64)
    for values in trials:
        check_bounds(values)
    assert len({v["lr"] for v in trials}) == 64  # continuous values differ
    assert {v["optimizer"] for v in trials} == {"sgd", "adam"}
    assert {v["batch"] for v in trials} == {16, 32, 64}


def test_a_seeded_random_sweep_draws_the_same_values_again(project):
    spec = spec_with(
        project, search_space=ALL_RANDOM, sampling_algorithm={"type": "random", "seed": 42}
    )
    assert space.preview(spec, 5) == space.preview(spec, 5)
    other = spec_with(
        project, search_space=ALL_RANDOM, sampling_algorithm={"type": "random", "seed": 43}
    )
    assert space.preview(other, 5) != space.preview(spec, 5)


@pytest.mark.parametrize(
    "sampling",
    [
        {"type": "random", "seed": 3},
        {"type": "random", "seed": 3, "rule": "sobol"},
        {"type": "random"},
        {"type": "grid", "seed": 3},
    ],
)
def test_a_resumed_study_goes_on_as_the_dry_run_said(project, tmp_path, sampling):
    """The sweep's study in a journal file: 3 trials, then a new process's sampler (a resumed
    driver) asks 3 more; the 6 are what `preview` showed, none repeated (with no seed, the
    seed the study keeps)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    search = (
        ALL_RANDOM
        if sampling["type"] == "random"
        else {"batch": "choice(16, 32, 64)", "layers": "choice(1, 2, 3)", "opt": ALL_RANDOM["opt"]}
    )
    spec = spec_with(project, search_space=search, sampling_algorithm=sampling)
    journal = str(tmp_path / "study.journal")

    def study() -> optuna.Study:
        storage = JournalStorage(JournalFileBackend(journal))
        return optuna.create_study(
            storage=storage,
            study_name="s",
            direction="maximize",
            sampler=space.make_sampler(spec),
            load_if_exists=True,
        )

    first = study()
    drawn = []
    for i in range(3):
        trial = first.ask()
        drawn.append(space.suggest(trial, spec))
        if i < 2:
            first.tell(trial, float(i))  # one left running, as a killed driver leaves it
    resumed = study()
    drawn += [space.suggest(resumed.ask(), spec) for _ in range(3)]
    if sampling.get("seed") is not None:
        assert drawn == space.preview(spec, 6)
    assert len({json.dumps(v, sort_keys=True) for v in drawn}) == 6
    recorded = [t.user_attrs["values"] for t in resumed.get_trials()]
    assert recorded == drawn


def test_grid_runs_every_combination_exactly_once(project):
    spec = spec_with(
        project,
        sampling_algorithm="grid",
        limits=None,
        search_space={
            "batch": "choice(16, 32, 64)",
            "act": "choice('relu', 'gelu')",
            "hidden": {"type": "choice", "values": [[64, 64], [128]]},
            "opt": {
                "type": "choice",
                "values": [{"optimizer": "sgd", "lr": 0.1}, {"optimizer": "adam", "lr": 0.001}],
            },
        },
    )
    assert space.grid_size(spec) == spec.limits.max_total_trials == 24
    study = optuna.create_study(sampler=space.make_sampler(spec))
    seen = []
    for _ in range(24):
        trial = study.ask()
        values = space.suggest(trial, spec)
        study.tell(trial, 0.0)
        seen.append(
            (
                values["batch"],
                values["act"],
                tuple(values["hidden"]),
                values["optimizer"],
                values["lr"],
            )
        )
    product = itertools.product(
        (16, 32, 64), ("relu", "gelu"), ((64, 64), (128,)), (("sgd", 0.1), ("adam", 0.001))
    )
    assert sorted(seen, key=repr) == sorted(
        [(b, a, h, o, lr) for b, a, h, (o, lr) in product], key=repr
    )
    assert len(space.preview(spec, 100)) == 24
    assert space.preview(spec, 24) == space.preview(spec, 24)


def test_grid_size_is_none_for_other_samplers(project):
    assert space.grid_size(spec_with(project)) is None


def test_bayesian_sampling_runs_tpe_inside_the_bounds(project):
    spec = spec_with(
        project,
        search_space={
            "lr": "loguniform(-9.2, -2.3)",
            "momentum": "uniform(0.8, 0.99)",
            "dropout": "quniform(0.05, 0.5, 0.05)",
            "layers": "randint(4)",
            "opt": ALL_RANDOM["opt"],
        },
        sampling_algorithm={"type": "bayesian", "seed": 1},
    )
    sampler = space.make_sampler(spec)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for _ in range(16):  # past TPE's 10 random startup trials
        trial = study.ask()
        values = space.suggest(trial, spec)
        assert math.exp(-9.2) <= values["lr"] <= math.exp(-2.3)
        assert 0.8 <= values["momentum"] <= 0.99
        assert 0.05 <= values["dropout"] <= 0.5 and _multiple(values["dropout"], 0.05)
        study.tell(trial, values["momentum"] - values["dropout"])
    assert space.preview(spec, 3) == space.preview(spec, 3)  # seeded startup trials


def test_the_study_records_what_the_trial_got(project):
    spec = spec_with(
        project,
        sampling_algorithm={"type": "random", "seed": 9},
        search_space={"noise": "normal(0, 1)", "batch": "choice(16, 32)", "opt": ALL_RANDOM["opt"]},
    )
    study = optuna.create_study(sampler=space.make_sampler(spec))
    trial = study.ask()
    values = space.suggest(trial, spec)
    frozen = study.trials[0]
    assert frozen.params["noise"] == values["noise"]  # drawn outside Optuna, recorded in it
    assert frozen.params["batch"] == values["batch"]
    assert frozen.params["opt"] in (0, 1)  # a paired choice: its index
    assert frozen.user_attrs["values"] == values


# -- the trial's job -----------------------------------------------------------------------------
def test_a_trials_values_override_dict_args(project):
    spec = spec_with(project, limits={"trial_timeout": 60})
    job = space.trial_job(spec, {"learning_rate": 0.003, "momentum": 0.9, "batch_size": 32})
    assert job.args == {"num_epochs": 2, "learning_rate": 0.003, "batch_size": 32, "momentum": 0.9}
    assert job.command_args({}) == [
        "--num_epochs",
        "2",
        "--learning_rate",
        "0.003",
        "--batch_size",
        "32",
        "--momentum",
        "0.9",
    ]
    assert job.timeout == 60
    assert spec.job.args["learning_rate"] == 0.01  # the sweep's job is unchanged
    dashed = spec.job.replace(args={"--lr": 0.1, "flag": True})
    spec = spec_with(project).__class__(**{**spec.__dict__, "job": dashed})
    job = space.trial_job(spec, {"lr": 1e-05, "flag": False, "opt": "adam", "dims": [1, 2]})
    assert job.command_args({}) == ["--lr", "1e-05", "--opt", "adam", "--dims", "1", "2"]


def test_a_trials_values_override_list_args(project):
    base = spec_with(project)
    job = base.job.replace(args=["data", "--lr", "0.1", "--shape", 3, 4, "--seed=1", "-v"])
    spec = base.__class__(**{**base.__dict__, "job": job})
    got = space.trial_job(spec, {"lr": 0.25, "shape": [5, 6], "seed": 7, "epochs": 3, "v": False})
    assert got.command_args({}) == [
        "data",
        "--lr",
        "0.25",
        "--shape",
        "5",
        "6",
        "--seed=7",
        "-v",
        "--epochs",
        "3",
    ]
    got = space.trial_job(spec, {"-v": False, "negative": -1, "fast": True})
    assert got.command_args({}) == [
        "data",
        "--lr",
        "0.1",
        "--shape",
        "3",
        "4",
        "--seed=1",
        "--negative",
        "-1",
        "--fast",
    ]


def test_trial_timeout_is_the_jobs_timeout_when_shorter(project):
    base = spec_with(project, limits={"trial_timeout": 100})
    for job_timeout, expected in ((None, 100), (50.0, 50.0), (500.0, 100)):
        spec = base.__class__(**{**base.__dict__, "job": base.job.replace(timeout=job_timeout)})
        assert space.trial_job(spec, {}).timeout == expected
    spec = spec_with(project, limits={"max_total_trials": 3})
    assert space.trial_job(spec, {}).timeout is None


def test_floats_reach_the_script_exactly(project):
    spec = spec_with(
        project,
        search_space={"lr": "loguniform(-9.2, -2.3)"},
        sampling_algorithm={"type": "random", "seed": 2},
    )
    for values in space.preview(spec, 5):
        argv = space.trial_job(spec, values).command_args({})
        text = argv[argv.index("--learning_rate") + 1] if "--learning_rate" in argv else None
        assert text is not None and text == repr(spec.job.args["learning_rate"])
        assert float(argv[argv.index("--lr") + 1]) == values["lr"]
    assert re.fullmatch(r"[0-9.e-]+", repr(space.preview(spec, 1)[0]["lr"]))


def test_azure_ml_header_fields_and_python_parameters_are_accepted(project):
    raw = yaml.safe_load(ISSUE_SWEEP)
    raw["$schema"] = "https://azuremlschemas.azureedge.net/latest/sweepJob.schema.json"
    raw["type"] = "sweep"
    spec = SweepSpec.from_dict(raw, source="sweep.yaml", base_dir=project)
    raw = spec.to_dict()
    raw["search_space"] = list(spec.search_space)  # SweepSpec's own shape
    assert SweepSpec.from_dict(raw, source=spec.source) == spec
    raw = yaml.safe_load(ISSUE_SWEEP) | {"type": "command"}
    with pytest.raises(JobSpecError, match=r"sweep\.yaml: type: unknown field"):
        SweepSpec.from_dict(raw, source="sweep.yaml", base_dir=project)


def list_args_spec(project, args):
    base = spec_with(project)
    return base.__class__(**{**base.__dict__, "job": base.job.replace(args=args)})


def test_a_switch_in_list_args_never_drops_the_positional_argument_after_it(project):
    spec = list_args_spec(project, ["--amp", "data.csv", "--lr", 0.01])
    argv = {v: space.trial_job(spec, {"amp": v}).command_args({}) for v in (True, False, None)}
    assert argv[True] == ["--amp", "data.csv", "--lr", "0.01"]
    assert argv[False] == argv[None] == ["data.csv", "--lr", "0.01"]
    spec = list_args_spec(project, ["data.csv", "--lr", 0.01])  # not there: added, or not
    assert space.trial_job(spec, {"amp": True}).command_args({})[-1] == "--amp"
    assert space.trial_job(spec, {"amp": False}).command_args({}) == ["data.csv", "--lr", "0.01"]
    # a boolean word after the flag is its value: replaced by one token
    spec = list_args_spec(project, ["--amp", "false", "data.csv"])
    assert space.trial_job(spec, {"amp": True}).command_args({}) == ["--amp", "True", "data.csv"]
    assert space.trial_job(spec, {"amp": None}).command_args({}) == ["data.csv"]
    spec = list_args_spec(project, ["--amp=yes", "data.csv"])
    assert space.trial_job(spec, {"amp": False}).command_args({}) == ["--amp=False", "data.csv"]


def test_a_value_in_list_args_replaces_exactly_one_token(project):
    spec = list_args_spec(project, ["--mode", "ok", "positional", "--lr", "0.1", "tail"])
    got = space.trial_job(spec, {"mode": "crash", "lr": 0.5}).command_args({})
    assert got == ["--mode", "crash", "positional", "--lr", "0.5", "tail"]
    spec = list_args_spec(project, ["--mode", "--lr", "0.1"])  # no value yet: inserted
    got = space.trial_job(spec, {"mode": "crash"}).command_args({})
    assert got == ["--mode", "crash", "--lr", "0.1"]


def test_a_paired_choice_over_list_args_keeps_the_positional_argument(project, tmp_path):
    (project / "training" / "list.yaml").write_text(
        'experiment: sweepy\nentry_script: train.py\nargs: ["--mode", "ok", "positional"]\n'
    )
    path = sweep_file(
        project,
        "job: training/list.yaml\n"
        "search_space:\n  combo: {type: choice, values: [{mode: crash}, {mode: ok}]}\n"
        "objective: {primary_metric: acc, goal: maximize}\n",
    )
    spec = SweepSpec.from_yaml(path)
    for values in space.preview(spec, 2):
        argv = space.trial_job(spec, values).command_args({})
        assert argv == ["--mode", values["mode"], "positional"]


def test_a_list_value_over_several_list_tokens_is_refused_at_load(project):
    (project / "training" / "list.yaml").write_text(
        'experiment: sweepy\nentry_script: train.py\nargs: ["--shape", 3, 4, "data.csv"]\n'
    )
    path = sweep_file(
        project,
        "job: training/list.yaml\n"
        "search_space:\n  shape: {type: choice, values: [[1, 2], [5, 6]]}\n"
        "objective: {primary_metric: acc, goal: maximize}\n",
    )
    with pytest.raises(JobSpecError) as error:
        SweepSpec.from_yaml(path)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert "sweep.yaml: search_space.shape: job.args has several tokens after --shape" in message


def test_register_best_needs_a_model_in_the_job(project):
    (project / "training" / "job.yaml").write_text(
        "experiment: sweepy\nentry_script: train.py\nargs: {learning_rate: 0.01}\n"
    )
    with pytest.raises(JobSpecError) as error:
        SweepSpec.from_yaml(sweep_file(project, ISSUE_SWEEP))
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{project / 'sweep.yaml'}: register_best: ")
    assert "job.model" in message
    spec = SweepSpec.from_yaml(sweep_file(project, ISSUE_SWEEP.replace("true", "false")))
    assert spec.register_best is False


# -- the wrong file for the command (e2e through `python -m expkit`) -------------------------
def test_the_wrong_kind_of_file_is_one_line_naming_the_right_command(project, expkit_cli):
    sweep = sweep_file(project, ISSUE_SWEEP)
    job = project / "training" / "job.yaml"

    result = expkit_cli("run", str(sweep))
    assert result.returncode == 2
    assert error_line(result) == (
        f"expkit: error: {sweep}: is a sweep spec (it has search_space); "
        f"run it with `expkit sweep {sweep}`"
    )
    result = expkit_cli("sweep", str(job), "--dry-run")
    assert result.returncode == 2
    assert error_line(result) == (
        f"expkit: error: {job}: is a job spec, not a sweep spec; run it with `expkit run {job}`, "
        f"or write a sweep spec with job: {job} (see README: Sweeps)"
    )
    result = expkit_cli("sweep", str(project))
    assert result.returncode == 2
    assert (
        error_line(result) == f"expkit: error: {project}: is a folder; a sweep spec is a YAML file"
    )


def test_dry_run_catches_register_best_without_a_model(project, expkit_cli):
    (project / "training" / "job.yaml").write_text(
        "experiment: sweepy\nentry_script: train.py\nargs: {learning_rate: 0.01}\n"
    )
    sweep = sweep_file(project, ISSUE_SWEEP)
    result = expkit_cli("sweep", str(sweep), "--dry-run")
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith(f"expkit: error: {sweep}: register_best: ") and "job.model" in line


def test_a_function_form_split_by_a_flow_mapping_is_one_line_saying_to_quote_it(project):
    text = ISSUE_SWEEP.split("search_space:")[0] + (
        "search_space: {lr: uniform(0, 1), bs: choice(16, 32, 64), m: 'uniform(0.8, 0.9)'}\n"
        + "objective: {primary_metric: acc, goal: maximize}\n"
    )
    with pytest.raises(JobSpecError) as error:
        SweepSpec.from_yaml(sweep_file(project, text))
    source = str(project / "sweep.yaml")
    assert str(error.value).splitlines() == [
        f"{source}: search_space.lr: `uniform(0, 1)` in a flow mapping {{...}} is split at its "
        "comma by YAML; quote it (lr: 'uniform(0, 1)') or use block style",
        f"{source}: search_space.bs: `choice(16, 32, 64)` in a flow mapping {{...}} is split "
        "at its comma by YAML; quote it (bs: 'choice(16, 32, 64)') or use block style",
    ]


def test_sweep_help_points_to_the_spec_format(expkit_cli):
    from expkit.sweeps.spec import TOP_LEVEL

    result = expkit_cli("sweep", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for name in TOP_LEVEL:
        assert f"{name} (" in text
    assert "See README: Sweeps." in text
