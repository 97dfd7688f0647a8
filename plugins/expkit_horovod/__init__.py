"""Plugin: the `horovod` distributed backend, whose ranks `horovodrun` launches.

The template for a plugin with a heavy optional dependency: it checks that horovod can be
imported without importing it (that would load torch, seconds), and when it cannot, raises
`PluginUnavailable` at import; `expkit plugins` shows that message as the one-line reason and a
job naming `distributed: horovod` fails with it (exit code 2).
"""

from __future__ import annotations

import importlib.util

from expkit.plugin import DistributedBackend, PluginUnavailable, hookimpl

INSTALL_HINT = (
    "horovod is not installed; run `bash .ci/install` "
    "(it builds horovod 0.28.1 for torch 2.14 and caches the wheel)"
)

if importlib.util.find_spec("horovod") is None:
    raise PluginUnavailable(INSTALL_HINT)

from expkit_horovod.backend import HorovodBackend  # noqa: E402  (only once horovod is there)


@hookimpl
def expkit_distributed_backends() -> list[DistributedBackend]:
    return [HorovodBackend()]
