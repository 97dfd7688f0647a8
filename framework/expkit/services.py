"""The narrow services a run's plugins get, bound to one run of one workspace.

Plugins never see the run history: a compute target, backend or builder gets a `RunContext`,
a sink or registry a `RunInfo`, each holding only the callbacks it needs (tags, a status line,
leases, the environments' cache, the plugin's section of the workspace config). Built here,
from the workspace, so that the lifecycle and the commands that run one stage by themselves
(`expkit export` builds an environment) hand plugins the same thing.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from expkit.capabilities import RunContext, RunInfo, RunOutcome
from expkit.job import JobSpec
from expkit.leases import Leases, RunLeases
from expkit.workspace import CONFIG, Workspace, read_config


def plugin_config(workspace: Workspace) -> Callable[[str], dict[str, Any]]:
    """`section -> config.json's object of that name` ({} when missing or not an object), read
    when asked (a long-lived Workspace sees the file as it is now), e.g. `{"mlflow":
    {"tracking_uri": ...}}` gives the mlflow plugin its settings. UserError for a damaged
    config.json, naming it."""

    def section(name: str) -> dict[str, Any]:
        value = read_config(workspace.path / CONFIG).get(name)
        return dict(value) if isinstance(value, dict) else {}

    return section


def run_info(workspace: Workspace, run_id: str, job: JobSpec) -> RunInfo:
    """What sinks, registries and event hooks are told about run `run_id`; the lifecycle
    fills in the hashes once prepare knows them."""
    history = workspace.history
    record = history.runs.get(run_id)
    return RunInfo(
        run_id=run_id,
        experiment=job.experiment,
        run_dir=workspace.run_dir(run_id),
        job=job,
        created=record.created,
        snapshot_hash=record.snapshot_hash,
        environment_hash=record.environment_hash,
        workspace_dir=workspace.path,
        tags=lambda: history.tags.of(run_id),
        set_tags=lambda tags: history.tags.set(run_id, tags),
        outputs=lambda: history.outputs.of(run_id),
        params=lambda: history.params.of(run_id),
        plugin_config=plugin_config(workspace),
        sweep=record.sweep,
        trial=record.trial,
        sweep_spec=lambda: _sweep_spec(workspace, record.sweep),
    )


def _sweep_spec(workspace: Workspace, sweep_id: str | None) -> dict[str, Any]:
    """The spec of sweep `sweep_id` as its record keeps it; {} for no sweep, or one the
    history does not hold."""
    if sweep_id is None:
        return {}
    try:
        return dict(workspace.history.sweeps.get(sweep_id).spec)
    except KeyError:
        return {}


def run_context(
    workspace: Workspace,
    run_id: str,
    job: JobSpec,
    *,
    script_env: dict[str, str],
    say: Callable[[str], None],
    waiting: Callable[[str | None], None],
    canceled: Callable[[], bool],
    echo: Callable[[int, bytes], None],
    work_dir: Path | None = None,
) -> RunContext:
    """The RunContext of run `run_id`: its folders, the given callbacks, the services bound
    to the workspace (status and tags recorded in the history, leases, the cache), and how a
    planned stop goes: with the job's `checkpoints:`, its signal and grace period; without,
    SIGTERM at once (`stop_signal` None). The lifecycle sets `attempt` and `requeued`."""
    history = workspace.history
    run_dir = workspace.run_dir(run_id)
    stop_signal, stop_grace = None, 0.0
    if job.checkpoints is not None:
        stop_signal = int(signal.Signals[job.checkpoints.signal])
        stop_grace = job.checkpoints.grace_seconds
    return RunContext(
        run_id=run_id,
        job=job,
        run_dir=run_dir,
        work_dir=work_dir or run_dir / "work",
        log_dir=run_dir / "logs",
        script_env=script_env,
        say=say,
        waiting=waiting,
        canceled=canceled,
        echo=echo,
        status=lambda text: history.runs.update(run_id, status=text),
        set_tags=lambda tags: history.tags.set(run_id, tags),
        set_remote_job=lambda remote_job: history.runs.update(run_id, remote_job=remote_job),
        leases=RunLeases(Leases(history), run_id, lambda: workspace.recover(history)),
        cache_dir=workspace.envs_dir,
        plugin_config=plugin_config(workspace),
        stop_signal=stop_signal,
        stop_grace=stop_grace,
        log=lambda text: log_line(run_dir, text),
    )


PREPARE_LOG = "prepare.log"  # in the run's logs/: what the prepare stage's tools printed


def log_line(run_dir: Path, text: str) -> None:
    """Append `text` as a line to the run's `logs/prepare.log` (made if need be): the output
    of the tools the prepare stage runs (pip, a data input's `prepare` command), kept there
    rather than in the terminal."""
    folder = run_dir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW  # never through a link
    fd = os.open(folder / PREPARE_LOG, flags, 0o600)
    with open(fd, "a", encoding="utf-8", errors="replace") as log:
        log.write(text.rstrip("\n") + "\n")


def run_outcome(workspace: Workspace, run_id: str, state: str, error: str | None) -> RunOutcome:
    """How run `run_id` ended, from its record, for the metric writers' `close`."""
    history = workspace.history
    seconds, failed = {}, None
    for stage in history.stages.of(run_id):
        if stage.started is not None and stage.ended is not None:
            seconds[stage.stage] = stage.ended - stage.started
        if stage.state in ("failed", "canceled") and failed is None:
            failed = f"{stage.stage}: {stage.message}" if stage.message else stage.stage
    return RunOutcome(
        state=state,
        error=error,
        exit_code=history.runs.get(run_id).exit_code,
        stage_seconds=seconds,
        stage_failure=failed,
        tags=history.tags.of(run_id),
    )
