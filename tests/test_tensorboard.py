"""The `tensorboard` metric sink, read back with TensorBoard's own readers and server."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator, plugin_event_multiplexer
from tensorboard.util import tensor_util

from conftest import error_line, eventually

EVERY_KIND = """
import math
from expkit import Run
run = Run.get_context()
run.log("lr", 0.001)
for epoch in range(5):
    run.log("loss", 1.0 / (epoch + 1), step=epoch * 10)
    run.log("acc", 0.5 + epoch / 10, step=epoch * 10)
run.log_list("val_acc", [0.5, 0.75, 0.875])
for i in range(3):
    run.log("lap", i * i)  # no step: 0, 1, 2 in the order logged
run.log("epochs", 12)
run.log("converged", True)
run.log("blew_up", float("nan"))
run.log("overflow", float("inf"))
run.log("note", "warmup done")
run.log_row("per_class", cls=0, precision=0.9)
"""


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar in the event files of `logdir`: {tag: [(step, value, wall time)]}."""
    events = event_accumulator.EventAccumulator(
        str(logdir),
        size_guidance={event_accumulator.TENSORS: 0},  # 0: keep all, no sampling
    )
    events.Reload()
    try:
        scalars = events.PluginTagToContent("scalars")  # not the HParams session's tags
    except KeyError:  # nothing written yet
        scalars = {}
    return {
        tag: [
            (e.step, float(tensor_util.make_ndarray(e.tensor_proto)), e.wall_time)
            for e in events.Tensors(tag)
        ]
        for tag in events.Tags()["tensors"]
        if tag in scalars
    }


def expected_scalars(result) -> dict[str, list[tuple[int, float, float]]]:
    """What the run history holds, as TensorBoard should show it (float32 values)."""
    expected: dict[str, list] = {}
    for row in result.workspace.history.metrics.of(result.record.id):
        if row["payload"] is not None and row["payload"] != "NaN":
            continue  # strings and table rows are not scalars
        value = math.nan if row["value"] is None else row["value"]
        points = expected.setdefault(row["name"], [])
        step = len(points) if row["step"] is None else row["step"]
        points.append((step, float(np.float32(value)), row["ts"]))
    return expected


def comparable(points: list[tuple[int, float, float]]) -> list[tuple]:
    """NaN never equals itself: compare it as a word."""
    return [(step, "nan" if math.isnan(value) else value, ts) for step, value, ts in points]


def test_every_numeric_metric_is_a_scalar_with_its_step_and_wall_time(run_job):
    result = run_job({"metrics": ["tensorboard"]}, script=EVERY_KIND)

    assert result.state == "completed", result.output
    logdir = result.run_dir / "tensorboard"
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
    got = read_scalars(logdir)
    want = expected_scalars(result)
    assert list(got) == [
        "lr",
        "loss",
        "acc",
        "val_acc",
        "lap",
        "epochs",
        "converged",
        "blew_up",
        "overflow",
    ]
    assert list(want) == list(got)
    for tag in want:
        assert comparable(got[tag]) == comparable(want[tag]), tag
    assert [s for s, _, _ in got["loss"]] == [0, 10, 20, 30, 40]
    assert [v for _, v, _ in got["loss"]] == pytest.approx([1 / (i + 1) for i in range(5)])
    assert [(s, v) for s, v, _ in got["lap"]] == [(0, 0.0), (1, 1.0), (2, 4.0)]
    assert [(s, v) for s, v, _ in got["val_acc"]] == [(0, 0.5), (1, 0.75), (2, 0.875)]
    assert got["overflow"][0][1] == math.inf and math.isnan(got["blew_up"][0][1])
    assert "sink" not in result.output  # no failure reported


def test_thousands_of_values_across_batches_all_arrive_in_order(run_job):
    count = 12_000  # more than two of the sink worker's batches
    result = run_job(
        {"metrics": ["tensorboard"]},
        script=f"""
        from expkit import Run
        run = Run.get_context()
        for i in range({count}):
            run.log("x", i, step=i)
            run.log("tick", -i)  # no step: numbered on, batch after batch
        """,
    )

    assert result.state == "completed", result.output
    got = read_scalars(result.run_dir / "tensorboard")
    assert [(s, v) for s, v, _ in got["x"]] == [(i, float(i)) for i in range(count)]
    assert [(s, v) for s, v, _ in got["tick"]] == [(i, float(-i)) for i in range(count)]


def test_other_ranks_get_curves_of_their_own(run_job):
    result = run_job(
        {"metrics": ["tensorboard"]},
        script="""
        import os, subprocess, sys
        from expkit import Run
        worker = "from expkit import Run\\nRun.get_context().log('loss', 9.0, step=0)\\n"
        subprocess.run([sys.executable, "-c", worker], env={**os.environ, "RANK": "1"}, check=True)
        Run.get_context().log("loss", 1.0, step=0)
        """,
    )

    assert result.state == "completed", result.output
    got = read_scalars(result.run_dir / "tensorboard")
    assert {tag: [(s, v) for s, v, _ in points] for tag, points in got.items()} == {
        "loss": [(0, 1.0)],
        "loss/rank-1": [(0, 9.0)],
    }


def test_curves_appear_while_the_run_is_still_going(write_job, expkit_workspace, tmp_path):
    release = tmp_path / "release"
    job = write_job(
        {"metrics": ["tensorboard"], "args": [str(release)]},
        script="""
        import os, sys, time
        from expkit import Run
        run = Run.get_context()
        run.log("loss", 0.5, step=1)
        deadline = time.time() + 120
        while not os.path.exists(sys.argv[1]) and time.time() < deadline:
            time.sleep(0.05)
        run.log("loss", 0.25, step=2)
        """,
    )
    driver = subprocess.Popen(
        [sys.executable, "-m", "expkit", "run", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        logdir = expkit_workspace.run_dir("test_1") / "tensorboard"

        def shown() -> bool:
            return logdir.is_dir() and read_scalars(logdir).get("loss") is not None

        eventually(shown, timeout=60, what="the first point in the event file")
        assert expkit_workspace.history.runs.get("test_1").state == "running"
        assert [(s, v) for s, v, _ in read_scalars(logdir)["loss"]] == [(1, 0.5)]
    finally:
        release.touch()
        output, _ = driver.communicate(timeout=60)

    assert driver.returncode == 0, output.decode(errors="replace")
    assert [(s, v) for s, v, _ in read_scalars(logdir)["loss"]] == [(1, 0.5), (2, 0.25)]


def hparams_session(logdir: Path) -> tuple[dict, str]:
    """The HParams session in the event files of `logdir`: ({name: value}, end status)."""
    from tensorboard.plugins.hparams import api_pb2, metadata

    events = event_accumulator.EventAccumulator(str(logdir))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    values = {}
    for key, value in start.hparams.items():
        values[key] = getattr(value, value.WhichOneof("kind"))
    return values, api_pb2.Status.Name(end.status)


def test_the_run_s_parameters_are_its_hparams_session(run_job):
    result = run_job(
        {
            "metrics": ["tensorboard"],
            "args": {"--lr": 0.1, "optimizer": "sgd", "nesterov": True, "epochs": 2},
        },
        script="""
        from expkit import Run
        run = Run.get_context()
        run.log_params({"batch": 64, "optimizer": "adam"})
        run.log("loss", 0.5, step=0)
        run.log("loss", 0.25, step=1)
        """,
    )

    assert result.state == "completed", result.output
    logdir = result.run_dir / "tensorboard"
    values, status = hparams_session(logdir)
    assert values == {
        "lr": 0.1,
        "optimizer": "adam",  # the script's value, logged later, wins
        "nesterov": True,
        "epochs": 2.0,
        "batch": 64.0,
    }
    assert status == "STATUS_SUCCESS"
    assert [(s, v) for s, v, _ in read_scalars(logdir)["loss"]] == [(0, 0.5), (1, 0.25)]
    (outcome,) = result.workspace.history.events.of(result.record.id, "sink-outcome")
    assert outcome["message"] == "tensorboard ok (2 values)"


# -- what `tensorboard --logdir` shows ------------------------------------------------------------
@pytest.fixture
def two_runs(run_job):
    """Two runs of the experiment with the tensorboard sink, different curves."""
    script = """
    from expkit import Run
    run = Run.get_context()
    for step in range(4):
        run.log("loss", {scale} / (step + 1), step=step)
    """
    results = [
        run_job(
            {"metrics": ["tensorboard"], "args": {"scale": scale}},
            script=script.format(scale=scale),
        )
        for scale in (1, 2)
    ]
    assert [r.state for r in results] == ["completed", "completed"]
    return results


def test_the_runs_folder_as_logdir_holds_every_run(two_runs, expkit_workspace):
    """TensorBoard's own directory loader: each run is `<run id>/tensorboard`."""
    loader = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"scalars": 0})
    loader.AddRunsFromDirectory(str(expkit_workspace.path / "runs"))
    loader.Reload()

    assert loader.PluginRunToTagToContent("scalars") == {
        "test_1/tensorboard": {"loss": b""},
        "test_2/tensorboard": {"loss": b""},
    }
    for run, scale in (("test_1", 1), ("test_2", 2)):
        points = loader.Tensors(f"{run}/tensorboard", "loss")
        values = [float(tensor_util.make_ndarray(p.tensor_proto)) for p in points]
        assert [p.step for p in points] == [0, 1, 2, 3]
        assert values == pytest.approx([scale / (s + 1) for s in range(4)])


def test_a_tensorboard_server_on_the_runs_folder_serves_the_curves(two_runs, expkit_workspace):
    """`tensorboard --logdir WORKSPACE/runs`, asked over HTTP as its web page asks."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(expkit_workspace.path / "runs"),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--load_fast",
            "false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = None
        for line in server.stderr:
            found = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
            if found:
                url = found.group(1)
                break
        assert url, "tensorboard did not say where it serves"

        def get(path: str):
            with urllib.request.urlopen(url + path, timeout=30) as response:
                return json.load(response)

        eventually(lambda: len(get("data/runs")) == 2, timeout=60, what="both runs loaded")
        assert sorted(get("data/runs")) == ["test_1/tensorboard", "test_2/tensorboard"]
        for run, scale in (("test_1", 1), ("test_2", 2)):
            points = get(f"data/plugin/scalars/scalars?run={run}/tensorboard&tag=loss")
            assert [step for _, step, _ in points] == [0, 1, 2, 3]
            assert [v for _, _, v in points] == pytest.approx([scale / (s + 1) for s in range(4)])

        # the HParams dashboard: a row per run, its parameters and final metrics
        request = urllib.request.Request(
            url + "data/plugin/hparams/session_groups",
            data=json.dumps(
                {
                    "experimentName": "",
                    "startIndex": 0,
                    "sliceSize": 10,
                    "allowedStatuses": ["STATUS_SUCCESS", "STATUS_FAILURE"],
                    "colParams": [{"hparam": "scale"}, {"metric": {"tag": "loss"}}],
                }
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            groups = json.load(response)["sessionGroups"]
        rows = {
            g["name"]: (
                g["hparams"],
                {m["name"]["tag"]: m["value"] for m in g["metricValues"]},
                g["sessions"][0]["status"],
            )
            for g in groups
        }
        assert rows == {
            "test_1/tensorboard": ({"scale": 1.0}, {"loss": 0.25}, "STATUS_SUCCESS"),
            "test_2/tensorboard": ({"scale": 2.0}, {"loss": 0.5}, "STATUS_SUCCESS"),
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


# -- without tensorboard --------------------------------------------------------------------------
BLOCK_TENSORBOARD = (
    "import sys\n"
    "sys.modules['tensorboard'] = None  # as if it were not installed\n"
    "from expkit.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
INSTALL_HINT = "tensorboard is not installed; pip install 'expkit[tensorboard]'"


def test_without_tensorboard_the_plugin_and_a_job_that_names_it_say_how_to_install_it(
    write_job, expkit_workspace
):
    def expkit_without_tensorboard(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", BLOCK_TENSORBOARD, *args],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    listed = expkit_without_tensorboard("plugins")
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"^tensorboard .*not loaded: {re.escape(INSTALL_HINT)}$", listed.stdout, re.M)

    job = write_job({"metrics": ["tensorboard"]}, script="print('never runs')\n")
    refused = expkit_without_tensorboard("run", str(job))
    assert refused.returncode == 2
    assert INSTALL_HINT in error_line(refused)
    assert expkit_workspace.history.runs.recent() == []
