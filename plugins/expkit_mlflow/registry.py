"""Model registry `mlflow`: each model version expkit registers also becomes an MLflow model
version, pointing at the run's outputs in the MLflow run's artifacts, lineage as tags.

Version numbers: both registries count from 1 per model name, so they agree as long as every
version of the model goes through both. When they do not (versions registered in expkit
without this registry, or another workspace registering the same name on a shared server),
MLflow cannot skip or reuse a number: the version is registered anyway under MLflow's next
number, tagged `expkit.version`, and the reference shown in the summary says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from expkit.plugin import ModelRegistry, ModelVersion, RunInfo, declare_options
from expkit_mlflow.tracking import (
    NAME,
    TAKES,
    clean_tags,
    connect,
    ensure_run,
    log_outputs,
    outputs_logged,
    resolve,
    sink_options,
)


class MlflowRegistry(ModelRegistry):
    name = NAME
    description = "each model version also registered in MLflow, with its lineage"
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

    def register(self, model: ModelVersion, run: RunInfo, options: dict[str, Any]) -> str:
        from mlflow.exceptions import MlflowException

        tracking = resolve(run, {**sink_options(run.job), **options})
        client = connect(tracking)
        # The sink's run when the job has the mlflow sink (still running: the sink closes it
        # after this stage), else one made here for the model to point at.
        mlflow_run_id, made_here = ensure_run(client, run, tracking)
        try:
            if not outputs_logged(client, mlflow_run_id):
                log_outputs(client, mlflow_run_id, run)
            try:
                client.create_registered_model(model.name, description="registered by expkit")
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            assert run.job.model is not None
            path = run.job.model.path.strip("/")  # "outputs", "outputs/model.pt", ...
            version = client.create_model_version(
                model.name,
                f"runs:/{mlflow_run_id}/{path}",
                run_id=mlflow_run_id,
                tags=clean_tags(model.lineage_tags()),
                description=f"expkit model {model.name}:{model.version} from run {run.run_id}",
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
        if number != model.version:
            ref += (
                f" (warning: MLflow's numbering has diverged, this is expkit's version "
                f"{model.version}; tag expkit.version)"
            )
        return ref
