"""The `azureml` compute target's submission, built offline with the real azureml-core objects
and compared field by field with what the seed's `azureml.train.dnn.PyTorch` estimator (or,
where the estimator cannot express it, a ScriptRunConfig as Azure ML's docs write it) produces
for the same settings. Nothing here reaches Azure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from expkit import lifecycle
from expkit.errors import UserError
from expkit.job import JobSpec
from expkit.plugins import get_plugins

pytest.importorskip("azureml.core")
pytest.importorskip("azureml.train")

from expkit_azureml.importer import Captured, offline_azureml
from expkit_azureml.options import WORKSPACE_KEYS, AzureOptions
from expkit_azureml.submission import (
    build_environment,
    build_script_run_config,
    installed_version,
    python_version,
    serialized_run_configuration,
)
from expkit_azureml.target import AzureMLTarget
from expkit_azureml.workspace import workspace_ref

# azureml's vendored ruamel.yaml warns about its own calls
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "training"
SCRIPT_PARAMS = {"--num_epochs": 30, "--output_dir": "./outputs"}
ARGS = {"num_epochs": 30, "output_dir": "./outputs"}

# Where expkit's submission differs from the estimator's on purpose; every other field of the
# serialized run configuration must be equal.
BY_DESIGN = {
    # the estimator's PyTorch 1.4 scenario: python 3.6 with torch 1.4 and horovod 0.18 pins;
    # expkit: this interpreter's Python, torch and torchvision (checked below)
    "environment.python.condaDependencies.dependencies",
    # the scenario's 2019 images; expkit: the SDK's current default CPU / GPU image
    "environment.docker.baseImage",
    # a workaround of the estimator for NCCL 2.4 (2019)
    "environment.environmentVariables.NCCL_TREE_THRESHOLD",
    "environment.name",  # default-environment; expkit-<experiment>
    # expkit's run variables: where the script's metric channel goes, the in-script API's
    # forwarder to the Azure ML run
    "environmentVariables",
    "environmentVariables.EXPKIT_METRICS_DIR",
    "environmentVariables.EXPKIT_FORWARDER",
    "environmentVariables.PYTHONUNBUFFERED",
}
# The estimator leaves mpi.nodeCount at MpiConfiguration's default (1; Azure ML reads the
# top-level nodeCount); a ScriptRunConfig, as expkit's, sets it to the node count.
MPI_NODES = {"mpi.nodeCount"}


def flat(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict) and value:
        out: dict[str, object] = {}
        for key, item in value.items():
            out.update(flat(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def job_of(**spec: object) -> JobSpec:
    raw = {"experiment": "pytorch-digits", "source_directory": str(SOURCE)}
    raw |= {"entry_script": "pytorch_train.py", "args": ARGS, **spec}
    return JobSpec.from_dict(raw, base_dir=REPO)


def expkit_config(job: JobSpec) -> dict:
    options = AzureOptions.from_job(job)
    environment = build_environment(job, options)
    return serialized_run_configuration(
        build_script_run_config(job, job.source_directory, environment, options)
    )


def estimator_config(**settings: object) -> dict:
    from azureml.train.dnn import PyTorch

    estimator = PyTorch(
        source_directory=str(SOURCE),
        script_params=dict(SCRIPT_PARAMS),
        entry_script="pytorch_train.py",
        **settings,
    )
    return serialized_run_configuration(estimator._get_script_run_config())


def offline_cluster(name: str) -> object:
    """An AmlCompute object without Azure (the estimator wants one for node_count > 1)."""
    from azureml.core.compute import AmlCompute, ComputeTarget

    config = AmlCompute.provisioning_configuration(vm_size="STANDARD_NC6", max_nodes=4)
    with offline_azureml(Captured()):
        return ComputeTarget.create(None, name, config)


def compare(ours: dict, theirs: dict, by_design: set[str]) -> dict[str, tuple]:
    """Every field equal except those `by_design`; returns those (ours, theirs)."""
    mine, reference = flat(ours), flat(theirs)
    differing = {
        k: (mine.get(k, "<absent>"), reference.get(k, "<absent>"))
        for k in sorted(set(mine) | set(reference))
        if mine.get(k, "<absent>") != reference.get(k, "<absent>")
    }
    unexpected = {k: v for k, v in differing.items() if k not in by_design}
    assert not unexpected, json.dumps(unexpected, indent=1, default=str)
    return differing


def pip_of(config: dict) -> list[str]:
    dependencies = config["environment"]["python"]["condaDependencies"]["dependencies"]
    return next(d["pip"] for d in dependencies if isinstance(d, dict))


def python_of(config: dict) -> str:
    dependencies = config["environment"]["python"]["condaDependencies"]["dependencies"]
    return next(d for d in dependencies if isinstance(d, str) and d.startswith("python="))


def framework_pins() -> list[str]:
    return [
        f"{n}=={installed_version(n)}" for n in ("torch", "torchvision") if installed_version(n)
    ]


def check_environment(ours: dict, theirs: dict, user: list[str], gpu: bool) -> None:
    """The by-design differences of the environment, as intended."""
    from azureml.core.environment import DEFAULT_CPU_IMAGE, DEFAULT_GPU_IMAGE

    assert python_of(ours) == f"python={python_version()}"
    assert python_of(theirs) == "python=3.6.2"
    assert pip_of(ours) == [*user, "azureml-defaults", *framework_pins()]
    assert pip_of(theirs)[: len(user) + 1] == [*user, "azureml-defaults"]  # then its framework
    assert ours["environment"]["docker"]["baseImage"] == (
        DEFAULT_GPU_IMAGE if gpu else DEFAULT_CPU_IMAGE
    )
    assert ("gpu" in theirs["environment"]["docker"]["baseImage"]) is gpu
    assert ours["environmentVariables"]["EXPKIT_METRICS_DIR"] == "logs/expkit-metrics"
    assert ours["environmentVariables"]["EXPKIT_FORWARDER"] == (
        "expkit_azureml.forward:AzureMLForwarder"
    )
    assert ours["environment"]["name"] == "expkit-pytorch-digits"


# -- the estimator's settings, side by side -------------------------------------------------
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_one_process_job_matches_the_seed_estimator(gpu):
    cluster = "gpucluster" if gpu else "cpu-cluster"
    job = job_of(
        environment={"pip": ["pillow==5.4.1"]},
        compute={"target": "azureml", "options": {"cluster": cluster}},
        resources={"nodes": 1, "processes_per_node": 1, "gpus_per_node": int(gpu)},
    )
    ours = expkit_config(job)
    theirs = estimator_config(compute_target=cluster, use_gpu=gpu, pip_packages=["pillow==5.4.1"])

    compare(ours, theirs, BY_DESIGN)
    check_environment(ours, theirs, ["pillow==5.4.1"], gpu)
    assert ours["script"] == "pytorch_train.py"
    assert ours["arguments"] == ["--num_epochs", 30, "--output_dir", "./outputs"]
    assert (ours["target"], ours["communicator"], ours["nodeCount"]) == (cluster, "None", 1)
    assert ours["docker"]["useDocker"] is True


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "cpu"])
def test_horovod_2x2_matches_the_estimator_with_mpi(gpu):
    packages = ["pillow", "horovod==0.28.1"]
    job = job_of(
        environment={"pip": packages},
        compute={"target": "azureml", "options": {"cluster": "gpucluster"}},
        resources={"nodes": 2, "processes_per_node": 2, "gpus_per_node": 2 if gpu else 0},
        distributed="horovod",
        timeout=3600,
    )
    ours = expkit_config(job)
    # The estimator runs MpiConfiguration's process count per node (its own
    # process_count_per_node argument is ignored once distributed_training is given).
    from azureml.core.runconfig import MpiConfiguration

    theirs = estimator_config(
        compute_target=offline_cluster("gpucluster"),
        node_count=2,
        distributed_training=MpiConfiguration(process_count_per_node=2),
        use_gpu=gpu,
        pip_packages=list(packages),  # the estimator appends its own packages to the list
        max_run_duration_seconds=3600,
    )

    differing = compare(ours, theirs, BY_DESIGN | MPI_NODES)
    assert differing["mpi.nodeCount"] == (2, 1)
    check_environment(ours, theirs, packages, gpu)
    assert ours["communicator"] == "IntelMpi"
    assert ours["mpi"] == {"processCountPerNode": 2, "nodeCount": 2}
    assert (ours["nodeCount"], ours["maxRunDurationSeconds"]) == (2, 3600)
    assert ours["amlcompute"]["clusterMaxNodeCount"] == 2


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu-nccl", "cpu-gloo"])
def test_torchrun_2x4_matches_a_script_run_config_with_pytorch_configuration(gpu):
    """The estimator cannot express PyTorchConfiguration (it ignores it); the reference is the
    ScriptRunConfig Azure ML's docs write, with the DockerConfiguration the estimator used."""
    from azureml.core import Environment, ScriptRunConfig
    from azureml.core.runconfig import DockerConfiguration, PyTorchConfiguration

    job = job_of(
        compute={"target": "azureml", "options": {"cluster": "gpu-cluster"}},
        resources={"nodes": 2, "processes_per_node": 4, "gpus_per_node": 4 if gpu else 0},
        distributed="torchrun",
    )
    ours = expkit_config(job)
    reference = ScriptRunConfig(
        source_directory=str(SOURCE),
        script="pytorch_train.py",
        arguments=["--num_epochs", 30, "--output_dir", "./outputs"],
        compute_target="gpu-cluster",
        environment=Environment("reference"),
        distributed_job_config=PyTorchConfiguration(
            communication_backend="Nccl" if gpu else "Gloo", process_count=8, node_count=2
        ),
        max_run_duration_seconds=None,
        docker_runtime_config=DockerConfiguration(use_docker=True, shm_size=None),
    )
    reference.run_config.amlcompute._cluster_max_node_count = 2
    theirs = serialized_run_configuration(reference)

    # The reference environment is the SDK's default one; the environment itself is compared
    # with the estimator's in the tests above.
    environment = {k for k in flat(ours) | flat(theirs) if k.startswith("environment.")}
    compare(ours, theirs, BY_DESIGN | environment)
    assert (ours["framework"], ours["communicator"]) == ("PyTorch", "nccl" if gpu else "gloo")
    assert ours["pytorch"] == {
        "communicationBackend": "nccl" if gpu else "gloo",
        "processCount": 8,
        "nodeCount": 2,
    }
    assert ours["nodeCount"] == 2


def test_curated_environment_and_options_map_onto_the_environment():
    job = job_of(
        environment={
            "builder": "pip",
            "packages": ["pillow"],
            "options": {"index_url": "https://x/simple"},
        },
        compute={
            "target": "azureml",
            "options": {
                "base_image": "myregistry.azurecr.io/train:1",
                "conda_packages": ["mpi4py"],
                "environment_variables": {"NCCL_DEBUG": "INFO"},
            },
        },
    )
    ours = expkit_config(job)
    dependencies = ours["environment"]["python"]["condaDependencies"]["dependencies"]
    assert "mpi4py" in dependencies
    assert "--index-url https://x/simple" in pip_of(ours)
    assert ours["environment"]["docker"]["baseImage"] == "myregistry.azurecr.io/train:1"
    assert ours["environmentVariables"]["NCCL_DEBUG"] == "INFO"


def test_the_environment_definition_does_not_change_from_run_to_run():
    """Run-specific values are run variables, so Azure ML's image cache keeps hitting."""
    from expkit_azureml.submission import environment_hash

    job = job_of(environment={"pip": ["pillow"]}, compute="azureml")
    options = AzureOptions.from_job(job)
    first = environment_hash(build_environment(job, options))
    assert first == environment_hash(build_environment(job, options))
    other = job_of(environment={"pip": ["pillow", "scipy"]}, compute="azureml")
    assert environment_hash(build_environment(other, options)) != first


# -- expkit run JOB --dry-run --------------------------------------------------------------
def test_dry_run_prints_the_exact_submission_without_azure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AZURE_CONFIG_DIR", str(tmp_path / "no-login"))
    for var in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.delenv(var, raising=False)
    job = job_of(
        environment={"pip": ["pillow", "horovod==0.28.1"]},
        compute={"target": "azureml", "options": {"cluster": "gpucluster", "max_nodes": 4}},
        resources={"nodes": 2, "processes_per_node": 2, "gpus_per_node": 2},
        distributed="horovod",
    )
    text = AzureMLTarget().dry_run(job)
    assert text.startswith("# the Azure ML submission, built with azureml-core; nothing was")
    document = yaml.safe_load(text)
    assert document["workspace"].startswith("not found here: no Azure ML config.json")
    assert document["credentials"].startswith("none found here: no Azure credentials")
    assert document["compute_target"]["provisioning_configuration"] == {
        "vm_size": "STANDARD_NC6s_v3",
        "vm_priority": "dedicated",
        "min_nodes": 0,
        "max_nodes": 4,
        "idle_seconds_before_scaledown": 1800,
    }
    assert document["source_directory"]["path"] == str(SOURCE)
    uploaded = document["source_directory"]["uploaded"]
    assert "expkit's in-script API as expkit/ (" in uploaded
    assert "as expkit_azureml/ (2 files: an empty __init__.py and forward.py)" in uploaded
    # the YAML holds exactly what azureml-core serializes for the ScriptRunConfig
    assert document["run_configuration"] == expkit_config(job)

    (tmp_path / "config.json").write_text(
        json.dumps({"subscription_id": "sub", "resource_group": "rg", "workspace_name": "ws"})
    )
    monkeypatch.setenv("AZURE_TENANT_ID", "t")
    monkeypatch.setenv("AZURE_CLIENT_ID", "c")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "s")
    document = yaml.safe_load(AzureMLTarget().dry_run(job))
    assert document["workspace"]["workspace_name"] == "ws"
    assert document["workspace"]["from"] == f"config.json at {tmp_path / 'config.json'}"
    assert document["credentials"] == "service_principal"


def test_dry_run_names_a_curated_environment_and_ignored_backend_options():
    job = job_of(
        environment={"pip": ["pillow"]},
        compute={
            "target": "azureml",
            "options": {"curated_environment": "AzureML-acpt-pytorch-2.2-cuda12.1"},
        },
        resources={"nodes": 1, "processes_per_node": 2, "gpus_per_node": 2},
        distributed={"backend": "torchrun", "options": {"rdzv_endpoint": "node0:29400"}},
    )
    document = yaml.safe_load(AzureMLTarget().dry_run(job))
    assert document["run_configuration"]["environment"] == {
        "name": "AzureML-acpt-pytorch-2.2-cuda12.1",
        "curated": "read from the workspace at submit",
        "added_pip_packages": ["pillow"],
    }
    assert document["notes"] == [
        "distributed.options.rdzv_endpoint is not used on Azure ML, which starts the ranks "
        "itself (PyTorchConfiguration)"
    ]


# -- what check() refuses before anything runs ---------------------------------------------
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"data": {"digits": {"prepare": "python prepare_digits.py --out {dest}"}}},
            "data.digits: data inputs are prepared on this machine and are not uploaded",
        ),
        (
            {"distributed": "horovod", "resources": {"processes_per_node": 2}},
            "distributed: horovod on Azure ML needs horovod in the image",
        ),
        (
            {
                "compute": {"target": "azureml", "options": {"max_nodes": 1}},
                "resources": {"nodes": 2},
            },
            "compute.options.max_nodes: the cluster would scale to 1 node(s)",
        ),
        (
            {
                "compute": {
                    "target": "azureml",
                    "options": {"curated_environment": "AzureML-x", "base_image": "y"},
                }
            },
            "compute.options.curated_environment: a curated environment brings its own image",
        ),
        ({"environment": {"builder": "conda"}}, "environment: azureml builds its environment"),
    ],
    ids=["data", "horovod", "max-nodes", "curated", "builder"],
)
def test_check_refuses_what_azure_ml_cannot_run(spec, message):
    spec = {"compute": "azureml", **spec}
    if "args" not in spec and "data" in spec:
        spec["args"] = {**ARGS, "data_dir": "${data.digits}"}
    with pytest.raises(UserError) as error:
        AzureMLTarget().check(job_of(**spec))
    assert str(error.value).startswith(message), str(error.value)
    assert error.value.exit_code == 2
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"clusterr": "x"},
            "compute.options.clusterr: unknown option of compute target 'azureml' (did you "
            "mean 'cluster'?)",
        ),
        ({"create": "yes"}, "compute.options.create: must be true or false, not 'yes'"),
        (
            {"workspace": {"subscription_id": "s"}},
            "compute.options.workspace: needs resource_group",
        ),
        (
            {"workspace": {**dict.fromkeys(WORKSPACE_KEYS, "x"), "subscription": "s"}},
            "compute.options.workspace: unknown key 'subscription' (did you mean "
            "'subscription_id'?)",
        ),
        ({"workspace": 7}, "compute.options.workspace: must be the path of a config.json or "),
        ({"conda_packages": "mpi4py"}, "compute.options.conda_packages: must be a list"),
        ({"min_nodes": 2}, "compute.options.min_nodes: 2 is more than max_nodes (1)"),
    ],
    ids=["unknown", "create", "workspace", "workspace-key", "workspace-kind", "conda", "min"],
)
def test_options_are_checked_before_any_run(options, message):
    """Each option alone is checked by the core against what the target declares, then the
    target's `check` applies the rules between them: both before any run."""
    job = job_of(compute={"target": "azureml", "options": options})
    with pytest.raises(UserError) as error:
        lifecycle.choose(job, get_plugins())
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)


def test_the_defaults_that_depend_on_the_job():
    choice = lifecycle.choose(job_of(compute="azureml", resources={"nodes": 3}), get_plugins())
    assert choice.job.compute.options["vm_priority"] == "dedicated"  # declared defaults
    options = AzureOptions.from_job(choice.job)
    assert (options.cluster, options.vm_size, options.max_nodes) == (
        "cpu-cluster",
        "STANDARD_DS3_V2",
        3,
    )


# -- the workspace and the credentials: one line each, before Azure is contacted ------------
def test_no_config_json_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = job_of(compute="azureml")
    with pytest.raises(UserError) as error:
        AzureMLTarget().preflight(job)
    assert str(error.value).startswith(f"no Azure ML config.json in {tmp_path} or {SOURCE}")
    assert "Download config.json" in str(error.value)

    (tmp_path / "config.json").write_text('{"name": "not azure"}')
    with pytest.raises(UserError, match=r"not an Azure ML config\.json \(no subscription_id\)"):
        AzureMLTarget().preflight(job)

    missing = job_of(compute={"target": "azureml", "options": {"workspace": "nowhere/config.json"}})
    with pytest.raises(
        UserError, match=r"compute\.options\.workspace: nowhere/config\.json does not"
    ):
        AzureMLTarget().preflight(missing)


def test_no_credentials_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".azureml").mkdir()
    (tmp_path / ".azureml" / "config.json").write_text(
        json.dumps({"subscription_id": "s", "resource_group": "rg", "workspace": "ws"})
    )
    monkeypatch.setenv("AZURE_CONFIG_DIR", str(tmp_path / "no-login"))
    for var in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "MSI_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("IDENTITY_ENDPOINT", raising=False)
    job = job_of(compute="azureml")
    assert workspace_ref(AzureOptions.from_job(job)).workspace_name == "ws"  # the older key
    with pytest.raises(UserError) as error:
        AzureMLTarget().preflight(job)
    assert str(error.value).startswith("no Azure credentials: run `az login` on this machine")

    explicit = job_of(compute={"target": "azureml", "options": {"auth": "service_principal"}})
    with pytest.raises(UserError, match=r"service_principal needs \$AZURE_TENANT_ID"):
        AzureMLTarget().preflight(explicit)


def test_a_workspace_that_cannot_be_opened_is_one_line(tmp_path, monkeypatch):
    """The real SDK's authentication, which fails here (no network to Azure; elsewhere the
    made-up tenant is refused): one UserError naming the workspace."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"subscription_id": "0" * 8, "resource_group": "rg", "workspace_name": "ws"})
    )
    monkeypatch.setenv("AZURE_TENANT_ID", "expkit-test-tenant")
    monkeypatch.setenv("AZURE_CLIENT_ID", "c")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "s")
    with pytest.raises(UserError) as error:
        AzureMLTarget().preflight(job_of(compute="azureml"))
    assert str(error.value).startswith(
        "cannot open Azure ML workspace 'ws' (resource group 'rg', from config.json at "
    )
    assert "\n" not in str(error.value)
