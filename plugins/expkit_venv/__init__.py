"""Built-in plugin: environment builders `inherit` (this interpreter) and `pip` (a cached venv)."""

from __future__ import annotations

import expkit
from expkit_venv.builders import InheritBuilder, PipBuilder


@expkit.hookimpl
def expkit_environment_builders() -> list[expkit.EnvironmentBuilder]:
    return [InheritBuilder(), PipBuilder()]
