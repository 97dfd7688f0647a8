"""A script's own MLflow calls record into the expkit run, with no change to the script
(the `mlflow` import hook and the `expkit` tracking store in expkit_mlflow/inscript.py)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from mlflow import MlflowClient

from expkit.api import Run

# What an Azure ML v2 or plain MLflow training script does, unchanged.
MLFLOW_SCRIPT = """
    import os
    import mlflow

    mlflow.autolog()
    mlflow.set_experiment("digits")
    with mlflow.start_run(run_name="baseline", tags={"team": "vision"}) as run:
        print("mlflow run", run.info.run_id)
        mlflow.log_param("lr", 0.01)
        mlflow.log_params({"batch_size": 32, "optimizer": "adam"})
        mlflow.set_tag("stage", "dev")
        mlflow.set_tags({"arch": "mlp"})
        for epoch in range(3):
            mlflow.log_metric("loss", 1.0 / (epoch + 1), step=epoch)
        mlflow.log_metrics({"val_acc": 0.75, "val_f1": 0.5}, step=2)
        with open("confusion.txt", "w") as f:
            f.write("3 1\\n0 4\\n")
        mlflow.log_artifact("confusion.txt")
        mlflow.log_dict({"layers": [64, 10]}, "config/model.json")
        seen = mlflow.get_run(run.info.run_id).data
        print("seen", sorted(seen.metrics), sorted(seen.params))
    mlflow.end_run()
    mlflow.log_metric("after_end", 1.0)  # MLflow starts a run again: the same expkit run
    leftovers = [n for n in ("mlruns", "mlflow.db") if os.path.exists(n)]
    print("leftovers", leftovers)
"""


def run_script(
    write_job, expkit_cli, tmp_path: Path, spec: dict, script: str
) -> tuple[str, str, Path]:
    """Run `script` through `expkit run` from a fresh folder: the run id, the command's
    output and the job's folder (the source folder `src/` in it)."""
    job = write_job(spec, script=script)
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    result = expkit_cli("run", str(job), cwd=cwd)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    run_id = re.search(r"^run (\S+) in workspace", output, re.M).group(1)
    return run_id, output, job.parent


def assert_no_mlflow_store(*folders: Path) -> None:
    for folder in folders:
        for name in ("mlruns", "mlflow.db", "mlartifacts"):
            assert not (folder / name).exists(), f"{folder / name} was written"


def test_mlflow_calls_record_into_the_run_and_nothing_else_without_the_sink(
    write_job, expkit_cli, expkit_workspace, tmp_path
):
    run_id, output, project = run_script(write_job, expkit_cli, tmp_path, {}, MLFLOW_SCRIPT)

    assert f"mlflow run {run_id}" in output  # MLflow's run id is the expkit run's
    assert "seen ['loss', 'val_acc', 'val_f1'] ['batch_size', 'lr', 'optimizer']" in output
    assert "leftovers []" in output
    assert "Traceback" not in output
    # the run MLflow starts again after end_run is a second one: said once, where it goes
    said = f"all of this script's MLflow runs record into expkit run {run_id}"
    assert output.count(said) == 1, output

    run = Run(expkit_workspace, run_id)
    assert run.get_status() == "completed"
    metrics = run.get_metrics()
    assert metrics["loss"] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert metrics["val_acc"] == 0.75 and metrics["val_f1"] == 0.5
    assert metrics["after_end"] == 1.0
    history = expkit_workspace.history
    steps = [(r["step"], r["value"]) for r in history.metrics.of(run_id, "loss")]
    assert [s for s, _ in steps] == [0, 1, 2]  # the metric's own step
    assert history.params.of(run_id) == {"lr": "0.01", "batch_size": "32", "optimizer": "adam"}
    assert set(history.params.sources(run_id).values()) == {"script"}
    tags = run.get_tags()
    assert {k: tags[k] for k in ("team", "stage", "arch")} == {
        "team": "vision",
        "stage": "dev",
        "arch": "mlp",
    }
    assert not any(k.startswith("mlflow.") for k in tags)  # MLflow's own run tags stay out

    shown = expkit_cli("metrics", run_id)
    assert shown.returncode == 0, shown.stderr
    lines = [line.split() for line in shown.stdout.splitlines()]
    assert ["loss", "2", "0.3333"] in [line[:3] for line in lines]
    assert ["val_acc", "2", "0.75"] in [line[:3] for line in lines]

    details = expkit_cli("runs", "show", run_id)
    assert details.returncode == 0, details.stderr
    assert "confusion.txt" in details.stdout and "config/model.json" in details.stdout
    assert "stage" in details.stdout
    outputs = sorted(n for n in run.get_file_names() if n.startswith("outputs/"))
    assert outputs == ["outputs/config/model.json", "outputs/confusion.txt"]
    sealed = run.run_dir / "outputs" / "config" / "model.json"
    assert json.loads(sealed.read_text()) == {"layers": [64, 10]}

    # without the sink, no MLflow store anywhere: the script's folder, the source, the
    # folder expkit was started from, the workspace
    assert_no_mlflow_store(tmp_path / "cwd", project, project / "src", expkit_workspace.path)


def test_with_the_mlflow_sink_there_is_exactly_one_mlflow_run(
    write_job, expkit_cli, expkit_workspace, tmp_path
):
    run_id, _output, project = run_script(
        write_job,
        expkit_cli,
        tmp_path,
        {"experiment": "digits", "metrics": ["mlflow"]},
        MLFLOW_SCRIPT,
    )

    client = MlflowClient(tracking_uri=f"sqlite:///{expkit_workspace.path / 'mlflow.db'}")
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert len(runs) == 1, [(r.info.run_id, r.info.run_name) for r in runs]
    mlflow_run = runs[0]
    assert mlflow_run.data.tags["expkit.run_id"] == run_id
    assert mlflow_run.info.status == "FINISHED"
    history = client.get_metric_history(mlflow_run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert mlflow_run.data.metrics["val_acc"] == 0.75
    assert mlflow_run.data.tags["stage"] == "dev" and mlflow_run.data.tags["team"] == "vision"
    assert_no_mlflow_store(tmp_path / "cwd", project, project / "src")


def test_the_scripts_params_reach_the_mlflow_run(write_job, expkit_cli, expkit_workspace, tmp_path):
    run_script(write_job, expkit_cli, tmp_path, {"metrics": ["mlflow"]}, MLFLOW_SCRIPT)

    client = MlflowClient(tracking_uri=f"sqlite:///{expkit_workspace.path / 'mlflow.db'}")
    (mlflow_run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {k: mlflow_run.data.params.get(k) for k in ("lr", "batch_size", "optimizer")} == {
        "lr": "0.01",
        "batch_size": "32",
        "optimizer": "adam",
    }


def test_a_logged_model_lands_in_outputs_and_unsupported_calls_do_not_raise(
    write_job, expkit_cli, expkit_workspace, tmp_path
):
    script = """
        import mlflow
        import mlflow.pyfunc

        class Doubler(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input):
                return model_input * 2

        with mlflow.start_run() as run:
            mlflow.log_metric("acc", 0.9)  # step 0: the model's step, linked to it
            mlflow.log_metric("loss", 0.5, step=0)
            mlflow.log_metric("loss", 0.25, step=1)
            info = mlflow.pyfunc.log_model(
                name="doubler", python_model=Doubler(), registered_model_name="doubler"
            )
            print("model at", info.artifact_path if hasattr(info, "artifact_path") else "")
            loaded = mlflow.pyfunc.load_model(info.model_uri)
            print("loaded", type(loaded).__name__)
            with mlflow.start_run(nested=True) as child:
                mlflow.log_metric("inner", 1.0)
            mlflow.delete_tag("nothing")
            mlflow.log_metric("queued", 2.0, synchronous=False)
        mlflow.MlflowClient().delete_experiment("0")
        print("script done")
    """
    run_id, output, project = run_script(
        write_job, expkit_cli, tmp_path, {"metrics": ["mlflow"]}, script
    )

    assert "script done" in output and "Traceback" not in output
    assert "loaded PyFuncModel" in output
    # the nested run: one notice saying where all the script's MLflow runs record
    assert output.count(f"record into expkit run {run_id}") == 1, output
    assert "expkit: mlflow delete_tag" in output  # one notice, the script went on
    assert output.count("expkit: mlflow model registry: models are registered by expkit") == 1
    run = Run(expkit_workspace, run_id)
    names = run.get_file_names()
    assert "outputs/models/doubler/MLmodel" in names, names
    assert run.get_metrics()["inner"] == 1.0 and run.get_metrics()["queued"] == 2.0
    # log_model logs the run's metrics at its step again, linked to the model: once here
    history = expkit_workspace.history
    assert [(r["step"], r["value"]) for r in history.metrics.of(run_id, "acc")] == [(0, 0.9)]
    assert [(r["step"], r["value"]) for r in history.metrics.of(run_id, "loss")] == [
        (0, 0.5),
        (1, 0.25),
    ]
    client = MlflowClient(tracking_uri=f"sqlite:///{expkit_workspace.path / 'mlflow.db'}")
    (mlflow_run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [
        (m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, "acc")
    ] == [(0, 0.9)]
    assert_no_mlflow_store(tmp_path / "cwd", project, project / "src")


def test_a_tracking_uri_the_script_sets_still_wins(write_job, expkit_cli, tmp_path):
    own = f"sqlite:///{tmp_path / 'own.db'}"
    script = f"""
        import mlflow
        mlflow.set_tracking_uri("sqlite:///mine.db")  # relative: in the working copy
        mlflow.set_tracking_uri({own!r})
        with mlflow.start_run() as run:
            mlflow.log_metric("mine", 3.0)
        mlflow.MlflowClient().create_registered_model("mine-model")
        print("own run", run.info.run_id)
    """
    run_id, output, _project = run_script(write_job, expkit_cli, tmp_path, {}, script)

    own_run = output.split("own run ", 1)[1].split()[0]
    assert own_run != run_id
    # each URI set is said once: where the calls go now, and that a relative path is lost
    notices = [line for line in output.splitlines() if "expkit: mlflow set_tracking_uri" in line]
    assert len(notices) == 2, notices
    assert f"now go to sqlite:///mine.db, not into expkit run {run_id}" in notices[0]
    assert "'mine.db' is relative to the run's working copy" in notices[0]
    assert "use an absolute path, or one under outputs/" in notices[0]
    assert f"now go to {own}, not into expkit run {run_id}" in notices[1]
    assert "relative" not in notices[1]
    client = MlflowClient(tracking_uri=own)
    assert client.get_run(own_run).data.metrics == {"mine": 3.0}
    assert client.get_registered_model("mine-model").name == "mine-model"  # its own registry


def test_outside_a_run_or_with_azure_mls_mlflow_the_hook_changes_nothing(monkeypatch):
    import mlflow

    from expkit_mlflow.inscript import install

    monkeypatch.delenv("EXPKIT_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    install(mlflow)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ

    azure = "azureml://eastus.api.azureml.ms/mlflow/v1.0/subscriptions/s"
    monkeypatch.setenv("EXPKIT_RUN_ID", "test_1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", azure)
    install(mlflow)
    assert os.environ["MLFLOW_TRACKING_URI"] == azure
    assert "MLFLOW_REGISTRY_URI" not in os.environ


def test_mlflow_metrics_logged_in_forked_pool_workers_are_recorded_once(
    write_job, expkit_cli, expkit_workspace, tmp_path
):
    script = """
        import multiprocessing as mp
        import mlflow

        def work(i):
            mlflow.log_metric("w", float(i), step=i)
            return mlflow.active_run().info.run_id

        if __name__ == "__main__":
            with mlflow.start_run() as run:
                pool = mp.get_context("fork").Pool(2)
                print("worker runs", sorted(set(pool.map(work, range(4)))))
                pool.close()
                pool.join()
                with mp.get_context("fork").Pool(2) as pool:  # terminated at __exit__
                    pool.map(work, range(10, 14))
                mlflow.log_metric("main", 1.0)
    """
    run_id, output, _project = run_script(write_job, expkit_cli, tmp_path, {}, script)

    assert f"worker runs ['{run_id}']" in output and "Traceback" not in output
    metrics = Run(expkit_workspace, run_id).get_metrics()
    assert sorted(metrics["w"]) == [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0]
    assert metrics["main"] == 1.0
