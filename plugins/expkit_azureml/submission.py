"""A job spec as the azureml-core objects that submit it: Environment, ScriptRunConfig and the
cluster's provisioning configuration. Building them is offline; nothing here contacts Azure.

The environment on Azure is the one the job sees here: this interpreter's Python version, its
torch and torchvision versions (a `pip` environment builds over this interpreter's packages, so
the script imports them here), the job's pip packages and `azureml-defaults` (Azure ML's run
agent), on Azure ML's default CPU or GPU image, unless compute.options name a base image or a
curated environment. Run-specific settings (where expkit's metric channel is written, the
in-script API's forwarder to the Azure ML run) are the run configuration's environment
variables, so that the environment's definition, and with it Azure ML's image cache, stays the
same from run to run.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from expkit.context import FORWARDER_ENV
from expkit.plugin import JobSpec, UserError
from expkit_azureml.forward import FORWARDER
from expkit_azureml.options import AzureOptions

# Where the script's metric channel goes on Azure: inside ./logs, which Azure ML uploads (and
# lists among the run's log files) while the script runs; the target copies it back.
METRICS_DIR_ON_AZURE = "logs/expkit-metrics"
FRAMEWORK_PACKAGES = ("torch", "torchvision")
RUN_AGENT_PACKAGE = "azureml-defaults"
_REQUIREMENT_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def package_name(requirement: str) -> str:
    """`Pillow==5.4.1` -> `pillow`; `horovod[pytorch]` -> `horovod` (PEP 503 normalized)."""
    match = _REQUIREMENT_NAME.match(requirement)
    return re.sub(r"[-_.]+", "-", match[1]).lower() if match else requirement.lower()


def installed_version(name: str) -> str | None:
    """The version of `name` installed here, without a local label (`2.14.1+cu128` -> 2.14.1)."""
    try:
        return metadata.version(name).split("+")[0]
    except metadata.PackageNotFoundError:
        return None


def pip_packages(job: JobSpec, options: AzureOptions) -> list[str]:
    """The pip packages of the job's environment on Azure, in install order."""
    packages = list(job.environment.packages)
    if options.curated_environment:
        return packages  # the curated image brings the framework and the run agent
    named = {package_name(p) for p in packages}
    if RUN_AGENT_PACKAGE not in named:  # where the estimator put it: after the user's packages
        packages.append(RUN_AGENT_PACKAGE)
    for name in FRAMEWORK_PACKAGES:
        version = installed_version(name)
        if name not in named and version is not None:
            packages.append(f"{name}=={version}")
    return packages


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def base_image(job: JobSpec, options: AzureOptions) -> str:
    from azureml.core.environment import DEFAULT_CPU_IMAGE, DEFAULT_GPU_IMAGE

    if options.base_image:
        return options.base_image
    return DEFAULT_GPU_IMAGE if job.resources.gpus_per_node > 0 else DEFAULT_CPU_IMAGE


def environment_name(job: JobSpec) -> str:
    return f"expkit-{job.experiment}"


def build_environment(job: JobSpec, options: AzureOptions, workspace: Any = None) -> Any:
    """The azureml Environment of the job. A curated environment is read from `workspace`
    (then cloned when the job adds pip packages); without a workspace it cannot be."""
    from azureml.core import Environment

    if options.curated_environment:
        if workspace is None:
            raise ValueError("a curated environment is read from the workspace")
        try:
            curated = Environment.get(workspace, options.curated_environment)
        except Exception as error:
            from expkit_azureml.workspace import first_line

            raise UserError(
                f"compute.options.curated_environment: {options.curated_environment!r} is not "
                f"an environment of workspace {workspace.name!r}: {first_line(error)}"
            ) from error
        if not job.environment.packages:
            return curated
        env = curated.clone(environment_name(job))
        for package in job.environment.packages:
            env.python.conda_dependencies.add_pip_package(package)
        return env

    from azureml.core.conda_dependencies import CondaDependencies

    env = Environment(name=environment_name(job))
    dependencies = CondaDependencies()  # python and azureml-defaults, as the estimator's
    dependencies.set_python_version(python_version())
    for package in pip_packages(job, options):
        dependencies.add_pip_package(package)
    for package in options.conda_packages:
        dependencies.add_conda_package(package)
    index_url = job.environment.options.get("index_url")
    if index_url:
        dependencies.set_pip_option(f"--index-url {index_url}")
    env.python.conda_dependencies = dependencies
    env.docker.base_image = base_image(job, options)
    env.spark.precache_packages = False  # as the estimator (Spark only)
    return env


def environment_hash(env: Any) -> str:
    """A content hash of the environment's definition (what Azure ML builds its image from)."""
    definition = plain(env._serialize_to_dict(env))
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
    return f"azureml-{digest[:16]}"


def arguments(job: JobSpec) -> list[Any]:
    """The script's arguments as the estimator's script_params gave them: numbers stay numbers
    (Azure ML passes them as text), `flag: true` is the bare flag, false or null leaves it out."""
    if job.data:
        raise UserError(next(iter(_data_problems(job))))
    return job.arguments()


def _data_problems(job: JobSpec) -> list[str]:
    return [
        f"data.{name}: data inputs are prepared on this machine and are not uploaded to Azure "
        "ML; have the script fetch its data on the cluster (as the seed's pytorch_train.py "
        "does without --data_dir), or run this job with --set compute=local"
        for name in job.data
    ]


def distributed_config(job: JobSpec) -> Any:
    """MpiConfiguration for horovod, PyTorchConfiguration for torchrun, None for one process."""
    from azureml.core.runconfig import MpiConfiguration, PyTorchConfiguration

    res, backend = job.resources, job.distributed.backend
    if backend == "horovod":
        return MpiConfiguration(process_count_per_node=res.processes_per_node, node_count=res.nodes)
    if backend == "torchrun":
        return PyTorchConfiguration(
            communication_backend="Nccl" if res.gpus_per_node > 0 else "Gloo",
            process_count=res.processes,
            node_count=res.nodes,
        )
    return None


def run_environment_variables(options: AzureOptions) -> dict[str, str]:
    """What the script's processes get besides the environment's own variables: where the
    metric channel goes, and the forwarder that also sends the script's calls to the Azure ML
    run (compute.options.environment_variables can override either; EXPKIT_FORWARDER: "" none)."""
    return {
        "EXPKIT_METRICS_DIR": METRICS_DIR_ON_AZURE,
        FORWARDER_ENV: FORWARDER,
        "PYTHONUNBUFFERED": "1",
        **options.environment_variables,
    }


def build_script_run_config(
    job: JobSpec, source_directory: str | Path, environment: Any, options: AzureOptions
) -> Any:
    """The ScriptRunConfig that `Experiment.submit` takes for the job."""
    from azureml.core import ScriptRunConfig
    from azureml.core.runconfig import DockerConfiguration

    config = ScriptRunConfig(
        source_directory=str(source_directory),
        script=job.entry_script,
        arguments=arguments(job),
        compute_target=options.cluster,
        environment=environment,
        distributed_job_config=distributed_config(job),
        max_run_duration_seconds=int(job.timeout) if job.timeout else None,
        docker_runtime_config=DockerConfiguration(use_docker=True, shm_size=None),
    )
    config.run_config.environment_variables = run_environment_variables(options)
    # As the estimator does: the run asks for as many nodes as the job needs.
    config.run_config.amlcompute._cluster_max_node_count = job.resources.nodes
    return config


def provisioning_configuration(options: AzureOptions) -> Any:
    """The AmlCompute provisioning configuration used when the cluster does not exist."""
    from azureml.core.compute import AmlCompute

    return AmlCompute.provisioning_configuration(
        vm_size=options.vm_size,
        vm_priority=options.vm_priority,
        min_nodes=options.min_nodes,
        max_nodes=options.max_nodes,
        idle_seconds_before_scaledown=options.idle_seconds_before_scaledown,
    )


def provisioning_settings(config: Any) -> dict[str, Any]:
    """The fields of a provisioning configuration that the cluster is created with."""
    scale = config.scale_settings
    return {
        "vm_size": config.vm_size,
        "vm_priority": config.vm_priority,
        "min_nodes": scale.minimum_node_count,
        "max_nodes": scale.maximum_node_count,
        "idle_seconds_before_scaledown": scale.idle_seconds_before_scaledown,
    }


def serialized_run_configuration(config: Any) -> dict[str, Any]:
    """The run configuration Azure ML receives for a ScriptRunConfig, as plain data."""
    from azureml.core._serialization_utils import _serialize_to_dict
    from azureml.core.script_run_config import get_run_config_from_script_run

    return plain(_serialize_to_dict(get_run_config_from_script_run(config)))


def plain(value: Any) -> Any:
    """azureml's serialized dicts (with ruamel ordereddicts inside) as plain dicts and lists."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
