"""`RestTracker`: the `Tracker` interface (`expkit_mlflow.api`) over MLflow's REST API, for an
`http://` or `https://` tracking server, without importing mlflow.

The endpoints, payloads and answers are MLflow's documented REST API
(https://mlflow.org/docs/latest/rest-api.html), sent as mlflow's own client sends them
(`mlflow/store/tracking/rest_store.py`): experiments/get-by-name and create, runs/create, get,
search, log-batch, update, set-tag and delete-tag, metrics/get-history. Numbers that JSON
cannot hold are sent as protobuf's JSON writes them ("NaN", "Infinity", "-Infinity").

Artifacts: a run whose artifact URI is the server's proxied store (`mlflow-artifacts:/...`,
resolved against the tracking URI as `mlflow/store/artifact/mlflow_artifacts_repo.py` does,
or an `http(s)://.../api/2.0/mlflow-artifacts/artifacts/...` URI) is uploaded with one PUT per
file and listed with GET, as `mlflow/store/artifact/http_artifact_repo.py` does. Any other
artifact store (s3://, a local path, ...) is written by the client itself, with the storage's
own SDK: those calls go to MLflow's library (`expkit_mlflow.library`), imported then.
"""

from __future__ import annotations

import math
import mimetypes
import os
import posixpath
import re
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from expkit_mlflow.api import AlreadyExists, ExperimentRecord, Point, RunRecord, Tracker, tags_of
from expkit_mlflow.transport import ARTIFACTS_API, MlflowServerError, Server

HISTORY_PAGE = 25_000  # mlflow.tracking._tracking_service.client: GET_METRIC_HISTORY_MAX_RESULTS
SEARCH_PAGE = 1000


def _number(value: float) -> float | str:
    """A metric value as protobuf's JSON writes a double."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _pairs(items: Mapping[str, str] | None) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in (items or {}).items()]


def _run(answer: dict[str, Any]) -> RunRecord:
    """A run of MLflow's JSON (`{"info": ..., "data": ...}`)."""
    info, data = answer.get("info", {}), answer.get("data", {})
    return RunRecord(
        run_id=str(info.get("run_id") or info.get("run_uuid")),
        experiment_id=str(info.get("experiment_id")),
        status=str(info.get("status", "RUNNING")),
        artifact_uri=str(info.get("artifact_uri", "")),
        start_time=int(info["start_time"]) if info.get("start_time") is not None else None,
        end_time=int(info["end_time"]) if info.get("end_time") is not None else None,
        run_name=info.get("run_name"),
        params=tags_of(data.get("params")),
        tags=tags_of(data.get("tags")),
        metrics={str(m["key"]): float(m.get("value", 0)) for m in data.get("metrics", ())},
    )


def _point(metric: dict[str, Any]) -> Point:
    return Point(
        str(metric["key"]),
        float(metric.get("value", 0)),
        int(metric.get("timestamp", 0)),
        int(metric.get("step", 0)),
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


class RestTracker:
    """A tracking server over its REST API (see the module's docstring). Made on any thread;
    used by one at a time (a `requests` Session is not shared across threads)."""

    def __init__(self, uri: str, server: Server | None = None) -> None:
        self.uri = uri
        self.server = server or Server(uri)
        self._artifact_uris: dict[str, str] = {}  # run id -> its artifact URI (never changes)
        self._library: Tracker | None = None  # for artifact stores the server does not proxy

    # -- experiments ---------------------------------------------------------------------
    def get_experiment_by_name(self, name: str) -> ExperimentRecord | None:
        try:
            answer = self.server.call(
                "GET", "experiments/get-by-name", params={"experiment_name": name}
            )
        except MlflowServerError as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        found = answer["experiment"]
        return ExperimentRecord(
            experiment_id=str(found["experiment_id"]),
            name=str(found.get("name", name)),
            lifecycle_stage=str(found.get("lifecycle_stage", "active")),
            tags=tags_of(found.get("tags")),
        )

    def create_experiment(
        self, name: str, artifact_location: str | None, tags: Mapping[str, str]
    ) -> str:
        body: dict[str, Any] = {"name": name, "tags": _pairs(tags)}
        if artifact_location:
            body["artifact_location"] = artifact_location
        try:
            answer = self.server.call("POST", "experiments/create", body)
        except MlflowServerError as error:
            if error.error_code == "RESOURCE_ALREADY_EXISTS":
                raise AlreadyExists(str(error)) from error
            raise
        return str(answer["experiment_id"])

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        body = {"experiment_id": experiment_id, "key": key, "value": value}
        self.server.call("POST", "experiments/set-experiment-tag", body)

    # -- runs ----------------------------------------------------------------------------
    def create_run(
        self,
        experiment_id: str,
        start_time: int | None,
        tags: Mapping[str, str],
        run_name: str,
    ) -> RunRecord:
        body = {
            "experiment_id": experiment_id,
            "user_id": tags.get("mlflow.user", "unknown"),
            "run_name": run_name,
            "start_time": start_time or _now_ms(),
            "tags": _pairs(tags),
        }
        return self._remember(_run(self.server.call("POST", "runs/create", body)["run"]))

    def get_run(self, run_id: str) -> RunRecord:
        answer = self.server.call("GET", "runs/get", params={"run_id": run_id})
        return self._remember(_run(answer["run"]))

    def _remember(self, run: RunRecord) -> RunRecord:
        self._artifact_uris[run.run_id] = run.artifact_uri
        return run

    def search_runs(
        self, experiment_id: str, filter_string: str, order_by: Sequence[str] = ()
    ) -> list[RunRecord]:
        runs: list[RunRecord] = []
        token = None
        while True:
            body: dict[str, Any] = {
                "experiment_ids": [experiment_id],
                "filter": filter_string,
                "run_view_type": "ACTIVE_ONLY",
                "max_results": SEARCH_PAGE,
                "order_by": list(order_by),
            }
            if token:
                body["page_token"] = token
            answer = self.server.call("POST", "runs/search", body)
            runs.extend(_run(r) for r in answer.get("runs", ()))
            token = answer.get("next_page_token")
            if not token:
                return runs

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Point] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        if not (metrics or params or tags):
            return
        body = {
            "run_id": run_id,
            "metrics": [
                {"key": m.key, "value": _number(m.value), "timestamp": m.timestamp, "step": m.step}
                for m in metrics
            ],
            "params": _pairs(params),
            "tags": _pairs(tags),
        }
        self.server.call("POST", "runs/log-batch", body)

    def update_run(self, run_id: str, status: str) -> None:
        body = {"run_id": run_id, "run_uuid": run_id, "status": status}
        self.server.call("POST", "runs/update", body)

    def set_terminated(self, run_id: str, status: str, end_time: int | None = None) -> None:
        body = {
            "run_id": run_id,
            "run_uuid": run_id,
            "status": status,
            "end_time": end_time or _now_ms(),
        }
        self.server.call("POST", "runs/update", body)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        body = {"run_id": run_id, "run_uuid": run_id, "key": key, "value": value}
        self.server.call("POST", "runs/set-tag", body)

    def delete_tag(self, run_id: str, key: str) -> None:
        self.server.call("POST", "runs/delete-tag", {"run_id": run_id, "key": key})

    def get_metric_history(self, run_id: str, key: str) -> list[Point]:
        points: list[Point] = []
        token = None
        while True:
            query: dict[str, Any] = {
                "run_id": run_id,
                "metric_key": key,
                "max_results": HISTORY_PAGE,
            }
            if token:
                query["page_token"] = token
            answer = self.server.call("GET", "metrics/get-history", params=query)
            points.extend(_point(m) for m in answer.get("metrics", ()))
            token = answer.get("next_page_token")
            if not token:
                return points

    # -- artifacts -----------------------------------------------------------------------
    def artifact_url(self, run_id: str) -> str | None:
        """The HTTP URL of the run's artifacts on the server's proxied artifact store
        (`.../api/2.0/mlflow-artifacts/artifacts/<path>`); None for a store the server does
        not proxy."""
        uri = self._artifact_uris.get(run_id)
        if uri is None:
            uri = self.get_run(run_id).artifact_uri
        return proxied_url(uri, self.uri)

    def list_artifacts(self, run_id: str, path: str) -> list[str]:
        url = self.artifact_url(run_id)
        if url is None:
            return self.library().list_artifacts(run_id, path)
        base, root = url.split(ARTIFACTS_API, 1)
        where = posixpath.join(root.strip("/"), path) if path else root.strip("/")
        answer = self.server.request(
            "GET", base + ARTIFACTS_API, f"artifacts list {path or '/'}", params={"path": where}
        )
        files = answer.json().get("files", [])
        found = [posixpath.join(path, f["path"]) if path else f["path"] for f in files]
        # A path that names one file lists nothing (as MLflow's list_artifacts answers).
        if (
            len(files) == 1
            and not files[0].get("is_dir")
            and found[0] == posixpath.join(path, posixpath.basename(path))
        ):
            return []
        return sorted(found)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str) -> None:
        url = self.artifact_url(run_id)
        if url is None:
            self.library().log_artifacts(run_id, local_dir, artifact_path)
            return
        local_dir = os.path.abspath(local_dir)
        for root, dirs, files in os.walk(local_dir):
            dirs.sort()
            relative = os.path.relpath(root, local_dir)
            folder = (
                artifact_path
                if relative == "."
                else posixpath.join(artifact_path, *relative.split(os.sep))
            )
            for name in sorted(files):
                target = posixpath.join(folder, name) if folder else name
                kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
                with open(os.path.join(root, name), "rb") as body:
                    self.server.request(
                        "PUT",
                        f"{url}/{urllib.parse.quote(target)}",
                        f"artifacts upload {target}",
                        data=body,
                        headers={"Content-Type": kind},
                    )

    def library(self) -> Tracker:
        """MLflow's own client for this server (importing mlflow): for an artifact store the
        server does not proxy, which the client writes to itself."""
        if self._library is None:
            from expkit_mlflow.library import LibraryTracker
            from expkit_mlflow.tracking import Tracking, connect_library

            self._library = LibraryTracker(connect_library(Tracking(self.uri)))
        return self._library


def proxied_url(artifact_uri: str, tracking_uri: str) -> str | None:
    """The HTTP URL of a proxied artifact location: `mlflow-artifacts:/<path>` (or
    `mlflow-artifacts://host:port/<path>`) resolved against the tracking URI as
    `MlflowArtifactsRepository.resolve_uri` does, or an http(s) URL of the server's artifact
    API as it is; None for any other store (s3://, file://, a path, ...)."""
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme in ("http", "https"):
        return artifact_uri.rstrip("/") if ARTIFACTS_API in parsed.path else None
    if parsed.scheme != "mlflow-artifacts":
        return None
    tracking = urllib.parse.urlparse(tracking_uri)
    if parsed.path == "/":
        path = f"{ARTIFACTS_API}/"
    elif parsed.path == ARTIFACTS_API:
        path = ARTIFACTS_API
    else:
        path = f"{tracking.path}/{ARTIFACTS_API}/{parsed.path}"
    path = re.sub(r"//+", "/", path)
    resolved = urllib.parse.urlunparse(
        (tracking.scheme, parsed.netloc or tracking.netloc, path, "", "", "")
    )
    return resolved.replace("///", "/").rstrip("/")
