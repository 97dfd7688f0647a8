"""Plugin: Azure ML (SDK v1) as the compute target `azureml`, the model registry `azureml` and
the job importer `azureml`.

    compute: {target: azureml, options: {cluster: gpu-cluster, vm_size: STANDARD_NC6s_v3}}
    model: {name: pt-dnn, registries: [azureml]}
    expkit import azureml train_azure.py:estimator -o job.yaml

azureml-core takes seconds to import and `expkit plugins` loads every plugin, so this module
only checks that azureml-core and azureml-train-core are installed; the modules that use them
import them when a job does. See target.py for how each stage maps onto Azure ML.

Inside a run off Azure ML, azureml's `Run.get_context()` records into the expkit run: the
import hook on `azureml.core.run` (inscript.py), named by `expkit_import_hooks`.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from expkit.plugin import ComputeTarget, JobImporter, ModelRegistry, PluginUnavailable, hookimpl

INSTALL_HINT = (
    "azureml-core and azureml-train-core are not installed; pip install 'expkit[azureml]'"
)
REQUIRED = ("azureml.core", "azureml.train")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # the `azureml` namespace itself is missing
        return False


if not all(_installed(m) for m in REQUIRED):
    raise PluginUnavailable(INSTALL_HINT)

if TYPE_CHECKING:
    from expkit.plugin import JobSpec


# The capabilities' modules are imported by their hooks (at load, in expkit), not here: a run's
# script imports this package for the import hook alone (inscript.py), and they would cost it
# a quarter of a second.
@hookimpl
def expkit_compute_targets() -> list[ComputeTarget]:
    from expkit_azureml.target import AzureMLTarget

    return [AzureMLTarget()]


@hookimpl
def expkit_model_registries() -> list[ModelRegistry]:
    from expkit_azureml.registry import AzureMLRegistry

    return [AzureMLRegistry()]


@hookimpl
def expkit_job_importers() -> list[JobImporter]:
    from expkit_azureml.importer import AzureMLImporter

    return [AzureMLImporter()]


def job_from_azureml(config: Any, experiment: str | None = None) -> JobSpec:
    """The expkit job spec of an `azureml.train.dnn.PyTorch` estimator or a `ScriptRunConfig`
    built in this process (see `expkit_azureml.importer`)."""
    from expkit_azureml.importer import job_from_azureml as convert

    return convert(config, experiment)


@hookimpl
def expkit_import_hooks() -> dict[str, str]:
    # Inside a run, azureml's Run.get_context() records into the expkit run (see inscript.py)
    return {"azureml.core.run": "expkit_azureml.inscript:install"}
