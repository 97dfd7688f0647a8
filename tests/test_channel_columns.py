"""A script's values written as columns lines (`expkit.channel`) and stored from them: every
value as it was logged (bit-exact floats, steps, times), in the order logged, what cannot be
recorded dropped alone (a bad value or step, a name that is not text), a columns line that
cannot be stored skipped alone, and channels of the older one-line-per-call format still
read."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import bare_env, channel_calls
from expkit.channel import columns_line
from expkit.context import CHANNEL_ENV, RUN_ID_ENV
from expkit.metrics import MetricPump

SCRIPT = """
import math, sys
import numpy
from expkit import Run
run = Run.get_context()
for i in range(300):  # two metrics taking turns, as a training loop logs them
    run.log("loss", 1.0 / (i + 1), step=i)
    run.log("acc", i % 7, step=i)  # ints, stored as floats
for i in range(5):
    run.log("np", numpy.float64(i) / 3, step=i)  # a float subclass
run.log("odd", -0.0)
run.log("odd", math.inf)
run.log("odd", -math.inf)
run.log("odd", 5e-324)
run.log("odd", math.nan)
run.log("odd", 1e308, step=3)  # the metric goes on with a step
run.log("odd", True, step=4)
run.log("odd", 2**1024, step=5)  # beyond a float: dropped alone
run.log("odd", 6.0, step=2**63)  # beyond int64: dropped alone
run.log("odd", 7.0, step=7)
run.log("odd", "seven")  # text: a line of its own, in its place
run.log("odd", 8.0, step=8)
run.log("odd", 9.0, step=9)
run.log("odd", 10.0, step=10)
run.log("odd", 11.0, step=11)
"""


def run_script(tmp_path: Path, source: str) -> tuple[Path, str]:
    """`source` run as a training script with a channel of its own (and no driver); returns
    the channel folder and the script's stderr."""
    channel = tmp_path / "metrics"
    channel.mkdir()
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(source))
    env = bare_env(**{CHANNEL_ENV: str(channel), RUN_ID_ENV: "run_1"})
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return channel, done.stderr


def bits(value: float) -> bytes:
    return struct.pack("<d", value)


def test_a_scripts_values_are_stored_from_columns_exactly_and_in_order(expkit_workspace, tmp_path):
    channel, stderr = run_script(tmp_path, SCRIPT)
    (path,) = channel.iterdir()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    columns = {line[1] for line in lines if line[0] == "M"}
    assert columns == {"loss", "acc", "np", "odd"}  # their runs of plain numbers

    history = expkit_workspace.history
    pump = MetricPump(history, "run_1", channel)
    assert pump.pump() == 600 + 5 + 13

    loss = history.metrics.of("run_1", "loss")
    assert [r["step"] for r in loss] == list(range(300))
    assert [r["value"] for r in loss] == [1.0 / (i + 1) for i in range(300)]
    acc = history.metrics.of("run_1", "acc")
    assert [r["value"] for r in acc] == [float(i % 7) for i in range(300)]
    assert all(type(r["value"]) is float for r in acc)
    assert all(a["id"] > b["id"] for a, b in zip(loss[1:], loss, strict=False))  # in order
    assert loss[0]["ts"] < loss[-1]["ts"] < acc[-1]["ts"]

    assert [r["value"] for r in history.metrics.of("run_1", "np")] == [i / 3 for i in range(5)]

    odd = history.metrics.of("run_1", "odd")
    steps = [r["step"] for r in odd]
    assert steps == [None] * 5 + [3, 4, 7, None, 8, 9, 10, 11]
    values = [r["value"] if r["payload"] is None else json.loads(r["payload"]) for r in odd]
    assert [bits(v) for v in values[:4]] == [
        bits(-0.0),
        bits(math.inf),
        bits(-math.inf),
        bits(5e-324),
    ]
    assert math.isnan(values[4]) and odd[4]["payload"] == "NaN"  # as a one-call line's
    assert values[5:] == [1e308, 1.0, 7.0, "seven", 8.0, 9.0, 10.0, 11.0]
    assert [r["id"] for r in odd] == sorted(r["id"] for r in odd)
    assert history.metrics.latest("run_1")["odd"] == 11.0

    assert stderr.count("'odd': a value was not recorded") == 1  # one notice per metric
    assert "too large for a float" in stderr
    assert pump.reader.bad_lines == 0


def test_a_flood_of_one_metric_takes_few_lines_and_few_rows(expkit_workspace, tmp_path):
    channel, _ = run_script(
        tmp_path,
        """
        from expkit import Run
        run = Run.get_context()
        for i in range(200_000):
            run.log("loss", i * 0.5, step=i)
        """,
    )
    (path,) = channel.iterdir()
    assert path.read_bytes().count(b"\n") < 200  # batches of the writer, not a line a value
    history = expkit_workspace.history
    MetricPump(history, "run_1", channel).pump()
    rows = history.metrics.of("run_1", "loss")
    assert len(rows) == 200_000 and rows[-1]["value"] == 199_999 * 0.5
    assert [r["step"] for r in rows[::20_000]] == list(range(0, 200_000, 20_000))
    groups = history.db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
    assert groups < 200


def test_a_bad_columns_line_is_skipped_alone_and_one_call_lines_still_read(
    expkit_workspace, tmp_path
):
    """A channel written by an earlier expkit (a line per call), columns lines among them,
    and columns lines that cannot be read: those are skipped alone, with why."""
    channel = tmp_path / "metrics"
    channel.mkdir()
    good = columns_line('"x"', [2.0, 3.0, 4.0], [2, 3, 4], [1.0, 1.0, 1.0], 0)
    short = json.loads(good)
    short[4] = short[4][:-12] + "="  # times that are not 3 float64
    lines = [
        '["m","x",0.0,0,1.0,0]',
        '["m","x",1.0,1,1.0,0]',
        good.strip(),
        json.dumps(short),
        '["M","x","not base64!","AAAA",null,0]',
        '["M",7,"","","",0]',
        columns_line('"x"', [5.0, 6.0], None, [2.0, 2.0], 1).strip(),
        '["m","x",7.0,7,1.0,0]',
    ]
    (channel / "rank-0.1.jsonl").write_text("\n".join(lines) + "\n")
    history = expkit_workspace.history
    pump = MetricPump(history, "run_1", channel)
    assert pump.pump() == 8

    rows = history.metrics.of("run_1", "x")
    assert [(r["step"], r["value"], r["rank"]) for r in rows] == [
        (0, 0.0, 0),
        (1, 1.0, 0),
        (2, 2.0, 0),
        (3, 3.0, 0),
        (4, 4.0, 0),
        (None, 5.0, 1),
        (None, 6.0, 1),
        (7, 7.0, 0),
    ]
    assert pump.reader.bad_lines == 3
    problem = pump.reader.problem()
    assert "columns that are not base64 of 8-byte numbers" in problem and "'?'" in problem


@pytest.mark.parametrize("per_batch", [1, 4, 10_000])
def test_get_metrics_in_the_script_reads_columns_lines(tmp_path, per_batch):
    """Azure ML's `run.get_metrics()` in a script run by expkit answers from the channel,
    whatever form its lines have."""
    channel, stderr = run_script(
        tmp_path,
        f"""
        from expkit import context
        context.WRITE_BATCH = {per_batch}
        from expkit_azureml.inscript import channel_metrics
        from expkit import Run
        run = Run.get_context()
        for i in range(10):
            run.log("loss", i / 10, step=i)
        run.log("best", 0.9)
        run.flush()
        got = channel_metrics(context.os.environ[context.CHANNEL_ENV])
        print(got, file=context.sys.stderr)
        """,
    )
    assert stderr.strip() == str({"loss": [i / 10 for i in range(10)], "best": 0.9})
    assert len(channel_calls(next(channel.iterdir()))) == 11


def test_a_name_that_is_not_text_is_dropped_alone_with_one_notice(expkit_workspace, tmp_path):
    """A list, a dict or a number as the name: each call dropped with one notice per name,
    no exception in the script, and the burst logged with it all stored."""
    channel, stderr = run_script(
        tmp_path,
        """
        from expkit import Run
        run = Run.get_context()
        for i in range(1000):
            run.log("loss", i / 2, step=i)
            if i % 100 == 0:
                run.log(["a"], 1.0)
                run.log({"b": 1}, 2.0, step=i)
                run.log(7, 3.0)
        print("done")
        """,
    )
    assert "Traceback" not in stderr
    notices = [line for line in stderr.splitlines() if "is not text" in line]
    assert len(notices) == 3 and "metric ['a']" in notices[0] and "metric 7" in notices[2]
    history = expkit_workspace.history
    MetricPump(history, "run_1", channel).pump()
    assert [r["value"] for r in history.metrics.of("run_1")] == [i / 2 for i in range(1000)]


def test_a_metric_name_that_is_not_text_loses_only_its_own_values(expkit_workspace, tmp_path):
    """A name JSON cannot write (bytes) or cannot hash (a list), in a batch among plain
    numbers: only its call is left out, with a notice; flush() raises nothing; every other
    value of the batch is written and stored (before columns lines this held: the batch's
    other 201 values were lost, and the script got a traceback at exit)."""
    channel, stderr = run_script(
        tmp_path,
        """
        from expkit import Run
        run = Run.get_context()
        for i in range(100):
            run.log("good", i + 0.5, step=i)
        run.log(b"bytes", 1.0)
        run.log(["a", "list"], 2.0)
        for i in range(100, 200):
            run.log("good", i + 0.5, step=i)
        run.log("after", 3.0)
        run.flush()
        print("flushed", file=__import__("sys").stderr)
        """,
    )
    assert "flushed" in stderr  # flush() raised nothing
    assert "Traceback" not in stderr
    assert "b'bytes'" in stderr  # its notice
    (path,) = channel.iterdir()
    calls = channel_calls(path)
    assert [c[2] for c in calls if c[1] == "good"] == [i + 0.5 for i in range(200)]
    history = expkit_workspace.history
    assert MetricPump(history, "run_1", channel).pump() == 201
    assert [r["step"] for r in history.metrics.of("run_1", "good")] == list(range(200))


def test_an_empty_columns_line_is_skipped_alone(expkit_workspace, tmp_path):
    """A columns line of no values (a damaged channel) is a line that cannot be recorded:
    skipped alone and counted, not a failure of every batch from it on (the pump raised
    IndexError at each try, and no later value of the run was ever stored)."""
    channel = tmp_path / "metrics"
    channel.mkdir()
    lines = [
        '["m","x",0.0,0,1.0,0]',
        '["M","x","",null,"",0]',
        '["M","x","","","",0]',
        '["m","x",7.0,7,1.0,0]',
    ]
    (channel / "rank-0.1.jsonl").write_text("\n".join(lines) + "\n")
    history = expkit_workspace.history
    pump = MetricPump(history, "run_1", channel)
    assert pump.pump() == 2
    assert [(r["step"], r["value"]) for r in history.metrics.of("run_1", "x")] == [
        (0, 0.0),
        (7, 7.0),
    ]
    assert pump.reader.bad_lines == 2
