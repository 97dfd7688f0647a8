"""A sweep's best in a real `mlflow server` (the REST client) when trials log inf."""

from __future__ import annotations

import re

import pytest
import yaml
from mlflow import MlflowClient

from expkit_mlflow.tracking import HTTP_DEFAULTS
from test_mlflow import serving

TRAIN = """
import argparse
from expkit import Run

parser = argparse.ArgumentParser()
parser.add_argument("--x", type=float)
x = parser.parse_args().x
run = Run.get_context()
values = [float("nan"), float("inf")] if x == 3 else [x * 10, float("inf"), x]
for step, value in enumerate(values):
    run.log("acc", value, step=step)
"""


@pytest.fixture(autouse=True)
def mlflow_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", *HTTP_DEFAULTS):
        monkeypatch.delenv(name, raising=False)


def test_sweep_parent_run_best_on_a_server_is_the_sweeps_best_when_trials_log_inf(
    expkit_cli, write_job, tmp_path_factory
):
    """A tracking server stores +inf as the largest float (1.7976931348623157e308), which the
    trial's value (`expkit.value`: the best *finite* value logged) took for a number: every
    trial logging inf was worth 1.8e308, and the parent's `best_acc` and `expkit.best_trial`
    named trial 0, which logged no finite value (a failed trial to expkit), instead of the
    sweep's best (trial 1, acc 20)."""
    with serving(tmp_path_factory.mktemp("server")) as (url, _):
        job = write_job(
            {
                "environment": "inherit",
                "metrics": [{"name": "mlflow", "options": {"tracking_uri": url}}],
            },
            script=TRAIN,
        )
        sweep = job.parent / "sweep.yaml"
        sweep.write_text(
            yaml.safe_dump(
                {
                    "job": "job.yaml",
                    "search_space": {"x": {"type": "choice", "values": [3, 2, 1]}},
                    "sampling_algorithm": {"type": "grid"},
                    "objective": {"primary_metric": "acc", "goal": "maximize"},
                    "limits": {"max_total_trials": 3, "max_concurrent_trials": 1},
                }
            )
        )
        result = expkit_cli("sweep", str(sweep))
        assert result.returncode == 0, result.stderr
        best = re.search(r"^best trial: (\d+) ", result.stdout, re.M).group(1)
        client = MlflowClient(tracking_uri=url)
        experiment = client.get_experiment_by_name("test").experiment_id
        (parent,) = client.search_runs([experiment], "tags.`expkit.sweep_parent` = 'true'")
        assert parent.data.tags["expkit.best_trial"] == best, parent.data.tags
        assert parent.data.metrics["best_acc"] == 20.0
