"""The in-script metrics API and the pipeline behind it: channel -> history -> metric sinks."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import expkit
from conftest import bare_env
from expkit import metrics as metric_pipeline
from expkit.capabilities import MetricWriter, Option, declare_options
from expkit.errors import UserError

NOTICE = "expkit: this script is not running under expkit; metrics are not recorded"

EVERY_KIND = """
from expkit import Run
run = Run.get_context()
run.log("lr", 0.001)
for step in range(3):
    run.log("loss", 1.0 / (step + 1), step=step)
run.log_list("val_acc", [0.5, 0.75, 0.875])
run.log_row("per_class", cls=0, precision=0.9)
run.log_row("per_class", cls=1, precision=0.8)
run.log("note", "warmup done")
run.log("epochs", 12)
run.log("converged", True)
run.log("blew_up", float("nan"))
run.log("overflow", float("inf"))
run.log("underflow", float("-inf"))
run.set_tags({"optimizer": "sgd", "seed": 7})
run.tag("baseline")
print("logged everything")
"""


# -- outside expkit -------------------------------------------------------------------------------
def test_the_api_outside_expkit_accepts_everything_and_records_nothing(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "train.py").write_text(EVERY_KIND + "print(run.offline, run.id)\nrun.flush()\n")
    env = bare_env()

    done = subprocess.run(
        [sys.executable, "train.py"], cwd=folder, env=env, capture_output=True, text=True
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == "logged everything\nTrue None\n"
    assert done.stderr.splitlines() == [NOTICE]
    assert sorted(p.name for p in folder.iterdir()) == ["train.py"]


# -- inside expkit: what comes back ---------------------------------------------------------------
def test_every_kind_of_value_comes_back_in_azure_shapes(run_job, expkit_cli):
    result = run_job({}, script=EVERY_KIND)

    assert result.state == "completed", result.output
    got = result.run.get_metrics()
    assert list(got) == [
        "lr",
        "loss",
        "val_acc",
        "per_class",
        "note",
        "epochs",
        "converged",
        "blew_up",
        "overflow",
        "underflow",
    ]
    assert got["lr"] == 0.001
    assert got["loss"] == [1.0, 0.5, 1.0 / 3]
    assert got["val_acc"] == [0.5, 0.75, 0.875]
    assert got["per_class"] == {"cls": [0, 1], "precision": [0.9, 0.8]}
    assert got["note"] == "warmup done"
    assert got["epochs"] == 12
    assert got["converged"] == 1
    assert isinstance(got["blew_up"], float) and math.isnan(got["blew_up"])
    assert got["overflow"] == math.inf
    assert got["underflow"] == -math.inf
    assert result.run.get_metrics("loss") == {"loss": [1.0, 0.5, 1.0 / 3]}
    steps = [r["step"] for r in result.workspace.history.metrics.of(result.record.id, "val_acc")]
    assert steps == [0, 1, 2]
    assert result.run.get_tags() == {"optimizer": "sgd", "seed": "7", "baseline": ""}

    listed = expkit_cli("metrics", result.record.id)

    assert listed.returncode == 0, listed.stderr
    rows = [line.split()[:3] for line in listed.stdout.splitlines()]
    assert rows[0] == ["METRIC", "STEP", "VALUE"]
    assert ["loss", "1", "0.5"] in rows
    assert ["val_acc", "2", "0.875"] in rows
    assert ["lr", "-", "0.001"] in rows
    assert ["blew_up", "-", "nan"] in rows
    assert ["overflow", "-", "inf"] in rows
    only = expkit_cli("metrics", result.record.id, "loss")
    assert [line.split()[:3] for line in only.stdout.splitlines()[1:]] == [
        ["loss", "0", "1"],
        ["loss", "1", "0.5"],
        ["loss", "2", "0.3333"],
    ]


def test_a_tight_loop_of_200000_values_is_recorded_completely_and_in_order(run_job):
    count = 200_000
    result = run_job(
        {},
        script=f"""
from expkit import Run
run = Run.get_context()
for i in range({count}):
    run.log("x", i, step=i)
""",
    )

    assert result.state == "completed", result.output
    rows = result.workspace.history.metrics.of(result.record.id, "x")
    assert len(rows) == count
    assert [r["value"] for r in rows] == [float(i) for i in range(count)]
    assert [r["step"] for r in rows] == list(range(count))
    assert f"{count} metric values recorded" in result.output


def test_metrics_are_visible_while_the_run_is_still_running(write_job, expkit_workspace, tmp_path):
    release = tmp_path / "release"
    job = write_job(
        {"args": [str(release)]},
        script="""
        import os, sys, time
        from expkit import Run
        run = Run.get_context()
        run.log("ready", 1)
        deadline = time.time() + 120
        while not os.path.exists(sys.argv[1]) and time.time() < deadline:
            time.sleep(0.05)
        run.log("released", 1)
        """,
    )
    driver = subprocess.Popen(
        [sys.executable, "-m", "expkit", "run", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        history = expkit_workspace.history
        seen = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and driver.poll() is None:
            record = history.runs.find("latest")
            if record is not None and "ready" in history.metrics.latest(record.id):
                seen = record
                break
            time.sleep(0.05)
        assert seen is not None, "the metric never showed up during the run"
        assert history.runs.get(seen.id).state == "running"
        shown = subprocess.run(
            [sys.executable, "-m", "expkit", "runs", "show", "latest"],
            capture_output=True,
            text=True,
        )
        assert "state       running" in shown.stdout
        assert "ready" in shown.stdout
        assert "released" not in shown.stdout
    finally:
        release.touch()
        output, _ = driver.communicate(timeout=60)

    assert driver.returncode == 0, output.decode(errors="replace")
    assert history.runs.get(seen.id).state == "completed"
    assert history.metrics.latest(seen.id) == {"ready": 1.0, "released": 1.0}


# -- metric sinks ---------------------------------------------------------------------------------
class Writer(MetricWriter):
    def __init__(self, sink, run, options) -> None:
        self.sink, self.run, self.options = sink, run, options
        self.batches: list[list] = []
        self.finished_at: list[float] = []
        self.closed: list[str] = []
        self.attempts = 0
        self.params: list[dict] = []  # each log_params that went through
        self.calls: list[str] = []  # "params" and "send", in the order they went through

    @property
    def received(self) -> list[tuple]:
        return [(m.name, m.value, m.step) for batch in self.batches for m in batch]

    def send(self, metrics) -> None:
        self.attempts += 1
        if self.sink.fail:
            raise ConnectionError("collector unreachable")
        time.sleep(self.sink.delay)
        self.batches.append(list(metrics))
        self.finished_at.append(time.time())
        self.calls.append("send")

    def log_params(self, params) -> None:
        if self.sink.params_failures > 0:
            self.sink.params_failures -= 1
            raise ConnectionError("collector busy")
        self.params.append(dict(params))
        self.calls.append("params")

    def close(self, outcome) -> None:
        self.closed.append(outcome.state)


class Sink(expkit.MetricSink):
    description = "keeps what it receives, for the test to look at"
    takes = declare_options(project=Option(str, help="a name the test passes through"))

    def __init__(
        self, name: str, delay: float = 0.0, fail: bool = False, params_failures: int = 0
    ) -> None:
        self.name, self.delay, self.fail = name, delay, fail
        self.params_failures = params_failures  # how many log_params calls raise first
        self.writers: list[Writer] = []
        self._lock = threading.Lock()

    def open(self, run, options) -> Writer:
        writer = Writer(self, run, options)
        with self._lock:
            self.writers.append(writer)
        return writer


class SinkPlugin:
    def __init__(self, *sinks: Sink) -> None:
        self.sinks = list(sinks)

    @expkit.hookimpl
    def expkit_metric_sinks(self):
        return self.sinks


STEPS = """
import sys
from expkit import Run
run = Run.get_context()
for step in range(5):
    run.log("loss", 1.0 / (step + 1), step=step)
run.log("note", "done")
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""
EXPECTED = [("loss", 1.0 / (s + 1), s) for s in range(5)] + [("note", "done", None)]


def test_a_sink_receives_every_metric_and_the_final_state(run_job, register_plugin):
    sink = Sink("recorder")
    register_plugin(SinkPlugin(sink), "recorder-plugin")

    result = run_job(
        {"metrics": [{"name": "recorder", "options": {"project": "digits"}}]}, script=STEPS
    )
    failed = run_job({"metrics": ["recorder"], "args": ["2"]}, script=STEPS)

    assert result.state == "completed", result.output
    assert failed.state == "failed"
    first, second = sink.writers
    assert first.run.run_id == result.record.id
    assert first.options == {"project": "digits"}
    assert first.received == EXPECTED
    assert first.closed == ["completed"]
    assert second.received == EXPECTED
    assert second.closed == ["failed"]


def test_a_slow_sink_does_not_hold_up_the_script(run_job, register_plugin):
    sink = Sink("slow", delay=0.5)
    register_plugin(SinkPlugin(sink), "slow-plugin")

    result = run_job(
        {"metrics": ["slow"]},
        script="""
import os, time
from expkit import Run
run = Run.get_context()
for step in range(4):
    run.log("loss", 1.0 / (step + 1), step=step)
    time.sleep(0.3)  # a few pump cycles between logs: several batches reach the sink
run.log("last", 1)
logged_last = time.time()
os.makedirs("outputs")
with open("outputs/logged_last", "w") as f:
    f.write(repr(logged_last))
""",
    )

    assert result.state == "completed", result.output
    (writer,) = sink.writers
    assert writer.received == [("loss", 1.0 / (s + 1), s) for s in range(4)] + [("last", 1.0, None)]
    assert len(writer.batches) > 1
    # The script was done logging before the sink had taken the last value: log() never
    # waited for the sink, which caught up from the history afterwards.
    logged_last = float((result.run_dir / "outputs" / "logged_last").read_text())
    assert writer.finished_at[-1] > logged_last
    assert writer.closed == ["completed"]


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(metric_pipeline, "RETRY_DELAYS", (0.01, 0.01))


def test_a_failing_sink_is_reported_and_the_run_still_completes(
    run_job, register_plugin, quick_retries, expkit_cli
):
    sink = Sink("flaky", fail=True)
    register_plugin(SinkPlugin(sink), "flaky-plugin")

    result = run_job({"metrics": ["flaky"]}, script=STEPS)

    assert result.state == "completed", result.output
    assert result.record.error is None
    problem = "plugin flaky-plugin, metric sink 'flaky' send: collector unreachable"
    events = result.workspace.history.events.of(result.record.id, "sink-failed")
    assert [e["message"] for e in events] == [problem]
    assert f"warning: {problem}" in result.output
    (writer,) = sink.writers
    assert writer.attempts == 3  # the first try and one per retry delay
    assert writer.closed == []
    # The history has every metric whatever the sink did.
    assert result.run.get_metrics()["loss"] == [1.0 / (s + 1) for s in range(5)]
    shown = expkit_cli("runs", "show", result.record.id)
    assert f"warning: {problem}" in shown.stdout


def test_a_sink_gets_the_parameters_new_or_changed_before_the_values_retried_as_send(
    run_job, register_plugin, quick_retries
):
    sink = Sink("params", params_failures=1)
    register_plugin(SinkPlugin(sink), "params-plugin")

    result = run_job(
        {"metrics": ["params"], "args": {"lr": 0.1, "epochs": 3}},
        script="""
import os, sqlite3, time
from expkit import Run
run = Run.get_context()
run.log("loss", 1.0, step=0)
run.flush()
history = os.path.join(os.environ["EXPKIT_WORKSPACE"], "history.db")
query = "SELECT metric_id FROM sink_cursors WHERE run_id = ? AND sink = 'params'"
while True:  # until the sink has the first value: then the parameters change
    with sqlite3.connect(history) as db:
        if [row for row in db.execute(query, (os.environ["EXPKIT_RUN_ID"],)) if row[0]]:
            break
    time.sleep(0.05)
run.log_params({"lr": 0.2, "batch": 8})
run.log("loss", 0.5, step=1)
""",
    )

    assert result.state == "completed", result.output
    (writer,) = sink.writers
    assert writer.params == [{"lr": "0.1", "epochs": "3"}, {"lr": "0.2", "batch": "8"}]
    assert writer.calls == ["params", "send", "params", "send"]
    assert writer.received == [("loss", 1.0, 0), ("loss", 0.5, 1)]
    history = result.workspace.history
    assert history.sink_cursors.get(result.record.id, "params") == (
        history.metrics.last_id(result.record.id),
        max(i for i, _, _ in history.params.after(result.record.id)),
    )


def test_a_sink_that_stops_making_progress_is_reported_at_post_process(
    run_job, register_plugin, monkeypatch
):
    monkeypatch.setattr(metric_pipeline, "DRAIN_STALL_SECONDS", 0.3)
    sink = Sink("stuck", delay=3.0)  # each batch takes ten times the stall limit
    register_plugin(SinkPlugin(sink), "stuck-plugin")

    result = run_job({"metrics": ["stuck"]}, script=STEPS)

    assert result.state == "completed", result.output
    problem = "plugin stuck-plugin, metric sink 'stuck' send: delivered nothing for 0.3 s; gave up"
    events = result.workspace.history.events.of(result.record.id, "sink-failed")
    assert [e["message"] for e in events] == [problem]
    (writer,) = sink.writers
    assert writer.closed == []  # not told the run is over while a batch is on its way


def test_a_required_sink_that_fails_fails_the_run(run_job, register_plugin, quick_retries):
    register_plugin(SinkPlugin(Sink("flaky", fail=True)), "flaky-plugin")

    result = run_job(
        {"metrics": [{"name": "flaky", "required": True}], "model": {"name": "m"}},
        script=STEPS,
    )

    assert result.state == "failed"
    assert result.record.error == (
        "post-process: required plugin flaky-plugin, metric sink 'flaky' send: "
        "collector unreachable"
    )
    assert result.workspace.history.models.versions() == []


def test_an_unknown_sink_is_rejected_before_the_run_starts(run_job):
    with pytest.raises(UserError, match=r"metrics\.0: no metric sink named 'nowhere'"):
        run_job({"metrics": ["nowhere"]}, script="print('never')\n")


def test_script_api_helpers_are_stdlib_only():
    """`from expkit import Run` in a training script pulls in no third-party package."""
    code = textwrap.dedent(
        """
        import sys
        from expkit import Run
        Run.get_context()
        loaded = [m for m in ("pydantic", "yaml", "pluggy") if m in sys.modules]
        print(loaded)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr
