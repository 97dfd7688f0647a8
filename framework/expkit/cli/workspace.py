"""`expkit init [PATH]`: create a workspace."""

from __future__ import annotations

import argparse

from expkit.cli.common import described


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `init` with its argument."""
    init = commands.add_parser(
        "init",
        help="create a workspace (.expkit/) in a folder",
        **described(
            "Create the workspace PATH/.expkit/ (PATH: a folder, default the current one), "
            "or find it ready; commands in PATH and below use it, as does any command given "
            "--workspace PATH or EXPKIT_WORKSPACE=PATH.",
            "expkit init",
            "expkit init ~/experiments",
        ),
    )
    init.add_argument(
        "path", metavar="PATH", nargs="?", default=".", help="the folder (default: here)"
    )
    init.set_defaults(handler=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    """Create (or find ready) the workspace in `args.path` and say where it is."""
    from expkit.workspace import Workspace

    workspace = Workspace.init(args.path)
    print(f"workspace ready: {workspace.path}")
    return 0
