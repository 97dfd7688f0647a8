"""Model registry `mlflow`: each model version expkit registers also becomes an MLflow model
version, lineage as tags.

What it registers: when the job's `mlflow` export passed (the registry adds it to the job's
exports when the model says how to load it: `ModelRegistry.exports`), an MLflow 3 logged
model made from that MLflow model folder, linked to the run (the run page's "Logged models"),
so that `mlflow.pyfunc.load_model("models:/NAME/VERSION")` loads it, with its signature and
input example (`expkit_mlflow.exporter`). Without it (no `model.load`, or the export failed)
the version points at the run's outputs, files only, and the reference says why it is not
loadable with mlflow.pyfunc.

Where the artifact store is local (the workspace's default `mlartifacts/`, any file:// or
path), the model's files are hard links to the version's files, not copies: see
`expkit_mlflow.tracking.place`.

Aliases (`expkit models alias`, the job's `model.aliases`) are MLflow registered model
aliases, set on the version this registry made (`Registration.locator`).

Version numbers: both registries count from 1 per model name, so they agree as long as every
version of the model goes through both. When they do not (versions registered in expkit
without this registry, or another workspace registering the same name on a shared server),
MLflow cannot skip or reuse a number: the version is registered anyway under MLflow's next
number, tagged `expkit.version`, and the reference shown in the summary says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from expkit.plugin import (
    ModelRegistry,
    ModelVersion,
    Registration,
    RunInfo,
    UserError,
    declare_options,
)
from expkit_mlflow.exporter import FOLDER
from expkit_mlflow.tracking import (
    NAME,
    TAKES,
    Tracking,
    clean_tags,
    connect_library,
    ensure_run,
    local_path,
    log_outputs,
    outputs_logged,
    place,
    resolve,
    sink_options,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient


class MlflowRegistry(ModelRegistry):
    name = NAME
    description = "each model version also registered in MLflow as an MLflow model, with lineage"
    exports: ClassVar[tuple[str, ...]] = (NAME,)
    takes = declare_options(
        tracking_uri=dataclasses.replace(
            TAKES["tracking_uri"],
            help="the MLflow tracking server or store (default: the job's mlflow sink's, else "
            "as for the sink)",
        ),
        artifact_location=dataclasses.replace(
            TAKES["artifact_location"],
            help="where a new MLflow experiment keeps its artifacts (default: the job's mlflow "
            "sink's, else as for the sink)",
        ),
    )

    def register(self, model: ModelVersion, run: RunInfo, options: dict[str, Any]) -> Registration:
        """Register `model` as an MLflow model version of the MLflow run mirroring `run`:
        from its MLflow model folder as a logged model when there is one, else its files."""
        from mlflow.exceptions import MlflowException

        from expkit_mlflow.library import LibraryTracker

        tracking = resolve(run, {**sink_options(run.job), **options})
        client = connect_library(tracking)  # the model registry: MLflow's own client
        tracker = LibraryTracker(client)
        # The sink's run when the job has the mlflow sink (still running: the sink closes it
        # after this stage), else one made here for the model to point at.
        mlflow_run_id, made_here = ensure_run(tracker, run, tracking)
        model_id = None
        try:
            if not outputs_logged(tracker, mlflow_run_id):
                log_outputs(tracker, mlflow_run_id, run)
            try:
                client.create_registered_model(model.name, description="registered by expkit")
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            files = mlflow_model_files(model)
            if files:
                model_id = log_model(client, mlflow_run_id, model, files)
                source = f"models:/{model_id}"  # as mlflow.<flavor>.log_model registers it
            else:
                assert run.job.model is not None
                path = run.job.model.path.strip("/")  # "outputs", "outputs/model.pt", ...
                source = f"runs:/{mlflow_run_id}/{path}"
            with store_uri(tracking.uri):
                version = client.create_model_version(
                    model.name,
                    source,
                    run_id=mlflow_run_id,
                    tags=clean_tags(model.lineage_tags()),
                    description=f"expkit model {model.name}:{model.version} from run {run.run_id}",
                    model_id=model_id,
                )
        except BaseException:
            if made_here:
                with contextlib.suppress(Exception):  # the error that matters is the first
                    client.set_terminated(mlflow_run_id, "FAILED")
            raise
        if made_here:
            client.set_terminated(mlflow_run_id, "FINISHED")
        number = int(version.version)
        ref = f"{model.name} version {number} in {tracking.uri}"
        if model_id is None:
            ref += f" (files only: not loadable with mlflow.pyfunc ({not_loadable(model, run)}))"
        if number != model.version:
            ref += (
                f" (warning: MLflow's numbering has diverged, this is expkit's version "
                f"{model.version}; tag expkit.version)"
            )
        locator = {"tracking_uri": tracking.uri, "name": model.name, "version": str(number)}
        if model_id is not None:
            locator["model_id"] = model_id
        return Registration(ref, locator)

    def set_alias(self, alias: str, model: ModelVersion, registration: Registration) -> str | None:
        """Point MLflow's registered model alias `alias` at the version this registry made
        for `model` (MLflow's documentation: "Registered model aliases")."""
        client, name, version = _located(registration, model.name)
        try:
            client.set_registered_model_alias(name, alias, version)
        except Exception as error:
            raise UserError(
                f"mlflow: cannot set alias {alias!r} of {name} version {version} in "
                f"{registration.locator['tracking_uri']}: {_first_line(error)}"
            ) from error
        return f"MLflow alias {name}@{alias} -> version {version}"

    def delete_alias(self, alias: str, model_name: str, registration: Registration) -> str | None:
        """Remove MLflow's registered model alias `alias` of `model_name` (gone already:
        nothing to do)."""
        from mlflow.exceptions import MlflowException

        client, name, _ = _located(registration, model_name)
        try:
            client.delete_registered_model_alias(name, alias)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise UserError(
                    f"mlflow: cannot delete alias {alias!r} of {name} in "
                    f"{registration.locator['tracking_uri']}: {_first_line(error)}"
                ) from error
        return f"MLflow alias {name}@{alias} deleted"


@contextlib.contextmanager
def store_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` for the block, then as it was.

    MLflow's SQL model registry store looks up the logged model of a version's source
    `models:/<model id>` through a client of the process's tracking URI, not the one the
    registering client was made with (mlflow.store.model_registry.sqlalchemy_store,
    create_model_version, "TODO: Propagate tracking URI"). expkit's driver registers from
    its main thread; the sinks use clients of their own URI, untouched by this."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield


def _located(registration: Registration, model_name: str) -> tuple[MlflowClient, str, str]:
    """The client, model name and version number a registration's locator names; a
    UserError when it has none (registered before expkit kept locators)."""
    locator = registration.locator
    if not locator.get("tracking_uri") or not locator.get("version"):
        raise UserError(
            f"mlflow: no MLflow version is known for this version of {model_name} (registered "
            "before expkit kept where); set the alias in MLflow itself"
        )
    client = connect_library(Tracking(locator["tracking_uri"]))
    return client, locator.get("name", model_name), locator["version"]


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "message", error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def mlflow_model_files(model: ModelVersion) -> dict[str, Path]:
    """The files of the version's MLflow model folder (the passing `mlflow` export's), by
    name within that folder; empty when there is none."""
    entry = model.lineage.get("exports", {}).get(NAME)
    if not entry:
        return {}
    prefix = f"{FOLDER}/"
    found = {
        name.removeprefix(prefix): model.path / name
        for name in entry.get("files", [])
        if name.startswith(prefix)
    }
    return found if "MLmodel" in found else {}


def not_loadable(model: ModelVersion, run: RunInfo) -> str:
    """Why a version holds no MLflow model folder, in a few words."""
    spec = run.job.model
    if spec is None or spec.load is None or spec.input is None:
        return "the job's model has no model.load and model.input"
    if NAME not in model.lineage.get("exports", {}):
        return f"the {NAME} export failed"
    return f"no MLmodel in the {NAME} export"


def log_model(
    client: MlflowClient, mlflow_run_id: str, model: ModelVersion, files: dict[str, Path]
) -> str:
    """The MLflow model folder `files` as an MLflow 3 logged model of the run (its output,
    as `mlflow.<flavor>.log_model` makes it: the run page lists it), READY; its id.

    A local artifact store gets the files as hard links (`place`); another, uploads."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    run = client.get_run(mlflow_run_id)
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=model.name,
        source_run_id=mlflow_run_id,
        tags=clean_tags({"expkit.model": model.name, "expkit.version": model.version}),
        model_type="pytorch",
    )
    try:
        local = local_path(logged.artifact_location)
        if local is not None:
            place(files, local)
        else:
            with tempfile.TemporaryDirectory(prefix=".mlflow-model-") as staging:
                place(files, Path(staging))  # links in a private folder: what MLflow walks
                client.log_model_artifacts(logged.model_id, staging)
        client.log_outputs(mlflow_run_id, [LoggedModelOutput(logged.model_id, step=0)])
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return str(logged.model_id)
