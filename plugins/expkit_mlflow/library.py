"""`LibraryTracker`: the `Tracker` interface (`expkit_mlflow.api`) over MLflow's own client
(`MlflowClient`), for every store the REST client does not take: SQLite and file stores,
databricks, a server whose configuration only the library honours
(`expkit_mlflow.transport.library_only`), and artifact stores a server does not proxy.
Importing this module imports mlflow (seconds)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from expkit_mlflow.api import AlreadyExists, ExperimentRecord, Point, RunRecord


def _record(run: object) -> RunRecord:
    info, data = run.info, run.data  # type: ignore[attr-defined]
    return RunRecord(
        run_id=info.run_id,
        experiment_id=str(info.experiment_id),
        status=info.status,
        artifact_uri=info.artifact_uri,
        start_time=info.start_time,
        end_time=info.end_time,
        run_name=info.run_name,
        params=dict(data.params),
        tags=dict(data.tags),
        metrics=dict(data.metrics),
    )


class LibraryTracker:
    """MlflowClient's methods, with `api`'s records for results. `client` is the MlflowClient
    itself, for what only the library does (the model registry)."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.uri: str = client.tracking_uri

    def get_experiment_by_name(self, name: str) -> ExperimentRecord | None:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            return None
        return ExperimentRecord(
            str(found.experiment_id), found.name, found.lifecycle_stage, dict(found.tags)
        )

    def create_experiment(
        self, name: str, artifact_location: str | None, tags: Mapping[str, str]
    ) -> str:
        try:
            return self.client.create_experiment(
                name, artifact_location=artifact_location, tags=dict(tags)
            )
        except MlflowException as error:
            if error.error_code == "RESOURCE_ALREADY_EXISTS":
                raise AlreadyExists(str(error)) from error
            raise

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        self.client.set_experiment_tag(experiment_id, key, value)

    def create_run(
        self,
        experiment_id: str,
        start_time: int | None,
        tags: Mapping[str, str],
        run_name: str,
    ) -> RunRecord:
        created = self.client.create_run(
            experiment_id, start_time=start_time, tags=dict(tags), run_name=run_name
        )
        return _record(created)

    def get_run(self, run_id: str) -> RunRecord:
        return _record(self.client.get_run(run_id))

    def search_runs(
        self, experiment_id: str, filter_string: str, order_by: Sequence[str] = ()
    ) -> list[RunRecord]:
        runs: list[RunRecord] = []
        token = None
        while True:
            page = self.client.search_runs(
                [experiment_id],
                filter_string,
                max_results=1000,
                order_by=list(order_by) or None,
                page_token=token,
            )
            runs.extend(_record(r) for r in page)
            token = page.token
            if not token:
                return runs

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Point] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.client.log_batch(
            run_id,
            metrics=[Metric(m.key, m.value, m.timestamp, m.step) for m in metrics],
            params=[Param(k, v) for k, v in (params or {}).items()],
            tags=[RunTag(k, v) for k, v in (tags or {}).items()],
        )

    def update_run(self, run_id: str, status: str) -> None:
        self.client.update_run(run_id, status=status)

    def set_terminated(self, run_id: str, status: str, end_time: int | None = None) -> None:
        self.client.set_terminated(run_id, status, end_time)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def delete_tag(self, run_id: str, key: str) -> None:
        self.client.delete_tag(run_id, key)

    def get_metric_history(self, run_id: str, key: str) -> list[Point]:
        return [
            Point(m.key, m.value, m.timestamp, m.step)
            for m in self.client.get_metric_history(run_id, key)
        ]

    def list_artifacts(self, run_id: str, path: str) -> list[str]:
        return [a.path for a in self.client.list_artifacts(run_id, path)]

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, local_dir, artifact_path)
