"""Where each metric sink of a run put its data, one line each (`MetricSink.where`), for the
run's summary and `expkit runs show` (text and --json).

Asked in expkit's own process, from what the run recorded: the sinks promise neither a heavy
import nor a network call, so `runs show` stays fast. A sink whose plugin no longer loads, or
whose `where` fails, is left out: where the data went is a hint, never a reason for the
command to fail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from expkit.history import RunRecord
    from expkit.workspace import Workspace


def sink_places(workspace: Workspace, record: RunRecord) -> list[tuple[str, str]]:
    """(sink name, where it put the run's data) for each of the job's metric sinks that can
    say, in the job's order; [] for a run whose sinks never opened."""
    from expkit import services
    from expkit.errors import PluginError, StageFailed, UserError
    from expkit.job import JobSpec
    from expkit.options import with_defaults
    from expkit.plugins import call, get_plugins

    if not record.job.get("metrics"):
        return []
    try:
        job = JobSpec.from_dict(record.job, source=f"run {record.id}")
    except UserError:  # a job recorded by another version of expkit that this one refuses
        return []
    info = services.run_info(workspace, record.id, job)
    places = []
    for i, spec in enumerate(job.metrics):
        try:
            sink: Any = get_plugins().get("metric_sinks", spec.name, f"metrics.{i}")
            line = call(sink, "where", info, with_defaults(sink.takes, spec.options))
        except (UserError, PluginError, StageFailed):
            continue
        if line:
            places.append((spec.name, str(line)))
    return places
