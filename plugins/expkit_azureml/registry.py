"""Model registry `azureml`: each model version expkit registers is also registered in the Azure
ML workspace, with its lineage as tags.

    model: {name: pt-dnn, path: outputs/, registries: [azureml]}

A run that ran on Azure ML registers from its Azure ML run, as the seed does
(`run.register_model(model_name='pt-dnn', model_path='outputs/')`); a run that ran elsewhere
uploads the version's files (`Model.register`) to the workspace its config.json names, or
the registry's options:

    model: {name: pt-dnn, registries: [{name: azureml, options: {workspace: config.json}}]}
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from expkit.plugin import ModelRegistry, ModelVersion, Registration, RunInfo, declare_options
from expkit_azureml.options import AUTH, WORKSPACE, AzureOptions
from expkit_azureml.target import RECORD_FILE
from expkit_azureml.workspace import WorkspaceRef, connect, credentials, workspace_ref


class AzureMLRegistry(ModelRegistry):
    name = "azureml"
    description = "each model version also registered in the Azure ML workspace"
    # For a run that did not run on Azure ML (one that did registers in its own workspace).
    takes = declare_options(
        workspace=WORKSPACE,
        auth=dataclasses.replace(AUTH, default=None, help=AUTH.help + " (default: auto)"),
    )

    def register(self, model: ModelVersion, run: RunInfo, options: dict[str, Any]) -> Registration:
        tags = model.lineage_tags()
        description = f"expkit model {model.name}:{model.version} from run {run.run_id}"
        record_file = run.run_dir / RECORD_FILE
        if record_file.is_file():
            record = json.loads(record_file.read_text(encoding="utf-8"))
            ref = WorkspaceRef(**record["workspace"], source=f"{RECORD_FILE} of {run.run_id}")
            workspace = self.open_workspace(ref, record.get("auth") or "auto")
            azure_run = self.azure_run(workspace, record["experiment"], record["run_id"])
            assert run.job.model is not None
            registered = azure_run.register_model(
                model_name=model.name,
                model_path=run.job.model.path.rstrip("/"),
                tags=tags,
                description=description,
            )
            origin = f"from Azure ML run {record['run_id']}"
        else:
            job = run.job  # the workspace its options name, else from config.json
            given = job.compute.options if job.compute.target == "azureml" else {}
            compute = job.compute.replace(target="azureml", options={**given, **options})
            azure = AzureOptions.from_job(job.replace(compute=compute))
            ref = workspace_ref(azure, job.source_directory)
            workspace = self.open_workspace(ref, credentials(azure))
            registered = self.upload(workspace, model, tags, description)
            origin = "uploaded"
        text = f"{registered.name} version {registered.version} in Azure ML workspace "
        text += f"{workspace.name} ({origin})"
        if int(registered.version) != model.version:
            text += f" (Azure ML numbers its versions itself: this is expkit's {model.version})"
        # Where it went, to find the version again: the workspace and Azure ML's own number.
        locator = {
            **ref.to_dict(),
            "name": str(registered.name),
            "version": str(registered.version),
        }
        return Registration(text, locator)

    # -- the calls that reach Azure ---------------------------------------------------------
    def open_workspace(self, ref: WorkspaceRef, auth: str) -> Any:
        return connect(ref, auth)

    def azure_run(self, workspace: Any, experiment: str, run_id: str) -> Any:
        from azureml.core import Experiment, Run

        return Run(Experiment(workspace, experiment), run_id)

    def upload(self, workspace: Any, model: ModelVersion, tags: dict[str, str], text: str) -> Any:
        from azureml.core import Model

        return Model.register(
            workspace=workspace,
            model_path=str(model.path),
            model_name=model.name,
            tags=tags,
            description=text,
        )
