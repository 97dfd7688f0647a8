"""Built-in plugin: the `local` compute target and the `none` distributed backend.

It is registered through the `expkit` entry-point group like any third-party plugin, and is
the template to copy for a new compute target.
"""

from __future__ import annotations

import expkit
from expkit_local.backend import SingleProcess
from expkit_local.target import LocalTarget


@expkit.hookimpl
def expkit_compute_targets() -> list[expkit.ComputeTarget]:
    return [LocalTarget()]


@expkit.hookimpl
def expkit_distributed_backends() -> list[expkit.DistributedBackend]:
    return [SingleProcess()]
