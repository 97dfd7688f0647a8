"""What `expkit sweep` says of the best trial at its end."""

from __future__ import annotations

import re
import subprocess

import yaml

TRAIN = """
import argparse
from expkit import Run

parser = argparse.ArgumentParser()
parser.add_argument("--x", type=float)
x = parser.parse_args().x
run = Run.get_context()
for step, value in enumerate([x * 10, x]):  # the best value first, a lower one last
    run.log("acc", value, step=step)
"""


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_sweep_end_names_the_best_trials_value_not_its_last(expkit_cli, write_job):
    """A trial's value is the best it logged of the primary metric (README, Sweeps); the line
    `expkit sweep` ends with said the best trial's last value (acc 2 where the trial's value,
    as `sweeps show` and the live table give it, is 20)."""
    job = write_job({"environment": "inherit"}, script=TRAIN)
    sweep = job.parent / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "job": "job.yaml",
                "search_space": {"x": {"type": "choice", "values": [1, 2]}},
                "sampling_algorithm": {"type": "grid"},
                "objective": {"primary_metric": "acc", "goal": "maximize"},
                "limits": {"max_total_trials": 2, "max_concurrent_trials": 1},
            }
        )
    )
    out = ok(expkit_cli("sweep", str(sweep)))
    best = re.search(r"^best trial: .*$", out, re.M).group(0)
    assert best.endswith("acc 20"), out
    shown = ok(expkit_cli("sweeps", "show", "latest"))
    assert re.search(r"^best trial\s+\d+ \(run \S+\): acc 20$", shown, re.M), shown
