"""`python -m expkit.sinkrecovery WORKSPACE RUN_ID`: close the metric sinks of a run whose
driver died.

The recovery of a workspace (`expkit.recovery`) marks such a run failed, but its sinks still
hold it open (an MLflow run RUNNING for ever). This process, started in the background so
that the command that found the run is not held up, opens each of the job's sinks again,
delivers what the history holds and the sink did not get yet (`history.sink_cursors`), and
closes it with the run's failed outcome. Its lines go to the run's `driver.log`; each sink's
outcome is recorded as the driver records it (`SINK_OUTCOME` and `sink-failed` events).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from expkit.driver import start_background
from expkit.procs import RUN_ID_ENV

if TYPE_CHECKING:
    from expkit.history import History
    from expkit.metrics import SinkWorker
    from expkit.workspace import Workspace


def needs_closing(history: History, run_id: str) -> bool:
    """Whether the dead run has sinks that were opened: its job names metric sinks and its
    run stage started (sinks open when it does)."""
    if not history.runs.get(run_id).job.get("metrics"):
        return False
    return any(stage.stage == "run" for stage in history.stages.of(run_id))


def start(workspace: Workspace, run_id: str) -> int:
    """Start the background process that closes the sinks of the dead run `run_id`; returns
    its pid. It carries no run marker: stopping the run's processes leaves it alone."""
    env = {k: v for k, v in os.environ.items() if k != RUN_ID_ENV}
    return start_background(
        workspace, run_id, ["expkit.sinkrecovery", str(workspace.path), run_id], env
    )


def close_sinks(workspace: Workspace, run_id: str) -> list[SinkWorker]:
    """Deliver the rest to each sink of the dead run `run_id` and close it with the run's
    (failed) outcome; returns the sinks' workers, their outcomes recorded
    (`SinkWorker.outcome`)."""
    from expkit import services
    from expkit.job import JobSpec
    from expkit.metrics import SINK_OUTCOME, SinkWorker, cursor_keys
    from expkit.options import with_defaults
    from expkit.plugins import get_plugins

    history = workspace.history
    record = history.runs.get(run_id)
    job = JobSpec.from_dict(record.job, source=f"run {run_id}")
    plugins = get_plugins()
    info = services.run_info(workspace, run_id, job)
    outcome = services.run_outcome(workspace, run_id, record.state, record.error)
    keys = cursor_keys([spec.name for spec in job.metrics])
    workers = []
    for i, (spec, key) in enumerate(zip(job.metrics, keys, strict=True)):
        sink = plugins.get("metric_sinks", spec.name, f"metrics.{i}")
        options = with_defaults(sink.takes, spec.options)  # checked when the run started
        worker = SinkWorker(history, info, sink, options, spec.required, key)
        worker.start()
        worker.drain()
        problem = worker.error or worker.close(outcome)
        if problem is not None:
            history.events.add(run_id, "sink-failed", str(problem))
        history.events.add(run_id, SINK_OUTCOME, worker.outcome())
        workers.append(worker)
    return workers


def main(argv: list[str]) -> int:
    from expkit.workspace import Workspace

    workspace_path, run_id = argv
    print(f"closing the metric sinks of run {run_id}, its driver gone", flush=True)
    workers = close_sinks(Workspace(workspace_path), run_id)
    for worker in workers:
        print(f"  {worker.outcome()}", flush=True)
    return 1 if any(worker.error for worker in workers) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
