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

from expkit.plugin import JobSpec, Option, UserError, declare_options, quoted, with_defaults

FIELD = "compute.options"
AUTH_KINDS = ("auto", "interactive", "service_principal", "msi")
VM_PRIORITIES = ("dedicated", "lowpriority")
DEFAULT_GPU_VM = "STANDARD_NC6s_v3"
DEFAULT_CPU_VM = "STANDARD_DS3_V2"
DEFAULT_IDLE_SECONDS = 1800  # Azure ML's own default
DEFAULT_PROVISIONING_SECONDS = 1200  # the seed's wait_for_completion(timeout_in_minutes=20)
WORKSPACE_KEYS = ("subscription_id", "resource_group", "workspace_name")
WORKSPACE_TEXT = "the path of a config.json or {subscription_id, resource_group, workspace_name}"


def check_workspace(value: Any) -> None:
    """`workspace`: a config.json's path, or a mapping of exactly the three names (strings)."""
    if isinstance(value, str) and value.strip():
        return
    if not isinstance(value, dict):
        raise ValueError(f"must be {WORKSPACE_TEXT}, not {quoted(value)}")
    missing = [k for k in WORKSPACE_KEYS if not isinstance(value.get(k), str) or not value[k]]
    extra = sorted((str(k) for k in value if k not in WORKSPACE_KEYS), key=str)
    if missing:
        raise ValueError(f"needs {missing[0]}; give {WORKSPACE_TEXT}")
    if extra:
        import difflib  # only for this message: every run imports this module

        hint = difflib.get_close_matches(extra[0], WORKSPACE_KEYS, n=1)
        mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"unknown key {quoted(extra[0], 60)}{mean}; give {WORKSPACE_TEXT}")


WORKSPACE = Option(
    object,
    validate=check_workspace,
    text=WORKSPACE_TEXT,
    help="the Azure ML workspace: " + WORKSPACE_TEXT + " (default: Workspace.from_config()'s "
    "search from the source directory up)",
)
AUTH = Option(
    str,
    choices=AUTH_KINDS,
    default="auto",
    help="the credentials: auto (the first that works), interactive, service_principal "
    "($AZUREML_SERVICE_PRINCIPAL_*) or msi",
)

# The target's options: `compute.options` of a job with `compute: azureml`.
TAKES = declare_options(
    cluster=Option(
        str,
        pattern=r"\S+",
        text="a cluster name, e.g. gpu-cluster",
        help="the AmlCompute cluster (default: gpu-cluster for a job with GPUs, else cpu-cluster)",
    ),
    vm_size=Option(
        str,
        pattern=r"\S+",
        text=f"a VM size, e.g. {DEFAULT_GPU_VM}",
        help=f"the VM size of a cluster expkit creates (default: {DEFAULT_GPU_VM} for a job "
        f"with GPUs, else {DEFAULT_CPU_VM})",
    ),
    min_nodes=Option(int, minimum=0, default=0, help="the nodes the cluster keeps when idle"),
    max_nodes=Option(
        int, minimum=1, help="the nodes the cluster scales to (default: resources.nodes)"
    ),
    idle_seconds_before_scaledown=Option(
        int,
        minimum=0,
        default=DEFAULT_IDLE_SECONDS,
        help="seconds a node stays idle before the cluster lets it go",
    ),
    vm_priority=Option(
        str, choices=VM_PRIORITIES, default="dedicated", help="dedicated or lowpriority VMs"
    ),
    create=Option(bool, default=True, help="create the cluster when the workspace has none"),
    provisioning_timeout=Option(
        int,
        minimum=1,
        default=DEFAULT_PROVISIONING_SECONDS,
        help="seconds the scale stage waits for the cluster to be ready",
    ),
    workspace=WORKSPACE,
    auth=AUTH,
    curated_environment=Option(
        str,
        pattern=r"\S+",
        text="an Azure ML environment name, e.g. AzureML-acpt-pytorch-2.2-cuda12.1",
        help="a curated environment to run in, instead of an image built for the job",
    ),
    base_image=Option(
        str,
        pattern=r"\S+",
        text="a Docker image, e.g. mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04",
        help="the image the job's environment is built on (default: Azure ML's CPU or GPU image)",
    ),
    conda_packages=Option(
        list,
        text="a list of package names, e.g. [mpi4py]",
        default=[],
        help="conda packages added to the job's environment",
    ),
    environment_variables=Option(
        dict,
        text="a mapping of NAME: value",
        default={},
        help="variables the run gets on Azure ML",
    ),
)


@dataclass
class AzureOptions:
    """The options of one job, with the defaults that depend on the job filled in."""

    cluster: str
    vm_size: str
    min_nodes: int
    max_nodes: int
    idle_seconds_before_scaledown: int
    vm_priority: str
    create: bool
    provisioning_timeout: int  # seconds
    workspace: str | dict[str, str] | None
    auth: str
    curated_environment: str | None
    base_image: str | None
    conda_packages: list[str] = field(default_factory=list)
    environment_variables: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_job(cls, job: JobSpec) -> AzureOptions:
        """The options of `job` (checked by the core against `TAKES`), every default filled in."""
        raw = with_defaults(TAKES, job.compute.options)
        gpu = job.resources.gpus_per_node > 0
        return cls(
            cluster=raw.get("cluster") or ("gpu-cluster" if gpu else "cpu-cluster"),
            vm_size=raw.get("vm_size") or (DEFAULT_GPU_VM if gpu else DEFAULT_CPU_VM),
            min_nodes=raw["min_nodes"],
            max_nodes=raw.get("max_nodes") or job.resources.nodes,
            idle_seconds_before_scaledown=raw["idle_seconds_before_scaledown"],
            vm_priority=raw["vm_priority"],
            create=raw["create"],
            provisioning_timeout=raw["provisioning_timeout"],
            workspace=raw.get("workspace"),
            auth=raw["auth"],
            curated_environment=raw.get("curated_environment"),
            base_image=raw.get("base_image"),
            conda_packages=list(raw["conda_packages"]),
            environment_variables={str(k): str(v) for k, v in raw["environment_variables"].items()},
        )

    def check(self, nodes: int) -> None:
        """The rules between options, and with the job's `nodes`: a UserError for the first
        one broken."""
        if self.min_nodes > self.max_nodes:
            raise UserError(
                f"{FIELD}.min_nodes: {self.min_nodes} is more than max_nodes ({self.max_nodes})"
            )
        if self.max_nodes < nodes:
            raise UserError(
                f"{FIELD}.max_nodes: the cluster would scale to {self.max_nodes} node(s), "
                f"and resources.nodes asks for {nodes}; raise max_nodes to at least {nodes}"
            )
        if self.curated_environment and (self.base_image or self.conda_packages):
            raise UserError(
                f"{FIELD}.curated_environment: a curated environment brings its own image and "
                "conda packages; drop base_image and conda_packages, or the curated environment"
            )
