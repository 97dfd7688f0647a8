"""The Python API, used the way an Azure ML SDK v1 user would use it.

ws = Workspace.from_config()
run = Experiment(ws, "birds").submit(JobSpec.from_yaml("job.yaml"))
run.wait_for_completion(show_output=True)
model = run.register_model(model_name="pt-dnn", model_path="outputs/")
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import bare_env, eventually
from expkit import Experiment, JobSpec, Model, Run, Workspace
from expkit.api import RunFailed
from expkit.errors import UserError
from expkit.history import FINAL_STATES
from expkit.procs import process_start, run_processes, stop_run_processes

TRAIN = """
    import os
    import sys
    import time

    from expkit import Run

    run = Run.get_context()
    print("waiting for the go file", flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
    print("epoch 1 of 2", flush=True)
    run.log("acc", 0.5)
    print("epoch 2 of 2", flush=True)
    run.log("acc", 0.9)
    run.log("loss", 0.25)
    run.tag("optimizer", "sgd")
    os.makedirs("outputs", exist_ok=True)
    with open("outputs/model.pt", "wb") as f:
        f.write(b"weights\\x00\\xff")
"""

FOREVER = """
    import time

    print("training forever", flush=True)
    while True:
        time.sleep(0.1)
"""


@pytest.fixture(autouse=True)
def no_runs_left_behind(expkit_workspace):
    """Whatever a failing test leaves running in its workspace is stopped at the end."""
    yield
    history = expkit_workspace.history
    for record in history.runs.recent(limit=1000):
        if record.finished:
            continue
        pid = record.driver_pid
        if pid and record.driver_start and process_start(pid) == record.driver_start:
            os.kill(pid, signal.SIGKILL)
        stop_run_processes(record.id, grace=1, workspace=expkit_workspace.path)


def wait_for_output(run: Run, text: str, timeout: float = 30) -> None:
    """Wait until the run's script has printed `text` (it is running)."""
    log = run.run_dir / "logs" / "rank-0.log"
    deadline = time.monotonic() + timeout
    while not (log.exists() and text.encode() in log.read_bytes()):
        assert run.get_status() not in FINAL_STATES, run.get_details()
        assert time.monotonic() < deadline, f"{text!r} never appeared"
        time.sleep(0.05)


@pytest.fixture
def job_file(write_job, tmp_path):
    """A job spec whose script waits for `tmp_path / "go"`, then logs and writes a model."""
    return write_job({"args": [str(tmp_path / "go")]}, script=TRAIN)


# -- finding the workspace ------------------------------------------------------------------
def test_from_config_finds_the_workspace(expkit_workspace, tmp_path, monkeypatch):
    project = expkit_workspace.path.parent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # $EXPKIT_WORKSPACE (set by the fixture), from any folder.
    monkeypatch.chdir(elsewhere)
    assert Workspace.from_config().path == expkit_workspace.path

    # A path: the project folder or its .expkit folder.
    monkeypatch.delenv("EXPKIT_WORKSPACE")
    assert Workspace.from_config(project).path == expkit_workspace.path
    assert Workspace.from_config(str(expkit_workspace.path)).path == expkit_workspace.path

    # The current folder or one of its parents.
    sub = project / "training" / "nested"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    assert Workspace.from_config().path == expkit_workspace.path

    monkeypatch.chdir(elsewhere)
    with pytest.raises(UserError, match="expkit init"):
        Workspace.from_config()


# -- submitting and following a run ---------------------------------------------------------
def test_submit_returns_at_once_and_wait_shows_the_run(
    expkit_workspace, job_file, tmp_path, capsys
):
    experiment = Experiment(expkit_workspace, "birds")
    run = experiment.submit(JobSpec.from_yaml(job_file))

    # The script waits for the go file, so the run cannot have ended yet.
    assert run.get_status() not in FINAL_STATES
    assert run.id == "birds_1"
    assert run.experiment == "birds"

    (tmp_path / "go").touch()
    details = run.wait_for_completion(show_output=True, timeout=60)
    assert details["state"] == "completed"
    assert details["experiment"] == "birds"
    assert details["exit_code"] == 0
    assert [details["stages"][s]["state"] for s in ("prepare", "scale", "run", "post-process")] == [
        "completed"
    ] * 4

    out = capsys.readouterr().out
    order = [
        out.index("▶ prepare"),
        out.index("▶ scale"),
        out.index("▶ run"),
        out.index("waiting for the go file"),
        out.index("epoch 1 of 2"),
        out.index("epoch 2 of 2"),
        out.index("✓ run"),
        out.index("▶ post-process"),
        out.index("✓ post-process"),
    ]
    assert order == sorted(order), out
    assert out.count("epoch 1 of 2") == 1

    assert run.get_status() == "completed"
    assert run.get_metrics() == {"acc": [0.5, 0.9], "loss": 0.25}
    assert run.get_metrics("loss") == {"loss": 0.25}
    assert run.get_tags() == {"optimizer": "sgd"}
    assert run.get_file_names() == ["logs/rank-0.log", "outputs/model.pt"]

    target = run.download_file("outputs/model.pt", output_file_path=tmp_path / "copy.pt")
    assert target == tmp_path / "copy.pt"
    assert target.read_bytes() == b"weights\x00\xff"
    with pytest.raises(UserError, match="no file"):
        run.download_file("outputs/missing.pt", tmp_path / "missing.pt")

    log = tmp_path / "log.txt"
    run.download_file("logs/rank-0.log", log)
    assert b"epoch 2 of 2\n" in log.read_bytes()


def test_register_model_makes_numbered_versions(run_job, expkit_workspace, tmp_path):
    result = run_job(
        {},
        script="""
            import os
            from expkit import Run
            Run.get_context().log("acc", 0.75)
            os.makedirs("outputs", exist_ok=True)
            with open("outputs/model.pt", "wb") as f:
                f.write(b"weights")
        """,
    )
    run = result.run
    first = run.register_model(model_name="pt-dnn", model_path="outputs/")
    assert isinstance(first, Model)
    assert (first.name, first.version) == ("pt-dnn", 1)
    assert list(first.files) == ["model.pt"]
    assert first.lineage["run_id"] == run.id
    assert first.lineage["metrics"] == {"acc": 0.75}

    second = run.register_model(model_name="pt-dnn", model_path="outputs/model.pt")
    assert second.version == 2
    assert Model(expkit_workspace, "pt-dnn").version == 2
    assert Model(expkit_workspace, "pt-dnn", 1).files == first.files

    written = second.download(tmp_path / "model")
    assert [p.read_bytes() for p in written] == [b"weights"]

    with pytest.raises(UserError, match="inside outputs/"):
        run.register_model(model_name="pt-dnn", model_path="logs/rank-0.log")


def test_experiment_get_runs_newest_first(run_job, expkit_workspace):
    script = "print('hi')\n"
    ids = [run_job({"experiment": "alpha"}, script=script).record.id for _ in range(2)]
    run_job({"experiment": "beta"}, script=script)
    runs = Experiment(expkit_workspace, "alpha").get_runs()
    assert [r.id for r in runs] == list(reversed(ids))
    assert all(isinstance(r, Run) and r.experiment == "alpha" for r in runs)
    assert Experiment(expkit_workspace, "gamma").get_runs() == []


# -- failing and canceled runs --------------------------------------------------------------
def test_a_failing_job_raises_run_failed(expkit_workspace, write_job):
    job = write_job({}, script="import sys\nprint('bad data', flush=True)\nsys.exit(3)\n")
    run = Experiment(expkit_workspace, "broken").submit(JobSpec.from_yaml(job))

    with pytest.raises(RunFailed, match="exited with code 3") as failure:
        run.wait_for_completion(timeout=60)
    assert run.id in str(failure.value)

    details = run.wait_for_completion(raise_on_error=False)
    assert details["state"] == "failed"
    assert details["exit_code"] == 3
    assert "bad data" in details["error"]
    assert run.get_status() == "failed"


def test_cancel_stops_a_long_run(expkit_workspace, write_job):
    job = write_job({}, script=FOREVER)
    run = Experiment(expkit_workspace, "long").submit(JobSpec.from_yaml(job))
    wait_for_output(run, "training forever")
    assert run.get_status() == "running"

    run.cancel()
    details = run.wait_for_completion(raise_on_error=False, timeout=30)
    assert details["state"] == "canceled"
    assert details["stages"]["run"]["state"] == "canceled"
    assert run_processes(run.id, expkit_workspace.path) == []
    with pytest.raises(RunFailed, match="canceled"):
        run.wait_for_completion()


def test_waiting_on_a_run_whose_driver_was_killed_ends_failed(expkit_workspace, write_job):
    job = write_job({}, script=FOREVER)
    run = Experiment(expkit_workspace, "lost").submit(JobSpec.from_yaml(job))
    wait_for_output(run, "training forever")

    os.kill(expkit_workspace.history.runs.get(run.id).driver_pid, signal.SIGKILL)
    details = run.wait_for_completion(raise_on_error=False, timeout=30)
    assert details["state"] == "failed"
    assert "driver process" in details["error"]
    eventually(
        lambda: not run_processes(run.id, expkit_workspace.path),
        timeout=10,
        what="the script ending with its driver",
    )


def test_an_experiment_name_that_is_no_valid_name_is_refused(expkit_workspace, job_file):
    with pytest.raises(UserError, match="experiment"):
        Experiment(expkit_workspace, "../escape").submit(JobSpec.from_yaml(job_file))
    assert expkit_workspace.history.runs.recent() == []


def test_the_run_goes_on_when_the_submitting_process_exits(expkit_workspace, job_file, tmp_path):
    submitter = textwrap.dedent(
        """
        import sys
        from expkit import Experiment, JobSpec, Workspace

        ws = Workspace.from_config()
        run = Experiment(ws, "detached").submit(JobSpec.from_yaml(sys.argv[1]))
        print(run.id)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", submitter, str(job_file)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EXPKIT_WORKSPACE": str(expkit_workspace.path)},
    )
    assert done.returncode == 0, done.stderr
    run = Run(expkit_workspace, done.stdout.strip())
    assert run.get_status() not in FINAL_STATES  # its script still waits for the go file

    (tmp_path / "go").touch()
    details = run.wait_for_completion(timeout=60)
    assert details["state"] == "completed"
    assert run.get_metrics()["loss"] == 0.25


# -- the in-script API ----------------------------------------------------------------------
def test_get_context_in_a_script_knows_its_run(run_job):
    result = run_job(
        {},
        script="""
            import os
            from expkit import Run

            run = Run.get_context()
            os.makedirs("outputs", exist_ok=True)
            with open("outputs/id.txt", "w") as f:
                f.write(str(run.id))
        """,
    )
    assert result.state == "completed"
    assert (result.run_dir / "outputs" / "id.txt").read_text() == result.record.id


def test_get_context_outside_expkit_records_nothing_and_does_no_harm(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "from expkit import Run\n"
        "run = Run.get_context()\n"
        "run.log('acc', 1.0)\n"
        "print(run.id, run.offline)\n"
    )
    env = bare_env()
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "None True\n"
    assert "not running under expkit" in done.stderr


def test_get_params_gives_the_jobs_args_and_what_the_script_logged(run_job):
    script = """
        from expkit import Run

        Run.get_context().log_params({"optimizer": "sgd", "lr": 0.05})
    """
    result = run_job({"args": {"lr": 0.1, "epochs": 2, "--fast": True}}, script=script)

    assert result.state == "completed"
    # the script's lr replaced the job's, and is listed after the job's parameters
    assert list(result.run.get_params().items()) == [
        ("epochs", "2"),
        ("fast", "true"),
        ("optimizer", "sgd"),
        ("lr", "0.05"),
    ]
    details = result.run.get_details()
    assert details["params"] == result.run.get_params()
    assert details["param_sources"] == {
        "epochs": "job",
        "fast": "job",
        "optimizer": "script",
        "lr": "script",
    }
    assert Run(result.workspace, result.record.id).get_params() == result.run.get_params()
