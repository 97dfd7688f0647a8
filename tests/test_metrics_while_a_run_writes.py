"""`expkit metrics` read while a run writes its values."""

from __future__ import annotations

import re
import subprocess

from conftest import alive, eventually

# Logs until the file named by its argument appears.
STEADY = """
import os
import sys
import time
from expkit import Run

run = Run.get_context()
step = 0
while not os.path.exists(sys.argv[1]):
    for _ in range(20):
        run.log("loss", float(step), step=step)
        step += 1
    time.sleep(0.01)
"""


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_metrics_of_a_one_attempt_run_being_written_hides_no_values(
    expkit_cli, expkit_workspace, write_job, tmp_path
):
    """A run with one attempt has no superseded values: `expkit metrics RUN NAME` read while
    the pump stores values must not say that values of earlier attempts are not shown (it
    counted the values after reading the rows, so values stored in between were "hidden")."""
    stop = tmp_path / "stop"
    job = write_job({"args": [str(stop)], "environment": "inherit"}, script=STEADY)
    out = ok(expkit_cli("run", "--detach", str(job)))
    run_id = re.search(r"^run \d+ \((\S+)\) goes on", out, re.M).group(1)
    history = expkit_workspace.history
    eventually(lambda: history.metrics.count(run_id, "loss") > 0, what="a first value")
    try:
        outputs = [ok(expkit_cli("metrics", run_id, "loss")) for _ in range(6)]
    finally:
        stop.touch()
        driver = history.runs.get(run_id).driver_pid
        eventually(lambda: not alive(driver), timeout=60, what="the run ending")
    hidden = [o.splitlines()[-1] for o in outputs if "not shown" in o]
    assert not hidden, hidden[:3]
