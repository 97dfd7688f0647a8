"""The `mlflow` sink's REST client (`expkit_mlflow.rest`): for an `http://` tracking URI it talks
to the server through MLflow's REST API without importing mlflow, and what lands in MLflow is
what MLflow's own client leaves there. Against real `mlflow server` processes (SQLite backend,
artifacts proxied by the server), read back through MLflow's own client; credentials through a
real HTTP proxy in front of the server that lets only an authorized request through.
"""

from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow import MlflowClient

from expkit import metrics as metric_pipeline
from expkit_mlflow import tracking
from expkit_mlflow.api import AlreadyExists, Point
from expkit_mlflow.library import LibraryTracker
from expkit_mlflow.rest import RestTracker
from expkit_mlflow.transport import MlflowServerError
from test_mlflow import (
    COUNT,
    artifact_files,
    check_everything_arrived,
    free_port,
    mlflow_run,
    on_server,
    script,
    serving,
)

CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """A real `mlflow server` on a loopback port: SQLite backend, artifacts served by it."""
    with serving(tmp_path_factory.mktemp("mlflow-server")) as (url, _):
        yield url


@pytest.fixture(autouse=True)
def environment(monkeypatch):
    """No tracking URI, credentials or HTTP settings from the environment unless a test sets
    them; no telemetry; the sink's HTTP defaults gone after each test."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("MLFLOW_TRACKING_URI", *tracking.HTTP_DEFAULTS, *CREDENTIALS):
        monkeypatch.delenv(name, raising=False)
    yield
    for name in tracking.HTTP_DEFAULTS:
        os.environ.pop(name, None)


# Tags that differ between two runs of the same job by their nature.
PER_RUN = {
    "expkit.run_id",
    "mlflow.runName",
    "expkit.exit_code",
}


def comparable(client: MlflowClient, result, tmp_path: Path) -> dict:
    """What a user sees of an expkit run's MLflow run, less what differs from run to run
    (ids, times, seconds)."""
    run = mlflow_run(client, result)
    tags = {
        k: v
        for k, v in run.data.tags.items()
        if k not in PER_RUN and not k.startswith("expkit.stage.")
    }
    histories = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }
    files = artifact_files(client.tracking_uri, run.info.run_id, tmp_path / run.info.run_id)
    files.pop("logs/rank-0.log")  # holds the run's id
    return {
        "name is the run id": run.info.run_name == result.record.id,
        "status": run.info.status,
        "params": run.data.params,
        "tags": tags,
        "metrics": {k: v for k, v in run.data.metrics.items() if v == v},  # NaN != NaN
        "histories": {k: [(s, v) for s, v in h if v == v] for k, h in histories.items()},
        "artifacts": files,
        "user": run.info.user_id,
    }


def test_the_rest_client_leaves_in_mlflow_what_mlflow_s_own_client_does(
    server, run_job, tmp_path, monkeypatch
):
    spec = on_server(
        server,
        experiment="rest-vs-library",
        args={"lr": 0.1, "epochs": 3},
        tags={"team": "vision"},
    )
    rest = run_job(spec, script=script())
    with monkeypatch.context() as m:  # the same sink, through MLflow's library
        m.setattr(tracking, "library_only", lambda uri: "asked for by the test")
        library = run_job(spec, script=script())

    assert rest.state == library.state == "completed", rest.output + library.output
    client = MlflowClient(tracking_uri=server)
    check_everything_arrived(rest, client, server, tmp_path)  # as the sink promises
    assert comparable(client, rest, tmp_path / "rest") == comparable(
        client, library, tmp_path / "library"
    )
    assert len(client.get_metric_history(mlflow_run(client, rest).info.run_id, "x")) == COUNT


DRIVER = """
import atexit, sys
def loaded():
    print("mlflow modules:", sorted(m for m in sys.modules if m.split(".")[0] == "mlflow"))
atexit.register(loaded)
from expkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_driver_imports_no_mlflow_for_a_server(server, write_job, expkit_workspace):
    """`expkit run` with the sink on a server: the run is in MLflow, finished, and the driver
    process never imported mlflow (it would cost seconds at post-process)."""
    job = write_job(
        on_server(server, experiment="no-import"),
        script="""
        from expkit import Run
        run = Run.get_context()
        for step in range(50):
            run.log("loss", 1.0 / (step + 1), step=step)
        run.log_row("table", a=1)
        """,
    )

    done = subprocess.run(
        [sys.executable, "-c", DRIVER, "run", str(job)],
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "warning" not in done.stdout, done.stdout
    assert "mlflow modules: []" in done.stdout, done.stdout
    client = MlflowClient(tracking_uri=server)
    (run,) = client.search_runs([client.get_experiment_by_name("no-import").experiment_id])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 50
    paths = [a.path for a in client.list_artifacts(run.info.run_id, "metrics")]
    assert paths == ["metrics/table.json"]


# -- credentials ---------------------------------------------------------------------------
@contextmanager
def guarded(
    upstream: str, authorization: str | None, tls: ssl.SSLContext | None = None
) -> Iterator[tuple[str, list[str | None]]]:
    """A real HTTP proxy in front of the MLflow server `upstream` that lets through only the
    requests carrying the header `Authorization: <authorization>` (any request, when None),
    answering 401 with MLflow's error body otherwise, over HTTPS when given a `tls` context;
    its URL, and the Authorization header of each request."""
    seen: list[str | None] = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def forward(self) -> None:
            given = self.headers.get("Authorization")
            seen.append(given)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if authorization is not None and given != authorization:
                answer = json.dumps({"error_code": "UNAUTHENTICATED", "message": "who are you?"})
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer.encode())
                return
            request = urllib.request.Request(upstream + self.path, data=body, method=self.command)
            for name in ("Content-Type",):
                if self.headers.get(name):
                    request.add_header(name, self.headers[name])
            try:
                with urllib.request.urlopen(request, timeout=60) as reply:
                    status, content, kind = reply.status, reply.read(), reply.headers
            except urllib.error.HTTPError as error:
                status, content, kind = error.code, error.read(), error.headers
            self.send_response(status)
            self.send_header("Content-Type", kind.get("Content-Type", "application/json"))
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_PUT = forward

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Proxy)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("variables", "header"),
    [
        (
            {"MLFLOW_TRACKING_USERNAME": "ada", "MLFLOW_TRACKING_PASSWORD": "s3cret"},
            "Basic " + base64.b64encode(b"ada:s3cret").decode(),
        ),
        ({"MLFLOW_TRACKING_TOKEN": "t0ken"}, "Bearer t0ken"),
    ],
    ids=["basic", "bearer"],
)
def test_mlflow_s_credential_variables_reach_the_server(
    server, run_job, monkeypatch, tmp_path, variables, header
):
    monkeypatch.setattr(metric_pipeline, "RETRY_DELAYS", (0.01, 0.01))
    with guarded(server, header) as (url, seen):
        experiment = f"guarded-{header.split()[0].lower()}"
        spec = on_server(url, experiment=experiment, args={"lr": 0.1, "epochs": 1})
        refused = run_job(spec, script=script(3))
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        let_in = run_job(spec, script=script(3))

    # Without them: the server's refusal, in one line naming the server and the call.
    assert refused.state == "completed", refused.output
    (event,) = refused.workspace.history.events.of(refused.record.id, "sink-failed")
    assert event["message"] == (
        f"plugin mlflow, metric sink 'mlflow' open: MLflow server {url}, "
        "experiments/get-by-name: UNAUTHENTICATED: who are you?"
    )
    # With them: every request carried them, artifacts too, and the run is all there.
    assert let_in.state == "completed", let_in.output
    assert "warning" not in let_in.output, let_in.output
    assert seen.count(header) > 10
    client = MlflowClient(tracking_uri=server)
    run = mlflow_run(client, let_in)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "epochs": "1"}
    files = artifact_files(server, run.info.run_id, tmp_path / "files")
    assert files["outputs/model.pt"] == b"weights"


def self_signed(folder: Path) -> Path:
    """A self-signed certificate for 127.0.0.1 and its key, in one PEM file."""
    crypto = pytest.importorskip("cryptography")
    assert crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = folder / "server.pem"
    path.write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


@pytest.mark.parametrize(
    ("variables", "trusted"),
    [
        ({"MLFLOW_TRACKING_SERVER_CERT_PATH": "CERT"}, True),
        ({"MLFLOW_TRACKING_INSECURE_TLS": "true"}, True),
        ({}, False),
    ],
    ids=["server-cert-path", "insecure-tls", "untrusted"],
)
def test_mlflow_s_tls_variables_decide_whom_the_sink_trusts(
    server, run_job, monkeypatch, tmp_path, variables, trusted
):
    monkeypatch.setattr(metric_pipeline, "RETRY_DELAYS", (0.01, 0.01))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    certificate = self_signed(tmp_path)
    for name, value in variables.items():
        monkeypatch.setenv(name, str(certificate) if value == "CERT" else value)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(certificate)
    experiment = f"tls-{'-'.join(variables) or 'none'}".lower()

    with guarded(server, None, tls) as (url, seen):
        result = run_job(
            on_server(url, experiment=experiment, args={"lr": 0.1, "epochs": 1}),
            script=script(3),
        )

    assert result.state == "completed", result.output
    events = result.workspace.history.events.of(result.record.id, "sink-failed")
    if not trusted:
        (event,) = events
        assert event["message"].startswith(
            f"plugin mlflow, metric sink 'mlflow' open: MLflow server {url}, "
            "experiments/get-by-name: "
        )
        assert "CERTIFICATE_VERIFY_FAILED" in event["message"]
        assert "\n" not in event["message"]
        assert seen == []
        return
    assert [e["message"] for e in events] == []
    client = MlflowClient(tracking_uri=server)
    run = mlflow_run(client, result)
    assert run.info.status == "FINISHED"
    files = artifact_files(server, run.info.run_id, tmp_path / "files")
    assert files["outputs/model.pt"] == b"weights"
    assert len(seen) > 10  # every call went through the HTTPS proxy


# -- the two clients, call by call ------------------------------------------------------------
@pytest.fixture(params=["rest", "library"])
def tracker(request, server):
    if request.param == "rest":
        return RestTracker(server)
    return LibraryTracker(MlflowClient(tracking_uri=server))


def test_both_clients_answer_alike(tracker, tmp_path, request):
    name = f"calls-{request.node.callspec.id}"
    assert tracker.get_experiment_by_name(name) is None
    experiment = tracker.create_experiment(name, None, {"kind": "test"})
    with pytest.raises(AlreadyExists):
        tracker.create_experiment(name, None, {})
    found = tracker.get_experiment_by_name(name)
    assert (found.experiment_id, found.lifecycle_stage, found.tags) == (
        experiment,
        "active",
        {"kind": "test"},
    )
    tracker.set_experiment_tag(experiment, "k", "v")
    assert tracker.get_experiment_by_name(name).tags == {"kind": "test", "k": "v"}

    made = tracker.create_run(experiment, 1_000, {"mlflow.user": "ada", "a": "1"}, "first")
    assert (made.status, made.start_time, made.run_name) == ("RUNNING", 1_000, "first")
    points = [Point("x", v, 2_000 + i, i) for i, v in enumerate([0.5, float("nan"), 1e400])]
    tracker.log_batch(made.run_id, metrics=points, params={"p": "1"}, tags={"t": "2"})
    tracker.set_tag(made.run_id, "gone", "soon")
    tracker.delete_tag(made.run_id, "gone")
    tracker.update_run(made.run_id, "SCHEDULED")
    run = tracker.get_run(made.run_id)
    assert run.status == "SCHEDULED"
    assert run.params == {"p": "1"}
    assert {k: v for k, v in run.tags.items() if not k.startswith("mlflow.")} == {
        "a": "1",
        "t": "2",
    }
    assert run.tags["mlflow.user"] == "ada"
    history = tracker.get_metric_history(made.run_id, "x")
    assert [(p.step, p.timestamp) for p in history] == [(0, 2000), (1, 2001), (2, 2002)]
    assert history[0].value == 0.5
    assert history[1].value != history[1].value  # NaN
    assert history[2].value == 1.7976931348623157e308  # MLflow's stand-in for infinity
    tracker.set_terminated(made.run_id, "FAILED", 5_000)
    assert (tracker.get_run(made.run_id).status, tracker.get_run(made.run_id).end_time) == (
        "FAILED",
        5_000,
    )
    other = tracker.create_run(experiment, None, {"mark": "yes"}, "second")
    assert [r.run_id for r in tracker.search_runs(experiment, "tags.mark = 'yes'")] == [
        other.run_id
    ]
    both = tracker.search_runs(experiment, "", ["attributes.start_time ASC"])
    assert [r.run_id for r in both] == [made.run_id, other.run_id]

    folder = tmp_path / "up"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "sub" / "b.bin").write_bytes(b"\0b")
    assert tracker.list_artifacts(other.run_id, "outputs") == []
    tracker.log_artifacts(other.run_id, str(folder), "outputs")
    assert tracker.list_artifacts(other.run_id, "outputs") == ["outputs/a.txt", "outputs/sub"]
    assert tracker.list_artifacts(other.run_id, "outputs/sub") == ["outputs/sub/b.bin"]
    files = artifact_files(tracker.uri, other.run_id, tmp_path / "down")
    assert files == {"outputs/a.txt": b"a", "outputs/sub/b.bin": b"\0b"}


def test_a_server_s_refusal_is_one_line_naming_the_server_the_call_and_mlflow_s_words(
    server,
):
    with pytest.raises(MlflowServerError) as refused:
        RestTracker(server).get_run("no-such-run")

    assert refused.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"MLflow server {server}, runs/get: RESOURCE_DOES_NOT_EXIST: ")
    assert "no-such-run" in message


def test_an_unreachable_server_is_one_line_naming_it_and_the_call(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    nowhere = f"http://127.0.0.1:{free_port()}"

    with pytest.raises(MlflowServerError) as failed:
        RestTracker(nowhere).get_experiment_by_name("x")

    assert str(failed.value) == (
        f"MLflow server {nowhere}, experiments/get-by-name: "
        "Failed to establish a new connection: [Errno 111] Connection refused"
    )
    assert "\n" not in str(failed.value)
    assert failed.value.error_code == "CONNECTION"


@pytest.mark.parametrize(
    ("uri", "variables", "library"),
    [
        ("http://127.0.0.1:5000", {}, False),
        ("https://mlflow.example.com/prefix", {"MLFLOW_TRACKING_TOKEN": "t"}, False),
        ("http://127.0.0.1:5000", {"MLFLOW_TRACKING_AWS_SIGV4": "true"}, True),
        ("http://127.0.0.1:5000", {"MLFLOW_TRACKING_AUTH": "my_auth"}, True),
        ("http://127.0.0.1:5000", {"MLFLOW_WORKSPACE": "team-a"}, True),
        ("http://127.0.0.1:5000", {"MLFLOW_TRACKING_AWS_SIGV4": "false"}, False),
        ("databricks", {}, True),
        ("sqlite:///mlflow.db", {}, True),
    ],
)
def test_the_library_takes_what_the_rest_client_cannot_honour(monkeypatch, uri, variables, library):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)

    assert (tracking.library_only(uri) is not None) == library
    if not library:
        assert isinstance(tracking.connect(tracking.Tracking(uri)), RestTracker)
