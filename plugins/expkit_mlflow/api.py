"""The calls the sink, the tracking helpers and the sweeps make to MLflow, as one interface
(`Tracker`) with two implementations:

- `expkit_mlflow.rest.RestTracker`: an `http://` or `https://` tracking server through MLflow's
  documented REST API (https://mlflow.org/docs/latest/rest-api.html), artifacts through the
  server's proxied artifact API, without importing mlflow: importing it takes 1.5-3 s of CPU,
  more than a short run's whole post-process;
- `expkit_mlflow.library.LibraryTracker`: MLflow's own client (`MlflowClient`), for every other
  store (SQLite, file stores, databricks, ...) and for a server whose configuration only the
  library honours (`expkit_mlflow.transport.library_only`).

What they return are the few fields the callers read (`RunRecord`, `ExperimentRecord`,
`Point`), not MLflow's entities, so that the REST path needs no mlflow import. Both raise
`AlreadyExists` where MLflow answers RESOURCE_ALREADY_EXISTS to a new experiment; any other
failure is the implementation's own error (`transport.MlflowServerError`, MlflowException).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# MLflow's limits (mlflow.utils.validation): a log_batch call takes at most 1000 metrics,
# 100 params, 100 tags, and 1000 of them all together.
METRICS_PER_CALL = 1000
TAGS_PER_CALL = 100
ITEMS_PER_CALL = 1000


class AlreadyExists(Exception):
    """MLflow's RESOURCE_ALREADY_EXISTS: an experiment of that name was made meanwhile."""


@dataclass(frozen=True)
class Point:
    """One metric value: MLflow's Metric (timestamp in milliseconds since the epoch)."""

    key: str
    value: float
    timestamp: int
    step: int


@dataclass
class RunRecord:
    """An MLflow run as the callers read it: MLflow's RunInfo fields, and its data (params,
    tags and each metric's latest value)."""

    run_id: str
    experiment_id: str
    status: str  # RUNNING, SCHEDULED, FINISHED, FAILED, KILLED
    artifact_uri: str
    start_time: int | None = None  # ms
    end_time: int | None = None  # ms
    run_name: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ExperimentRecord:
    experiment_id: str
    name: str
    lifecycle_stage: str  # active, deleted
    tags: dict[str, str] = field(default_factory=dict)


class Tracker(Protocol):
    """What expkit asks of an MLflow tracking store: MlflowClient's methods of the same
    names, with records for results."""

    uri: str

    def get_experiment_by_name(self, name: str) -> ExperimentRecord | None: ...

    def create_experiment(
        self, name: str, artifact_location: str | None, tags: Mapping[str, str]
    ) -> str:
        """The new experiment's id; AlreadyExists when the name is taken."""
        ...

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None: ...

    def create_run(
        self,
        experiment_id: str,
        start_time: int | None,
        tags: Mapping[str, str],
        run_name: str,
    ) -> RunRecord:
        """A new RUNNING run (start_time in ms; now when None); its user is the tag
        `mlflow.user`, as MlflowClient.create_run takes it."""
        ...

    def get_run(self, run_id: str) -> RunRecord: ...

    def search_runs(
        self, experiment_id: str, filter_string: str, order_by: Sequence[str] = ()
    ) -> list[RunRecord]:
        """Every active run of the experiment that the filter selects, all pages."""
        ...

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Point] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """One call: within MLflow's limits (`METRICS_PER_CALL`, `TAGS_PER_CALL`,
        `ITEMS_PER_CALL`), which the caller keeps."""
        ...

    def update_run(self, run_id: str, status: str) -> None:
        """The run's status, its end time left as it is."""
        ...

    def set_terminated(self, run_id: str, status: str, end_time: int | None = None) -> None:
        """The run's final status and its end time (ms; now when None)."""
        ...

    def set_tag(self, run_id: str, key: str, value: str) -> None: ...

    def delete_tag(self, run_id: str, key: str) -> None: ...

    def get_metric_history(self, run_id: str, key: str) -> list[Point]: ...

    def list_artifacts(self, run_id: str, path: str) -> list[str]:
        """The artifact paths directly under `path` of the run (empty when none)."""
        ...

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str) -> None:
        """Upload every file under `local_dir` as the run's artifacts under `artifact_path`."""
        ...


def tags_of(items: Any) -> dict[str, str]:
    """{key: value} of MLflow's key/value list (`[{"key": k, "value": v}, ...]`)."""
    return {str(item["key"]): str(item.get("value", "")) for item in items or ()}
