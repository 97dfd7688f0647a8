"""The job spec: what `expkit run` accepts, how it says no, `--set` overrides, the Python model.

A rejected job spec must fail before anything happens: exit code 2, one line on stderr naming
the file and the field, no traceback, and no run in the workspace.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import error_line
from expkit import JobSpec, UserError
from expkit.job import (
    ComputeSpec,
    DistributedSpec,
    EnvironmentSpec,
    ModelSpec,
    Resources,
    SinkSpec,
)

SCRIPT = "print('training')\n"

# Writes the script's command-line arguments, exactly as received, to outputs/argv.json.
ARGV_SCRIPT = """
import json, os, sys
os.makedirs("outputs", exist_ok=True)
with open("outputs/argv.json", "w") as f:
    json.dump(sys.argv[1:], f)
"""


def rejected(result: subprocess.CompletedProcess) -> str:
    """The one-line error of a command that refused its input (exit code 2)."""
    assert result.returncode == 2, result.stdout + result.stderr
    return error_line(result).removeprefix("expkit: error: ")


def no_runs(expkit_cli) -> bool:
    listing = expkit_cli("runs", "list")
    assert listing.returncode == 0, listing.stderr
    return "no runs yet" in listing.stdout


def argv_of(workspace, result: subprocess.CompletedProcess) -> list[str]:
    """What the ARGV_SCRIPT of the latest run received."""
    assert result.returncode == 0, result.stdout + result.stderr
    [record] = workspace.history.runs.recent()
    return json.loads((workspace.run_dir(record.id) / "outputs" / "argv.json").read_text())


def run_with_birds(expkit_cli, workspace, write_job, args) -> tuple[list[str], str]:
    """`expkit run` of ARGV_SCRIPT with `args` and data `birds` (the folder `images`):
    what the script received, and the path the data had in the run."""
    job = write_job(
        {"args": args, "data": {"birds": {"source": "images"}}},
        script=ARGV_SCRIPT,
    )
    (job.parent / "images").mkdir()

    result = expkit_cli("run", str(job))

    [record] = workspace.history.runs.recent()
    data_path = str(workspace.run_dir(record.id) / "work" / "data" / "birds")
    return argv_of(workspace, result), data_path


def latest_job(workspace) -> dict:
    """The job spec as the latest run recorded it."""
    return workspace.history.runs.recent()[0].job


# -- a job file the command refuses --------------------------------------------------------------
# Refused while reading the file: the error names the file.
BAD_SPECS = {
    "unknown field": (
        {"resourcez": {"nodes": 1}},
        ["resourcez: unknown field (did you mean 'resources'?)"],
    ),
    "unknown nested field": (
        {"resources": {"node": 2}},
        ["resources.node: unknown field (did you mean 'nodes'?)"],
    ),
    "unknown field in a data entry": (
        {"data": {"birds": {"sorce": "images"}}},
        ["data.birds.sorce: unknown field (did you mean 'source'?)"],
    ),
    "wrong type": (
        {"resources": {"nodes": "two"}},
        ["resources.nodes: ", "whole number", "'two'"],
    ),
    "wrong type of a section": ({"args": 5}, ["args: ", "mapping or a list"]),
    "zero nodes": ({"resources": {"nodes": 0}}, ["resources.nodes: ", "at least 1"]),
    "negative processes": (
        {"resources": {"processes_per_node": -1}},
        ["resources.processes_per_node: ", "at least 1"],
    ),
    "negative gpus": (
        {"resources": {"gpus_per_node": -2}},
        ["resources.gpus_per_node: ", "at least 0"],
    ),
    "negative timeout": ({"timeout": -5}, ["timeout: ", "more than 0"]),
    "bad experiment name": ({"experiment": "my birds"}, ["experiment: 'my birds': ", "letters"]),
    "missing entry script": ({"entry_script": None}, ["entry_script: required field is missing"]),
    "entry script is not a file": (
        {"entry_script": "trian.py"},
        ["entry_script: 'trian.py' is not a file in "],
    ),
    "missing source directory": (
        {"source_directory": "no-such-folder"},
        ["source_directory: folder ", "no-such-folder does not exist"],
    ),
    "model outside outputs": (
        {"model": {"name": "birds", "path": "outputs/../secrets"}},
        ["model.path: must be inside outputs/"],
    ),
    "model at an absolute path": (
        {"model": {"name": "birds", "path": "/etc"}},
        ["model.path: must be inside outputs/"],
    ),
    "data with neither source nor prepare": (
        {"data": {"birds": {"mode": "copy"}}},
        ["data.birds: give `source` (a path) or `prepare`"],
    ),
    "data source that does not exist": (
        {"data": {"birds": {"source": "no-such-images"}}},
        ["data.birds.source: ", "no-such-images does not exist"],
    ),
    "args naming no data entry": (
        {"args": {"data-dir": "${data.birds}"}},
        ["args: ${data.birds} names no entry of `data`"],
    ),
}

# Refused when expkit looks up the plugins the job names and asks them to check it.
BAD_CHOICES = {
    "unknown compute target": (
        {"compute": "gpu-cluster"},
        ["compute: no compute target named 'gpu-cluster' (available: ", "local"],
    ),
    "unknown environment builder": (
        {"environment": "conda"},
        ["environment: no environment builder named 'conda' (available: ", "inherit", "pip"],
    ),
    "unknown environment builder, package form": (
        {"environment": {"conda": ["pillow"]}},
        ["environment: no environment builder named 'conda'", "pip"],
    ),
    "unknown distributed backend": (
        {"distributed": "mpi"},
        ["distributed: no distributed backend named 'mpi' (available: ", "none"],
    ),
    "distributed none with two processes": (
        {
            "compute": {"target": "local", "options": {"slots": 4}},
            "resources": {"processes_per_node": 2},
        },
        ["distributed: none runs one process, but resources ask for 2"],
    ),
    "local target on two nodes": (
        {"resources": {"nodes": 2}},
        ["resources.nodes: the local target runs on this machine only"],
    ),
    "local target with an unknown option": (
        {"compute": {"target": "local", "options": {"queue": "fast"}}},
        ["compute.options.queue: unknown option of compute target 'local'", "slots, gpus"],
    ),
}


def write_spec(write_job, changes: dict) -> Path:
    """A job file for SCRIPT with `changes` applied (a None value removes the field)."""
    job = write_job({}, script=SCRIPT)
    spec = {**yaml.safe_load(job.read_text()), **changes}
    job.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}))
    return job


def assert_refused_before_any_run(expkit_cli, write_job, changes: dict, expected) -> None:
    """`expkit run` of `write_spec(changes)` is refused with one line: the file, `expected[0]`,
    then every other fragment of `expected`; and no run is made."""
    job = write_spec(write_job, changes)

    error = rejected(expkit_cli("run", str(job)))

    assert error.startswith(f"{job}: {expected[0]}")
    for fragment in expected[1:]:
        assert fragment in error
    assert no_runs(expkit_cli)


@pytest.mark.parametrize(("changes", "expected"), BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_a_bad_job_spec_is_refused_before_any_run(expkit_cli, write_job, changes, expected):
    assert_refused_before_any_run(expkit_cli, write_job, changes, expected)


@pytest.mark.parametrize(("changes", "expected"), BAD_CHOICES.values(), ids=BAD_CHOICES.keys())
def test_a_job_no_plugin_can_serve_is_refused_before_any_run(
    expkit_cli, write_job, changes, expected
):
    assert_refused_before_any_run(expkit_cli, write_job, changes, expected)


def test_more_gpus_than_the_machine_has_is_refused(expkit_cli, write_job):
    job = write_job({"resources": {"gpus_per_node": 1}}, script=SCRIPT)

    result = expkit_cli("run", str(job), env={"CUDA_VISIBLE_DEVICES": ""})

    assert rejected(result) == (
        f"{job}: resources.gpus_per_node: the job asks for 1 GPUs and this machine has 0"
    )
    assert no_runs(expkit_cli)


def test_an_unknown_field_lists_the_allowed_ones(expkit_cli, write_job):
    job = write_job({"resources": {"gpus": 1}}, script=SCRIPT)

    error = rejected(expkit_cli("run", str(job)))

    assert error.endswith("allowed: nodes, processes_per_node, gpus_per_node")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "experiment: test\nentry_script: train.py\nargs: [1, 2\n",
            "not valid YAML",
        ),
        ("- train.py\n- --epochs\n", "a job spec is a YAML mapping"),
        ("", "a job spec is a YAML mapping"),
    ],
    ids=["invalid YAML", "a list", "empty"],
)
def test_a_file_that_is_not_a_job_spec_is_refused(expkit_cli, tmp_path, text, expected):
    job = tmp_path / "job.yaml"
    job.write_text(text)

    error = rejected(expkit_cli("run", str(job)))

    assert error.startswith(f"{job}: ")
    assert expected in error
    assert no_runs(expkit_cli)


def test_invalid_yaml_names_the_line(expkit_cli, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("experiment: test\nentry_script: train.py\nargs:\n  lr: [0.1\n  epochs: 2\n")

    error = rejected(expkit_cli("run", str(job)))

    assert error.startswith(f"{job}: line ")
    line = int(error.split("line ")[1].split(":")[0])
    assert 4 <= line <= 5


def test_a_job_file_that_does_not_exist_is_refused(expkit_cli, tmp_path):
    missing = tmp_path / "nowhere" / "job.yaml"

    assert rejected(expkit_cli("run", str(missing))) == f"{missing}: no such file"
    assert no_runs(expkit_cli)


# -- --set overrides -----------------------------------------------------------------------------
def test_set_changes_an_argument_and_matches_an_existing_flag(
    expkit_cli, expkit_workspace, write_job
):
    job = write_job({"args": {"--num_epochs": 30, "lr": 0.01}}, script=ARGV_SCRIPT)

    result = expkit_cli("run", str(job), "--set", "args.num_epochs=2")

    assert argv_of(expkit_workspace, result) == ["--num_epochs", "2", "--lr", "0.01"]


def test_set_values_are_read_as_yaml(expkit_cli, expkit_workspace, write_job):
    job = write_job({"args": {"lr": 0.01}}, script=ARGV_SCRIPT)

    result = expkit_cli(
        "run",
        str(job),
        *("--set", "args.num_epochs=2"),
        *("--set", "args.lr=0.001"),
        *("--set", "args.augment=true"),
        *("--set", "args.name=birds v2"),
        *("--set", "args.layers=[64, 32]"),
        *("--set", "tags.note='2'"),
    )

    assert argv_of(expkit_workspace, result) == [
        "--lr", "0.001", "--num_epochs", "2", "--augment", "--name", "birds v2",
        "--layers", "64", "32",
    ]  # fmt: skip
    recorded = latest_job(expkit_workspace)
    assert recorded["args"]["num_epochs"] == 2
    assert recorded["args"]["lr"] == 0.001
    assert recorded["tags"] == {"note": "2"}


def test_set_replaces_the_compute_target(expkit_cli, expkit_workspace, write_job):
    job = write_job({"compute": {"target": "gpu-cluster"}}, script=SCRIPT)

    result = expkit_cli("run", str(job), "--set", "compute=local")

    assert result.returncode == 0, result.stdout + result.stderr
    assert latest_job(expkit_workspace)["compute"]["target"] == "local"


def test_set_fixes_a_resource_request(expkit_cli, expkit_workspace, write_job):
    job = write_job({"resources": {"processes_per_node": 2}}, script=SCRIPT)

    refused = expkit_cli("run", str(job))
    result = expkit_cli("run", str(job), "--set", "resources.processes_per_node=1")

    assert refused.returncode == 2
    assert result.returncode == 0, result.stdout + result.stderr
    assert latest_job(expkit_workspace)["resources"]["processes_per_node"] == 1


def test_set_creates_nested_fields(expkit_cli, expkit_workspace, write_job):
    job = write_job({}, script=SCRIPT)

    result = expkit_cli("run", str(job), "--set", "compute.options.slots=3")

    assert result.returncode == 0, result.stdout + result.stderr
    assert latest_job(expkit_workspace)["compute"] == {"target": "local", "options": {"slots": 3}}


def test_set_reaches_into_a_short_form(expkit_cli, expkit_workspace, write_job):
    job = write_job({"compute": "local"}, script=SCRIPT)

    result = expkit_cli("run", str(job), "--set", "compute.options.slots=3")

    assert result.returncode == 0, result.stdout + result.stderr
    assert latest_job(expkit_workspace)["compute"] == {"target": "local", "options": {"slots": 3}}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("novalue", "--set: novalue: expected key=value"),
        ("=2", "--set: =2: expected key=value"),
        ("entry_script.name=x", "--set: entry_script: is not a mapping"),
    ],
)
def test_a_malformed_override_is_refused(expkit_cli, write_job, override, expected):
    job = write_job({}, script=SCRIPT)

    error = rejected(expkit_cli("run", str(job), "--set", override))

    assert error.lower().startswith(expected)
    assert no_runs(expkit_cli)


def test_an_override_creating_an_unknown_field_is_refused_like_in_the_file(expkit_cli, write_job):
    job = write_job({}, script=SCRIPT)

    error = rejected(expkit_cli("run", str(job), "--set", "resources.node=2"))

    assert error.startswith(  # the flag is named, as the value came from it
        f"{job} (--set resources.node=2): resources.node: unknown field (did you mean 'nodes'?)"
    )
    assert no_runs(expkit_cli)


# -- arguments reaching the script ---------------------------------------------------------------
def test_args_reach_the_script_exactly(expkit_cli, expkit_workspace, write_job):
    argv, data_path = run_with_birds(
        expkit_cli,
        expkit_workspace,
        write_job,
        {
            "data-folder": "${data.birds}",
            "epochs": 3,
            "lr": 0.5,
            "name": "two words",
            "--already-dashed": "x",
            "-v": True,
            "augment": True,
            "shuffle": False,
            "resume": None,
            "sizes": [224, 112],
            "quote": 'it\'s "quoted"',
        },
    )

    assert argv == [
        "--data-folder", data_path, "--epochs", "3", "--lr", "0.5", "--name", "two words",
        "--already-dashed", "x", "-v", "--augment", "--sizes", "224", "112",
        "--quote", "it's \"quoted\"",
    ]  # fmt: skip


def test_list_form_args_reach_the_script_as_written(expkit_cli, expkit_workspace, write_job):
    argv, data_path = run_with_birds(
        expkit_cli,
        expkit_workspace,
        write_job,
        ["positional", "--in", "${data.birds}/train", "--n", 5, "--flag"],
    )

    assert argv == [
        "positional", "--in", f"{data_path}/train", "--n", "5", "--flag",
    ]  # fmt: skip


# -- the same model in Python --------------------------------------------------------------------
@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A source folder holding train.py."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text(SCRIPT)
    (folder / "images").mkdir()
    return folder


def test_jobspec_defaults():
    job = JobSpec(experiment="birds", entry_script="train.py")

    assert job.source_directory == "."
    assert job.args == {}
    assert job.environment == EnvironmentSpec(builder="inherit", packages=[])
    assert job.compute == ComputeSpec(target="local")
    assert (job.resources.nodes, job.resources.processes_per_node) == (1, 1)
    assert job.resources.gpus_per_node == 0
    assert job.distributed == DistributedSpec(backend="none")
    assert job.model is None
    assert job.timeout is None


def test_jobspec_built_in_python_equals_the_same_spec_from_a_dict():
    job = JobSpec(
        experiment="birds",
        entry_script="train.py",
        args={"num_epochs": 2},
        environment=EnvironmentSpec(builder="pip", packages=["pillow"]),
        resources=Resources(nodes=2, processes_per_node=4),
        model=ModelSpec(name="pt-birds"),
    )

    assert job.resources.processes == 8
    assert job == JobSpec.from_dict(job.to_dict())
    assert job == JobSpec.from_dict(
        {
            "experiment": "birds",
            "entry_script": "train.py",
            "args": {"num_epochs": 2},
            "environment": {"pip": ["pillow"]},
            "resources": {"nodes": 2, "processes_per_node": 4},
            "model": {"name": "pt-birds"},
        }
    )


def test_short_forms_mean_their_long_forms():
    base = {"experiment": "birds", "entry_script": "train.py"}

    short = JobSpec.from_dict(
        {
            **base,
            "compute": "local",
            "environment": {"pip": ["pillow", "scikit-learn>=1.3"]},
            "metrics": ["mlflow"],
            "distributed": "none",
        }
    )
    long = JobSpec.from_dict(
        {
            **base,
            "compute": {"target": "local"},
            "environment": {"builder": "pip", "packages": ["pillow", "scikit-learn>=1.3"]},
            "metrics": [{"name": "mlflow"}],
            "distributed": {"backend": "none"},
        }
    )

    assert short == long
    assert short.compute == ComputeSpec(target="local", options={})
    assert short.environment == EnvironmentSpec(
        builder="pip", packages=["pillow", "scikit-learn>=1.3"]
    )
    assert short.metrics == [SinkSpec(name="mlflow", required=False)]
    assert short.distributed == DistributedSpec(backend="none")
    assert JobSpec.from_dict({**base, "environment": "pip"}).environment.builder == "pip"


def test_from_dict_resolves_paths_against_the_base_folder(project):
    job = JobSpec.from_dict(
        {
            "experiment": "birds",
            "source_directory": "project",
            "entry_script": "train.py",
            "data": {"birds": {"source": "project/images"}},
        },
        base_dir=project.parent,
    )

    assert job.source_directory == str(project.resolve())
    assert job.data["birds"].source == str((project / "images").resolve())
    assert job.data["birds"].mode == "link"


def test_from_dict_errors_name_the_source_and_the_field(project):
    with pytest.raises(UserError) as error:
        JobSpec.from_dict(
            {"experiment": "birds", "entry_script": "train.py", "resources": {"nodez": 2}},
            source="birds.yaml",
            base_dir=project,
        )

    assert str(error.value).startswith(
        "birds.yaml: resources.nodez: unknown field (did you mean 'nodes'?)"
    )


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"entry_script": "train.py"}, "experiment: required field is missing"),
        ({"experiment": "has space", "entry_script": "train.py"}, "experiment: "),
        (
            {"experiment": "b", "entry_script": "train.py", "model": {"path": "outputs/"}},
            "model.name",
        ),
        ({"experiment": "b", "entry_script": "train.py", "data": {"a b": {"source": "."}}}, "data"),
        ({"experiment": "b", "entry_script": "x.py", "data": {"d": {"prepare": "make"}}}, "{dest}"),
    ],
    ids=["no experiment", "bad experiment name", "model without name", "bad data name", "prepare"],
)
def test_from_dict_rejects_invalid_specs(project, raw, fragment):
    with pytest.raises(UserError, match=r"^job\.yaml: ") as error:
        JobSpec.from_dict(raw, source="job.yaml", base_dir=project)

    assert fragment in str(error.value)


def test_command_args_render_flags_booleans_lists_and_data():
    job = JobSpec(
        experiment="birds",
        entry_script="train.py",
        args={
            "data": "${data.birds}",
            "num_epochs": 30,
            "--lr": 0.001,
            "-q": True,
            "pretrained": True,
            "freeze": False,
            "checkpoint": None,
            "classes": ["crow", "robin"],
            "pair": ["${data.birds}", "${data.extra}"],
        },
    )

    argv = job.command_args({"birds": "/data/birds", "extra": "/data/extra"})

    assert argv == [
        "--data", "/data/birds", "--num_epochs", "30", "--lr", "0.001", "-q", "--pretrained",
        "--classes", "crow", "robin", "--pair", "/data/birds", "/data/extra",
    ]  # fmt: skip


def test_command_args_in_list_form_are_kept_in_order():
    job = JobSpec(
        experiment="birds",
        entry_script="train.py",
        args=["--data=${data.birds}", "fit", 3, "${data.birds}"],
    )

    assert job.command_args({"birds": "/d"}) == ["--data=/d", "fit", "3", "/d"]
    assert job.referenced_data() == ["birds", "birds"]


def test_to_yaml_round_trips(project):
    job = JobSpec.from_dict(
        {
            "experiment": "birds",
            "source_directory": str(project),
            "entry_script": "train.py",
            "args": {"--num_epochs": 2, "lr": 0.01, "augment": True},
            "environment": {"pip": ["pillow"]},
            "compute": {"target": "local", "options": {"slots": 2}},
            "resources": {"processes_per_node": 1, "gpus_per_node": 0},
            "data": {"birds": {"source": str(project / "images"), "mode": "copy"}},
            "metrics": ["mlflow", {"name": "tensorboard", "required": True}],
            "model": {"name": "pt-birds", "path": "outputs/model.pt", "tags": {"arch": "resnet"}},
            "timeout": 600,
            "tags": {"team": "vision"},
        }
    )

    text = job.to_yaml()
    again = JobSpec.from_dict(yaml.safe_load(text), base_dir=project)

    assert again == job
    assert again.to_yaml() == text
    assert yaml.safe_load(text)["environment"] == {
        "builder": "pip",
        "packages": ["pillow"],
        "options": {},
    }


def test_retry_on_is_the_word_not_yaml_1_1s_boolean(project):
    job_file = project.parent / "job.yaml"
    job_file.write_text(
        "experiment: birds\nsource_directory: project\nentry_script: train.py\n"
        "retry:\n  max_attempts: 3\n  on: [preempted, exit_codes: [75]]\n"
        "args: {on: yes}\n"
    )

    job = JobSpec.from_yaml(job_file)

    assert job.retry.on == ["preempted", {"exit_codes": [75]}]
    assert job.args == {"on": True}  # a key stays the word; a value is still YAML's boolean
    assert JobSpec.from_dict(yaml.safe_load(job.to_yaml()), base_dir=project) == job


def test_a_job_read_by_a_yaml_1_1_reader_keeps_its_retry_on(project):
    """PyYAML's safe_load reads `on:` as the key True: a job spec built that way in Python
    (JobSpec.from_dict) or dumped back from it still means `retry.on`."""
    raw = yaml.safe_load("experiment: birds\nentry_script: train.py\nretry: {on: [time_limit]}\n")
    assert True in raw["retry"]  # what PyYAML made of it

    job = JobSpec.from_dict(raw, base_dir=project)
    assert job.retry.on == ["time_limit"]
    (project.parent / "dumped.yaml").write_text(
        yaml.safe_dump({**raw, "source_directory": "project"})
    )
    assert JobSpec.from_yaml(project.parent / "dumped.yaml").retry.on == ["time_limit"]


def test_from_yaml_applies_overrides(project):
    job_file = project.parent / "job.yaml"
    job_file.write_text(
        "experiment: birds\nsource_directory: project\nentry_script: train.py\n"
        "args: {--num_epochs: 30}\ncompute: local\n"
    )

    job = JobSpec.from_yaml(
        job_file, ["args.num_epochs=2", "compute.options.slots=4", "resources.nodes=1"]
    )

    assert job.args == {"--num_epochs": 2}
    assert job.compute == ComputeSpec(target="local", options={"slots": 4})
    assert job.resources.nodes == 1
