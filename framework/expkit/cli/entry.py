"""The `expkit` command's entry point: the top-level parser, then each command group's.

Each module of `expkit.cli` declares its subcommands next to their handlers
(`add_parser(commands)`); this one only puts them together, parses, and turns what a handler
raises into one line and an exit code: 0 done, 1 the run failed (or an internal error), 2 bad
input, 130 canceled. Start-up stays light: argparse only; `expkit COMMAND ...` imports and
builds only the group of COMMAND (`expkit --help` and an unknown command, every group), and
each handler imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterator

from expkit.cli.common import HelpFormatter, add_global_options, examples_epilog

# Each group's module (expkit.cli.<group>) and the commands its `add_parser` declares, in the
# order `expkit --help` lists them (tests/test_startup.py checks it against the groups).
GROUPS: dict[str, tuple[str, ...]] = {
    "run": ("run", "import"),
    "runs": ("runs",),
    "sweeps": ("sweep", "sweeps"),
    "metrics": ("metrics",),
    "models": ("models",),
    "export": ("export",),
    "ui": ("ui",),
    "plugins": ("plugins",),
    "workspace": ("init",),
}
GLOBAL_VALUED = ("--workspace",)  # global options that take a value
GLOBAL_FLAGS = ("--debug",)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `expkit` parser: the global options, then every group's subcommands; with
    `command` (a command word of GROUPS), only the subcommands of its group, which is all
    that parsing `expkit COMMAND ...` needs (the rest would only cost their imports)."""
    parser = argparse.ArgumentParser(
        prog="expkit",
        description="Run PyTorch training jobs through prepare -> scale -> run -> post-process "
        "-> register, recorded in a workspace. Every command takes --help; the global "
        "options may also follow the command.",
        epilog=examples_epilog(
            "expkit run training/job.yaml --set args.num_epochs=2",
            "expkit runs list",
            "expkit runs show latest",
            "expkit models list",
            "expkit ui",
        ),
        formatter_class=HelpFormatter,
    )
    add_global_options(parser)
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = [g for g, words in GROUPS.items() if command in words] or list(GROUPS)
    for group in chosen:
        importlib.import_module(f"expkit.cli.{group}").add_parser(commands)
    for _, subcommand, _ in subcommands(parser):  # they may follow the command too
        add_global_options(subcommand, argparse.SUPPRESS)
        subcommand.formatter_class = HelpFormatter  # examples one a line
    return parser


def subcommands(
    parser: argparse.ArgumentParser, prefix: str = "expkit"
) -> Iterator[tuple[str, argparse.ArgumentParser, str]]:
    """Every subcommand below `parser`, depth first: (its command line, e.g. "expkit runs
    list", its parser, the help line its parent lists it with; "" when it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub, helps.get(name, "")
                yield from subcommands(sub, f"{prefix} {name}")


def main(argv: list[str] | None = None) -> int:
    """Run the `expkit` command with `argv` (default: sys.argv[1:]); return its exit code."""
    argv = _expand_import_alias(list(sys.argv[1:] if argv is None else argv))
    args = build_parser(_command(argv)).parse_args(argv)
    from expkit.errors import PluginError, UserError

    if args.debug:
        import os

        os.environ.setdefault("EXPKIT_TRACE", "1")
    try:
        return args.handler(args) or 0
    except UserError as error:
        print(f"expkit: error: {error}", file=sys.stderr)
        return error.exit_code
    except PluginError as error:
        if args.debug:
            raise
        print(f"expkit: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as error:
        if args.debug:
            raise
        print(
            f"expkit: internal error: {type(error).__name__}: {error} (rerun with --debug "
            "for the traceback)",
            file=sys.stderr,
        )
        return 1


def _command(argv: list[str]) -> str | None:
    """The command word of `argv` when only global options come before it (`expkit
    --workspace W run JOB`: "run"); else None, for the whole parser (`expkit --help run`
    lists every command, and an abbreviated option is argparse's to read)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in GLOBAL_VALUED:
            skip = True
        elif word in GLOBAL_FLAGS or word.startswith(tuple(f"{o}=" for o in GLOBAL_VALUED)):
            continue
        else:
            return None if word.startswith("-") else word
    return None


def _expand_import_alias(argv: list[str]) -> list[str]:
    """`expkit import-azureml REF` is `expkit import azureml REF`: the command word (the
    first word that is neither an option nor a global option's value) is split."""
    skip = False
    for i, word in enumerate(argv):
        if skip:
            skip = False
        elif word in GLOBAL_VALUED:
            skip = True
        elif not word.startswith("-"):
            if word.startswith("import-") and len(word) > len("import-"):
                argv[i : i + 1] = ["import", word.removeprefix("import-")]
            break
    return argv


def _version() -> str:
    from expkit import __version__

    return f"expkit {__version__}"
