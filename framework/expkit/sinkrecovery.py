"""`python -m expkit.sinkrecovery WORKSPACE RUN_ID [SINK_KEY ...]`: deliver the rest to the
metric sinks of a run whose driver no longer does, and close them.

Two cases. The recovery of a workspace (`expkit.recovery`) marks a run whose driver died
failed, but its sinks still hold it open (an MLflow run RUNNING for ever). And a driver
stopped by a signal while it was sending a sink's backlog at post-process (a million values
take MLflow minutes) hands that sink over instead of holding the user up (`SinkWorker.drain`,
`handed_over`): only those sinks' keys are given. This process, started in the background so
that the command is not held up, opens each such sink again, delivers what the history
holds and the sink did not get yet (`history.sink_cursors`), and closes it with the run's
recorded outcome. Its lines go to the run's `driver.log`; each sink's outcome is recorded as
the driver records it (`SINK_OUTCOME` and `sink-failed` events).
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


def start(workspace: Workspace, run_id: str, keys: list[str] | None = None) -> int:
    """Start the background process that closes the sinks of run `run_id` (those of `keys`,
    see `expkit.metrics.cursor_keys`; None: all); returns its pid. It carries no run marker:
    stopping the run's processes leaves it alone."""
    env = {k: v for k, v in os.environ.items() if k != RUN_ID_ENV}
    args = ["expkit.sinkrecovery", str(workspace.path), run_id, *(keys or [])]
    return start_background(workspace, run_id, args, env)


def close_sinks(
    workspace: Workspace, run_id: str, keys: list[str] | None = None
) -> list[SinkWorker]:
    """Deliver the rest to each sink of run `run_id` (those of `keys`; None: all) and close it
    with the run's recorded outcome; returns the sinks' workers, their outcomes recorded
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
    cursors = cursor_keys([spec.name for spec in job.metrics])
    workers = []
    for i, (spec, key) in enumerate(zip(job.metrics, cursors, strict=True)):
        if keys is not None and key not in keys:
            continue
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

    workspace_path, run_id, *keys = argv
    why = "handed over by its driver" if keys else "its driver gone"
    print(f"closing the metric sinks of run {run_id}, {why}", flush=True)
    workers = close_sinks(Workspace(workspace_path), run_id, keys or None)
    for worker in workers:
        print(f"  {worker.outcome()}", flush=True)
    return 1 if any(worker.error for worker in workers) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
