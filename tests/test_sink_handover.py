"""A signal while post-process sends a sink's backlog (a million values take MLflow minutes):
the command ends without waiting for it, and a background process sends the rest, nothing
twice, and closes the sink with the run's outcome (`SinkWorker.drain`, `expkit.sinkrecovery`)."""

from __future__ import annotations

import sqlite3

import pytest

from conftest import eventually
from expkit.metrics import SINK_OUTCOME

COUNT = 100_000
SCRIPT = f"""
from expkit import Run
run = Run.get_context()
for i in range({COUNT}):
    run.log("x", i, step=i)
"""


def mlflow_points(store: str, mlflow_run_id: str) -> tuple[int, int]:
    """(values, distinct steps) of metric x in MLflow's SQLite store."""
    with sqlite3.connect(store) as db:
        return db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT step) FROM metrics WHERE run_uuid = ? AND key = 'x'",
            (mlflow_run_id,),
        ).fetchone()


@pytest.mark.slow
def test_a_signal_while_a_sink_takes_its_backlog_hands_the_rest_to_a_background_process(
    expkit_workspace, background, write_job
):
    from mlflow import MlflowClient

    live = background("run", str(write_job({"metrics": ["mlflow"]}, script=SCRIPT)))
    run_id = live.run_id
    live.wait_for("values sent so far", timeout=600)  # post-process, sending the backlog
    live.terminate()
    assert live.wait(timeout=120) == 130, live.output

    output = live.output
    assert "a background process sends the rest and closes it (driver.log)" in output
    history = expkit_workspace.history
    record = history.runs.get(run_id)
    assert (record.state, record.error) == ("canceled", "terminated by SIGTERM")
    store = str(expkit_workspace.path / "mlflow.db")
    tags = dict(history.db.execute("SELECT key, value FROM tags WHERE run_id = ?", (run_id,)))
    mlflow_run_id = tags["mlflow.run_id"]

    eventually(
        lambda: mlflow_points(store, mlflow_run_id) == (COUNT, COUNT),
        timeout=900,
        what="the background process sending the rest",
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    eventually(
        lambda: client.get_run(mlflow_run_id).info.status == "KILLED",
        timeout=120,
        what="the MLflow run closed as canceled",
    )
    outcomes = [event["message"] for event in history.events.of(run_id, SINK_OUTCOME)]
    first, later = outcomes
    assert first.startswith("mlflow: ") and first.endswith(
        "values sent, the rest in the background"
    )
    sent_first = int(first.split()[1].replace(",", ""))
    assert later == f"mlflow ok ({COUNT - sent_first:,} values)"
    assert (
        "handed over by its driver" in (expkit_workspace.run_dir(run_id) / "driver.log").read_text()
    )
