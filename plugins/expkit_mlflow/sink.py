"""Metric sink `mlflow`: each expkit run becomes an MLflow run in the experiment of the same name.

It runs on expkit's sink thread, fed from the run history in batches, so the training script
never waits for MLflow: the only cost to the script is the history it writes anyway. A tracking
server (`http://`, `https://`) is reached through MLflow's REST API, without importing mlflow
(`expkit_mlflow.rest`); any other store through MLflow's own client (`expkit_mlflow.library`):
see `expkit_mlflow.tracking.connect`.

What goes where:
- params: the run's parameters (`RunInfo.params`): the job's `args`, data placeholders
  resolved to paths (at open), then what the script logs as params (as they come). MLflow
  keeps a param's first value: a later, different value is the tag `expkit.param.<key>`;
- tags: the expkit run id, workspace, snapshot and environment hashes and the job's tags (at
  open); the script's tags, each stage's seconds, the final state and error (at close);
- metrics: every numeric value with its step and its timestamp, 1000 a `log_batch` call. A
  value logged without a step takes the metric's next one (0, 1, 2, ... in the order logged,
  as the TensorBoard sink does): MLflow would give each step 0 and keep only one of equal
  values logged in the same millisecond. A value logged by rank N > 0 is named
  `rankN/<name>`. MLflow stores +-inf as +-1.8e308, and refuses some characters in names:
  those become `_`;
- values MLflow cannot hold as metrics: a string (or a list) becomes the tag
  `expkit.metric.<name>` holding the latest value (tags can change, params cannot); table
  rows (`run.log_row`) become the artifact `metrics/<name>.json`, in `mlflow.log_table`'s
  layout (columns, data), at close. The run history keeps every one of them;
- artifacts: the run's logs/ and outputs/ (at close, unless the registry uploaded outputs/):
  the files of the outputs manifest, never a link the script left there;
- status: completed -> FINISHED, failed -> FAILED, canceled -> KILLED; a run that goes on
  after it ended (`expkit runs resume`) reopens the same MLflow run: RUNNING again, without
  the earlier attempt's error tag, until it ends again;
- a sweep's trial: a child run of the sweep's parent run (`expkit_mlflow.sweeps`), named
  "<run id> (trial N)"; its end updates the parent's best so far and status;
- where to look (`MlflowSink.where`, in the run's summary and `expkit runs show`): the run's
  page in MLflow's UI and the tracking URI, from the expkit run's tags `mlflow.run_id`,
  `mlflow.experiment_id` and `mlflow.tracking_uri` (recorded at open; expkit's own, never
  sent to MLflow).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from expkit.plugin import Metric, MetricSink, MetricWriter, RunInfo, RunOutcome
from expkit_mlflow.api import METRICS_PER_CALL, Point, Tracker
from expkit_mlflow.tracking import (
    NAME,
    RUN_TAG,
    TAKES,
    clean_params,
    connect_early,
    connected,
    ensure_run,
    log_logs,
    log_outputs,
    log_params,
    log_tags,
    mlflow_key,
    outputs_logged,
    resolve,
)

STATUS = {"completed": "FINISHED", "failed": "FAILED", "canceled": "KILLED"}
# The expkit run's tags that say where its MLflow run is (`MlflowSink.where`): expkit's own.
EXPERIMENT_TAG = "mlflow.experiment_id"
URI_TAG = "mlflow.tracking_uri"
WHERE_TAGS = (RUN_TAG, EXPERIMENT_TAG, URI_TAG)
# Where `expkit ui` serves the workspace's store unless told otherwise (`mlflow server`'s
# default address too).
UI_ADDRESS = "http://127.0.0.1:5000"


class MlflowSink(MetricSink):
    name = NAME
    description = "each run as an MLflow run: params, tags, metrics, logs and outputs, status"
    takes = TAKES

    def open(self, run: RunInfo, options: dict[str, Any]) -> MetricWriter:
        tracking = resolve(run, options)
        client = connected(tracking)  # made ahead of time when `warm_up` started it
        mlflow_run_id, created = ensure_run(client, run, tracking)
        if not created:
            reopen(client, mlflow_run_id)
        experiment = client.get_run(mlflow_run_id).experiment_id
        run.set_tags({EXPERIMENT_TAG: experiment, URI_TAG: tracking.uri})
        return MlflowWriter(client, mlflow_run_id, run)

    def where(self, run: RunInfo, options: dict[str, Any]) -> str | None:
        """The MLflow run's page and the tracking URI, from the tags recorded at open: on a
        tracking server, its own address; on the workspace's local store, the address
        `expkit ui` serves it at (another local store: the `mlflow ui` that shows it).
        None before the sink opened."""
        tags = run.tags()
        mlflow_run_id, experiment, uri = (tags.get(key) for key in WHERE_TAGS)
        if not (mlflow_run_id and experiment and uri):
            return None
        page = f"#/experiments/{experiment}/runs/{mlflow_run_id}"
        if uri.startswith(("http://", "https://")):
            return f"{uri.rstrip('/')}/{page} (tracking URI {uri})"
        if not is_local(uri):  # databricks, ...: the service has its own UI
            return f"MLflow run {mlflow_run_id} in experiment {experiment} (tracking URI {uri})"
        if uri == ui_store(run):
            return f"{UI_ADDRESS}/{page} (open it with `expkit ui`; tracking URI {uri})"
        return (
            f"{UI_ADDRESS}/{page} (open it with `mlflow ui --backend-store-uri {uri}`; "
            f"tracking URI {uri})"
        )


def warm_up(run: RunInfo) -> None:
    """Start the sink's slow set-up (importing mlflow, the client, a SQLite store created or
    upgraded) in the background for each `mlflow` sink of `run`'s job, as the run starts
    (its prepare stage): it then overlaps preparing the run and the script, instead of
    delaying post-process when the script ends first. The MLflow run itself is made at
    open, once prepare has resolved the run's parameters (MLflow keeps a param's first
    value). Does nothing for a job without the sink; a failure here is only reported by
    open, which connects again (`connected`)."""
    for spec in run.job.metrics:
        if spec.name == NAME:
            connect_early(resolve(run, dict(spec.options)))


def is_local(uri: str) -> bool:
    """Whether a tracking URI is a store on this machine: SQLite, a file store or a path
    (not `databricks`, `databricks://profile`, ...)."""
    return uri.startswith(("sqlite:", "file:", "/", "."))


def ui_store(run: RunInfo) -> str:
    """The store `expkit ui` serves: the workspace's config.json's `mlflow.tracking_uri`,
    else $MLFLOW_TRACKING_URI, else the SQLite default in the workspace (as `resolve`
    finds it for a sink without options)."""
    configured = run.plugin_config(NAME).get("tracking_uri")
    if configured:
        return str(configured)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{run.workspace_dir / 'mlflow.db'}"


def reopen(client: Tracker, mlflow_run_id: str) -> None:
    """An MLflow run that ended (the expkit run failed or was canceled, then resumed: `expkit
    runs resume`) is RUNNING again, its state tag says so and the error of the attempt that
    ended it is gone: `close` sets the new end. A run still RUNNING is left as it is."""
    found = client.get_run(mlflow_run_id)
    if found.status == "RUNNING":
        return
    client.update_run(mlflow_run_id, "RUNNING")
    log_tags(client, mlflow_run_id, {"expkit.state": "running"})
    if "expkit.error" in found.tags:
        client.delete_tag(mlflow_run_id, "expkit.error")


class MlflowWriter(MetricWriter):
    def __init__(self, client: Tracker, mlflow_run_id: str, run: RunInfo) -> None:
        self.client, self.mlflow_run_id, self.run = client, mlflow_run_id, run
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self._next_step: dict[str, int] = {}  # per metric, for the values logged without one
        self._batch: list[Metric] | None = None  # the batch being sent, and how far it got:
        self._numbers: list[Point] = []  # a retried send resumes after the last call that
        self._texts: dict[str, str] = {}  # succeeded instead of sending it all again
        self._sent = 0
        self._params: dict[str, str] | None = None  # the MLflow run's params, once read
        self._retagged: set[str] = set()  # params whose later values are tags
        self.closed = False

    def send(self, metrics: list[Metric]) -> None:
        if metrics is not self._batch:
            self._batch, self._sent = metrics, 0
            self._numbers, self._texts = self._split(metrics)
        for start in range(self._sent, len(self._numbers), METRICS_PER_CALL):
            chunk = self._numbers[start : start + METRICS_PER_CALL]
            self.client.log_batch(self.mlflow_run_id, metrics=chunk)
            self._sent = start + len(chunk)
        if self._texts:
            log_tags(self.client, self.mlflow_run_id, self._texts)
            self._texts = {}

    def log_params(self, params: dict[str, str]) -> None:
        """A new param becomes an MLflow param. MLflow keeps a param's first value and
        refuses another: a param that changes afterwards becomes the tag
        `expkit.param.<key>`, holding its latest value. A retried call sends again only
        what MLflow does not hold yet (the same value of a param is accepted twice)."""
        if self._params is None:
            self._params = dict(self.client.get_run(self.mlflow_run_id).params)
        new, changed = {}, {}
        for key, value in clean_params(params).items():
            known = self._params.get(key)
            if known is None:
                new[key] = value
            elif known != value or key in self._retagged:
                changed[f"expkit.param.{key}"] = value
                self._retagged.add(key)
        log_params(self.client, self.mlflow_run_id, new)
        self._params.update(new)
        if changed:
            log_tags(self.client, self.mlflow_run_id, changed)

    def _split(self, metrics: list[Metric]) -> tuple[list[Point], dict[str, str]]:
        """MLflow metrics for the numbers; tags for the strings; rows kept for close."""
        numbers, texts = [], {}
        for m in metrics:
            key = mlflow_key(m.name if not m.rank else f"rank{m.rank}/{m.name}")
            if isinstance(m.value, int | float):  # bool included: True is 1
                if isinstance(m.step, int | float):
                    step = int(m.step)
                else:
                    step = self._next_step.get(key, 0)
                    self._next_step[key] = step + 1
                numbers.append(Point(key, float(m.value), int(m.timestamp * 1000), step))
            elif isinstance(m.value, dict):
                self.tables.setdefault(key, []).append(m.value)
            else:
                text = m.value if isinstance(m.value, str) else json.dumps(m.value)
                texts[f"expkit.metric.{key}"] = text
        return numbers, texts

    def close(self, outcome: RunOutcome) -> None:
        """Final tags, the tables, logs/ and outputs/, then the status: a reader that sees
        the run finished finds everything in it. A second close does nothing."""
        if self.closed:
            return
        tags: dict[str, Any] = {k: v for k, v in outcome.tags.items() if k not in WHERE_TAGS}
        tags.update({"expkit.state": outcome.state, "expkit.exit_code": outcome.exit_code})
        for stage, seconds in outcome.stage_seconds.items():
            tags[f"expkit.stage.{stage}.seconds"] = f"{seconds:.3f}"
        if outcome.stage_failure:
            tags["expkit.error"] = outcome.stage_failure
        log_tags(self.client, self.mlflow_run_id, tags)
        self._log_tables()
        log_logs(self.client, self.mlflow_run_id, self.run)
        if not outputs_logged(self.client, self.mlflow_run_id):
            log_outputs(self.client, self.mlflow_run_id, self.run)
        status = STATUS.get(outcome.state, "FAILED")
        if self.run.sweep is None:
            self.client.set_terminated(self.mlflow_run_id, status, int(time.time() * 1000))
        else:  # the trial's status and its parent's in one hold of the sweep's lock
            from expkit_mlflow.sweeps import sweep_lock, trial_ended

            with sweep_lock(self.run.workspace_dir):
                self.client.set_terminated(self.mlflow_run_id, status, int(time.time() * 1000))
                trial_ended(self.client, self.mlflow_run_id, self.run)
        self.closed = True

    def _log_tables(self) -> None:
        """Each table as the artifact `metrics/<name>.json`, in `mlflow.log_table`'s layout
        (columns, data), written as `MlflowClient.log_dict` writes a .json (indent 2,
        anything else as its str), all in one upload."""
        if not self.tables:
            return
        with tempfile.TemporaryDirectory(prefix="expkit-mlflow-tables-") as tmp:
            for key, rows in self.tables.items():
                columns = list(dict.fromkeys(c for row in rows for c in row))
                data = [[row.get(c) for c in columns] for row in rows]
                path = os.path.join(tmp, f"{key}.json")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump({"columns": columns, "data": data}, f, indent=2, default=str)
            self.client.log_artifacts(self.mlflow_run_id, tmp, "metrics")
