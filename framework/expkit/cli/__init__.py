"""The `expkit` command, one module per command group.

`entry` builds the parser from each group's `add_parser` and dispatches; `common` holds what
the groups share; `run` (run, dry run, import), `runs`, `metrics`, `models`, `export`,
`plugins` and `workspace` (init) each declare their subcommands next to their handlers.
`main` is the console script's entry point (`expkit = "expkit.cli:main"`).
"""

from expkit.cli.entry import main

__all__ = ["main"]
