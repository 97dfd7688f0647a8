"""The `expkit` command as a user drives it: help, workspaces, runs, and inspecting them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import expkit
from conftest import bare_env
from expkit.workspace import Workspace

TRAIN = """
    import os
    from expkit import Run

    run = Run.get_context()
    print("epoch 1 of 2", flush=True)
    run.log("acc", 0.5, step=0)
    print("epoch 2 of 2", flush=True)
    run.log("acc", 0.9, step=1)
    run.log("loss", 0.25)
    run.tag("optimizer", "sgd")
    os.makedirs("outputs/sub", exist_ok=True)
    with open("outputs/model.pt", "wb") as f:
        f.write(b"weights\\x00\\x01")
    with open("outputs/sub/notes.txt", "w") as f:
        f.write("notes\\n")
"""

FAIL = """
    import sys

    print("about to fail", flush=True)
    sys.exit(3)
"""

# Waits for the file named by its first argument, so a test decides when it ends.
WAIT_FOR_GO = """
    import os
    import sys
    import time

    print("waiting for the go file", flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
    print("got the go file", flush=True)
"""


def expkit_in(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`expkit ARGS` run from `cwd` with no EXPKIT_WORKSPACE unless given."""
    return subprocess.run(
        [sys.executable, "-m", "expkit", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=bare_env("EXPKIT_WORKSPACE", **env),
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


# -- help and version -----------------------------------------------------------------------
def test_help_names_the_commands(expkit_cli):
    out = ok(expkit_cli("--help"))
    for command in ("run", "runs", "metrics", "models", "plugins", "init"):
        assert re.search(rf"^\s+{command}\s", out, re.M), f"{command} missing from:\n{out}"

    run_help = ok(expkit_cli("run", "--help"))
    assert "--set" in run_help
    assert "--quiet" in run_help
    assert "JOB" in run_help

    runs_help = ok(expkit_cli("runs", "--help"))
    for action in ("list", "show", "logs", "cancel", "files", "download"):
        assert re.search(rf"^\s+{action}\s", runs_help, re.M), f"{action} missing:\n{runs_help}"


def test_version(expkit_cli):
    assert ok(expkit_cli("--version")).strip() == f"expkit {expkit.__version__}"


# -- workspaces -----------------------------------------------------------------------------
def test_init_creates_config_and_database(tmp_path):
    out = ok(expkit_in(tmp_path, "init", "project"))
    folder = tmp_path / "project" / ".expkit"
    assert json.loads((folder / "config.json").read_text())["format"] == 1
    assert (folder / "history.db").is_file()
    assert str(folder) in out
    # Opening it again is harmless and finds it empty.
    assert "no runs yet" in ok(expkit_in(tmp_path / "project", "runs", "list"))


def test_workspace_is_found_from_a_subfolder_the_flag_and_the_env_var(tmp_path, write_job):
    ok(expkit_in(tmp_path, "init", "project"))
    sub = tmp_path / "project" / "code" / "deeper"
    sub.mkdir(parents=True)
    job = write_job({}, script=TRAIN)

    ok(expkit_in(sub, "run", str(job)))
    assert not (sub / ".expkit").exists()
    assert [r.id for r in Workspace(tmp_path / "project" / ".expkit").history.runs.recent()] == [
        "test_1"
    ]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    by_flag = ok(expkit_in(elsewhere, "--workspace", str(tmp_path / "project"), "runs", "list"))
    by_env = ok(expkit_in(elsewhere, "runs", "list", EXPKIT_WORKSPACE=str(tmp_path / "project")))
    from_sub = ok(expkit_in(sub, "runs", "list"))
    for listing in (by_flag, by_env, from_sub):
        assert re.search(r"^test_1\s+completed", listing, re.M), listing


def test_a_named_folder_that_is_no_workspace_is_an_error(tmp_path):
    (tmp_path / "plain").mkdir()
    result = expkit_in(tmp_path, "--workspace", str(tmp_path / "plain"), "runs", "list")
    assert result.returncode == 2
    assert "not an expkit workspace" in result.stderr
    assert "expkit init" in result.stderr


def test_no_workspace_anywhere_says_to_run_init(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not any((p / ".expkit").exists() for p in (empty, *empty.parents))
    result = expkit_in(empty, "runs", "list")
    assert result.returncode == 2
    assert "expkit init" in result.stderr
    assert not (empty / ".expkit").exists()


def test_run_without_a_workspace_creates_one_here(tmp_path, write_job):
    job = write_job({}, script=TRAIN)
    project = job.parent
    result = expkit_in(project, "run", "job.yaml")
    ok(result)
    assert "created workspace" in result.stderr
    assert str(project / ".expkit") in result.stderr
    assert (project / ".expkit" / "config.json").is_file()
    assert re.search(r"^test_1\s+completed", ok(expkit_in(project, "runs", "list")), re.M)


# -- expkit run -----------------------------------------------------------------------------
STAGES = ("prepare", "scale", "run", "post-process", "register")


def test_run_shows_stages_output_and_summary(expkit_cli, write_job):
    job = write_job({"model": {"name": "pt-dnn"}}, script=TRAIN)
    out = ok(expkit_cli("run", str(job)))

    for stage in STAGES:
        assert f"▶ {stage}" in out
        assert re.search(rf"^✓ {stage}\s+\d+\.\d\ds", out, re.M), f"{stage} end missing:\n{out}"
    positions = [
        out.index("▶ prepare"),
        out.index("▶ scale"),
        out.index("▶ run"),
        out.index("epoch 1 of 2"),
        out.index("epoch 2 of 2"),
        out.index("✓ run"),
        out.index("▶ post-process"),
        out.index("▶ register"),
        out.index("run test_1: completed"),
    ]
    assert positions == sorted(positions), out

    summary = out[out.index("run test_1: completed") :]
    assert re.search(r"^\s+metrics\s+acc 0\.9, loss 0\.25$", summary, re.M), summary
    assert re.search(r"^\s+register\s+completed.*model pt-dnn version 1", summary, re.M)
    assert re.search(r"^\s+outputs\s+2 files", summary, re.M)
    assert "expkit runs show test_1" in summary


def test_run_prints_the_script_output_while_it_runs(background, write_job, tmp_path):
    go = tmp_path / "go"
    job = write_job({"args": [str(go)]}, script=WAIT_FOR_GO)
    live = background("run", str(job))
    live.wait_for("waiting for the go file")
    # The line arrived while the script is still waiting, not at its end.
    assert live.proc.poll() is None
    assert "got the go file" not in live.output
    go.touch()
    assert live.wait() == 0
    assert live.output.index("got the go file") < live.output.index("run test_1: completed")


def test_quiet_run_shows_only_output_and_summary(expkit_cli, write_job):
    job = write_job({}, script=TRAIN)
    out = ok(expkit_cli("run", str(job), "--quiet"))
    assert "epoch 1 of 2" in out
    assert "run test_1: completed" in out
    assert "▶" not in out
    assert "│" not in out  # no progress lines
    assert "in workspace" not in out


def test_failing_script_exits_1_with_the_error(expkit_cli, write_job):
    job = write_job({"model": {"name": "never"}}, script=FAIL)
    result = expkit_cli("run", str(job))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "about to fail" in out
    assert re.search(r"^✗ run\s+\d+\.\d\ds", out, re.M)
    summary = out[out.index("run test_1: failed") :]
    assert re.search(
        r"^\s+error\s+run: the script exited with code 3; last output: about to fail",
        summary,
        re.M,
    ), summary
    assert re.search(r"^\s+register\s+skipped", summary, re.M)


@pytest.mark.parametrize(
    ("spec", "flags", "message"),
    [
        ({"epochs": 3}, [], "epochs: unknown field"),
        ({"entry_script": "missing.py"}, [], "entry_script: 'missing.py' is not a file"),
        ({}, ["--set", "no-equals-sign"], "expected key=value"),
        ({}, ["--set", "resources.nodes=0"], "resources.nodes"),
    ],
)
def test_bad_input_exits_2(expkit_cli, write_job, spec, flags, message):
    job = write_job(spec, files={"train.py": TRAIN})
    result = expkit_cli("run", str(job), *flags)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message.lower() in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert "no runs yet" in ok(expkit_cli("runs", "list"))


def test_missing_job_file_exits_2(expkit_cli, tmp_path):
    result = expkit_cli("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "no such file" in result.stderr


# -- inspecting runs ------------------------------------------------------------------------
@pytest.fixture
def two_runs(expkit_cli, write_job):
    """test_1 completed (metrics, tags, outputs), test_2 failed."""
    assert expkit_cli("run", str(write_job({}, script=TRAIN))).returncode == 0
    assert expkit_cli("run", str(write_job({}, script=FAIL))).returncode == 1
    return "test_1", "test_2"


def test_runs_list_newest_first_with_states(expkit_cli, two_runs):
    lines = ok(expkit_cli("runs", "list")).splitlines()
    assert lines[0].split()[:2] == ["RUN", "STATE"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["test_2", "failed"],
        ["test_1", "completed"],
    ]


def test_runs_show_by_id_number_and_latest(expkit_cli, expkit_workspace, two_runs):
    by_id = ok(expkit_cli("runs", "show", "test_1"))
    assert ok(expkit_cli("runs", "show", "1")) == by_id
    assert ok(expkit_cli("runs", "show", "latest")) == ok(expkit_cli("runs", "show", "test_2"))

    assert re.search(r"^state\s+completed$", by_id, re.M)
    for stage in STAGES[:-1]:
        assert re.search(rf"^\s+{stage}\s+completed\s+\d+\.\d\ds", by_id, re.M), by_id
    assert re.search(r"^\s+register\s+skipped", by_id, re.M)
    assert re.search(r"^\s+acc\s+0\.9$", by_id, re.M)
    assert re.search(r"^\s+loss\s+0\.25$", by_id, re.M)
    assert re.search(r"^\s+optimizer\s+sgd$", by_id, re.M)
    outputs = expkit_workspace.run_dir("test_1") / "outputs"
    digest = hashlib.sha256((outputs / "model.pt").read_bytes()).hexdigest()
    assert re.search(rf"^\s+model\.pt\s.*sha256:{digest[:16]}$", by_id, re.M), by_id
    assert re.search(r"^\s+sub/notes\.txt\s", by_id, re.M)

    failed = ok(expkit_cli("runs", "show", "latest"))
    assert re.search(r"^state\s+failed$", failed, re.M)
    assert re.search(r"^exit code\s+3$", failed, re.M)
    assert re.search(r"^error\s+run: the script exited with code 3", failed, re.M)


def test_runs_show_json(expkit_cli, expkit_workspace, two_runs):
    details = json.loads(ok(expkit_cli("runs", "show", "test_1", "--json")))
    assert details["id"] == "test_1"
    assert details["state"] == "completed"
    assert details["metrics"] == {"acc": 0.9, "loss": 0.25}
    assert details["tags"] == {"optimizer": "sgd"}
    assert details["stages"]["run"]["state"] == "completed"
    model = (expkit_workspace.run_dir("test_1") / "outputs" / "model.pt").read_bytes()
    assert details["outputs"]["model.pt"] == {
        "size": len(model),
        "sha256": hashlib.sha256(model).hexdigest(),
    }
    failed = json.loads(ok(expkit_cli("runs", "show", "test_2", "--json")))
    assert failed["state"] == "failed"
    assert failed["exit_code"] == 3
    assert "exited with code 3" in failed["error"]


def test_runs_logs_gives_the_exact_bytes(expkit_cli, expkit_workspace, write_job):
    script = """
        import sys

        print("first line", flush=True)
        sys.stdout.buffer.write(b"caf\\xe9 au lait\\n")
        sys.stdout.flush()
        print("last line", flush=True)
    """
    ok(expkit_cli("run", str(write_job({}, script=script))))
    result = subprocess.run(
        [sys.executable, "-m", "expkit", "runs", "logs", "test_1"],
        capture_output=True,
        env={**os.environ, "EXPKIT_WORKSPACE": str(expkit_workspace.path)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"first line\ncaf\xe9 au lait\nlast line\n"


def test_runs_logs_of_a_missing_rank_exits_2(expkit_cli, two_runs):
    result = expkit_cli("runs", "logs", "test_1", "--rank", "1")
    assert result.returncode == 2
    assert "no output for rank 1" in result.stderr


def test_runs_files_lists_outputs_and_logs(expkit_cli, two_runs):
    names = ok(expkit_cli("runs", "files", "test_1")).splitlines()
    assert names == ["logs/rank-0.log", "outputs/model.pt", "outputs/sub/notes.txt"]


def test_runs_download_to_a_file_and_into_a_folder(
    expkit_cli, expkit_workspace, two_runs, tmp_path
):
    outputs = expkit_workspace.run_dir("test_1") / "outputs"

    target = tmp_path / "downloads" / "copy.pt"
    out = ok(expkit_cli("runs", "download", "test_1", "outputs/model.pt", str(target)))
    assert target.read_bytes() == (outputs / "model.pt").read_bytes() == b"weights\x00\x01"
    assert str(target) in out

    folder = tmp_path / "folder"
    folder.mkdir()
    ok(expkit_cli("runs", "download", "test_1", "outputs/sub/notes.txt", str(folder)))
    assert (folder / "notes.txt").read_text() == "notes\n"


def test_download_of_a_missing_name_exits_2(expkit_cli, two_runs, tmp_path):
    result = expkit_cli("runs", "download", "test_1", "outputs/nope.pt", str(tmp_path / "x"))
    assert result.returncode == 2
    assert "no file 'outputs/nope.pt'" in result.stderr
    assert not (tmp_path / "x").exists()


def test_metrics_all_and_one_name(expkit_cli, two_runs):
    rows = [line.split()[:3] for line in ok(expkit_cli("metrics", "test_1")).splitlines()]
    assert rows == [
        ["METRIC", "STEP", "VALUE"],
        ["acc", "0", "0.5"],
        ["acc", "1", "0.9"],
        ["loss", "-", "0.25"],
    ]
    rows = [line.split()[:3] for line in ok(expkit_cli("metrics", "test_1", "acc")).splitlines()]
    assert rows == [["METRIC", "STEP", "VALUE"], ["acc", "0", "0.5"], ["acc", "1", "0.9"]]
    assert "no metrics" in ok(expkit_cli("metrics", "test_2"))


@pytest.mark.parametrize(
    "command",
    [
        ["runs", "show", "nope_9"],
        ["runs", "logs", "nope_9"],
        ["runs", "files", "nope_9"],
        ["runs", "cancel", "nope_9"],
        ["runs", "download", "nope_9", "outputs/x", "dest"],
        ["metrics", "nope_9"],
    ],
)
def test_an_unknown_run_exits_2(expkit_cli, command):
    result = expkit_cli(*command)
    assert result.returncode == 2
    assert "no run 'nope_9'" in result.stderr


# -- following a run ------------------------------------------------------------------------
def test_logs_follow_prints_lines_as_they_come_and_ends_with_the_run(
    background, write_job, tmp_path
):
    go = tmp_path / "go"
    job = write_job({"args": [str(go)]}, script=WAIT_FOR_GO)
    run = background("run", str(job))
    run.wait_for("waiting for the go file")

    follower = background("runs", "logs", "test_1", "--follow")
    follower.wait_for("waiting for the go file")
    assert follower.proc.poll() is None  # still following: the run goes on
    assert "got the go file" not in follower.output

    go.touch()
    follower.wait_for("got the go file")
    assert follower.wait() == 0
    assert run.wait() == 0
    out = follower.output
    assert out.index("waiting for the go file") < out.index("got the go file")
    assert "✓ run" in out
    assert out.index("got the go file") < out.index("▶ post-process")


def test_dry_run_prints_the_plan_and_starts_nothing(write_job, tmp_path):
    path = write_job(
        {"args": {"epochs": 2}, "resources": {"processes_per_node": 2}, "distributed": "torchrun"},
        script="print('hi')\n",
    )
    env = {**os.environ, "EXPKIT_WORKSPACE": ""}
    done = subprocess.run(
        [sys.executable, "-m", "expkit", "run", str(path), "--dry-run"],
        capture_output=True, text=True, cwd=tmp_path, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"dry run of {path} (nothing is started)"
    assert "compute local (local): 1 node x 2 processes, 0 GPUs per node" in done.stdout
    assert "distributed torchrun (torchrun): python train.py --epochs 2" in done.stdout
    assert not (tmp_path / ".expkit").exists()  # no workspace, no run


def test_dry_run_says_how_the_run_stage_retries_and_checkpoints(write_job, tmp_path):
    """A job with `retry:` and `checkpoints:`: the run stage's line says how many attempts,
    on what, the restarts in place and the checkpoint folder with its stop signal; a job
    without them says nothing of the kind."""
    path = write_job(
        {
            "resources": {"processes_per_node": 2},
            "distributed": "torchrun",
            "retry": {
                "max_attempts": 3,
                "on": ["preempted", {"exit_codes": [75]}],
                "backoff_seconds": 5,
                "in_place": 2,
            },
            "checkpoints": {"path": "./ckpt", "signal": "SIGUSR2", "grace_seconds": 20},
        },
        script="print('hi')\n",
    )
    env = {**os.environ, "EXPKIT_WORKSPACE": ""}
    done = subprocess.run(
        [sys.executable, "-m", "expkit", "run", str(path), "--dry-run"],
        capture_output=True, text=True, cwd=tmp_path, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (run,) = [line for line in done.stdout.splitlines() if line.startswith("  run ")]
    assert run.endswith(
        "python train.py; up to 3 attempts (retried on preempted, exit codes 75; 5s apart), "
        "2 restarts in place; checkpoints ckpt (SIGUSR2, 20s to write one)"
    ), run
    plain = write_job({}, script="print('hi')\n")
    done = subprocess.run(
        [sys.executable, "-m", "expkit", "run", str(plain), "--dry-run"],
        capture_output=True, text=True, cwd=tmp_path, env=env, check=False,
    )  # fmt: skip
    assert "attempt" not in done.stdout and "checkpoints" not in done.stdout


def test_dry_run_refuses_what_a_run_would_refuse(write_job, tmp_path):
    path = write_job({"compute": "nowhere"}, script="print('hi')\n")
    done = subprocess.run(
        [sys.executable, "-m", "expkit", "run", str(path), "--dry-run"],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith(f"expkit: error: {path}: compute: no compute target named")


def test_import_names_an_unknown_importer(expkit_cli):
    done = expkit_cli("import-nosuch", "train.py:estimator")
    assert done.returncode == 2
    assert "FROM: no job importer named 'nosuch'" in done.stderr
