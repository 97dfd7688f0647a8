"""The `mlflow` metric sink and model registry, read back through MLflow's own client.

Most tests run against a real `mlflow server` process on a loopback port (SQLite backend,
artifacts proxied by the server), the rest against the embedded default: SQLite inside the
workspace, no server.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from conftest import REPO, eventually
from expkit import metrics as metric_pipeline
from expkit_mlflow.tracking import HTTP_DEFAULTS

SCRIPT = """
import argparse, os, subprocess, sys, time
from expkit import Run

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float)
parser.add_argument("--epochs", type=int)
parser.add_argument("--exit", type=int, default=0)
parser.add_argument("--cancel", action="store_true")
args = parser.parse_args()

run = Run.get_context()
for step in range(COUNT):
    run.log("x", step * 0.5, step=step)
for epoch in range(args.epochs):
    run.log("loss", 1.0 / (epoch + 1), step=epoch)
for lap in range(3):
    run.log("lap", 7)  # no step, the same value: three points all the same
run.log("epochs", 12)
run.log("converged", True)
run.log("blew_up", float("nan"))
run.log("overflow", float("inf"))
run.log("note", "warmup")
run.log("note", "done")
run.log_row("per_class", cls=0, precision=0.9)
run.log_row("per_class", cls=1, precision=0.8)
run.log("bad name!", 1)
run.set_tags({"optimizer": "sgd"})
os.makedirs("outputs/sub", exist_ok=True)
with open("outputs/model.pt", "wb") as f:
    f.write(b"weights")
with open("outputs/sub/classes.json", "w") as f:
    f.write("[0, 1]")
os.makedirs("logs", exist_ok=True)
with open("logs/extra.txt", "w") as f:
    f.write("from the script")
print("trained", flush=True)
if args.cancel:
    run.flush()
    cancel = [sys.executable, "-m", "expkit", "runs", "cancel", os.environ["EXPKIT_RUN_ID"]]
    subprocess.run(cancel, check=True)
    time.sleep(120)
sys.exit(args.exit)
"""
COUNT = 2500  # "x": several log_batch calls of 1000, the last one partial


def script(count: int = COUNT) -> str:
    return SCRIPT.replace("COUNT", str(count))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(folder: Path, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real `mlflow server` on a loopback port while the block runs: SQLite backend in
    `folder`, artifacts served by it; its URL and its process."""
    port = port or free_port()
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner processes needed
    }
    log = open(folder / "server.log", "ab")  # noqa: SIM115 - closed at the end
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server"),
            *("--backend-store-uri", f"sqlite:///{folder / 'server.db'}"),
            *("--default-artifact-root", "mlflow-artifacts:/"),
            *("--artifacts-destination", str(folder / "artifacts")),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its workers go with it at the end
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start: {(folder / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.25)
        yield url, server
    finally:
        stop_server(server)
        log.close()


def stop_server(server: subprocess.Popen) -> None:
    """Stop a server `serving` started, with its workers (nothing if it is gone)."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a loopback port: SQLite backend, artifacts served by it."""
    with serving(tmp_path_factory.mktemp("mlflow-server")) as (url, _):
        yield url


@pytest.fixture(autouse=True)
def mlflow_env(monkeypatch):
    """No tracking URI from the environment unless a test sets one; no telemetry; and the
    variables the sink sets in its process (its HTTP retries) are gone after each test."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", *HTTP_DEFAULTS):
        monkeypatch.delenv(name, raising=False)  # a value set before is put back after
    yield
    for name in HTTP_DEFAULTS:
        os.environ.pop(name, None)


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(metric_pipeline, "RETRY_DELAYS", (0.01, 0.01))


def on_server(url: str, **spec) -> dict:
    return {"metrics": [{"name": "mlflow", "options": {"tracking_uri": url}}], **spec}


def mlflow_run(client: MlflowClient, result):
    """The MLflow run of an expkit run: found by its tag, and the one expkit recorded."""
    experiment = client.get_experiment_by_name(result.record.experiment)
    assert experiment is not None, result.output
    found = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`expkit.run_id` = '{result.record.id}'"
    )
    assert len(found) == 1
    assert result.run.get_tags()["mlflow.run_id"] == found[0].info.run_id
    return client.get_run(found[0].info.run_id)


def artifact_files(uri: str, mlflow_run_id: str, dest: Path) -> dict[str, bytes]:
    """Every artifact of the run, downloaded through MLflow: {relative path: content}."""
    folder = Path(download_artifacts(run_id=mlflow_run_id, dst_path=str(dest), tracking_uri=uri))
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def check_everything_arrived(result, client: MlflowClient, uri: str, tmp_path: Path):
    """The MLflow run holds what the run history holds, as the sink's docstring promises."""
    run = mlflow_run(client, result)
    run_id = run.info.run_id
    history = result.workspace.history
    assert run.info.run_name == result.record.id
    assert run.data.params == {"lr": "0.1", "epochs": "3"}
    tags = run.data.tags
    record = history.runs.get(result.record.id)
    assert tags["expkit.snapshot_hash"] == record.snapshot_hash
    assert tags["expkit.environment_hash"] == record.environment_hash
    assert tags["optimizer"] == "sgd"  # the script's tag
    assert tags["team"] == "vision"  # the job's tag
    for stage in history.stages.of(result.record.id):
        if stage.ended is not None:
            assert float(tags[f"expkit.stage.{stage.stage}.seconds"]) >= 0
    # every value of x with its step, and its timestamp
    x = client.get_metric_history(run_id, "x")
    assert sorted((m.step, m.value) for m in x) == [(s, s * 0.5) for s in range(COUNT)]
    logged = {r["step"]: r["ts"] for r in history.metrics.of(result.record.id, "x")}
    assert all(m.timestamp == int(logged[m.step] * 1000) for m in x)
    points = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in ("loss", "lap", "epochs", "converged", "overflow", "bad name_")
    }
    assert points == {
        "loss": [(0, 1.0), (1, 0.5), (2, 1.0 / 3)],
        "lap": [(0, 7.0), (1, 7.0), (2, 7.0)],  # no step: 0, 1, 2 in the order logged
        "epochs": [(0, 12.0)],
        "converged": [(0, 1.0)],
        "overflow": [(0, 1.7976931348623157e308)],  # MLflow's stand-in for infinity
        "bad name_": [(0, 1.0)],  # characters MLflow refuses become _
    }
    (nan,) = client.get_metric_history(run_id, "blew_up")
    assert math.isnan(nan.value)
    assert tags["expkit.metric.note"] == "done"  # strings: the latest value, as a tag
    files = artifact_files(uri, run_id, tmp_path / f"artifacts-{run_id}")
    assert files["outputs/model.pt"] == b"weights"
    assert files["outputs/sub/classes.json"] == b"[0, 1]"
    assert files["logs/extra.txt"] == b"from the script"
    assert b"trained" in files["logs/rank-0.log"]
    assert json.loads(files["metrics/per_class.json"]) == {
        "columns": ["cls", "precision"],
        "data": [[0, 0.9], [1, 0.8]],
    }
    return run


# -- against a real server -------------------------------------------------------------------------
def test_a_run_and_its_model_arrive_in_mlflow_on_a_server(mlflow_server, run_job, tmp_path):
    spec = on_server(
        mlflow_server,
        experiment="server-complete",
        args={"lr": 0.1, "epochs": 3},
        tags={"team": "vision"},
        model={"name": "digits-net", "registries": ["mlflow"], "tags": {"stage": "dev"}},
    )
    first = run_job(spec, script=script())
    second = run_job(spec, script=script(count=0))

    assert first.state == "completed", first.output
    assert "model registry 'mlflow': digits-net version 1" in first.output
    client = MlflowClient(tracking_uri=mlflow_server)
    run = check_everything_arrived(first, client, mlflow_server, tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.tags["expkit.state"] == "completed"
    assert run.info.end_time >= run.info.start_time == int(first.record.created * 1000)

    # the registered version: same number, the run's outputs, the lineage
    assert second.state == "completed", second.output
    for result, number in ((first, 1), (second, 2)):
        version = client.get_model_version("digits-net", str(number))
        mlflow_run_id = result.run.get_tags()["mlflow.run_id"]
        assert version.run_id == mlflow_run_id
        assert version.source == f"runs:/{mlflow_run_id}/outputs"
        assert version.tags["expkit.version"] == str(number)
        assert version.tags["expkit.run_id"] == result.record.id
        assert version.tags["expkit.snapshot_hash"] == result.record.snapshot_hash
        assert version.tags["expkit.environment_hash"] == result.record.environment_hash
        assert version.tags["expkit.entry_script"] == "train.py"
        assert version.tags["expkit.metrics.epochs"] == "12.0"
        assert version.tags["stage"] == "dev"
        assert (
            result.workspace.history.models.find("digits-net", number)["run_id"] == result.record.id
        )
    model_files = Path(
        download_artifacts(
            artifact_uri=client.get_model_version_download_uri("digits-net", "1"),
            dst_path=str(tmp_path / "model"),
            tracking_uri=mlflow_server,
        )
    )
    assert (model_files / "model.pt").read_bytes() == b"weights"
    assert (model_files / "sub" / "classes.json").read_text() == "[0, 1]"


@pytest.mark.parametrize(
    ("how", "state", "status"),
    [(["--exit", "3"], "failed", "FAILED"), (["--cancel"], "canceled", "KILLED")],
)
def test_a_failed_or_canceled_run_ends_with_the_matching_status(
    mlflow_server, run_job, tmp_path, how, state, status
):
    result = run_job(
        on_server(
            mlflow_server,
            experiment=f"server-{state}",
            args=["--lr", "0.1", "--epochs", "3", *how],
            tags={"team": "vision"},
        ),
        script=script(),
    )

    assert result.state == state, result.output
    client = MlflowClient(tracking_uri=mlflow_server)
    run = mlflow_run(client, result)
    assert run.info.status == status
    assert run.data.tags["expkit.state"] == state
    assert run.data.params == {"args": f"--lr 0.1 --epochs 3 {' '.join(how)}"}
    assert len(client.get_metric_history(run.info.run_id, "x")) == COUNT
    files = artifact_files(mlflow_server, run.info.run_id, tmp_path / "artifacts")
    assert files["outputs/model.pt"] == b"weights"  # kept whatever happened
    if state == "failed":
        assert run.data.tags["expkit.exit_code"] == "3"
        assert run.data.tags["expkit.error"].startswith("run: the script exited with code 3")
    else:
        assert run.data.tags["expkit.error"] == "run: canceled by the user"


def test_an_unreachable_server_is_reported_and_the_run_completes(run_job, quick_retries):
    nowhere = f"http://127.0.0.1:{free_port()}"

    result = run_job(on_server(nowhere, args={"lr": 0.1, "epochs": 3}), script=script(10))

    assert result.state == "completed", result.output
    (event,) = result.workspace.history.events.of(result.record.id, "sink-failed")
    assert event["message"].startswith("plugin mlflow, metric sink 'mlflow' open: ")
    assert f"warning: {event['message']}" in result.output
    assert len(result.run.get_metrics()["x"]) == 10  # the history has everything


def test_an_unreachable_required_server_fails_the_run(run_job, quick_retries):
    nowhere = f"http://127.0.0.1:{free_port()}"
    sink = {"name": "mlflow", "required": True, "options": {"tracking_uri": nowhere}}

    result = run_job(
        {"metrics": [sink], "args": {"lr": 0.1, "epochs": 3}, "model": {"name": "m"}},
        script=script(10),
    )

    assert result.state == "failed"
    assert result.record.error.startswith(
        "post-process: required plugin mlflow, metric sink 'mlflow' open: "
    )
    assert result.workspace.history.models.versions() == []


def test_a_short_run_is_all_in_mlflow_and_finished_when_expkit_run_returns(mlflow_server, run_job):
    """A script that ends long before mlflow is even imported: post-process waits for the
    sink to open and deliver, and close ends the MLflow run, before `expkit run` returns."""
    result = run_job(
        on_server(mlflow_server, experiment="server-short"),
        script="""
from expkit import Run
run = Run.get_context()
for step in range(50):
    run.log("loss", 1.0 / (step + 1), step=step)
""",
    )

    assert result.state == "completed", result.output
    assert "warning" not in result.output
    client = MlflowClient(tracking_uri=mlflow_server)
    run = mlflow_run(client, result)
    assert run.info.status == "FINISHED"
    points = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in points) == [(s, 1.0 / (s + 1)) for s in range(50)]
    (outcome,) = result.workspace.history.events.of(result.record.id, "sink-outcome")
    assert outcome["message"] == "mlflow ok (50 values)"


def test_a_server_that_goes_away_mid_run_is_reported_and_the_run_completes(
    write_job, expkit_workspace, background, tmp_path, quick_retries
):
    """The server dies after the first values arrived: the sink's next send fails after its
    retries, which the run's warnings and events say; the history keeps every value."""
    release = tmp_path / "release"
    folder = tmp_path / "server"
    folder.mkdir()
    with serving(folder) as (url, server):
        job = write_job(
            {**on_server(url, experiment="server-gone"), "args": [str(release)]},
            script="""
            import os, sys, time
            from expkit import Run
            run = Run.get_context()
            for step in range(10):
                run.log("x", step, step=step)
            run.flush()
            while not os.path.exists(sys.argv[1]):
                time.sleep(0.05)
            for step in range(10, 20):
                run.log("x", step, step=step)
            """,
        )
        live = background("run", str(job))
        history = expkit_workspace.history
        eventually(lambda: len(history.metrics.of(live.run_id)) == 10, what="10 values recorded")
        first = history.metrics.last_id(live.run_id)
        eventually(
            lambda: history.sink_cursors.get(live.run_id, "mlflow")[0] == first,
            timeout=120,
            what="the first values in MLflow",
        )
        stop_server(server)
        release.touch()
        code = live.wait(timeout=600)

    assert code == 0, live.output
    run_id = live.run_id
    assert history.runs.get(run_id).state == "completed"
    (event,) = history.events.of(run_id, "sink-failed")
    assert event["message"].startswith("plugin mlflow, metric sink 'mlflow' send: ")
    assert f"warning: {event['message']}" in live.output
    (outcome,) = history.events.of(run_id, "sink-outcome")
    assert outcome["message"].startswith("mlflow failed at send: ")
    assert [r["step"] for r in history.metrics.of(run_id, "x")] == list(range(20))
    # what arrived before the server went away is in its store, once
    with sqlite3.connect(folder / "server.db") as store:
        steps = [s for (s,) in store.execute("SELECT step FROM metrics WHERE key = 'x'")]
    assert sorted(steps) == list(range(10))


# -- the embedded default: SQLite in the workspace, no server -----------------------------------
def test_without_a_server_the_workspace_holds_an_mlflow_store(run_job, tmp_path):
    result = run_job(
        {
            "experiment": "embedded",
            "metrics": ["mlflow"],
            "args": {"lr": 0.1, "epochs": 3},
            "tags": {"team": "vision"},
            "model": {"name": "digits-net", "registries": ["mlflow"]},
        },
        script=script(),
    )

    assert result.state == "completed", result.output
    workspace = result.workspace.path
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    assert f"digits-net version 1 in {uri}" in result.output
    client = MlflowClient(tracking_uri=uri)
    run = check_everything_arrived(result, client, uri, tmp_path)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((workspace / "mlartifacts" / "embedded").as_uri())
    assert (workspace / "mlartifacts" / "embedded" / run.info.run_id / "artifacts").is_dir()
    version = client.get_model_version("digits-net", "1")
    assert version.source == f"runs:/{run.info.run_id}/outputs"
    assert version.tags["expkit.run_id"] == result.record.id


def test_a_registry_without_the_sink_and_numbering_that_diverged(run_job):
    model = {"name": "solo", "path": "outputs/model.pt"}
    before = run_job({"args": {"lr": 0.1, "epochs": 1}, "model": model}, script=script(0))
    result = run_job(
        {"args": {"lr": 0.1, "epochs": 1}, "model": {**model, "registries": ["mlflow"]}},
        script=script(0),
    )

    assert before.state == result.state == "completed", result.output
    assert result.workspace.history.models.find("solo", 2)["run_id"] == result.record.id
    assert (
        "model registry 'mlflow': solo version 1 in sqlite:///"
        in result.output  # MLflow had no version yet: it registers 1, and says why
    )
    assert "MLflow's numbering has diverged, this is expkit's version 2" in result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{result.workspace.path / 'mlflow.db'}")
    version = client.get_model_version("solo", "1")
    assert version.tags["expkit.version"] == "2"
    run = mlflow_run(client, result)  # made by the registry, as there is no sink
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "epochs": "1"}
    assert version.source == f"runs:/{run.info.run_id}/outputs/model.pt"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "outputs")] == [
        "outputs/model.pt",
        "outputs/sub",
    ]


def test_the_tracking_uri_comes_from_options_then_config_then_environment(
    run_job, expkit_workspace, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a SQLite URI without an artifact root: ./mlruns, MLflow's
    stores = {name: f"sqlite:///{tmp_path / f'{name}.db'}" for name in ("env", "config", "job")}
    spec = {"args": {"lr": 0.1, "epochs": 1}, "metrics": ["mlflow"]}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stores["env"])
    from_env = run_job(spec, script=script(3))
    config_file = expkit_workspace.path / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "mlflow": {"tracking_uri": stores["config"]}}))
    from_config = run_job(spec, script=script(3))
    sink = {"name": "mlflow", "options": {"tracking_uri": stores["job"]}}
    from_job = run_job({**spec, "metrics": [sink]}, script=script(3))

    for result, store in ((from_env, "env"), (from_config, "config"), (from_job, "job")):
        assert result.state == "completed", result.output
        client = MlflowClient(tracking_uri=stores[store])
        run = mlflow_run(client, result)
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "x")) == 3
        others = [client.search_runs([e.experiment_id]) for e in client.search_experiments()]
        assert sum(len(runs) for runs in others) == 1  # only that run went there
    assert not (expkit_workspace.path / "mlflow.db").exists()


def test_mlflow_is_imported_only_when_a_job_uses_it():
    code = (
        "import sys\n"
        "from expkit.plugins import get_plugins\n"
        "plugins = get_plugins()\n"
        "plugins.get('metric_sinks', 'mlflow')\n"
        "plugins.get('model_registries', 'mlflow')\n"
        "print('mlflow' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_without_mlflow_the_plugin_says_how_to_install_it(write_job, expkit_workspace):
    hide = "import sys\nsys.modules['mlflow'] = None  # as if it were not installed\n"
    job = write_job({"metrics": ["mlflow"]}, script="print('never')\n")
    code = hide + "from expkit.cli import main\nsys.exit(main(sys.argv[1:]))\n"

    listed = subprocess.run([sys.executable, "-c", code, "plugins"], capture_output=True, text=True)
    refused = subprocess.run(
        [sys.executable, "-c", code, "run", str(job)], capture_output=True, text=True
    )

    message = "mlflow is not installed; pip install 'expkit[mlflow]'"
    assert f"mlflow  (expkit 0.1.0)  not loaded: {message}" in listed.stdout
    assert refused.returncode == 2
    assert message in refused.stderr
    assert "metrics.0: no metric sink named 'mlflow'" in refused.stderr


# -- at scale, and the sample job --------------------------------------------------------------
@pytest.mark.slow
def test_a_million_values_reach_the_history_and_mlflow(run_job):
    count = 1_000_000
    result = run_job(
        {"metrics": ["mlflow"]},
        script=f"""
from expkit import Run
run = Run.get_context()
for i in range({count}):
    run.log("x", i, step=i)
""",
    )

    assert result.state == "completed", result.output
    metrics, steps, total, after = result.workspace.history.metrics, [], 0.0, 0
    while page := metrics.of(result.record.id, after_id=after, limit=100_000):  # values
        steps += [r["step"] for r in page]
        total += sum(r["value"] for r in page)
        after = page[-1]["id"]
    assert metrics.count(result.record.id) == len(steps) == count
    assert (steps == list(range(count)), total) == (True, count * (count - 1) / 2)
    mlflow_run_id = result.run.get_tags()["mlflow.run_id"]
    # Counted in MLflow's store: its client would page a million points through memory.
    with sqlite3.connect(result.workspace.path / "mlflow.db") as store:
        counted = store.execute(
            "SELECT COUNT(*), COUNT(DISTINCT step), MIN(step), MAX(step), SUM(value)"
            " FROM metrics WHERE run_uuid = ? AND key = 'x'",
            (mlflow_run_id,),
        ).fetchone()
    assert counted == (count, count, 0, count - 1, count * (count - 1) / 2)
    client = MlflowClient(tracking_uri=f"sqlite:///{result.workspace.path / 'mlflow.db'}")
    assert client.get_run(mlflow_run_id).data.metrics == {"x": count - 1}


@pytest.mark.slow
def test_the_sample_job_reports_to_an_mlflow_server(
    mlflow_server, expkit_cli, expkit_workspace, tmp_path
):
    sink = f"metrics=[{{name: mlflow, options: {{tracking_uri: '{mlflow_server}'}}}}]"
    done = expkit_cli(
        "run",
        str(REPO / "training" / "job.yaml"),
        *("--set", "args.num_epochs=1", "--set", sink, "--set", "model.registries=[mlflow]"),
        timeout=900,
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    shown = json.loads(expkit_cli("runs", "show", "latest", "--json").stdout)
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("pytorch-digits")
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`expkit.run_id` = '{shown['id']}'"
    )
    assert run.info.status == "FINISHED"
    assert run.data.params["num_epochs"] == "1"
    resolved = expkit_workspace.history.params.of(shown["id"])["data_dir"]
    assert run.data.params["data_dir"] == resolved != "${data.digits}"  # the data's path
    assert run.data.tags["model"] == "resnet18"
    for name in ("train_loss", "train_acc", "val_loss", "val_acc", "images_per_sec"):
        (point,) = client.get_metric_history(run.info.run_id, name)
        assert point.step == 0
        assert point.value == pytest.approx(shown["metrics"][name])
    assert run.data.metrics["best_val_acc"] == pytest.approx(shown["metrics"]["best_val_acc"])
    files = artifact_files(mlflow_server, run.info.run_id, tmp_path / "artifacts")
    assert {"outputs/model.pt", "outputs/classes.json", "logs/rank-0.log"} <= set(files)
    assert b"epoch 1/1" in files["logs/rank-0.log"]
    version = client.get_model_version("pt-dnn", "1")
    assert version.run_id == run.info.run_id
    assert version.tags["expkit.run_id"] == shown["id"]
    assert float(version.tags["expkit.metrics.best_val_acc"]) == pytest.approx(
        shown["metrics"]["best_val_acc"]
    )


# -- at once, and after a driver died -----------------------------------------------------------
def test_runs_started_at_once_on_a_fresh_workspace_all_reach_mlflow(
    write_job, expkit_workspace, background
):
    """Four first runs at the same moment: the embedded store is created once, not four
    times over (which left it half-migrated and every run unlogged)."""
    job = write_job(
        {"experiment": "at-once", "metrics": ["mlflow"], "args": {"lr": 0.1}},
        script="""
        from expkit import Run
        run = Run.get_context()
        for step in range(20):
            run.log("x", step * 0.5, step=step)
        """,
    )
    assert not (expkit_workspace.path / "mlflow.db").exists()
    commands = [background("run", str(job)) for _ in range(4)]
    codes = [command.wait(timeout=600) for command in commands]

    assert codes == [0, 0, 0, 0], "\n".join(c.output for c in commands)
    for command in commands:
        assert "warning" not in command.output, command.output
    client = MlflowClient(tracking_uri=f"sqlite:///{expkit_workspace.path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("at-once")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["expkit.run_id"] for r in runs) == sorted(c.run_id for c in commands)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params == {"lr": "0.1"}
        points = client.get_metric_history(run.info.run_id, "x")
        assert sorted((m.step, m.value) for m in points) == [(s, s * 0.5) for s in range(20)]


def test_a_run_whose_driver_was_killed_ends_failed_in_mlflow_with_everything_recorded(
    write_job, expkit_workspace, background, expkit_cli, tmp_path
):
    """kill -9 of `expkit run` mid-run: the next command reaps the run, and a background
    process delivers to each sink what it did not get and closes it failed. MLflow is held
    (its store locked) while the second half is logged: that half is what it did not get;
    TensorBoard got everything before the kill, and gets nothing twice (it would show it)."""
    from test_tensorboard import hparams_session, read_scalars

    release = tmp_path / "release"
    job = write_job(
        {"experiment": "killed", "metrics": ["mlflow", "tensorboard"], "args": [str(release)]},
        script="""
        import os, sys, time
        from expkit import Run
        run = Run.get_context()
        run.log_params({"batch": 32})
        for step in range(100):
            run.log("x", step * 0.5, step=step)
        run.flush()
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.05)
        for step in range(100, 200):
            run.log("x", step * 0.5, step=step)
        run.flush()
        print("logged all", flush=True)
        time.sleep(600)
        """,
    )
    live = background("run", str(job))
    run_id = live.run_id
    history = expkit_workspace.history
    eventually(lambda: len(history.metrics.of(run_id)) == 100, what="the first half recorded")
    half = history.metrics.last_id(run_id)
    eventually(
        lambda: history.sink_cursors.get(run_id, "mlflow")[0] == half,
        timeout=300,
        what="the first half in MLflow",
    )
    store = sqlite3.connect(expkit_workspace.path / "mlflow.db", isolation_level=None)
    store.execute("BEGIN EXCLUSIVE")  # MLflow's writes wait: the rest stays undelivered
    try:
        release.touch()
        live.wait_for("logged all", timeout=60)
        eventually(lambda: len(history.metrics.of(run_id)) == 200, what="all values recorded")
        last = history.metrics.last_id(run_id)
        eventually(
            lambda: history.sink_cursors.get(run_id, "tensorboard")[0] == last,
            what="everything in TensorBoard",
        )
        os.kill(live.proc.pid, signal.SIGKILL)  # the driver alone, as a crash would
        live.proc.wait()
    finally:
        store.execute("ROLLBACK")
        store.close()
    assert history.sink_cursors.get(run_id, "mlflow")[0] == half

    listed = expkit_cli("runs", "list")

    assert listed.returncode == 0, listed.stderr
    assert history.runs.get(run_id).state == "failed"
    client = MlflowClient(tracking_uri=f"sqlite:///{expkit_workspace.path / 'mlflow.db'}")
    mlflow_run_id = history.tags.of(run_id)["mlflow.run_id"]
    eventually(
        lambda: client.get_run(mlflow_run_id).info.status != "RUNNING",
        timeout=300,
        what="the MLflow run ended",
    )
    run = client.get_run(mlflow_run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["expkit.state"] == "failed"
    assert run.data.params == {"args": str(release), "batch": "32"}
    points = client.get_metric_history(mlflow_run_id, "x")
    assert sorted((m.step, m.value) for m in points) == [(s, s * 0.5) for s in range(200)]
    logdir = expkit_workspace.run_dir(run_id) / "tensorboard"

    def session_ended() -> bool:
        try:
            return hparams_session(logdir)[1] == "STATUS_FAILURE"
        except KeyError:  # not written yet: the sinks are closed one after the other
            return False

    eventually(session_ended, timeout=120, what="the HParams session's end")
    x = read_scalars(logdir)["x"]
    assert [(s, v) for s, v, _ in x] == [(s, s * 0.5) for s in range(200)]  # each once
    eventually(lambda: len(history.events.of(run_id, "sink-outcome")) == 2, what="outcomes")
    outcomes = [e["message"] for e in history.events.of(run_id, "sink-outcome")]
    assert sorted(o.split(" (")[0] for o in outcomes) == ["mlflow ok", "tensorboard ok"]
    log = (expkit_workspace.run_dir(run_id) / "driver.log").read_text()
    assert f"closing the metric sinks of run {run_id}, its driver gone" in log


# -- parameters, and the run's summary ----------------------------------------------------------
def test_the_run_s_parameters_are_mlflow_params_with_data_paths_resolved(run_job, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.txt").write_text("a")
    result = run_job(
        {
            "experiment": "params",
            "metrics": ["mlflow"],
            "data": {"birds": {"source": str(images)}},
            "args": {"--lr": 0.1, "data_dir": "${data.birds}"},
        },
        script="""
        from expkit import Run
        run = Run.get_context()
        run.log_params({"batch": 64})
        run.log("x", 1.0, step=0)
        run.flush()
        import os, sqlite3, time
        history = os.path.join(os.environ["EXPKIT_WORKSPACE"], "history.db")
        query = "SELECT param_id FROM sink_cursors WHERE run_id = ? AND sink = 'mlflow'"
        while True:  # until the sink has the first value of lr; then it changes
            with sqlite3.connect(history) as db:
                if db.execute(query, (os.environ["EXPKIT_RUN_ID"],)).fetchall():
                    break
            time.sleep(0.05)
        run.log_params({"lr": 0.2, "batch": 64})
        run.log("x", 2.0, step=1)
        """,
    )

    assert result.state == "completed", result.output
    recorded = result.workspace.history.params.of(result.record.id)
    assert recorded["data_dir"] != "${data.birds}"
    client = MlflowClient(tracking_uri=f"sqlite:///{result.workspace.path / 'mlflow.db'}")
    run = mlflow_run(client, result)
    assert run.data.params == {"lr": "0.1", "data_dir": recorded["data_dir"], "batch": "64"}
    assert run.data.tags["expkit.param.lr"] == "0.2"  # MLflow keeps a param's first value
    assert run.info.status == "FINISHED"
    assert "sink-failed" not in [
        e["kind"] for e in result.workspace.history.events.of(result.record.id)
    ]


def test_the_summary_of_expkit_run_says_how_each_sink_fared(write_job, expkit_cli):
    job = write_job(
        {
            "metrics": [
                "tensorboard",
                {"name": "mlflow", "options": {"tracking_uri": "nowhere://at/all"}},
            ],
        },
        script="""
        from expkit import Run
        for step in range(3):
            Run.get_context().log("x", step, step=step)
        """,
    )

    done = expkit_cli("run", str(job))

    assert done.returncode == 0, done.stdout + done.stderr  # a sink that is not required
    (line,) = [line for line in done.stdout.splitlines() if line.lstrip().startswith("sinks ")]
    assert "tensorboard ok (3 values)" in line
    assert "mlflow failed at open: " in line
    assert "nowhere" in line


def test_a_resumed_run_reopens_its_mlflow_run_and_ends_it_afresh(
    write_job, expkit_cli, expkit_cli_background, expkit_workspace, tmp_path
):
    """`expkit runs resume` of a failed run: the same MLflow run is RUNNING again while the
    new attempt runs, ends FINISHED without the failed attempt's error tag, holds the steps
    of both attempts once each, and the summary names the sink once."""
    go = tmp_path / "go"
    job = write_job(
        {
            "metrics": ["mlflow"],
            "checkpoints": "./checkpoints",
            "args": [str(go)],
        },
        script="""
        import os, sys, time
        from expkit import Run
        ctx = Run.get_context()
        first = 0 if ctx.attempt == 1 else 2
        if ctx.attempt > 1:
            while not os.path.exists(sys.argv[1]):
                time.sleep(0.05)
        for step in range(first, first + 2):
            ctx.log("x", float(step), step=step)
        sys.exit(3 if ctx.attempt == 1 else 0)
        """,
    )
    failed = expkit_cli("run", str(job))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{expkit_workspace.path / 'mlflow.db'}")
    (found,) = client.search_runs(
        [client.get_experiment_by_name("test").experiment_id],
        filter_string="tags.`expkit.run_id` = 'test_1'",
    )
    assert found.info.status == "FAILED"
    assert "exited with code 3" in found.data.tags["expkit.error"]

    resumed = expkit_cli_background("runs", "resume", "test_1")
    eventually(
        lambda: client.get_run(found.info.run_id).info.status == "RUNNING",
        what="the MLflow run RUNNING again during the resumed attempt",
    )
    go.write_text("")
    assert resumed.wait(60) == 0, resumed.output

    run = client.get_run(found.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["expkit.state"] == "completed"
    assert "expkit.error" not in run.data.tags
    history = client.get_metric_history(found.info.run_id, "x")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
    (line,) = [line for line in resumed.output.splitlines() if line.lstrip().startswith("sinks ")]
    assert line.split(None, 1)[1] == "mlflow ok (2 values)"
