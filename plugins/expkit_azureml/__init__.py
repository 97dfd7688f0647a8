"""Plugin: the `azureml` compute target, model registry and job importer (work in progress)."""
