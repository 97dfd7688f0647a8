"""`expkit plugins`: every plugin and what it supplies."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> None:
    """Register `plugins`."""
    plugins = commands.add_parser("plugins", help="installed plugins and what they supply")
    plugins.set_defaults(handler=cmd_plugins)


def cmd_plugins(args: argparse.Namespace) -> int:
    """List every plugin, what it supplies or why it did not load; exit 2 when two plugins
    claim one name."""
    from expkit.capabilities import KINDS
    from expkit.plugins import get_plugins

    plugins = get_plugins()
    supplied: dict[str, list[str]] = {}
    for kind, base in KINDS.items():
        for name, capability in plugins.all(kind).items():
            supplied.setdefault(capability.plugin, []).append(f"{base.kind} {name!r}")
    for info in sorted(plugins.infos.values(), key=lambda i: i.name):
        origin = f"{info.distribution} {info.version}".strip() or "registered in-process"
        if info.error and info.hooks:
            status = "loaded, with an error: " + info.error
        else:
            status = "not loaded: " + info.error if info.error else "loaded"
        print(f"{info.name}  ({origin})  {status}")
        if info.hooks:
            print(f"    hooks:    {', '.join(info.hooks)}")
        if supplied.get(info.name):
            print(f"    supplies: {', '.join(supplied[info.name])}")
    for conflict in plugins.conflicts:
        print(f"error: {conflict}")
    return 2 if plugins.conflicts else 0
