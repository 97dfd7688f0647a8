"""The `azureml` compute target's options, read and checked from a job spec without azureml.

    compute:
      target: azureml
      options:
        cluster: gpu-cluster          # the AmlCompute cluster (the seed's cluster_name)
        vm_size: STANDARD_NC6s_v3     # used when the cluster is created
        min_nodes: 0
        max_nodes: 4                  # default: resources.nodes
        idle_seconds_before_scaledown: 1800
        vm_priority: dedicated        # or lowpriority
        create: true                  # create the cluster when it does not exist
        provisioning_timeout: 1200    # seconds the scale stage waits for the cluster
        workspace: config.json        # or {subscription_id, resource_group, workspace_name};
                                      # default: Workspace.from_config()'s search
        auth: auto                    # auto, interactive, service_principal or msi
        curated_environment: AzureML-acpt-pytorch-2.2-cuda12.1   # instead of a built image
        base_image: mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04
        conda_packages: [mpi4py]
        environment_variables: {NCCL_DEBUG: INFO}

Everything here is Azure-only: `--set compute=local` drops it in one go, and the job's
`environment` (its pip packages) applies in both places.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from expkit.errors import UserError
from expkit.job import JobSpec

FIELD = "compute.options"
AUTH_KINDS = ("auto", "interactive", "service_principal", "msi")
VM_PRIORITIES = ("dedicated", "lowpriority")
DEFAULT_GPU_VM = "STANDARD_NC6s_v3"
DEFAULT_CPU_VM = "STANDARD_DS3_V2"
DEFAULT_IDLE_SECONDS = 1800  # Azure ML's own default
DEFAULT_PROVISIONING_SECONDS = 1200  # the seed's wait_for_completion(timeout_in_minutes=20)


@dataclass
class AzureOptions:
    """The checked options of one job, with the defaults filled in."""

    cluster: str
    vm_size: str
    min_nodes: int
    max_nodes: int
    idle_seconds_before_scaledown: int
    vm_priority: str
    create: bool
    provisioning_timeout: float
    workspace: str | dict[str, str] | None
    auth: str
    curated_environment: str | None
    base_image: str | None
    conda_packages: list[str] = field(default_factory=list)
    environment_variables: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_job(cls, job: JobSpec) -> AzureOptions:
        """The options of `job`, or a UserError naming the first bad one."""
        raw = dict(job.compute.options)
        unknown = sorted(set(raw) - set(OPTION_NAMES))
        if unknown:
            takes = ", ".join(f"`{n}`" for n in OPTION_NAMES)
            raise UserError(
                f"{FIELD}: unknown option {unknown[0]!r} for azureml (it takes {takes})"
            )
        gpu = job.resources.gpus_per_node > 0
        nodes = job.resources.nodes
        options = cls(
            cluster=_text(raw, "cluster", "gpu-cluster" if gpu else "cpu-cluster"),
            vm_size=_text(raw, "vm_size", DEFAULT_GPU_VM if gpu else DEFAULT_CPU_VM),
            min_nodes=_whole(raw, "min_nodes", 0, minimum=0),
            max_nodes=_whole(raw, "max_nodes", nodes, minimum=1),
            idle_seconds_before_scaledown=_whole(
                raw, "idle_seconds_before_scaledown", DEFAULT_IDLE_SECONDS, minimum=0
            ),
            vm_priority=_choice(raw, "vm_priority", "dedicated", VM_PRIORITIES),
            create=_flag(raw, "create", True),
            provisioning_timeout=float(
                _whole(raw, "provisioning_timeout", DEFAULT_PROVISIONING_SECONDS, minimum=1)
            ),
            workspace=_workspace(raw.get("workspace")),
            auth=_choice(raw, "auth", "auto", AUTH_KINDS),
            curated_environment=_text(raw, "curated_environment", None),
            base_image=_text(raw, "base_image", None),
            conda_packages=_texts(raw, "conda_packages"),
            environment_variables=_variables(raw.get("environment_variables")),
        )
        if options.min_nodes > options.max_nodes:
            raise UserError(
                f"{FIELD}.min_nodes: {options.min_nodes} is more than max_nodes "
                f"({options.max_nodes})"
            )
        if options.max_nodes < nodes:
            raise UserError(
                f"{FIELD}.max_nodes: the cluster would scale to {options.max_nodes} node(s), "
                f"and resources.nodes asks for {nodes}; raise max_nodes to at least {nodes}"
            )
        if options.curated_environment and (options.base_image or options.conda_packages):
            raise UserError(
                f"{FIELD}.curated_environment: a curated environment brings its own image and "
                "conda packages; drop base_image and conda_packages, or the curated environment"
            )
        return options


OPTION_NAMES = tuple(AzureOptions.__dataclass_fields__)


def _text(raw: dict[str, Any], name: str, default: str | None) -> Any:
    value = raw.get(name, default)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise UserError(f"{FIELD}.{name}: must be a non-empty string, not {value!r}")
    return value


def _whole(raw: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = raw.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(
            f"{FIELD}.{name}: must be a whole number of at least {minimum}, not {value!r}"
        )
    return value


def _flag(raw: dict[str, Any], name: str, default: bool) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise UserError(f"{FIELD}.{name}: must be true or false, not {value!r}")
    return value


def _choice(raw: dict[str, Any], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = raw.get(name, default)
    if value not in allowed:
        raise UserError(f"{FIELD}.{name}: must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _texts(raw: dict[str, Any], name: str) -> list[str]:
    value = raw.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise UserError(f"{FIELD}.{name}: must be a list of package names, e.g. [mpi4py]")
    return list(value)


def _variables(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{FIELD}.environment_variables: must be a mapping of NAME: value")
    return {str(k): str(v) for k, v in value.items()}


WORKSPACE_KEYS = ("subscription_id", "resource_group", "workspace_name")


def _workspace(value: Any) -> str | dict[str, str] | None:
    if value is None or (isinstance(value, str) and value.strip()):
        return value
    if isinstance(value, dict):
        missing = [k for k in WORKSPACE_KEYS if not isinstance(value.get(k), str) or not value[k]]
        extra = sorted(set(value) - set(WORKSPACE_KEYS))
        if missing or extra:
            problem = f"needs {missing[0]}" if missing else f"unknown key {extra[0]!r}"
            raise UserError(
                f"{FIELD}.workspace: {problem}; give the path of a config.json or "
                "{subscription_id, resource_group, workspace_name}"
            )
        return {k: value[k] for k in WORKSPACE_KEYS}
    raise UserError(
        f"{FIELD}.workspace: must be the path of a config.json or "
        f"{{subscription_id, resource_group, workspace_name}}, not {value!r}"
    )
