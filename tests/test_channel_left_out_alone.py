"""The metric channel: a call that cannot be recorded is left out alone, whatever is wrong
with it, and a columns line that cannot be stored is skipped alone (found by a tryout)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import bare_env, channel_calls
from expkit.context import CHANNEL_ENV, RUN_ID_ENV
from expkit.metrics import MetricPump


def run_script(tmp_path: Path, source: str) -> tuple[Path, subprocess.CompletedProcess]:
    channel = tmp_path / "metrics"
    channel.mkdir()
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(source))
    env = bare_env(**{CHANNEL_ENV: str(channel), RUN_ID_ENV: "run_1"})
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    return channel, done


def test_a_metric_name_that_is_not_text_loses_only_its_own_values(expkit_workspace, tmp_path):
    """A name JSON cannot write (bytes) or cannot hash (a list), in a batch among plain
    numbers: only its call is left out, with a notice; flush() raises nothing; every other
    value of the batch is written and stored (before columns lines this held: the batch's
    other 201 values were lost, and the script got a traceback at exit)."""
    channel, done = run_script(
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
        print("flushed")
        """,
    )
    assert done.returncode == 0, done.stderr
    assert "flushed" in done.stdout
    assert "Traceback" not in done.stderr
    assert "b'bytes'" in done.stderr  # its notice
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
