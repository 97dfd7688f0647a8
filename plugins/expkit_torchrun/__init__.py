"""Built-in plugin: the `torchrun` distributed backend (`distributed: torchrun`).

torch is not imported here: the job's environment runs `python -m torch.distributed.run`, so
the plugin loads (and `expkit plugins` lists it) wherever expkit does.
"""

from __future__ import annotations

from expkit.plugin import DistributedBackend, hookimpl
from expkit_torchrun.backend import Torchrun


@hookimpl
def expkit_distributed_backends() -> list[DistributedBackend]:
    return [Torchrun()]
