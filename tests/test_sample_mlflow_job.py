"""training/job-mlflow.yaml, the sample job with MLflow (sink and registry), TensorBoard, key
metrics, `register_if` better than @champion and `aliases: [champion]`: it is the README's
job.yaml plus exactly those fields, and `expkit run --dry-run` says each of them."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TRAINING = REPO / "training"


def test_the_mlflow_sample_is_the_sample_job_with_mlflow_and_choosing_among_versions():
    base = yaml.safe_load((TRAINING / "job.yaml").read_text())
    sample = yaml.safe_load((TRAINING / "job-mlflow.yaml").read_text())
    assert sample.pop("metrics") == ["mlflow", "tensorboard"]
    model = sample["model"]
    assert model.pop("registries") == ["mlflow"]
    assert model.pop("metrics") == ["best_val_acc", "val_loss"]
    assert model.pop("register_if") == [{"better": "best_val_acc", "than": "champion"}]
    assert model.pop("aliases") == ["champion"]
    assert sample == base  # nothing else differs: the same job as the README's first one


def test_the_mlflow_sample_s_dry_run_says_what_it_will_do(expkit_cli):
    done = expkit_cli("run", str(TRAINING / "job-mlflow.yaml"), "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "metrics to mlflow (mlflow), tensorboard (tensorboard)" in out
    assert "export onnx (onnx); export mlflow (mlflow)" in out  # the registry's export, last
    assert "registry mlflow (mlflow)" in out
    assert "only if best_val_acc better than @champion (maximize); aliases @champion" in out
