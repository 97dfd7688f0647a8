"""`expkit plugins [NAME]`: every plugin and what it supplies, or one plugin's capabilities
with the options each takes."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from expkit.cli.common import examples_epilog, print_table

if TYPE_CHECKING:
    from expkit.capabilities import Capability
    from expkit.plugins import PluginInfo, Plugins


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `plugins` with its optional NAME."""
    plugins = commands.add_parser(
        "plugins",
        help="installed plugins and what they supply; one plugin's options",
        description="Without NAME: every plugin found, its distribution and version, its "
        "hooks and what it supplies, or why it did not load. With NAME: that plugin's "
        "capabilities, each with the options it takes (type or range, default, help).",
        epilog=examples_epilog("expkit plugins", "expkit plugins mlflow"),
    )
    plugins.add_argument("name", metavar="NAME", nargs="?", help="one plugin, e.g. local")
    plugins.set_defaults(handler=cmd_plugins)


def cmd_plugins(args: argparse.Namespace) -> int:
    """List the plugins, or show the one `args.name` names; exit 2 on a name conflict
    between plugins, or for an unknown NAME (UserError)."""
    from expkit.plugins import get_plugins

    plugins = get_plugins()
    supplied = _supplied(plugins)
    if args.name is not None:
        _show(plugins, args.name, supplied.get(args.name, []))
    else:
        for info in sorted(plugins.infos.values(), key=lambda i: i.name):
            _heading(info)
            if supplied.get(info.name):
                names = (
                    f"{capability.kind} {capability.name!r}" for capability in supplied[info.name]
                )
                print(f"    supplies: {', '.join(names)}")
    for conflict in plugins.conflicts:
        print(f"error: {conflict}")
    return 2 if plugins.conflicts else 0


def _supplied(plugins: Plugins) -> dict[str, list[Capability]]:
    """Each plugin's capabilities, by plugin name, in the order of the capability kinds."""
    from expkit.capabilities import KINDS

    supplied: dict[str, list[Capability]] = {}
    for kind in KINDS:
        for capability in plugins.all(kind).values():
            supplied.setdefault(capability.plugin, []).append(capability)
    return supplied


def _heading(info: PluginInfo) -> None:
    """A plugin's first lines: name, distribution and version, status, hooks."""
    origin = f"{info.distribution} {info.version}".strip() or "registered in-process"
    if info.error and info.hooks:
        status = "loaded, with an error: " + info.error
    else:
        status = "not loaded: " + info.error if info.error else "loaded"
    print(f"{info.name}  ({origin})  {status}")
    if info.hooks:
        print(f"    hooks:    {', '.join(info.hooks)}")


def _show(plugins: Plugins, name: str, capabilities: list[Capability]) -> None:
    """One plugin: its heading, then each capability with its options as a table."""
    from expkit.errors import UserError, quoted

    info = plugins.infos.get(name)
    if info is None:
        import difflib

        known = sorted(plugins.infos)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(
            f"no plugin named {quoted(name)}{hint}; known plugins: {', '.join(known) or 'none'}"
        )
    _heading(info)
    if not capabilities and not info.error:
        print("    supplies nothing")
    for capability in capabilities:
        print(f"\n{capability.kind} {capability.name!r}: {capability.description or '-'}")
        takes = capability.takes
        if takes is None:
            print("    options: not declared (the plugin checks them itself)")
        elif not takes:
            print("    takes no options")
        else:
            rows = [
                [option, spec.describe(), _default(spec.default), spec.help or "-"]
                for option, spec in takes.items()
            ]
            print_table(["OPTION", "TYPE/RANGE", "DEFAULT", "HELP"], rows, indent="    ")


def _default(value: Any) -> str:
    """An option's default as a job spec would write it; "-" when the capability decides."""
    if value is None:
        return "-"
    if isinstance(value, bool | list | dict):
        import json

        return json.dumps(value)
    return str(value)
