"""The scale stage on Azure ML: get or create the AmlCompute cluster and wait until it can take
the run, saying its node counts as they change.

Azure ML adds nodes when a run is submitted (up to max_nodes) and removes idle ones after
idle_seconds_before_scaledown, so "can take the run" means: the cluster exists, its
provisioning succeeded, and it may grow to the nodes the job needs. The nodes themselves come
up after the submission; the run stage keeps reporting the counts while the run is queued.
"""

from __future__ import annotations

import time
from typing import Any

from expkit.plugin import Canceled, RunContext, StageFailed, UserError
from expkit_azureml.options import AzureOptions
from expkit_azureml.submission import provisioning_configuration, provisioning_settings

POLL_SECONDS = 10.0
READY = "succeeded"
BROKEN = ("failed", "canceled", "deleting")


def get_or_create(workspace: Any, options: AzureOptions, say: Any) -> Any:
    """The compute target named by the options; an AmlCompute cluster is created when missing
    (unless `create: false`)."""
    from azureml.core.compute import ComputeTarget
    from azureml.core.compute_target import ComputeTargetException

    from expkit_azureml.workspace import first_line

    try:
        target = ComputeTarget(workspace=workspace, name=options.cluster)
    except ComputeTargetException as error:
        if not options.create:
            raise UserError(
                f"compute.options.cluster: workspace {workspace.name!r} has no compute target "
                f"{options.cluster!r} and compute.options.create is false; create it in Azure ML "
                "studio, name an existing one, or set create: true"
            ) from error
        missing = first_line(error)
    else:
        say(f"compute target {options.cluster!r} found ({type(target).__name__})")
        return target
    config = provisioning_configuration(options)
    settings = ", ".join(f"{k} {v}" for k, v in provisioning_settings(config).items())
    say(f"creating AmlCompute cluster {options.cluster!r}: {settings} ({missing})")
    try:
        return ComputeTarget.create(workspace, options.cluster, config)
    except Exception as error:
        raise UserError(
            f"compute.options: cannot create cluster {options.cluster!r}: {first_line(error)}"
        ) from error


def node_counts(cluster: Any) -> str:
    """`cluster gpu-cluster (STANDARD_NC6s_v3, 0-4 nodes): 1 node (1 idle), steady`."""
    scale = getattr(cluster, "scale_settings", None)
    bounds = f", {scale.minimum_node_count}-{scale.maximum_node_count} nodes" if scale else ""
    head = f"cluster {cluster.name} ({cluster.vm_size}{bounds})"
    status = getattr(cluster, "status", None)
    if status is None:
        return f"{head}: provisioning {str(cluster.provisioning_state).lower()}"
    counts = status.node_state_counts
    parts = [
        f"{getattr(counts, f'{state}_node_count', 0) or 0} {state}"
        for state in ("running", "idle", "preparing", "leaving", "unusable", "preempted")
        if counts is not None and getattr(counts, f"{state}_node_count", None)
    ]
    nodes = status.current_node_count or 0
    target = status.target_node_count
    text = f"{head}: {nodes} node{'s' if nodes != 1 else ''}"
    text += f" ({', '.join(parts)})" if parts else ""
    if target is not None and target != nodes:
        text += f", scaling to {target}"
    return text + f", {str(status.allocation_state).lower()}"


def wait_until_ready(
    cluster: Any, ctx: RunContext, options: AzureOptions, poll_seconds: float = POLL_SECONDS
) -> str:
    """Block until the cluster's provisioning succeeded (cancelable), saying its node counts
    when they change; returns the last of them. A non-AmlCompute target is used as it is."""
    from azureml.core.compute import AmlCompute

    if not isinstance(cluster, AmlCompute):
        return f"compute target {cluster.name} ({type(cluster).__name__})"
    deadline = time.monotonic() + options.provisioning_timeout
    said = None
    while True:
        cluster.refresh_state()
        text = node_counts(cluster)
        if text != said:
            ctx.say(text)
            said = text
        state = str(cluster.provisioning_state).lower()
        if state == READY:
            break
        if state in BROKEN:
            errors = getattr(cluster, "provisioning_errors", None) or "no error details"
            raise StageFailed(f"cluster {cluster.name}: provisioning {state}: {errors}")
        if ctx.canceled():
            raise Canceled()
        if time.monotonic() > deadline:
            raise StageFailed(
                f"cluster {cluster.name} is not ready after {options.provisioning_timeout:.0f}s "
                f"(provisioning {state}); raise compute.options.provisioning_timeout"
            )
        time.sleep(poll_seconds)
    scale = cluster.scale_settings
    nodes = ctx.job.resources.nodes
    if scale is not None and scale.maximum_node_count < nodes:
        raise UserError(
            f"compute.options.cluster: cluster {cluster.name} scales to at most "
            f"{scale.maximum_node_count} node(s) and the job needs {nodes}; raise its maximum "
            "in Azure ML studio or name another cluster"
        )
    asked = ctx.job.compute.options.get("vm_size")
    if asked and cluster.vm_size and cluster.vm_size.lower() != str(asked).lower():
        ctx.say(
            f"cluster {cluster.name} exists with vm_size {cluster.vm_size} (not "
            f"{asked}); it is used as it is"
        )
    return said or node_counts(cluster)
