"""The metric pump in bounded batches: a burst larger than a batch is stored whole, once and
in order, also across a driver that dies between two batches; a line cut by a batch's end is
read whole by the next; the driver's memory does not grow with a burst; and the history's
reads for the sinks and `runs show` page through a run's values instead of gathering them."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import bare_env
from expkit import metrics as pipeline
from expkit.channel import calls_of
from expkit.context import ATTEMPT_ENV, CHANNEL_ENV, RUN_ID_ENV
from expkit.metrics import ChannelReader, MetricPump
from expkit.workspace import Workspace

BURST = """
import sys
from expkit import Run, context
context.WRITE_BATCH = int(sys.argv[3])  # values a batch (a columns line) of the writer
run = Run.get_context()
name, count = sys.argv[1], int(sys.argv[2])
for i in range(count):
    run.log(name, float(i), step=i)
if len(sys.argv) > 4:
    run.log_row("wide", text="x" * int(sys.argv[4]))
"""


def burst(tmp_path: Path, channel: Path, count: int, name: str = "x", **options: str) -> None:
    """A real script process logging `count` values of `name` (value i at step i) through
    `run.log()` into `channel`, `per_line` values a channel line (the writer's batch: 50
    unless given, a columns line each); `wide`: then one table row of that many characters;
    `attempt`: as that attempt of the run."""
    script = tmp_path / "burst.py"
    script.write_text(textwrap.dedent(BURST))
    env = bare_env(**{CHANNEL_ENV: str(channel), RUN_ID_ENV: "run_1"})
    if "attempt" in options:
        env[ATTEMPT_ENV] = options["attempt"]
    argv = [sys.executable, str(script), name, str(count), options.get("per_line", "50")]
    done = subprocess.run(
        [*argv, *([options["wide"]] if "wide" in options else [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture
def channel(tmp_path: Path) -> Path:
    folder = tmp_path / "metrics"
    folder.mkdir()
    return folder


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> int:
    """Batches of 16 KiB (a few hundred lines) instead of 1 MiB."""
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 16 << 10)
    monkeypatch.setattr(pipeline, "MIN_SHARE", 1 << 10)
    return 16 << 10


def stored(history, name: str = "x") -> list[tuple[int, float]]:
    return [(r["step"], r["value"]) for r in history.metrics.of("run_1", name)]


def lines_up_to(channel: Path, offsets: dict[str, int]) -> int:
    """How many values the channel's complete lines hold before the recorded offsets (a
    columns line holds many, see `expkit.channel`)."""
    return sum(
        len(list(calls_of(json.loads(line))))
        for name, offset in offsets.items()
        for line in (channel / name).read_bytes()[:offset].splitlines()
    )


# -- bounded batches, every value once ----------------------------------------------------------
def test_a_burst_larger_than_a_batch_is_stored_once_in_order_across_a_crash(
    expkit_workspace, tmp_path, channel, small_batches, monkeypatch
):
    count = 20_000
    burst(tmp_path, channel, count)
    size = sum(p.stat().st_size for p in channel.iterdir())
    assert size > 20 * small_batches  # many batches
    history = expkit_workspace.history

    first = MetricPump(history, "run_1", channel)
    for _ in range(3):
        assert first.pump_batch()  # a backlog remains after each
        # What the history holds always matches the offsets it records with it: a driver
        # that dies now leaves nothing half-recorded.
        offsets = history.metrics.offsets_of("run_1")
        assert history.metrics.count("run_1") == lines_up_to(channel, offsets) > 0
    assert stored(history) == [(i, float(i)) for i in range(history.metrics.count("run_1"))]

    # The driver dies; another (a re-attaching driver) reads on from the recorded offsets,
    # and the history fails it once on the way (a locked or full disk).
    second = MetricPump(history, "run_1", channel)
    add = history.metrics.add_values
    calls = iter(range(1_000_000))

    def flaky_add(*args, **kwargs):
        if next(calls) == 2:
            raise sqlite3.OperationalError("database or disk is full")
        return add(*args, **kwargs)

    monkeypatch.setattr(history.metrics, "add_values", flaky_add)
    with pytest.raises(sqlite3.OperationalError):
        second.pump()
    second.pump()

    assert stored(history) == [(i, float(i)) for i in range(count)]
    assert second.count + first.count == count
    assert second.problems() == [
        "metric values not recorded: OperationalError: database or disk is full"
    ]  # until the run's last pump (MetricPump.stop) succeeds


CRASHING_DRIVER = """
import sys
from pathlib import Path
from expkit.metrics import MetricPump
from expkit.workspace import Workspace
pump = MetricPump(Workspace(sys.argv[1]).history, "run_1", Path(sys.argv[2]))
pump.pump()
print(pump.count)
"""


def test_a_driver_killed_mid_burst_loses_nothing_and_stores_nothing_twice(
    expkit_workspace, tmp_path, channel
):
    count = 300_000
    burst(tmp_path, channel, count)
    history = expkit_workspace.history
    driver = subprocess.Popen(
        [sys.executable, "-c", CRASHING_DRIVER, str(expkit_workspace.path), str(channel)],
        env=bare_env(),
        stdout=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while history.metrics.last_id("run_1") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)  # between two batches, or within one
    driver.wait()
    at_the_kill = history.metrics.count("run_1")
    assert 0 < at_the_kill < count, "the kill came after the burst was stored: no crash"
    assert at_the_kill == lines_up_to(channel, history.metrics.offsets_of("run_1"))

    MetricPump(history, "run_1", channel).pump()

    assert stored(history) == [(i, float(i)) for i in range(count)]


def test_a_line_cut_by_the_end_of_a_batch_is_read_whole_by_the_next(tmp_path, channel, monkeypatch):
    monkeypatch.setattr(pipeline, "MIN_SHARE", 1)
    burst(tmp_path, channel, 10, wide="5000", per_line="1")  # a line per value
    (path,) = channel.iterdir()
    data = path.read_bytes()
    ends = [i + 1 for i, byte in enumerate(data) if byte == ord("\n")]
    assert len(ends) == 11

    reader = ChannelReader(channel)
    first = reader.read(limit=ends[2] + 5)  # three lines and a bit of the fourth
    assert [row[1] for row in first.rows] == [0, 1, 2]
    assert first.offsets == {path.name: ends[2]} and first.more
    reader.commit(first)
    second = reader.read(limit=ends[9] - ends[2] + 100)  # to a bit of the wide row
    assert [row[1] for row in second.rows] == [*range(3, 10)]
    assert second.offsets == {path.name: ends[9]} and second.more
    reader.commit(second)
    wide = reader.read(limit=100)  # a line longer than the batch: taken whole
    assert [row[0] for row in wide.rows] == ["wide"]
    assert json.loads(wide.rows[0][3]) == {"text": "x" * 5000}
    assert wide.offsets == {path.name: len(data)}
    reader.commit(wide)

    with open(path, "ab") as f:  # a line the script is still writing: left for later
        f.write(b'["m","x",10.0,10,1.0,0]\n["m","x",11.0,1')
    third = reader.read()
    assert [row[1] for row in third.rows] == [10] and not third.more
    reader.commit(third)
    with open(path, "ab") as f:
        f.write(b"1,1.0,0]\n")
    assert [row[1] for row in reader.read().rows] == [11]
    assert reader.bad_lines == 0


def test_an_earlier_attempts_backlog_is_stored_before_a_later_attempts_values(
    expkit_workspace, tmp_path, channel, small_batches
):
    burst(tmp_path, channel, 2, attempt="2")  # the later attempt's file is there first
    burst(tmp_path, channel, 5000, attempt="1")
    history = expkit_workspace.history

    pump = MetricPump(history, "run_1", channel)
    batches = 1
    while pump.pump_batch():
        batches += 1

    assert batches > 5
    rows = history.metrics.of("run_1")
    assert [r["attempt"] for r in rows] == [1] * 5000 + [2] * 2
    assert [r["step"] for r in rows] == [*range(5000), 0, 1]


def test_one_ranks_flood_does_not_hold_up_another_ranks_values(tmp_path, channel, small_batches):
    burst(tmp_path, channel, 5000, name="flood")
    burst(tmp_path, channel, 3, name="quiet")

    batch = ChannelReader(channel).read()

    assert batch.more
    names = [row[0] for row in batch.rows]
    assert names.count("quiet") == 3 and 0 < names.count("flood") < 5000


def test_a_bad_line_in_a_batch_is_skipped_alone(expkit_workspace, tmp_path, channel):
    burst(tmp_path, channel, 3)
    (path,) = channel.iterdir()
    with open(path, "ab") as f:
        f.write(b'not json\n["m","x",3.0,"three",1.0,0]\n["m","\\ud800",1.0,0,1.0,0]\n')
        f.write(b'["m","x",4.0,4,1.0,0]\n')
    history = expkit_workspace.history

    pump = MetricPump(history, "run_1", channel)
    pump.pump()

    assert stored(history) == [(0, 0.0), (1, 1.0), (2, 2.0), (4, 4.0)]
    assert pump.reader.bad_lines == 3
    assert history.metrics.offsets_of("run_1") == {path.name: path.stat().st_size}


def test_the_pumps_rows_are_stored_under_their_run_and_attempt_whatever_the_id_holds(
    expkit_workspace,
):
    """The pump's rows go in under the run id and attempt written into the statement
    (`add_values`): an id with a quote, or one SQL text cannot hold (a NUL), still names its
    own run only; a number goes to `value`, text (a payload's JSON) to `payload`."""
    history = expkit_workspace.history
    ids = ["it's", "a'); DROP TABLE metrics; --", "nul\x00id", "plain"]
    for n, run_id in enumerate(ids):
        rows = [("x", i, float(n * 10 + i), 1.0, 0) for i in range(3)]
        assert history.metrics.add_values(run_id, [(1, rows), (2, [("x", 3, "NaN", 2.0, 1)])]) == 4

    for n, run_id in enumerate(ids):
        got = [
            (r["run_id"], r["step"], r["value"], r["payload"], r["rank"], r["attempt"])
            for r in history.metrics.of(run_id, "x")
        ]
        assert got == [
            *[(run_id, i, float(n * 10 + i), None, 0, 1) for i in range(3)],
            (run_id, 3, None, "NaN", 1, 2),
        ]


# -- the history's reads: a page at a time --------------------------------------------------------
def test_pages_of_a_run_interleaved_with_another_come_in_order(expkit_workspace):
    history = expkit_workspace.history
    for i in range(50):  # two runs logging at once: their rows interleave
        history.metrics.add(
            "a", [("loss", i, float(i), None, 1.0, 0), ("acc", i, 0.5, None, 1.0, 0)]
        )
        history.metrics.add("b", [("loss", i, -float(i), None, 1.0, 0)])
    every = [r["id"] for r in history.metrics.of("a")]
    assert len(every) == 100

    pages, after = [], 0
    while page := history.metrics.of("a", after_id=after, limit=7):
        assert len(page) <= 7 and {r["run_id"] for r in page} == {"a"}
        pages += [r["id"] for r in page]
        after = page[-1]["id"]

    assert pages == every == sorted(every)
    assert history.metrics.last_id("a") == every[-1]
    assert history.metrics.span("b") == (every[0] + 2, every[-1] + 1)
    assert history.metrics.last_id("c") == 0 and history.metrics.of("c") == []
    assert history.metrics.names("a") == ["acc", "loss"]
    assert history.metrics.latest("a") == {"loss": 49.0, "acc": 0.5}
    assert history.metrics.latest("b") == {"loss": -49.0}


# -- the driver's memory ------------------------------------------------------------------------
# The peak resident memory of the process image that runs it (a script below starts with it):
# VmHWM, which exec resets; getrusage's ru_maxrss keeps the forking parent's peak (pytest's,
# gigabytes late in a suite) across exec.
PEAK_KIB = """
import json, sys


def peak_kib():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0])
"""

DRIVER = (
    PEAK_KIB
    + """
sys.argv = ["expkit", "run", "job.yaml", "--quiet"]
from expkit.cli import main
code = main()
with open("driver-rss.json", "w") as f:
    json.dump(peak_kib(), f)
sys.exit(code)
"""
)


MEASURED_BURST = (
    PEAK_KIB
    + """
from expkit import Run
run = Run.get_context()
for i in range(int(sys.argv[1])):
    run.log("x", float(i), step=i)
run.flush()
with open(sys.argv[2], "w") as f:
    json.dump(peak_kib(), f)
"""
)


@pytest.mark.slow  # 2 million values through `expkit run`: 20-100 s
def test_neither_the_driver_nor_the_script_holds_a_burst_in_memory(tmp_path):
    """The old pump held a whole burst in memory (the driver: 311 MB at 1 M values, 643 MB
    at 3 M), and so did the script's queue when it logged faster than it wrote (140 MB at
    1 M)."""
    count = 2_000_000
    folder = tmp_path / "project"
    folder.mkdir()
    subprocess.run([sys.executable, "-m", "expkit", "init", str(folder)], check=True)
    (folder / "train.py").write_text(MEASURED_BURST)
    script_rss = folder / "script-rss.json"
    job = {"experiment": "burst", "entry_script": "train.py", "args": [count, str(script_rss)]}
    (folder / "job.yaml").write_text(json.dumps(job))
    env = bare_env(EXPKIT_WORKSPACE=str(folder / ".expkit"))

    done = subprocess.run(
        [sys.executable, "-c", DRIVER], cwd=folder, env=env, capture_output=True, text=True
    )

    assert done.returncode == 0, done.stdout + done.stderr
    peak_mb = json.loads((folder / "driver-rss.json").read_text()) / 1024
    assert peak_mb < 250, f"the driver reached {peak_mb:.0f} MB for a burst of {count:,}"
    script_mb = json.loads(script_rss.read_text()) / 1024
    assert script_mb < 150, f"the script reached {script_mb:.0f} MB for a burst of {count:,}"
    history = Workspace(folder / ".expkit").history
    (run,) = history.runs.recent()
    assert run.state == "completed"
    assert history.metrics.count(run.id) == history.metrics.last_id(run.id) - 0 == count
