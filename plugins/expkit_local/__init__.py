"""Built-in plugin: the `local` compute target and the `none` distributed backend.

It is registered through the `expkit` entry-point group like any third-party plugin, and is
the template to copy for a new compute target.
"""

from __future__ import annotations

from expkit.plugin import ComputeTarget, DistributedBackend, hookimpl
from expkit_local.backend import SingleProcess
from expkit_local.target import LocalTarget


@hookimpl
def expkit_compute_targets() -> list[ComputeTarget]:
    return [LocalTarget()]


@hookimpl
def expkit_distributed_backends() -> list[DistributedBackend]:
    return [SingleProcess()]
