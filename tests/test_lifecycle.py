"""Every stage of one run on the local target: prepare, scale, run, post-process, register.

Each test runs a real job (a tiny script in a source folder) through the real lifecycle and
looks at what a user would: the run record, the stage rows, the output, the files on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import alive, read_only
from expkit.history import STAGES
from expkit.leases import Leases
from expkit.procs import run_processes
from expkit.workspace import Workspace

# The script writes what it saw into ./outputs, which the run keeps.
WRITE_JSON = """
import json, os
def save(name, value):
    os.makedirs("outputs", exist_ok=True)
    with open(os.path.join("outputs", name), "w") as f:
        json.dump(value, f)
"""


def stages(result) -> dict:
    return {s.stage: s for s in result.workspace.history.stages.of(result.record.id)}


def seen(result, name: str = "seen.json"):
    return json.loads((result.run_dir / "outputs" / name).read_text())


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# -- prepare: the source snapshot ---------------------------------------------------------------
def test_snapshot_is_frozen_into_the_run_with_its_hash(run_job):
    result = run_job(
        {},
        script="print('training')\n",
        files={"lib/helpers.py": "X = 1\n", "config.yaml": "lr: 0.1\n"},
    )

    assert result.state == "completed"
    snapshot = result.run_dir / "snapshot"
    assert files_under(snapshot) == {"train.py", "lib/helpers.py", "config.yaml"}
    assert (snapshot / "lib" / "helpers.py").read_text() == "X = 1\n"
    assert all(read_only(p) for p in snapshot.rglob("*") if p.is_file())
    assert len(result.record.snapshot_hash) == 64
    assert re.search(  # a fresh workspace: each file read and hashed
        rf"3 files, 32 B, 3 re-hashed, \d+\.\d\ds \(hash {result.record.snapshot_hash[:16]}\)",
        result.output,
    )


def test_same_source_gives_same_snapshot_hash_and_a_change_gives_another(run_job, tmp_path):
    source = tmp_path / "project"
    source.mkdir()
    (source / "train.py").write_text("print('v1')\n")
    (source / "data.csv").write_text("a,b\n1,2\n")
    spec = {"source_directory": str(source)}

    first = run_job(spec)
    again = run_job(spec)
    (source / "data.csv").write_text("a,b\n1,3\n")
    changed = run_job(spec)

    assert first.record.snapshot_hash == again.record.snapshot_hash
    assert changed.record.snapshot_hash != first.record.snapshot_hash
    # The earlier run's snapshot still holds what it ran with.
    assert (first.run_dir / "snapshot" / "data.csv").read_text() == "a,b\n1,2\n"
    assert (changed.run_dir / "snapshot" / "data.csv").read_text() == "a,b\n1,3\n"


def test_expkitignore_and_always_ignored_folders_stay_out_of_the_snapshot(run_job):
    result = run_job(
        {},
        script="print('ok')\n",
        files={
            ".expkitignore": "# large things\n*.ckpt\nscratch/\n*.log\n!keep.log\n",
            "model.ckpt": "weights",
            "sub/old.ckpt": "weights",
            "scratch/notes.txt": "temp",
            "debug.log": "noise",
            "keep.log": "wanted",
            "pkg/mod.py": "Y = 2\n",
            "pkg/__pycache__/mod.cpython-311.pyc": "bytecode",
            ".git/HEAD": "ref: refs/heads/main\n",
        },
    )

    assert result.state == "completed"
    assert files_under(result.run_dir / "snapshot") == {
        "train.py",
        ".expkitignore",
        "keep.log",
        "pkg/mod.py",
    }


def test_working_copy_is_writable_and_leaves_the_snapshot_alone(run_job):
    result = run_job(
        {},
        script=WRITE_JSON
        + """
with open("config.txt", "a") as f:
    f.write("changed by the script\\n")
with open("new.txt", "w") as f:
    f.write("new")
save("seen.json", {"config": open("config.txt").read()})
""",
        files={"config.txt": "original\n"},
    )

    assert result.state == "completed", result.output
    assert seen(result) == {"config": "original\nchanged by the script\n"}
    snapshot = result.run_dir / "snapshot"
    assert (snapshot / "config.txt").read_text() == "original\n"
    assert not (snapshot / "new.txt").exists()


# -- prepare: the environment --------------------------------------------------------------------
def test_inherit_environment_runs_the_script_with_this_interpreter(run_job):
    result = run_job(
        {"environment": "inherit"},
        script=WRITE_JSON + "import sys\nsave('seen.json', sys.executable)\n",
    )

    assert result.state == "completed", result.output
    assert os.path.realpath(seen(result)) == os.path.realpath(sys.executable)
    version = sys.version.split()[0]
    assert stages(result)["prepare"].message == (
        f"environment: this interpreter (Python {version}, inherit)"
    )
    assert result.record.environment_hash.startswith("inherit-")


PIP_SCRIPT = (
    WRITE_JSON
    + """
import sys
import yaml, expkit, tomli_w
save("seen.json", {"prefix": sys.prefix, "toml": tomli_w.dumps({"a": 1})})
"""
)


def test_pip_environment_is_built_once_then_found_in_the_cache(run_job, expkit_workspace):
    first = run_job({"environment": {"pip": ["tomli-w"]}}, script=PIP_SCRIPT)

    assert first.state == "completed", first.output
    env_hash = first.record.environment_hash
    assert env_hash.startswith("pip-")
    env_dir = expkit_workspace.envs_dir / env_hash
    assert env_dir.is_dir()
    # The script ran in that venv, saw the listed package and this interpreter's packages.
    assert Path(seen(first)["prefix"]).resolve() == env_dir.resolve()
    assert seen(first)["toml"] == "a = 1\n"
    assert "environment cache miss" in first.output

    second = run_job({"environment": {"pip": ["tomli-w"]}}, script=PIP_SCRIPT)

    assert second.state == "completed", second.output
    assert second.record.environment_hash == env_hash
    assert f"environment cache hit ({env_hash})" in second.output
    assert stages(second)["prepare"].message == f"environment cache hit ({env_hash})"

    other = run_job({"environment": {"pip": ["tomli-w", "pyyaml"]}}, script=PIP_SCRIPT)

    assert other.state == "completed", other.output
    assert other.record.environment_hash != env_hash
    assert "environment cache miss" in other.output
    assert "cache hit" not in stages(other)["prepare"].message


def test_failing_pip_install_fails_prepare_naming_the_package(run_job, tmp_path):
    empty_index = tmp_path / "empty-index"
    empty_index.mkdir()
    package = "expkit-test-no-such-package"
    result = run_job(
        {
            "environment": {
                "builder": "pip",
                "packages": [package],
                # A local, empty index: the install fails without asking any registry.
                "options": {"index_url": empty_index.as_uri()},
            }
        },
        script="print('never runs')\n",
    )

    assert result.state == "failed"
    assert "\n" not in result.record.error
    assert result.record.error == (
        f"prepare: environment: could not install {package}: "
        f"ERROR: No matching distribution found for {package} (pip's output: the run's "
        "logs/prepare.log)"
    )
    log = (result.run_dir / "logs" / "prepare.log").read_text()
    assert f"ERROR: No matching distribution found for {package}" in log
    assert stages(result)["prepare"].state == "failed"
    assert "run" not in stages(result)
    assert stages(result)["post-process"].message == "the script never started"
    assert "never runs" not in result.output


# -- prepare: data inputs ------------------------------------------------------------------------
MAKE_DATA = """
import argparse, os
parser = argparse.ArgumentParser()
parser.add_argument("--out")
out = parser.parse_args().out
os.makedirs(out)
with open(os.path.join(out, "digits.txt"), "w") as f:
    f.write("0123456789")
with open({counter!r}, "a") as f:
    f.write("made\\n")
print("wrote digits")
"""

USE_DATA = (
    WRITE_JSON
    + """
import argparse, os
parser = argparse.ArgumentParser()
parser.add_argument("--data")
path = parser.parse_args().data
save("seen.json", {
    "arg": path,
    "expected": os.path.join(os.getcwd(), "data", "digits"),
    "link": os.path.islink("data/digits"),
    "target": os.path.realpath(path),
    "content": open(os.path.join(path, "digits.txt")).read(),
})
"""
)


def test_prepared_data_is_made_once_cached_and_linked_into_runs(
    run_job, expkit_workspace, tmp_path
):
    counter = tmp_path / "made.txt"
    spec = {
        "data": {"digits": {"prepare": "python make.py --out {dest}"}},
        "args": {"data": "${data.digits}"},
    }
    files = {"make.py": MAKE_DATA.format(counter=str(counter))}

    first = run_job(spec, script=USE_DATA, files=files)
    second = run_job(spec, script=USE_DATA, files=files)

    for result in (first, second):
        assert result.state == "completed", result.output
        view = seen(result)
        assert view["arg"] == view["expected"]
        assert view["link"] is True
        assert Path(view["target"]).parent == expkit_workspace.data_dir
        assert Path(view["target"]).name.startswith("digits-")
        assert view["content"] == "0123456789"
    assert counter.read_text() == "made\n"
    assert "data 'digits': cache miss" in first.output
    assert "data 'digits': wrote digits" not in first.output  # the command's output: in
    log = (first.run_dir / "logs" / "prepare.log").read_text()  # the run's log
    assert "data 'digits': wrote digits" in log
    assert "data 'digits': cache hit" in second.output


MAKE_DATA_TOGETHER = """
import argparse, os, time
parser = argparse.ArgumentParser()
parser.add_argument("--out")
out = parser.parse_args().out
os.makedirs(out)
with open(os.path.join({meet!r}, str(os.getpid())), "w"):
    pass
deadline = time.time() + 60
while len(os.listdir({meet!r})) < 2 and time.time() < deadline:  # both runs are preparing
    time.sleep(0.05)
with open(os.path.join(out, "digits.txt"), "w") as f:
    f.write("0123456789")
"""


def test_two_runs_preparing_the_same_data_at_once_both_complete(tmp_path):
    # A sweep's first trials in a fresh workspace: both miss the cache and prepare the data;
    # the second to finish uses the first one's copy instead of failing its prepare.
    meet = tmp_path / "meet"
    meet.mkdir()
    source = tmp_path / "src"
    source.mkdir()
    (source / "make.py").write_text(MAKE_DATA_TOGETHER.format(meet=str(meet)))
    (source / "train.py").write_text(
        "import sys\nprint(open(sys.argv[2] + '/digits.txt').read())\n"
    )
    job = tmp_path / "job.yaml"
    job.write_text(
        "experiment: test\nsource_directory: src\nentry_script: train.py\n"
        "data: {digits: {prepare: 'python make.py --out {dest}'}}\n"
        "args: {data: '${data.digits}'}\n"
    )
    command = [sys.executable, "-m", "expkit", "run", str(job)]
    subprocess.run([sys.executable, "-m", "expkit", "init", str(tmp_path / "ws")], check=True)
    env = {**os.environ, "EXPKIT_WORKSPACE": str(tmp_path / "ws" / ".expkit")}
    runs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300)[0].decode() for run in runs]

    assert [run.returncode for run in runs] == [0, 0], outputs
    assert len(os.listdir(meet)) == 2  # both prepared at once
    assert all("0123456789" in output for output in outputs)
    cached = list((tmp_path / "ws" / ".expkit" / "data").glob("digits-*"))
    assert len(cached) == 1 and (cached[0] / "digits.txt").read_text() == "0123456789"


def test_data_source_folder_in_copy_mode_is_copied(run_job, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("original")
    result = run_job(
        {"data": {"raw": {"source": str(raw), "mode": "copy"}}, "args": ["${data.raw}"]},
        script=WRITE_JSON
        + """
import sys, os
path = sys.argv[1]
link = os.path.islink(path)
with open(os.path.join(path, "a.txt"), "a") as f:
    f.write(" + edited in the run")
save("seen.json", {"link": link, "content": open(os.path.join(path, "a.txt")).read()})
""",
    )

    assert result.state == "completed", result.output
    assert seen(result) == {"link": False, "content": "original + edited in the run"}
    assert (raw / "a.txt").read_text() == "original"


# -- scale ----------------------------------------------------------------------------------------
HOLDERS_SCRIPT = (
    WRITE_JSON
    + """
import os, sys
from expkit.leases import Leases
from expkit.workspace import Workspace
history = Workspace(os.environ["EXPKIT_WORKSPACE"]).history
save("seen.json", Leases(history).holders("process"))
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""
)


def test_slots_are_held_during_the_run_and_released_after_success_or_failure(run_job):
    spec = {"compute": {"target": "local", "options": {"slots": 1}}}

    ok = run_job(spec, script=HOLDERS_SCRIPT)
    history = ok.workspace.history
    failed = run_job({**spec, "args": ["4"]}, script=HOLDERS_SCRIPT)
    after = run_job(spec, script=HOLDERS_SCRIPT)

    assert ok.state == "completed", ok.output
    assert seen(ok) == {ok.record.id: 1}
    assert failed.state == "failed"
    assert seen(failed) == {failed.record.id: 1}
    # The only slot came back both times, so the third run got it without waiting.
    assert after.state == "completed", after.output
    assert seen(after) == {after.record.id: 1}
    assert Leases(history).holders("process") == {}


# -- run ------------------------------------------------------------------------------------------
def test_script_output_is_kept_byte_for_byte(run_job):
    result = run_job(
        {},
        script=r"""
import os
os.write(1, b"plain line\n")
os.write(2, b"to stderr\n")
os.write(1, b"latin-1 \xe9t\xe9 and junk \xff\xfe\n")
os.write(1, "unicode \u2713\n".encode())
os.write(1, b"carriage\rreturn\n")
os.write(1, b"last line without newline")
""",
    )

    assert result.state == "completed", result.output
    log = (result.run_dir / "logs" / "rank-0.log").read_bytes()
    assert log == (
        b"plain line\n"
        b"to stderr\n"
        b"latin-1 \xe9t\xe9 and junk \xff\xfe\n"
        b"unicode \xe2\x9c\x93\n"
        b"carriage\rreturn\n"
        b"last line without newline"
    )
    assert "plain line" in result.output
    assert "to stderr" in result.output


def test_script_gets_the_run_variables_and_runs_in_the_working_copy(run_job, expkit_workspace):
    result = run_job(
        {},
        script=WRITE_JSON
        + """
import os
save("seen.json", {
    "cwd": os.getcwd(),
    "vars": {k: v for k, v in os.environ.items() if k.startswith("EXPKIT_")},
    "unbuffered": os.environ.get("PYTHONUNBUFFERED"),
})
""",
    )

    assert result.state == "completed", result.output
    view = seen(result)
    run_dir = result.run_dir
    assert view["cwd"] == str(run_dir / "work")
    assert view["vars"]["EXPKIT_RUN_ID"] == result.record.id
    assert view["vars"]["EXPKIT_RUN_DIR"] == str(run_dir)
    assert view["vars"]["EXPKIT_WORKSPACE"] == str(expkit_workspace.path)
    assert view["vars"]["EXPKIT_METRICS_DIR"] == str(run_dir / "metrics")
    assert view["unbuffered"] == "1"


def test_timeout_stops_the_script_and_fails_the_run(run_job):
    result = run_job(
        {"timeout": 1},
        script="import time\nprint('started', flush=True)\ntime.sleep(60)\n",
    )

    assert result.state == "failed"
    assert result.record.error == (
        "run: timed out after 1s (the job's `timeout`); "
        "still running: rank 0 (last output: started)"
    )
    assert stages(result)["run"].state == "failed"
    assert stages(result)["post-process"].state == "completed"
    assert "started" in result.output
    assert run_processes(result.record.id, result.workspace.path) == []


@pytest.mark.parametrize("own_session", [False, True], ids=["same-group", "daemonized"])
def test_background_processes_of_the_script_do_not_outlive_the_run(run_job, own_session):
    result = run_job(
        {},
        script=WRITE_JSON
        + f"""
import subprocess
child = subprocess.Popen(["sleep", "60"], start_new_session={own_session})
save("seen.json", child.pid)
print("left a child behind")
""",
    )

    assert result.state == "completed", result.output
    assert run_processes(result.record.id, result.workspace.path) == []
    assert not alive(seen(result))


# -- a failing script -----------------------------------------------------------------------------
def test_failing_script_records_exit_code_and_keeps_its_outputs(run_job):
    result = run_job(
        {"model": {"name": "never-registered"}},
        script="""
import os, sys
os.makedirs("outputs", exist_ok=True)
with open("outputs/checkpoint-6.pt", "w") as f:
    f.write("partial weights")
print("epoch 6 done")
print("loss went NaN at step 7")
sys.exit(3)
""",
    )

    assert result.state == "failed"
    assert result.record.exit_code == 3
    assert "exited with code 3" in result.record.error
    assert "loss went NaN at step 7" in result.record.error
    by_stage = stages(result)
    assert by_stage["run"].state == "failed"
    assert by_stage["post-process"].state == "completed"
    assert by_stage["register"].state == "skipped"
    assert by_stage["register"].message == "run failed"
    outputs = result.workspace.history.outputs.of(result.record.id)
    assert list(outputs) == ["checkpoint-6.pt"]
    assert (result.run_dir / "outputs" / "checkpoint-6.pt").read_text() == "partial weights"
    assert result.workspace.history.models.versions() == []


def test_script_killed_by_a_signal_says_which(run_job):
    result = run_job(
        {},
        script="import os, signal\nprint('about to die')\nos.kill(os.getpid(), signal.SIGKILL)\n",
    )

    assert result.state == "failed"
    assert result.record.exit_code == -9
    assert "killed by SIGKILL" in result.record.error
    assert "about to die" in result.record.error


# -- post-process ---------------------------------------------------------------------------------
def test_outputs_are_sealed_with_a_manifest_and_logs_collected(run_job):
    result = run_job(
        {},
        script="""
import os
os.makedirs("outputs/eval", exist_ok=True)
with open("outputs/model.pt", "wb") as f:
    f.write(bytes(range(256)) * 40)
with open("outputs/eval/report.json", "w") as f:
    f.write('{"acc": 0.9}')
os.makedirs("logs", exist_ok=True)
with open("logs/train.log", "w") as f:
    f.write("step 1 loss 0.5\\n")
with open("logs/rank-0.log", "w") as f:
    f.write("the script's own rank-0.log\\n")
print("done")
""",
    )

    assert result.state == "completed", result.output
    run_dir = result.run_dir
    outputs = result.workspace.history.outputs.of(result.record.id)
    assert set(outputs) == {"model.pt", "eval/report.json"}
    for rel, (size, digest) in outputs.items():
        path = run_dir / "outputs" / rel
        assert path.stat().st_size == size
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
        assert read_only(path)
    assert outputs["model.pt"][0] == 256 * 40
    # The script's own logs join the run's; a name clash keeps both.
    assert (run_dir / "logs" / "train.log").read_text() == "step 1 loss 0.5\n"
    assert (run_dir / "logs" / "rank-0.log").read_text() == "done\n"
    assert (run_dir / "logs" / "script-rank-0.log").read_text() == "the script's own rank-0.log\n"
    assert result.run.get_file_names() == [
        "logs/rank-0.log",
        "logs/script-rank-0.log",
        "logs/train.log",
        "outputs/eval/report.json",
        "outputs/model.pt",
    ]
    assert not (run_dir / "work").exists()
    assert stages(result)["post-process"].message == "outputs 2 files, 10.3 KB"


# -- register -------------------------------------------------------------------------------------
WRITE_MODEL = """
import os, sys
os.makedirs("outputs/extra", exist_ok=True)
with open("outputs/model.pt", "w") as f:
    f.write("weights " + sys.argv[1])
with open("outputs/extra/vocab.txt", "w") as f:
    f.write("a b c")
"""


def test_model_folder_is_registered_as_version_1_then_2(run_job, expkit_workspace):
    spec = {"model": {"name": "m", "path": "outputs/"}}

    first = run_job({**spec, "args": ["one"]}, script=WRITE_MODEL)
    second = run_job({**spec, "args": ["two"]}, script=WRITE_MODEL)

    assert first.state == second.state == "completed"
    assert stages(first)["register"].message == "model m version 1"
    assert stages(second)["register"].message == "model m version 2"
    assert "registered m:2 (2 files, 16 B)" in second.output
    models = expkit_workspace.models_dir / "m"
    assert files_under(models / "1") == {"model.pt", "extra/vocab.txt"}
    assert (models / "1" / "model.pt").read_text() == "weights one"
    assert (models / "2" / "model.pt").read_text() == "weights two"
    rows = expkit_workspace.history.models.versions("m")
    assert [(r["version"], r["run_id"]) for r in rows] == [
        (1, first.record.id),
        (2, second.record.id),
    ]


def test_model_path_naming_one_file_registers_only_that_file(run_job, expkit_workspace):
    result = run_job(
        {"model": {"name": "weights-only", "path": "outputs/model.pt"}, "args": ["x"]},
        script=WRITE_MODEL,
    )

    assert result.state == "completed", result.output
    assert files_under(expkit_workspace.models_dir / "weights-only" / "1") == {"model.pt"}


def test_model_path_matching_nothing_fails_the_register_stage(run_job, expkit_workspace):
    result = run_job(
        {"model": {"name": "m", "path": "outputs/missing.pt"}, "args": ["x"]},
        script=WRITE_MODEL,
    )

    assert result.state == "failed"
    assert result.record.error == (
        "register: model.path 'outputs/missing.pt' matched no file in the run's outputs"
    )
    assert stages(result)["register"].state == "failed"
    assert stages(result)["run"].state == "completed"
    assert expkit_workspace.history.models.versions() == []


# -- the history as it happens ---------------------------------------------------------------------
def test_each_stage_transition_is_committed_before_the_next_stage(run_job):
    result = run_job(
        {},
        script=WRITE_JSON
        + """
import os
from expkit.workspace import Workspace
history = Workspace(os.environ["EXPKIT_WORKSPACE"]).history
run_id = os.environ["EXPKIT_RUN_ID"]
save("seen.json", {
    "state": history.runs.get(run_id).state,
    "snapshot_hash": history.runs.get(run_id).snapshot_hash,
    "stages": {s.stage: s.state for s in history.stages.of(run_id)},
})
""",
    )

    assert result.state == "completed", result.output
    assert seen(result) == {
        "state": "running",
        "snapshot_hash": result.record.snapshot_hash,
        "stages": {"prepare": "completed", "scale": "completed", "run": "running"},
    }
    assert [s.stage for s in result.workspace.history.stages.of(result.record.id)] == list(STAGES)


def test_run_whose_driver_died_is_marked_failed_when_the_workspace_is_opened(
    expkit_workspace,
):
    history = expkit_workspace.history
    record = history.runs.create("lifecycle", {"entry_script": "train.py"})
    history.stages.start(record.id, "prepare")
    dead = subprocess.Popen(["true"])
    dead.wait()
    history.runs.claim(record.id, dead.pid)  # as if that process had driven the run, then died

    reopened = Workspace(expkit_workspace.path).history
    after = reopened.runs.get(record.id)

    assert after.state == "failed"
    assert "driver process" in after.error
    assert f"pid {after.driver_pid}" in after.error
    assert {s.stage: s.state for s in reopened.stages.of(record.id)} == {"prepare": "failed"}
