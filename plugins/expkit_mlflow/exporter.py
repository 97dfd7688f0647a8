"""The `mlflow` exporter: the model as an MLflow model folder (`mlflow-model/`), loadable with
`mlflow.pyfunc.load_model`, checked against the eager model.

    exports: [mlflow]     # added by itself for a job with `registries: [mlflow]` and model.load

The folder holds one MLmodel file with these flavors (MLflow's documentation, "MLflow Models:
Storage Format": one model, several flavors, each a way to load it):
- `pytorch` (mlflow.pytorch.save_model): the model rebuilt as `model.load` says, with the
  factory's module as code (`code/`), so that it loads again without the run's snapshot;
- `python_function`: MLflow's generic interface, loading through the PyTorch flavor, so that
  `pyfunc.load_model(...).predict(batch)` gives exactly the eager model's outputs;
- `onnx`, when the job's onnx export passed before (its model.onnx in the model's files):
  the same file as that export, for `mlflow.onnx.load_model` and ONNX runtimes. A pyfunc
  model has one loader, and the PyTorch one gives the trained model's own answers, so the
  ONNX flavor is an extra flavor beside it, not a second MLmodel (checked in ONNX Runtime
  against the eager model as well).

The signature (a tensor of `model.input.shape` and dtype, -1 on each dynamic axis) and the
input example (the first rows of `model.input.examples`, else the seeded random check input)
come from `model.input`. The export runs in the run's environment (`expkit_mlflow.worker`),
which must have mlflow.
"""

from __future__ import annotations

from expkit.plugin import Exporter, ExportRequest, ExportResult, exportkit

FOLDER = "mlflow-model"  # the MLflow model folder, among the model's files


class MlflowExporter(Exporter):
    name = "mlflow"
    description = "an MLflow model folder (PyTorch flavor, ONNX flavor too), checked via pyfunc"

    def export(self, request: ExportRequest) -> ExportResult:
        return exportkit.run_worker(request, "expkit_mlflow.worker")
