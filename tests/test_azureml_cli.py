"""The Azure ML plugin through the `expkit` command: the import of the seed's estimator, the
dry run of what it would submit, and the errors a user meets before anything is submitted.
Nothing here reaches Azure (see the README: what was tested against Azure)."""

from __future__ import annotations

from pathlib import Path

import yaml

SEED = Path(__file__).resolve().parents[1] / "training" / "azureml"


def test_import_the_seed_estimator_then_dry_run_it(expkit_cli, tmp_path):
    done = expkit_cli("import-azureml", f"{SEED}/seed_estimator.py:estimator", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job = yaml.safe_load(done.stdout)  # only the job spec on stdout: the seed's prints go aside
    assert "Creating a new compute target" in done.stderr
    assert job["entry_script"] == "pytorch_train.py"
    assert job["compute"]["target"] == "azureml"
    assert job["args"] == {"num_epochs": 30, "output_dir": "./outputs"}

    out = tmp_path / "job.yaml"
    done = expkit_cli("import", "azureml", f"{SEED}/seed_estimator.py:estimator", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}; run it with: expkit run {out}" in done.stderr
    dry = expkit_cli("run", str(out), "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "compute target 'azureml' would submit:" in dry.stdout
    assert "run_configuration:" in dry.stdout and "script: pytorch_train.py" in dry.stdout
    assert not (tmp_path / ".expkit").exists()


def test_a_two_node_torchrun_job_needs_no_local_launcher_settings(write_job, expkit_cli):
    path = write_job(
        {
            "compute": {"target": "azureml", "options": {"cluster": "gpu-cluster"}},
            "resources": {"nodes": 2, "processes_per_node": 4, "gpus_per_node": 4},
            "distributed": "torchrun",  # locally this would need a rendezvous endpoint
        },
        script="print('hi')\n",
    )
    dry = expkit_cli("run", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "distributed torchrun (launched by azureml)" in dry.stdout
    assert "PyTorch" in dry.stdout and "nodeCount: 2" in dry.stdout


def test_no_config_json_is_one_line_and_exit_2_before_any_run(write_job, expkit_cli):
    path = write_job({"compute": "azureml"}, script="print('hi')\n")
    done = expkit_cli("run", str(path), cwd=path.parent)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("expkit: error")]
    assert "no Azure ML config.json" in line and "Traceback" not in done.stderr
    listed = expkit_cli("runs", "list")
    assert "no runs yet" in listed.stdout
