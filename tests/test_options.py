"""Declared options: every capability says which options it takes (`takes`), and the core
checks them for every kind in one pass before a run exists, as it checks the job spec: the
file, the field path, what the value must be, the closest name for a misspelt one. Plugins
get their options checked, with the declared defaults filled in."""

from __future__ import annotations

import pytest
import yaml

import expkit
from conftest import error_line
from expkit import lifecycle
from expkit import options as declared
from expkit.capabilities import (
    KINDS,
    MetricSink,
    MetricWriter,
    ModelRegistry,
    Option,
    declare_options,
)
from expkit.errors import UserError
from expkit.job import JobSpec, RegistrySpec
from expkit.plugins import get_plugins

MODEL = {"name": "net", "load": "model.pt", "input": {"shape": [1, 4]}}
# For each kind, a job whose options for a built-in plugin of that kind are wrong, and the
# error that names the field: (job spec changes, the error after "<job file>: ").
BAD = {
    "compute target": (
        {"compute": {"target": "local", "options": {"slot": 2}}},
        "compute.options.slot: unknown option of compute target 'local' (did you mean "
        "'slots'?); it takes slots, gpus",
    ),
    "distributed backend": (
        {"distributed": {"backend": "torchrun", "options": {"node_rank": -1}}},
        "distributed.options.node_rank: must be a whole number from 0 to resources.nodes - 1, "
        "not -1",
    ),
    "environment builder": (
        {"environment": {"builder": "pip", "options": {"index-url": "https://x"}}},
        "environment.options.index-url: unknown option of environment builder 'pip' (did you "
        "mean 'index_url'?); it takes index_url",
    ),
    "metric sink": (
        {"metrics": [{"name": "mlflow", "options": {"trackin_uri": "x"}}]},
        "metrics.0.options.trackin_uri: unknown option of metric sink 'mlflow' (did you mean "
        "'tracking_uri'?); it takes tracking_uri, artifact_location",
    ),
    "second metric sink": (
        {"metrics": ["mlflow", {"name": "tensorboard", "options": {"logdir": "tb"}}]},
        "metrics.1.options.logdir: unknown option of metric sink 'tensorboard'; it takes no "
        "options",
    ),
    "model registry": (
        {
            "model": {
                "name": "net",
                "registries": [{"name": "mlflow", "options": {"tracking_uri": 7}}],
            }
        },
        "model.registries.0.options.tracking_uri: must be a string, not 7",
    ),
    "exporter": (
        {"model": MODEL, "exports": [{"format": "onnx", "options": {"opset": 3}}]},
        "exports.0.options.opset: must be an ONNX opset number from 7 to 99, e.g. 18, not 3",
    ),
}


def loaded(kind: str, name: str) -> bool:
    return name in get_plugins().all(kind)


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize(("changes", "expected"), BAD.values(), ids=BAD.keys())
def test_a_bad_option_of_any_kind_is_one_line_before_any_run(
    expkit_cli, write_job, changes, expected, dry_run
):
    if "exports" in changes and not loaded("exporters", "onnx"):
        pytest.skip("the onnx exporter is not installed here")
    job = write_job(changes, script="print('never runs')\n")

    result = expkit_cli("run", str(job), *(["--dry-run"] if dry_run else []))

    assert result.returncode == 2, result.stdout + result.stderr
    assert error_line(result) == f"expkit: error: {job}: {expected}"
    listing = expkit_cli("runs", "list")
    assert "no runs yet" in listing.stdout, listing.stdout


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_every_bad_option_of_every_plugin_is_its_own_line(expkit_cli, write_job, dry_run):
    changes = {
        "compute": {"target": "local", "options": {"slots": 0, "gpus": -1}},
        "metrics": [{"name": "mlflow", "options": {"trackin_uri": "x"}}],
    }
    job = write_job(changes, script="print('never runs')\n")

    result = expkit_cli("run", str(job), *(["--dry-run"] if dry_run else []))

    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"expkit: error: {job}: compute.options.slots: must be a whole number from 1 to 4096, "
        "not 0",
        f"{job}: compute.options.gpus: must be a whole number from 0 to 256, not -1",
        f"{job}: metrics.0.options.trackin_uri: unknown option of metric sink 'mlflow' (did "
        "you mean 'tracking_uri'?); it takes tracking_uri, artifact_location",
    ]
    assert "no runs yet" in expkit_cli("runs", "list").stdout


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_bad_value_given_with_set_names_the_flag(expkit_cli, write_job, dry_run):
    job = write_job({}, script="print('never runs')\n")
    flags = ["--set", "timeout=abc", "--set", "compute.options.slots=0"]

    core = expkit_cli("run", str(job), flags[0], flags[1], *(["--dry-run"] if dry_run else []))
    option = expkit_cli("run", str(job), *flags[2:], *(["--dry-run"] if dry_run else []))

    assert core.returncode == option.returncode == 2
    assert core.stderr.splitlines() == [
        f"expkit: error: {job} (--set timeout=abc): timeout: must be a number, not 'abc'"
    ]
    assert option.stderr.splitlines() == [
        f"expkit: error: {job} (--set compute.options.slots=0): compute.options.slots: must be "
        "a whole number from 1 to 4096, not 0"
    ]
    assert "no runs yet" in expkit_cli("runs", "list").stdout


def test_a_declared_default_the_option_refuses_is_an_error_at_import():
    with pytest.raises(ValueError, match="option n: the declared default must be a whole"):
        declare_options(n=Option(int, minimum=1, default=0, help="at least one"))


def test_horovod_options_are_checked_by_the_core(expkit_cli, write_job):
    if not loaded("distributed_backends", "horovod"):
        pytest.skip("horovod is not installed here")
    spec = {"distributed": {"backend": "horovod", "options": {"args": "--verbose"}}}
    result = expkit_cli("run", str(write_job(spec, script="")))
    assert result.returncode == 2
    assert error_line(result).endswith(
        "distributed.options.args: must be a list of horovodrun flags, not '--verbose'"
    )


# -- what plugins get --------------------------------------------------------------------------
class ProbeWriter(MetricWriter):
    def send(self, metrics):
        pass


class ProbeSink(MetricSink):
    """Keeps the options it was opened with."""

    name = "probe"
    takes = declare_options(
        every=Option(int, minimum=1, default=5, help="send every N values"),
        tags=Option(list, default=[], help="tags to add"),
        label=Option(str, help="a label (default: none)"),
    )

    def __init__(self) -> None:
        self.opened: list[dict] = []

    def open(self, run, options):
        self.opened.append(options)
        return ProbeWriter()


class ProbeRegistry(ModelRegistry):
    """Keeps the options of each registration."""

    name = "probe-registry"
    takes = declare_options(
        stage=Option(str, choices=("dev", "prod"), default="dev", help="the model's stage"),
        folder=Option(str, help="where it goes"),
    )

    def __init__(self) -> None:
        self.registered: list[dict] = []

    def register(self, model, run, options):
        self.registered.append(options)
        return f"{model.name} {options['stage']}"


class ProbePlugin:
    def __init__(self) -> None:
        self.sink, self.registry = ProbeSink(), ProbeRegistry()

    @expkit.hookimpl
    def expkit_metric_sinks(self):
        return [self.sink]

    @expkit.hookimpl
    def expkit_model_registries(self):
        return [self.registry]


@pytest.fixture
def probe(register_plugin) -> ProbePlugin:
    plugin = ProbePlugin()
    register_plugin(plugin, "probe")
    return plugin


def test_plugins_get_their_options_with_the_declared_defaults(probe, run_job, expkit_workspace):
    result = run_job(
        {
            "metrics": [{"name": "probe", "options": {"label": "x"}}],
            "model": {
                "name": "net",
                "path": "outputs/",
                "registries": [{"name": "probe-registry", "options": {"folder": "f"}}],
            },
        },
        script="import os; os.makedirs('outputs'); open('outputs/m.pt', 'w').write('m')\n",
    )

    assert result.state == "completed", result.output
    assert probe.sink.opened == [{"every": 5, "tags": [], "label": "x"}]
    assert probe.registry.registered == [{"stage": "dev", "folder": "f"}]
    assert "probe-registry': net dev" in result.output
    # The run's record keeps the job as written: the defaults are the plugin's, not the job's.
    job = expkit_workspace.history.runs.get(result.record.id).job
    assert job["metrics"][0]["options"] == {"label": "x"}
    assert job["model"]["registries"] == [{"name": "probe-registry", "options": {"folder": "f"}}]


def test_a_registry_option_is_checked_before_the_run(probe, expkit_cli, write_job):
    entry = {"name": "probe-registry", "options": {"stage": "production"}}
    job = write_job({"model": {"name": "net", "registries": [entry]}}, script="")

    with pytest.raises(UserError) as error:
        lifecycle.choose(JobSpec.from_yaml(job), get_plugins())

    assert str(error.value) == (
        "model.registries.0.options.stage: must be dev or prod, not 'production'"
    )


def test_registries_entries_are_names_or_names_with_options(tmp_path):
    (tmp_path / "train.py").write_text("")
    spec = {
        "experiment": "x",
        "entry_script": "train.py",
        "model": {
            "name": "net",
            "registries": ["mlflow", {"name": "azureml", "options": {"a": 1}}],
        },
    }
    job = JobSpec.from_dict(spec, base_dir=tmp_path)
    assert job.model.registries == [
        RegistrySpec("mlflow"),
        RegistrySpec("azureml", {"a": 1}),
    ]
    again = JobSpec.from_dict(job.to_dict(), base_dir=tmp_path)  # as the run's record keeps it
    assert again.model.registries == job.model.registries

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**spec, "model": {"name": "net"}}))
    job = JobSpec.from_yaml(path, ["model.registries=[mlflow, tensorboard]"])
    assert [r.name for r in job.model.registries] == ["mlflow", "tensorboard"]
    for bad, reason in (
        ([{"name": "mlflow"}, "mlflow"], "model.registries: each registry may be listed once"),
        ([{"name": "mlflow", "option": {}}], "model.registries.0.option: unknown field"),
        ([{"name": "mlflow", "options": []}], "model.registries.0.options: must be a mapping"),
    ):
        with pytest.raises(UserError) as error:
            JobSpec.from_dict({**spec, "model": {"name": "net", "registries": bad}})
        assert f"<job>: {reason}" in str(error.value)


# -- the check itself --------------------------------------------------------------------------
def test_check_names_every_problem_and_fills_the_defaults():
    sink = ProbeSink()
    assert declared.check(sink, {}, "metrics.0.options") == {"every": 5, "tags": []}
    filled = declared.check(sink, {"every": 2}, "metrics.0.options")
    filled["tags"].append("changed")  # each run gets its own copy of a default
    assert ProbeSink.takes["tags"].default == []

    with pytest.raises(UserError) as error:
        declared.check(sink, {"evry": 2, "every": 0}, "metrics.0.options", source="job.yaml")
    assert str(error.value) == (
        "job.yaml: metrics.0.options.evry: unknown option of metric sink 'probe' (did you mean "
        "'every'?); it takes every, tags, label\n"
        "job.yaml: metrics.0.options.every: must be a whole number of at least 1, not 0"
    )
    assert declared.problems(sink, {"evry": 2, "every": 0, "label": ""}, "o") == [
        ("o.evry", "unknown option of metric sink 'probe' (did you mean 'every'?); it takes "
         "every, tags, label"),
        ("o.every", "must be a whole number of at least 1, not 0"),
        ("o.label", "must be a string, not ''"),
    ]  # fmt: skip
    with pytest.raises(UserError, match=r"^--option\.color: unknown option .* it takes every"):
        declared.check(sink, {"color": "red"}, "--option")


def test_an_option_of_any_shape_is_checked_by_its_validate():
    def point(value):
        if len(value) != 2:
            raise ValueError(f"needs two numbers, not {len(value)}")

    class Target(MetricSink):
        name = "shape"
        takes = declare_options(
            at=Option(list, items=float, validate=point, help="where"),
            ref=Option(object, validate=lambda v: None, text="anything", help="any value"),
        )

        def open(self, run, options):
            raise NotImplementedError

    assert declared.problems(Target(), {"at": [1, 2.5], "ref": {"a": [1]}}, "o") == []
    assert declared.problems(Target(), {"at": [1]}, "o") == [("o.at", "needs two numbers, not 1")]
    assert declared.problems(Target(), {"at": ["x"]}, "o") == [
        ("o.at", "must be a list of numbers, not ['x']")
    ]


def test_every_builtin_capability_declares_its_options_with_help():
    """What `expkit plugins NAME` shows: each option's help line, and a default that is
    itself a good value."""
    plugins = get_plugins()
    seen = 0
    for kind in KINDS:
        for capability in plugins.all(kind).values():
            for name, option in capability.takes.items():
                seen += 1
                where = f"{capability!r} option {name}"
                assert option.help and "\n" not in option.help, where
                if option.default is not None:
                    assert option.problem(option.default) is None, where
    assert seen >= 20  # local 2, torchrun 2, horovod 2, pip 1, mlflow 2 + 2, onnx 1, ...
