"""Following Azure ML runs: states mapped to expkit's, logs streamed live, cancel, downloads.

Azure cannot be reached from here, so these tests stand in for the service at its last
boundary: the submitted run object's `get_status`, `get_details`, `cancel`, `download_files`
and `get_portal_url` (RecordedRun), and the log files behind `get_details()["logFiles"]`, which
a local HTTP server serves as blob storage does (byte ranges). The status sequences use the
documented status values of azureml's `Run.get_status()` in the order Azure ML's docs describe
a run going through them; they are written down here, not captured from a live run.

The last tests drive the whole lifecycle with the `azureml` target, replaying also the
workspace, the cluster's status and the submission (one method each on the target): everything
between those calls (Environment, ScriptRunConfig, upload folder, following, downloads,
sealing, metrics, registering) is expkit's and azureml-core's real code.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from expkit import services
from expkit.errors import StageFailed
from expkit.job import JobSpec

pytest.importorskip("azureml.core")

from expkit_azureml import monitor
from expkit_azureml.registry import AzureMLRegistry
from expkit_azureml.target import AzureMLTarget, collect

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")

RUN_ID = "pytorch-digits_1714560000_6f1c2a3b"
DRIVER_LOG = "azureml-logs/70_driver_log.txt"
IMAGE_LOG = "azureml-logs/20_image_build_log.txt"
TRAINING = [
    b"[2024-05-01T10:00:01.123456] Entering context manager injector.\n",
    b"Epoch 0/0\n----------\ntrain Loss: 1.2345 Acc: 0.6012\n",
    b"val Loss: 0.5432 Acc: 0.8900\nBest val Acc: 0.8",  # a line split between two polls
    b"90000\n[2024-05-01T10:01:02.345678] The activity completed successfully. Finalizing run...\n",
]


def grown(parts: list[bytes], n: int) -> bytes:
    return b"".join(parts[:n])


# A run on a cluster that was scaled down: submitted, image found, waiting for a node, running,
# uploading, done (NotStarted -> Starting -> Preparing -> Queued -> Running -> Finalizing).
COMPLETED = [
    ("NotStarted", {}),
    ("Starting", {}),
    ("Preparing", {IMAGE_LOG: b"Building image...\nImage found in the workspace's registry.\n"}),
    ("Queued", {}),
    ("Queued", {}),
    ("Running", {DRIVER_LOG: grown(TRAINING, 1)}),
    ("Running", {DRIVER_LOG: grown(TRAINING, 2)}),
    ("Running", {DRIVER_LOG: grown(TRAINING, 3)}),
    ("Finalizing", {DRIVER_LOG: grown(TRAINING, 4)}),
    ("Completed", {}),
]
# On-demand compute (Provisioning), then the script fails.
FAILED = [
    ("NotStarted", {}),
    ("Provisioning", {}),
    ("Preparing", {}),
    ("Running", {DRIVER_LOG: b"Traceback (most recent call last):\n"}),
    (
        "Running",
        {
            DRIVER_LOG: b"Traceback (most recent call last):\n"
            b"ModuleNotFoundError: No module named 'horovod'\n"
        },
    ),
    ("Finalizing", {}),
    ("Failed", {}),
]
FAILURE = {
    "error": {
        "code": "UserError",
        "message": "User program failed with ModuleNotFoundError: No module named 'horovod'",
    }
}
RUNNING = [("Queued", {}), ("Running", {DRIVER_LOG: grown(TRAINING, 2)})] + [("Running", {})] * 50
AFTER_CANCEL = [("CancelRequested", {}), ("CancelRequested", {}), ("Canceled", {})]
# Canceled in Azure ML studio by someone else while it ran.
CANCELED_ELSEWHERE = [("Running", {}), ("CancelRequested", {}), ("Canceled", {})]


class LogServer:
    """Log files over HTTP, as blob storage serves the SAS URLs of `logFiles` (byte ranges)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.split("?")[0].lstrip("/")
                if name not in files:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = files[name]
                wanted = self.headers.get("Range", "")
                start = int(wanted.removeprefix("bytes=").rstrip("-") or 0) if wanted else 0
                if wanted and start >= len(data):
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206 if wanted else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        serve = self.httpd.serve_forever
        threading.Thread(target=serve, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, name: str) -> str:
        port = self.httpd.server_address[1]
        return f"http://127.0.0.1:{port}/{name}?sv=2019-02-02&sr=b&sig=recorded"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def log_server():
    server = LogServer()
    yield server
    server.close()


class RecordedRun:
    """Stands in for azureml.core.Run (a ScriptRun) where it reaches the service."""

    def __init__(self, server, steps, after_cancel=(), error=None, artifacts=None, on_poll=None):
        self.id = RUN_ID
        self.server, self.steps, self.after_cancel = server, list(steps), list(after_cancel)
        self.error, self.artifacts = error, artifacts or {}
        self.on_poll = on_poll or {}
        self.step = -1
        self.cancel_calls = 0
        self.failures = 0  # get_status calls to fail before answering

    def get_status(self) -> str:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("Connection aborted.")
        self.step = min(self.step + 1, len(self.steps) - 1)
        status, logs = self.steps[self.step]
        self.server.files.update(logs)
        if self.step in self.on_poll:
            self.on_poll.pop(self.step)()
        return status

    def get_details(self) -> dict:
        status = self.steps[self.step][0]
        details = {
            "runId": self.id,
            "target": "gpu-cluster",
            "status": status,
            "properties": {"azureml.runsource": "experiment"},
            "inputDatasets": [],
            "logFiles": {name: self.server.url(name) for name in self.server.files},
        }
        if status == "Failed":
            details["error"] = self.error
        return details

    def cancel(self) -> None:
        self.cancel_calls += 1
        self.steps = self.steps[: self.step + 1] + self.after_cancel

    def get_portal_url(self) -> str:
        return f"https://ml.azure.com/runs/{self.id}?wsid=/subscriptions/s/workspaces/ws"

    def download_files(self, prefix=None, output_directory=None, output_paths=None,
                       batch_size=100, append_prefix=True, timeout_seconds=None):  # fmt: skip
        for name, data in self.artifacts.items():
            if name.startswith(prefix or ""):
                target = Path(output_directory) / (name if append_prefix else name[len(prefix) :])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)


@pytest.fixture
def make_ctx(expkit_workspace):
    """A RunContext of a run recorded in a real workspace; what it says and echoes is kept."""

    def make(canceled=lambda: False):
        job = JobSpec.from_dict(
            {"experiment": "pytorch-digits", "entry_script": "train.py", "compute": "azureml"}
        )
        record = expkit_workspace.history.runs.create("pytorch-digits", job.to_dict())
        run_dir = expkit_workspace.run_dir(record.id)
        for folder in ("metrics", "logs", "work"):
            (run_dir / folder).mkdir(parents=True)
        ctx = services.run_context(
            expkit_workspace,
            record.id,
            job,
            script_env={},
            say=lambda text: ctx.said.append(text),
            waiting=lambda text: None,
            canceled=canceled,
            echo=lambda rank, line: ctx.echoed.append((rank, line)),
        )
        ctx.said, ctx.echoed = [], []  # type: ignore[attr-defined]
        return ctx

    return make


def follow(run, ctx) -> tuple[str, monitor.Follower]:
    follower = monitor.Follower(run, ctx, poll_seconds=0)
    return follower.follow(), follower


# -- the state mapping ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("NotStarted", "queued"),
        ("Starting", "queued"),
        ("Provisioning", "scaling"),
        ("Preparing", "preparing"),
        ("Queued", "scaling"),
        ("Running", "running"),
        ("Finalizing", "post-processing"),
        ("CancelRequested", "canceling"),
        ("NotResponding", "running"),
        ("Completed", "completed"),
        ("Failed", "failed"),
        ("Canceled", "canceled"),
    ],
)
def test_every_documented_azure_ml_status_has_an_expkit_state(status, state):
    assert monitor.expkit_state(status) == state
    assert monitor.describe(status).startswith(f"azureml {status} ({state}): ")


def test_a_completed_run_is_followed_state_by_state_with_its_log_live(
    log_server, make_ctx, expkit_workspace
):
    ctx = make_ctx()
    run = RecordedRun(log_server, COMPLETED)
    status, follower = follow(run, ctx)

    assert status == "Completed"
    assert follower.statuses == [
        s for i, (s, _) in enumerate(COMPLETED) if i == 0 or COMPLETED[i - 1][0] != s
    ]
    assert [line for line in ctx.said if line.startswith("azureml ")] == [
        monitor.describe(s) for s in follower.statuses
    ]
    # the rank's log, byte for byte, and the terminal line by line (the split line joined)
    assert (ctx.log_dir / "rank-0.log").read_bytes() == grown(TRAINING, 4)
    lines = b"".join(line for _, line in ctx.echoed).decode().splitlines()
    assert "Best val Acc: 0.890000" in lines
    assert all(rank == 0 for rank, _ in ctx.echoed)
    assert not (ctx.log_dir / "rank-1.log").exists()  # the image build log is not a rank's
    assert expkit_workspace.history.runs.get(ctx.run_id).status == "azureml Completed"
    assert run.cancel_calls == 0


def test_a_failed_run_gives_azure_mls_reason(log_server, make_ctx):
    ctx = make_ctx()
    status, follower = follow(RecordedRun(log_server, FAILED, error=FAILURE), ctx)
    assert status == "Failed"
    assert "Provisioning" in follower.statuses
    assert follower.error() == FAILURE["error"]["message"]
    assert b"ModuleNotFoundError" in (ctx.log_dir / "rank-0.log").read_bytes()


def test_cancel_in_expkit_cancels_the_azure_ml_run(log_server, make_ctx):
    polls = iter(range(1000))
    ctx = make_ctx(canceled=lambda: next(polls) >= 3)  # `expkit runs cancel` after 3 polls
    run = RecordedRun(log_server, RUNNING, after_cancel=AFTER_CANCEL)
    status, follower = follow(run, ctx)
    assert status == "Canceled"
    assert run.cancel_calls == 1
    assert follower.statuses[-2:] == ["CancelRequested", "Canceled"]
    assert f"canceling Azure ML run {RUN_ID}" in ctx.said


def test_a_run_canceled_in_azure_ml_studio_ends_canceled(log_server, make_ctx):
    run = RecordedRun(log_server, CANCELED_ELSEWHERE)
    status, _ = follow(run, make_ctx())
    assert (status, run.cancel_calls) == ("Canceled", 0)


def test_ctrl_c_while_following_cancels_the_azure_ml_run(log_server, make_ctx):
    def interrupted():
        raise KeyboardInterrupt

    run = RecordedRun(log_server, RUNNING, after_cancel=AFTER_CANCEL)
    with pytest.raises(KeyboardInterrupt):
        follow(run, make_ctx(canceled=interrupted))
    assert run.cancel_calls == 1


def test_a_moment_without_the_service_is_waited_out_and_a_long_one_is_one_line(
    log_server, make_ctx
):
    run = RecordedRun(log_server, COMPLETED)
    run.failures = 3
    status, _ = follow(run, make_ctx())
    assert status == "Completed"

    lost = RecordedRun(log_server, RUNNING)
    lost.failures = monitor.MAX_POLL_FAILURES
    with pytest.raises(StageFailed, match=f"lost contact with Azure ML run {RUN_ID}"):
        follow(lost, make_ctx())
    assert lost.cancel_calls == 0  # it may still be training: it is not canceled


def test_ranks_of_a_distributed_run_and_its_metrics_stream_separately(log_server, make_ctx):
    """The newer runtime writes user_logs/std_log_process_N.txt (the older 70_driver_log_N.txt
    may be there too, and is then not followed); the script's metric channel is in ./logs."""
    metrics = b'["m","val_acc",0.89,0,1714560061.2,0]\n["m","val_acc",0.93,1,1714560071.2,0]\n'
    steps = [
        ("Running", {
            "user_logs/std_log_process_0.txt": b"rank 0 starts\n",
            "user_logs/std_log_process_1.txt": b"rank 1 starts\n",
            "azureml-logs/70_driver_log_0.txt": b"old runtime copy\n",
            "logs/expkit-metrics/rank-0.4242.jsonl": metrics[:30],
        }),
        ("Running", {
            "user_logs/std_log_process_1.txt": b"rank 1 starts\nrank 1 done\n",
            "logs/expkit-metrics/rank-0.4242.jsonl": metrics,
        }),
        ("Completed", {}),
    ]  # fmt: skip
    ctx = make_ctx()
    status, _ = follow(RecordedRun(log_server, steps), ctx)
    assert status == "Completed"
    assert (ctx.log_dir / "rank-0.log").read_bytes() == b"rank 0 starts\n"
    assert (ctx.log_dir / "rank-1.log").read_bytes() == b"rank 1 starts\nrank 1 done\n"
    assert {rank for rank, _ in ctx.echoed} == {0, 1}
    assert (ctx.run_dir / "metrics" / "rank-0.4242.jsonl").read_bytes() == metrics


def test_outputs_logs_and_the_metric_channel_are_downloaded_into_the_working_copy(
    log_server, make_ctx
):
    ctx = make_ctx()
    channel = ctx.run_dir / "metrics" / "rank-0.4242.jsonl"
    channel.write_bytes(b'["m","loss",1.0,0,1.0,0]\n')  # what was read live
    run = RecordedRun(log_server, COMPLETED, artifacts={
        "outputs/model.pt": b"weights",
        "outputs/classes.json": b'["0", "1"]',
        "logs/expkit-metrics/rank-0.4242.jsonl": (
            b'["m","loss",1.0,0,1.0,0]\n["m","loss",0.5,1,2.0,0]\n'
        ),
        "logs/events.txt": b"the script's own log\n",
        DRIVER_LOG: grown(TRAINING, 4),
        "system_logs/lifecycler/execution-wrapper.log": b"wrapper\n",
    })  # fmt: skip
    collect(run, ctx)
    work = ctx.work_dir
    assert (work / "outputs" / "model.pt").read_bytes() == b"weights"
    assert (work / "logs" / "events.txt").exists()
    assert (work / "logs" / "azureml" / DRIVER_LOG).read_bytes() == grown(TRAINING, 4)
    assert (work / "logs" / "azureml" / "system_logs/lifecycler/execution-wrapper.log").exists()
    assert not (work / "logs" / "expkit-metrics").exists()  # moved into the channel
    assert channel.read_bytes().count(b"\n") == 2  # appended, never rewritten


# -- the whole lifecycle, Azure replayed at its calls ---------------------------------------
CLUSTER_STATES = [  # a cluster that exists, scaled to zero; then the run's node comes up
    ("Succeeded", "Steady", 0, 0, {}),
    ("Succeeded", "Resizing", 0, 1, {"preparing_node_count": 1}),
    ("Succeeded", "Steady", 1, 1, {"running_node_count": 1}),
]


def replayed_cluster(name: str):
    """A real AmlCompute object whose refresh_state() replays recorded states."""
    from azureml.core.compute import AmlCompute, ComputeTarget
    from azureml.core.compute.amlcompute import AmlComputeNodeStateCounts, AmlComputeStatus

    from expkit_azureml.importer import Captured, offline_azureml

    config = AmlCompute.provisioning_configuration(vm_size="STANDARD_NC6s_v3", max_nodes=2)
    with offline_azureml(Captured()):
        cluster = ComputeTarget.create(None, name, config)
    states = iter(CLUSTER_STATES)

    def refresh_state():
        provisioning, allocation, current, target, counts = next(states, CLUSTER_STATES[-1])
        node_counts = {f"{s}_node_count": 0 for s in (
            "idle", "leaving", "preempted", "preparing", "running", "unusable")}  # fmt: skip
        node_counts.update(counts)
        cluster.provisioning_state = provisioning
        cluster.status = AmlComputeStatus(
            allocation, None, None, current, None, None,
            AmlComputeNodeStateCounts(**node_counts), provisioning, None,
            cluster.scale_settings, target, "dedicated", "STANDARD_NC6s_v3",
        )  # fmt: skip

    cluster.refresh_state = refresh_state
    return cluster


class ReplayedAzure(AzureMLTarget):
    """The `azureml` target with its three Azure calls replayed; the rest is the real one."""

    poll_seconds = 0
    cluster_poll_seconds = 0

    def __init__(self, run_factory):
        super().__init__()
        self.run_factory, self.submitted = run_factory, []

    def open_workspace(self, ref, auth):
        return SimpleNamespace(name=ref.workspace_name)

    def find_cluster(self, workspace, options, say):
        return replayed_cluster(options.cluster)

    def submit(self, workspace, experiment, config, tags):
        upload = Path(config.source_directory)
        self.submitted.append((config, tags, sorted(p.name for p in upload.iterdir())))
        self.run = self.run_factory()
        return self.run


@pytest.fixture
def replayed(expkit_plugins, register_plugin, tmp_path, monkeypatch):
    """`replayed(run_factory)`: the azureml plugin replaced by ReplayedAzure for this test."""
    import expkit

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"subscription_id": "s", "resource_group": "rg", "workspace_name": "ws"})
    )
    for var in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.setenv(var, "recorded")
    expkit_plugins.unregister("azureml")

    def install(run_factory):
        target = ReplayedAzure(run_factory)

        class Plugin:
            @expkit.hookimpl
            def expkit_compute_targets(self):
                return [target]

        register_plugin(Plugin(), "azureml-replayed")
        return target

    return install


TRAIN = "print('this script runs on Azure ML, not here')\nraise SystemExit(3)\n"
JOB = {
    "compute": {"target": "azureml", "options": {"cluster": "gpu-cluster"}},
    "environment": {"pip": ["pillow"]},
    "model": {"name": "pt-dnn", "path": "outputs/"},
}


def test_a_job_runs_on_azure_ml_through_every_stage(replayed, run_job, log_server):
    metrics = (
        b'["m","val_acc",0.89,0,1714560061.2,0]\n["m","best_val_acc",0.89,null,1714560062.0,0]\n'
    )
    artifacts = {
        "outputs/model.pt": b"weights",
        "logs/expkit-metrics/rank-0.4242.jsonl": metrics,
        DRIVER_LOG: grown(TRAINING, 4),
    }
    target = replayed(lambda: RecordedRun(log_server, COMPLETED, artifacts=artifacts))
    result = run_job(JOB, script=TRAIN)

    assert result.state == "completed", result.output
    stages = {s.stage: s.state for s in result.workspace.history.stages.of(result.record.id)}
    assert stages == dict.fromkeys(
        ("prepare", "scale", "run", "post-process", "register"), "completed"
    )
    config, tags, uploaded = target.submitted[0]
    # the snapshot, the in-script API and its forwarder (named by the run's EXPKIT_FORWARDER)
    assert {"train.py", "expkit", "expkit_azureml", ".amlignore"} <= set(uploaded)
    assert config.run_config.environment_variables["EXPKIT_FORWARDER"] == (
        "expkit_azureml.forward:AzureMLForwarder"
    )
    assert config.script == "train.py" and config.run_config.target == "gpu-cluster"
    assert tags == {"expkit.run_id": result.record.id}
    assert result.run.get_metrics() == {"val_acc": 0.89, "best_val_acc": 0.89}
    files = result.run.get_file_names()
    assert "outputs/model.pt" in files and "logs/rank-0.log" in files
    assert "logs/azureml/azureml-logs/70_driver_log.txt" in files
    assert (result.run_dir / "outputs" / "model.pt").read_bytes() == b"weights"
    record = json.loads((result.run_dir / "azureml.json").read_text())
    assert record["run_id"] == RUN_ID and record["workspace"]["workspace_name"] == "ws"
    assert result.workspace.history.tags.of(result.record.id)["azureml.run_id"] == RUN_ID
    assert result.workspace.history.models.find("pt-dnn")["version"] == 1
    output = result.output
    assert "Azure ML workspace ws (config.json at" in output
    assert "cluster gpu-cluster (STANDARD_NC6s_v3, 0-2 nodes): 0 nodes, steady" in output
    assert "azureml Queued (scaling): waiting for the cluster's nodes" in output
    # the cluster's node counts while the run waits for its node
    assert (
        "gpu-cluster (STANDARD_NC6s_v3, 0-2 nodes): 0 nodes (1 preparing), scaling to 1" in output
    )
    assert "gpu-cluster (STANDARD_NC6s_v3, 0-2 nodes): 1 node (1 running), steady" in output


def test_a_failed_azure_ml_run_fails_the_run_stage_with_its_reason(replayed, run_job, log_server):
    artifacts = {"outputs/partial.txt": b"kept"}
    replayed(lambda: RecordedRun(log_server, FAILED, error=FAILURE, artifacts=artifacts))
    result = run_job(JOB, script=TRAIN)
    assert result.state == "failed"
    assert result.record.error == (
        f"run: Azure ML run {RUN_ID} failed: " + FAILURE["error"]["message"]
    )
    assert (result.run_dir / "outputs" / "partial.txt").read_bytes() == b"kept"  # sealed anyway


def test_expkit_runs_cancel_cancels_the_azure_ml_run(
    replayed, run_job, log_server, expkit_workspace
):
    def cancel_from_another_terminal():
        (record,) = expkit_workspace.history.runs.recent(limit=1)
        expkit_workspace.history.runs.request_cancel(record.id)

    target = replayed(lambda: RecordedRun(
        log_server, RUNNING, after_cancel=AFTER_CANCEL, on_poll={2: cancel_from_another_terminal}
    ))  # fmt: skip
    result = run_job(JOB, script=TRAIN)
    assert result.state == "canceled"
    assert target.run.cancel_calls == 1


def test_data_inputs_are_refused_before_a_run_is_created(replayed, run_job, expkit_workspace):
    replayed(lambda: None)
    from expkit.errors import UserError

    with pytest.raises(UserError, match=r"data\.digits: data inputs are prepared on this machine"):
        run_job(
            {**JOB, "data": {"digits": {"source": "."}}, "args": {"data_dir": "${data.digits}"}},
            script=TRAIN,
        )
    assert expkit_workspace.history.runs.recent() == []


def test_a_run_canceled_in_azure_ml_cancels_the_expkit_run(replayed, run_job, log_server):
    replayed(lambda: RecordedRun(log_server, CANCELED_ELSEWHERE))
    result = run_job(JOB, script=TRAIN)
    assert result.state == "canceled"  # the target's Canceled, mapped by the lifecycle


# -- model.registries: [azureml] -------------------------------------------------------------
class ReplayedRegistry(AzureMLRegistry):
    """The `azureml` registry with its Azure calls replayed: the run's register_model."""

    def __init__(self):
        self.registered = []

    def open_workspace(self, ref, auth):
        return SimpleNamespace(name=ref.workspace_name, auth=auth)

    def azure_run(self, workspace, experiment, run_id):
        registry = self

        class RegisteringRun:
            def register_model(self, **arguments):
                registry.registered.append((experiment, run_id, arguments))
                return SimpleNamespace(name=arguments["model_name"], version=3)

        return RegisteringRun()


def test_the_model_is_registered_in_azure_ml_from_its_run(
    replayed, register_plugin, run_job, log_server
):
    import expkit

    registry = ReplayedRegistry()

    class Plugin:
        @expkit.hookimpl
        def expkit_model_registries(self):
            return [registry]

    register_plugin(Plugin(), "azureml-registry-replayed")
    metrics = b'["m","best_val_acc",0.89,null,1714560062.0,0]\n'
    artifacts = {"outputs/model.pt": b"weights", "logs/expkit-metrics/rank-0.1.jsonl": metrics}
    replayed(lambda: RecordedRun(log_server, COMPLETED, artifacts=artifacts))
    job = {**JOB, "model": {"name": "pt-dnn", "path": "outputs/", "registries": ["azureml"]}}
    result = run_job(job, script=TRAIN)

    assert result.state == "completed", result.output
    ((experiment, run_id, arguments),) = registry.registered
    assert (experiment, run_id) == ("test", RUN_ID)
    assert arguments["model_name"] == "pt-dnn" and arguments["model_path"] == "outputs"
    assert arguments["tags"]["expkit.run_id"] == result.record.id
    assert arguments["tags"]["expkit.version"] == "1"
    assert arguments["tags"]["expkit.metrics.best_val_acc"] == "0.89"
    assert (
        "model registry 'azureml': pt-dnn version 3 in Azure ML workspace ws (from Azure ML run "
        f"{RUN_ID}) (Azure ML numbers its versions itself: this is expkit's 1)"
    ) in result.output


def test_registering_a_local_run_in_azure_ml_needs_the_workspaces_config(
    register_plugin, run_job, tmp_path, monkeypatch
):
    """A run that did not run on Azure ML uploads its model; without a config.json that is
    one line, and the register stage fails; the run failed, so the version made here is not
    kept either (a model version exists only for a completed run)."""
    monkeypatch.chdir(tmp_path)
    job = {"model": {"name": "m", "path": "outputs/", "registries": ["azureml"]}}
    script = "import os\nos.makedirs('outputs')\nopen('outputs/w.txt', 'w').write('w')\n"
    result = run_job(job, script=script)
    assert result.state == "failed"
    assert result.record.error.startswith("register: no Azure ML config.json in ")
    assert result.record.error.endswith("; m:1 is not kept, as the run failed")
    assert result.workspace.history.models.find("m") is None


# -- the compute-target contract ------------------------------------------------------------
def test_the_azureml_target_keeps_the_contract_where_it_can_be_checked_here(replayed, log_server):
    """What `check_compute_target` can drive without Azure: check, dry_run, prepare, acquire
    and release (the cluster replayed), and a cancel while the Azure ML run is running (the
    run replayed: the script's first line in its driver log, then Running until canceled),
    leaving no process here. Not checked, as the scripts run on Azure, not here: exit codes
    (Azure ML reports a failed run, not the script's code: StageFailed with its reason), the
    byte-exact logs of real scripts, the job's timeout."""
    from expkit.conformance import STARTED
    from expkit.testing import check_compute_target

    target = replayed(
        lambda: RecordedRun(
            log_server,
            [("Running", {DRIVER_LOG: STARTED}), ("Running", {})],
            after_cancel=AFTER_CANCEL,
        )
    )
    job = {
        "compute": {"target": "azureml", "options": {"cluster": "gpu-cluster"}},
        "distributed": "none",
        "resources": {"processes_per_node": 1},
    }
    checked = ("check", "dry_run", "acquire_release", "cancel", "no_leftovers")
    assert check_compute_target(target, only=checked, job=job) == list(checked)
    assert target.run.cancel_calls == 1
