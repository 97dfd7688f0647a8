"""MLflow's in-script API inside an expkit run: a script's `mlflow.log_metric` and friends
record into the expkit run, with no change to the script.

`install(mlflow)` is the import hook for `mlflow` (see `expkit.importhooks`): in a run's
Python processes, right after the script imports mlflow, it registers the tracking-store
scheme `expkit` with MLflow and sets MLFLOW_TRACKING_URI to `expkit:/<run id>`. MLflow reads
that variable only when nothing else named a store, so a script's own
`mlflow.set_tracking_uri(...)` still wins, with one notice saying so (its calls no longer
reach the expkit run; a relative local path lies in the run's working copy, removed at the
end); on Azure ML (`azureml:` URIs) nothing is changed.

`ExpkitStore` is that store. It lives in the script's process and talks to no server and no
file: a metric goes to `expkit.context.get_context().log(key, value, step)`, params to
`log_params`, tags to `set_tags`, so the values reach the run's history through its metric
channel like the script's own `Run.log`. With the job's `metrics: [mlflow]` sink the run
history becomes exactly one MLflow run (the sink's); without it nothing is written to an
`mlruns/` or `mlflow.db`. MLflow sees one experiment and one run, whose id is the expkit run's
and whose artifact URI is the run's `outputs/` folder: `log_artifact`, `log_dict` and the
files of a logged model land there and are sealed with the run's outputs.

Every `start_run` (new, nested or resumed by id) answers with that run (the second new or
nested one with one notice: the script's MLflow runs share the expkit run); `end_run` marks
it finished for MLflow only, never the expkit run. What a flavor's `log_model` logs again to
link the run's metrics to the model (the same values, with a `model_id`) is not recorded
twice. Calls this store cannot honour (traces,
datasets, deleting) are no-ops with one notice each, never an exception in the script.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from mlflow.entities import (
    Experiment,
    LifecycleStage,
    LoggedModel,
    LoggedModelStatus,
    Metric,
    Param,
    Run,
    RunData,
    RunInfo,
    RunStatus,
    RunTag,
)
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.store.entities.paged_list import PagedList
from mlflow.store.model_registry.abstract_store import AbstractStore as RegistryStore
from mlflow.store.tracking.abstract_store import AbstractStore

from expkit.context import get_context

SCHEME = "expkit"
EXPERIMENT_ID = "0"  # MLflow's default experiment id: a script that names none gets this one
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
REGISTRY_URI_ENV = "MLFLOW_REGISTRY_URI"
RUN_ID_ENV = "EXPKIT_RUN_ID"
# Tags MLflow adds to every run it creates (user, source file, git commit, run name): the
# expkit run records these itself, and the sink names its MLflow run.
SYSTEM_TAG_PREFIX = "mlflow."

_noticed: set[str] = set()
_runs_started = 0  # MLflow runs this process started (`create_run`): a second one is said


def install(module: ModuleType) -> None:
    """Point the script's MLflow (`module`, just imported) at the expkit run: register the
    `expkit` tracking-store scheme and set MLFLOW_TRACKING_URI to it (and MLFLOW_REGISTRY_URI,
    unless set: see `_registry_store`). Does nothing outside an expkit run, or when the run's
    MLflow is Azure ML's own."""
    run_id = os.environ.get(RUN_ID_ENV)
    if not run_id or os.environ.get(TRACKING_URI_ENV, "").startswith("azureml:"):
        return
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils

    uri = f"{SCHEME}:/{run_id}"
    utils._tracking_store_registry.register(SCHEME, ExpkitStore)
    os.environ[TRACKING_URI_ENV] = uri
    if not os.environ.get(REGISTRY_URI_ENV):
        registry_utils._get_store_registry().register(SCHEME, _registry_store)
        os.environ[REGISTRY_URI_ENV] = uri
    mlflow: Any = module
    original = mlflow.set_tracking_uri
    if not getattr(original, "_expkit", False):

        @functools.wraps(original)
        def set_tracking_uri(uri: Any) -> None:
            original(uri)
            _own_store_notice(str(uri), run_id)

        set_tracking_uri._expkit = True  # type: ignore[attr-defined]
        mlflow.set_tracking_uri = set_tracking_uri


def _own_store_notice(uri: str, run_id: str) -> None:
    """The notice (one per URI) for a script that sets a tracking URI of its own: its calls go
    there, not into the expkit run; a relative local path is inside the run's working copy,
    which expkit removes when the run ends."""
    if uri.startswith(f"{SCHEME}:"):
        return
    text = (
        f"expkit: mlflow set_tracking_uri: the script's MLflow calls now go to {uri}, "
        f"not into expkit run {run_id}"
    )
    path = _local_path(uri)
    if path is not None and not os.path.isabs(path):
        parts = Path(path).parts
        if parts[:1] != ("outputs",):
            text += (
                f"; {path!r} is relative to the run's working copy ({os.getcwd()}), which "
                "expkit removes when the run ends: use an absolute path, or one under outputs/"
            )
    _notice_once(f"own store {uri}", text)


def _local_path(uri: str) -> str | None:
    """The file path a local tracking URI names (`sqlite:///mine.db` is "mine.db",
    `file:mlruns` "mlruns", a bare path itself); None for a server or another scheme."""
    for prefix in ("sqlite:///", "file://", "file:"):
        if uri.startswith(prefix):
            rest = uri[len(prefix) :]
            return rest.split("?", 1)[0] if prefix == "sqlite:///" else rest
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    # http:, databricks, ... (a drive letter, C:, is a path)
    if uri.startswith("databricks") or (len(scheme) > 1 and "/" not in scheme):
        return None
    return uri


def _registry_store(store_uri: str | None = None, tracking_uri: str | None = None) -> Any:
    """The model registry MLflow uses when the script names none. MLflow's own default (the
    tracking URI) would look for a Spark session, a failed `import pyspark`, at every
    `log_metric`: a set MLFLOW_REGISTRY_URI spares that. So the registry follows the tracking
    URI as MLflow's would: the script's own store when it set one, else a registry that keeps
    versions in this process (models are registered by expkit, the job's `model:`)."""
    import inspect

    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service.utils import get_tracking_uri

    tracking = tracking_uri or get_tracking_uri()  # MLflow caches the store per tracking URI
    if tracking.startswith(f"{SCHEME}:"):
        return ExpkitRegistry()  # type: ignore[abstract]  # mlflow's ABC is not enforced
    default = registry_utils._get_default_registry_uri_for_tracking_uri(tracking)
    # the builder directly: MLflow calls this one holding the lock that get_store takes
    builder = registry_utils._get_store_registry().get_store_builder(default)
    if "tracking_uri" in inspect.signature(builder).parameters:
        return builder(store_uri=default, tracking_uri=tracking)
    return builder(store_uri=default)


class ExpkitStore(AbstractStore):
    """The tracking store of scheme `expkit`: one experiment and one run, the expkit run,
    written through the in-script API (`expkit.context`)."""

    def __init__(self, store_uri: str | None = None, artifact_uri: str | None = None) -> None:
        super().__init__()
        # get_context() at each call, not kept: a process the script forks has its own
        self._run_id = os.environ.get(RUN_ID_ENV) or get_context().id or "offline"
        self._outputs = _outputs_folder()
        self._started = int(time.time() * 1000)
        self._status = RunStatus.to_string(RunStatus.RUNNING)
        self._end_time: int | None = None
        self._metrics: dict[str, Metric] = {}  # the latest value of each, for get_run
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._models: dict[str, LoggedModel] = {}
        self._lock = threading.Lock()

    # -- experiments: one --------------------------------------------------------------------
    def _experiment(self, name: str = "Default") -> Experiment:
        return Experiment(
            EXPERIMENT_ID,
            name,
            self._outputs.as_uri(),
            LifecycleStage.ACTIVE,
            creation_time=self._started,
            last_update_time=self._started,
        )

    def search_experiments(self, *args: Any, **kwargs: Any) -> PagedList:
        """The one experiment."""
        return PagedList([self._experiment()], None)

    def create_experiment(self, name: str, artifact_location: Any = None, tags: Any = None) -> str:
        """The one experiment's id, whatever the name: the run is expkit's."""
        return EXPERIMENT_ID

    def get_experiment(self, experiment_id: str) -> Experiment:
        """The one experiment, whatever the id."""
        return self._experiment()

    def get_experiment_by_name(self, experiment_name: str) -> Experiment:
        """The one experiment, under the name asked for (so `set_experiment` finds it)."""
        return self._experiment(experiment_name)

    def set_experiment_tag(self, experiment_id: str, tag: Any) -> None:
        """Experiment tags have no place in an expkit run: one notice."""
        _notice("set_experiment_tag", "experiment tags are not recorded")

    # -- the run -----------------------------------------------------------------------------
    def _run(self) -> Run:
        info = RunInfo(
            run_id=self._run_id,
            experiment_id=EXPERIMENT_ID,
            user_id="",
            status=self._status,
            start_time=self._started,
            end_time=self._end_time,
            lifecycle_stage=LifecycleStage.ACTIVE,
            artifact_uri=self._outputs.as_uri(),
            run_name=self._run_id,
        )
        with self._lock:
            data = RunData(
                metrics=list(self._metrics.values()),
                params=[Param(k, v) for k, v in self._params.items()],
                tags=[RunTag(k, v) for k, v in self._tags.items()],
            )
        return Run(info, data)

    def create_run(
        self, experiment_id: str, user_id: str, start_time: int, tags: Any, run_name: Any
    ) -> Run:
        """The expkit run (every `start_run` lands in it); the caller's own tags are
        recorded, MLflow's `mlflow.*` ones are not."""
        global _runs_started
        _runs_started += 1
        if _runs_started == 2:
            _notice_once(
                "runs",
                f"expkit: mlflow start_run: another MLflow run started (a second or nested "
                f"one): all of this script's MLflow runs record into expkit run {self._run_id}, "
                "their metrics' steps side by side, and a param logged again replaces the "
                "earlier value)",
            )
        own = {t.key: t.value for t in tags or () if not t.key.startswith(SYSTEM_TAG_PREFIX)}
        if own:
            self._set_tags(own)
        self._status, self._end_time = RunStatus.to_string(RunStatus.RUNNING), None
        return self._run()

    def get_run(self, run_id: str) -> Run:
        """The expkit run, whatever the id (a script resuming an MLflow run by id goes on in
        this one)."""
        return self._run()

    def update_run_info(self, run_id: str, run_status: Any, end_time: Any, run_name: Any) -> Any:
        """Mark the run ended or running for MLflow; the expkit run goes on until the script
        exits."""
        self._status = RunStatus.to_string(run_status)
        self._end_time = end_time
        return self._run().info

    def _search_runs(
        self,
        experiment_ids: Any,
        filter_string: Any,
        run_view_type: Any,
        max_results: Any,
        order_by: Any,
        page_token: Any,
    ) -> tuple[list[Run], None]:
        from mlflow.utils.search_utils import SearchUtils

        runs = SearchUtils.filter([self._run()], filter_string)
        return SearchUtils.paginate(runs, page_token, max_results)

    def delete_run(self, run_id: str) -> None:
        """An expkit run is deleted with `expkit runs delete`: one notice."""
        _notice("delete_run", "the run is expkit's; `expkit runs delete` deletes it")

    def restore_run(self, run_id: str) -> None:
        """Nothing to restore: the run is never deleted from here."""

    # -- what the script logs ----------------------------------------------------------------
    def log_metric(self, run_id: str, metric: Metric) -> None:
        """One value of a metric, at the metric's own step."""
        if self._relinked(metric):
            return
        get_context().log(metric.key, metric.value, metric.step)
        self._metrics[metric.key] = metric

    def _relinked(self, metric: Metric) -> bool:
        """True for a value MLflow logs again only to link it to a logged model (a flavor's
        `log_model` re-logs the run's metrics at the model's step with its `model_id`): the
        same key, step and value as the latest this process logged, recorded once already."""
        if not metric.model_id:
            return False
        latest = self._metrics.get(metric.key)
        if latest is None or latest.step != metric.step:
            return False
        same = latest.value == metric.value or (
            latest.value != latest.value and metric.value != metric.value  # both NaN
        )
        return bool(same)

    def log_param(self, run_id: str, param: Param) -> None:
        """One parameter (`expkit runs show` lists it; the latest value of a key wins)."""
        get_context().log_params({param.key: param.value})
        with self._lock:
            self._params[param.key] = str(param.value)

    def set_tag(self, run_id: str, tag: RunTag) -> None:
        """One tag of the run."""
        self._set_tags({tag.key: tag.value})

    def delete_tag(self, run_id: str, key: str) -> None:
        """The run history keeps every tag set: one notice."""
        _notice("delete_tag", "tags set are kept by the run")

    def log_batch(self, run_id: str, metrics: Any, params: Any, tags: Any) -> None:
        """Metrics, params and tags at once (`log_metrics`, `log_params`, `set_tags`)."""
        log = get_context().log
        for metric in metrics:
            if self._relinked(metric):
                continue
            log(metric.key, metric.value, metric.step)
            self._metrics[metric.key] = metric
        if params:
            values = {p.key: str(p.value) for p in params}
            get_context().log_params(values)
            with self._lock:
                self._params.update(values)
        if tags:
            self._set_tags({t.key: t.value for t in tags})

    def _set_tags(self, tags: dict[str, Any]) -> None:
        values = {str(k): str(v) for k, v in tags.items()}
        get_context().set_tags(values)
        with self._lock:
            self._tags.update(values)

    def get_metric_history(
        self, run_id: str, metric_key: str, max_results: Any = None, page_token: Any = None
    ) -> PagedList:
        """The latest value only (the run history, `expkit metrics`, has them all)."""
        latest = self._metrics.get(metric_key)
        return PagedList([latest] if latest else [], None)

    def log_inputs(self, run_id: str, datasets: Any = None, models: Any = None) -> None:
        """Datasets are not recorded: one notice."""
        if datasets:
            _notice("log_inputs", "datasets are not recorded")

    def log_outputs(self, run_id: str, models: Any) -> None:
        """The run's logged models are already in its outputs."""

    def record_logged_model(self, run_id: str, mlflow_model: Any) -> None:
        """The model's files are in the run's outputs; nothing else to record."""

    # -- logged models (MLflow 3): files under outputs/models/<name> -------------------------
    def create_logged_model(
        self,
        experiment_id: str = EXPERIMENT_ID,
        name: str | None = None,
        source_run_id: str | None = None,
        tags: Any = None,
        params: Any = None,
        model_type: str | None = None,
    ) -> LoggedModel:
        """A logged model whose artifacts go to `outputs/models/<name>` (`<name>-2`, ... when
        the name is taken), sealed with the run's outputs."""
        model_id = f"m-{uuid.uuid4().hex}"
        name = name or "model"
        with self._lock:
            folder = self._outputs / "models" / name
            n = 1
            while folder.exists() or any(
                m.artifact_location == folder.as_uri() for m in self._models.values()
            ):
                n += 1
                folder = self._outputs / "models" / f"{name}-{n}"
            now = int(time.time() * 1000)
            model = LoggedModel(
                experiment_id=EXPERIMENT_ID,
                model_id=model_id,
                name=name,
                artifact_location=folder.as_uri(),
                creation_timestamp=now,
                last_updated_timestamp=now,
                model_type=model_type,
                source_run_id=source_run_id,
                status=LoggedModelStatus.PENDING,
                tags={t.key: t.value for t in tags or ()},
                params={p.key: p.value for p in params or ()},
            )
            self._models[model_id] = model
        return model

    def get_logged_model(self, model_id: str, allow_deleted: bool = False) -> LoggedModel:
        """A model this process logged."""
        model = self._models.get(model_id)
        if model is None:
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

            raise MlflowException(
                f"logged model {model_id} is not in this expkit run",
                error_code=RESOURCE_DOES_NOT_EXIST,
            )
        return model

    def finalize_logged_model(self, model_id: str, status: LoggedModelStatus) -> LoggedModel:
        """Set a model's status (READY once its files are written)."""
        model = self.get_logged_model(model_id)
        model.status = status
        model.last_updated_timestamp = int(time.time() * 1000)
        return model

    def set_logged_model_tags(self, model_id: str, tags: Any) -> None:
        """Tags of a model, kept in this process."""
        model = self.get_logged_model(model_id)
        model.tags.update({t.key: t.value for t in tags})

    def delete_logged_model_tag(self, model_id: str, key: str) -> None:
        """Remove a model's tag, kept in this process."""
        self.get_logged_model(model_id).tags.pop(key, None)

    def log_logged_model_params(self, model_id: str, params: Any) -> None:
        """Params of a model, kept in this process."""
        self.get_logged_model(model_id).params.update({p.key: p.value for p in params})

    def search_logged_models(self, *args: Any, **kwargs: Any) -> PagedList:
        """The models this process logged."""
        return PagedList(list(self._models.values()), None)


class ExpkitRegistry(RegistryStore):
    """The model registry of scheme `expkit`: versions kept in this process, with one
    notice (expkit registers the run's model itself, from the job's `model:`)."""

    def __init__(self, store_uri: str | None = None, tracking_uri: str | None = None) -> None:
        super().__init__()
        self._versions: dict[str, list[ModelVersion]] = {}

    def create_registered_model(self, name: str, *args: Any, **kwargs: Any) -> RegisteredModel:
        """A registered model, kept in this process."""
        _notice(
            "model registry",
            "models are registered by expkit at the end of the run (the job's `model:`); "
            "this one is kept in the script's process only",
        )
        self._versions.setdefault(name, [])
        return self.get_registered_model(name)

    def get_registered_model(self, name: str) -> RegisteredModel:
        """A model registered in this process."""
        versions = self._versions.get(name, [])
        return RegisteredModel(name, latest_versions=versions[-1:])

    def create_model_version(
        self,
        name: str,
        source: str,
        run_id: Any = None,
        tags: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> ModelVersion:
        """The next version of `name`, READY at once."""
        versions = self._versions.setdefault(name, [])
        version = ModelVersion(
            name,
            str(len(versions) + 1),
            int(time.time() * 1000),
            source=source,
            run_id=run_id,
            tags=tags,
            model_id=kwargs.get("model_id"),
        )
        versions.append(version)
        return version

    def get_model_version(self, name: str, version: str) -> ModelVersion:
        """A version registered in this process."""
        return self._versions[name][int(version) - 1]

    def get_model_version_download_uri(self, name: str, version: str) -> str:
        """Where the version's files are (in the run's outputs)."""
        return str(self.get_model_version(name, version).source)

    def get_latest_versions(self, name: str, stages: Any = None) -> list[ModelVersion]:
        """The latest version of `name`, if any."""
        return self._versions.get(name, [])[-1:]

    def search_model_versions(self, *args: Any, **kwargs: Any) -> PagedList:
        """Every version registered in this process."""
        return PagedList([v for vs in self._versions.values() for v in vs], None)

    def set_model_version_tag(self, name: str, version: str, tag: Any) -> None:
        """Tags of a version, not kept."""

    def set_registered_model_tag(self, name: str, tag: Any) -> None:
        """Tags of a model, not kept."""


# AbstractStore methods that have no meaning for the expkit run (or raise there): answered
# with None and one notice, so that the script goes on.
_UNSUPPORTED = frozenset(
    {
        "delete_experiment",
        "restore_experiment",
        "rename_experiment",
        "delete_experiment_tag",
        "delete_logged_model",
        "start_trace",
        "log_spans",
        "set_trace_tag",
        "delete_trace_tag",
        "link_traces_to_run",
        "create_dataset",
        "create_assessment",
        "register_scorer",
    }
)


def _unsupported(name: str) -> Any:
    def call(self: ExpkitStore, *args: Any, **kwargs: Any) -> None:
        _notice(name, "not recorded in an expkit run")

    call.__name__ = name
    call.__doc__ = f"`{name}`: not recorded in an expkit run (one notice)."
    return call


for _name in _UNSUPPORTED:
    setattr(ExpkitStore, _name, _unsupported(_name))


def _outputs_folder() -> Path:
    """The run's working outputs folder: `$EXPKIT_RUN_DIR/work/outputs` locally, else the
    script's `./outputs` (where the target seals outputs from)."""
    run_dir = os.environ.get("EXPKIT_RUN_DIR")
    if run_dir and (Path(run_dir) / "work").is_dir():
        return Path(run_dir) / "work" / "outputs"
    return Path.cwd().resolve() / "outputs"


def _notice_once(key: str, text: str) -> None:
    """`text` on stderr, once per `key` in this process."""
    if key in _noticed:
        return
    _noticed.add(key)
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except Exception:
        pass


def _notice(what: str, why: str) -> None:
    _notice_once(what, f"expkit: mlflow {what}: {why}; the script goes on")
