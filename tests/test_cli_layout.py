"""The shape of the `expkit` command: every subcommand listed with a help line, and the global
options (`--workspace`, `--debug`) taken before or after the subcommand."""

from __future__ import annotations

import re

import pytest

from expkit.cli.entry import build_parser, subcommands
from expkit.workspace import Workspace

PRINT_HELLO = "print('hello from the script')\n"


def ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


# -- help ---------------------------------------------------------------------------------------
def test_expkit_help_exits_0_and_lists_every_command(expkit_cli):
    out = ok(expkit_cli("--help"))

    top = [command.split()[1] for command, _, _ in subcommands(build_parser())]
    for command in dict.fromkeys(top):
        assert re.search(rf"^\s+{command}\s+\S", out, re.M), f"{command} missing:\n{out}"
    assert "--workspace PATH" in out


def test_every_subcommand_has_a_one_line_help_in_its_parents_listing():
    parser = build_parser()
    found = list(subcommands(parser))
    parents = {"expkit": parser} | {command: sub for command, sub, _ in found}

    assert len(found) >= 17  # run, import, runs (6 actions), metrics, models (3), ...
    for command, _, help_line in found:
        assert help_line.strip(), f"`{command}` has no help line"
        assert "\n" not in help_line, f"`{command}`: its help is more than one line"
        parent, name = command.rsplit(" ", 1)
        listing = " ".join(parents[parent].format_help().split())  # unwrapped
        assert f"{name} {help_line}" in listing, f"`{command}` not listed in `{parent} --help`"


def test_every_subcommand_takes_the_global_options():
    for command, sub, _ in subcommands(build_parser()):
        text = sub.format_help()
        assert "--workspace PATH" in text and "--debug" in text, command


# -- --workspace before or after the subcommand ------------------------------------------------
@pytest.fixture
def workspaces(run_job, expkit_workspace, tmp_path):
    """(A, B): A holds one completed run, B none; EXPKIT_WORKSPACE names a third, empty one,
    so only --workspace can lead a command to A."""
    result = run_job({}, script=PRINT_HELLO)
    assert result.record.state == "completed", result.output
    empty = Workspace.init(tmp_path / "b").path
    elsewhere = Workspace.init(tmp_path / "c").path
    return str(expkit_workspace.path), str(empty), {"EXPKIT_WORKSPACE": str(elsewhere)}


@pytest.mark.parametrize(
    "argv",
    [
        ["--workspace", "{A}", "runs", "list"],
        ["runs", "list", "--workspace", "{A}"],
        ["runs", "--workspace", "{A}", "list"],
        ["runs", "list", "--workspace={A}"],
        ["--workspace", "{B}", "runs", "list", "--workspace", "{A}"],  # the later one wins
    ],
    ids=["before", "after", "between", "after-with-equals", "later-wins"],
)
def test_runs_list_takes_workspace_anywhere(expkit_cli, workspaces, argv):
    a, b, env = workspaces
    args = [word.format(A=a, B=b) for word in argv]

    assert re.search(r"^test_1\s+completed", ok(expkit_cli(*args, env=env)), re.M)


def test_the_later_workspace_wins_the_other_way_round(expkit_cli, workspaces):
    a, b, env = workspaces

    out = ok(expkit_cli("--workspace", a, "runs", "list", "--workspace", b, env=env))

    assert "no runs yet" in out


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["runs", "show", "1"], "state       completed"),
        (["runs", "logs", "test_1"], "hello from the script"),
        (["runs", "files", "latest"], "logs/rank-0.log"),
        (["metrics", "1"], "run test_1 has no metrics"),
        (["models", "list"], "no models yet"),
    ],
    ids=["runs-show", "runs-logs", "runs-files", "metrics", "models-list"],
)
def test_commands_take_workspace_before_or_after(expkit_cli, workspaces, command, expected, where):
    a, _, env = workspaces
    flag = ["--workspace", a]
    args = flag + command if where == "before" else command + flag

    assert expected in ok(expkit_cli(*args, env=env))


def test_a_run_missing_from_the_named_workspace_is_one_line(expkit_cli, workspaces):
    _, b, env = workspaces

    result = expkit_cli("runs", "show", "1", "--workspace", b, env=env)

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"expkit: error: no run '1' in {b}; `expkit runs list` shows the runs"
    ]


def test_debug_after_the_subcommand_traces_hooks(expkit_cli):
    quiet = expkit_cli("plugins")
    traced = expkit_cli("plugins", "--debug")

    assert ok(quiet) == ok(traced)
    assert "expkit_compute_targets -> " not in quiet.stderr
    assert "expkit_compute_targets -> " in traced.stderr


def test_import_alias_after_a_global_option(expkit_cli, tmp_path):
    """`expkit --workspace W import-FROM REF` is `import FROM REF`, not an unknown command."""
    result = expkit_cli("--workspace", str(tmp_path), "import-nosuch", "x.py:job")

    assert result.returncode == 2
    assert "no job importer named 'nosuch'" in result.stderr
    assert "invalid choice" not in result.stderr
