"""Built-in plugin: environment builders `inherit` (this interpreter) and `pip` (a cached venv)."""

from __future__ import annotations

from expkit.plugin import EnvironmentBuilder, hookimpl
from expkit_venv.builders import InheritBuilder, PipBuilder


@hookimpl
def expkit_environment_builders() -> list[EnvironmentBuilder]:
    return [InheritBuilder(), PipBuilder()]
