"""One consistent command line (issue 16, part 3), as a user meets it: the run summary's times,
counts and hashes written one way in every command, the tools' chatter kept in the run's log,
one refusal of a workspace that is not one, unknown names answered with the known ones, a
list field given one value shown how to write the list, and every subcommand's --help
describing its arguments with an example. Driven through the real `expkit` command."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import bare_env, error_line
from expkit.cli.entry import _expand_import_alias, build_parser, subcommands
from expkit.workspace import Workspace

# The one duration format (expkit.console.human_seconds): 0.04s, 7.12s, 2m56s, 1h02m03s.
DURATION = r"(?:\d+\.\d\ds|\d+m\d\ds|\d+h\d\dm\d\ds)"
WRITES = """
import os
os.makedirs("outputs", exist_ok=True)
open("outputs/a.txt", "w").write("a" * 10)
open("outputs/b.txt", "w").write("b" * 22)
from expkit import Run
Run.get_context().log("acc", 0.5)
"""


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


# -- the run summary and what every command shows of it ------------------------------------------
@pytest.fixture
def finished(expkit_cli, write_job):
    """`expkit run` of a job that writes two outputs: (its terminal output, the run id)."""
    job = write_job({}, script=WRITES)
    out = ok(expkit_cli("run", str(job)))
    run_id = re.search(r"^run (\S+) in workspace", out, re.M).group(1)
    return out, run_id


def test_summary_has_a_total_and_every_command_shows_each_duration_alike(expkit_cli, finished):
    out, run_id = finished
    live = dict(re.findall(rf"^✓ (\S+)\s+({DURATION})", out, re.M))
    summary = dict(re.findall(rf"^  (\S+)\s+completed\s+({DURATION})", out, re.M))
    shown = ok(expkit_cli("runs", "show", run_id))
    listed = ok(expkit_cli("runs", "list"))

    total = re.search(rf"^  total\s+({DURATION})  from submission to end$", out, re.M)
    assert total, out
    assert set(live) == {"prepare", "scale", "run", "post-process"}, out
    assert live == summary  # the same value, the same way, live and in the summary
    for stage, took in summary.items():
        assert re.search(rf"^  {stage}\s+completed\s+{took}\b", shown, re.M), shown
    assert re.search(rf"^  total\s+{total.group(1)}  from submission to end$", shown, re.M)
    assert re.search(rf"^{run_id}\s+completed\s+\S+ \S+\s+{total.group(1)}\s", listed, re.M)
    # No other way of writing a duration anywhere (`176.45s` beside `2m56s`, `2.3s`).
    for text in (out, shown, listed):
        for token in re.findall(r"(?<![\w.])\d[\d.hm]*s\b", text):
            assert re.fullmatch(DURATION, token), f"{token!r} in\n{text}"


def test_outputs_are_counted_one_way_and_hashes_shown_at_one_length(expkit_cli, finished):
    out, run_id = finished
    shown = ok(expkit_cli("runs", "show", run_id))

    assert "post-process │ 1 metric value recorded; outputs 2 files, 32 B" in out, out
    assert re.search(r"^✓ post-process\s+\S+  outputs 2 files, 32 B$", out, re.M), out
    assert re.search(r"^  outputs\s+2 files, 32 B$", out, re.M), out
    assert "\noutputs (2 files, 32 B)\n" in shown, shown
    hashes = re.findall(r"\b(?:hash |sha256:|inherit-|pip-)([0-9a-f]+)\b", out + shown)
    assert len(hashes) >= 4  # the snapshot twice, the environment, two outputs
    assert {len(h) for h in hashes} == {16}, hashes


def test_models_show_counts_and_sizes_its_files_as_runs_show_does(expkit_cli, write_job):
    """`models show` listed a version's files with no size and no count, where `runs show`
    and the register stage say "2 files, 32 B"."""
    job = write_job({"model": {"name": "m", "path": "outputs/"}}, script=WRITES)
    out = ok(expkit_cli("run", str(job)))
    run_id = re.search(r"^run (\S+) in workspace", out, re.M).group(1)

    shown = ok(expkit_cli("models", "show", "m:1"))
    outputs = ok(expkit_cli("runs", "show", run_id)).split("\noutputs ")[1].splitlines()

    assert "registered m:1 (2 files, 32 B)" in out
    files = shown.split("\nfiles ")[1].split("\nlineage")[0].splitlines()
    assert files == outputs  # "(2 files, 32 B)", then each file, its size and hash alike
    assert files[0] == "(2 files, 32 B)"


def test_pip_and_a_data_command_write_into_the_runs_log_not_the_terminal(
    expkit_cli, write_job, expkit_workspace
):
    data = (
        "python -c \"import os, sys; os.makedirs(sys.argv[1]); print('wrote', sys.argv[1])\" {dest}"
    )
    job = write_job(
        {
            "environment": {"pip": ["pyyaml"]},  # installed already: pip only checks it
            "data": {"d": {"prepare": data}},
            "args": {"data_dir": "${data.d}"},
        },
        script="print('trained')\n",
    )
    out = ok(expkit_cli("run", str(job)))
    run_id = re.search(r"^run (\S+) in workspace", out, re.M).group(1)
    log = (expkit_workspace.run_dir(run_id) / "logs" / "prepare.log").read_text()

    assert "Requirement already satisfied: pyyaml" in log, log
    assert re.search(r"^\$ .* -m pip .*install .*pyyaml$", log, re.M), log
    assert re.search(r"^data 'd': wrote .*\.tmp$", log, re.M), log  # the temporary folder
    assert "Requirement already satisfied" not in out and "Looking in" not in out, out
    assert ".tmp" not in out, out
    # The script's command as run in the working copy, which is removed after the run.
    assert "run │ $ python train.py --data_dir ./data/d\n" in out, out
    assert str(expkit_workspace.run_dir(run_id) / "work") not in out, out
    assert re.search(rf"environment built \(pip-[0-9a-f]{{16}}\) in {DURATION}", out), out
    assert "logs/prepare.log" in ok(expkit_cli("runs", "files", run_id))


# -- a workspace that is not one -----------------------------------------------------------------
def test_every_command_refuses_a_workspace_env_that_is_not_one_alike(tmp_path, write_job):
    """EXPKIT_WORKSPACE naming a folder that is no workspace: every command says so in the
    same one line, exit 2, and none uses or makes ./.expkit instead (`expkit run` used to,
    saying "created" even for one that existed)."""
    job = write_job({}, script="print('hi')\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "job": str(job),
                "search_space": {"lr": {"type": "choice", "values": [1, 2]}},
                "objective": {"primary_metric": "acc", "goal": "maximize"},
                "limits": {"max_total_trials": 1},
            }
        )
    )
    not_one = tmp_path / "not-a-workspace"
    not_one.mkdir()
    here = tmp_path / "here"  # the current folder: already a workspace, or none at all
    here.mkdir()
    existing = Workspace.init(tmp_path / "existing")
    env = bare_env(EXPKIT_WORKSPACE=str(not_one))
    expected = (
        f"expkit: error: EXPKIT_WORKSPACE: {not_one} is not an expkit workspace; create it "
        f"with `expkit init {not_one}`"
    )
    commands = [
        ["run", str(job)],
        ["sweep", str(sweep)],
        ["runs", "list"],
        ["runs", "show", "latest"],
        ["runs", "resume", "1"],
        ["metrics", "latest"],
        ["sweeps", "list"],
        ["models", "list"],
        ["export", "latest", "--format", "onnx"],
    ]
    for cwd in (here, existing.path.parent):
        for argv in commands:
            result = subprocess.run(
                [sys.executable, "-m", "expkit", *argv],
                capture_output=True,
                text=True,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                timeout=120,
            )
            assert result.returncode == 2, (argv, result.stdout, result.stderr)
            assert error_line(result) == expected, argv
            assert "created" not in result.stdout + result.stderr
    assert not (here / ".expkit").exists()
    assert existing.history.runs.recent() == []  # not used instead


def _expkit(*argv: str, cwd, **env: str) -> subprocess.CompletedProcess:
    """`expkit ARGV` in `cwd`, with no EXPKIT_ variable but `env`'s."""
    return subprocess.run(
        [sys.executable, "-m", "expkit", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=bare_env(**env),
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def test_a_project_folder_with_its_own_config_json_is_not_taken_for_a_workspace(tmp_path):
    """A folder holding the user's own config.json was opened as a workspace (its history.db
    written among the user's files), and it hid the real one in its .expkit/."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"lr": 0.1}\n')

    for how in (["--workspace", str(project)], []):
        env = {} if how else {"EXPKIT_WORKSPACE": str(project)}
        refused = _expkit(*how, "runs", "list", cwd=tmp_path, **env)
        assert refused.returncode == 2
        assert error_line(refused).endswith(
            f"{project} is not an expkit workspace; create it with `expkit init {project}`"
        )
    assert sorted(p.name for p in project.iterdir()) == ["config.json"]

    assert _expkit("init", str(project), cwd=tmp_path).returncode == 0
    assert _expkit("runs", "list", cwd=tmp_path, EXPKIT_WORKSPACE=str(project)).returncode == 0
    assert (project / ".expkit" / "history.db").is_file()
    assert not (project / "history.db").exists()
    assert (project / "config.json").read_text() == '{"lr": 0.1}\n'


def test_a_named_file_or_link_gets_advice_that_works(tmp_path):
    """EXPKIT_WORKSPACE naming a file or a link to nothing advised `expkit init` of it, which
    failed ("Not a directory", "File exists"); `expkit init` of a link to a workspace's
    folder made a second workspace inside the first."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    dangling = tmp_path / "ws"
    dangling.symlink_to(tmp_path / "gone")

    as_file = _expkit("runs", "list", cwd=tmp_path, EXPKIT_WORKSPACE=str(a_file))
    assert as_file.returncode == 2
    assert error_line(as_file) == (
        f"expkit: error: EXPKIT_WORKSPACE: {a_file} is a file, not an expkit workspace; name "
        "the folder that holds .expkit/ (or the .expkit/ folder itself)"
    )
    init_file = _expkit("init", str(a_file), cwd=tmp_path)
    assert init_file.returncode == 2
    assert error_line(init_file) == (
        f"expkit: error: {a_file / '.expkit'}: cannot create a workspace ({a_file} is a file; "
        "name a folder)"
    )
    assert a_file.read_text() == "mine\n"

    to_nothing = _expkit("--workspace", str(dangling), "runs", "list", cwd=tmp_path)
    assert to_nothing.returncode == 2
    assert error_line(to_nothing) == (
        f"expkit: error: --workspace: {dangling} is a link to {tmp_path / 'gone'}, which does "
        f"not exist; name the workspace's folder, or create it with `expkit init "
        f"{tmp_path / 'gone'}`"
    )
    init_link = _expkit("init", str(dangling), cwd=tmp_path)
    assert init_link.returncode == 2
    assert error_line(init_link).endswith(
        f"cannot create a workspace ({dangling} is a link to {tmp_path / 'gone'}, which does "
        "not exist)"
    )
    assert not (tmp_path / "gone").exists()

    real = Workspace.init(tmp_path / "real")
    alias = tmp_path / "alias"
    alias.symlink_to(real.path)  # a link to the .expkit folder itself
    again = _expkit("init", str(alias), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert not (real.path / ".expkit").exists()
    assert _expkit("--workspace", str(alias), "runs", "list", cwd=tmp_path).returncode == 0


# -- names that do not exist ------------------------------------------------------------------
def test_runs_list_of_an_unknown_experiment_says_so_with_the_known_ones(expkit_cli, run_job):
    empty = expkit_cli("runs", "list", "--experiment", "nope")
    assert empty.returncode == 2
    assert error_line(empty).endswith(
        "no experiment 'nope' in " + _ws(expkit_cli) + "; it has no runs yet"
    )

    assert run_job({"experiment": "birds"}, script="print(1)\n").record.state == "completed"
    assert run_job({"experiment": "cats"}, script="print(1)\n").record.state == "completed"
    result = expkit_cli("runs", "list", "--experiment", "nope")

    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith("expkit: error: --experiment: no experiment 'nope' in ")
    assert line.endswith("; its experiments: birds, cats")
    assert re.search(
        r"^birds_1\s+completed", ok(expkit_cli("runs", "list", "--experiment", "birds")), re.M
    )


def test_sweeps_list_of_an_unknown_experiment_says_so_as_runs_list_does(expkit_cli, tmp_path):
    """`sweeps list --experiment nope` said "no sweeps yet" (exit 0) where `runs list` says
    there is no such experiment (exit 2); a sweep's trials asked for under another
    experiment said the sweep "has no trials yet"."""
    from test_sweep_driver import write_sweep

    sweep = write_sweep(tmp_path, {"limits": {"max_total_trials": 1}})
    ok(expkit_cli("sweep", str(sweep)))

    for command in (["sweeps", "list"], ["runs", "list"]):
        result = expkit_cli(*command, "--experiment", "nope")
        assert result.returncode == 2, command
        assert error_line(result).endswith(
            "no experiment 'nope' in " + _ws(expkit_cli) + "; its experiments: sw"
        )
    assert re.search(
        r"^sw_sweep_1\s+completed", ok(expkit_cli("sweeps", "list", "--experiment", "sw")), re.M
    )

    elsewhere = expkit_cli("runs", "list", "--sweep", "1", "--experiment", "other")
    assert elsewhere.returncode == 2
    assert error_line(elsewhere) == (
        "expkit: error: --experiment: the trials of sweep sw_sweep_1 are runs of experiment "
        "'sw', not 'other'"
    )


@pytest.mark.parametrize("command", [["runs", "list"], ["sweeps", "list"]], ids=" ".join)
@pytest.mark.parametrize("limit", ["0", "-1"])
def test_a_limit_below_one_is_refused_not_read_as_no_runs(expkit_cli, run_job, command, limit):
    """`--limit 0` listed nothing and said "no runs yet" in a workspace full of runs."""
    run_job({}, script="print(1)\n")

    result = expkit_cli(*command, "--limit", limit)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(f"error: argument --limit: '{limit}': a whole number from 1, e.g. --limit 5")
    )
    assert "no runs yet" not in result.stdout


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("7", "no run '7' in {ws} (`expkit runs list` shows the runs), and no model '7'"),
        ("latest", "no run 'latest' in {ws} (`expkit runs list` shows the runs)"),
        ("pt-dnn:1", "no model 'pt-dnn:1' in this workspace (no models registered yet)"),
    ],
)
def test_export_of_a_run_that_does_not_exist_names_the_run(expkit_cli, ref, message):
    """`expkit export 7` (the example's form, a run number) said "no model '7'"."""
    result = expkit_cli("export", ref, "--format", "onnx")

    assert result.returncode == 2
    assert error_line(result) == "expkit: error: " + message.format(ws=_ws(expkit_cli))


def test_runs_download_of_a_bare_output_name_suggests_its_full_name(expkit_cli, run_job, tmp_path):
    """`runs files` names `outputs/model.pt`; asking for `model.pt` said only "no file"."""
    script = "import os\nos.makedirs('outputs')\nopen('outputs/model.pt', 'w').write('w')\n"
    run = run_job({}, script=script)

    result = expkit_cli("runs", "download", run.record.id, "model.pt", str(tmp_path / "d/"))

    assert result.returncode == 2
    assert error_line(result) == (
        f"expkit: error: run {run.record.id} has no file 'model.pt' (did you mean "
        f"outputs/model.pt?); see `expkit runs files {run.record.id}`"
    )
    assert not (tmp_path / "d").exists()


def _ws(expkit_cli) -> str:
    """The path of the workspace the fixture's commands use."""
    import os

    return os.environ["EXPKIT_WORKSPACE"]


def test_metrics_of_an_unknown_name_exits_2_naming_the_known_ones(expkit_cli, run_job):
    script = "from expkit import Run\nrun = Run.get_context()\nrun.log('acc', 0.5)\n"
    script += "run.log('loss', 1.5)\n"
    run = run_job({}, script=script)
    assert run.record.state == "completed", run.output

    result = expkit_cli("metrics", "latest", "nosuch")
    assert result.returncode == 2
    assert error_line(result) == (
        f"expkit: error: run {run.record.id} has no metric 'nosuch'; its metrics: acc, loss"
    )
    assert re.search(r"^acc\s+-\s+0\.5\s", ok(expkit_cli("metrics", "latest", "acc")), re.M)
    compared = expkit_cli("metrics", "latest", "1", "nosuch")  # one run, named twice
    assert compared.returncode == 2 and "its metrics: acc, loss" in error_line(compared)


# -- a list field given one value ------------------------------------------------------------
@pytest.mark.parametrize(
    ("item", "advice"),
    [
        ("metrics=mlflow", "metrics: must be a list, not a string; write --set metrics=[mlflow]"),
        (
            "retry.on=preempted",
            "retry.on: must be a list, not a string; write --set retry.on=[preempted]",
        ),
    ],
)
def test_set_of_one_value_for_a_list_field_shows_the_list(expkit_cli, write_job, item, advice):
    job = write_job({}, script="print(1)\n")
    result = expkit_cli("run", str(job), "--set", item, "--dry-run")

    assert result.returncode == 2
    assert error_line(result) == f"expkit: error: {job} (--set {item}): {advice}"
    fixed = item.replace("=", "=[", 1) + "]"
    assert expkit_cli("run", str(job), "--set", fixed, "--dry-run").returncode == 0


def test_a_list_field_given_one_value_in_the_file_shows_the_list(expkit_cli, write_job):
    job = write_job({"metrics": "tensorboard"}, script="print(1)\n")
    result = expkit_cli("run", str(job), "--dry-run")

    assert result.returncode == 2
    assert error_line(result) == (
        f"expkit: error: {job}: metrics: must be a list, not a string; write it as a list: "
        "[tensorboard]"
    )


# -- --help ---------------------------------------------------------------------------------------
def _helped() -> list[tuple[str, object]]:
    parser = build_parser()
    return [("expkit", parser), *((command, sub) for command, sub, _ in subcommands(parser))]


def test_every_subcommand_help_describes_its_arguments_and_shows_examples_that_parse():
    helped = _helped()
    assert len(helped) >= 20  # run, import, runs and its 8 actions, sweep, sweeps and its 4, ...
    for command, sub in helped:
        text = sub.format_help()
        assert sub.description and len(sub.description) > 40, f"`{command}`: no description"
        for action in sub._actions:
            listing = isinstance(action, argparse._SubParsersAction)  # its ACTIONs' lines
            if not action.option_strings and not listing:  # RUN, NAME[:VERSION], JOB...
                assert action.help and action.help.strip(), f"`{command}` {action.metavar}"
        assert "\nexamples:\n" in text, f"`{command} --help` shows no example:\n{text}"
        examples = text.split("\nexamples:\n", 1)[1].splitlines()
        assert examples and all(line.startswith(f"  {command}") for line in examples), text
        for line in examples:  # each example is a command line expkit accepts
            argv = _expand_import_alias(shlex.split(line)[1:])
            build_parser().parse_args(argv)


def test_help_of_a_subcommand_shows_its_examples_one_a_line(expkit_cli):
    out = ok(expkit_cli("runs", "download", "--help"))

    assert out.rstrip().endswith(
        "examples:\n"
        "  expkit runs download latest outputs/model.pt ./model/\n"
        "  expkit runs download 3 logs/rank-0.log --force"
    ), out
    assert "RUN" in out and "NAME" in out and "DEST" in out
