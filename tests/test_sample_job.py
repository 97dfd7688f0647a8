"""The README's main job, end to end through the `expkit` command on the real sample script.

Trains the ResNet-18 on the digits for one epoch (the README's job runs five), twice: the
first run builds the environment and the data, registers pt-dnn version 1; the second finds
both in the cache and registers version 2, whose model.onnx (exported and checked in
post-process) is then run in ONNX Runtime on every validation image. And the job as shipped
survives a stop: the script gets its stop signal during epoch 2, saves and exits 75, and the
job's retry starts attempt 2, which resumes from the checkpoint; one run, one model version.

What a test does not look at is made cheap: the first run, whose model is not used, trains on
16-pixel images and skips the ONNX export (torch.export takes about 30 s); the stopped job's
three epochs are on 16-pixel images too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from expkit.procs import run_processes

pytestmark = pytest.mark.slow

JOB = Path(__file__).resolve().parents[1] / "training" / "job.yaml"
ONE_EPOCH = ["--set", "args.num_epochs=1"]
SMALL = ["--set", "args.image_size=16"]  # a quarter of the work of the default 32 pixels


def test_the_sample_job_trains_registers_and_hits_the_caches_the_second_time(
    expkit_cli, expkit_workspace, tmp_path
):
    first = expkit_cli("run", str(JOB), *ONE_EPOCH, *SMALL, "--set", "exports=[]", timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("prepare", "scale", "run", "post-process", "register"):
        assert f"✓ {stage}" in first.stdout
    assert "environment cache miss (pip-" in first.stdout
    assert "data 'digits': cache miss" in first.stdout
    assert "epoch 1/1" in first.stdout  # the script's output, streamed
    assert "model pt-dnn version 1" in first.stdout

    second = expkit_cli("run", str(JOB), *ONE_EPOCH, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "environment cache hit (pip-" in second.stdout
    assert "data 'digits': cache hit" in second.stdout
    assert "model pt-dnn version 2" in second.stdout

    shown = json.loads(expkit_cli("runs", "show", "latest", "--json").stdout)
    assert shown["state"] == "completed"
    assert shown["experiment"] == "pytorch-digits"
    assert shown["stages"]["prepare"]["state"] == "completed"
    metrics = shown["metrics"]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc"} <= set(metrics)
    assert metrics["best_val_acc"] > 0.3  # ten classes: chance is 0.1
    assert shown["tags"]["model"] == "resnet18"
    assert set(shown["outputs"]) == {
        "model.pt",
        "classes.json",
        "example_inputs.npy",
        "model.onnx",  # the job's export, checked against ONNX Runtime in post-process
    }
    assert "export onnx: model.onnx (max_abs_error" in second.stdout

    models = expkit_cli("models", "show", "pt-dnn:2")
    assert models.returncode == 0
    assert shown["id"] in models.stdout
    assert "best_val_acc" in models.stdout

    # the registered version is a usable model
    download = expkit_cli("models", "download", "pt-dnn:2", str(tmp_path / "model"))
    assert download.returncode == 0, download.stderr
    import torch
    import torchvision

    classes = json.loads((tmp_path / "model" / "classes.json").read_text())
    model = torchvision.models.resnet18(weights=None, num_classes=len(classes))
    model.load_state_dict(torch.load(tmp_path / "model" / "model.pt", map_location="cpu"))
    model.eval()
    with torch.no_grad():
        logits = model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert classes == [str(d) for d in range(10)]

    # the registered model.onnx gives the PyTorch model's answers on every validation image
    import numpy as np
    import onnxruntime
    from torchvision import datasets

    assert (tmp_path / "model" / "model.onnx").is_file()
    (data,) = expkit_workspace.data_dir.glob("digits-*")  # the digits the runs trained on
    sys.path.insert(0, str(JOB.parent))
    try:
        from pytorch_train import build_transforms
    finally:
        sys.path.remove(str(JOB.parent))
    val = datasets.ImageFolder(data / "val", build_transforms(32)["val"])
    images = torch.stack([image for image, _ in val])
    with torch.no_grad():
        expected = model(images).numpy()
    session = onnxruntime.InferenceSession(
        str(tmp_path / "model" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (name,) = [i.name for i in session.get_inputs()]
    actual = session.run(None, {name: images.numpy()})[0]  # all of them in one batch
    assert actual.shape == (len(val), 10)
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-3)  # the job's tolerance
    assert (actual.argmax(1) == expected.argmax(1)).all()

    lineage = expkit_cli("models", "show", "pt-dnn:2").stdout
    assert "onnx" in lineage and "model.onnx" in lineage


def script_pid(run_id: str, workspace: Path) -> int:
    """The pid of the run's pytorch_train.py process."""
    for pid in run_processes(run_id, workspace):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"pytorch_train.py") for arg in argv):
            return pid
    raise AssertionError(f"no pytorch_train.py process of run {run_id}")


def test_the_sample_job_stopped_by_its_signal_resumes_from_its_checkpoint_in_attempt_2(
    background, expkit_cli, expkit_workspace
):
    live = background("run", str(JOB), "--set", "args.num_epochs=3", "--set", "exports=[]", *SMALL)
    live.wait_for("epoch 1/3", timeout=900)
    os.kill(script_pid(live.run_id, expkit_workspace.path), signal.SIGUSR1)  # during epoch 2
    assert live.wait(timeout=900) == 0, live.output
    output = live.output

    stopped = re.search(r"stop signal: checkpoint saved at epoch (\d) of 3; exiting", output)
    assert stopped, output
    epoch = int(stopped.group(1))  # 1, unless epoch 2 ended before the signal came
    assert epoch < 3
    assert f"resuming from checkpoint: epoch {epoch} of 3" in output
    assert output.index(stopped.group()) < output.index("resuming from checkpoint")
    after = output[output.index("resuming from checkpoint") :]
    assert re.findall(r"^epoch (\d)/3", after, re.M) == [str(e) for e in range(epoch + 1, 4)]
    assert "model pt-dnn version 1" in output

    history = expkit_workspace.history
    record = history.runs.get(live.run_id)
    assert record.state == "completed" and record.attempt == 2
    first, second = history.attempts.of(live.run_id)
    assert (first.outcome, first.exit_code) == ("failed", 75)
    assert second.outcome == "completed"
    assert len(history.models.versions("pt-dnn")) == 1  # post-process and register ran once

    # each epoch's values: from attempt 1 up to the checkpoint, from attempt 2 after it
    rows = history.metrics.of(live.run_id, "val_acc")
    assert [(row["step"], row["attempt"]) for row in rows] == [(e, 1) for e in range(epoch)] + [
        (e, 2) for e in range(epoch, 3)
    ]
    checkpoints = expkit_workspace.run_dir(live.run_id) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch-0003.pt"]
