"""`expkit ui` (MLflow's UI on the workspace's store), and where the metric sinks say a run's
data went: in the run summary, in `expkit runs show`, and in its --json, which carries
everything the text view shows.

The UI tests start the real command on a free loopback port, read the run's page data and
artifacts from it over HTTP, stop it as a user does (Ctrl-C, SIGTERM), and check that none of
its processes is left.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import alive, eventually
from expkit.cli.common import when
from expkit.console import human_seconds

SCRIPT = """
import os
from expkit import Run

run = Run.get_context()
for step in range(3):
    run.log("loss", 1.0 / (step + 1), step=step)
run.set_tags({"optimizer": "sgd"})
os.makedirs("outputs", exist_ok=True)
with open("outputs/model.pt", "wb") as f:
    f.write(b"weights")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(root: int) -> list[int]:
    """The live processes below `root`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    parent = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return [pid for pid in found if alive(pid)]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.load(answer)


@pytest.fixture
def two_sink_run(write_job, expkit_cli):
    """A completed run with the `mlflow` sink (the workspace's default store) and the
    `tensorboard` sink, registering its model in the workspace and MLflow: (the `expkit run`
    result, the run id)."""
    job = write_job(
        {
            "experiment": "ui-demo",
            "args": {"lr": 0.1},
            "metrics": ["mlflow", "tensorboard"],
            "model": {"name": "tiny", "path": "outputs/model.pt", "registries": ["mlflow"]},
        },
        script=SCRIPT,
    )
    done = expkit_cli("run", str(job))
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = re.search(r"^run (\S+): completed", done.stdout, re.M).group(1)
    return done, run_id


def summary_rows(stdout: str) -> dict[str, str]:
    """The run summary's rows ("  label  value" under "run ID: state"), by label."""
    summary = stdout[stdout.rindex("\nrun ") :]
    rows = [line.strip().split(None, 1) for line in summary.splitlines()[2:] if line.strip()]
    return {row[0]: row[1] if len(row) > 1 else "" for row in rows}


# -- where the sinks wrote ----------------------------------------------------------------------
@pytest.mark.slow  # a run with the mlflow sink: 10-40 s on a busy machine
def test_the_summary_and_runs_show_say_where_each_sink_wrote(two_sink_run, expkit_cli):
    done, run_id = two_sink_run
    shown = expkit_cli("runs", "show", run_id)
    as_json = json.loads(expkit_cli("runs", "show", run_id, "--json").stdout)

    tags = as_json["tags"]
    workspace = Path(tags["mlflow.tracking_uri"].removeprefix("sqlite:///")).parent
    link = (
        f"http://127.0.0.1:5000/#/experiments/{tags['mlflow.experiment_id']}/runs/"
        f"{tags['mlflow.run_id']}"
    )
    mlflow_line = (
        f"{link} (open it with `expkit ui`; tracking URI sqlite:///{workspace / 'mlflow.db'})"
    )
    tensorboard_line = f"tensorboard --logdir {workspace / 'runs' / run_id / 'tensorboard'}"
    rows = summary_rows(done.stdout)
    assert rows["mlflow"] == mlflow_line
    assert rows["tensorboard"] == tensorboard_line
    assert f"  mlflow                   {mlflow_line}\n" in shown.stdout
    assert f"  tensorboard              {tensorboard_line}\n" in shown.stdout
    assert as_json["sinks"] == [
        {"sink": "mlflow", "where": mlflow_line},
        {"sink": "tensorboard", "where": tensorboard_line},
    ]
    # The MLflow run is the one the link names, and it does not get expkit's own tags.
    from mlflow import MlflowClient

    mlflow_run = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}").get_run(tags["mlflow.run_id"])
    assert mlflow_run.info.experiment_id == tags["mlflow.experiment_id"]
    assert mlflow_run.info.run_name == run_id
    assert "mlflow.tracking_uri" not in mlflow_run.data.tags
    assert "mlflow.experiment_id" not in mlflow_run.data.tags


def test_a_tracking_server_s_run_link_is_on_the_server(run_job, expkit_workspace):
    """On an http tracking URI the link is the server's own address. The sink records where
    at open; the server is not contacted to say it (none is running here)."""
    from expkit import services
    from expkit.job import JobSpec
    from expkit.plugins import get_plugins
    from expkit.sinkwhere import sink_places

    result = run_job({"metrics": ["tensorboard"]}, script="print('hi')\n")
    record = result.record
    expkit_workspace.history.tags.set(
        record.id,
        {
            "mlflow.run_id": "abc123",
            "mlflow.experiment_id": "7",
            "mlflow.tracking_uri": "http://mlflow.internal:5000/",
        },
    )
    job = JobSpec.from_dict({**record.job, "metrics": ["mlflow"]}, source="test")
    sink = get_plugins().get("metric_sinks", "mlflow")
    info = services.run_info(expkit_workspace, record.id, job)

    assert sink.where(info, {}) == (
        "http://mlflow.internal:5000/#/experiments/7/runs/abc123 "
        "(tracking URI http://mlflow.internal:5000/)"
    )
    # Another local store than the workspace's: the `mlflow ui` command that shows it.
    expkit_workspace.history.tags.set(record.id, {"mlflow.tracking_uri": "sqlite:////tmp/x.db"})
    assert sink.where(info, {}) == (
        "http://127.0.0.1:5000/#/experiments/7/runs/abc123 (open it with `mlflow ui "
        "--backend-store-uri sqlite:////tmp/x.db`; tracking URI sqlite:////tmp/x.db)"
    )
    # The tensorboard sink of this run did open: its folder; a sink that never opened: none.
    assert sink_places(expkit_workspace, expkit_workspace.history.runs.get(record.id)) == [
        ("tensorboard", f"tensorboard --logdir {result.run_dir / 'tensorboard'}")
    ]
    expkit_workspace.history.tags.set(record.id, {"mlflow.run_id": ""})
    assert sink.where(info, {}) is None


# -- runs show --json carries what the text view shows ------------------------------------------
def text_view(stdout: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """`runs show`'s text: the heading lines {label: value}, and each section's lines by
    its heading's first word ("stages", "params", ..., "warning")."""
    head, *sections = stdout.split("\n\n")
    labels = {}
    for line in head.splitlines():
        label, value = re.match(r"(remote job|exit code|\S+)\s+(.*)$", line).groups()
        labels.setdefault(label, value)
        if label == "model":  # one line per model version
            labels[label] = labels[label] if value == labels[label] else f"{labels[label]}|{value}"
    found = {}
    for section in sections:
        title, *lines = section.splitlines()
        found[title.split()[0].rstrip(":")] = [line.strip() for line in lines] or [title]
    return labels, found


def test_runs_show_json_carries_every_field_the_text_view_shows(write_job, expkit_cli):
    job = write_job(
        {
            "experiment": "json-demo",
            "args": {"lr": 0.1},
            "metrics": ["tensorboard"],
            "retry": {"max_attempts": 2},  # the attempts table is shown
            "model": {"name": "tiny", "path": "outputs/model.pt"},
        },
        script=SCRIPT,
    )
    assert expkit_cli("run", str(job)).returncode == 0
    text = expkit_cli("runs", "show", "latest").stdout
    data = json.loads(expkit_cli("runs", "show", "latest", "--json").stdout)
    labels, sections = text_view(text)

    # Each heading line and the JSON's value for it: a label the text gains without a
    # counterpart here fails the test (add it to --json, then here).
    checks = {
        "run": lambda v: v == data["id"],
        "experiment": lambda v: v == data["experiment"],
        "state": lambda v: v.split(" ", 1)[0] == data["state"],
        "created": lambda v: v == when(data["created"]),
        "ended": lambda v: v == when(data["ended"]),
        "sweep": lambda v: v == f"{data['sweep']} (trial {data['trial']})",
        "remote job": lambda v: v == data["remote_job"],
        "exit code": lambda v: v == str(data["exit_code"]),
        "error": lambda v: v == data["error"],
        "script": lambda v: (
            v == f"{data['script']['entry_script']} in {data['script']['source_directory']}"
        ),
        "snapshot": lambda v: data["snapshot_hash"].startswith(v),
        "environment": lambda v: v == data["environment_hash"],
        "model": lambda v: v.split("|") == [f"{m['name']}:{m['version']}" for m in data["models"]],
    }
    assert set(labels) <= set(checks), (
        f"text fields without a JSON check: {set(labels) - set(checks)}"
    )
    for label, value in labels.items():
        assert checks[label](value), (label, value)
    assert {"run", "experiment", "state", "created", "ended", "script", "model"} <= set(labels)

    def first_words(name: str) -> list[str]:
        return [line.split()[0] for line in sections[name]]

    total = sections["stages"].pop()  # the wall time under the stages, not a stage
    assert total.split()[0] == "total"
    assert total.split()[1] == human_seconds(data["total_seconds"])

    section_checks = {
        "stages": lambda: (
            [(line.split()[0], line.split()[1]) for line in sections["stages"]]
            == [(name, stage["state"]) for name, stage in data["stages"].items()]
            and all(
                (stage["message"] or "") in line
                for line, stage in zip(sections["stages"], data["stages"].values(), strict=True)
            )
        ),
        "attempts": lambda: (
            first_words("attempts")[1:] == [str(a["attempt"]) for a in data["attempts"]]
        ),
        "params": lambda: first_words("params") == list(data["params"]),
        "metrics": lambda: first_words("metrics") == list(data["metrics"]),
        "tags": lambda: first_words("tags") == list(data["tags"]),
        "sinks": lambda: (
            [line.split(None, 1) for line in sections["sinks"]]
            == [[s["sink"], s["where"]] for s in data["sinks"]]
        ),
        "exports": lambda: sections["exports"] == [e["summary"] for e in data["exports"]],
        "outputs": lambda: first_words("outputs") == list(data["outputs"]),
        "links": lambda: len(sections["links"]) == len(data["output_links"]),
        "warning": lambda: len(sections["warning"]) == len(data["warnings"]),
    }
    assert set(sections) <= set(section_checks), set(sections) - set(section_checks)
    for name in sections:
        assert section_checks[name](), (name, sections[name])
    assert {"stages", "attempts", "params", "metrics", "tags", "sinks", "outputs"} <= set(sections)
    assert data["max_attempts"] == 2


# -- expkit ui ----------------------------------------------------------------------------------
@pytest.mark.slow  # a run with the mlflow sink, then MLflow's server starting: 20-60 s
@pytest.mark.parametrize(("stop", "tensorboard"), [("interrupt", False), ("terminate", True)])
def test_expkit_ui_serves_the_workspace_store_then_stops_leaving_no_process(
    two_sink_run, expkit_cli, background, stop, tensorboard
):
    _, run_id = two_sink_run
    tags = json.loads(expkit_cli("runs", "show", run_id, "--json").stdout)["tags"]
    port, board_port = free_port(), free_port()
    more = ["--tensorboard", "--tensorboard-port", str(board_port)] if tensorboard else []
    ui = background("ui", "--port", str(port), *more)
    address = f"http://127.0.0.1:{port}"

    ui.wait_for(f"MLflow UI: {address}  (Ctrl-C stops it)", timeout=180)
    if tensorboard:
        ui.wait_for(f"TensorBoard: http://127.0.0.1:{board_port}  (Ctrl-C stops it)", timeout=60)
    assert f"(run links name port 5000: use port {port} instead)" in ui.wait_for("run links")
    servers = descendants(ui.proc.pid)
    assert servers, ui.output
    with urllib.request.urlopen(address, timeout=10) as page:
        assert page.status == 200  # MLflow's UI itself
    api = f"{address}/ajax-api/2.0/mlflow"
    found = get_json(f"{api}/runs/get?run_id={tags['mlflow.run_id']}")["run"]
    assert found["info"]["run_name"] == run_id
    assert found["info"]["experiment_id"] == tags["mlflow.experiment_id"]
    listed = get_json(f"{api}/artifacts/list?run_uuid={tags['mlflow.run_id']}&path=outputs")
    assert [f["path"] for f in listed["files"]] == ["outputs/model.pt"]
    got = f"{address}/get-artifact?path=outputs/model.pt&run_uuid={tags['mlflow.run_id']}"
    with urllib.request.urlopen(got, timeout=10) as artifact:
        assert artifact.read() == b"weights"
    versions = get_json(f"{api}/registered-models/get?name=tiny")["registered_model"]
    assert versions["name"] == "tiny"
    if tensorboard:  # the run's event files are a run there, with its curve
        board = f"http://127.0.0.1:{board_port}/data/plugin/scalars"
        eventually(lambda: f"{run_id}/tensorboard" in get_json(f"{board}/tags"), 60, "the run")
        curve = get_json(f"{board}/scalars?run={run_id}/tensorboard&tag=loss")
        assert [point[1] for point in curve] == [0, 1, 2]

    getattr(ui, stop)()  # Ctrl-C, or SIGTERM as `kill` sends it
    if stop == "terminate":  # a service manager that sends it again while the servers stop
        time.sleep(0.2)
        ui.terminate()
    assert ui.wait(60) == 0, ui.output
    said = "stopped the MLflow UI and TensorBoard" if tensorboard else "stopped the MLflow UI"
    assert said in ui.output, ui.output
    assert [pid for pid in servers if alive(pid)] == []
    for gone in [address, f"http://127.0.0.1:{board_port}"][: 1 + tensorboard]:
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(gone, timeout=5)
    assert "Traceback" not in ui.output


@pytest.mark.slow  # two MLflow servers starting: 20-60 s
def test_two_expkit_ui_on_one_port_one_serves_and_the_other_says_the_port_is_taken(
    expkit_workspace, background, expkit_cli, tmp_path
):
    """Two workspaces' UIs started at once on one port: both find it free, and the one whose
    server binds it second must not take the other's answers for its own. A second `expkit
    ui` on a workspace that has one running is refused at once."""
    from mlflow import MlflowClient

    from expkit.workspace import Workspace

    other = Workspace.init(tmp_path / "other")
    for workspace in (expkit_workspace, other):
        MlflowClient(f"sqlite:///{workspace.path / 'mlflow.db'}").search_experiments()
    port = free_port()
    first = background("ui", "--port", str(port))
    second = background("ui", "--port", str(port), "--workspace", str(other.path))

    ended = lambda: first.proc.poll() is not None or second.proc.poll() is not None  # noqa: E731
    eventually(ended, 180, "one of them to give up")
    loser, winner = (first, second) if first.proc.poll() is not None else (second, first)
    assert loser.wait() == 2, loser.output
    assert "address already in use" in loser.output.lower()
    assert "MLflow UI: http" not in loser.output
    winner.wait_for(f"MLflow UI: http://127.0.0.1:{port}  (Ctrl-C stops it)", timeout=180)
    servers = descendants(winner.proc.pid)
    where = other.path if winner is second else expkit_workspace.path
    again = expkit_cli("ui", "--port", str(free_port()), "--workspace", str(where))
    assert again.returncode == 2
    assert again.stderr == (
        f"expkit: error: another `expkit ui` serves this workspace (its log: "
        f"{where / 'mlflow-ui.log'}): open its address, or stop it first\n"
    )
    winner.interrupt()
    assert winner.wait(60) == 0, winner.output
    assert [pid for pid in servers if alive(pid)] == []


# -- refusals: one line, exit 2 -----------------------------------------------------------------
def test_expkit_ui_without_a_store_says_how_to_make_one(expkit_cli, expkit_workspace):
    done = expkit_cli("ui", "--port", str(free_port()))

    assert done.returncode == 2
    assert done.stderr == (
        f"expkit: error: no MLflow store yet ({expkit_workspace.path / 'mlflow.db'} does not "
        "exist): run a job with `metrics: [mlflow]` or `model.registries: [mlflow]` first\n"
    )
    assert not (expkit_workspace.path / "mlflow.db").exists()


def test_expkit_ui_on_a_tracking_server_names_its_address(expkit_cli, expkit_workspace):
    config = expkit_workspace.path / "config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "mlflow": {"tracking_uri": "http://mlflow:5000"}}))

    done = expkit_cli("ui")

    assert done.returncode == 2
    assert done.stderr == (
        "expkit: error: the workspace's MLflow store is the tracking server http://mlflow:5000: "
        "open that address in a browser (`expkit ui` serves a store on this machine)\n"
    )


def test_expkit_ui_refuses_a_port_in_use_and_a_missing_mlflow(expkit_workspace, expkit_cli):
    (expkit_workspace.path / "mlflow.db").write_bytes(b"")  # a store, as far as the check goes
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = expkit_cli("ui", "--port", str(port))
    assert done.returncode == 2
    assert done.stderr == (
        f"expkit: error: cannot listen on 127.0.0.1:{port} (Address already in use): choose "
        f"another port, e.g. `expkit ui --port {port + 1}`\n"
    )

    hide = "import sys\nsys.modules['mlflow'] = None  # as if it were not installed\n"
    code = hide + "from expkit.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    missing = subprocess.run(
        [sys.executable, "-c", code, "ui"],
        capture_output=True,
        text=True,
        env={**os.environ, "EXPKIT_WORKSPACE": str(expkit_workspace.path)},
    )
    assert missing.returncode == 2
    assert missing.stderr == (
        f"expkit: error: mlflow is not installed in {sys.executable}; "
        "pip install 'expkit[mlflow]'\n"
    )


def test_expkit_ui_help_describes_it_with_an_example(expkit_cli):
    done = expkit_cli("ui", "--help")

    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "Start MLflow's UI (`mlflow server`) on the workspace's MLflow store" in text
    assert "--port PORT port to listen on (default 5000)" in text
    assert "examples: expkit ui expkit ui --port 5001 --tensorboard" in text
    assert "--tensorboard also TensorBoard on the runs' event files (port 6006)" in text
