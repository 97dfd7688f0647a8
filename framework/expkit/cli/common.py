"""What the command groups share: the global options, finding the workspace and a run, and
printing times and tables.

Light on purpose (argparse and the standard library): every command module imports it at
start-up, and the workspace and history are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

WORKSPACE_HELP = (
    "the workspace folder (default: $EXPKIT_WORKSPACE, else the nearest .expkit/ above the "
    "current folder)"
)
DEBUG_HELP = "show tracebacks and trace hooks"


RUN_HELP = "run id (pytorch-digits_3), run number (3), or `latest`"
EXAMPLES = "examples:"


def described(description: str, *examples: str) -> dict[str, Any]:
    """The `description` and `epilog` of a subcommand's parser (`add_parser(name, help=...,
    **described(...))`): what it does and what its arguments are, then the example command
    lines, shown as written under "examples:"."""
    return {"description": description, "epilog": examples_epilog(*examples)}


def examples_epilog(*lines: str) -> str:
    """A subcommand's `epilog`: the example command `lines` under "examples:"."""
    return "\n".join([EXAMPLES, *(f"  {line}" for line in lines)])


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with the example lines of `described` kept one a line (argparse
    would run them together); the description is filled as usual."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(EXAMPLES):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


def add_global_options(parser: argparse.ArgumentParser, default: Any = None) -> None:
    """Add `--workspace PATH` and `--debug` to `parser`, in their own help group.

    `default` is their default: None at the top level; SUPPRESS on a subcommand, so that a
    value given after the subcommand replaces the one given before it (the later one wins),
    and one not given there leaves the top-level value as it is.
    """
    group = parser.add_argument_group("global options")
    group.add_argument("--workspace", metavar="PATH", default=default, help=WORKSPACE_HELP)
    group.add_argument(
        "--debug",
        action="store_true",
        default=False if default is None else default,
        help=DEBUG_HELP,
    )


def how_many(text: str) -> int:
    """argparse `type` of `--limit`: a whole number from 1 (0 or less would list nothing and
    read as "no runs yet")."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number from 1, e.g. --limit 5")
    return value


def open_workspace(args: argparse.Namespace, create: bool = False) -> Any:
    """The workspace `--workspace` or $EXPKIT_WORKSPACE names, or the one found from here;
    with `create`, one is made in the current folder when none is found and none was named
    (a named folder that is not a workspace is refused by every command alike, never
    replaced by ./.expkit). Raises UserError when there is none, or when its history cannot
    be opened."""
    import os

    from expkit.errors import UserError
    from expkit.workspace import ENV, Workspace

    try:
        workspace = Workspace.find(args.workspace)
    except UserError:
        if not create or args.workspace or os.environ.get(ENV):
            raise
    else:
        workspace.history  # noqa: B018 - a damaged history.db is named before anything else
        return workspace
    workspace = Workspace.init(Path.cwd())
    print(
        f"expkit: created workspace {workspace.path} (`expkit init` makes one elsewhere)",
        file=sys.stderr,
    )
    return workspace


def run_record(workspace: Any, ref: str) -> Any:
    """The run `ref` names (id, number or `latest`); UserError when there is none."""
    from expkit.errors import UserError, quoted

    record = workspace.history.runs.find(ref)
    if record is None:
        raise UserError(
            f"no run {quoted(ref)} in {workspace.path}; `expkit runs list` shows the runs"
        )
    return record


def when(ts: float | None) -> str:
    """A timestamp (seconds since the epoch) as local time, or "-" for none."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def print_table(headers: list[str], rows: list[list[str]], indent: str = "") -> None:
    """Print `rows` under `headers` in left-aligned columns two spaces apart."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        cells = "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=False))
        print((indent + cells).rstrip())


def metric_cell(value: Any) -> str:
    """A metric's value in a table cell: a number to 4 significant digits, a table row
    (`log_row`) as its columns `k=v`, text as one line."""
    from expkit.console import format_value
    from expkit.outputs import escaped

    if isinstance(value, dict):
        return " ".join(f"{k}={format_value(v)}" for k, v in value.items())
    return escaped(format_value(value))
