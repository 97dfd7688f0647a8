"""Sweep benchmarks, each measured side by side with its baseline in the same run.

    python benchmarks/bench_sweep.py [--trials 6] [--epochs 3] [--concurrent 2]
                                     [--overhead-trials 10] [--seed 2]

1. Early termination: the sample job (training/job.yaml: the ResNet-18 on the digits) swept
   twice over the same seeded random search space (so trial n gets the same learning_rate and
   momentum in both), with the Bandit policy of training/sweep.yaml and without a policy. The
   trial-seconds each used (the sum of its trials' `run` stages, from the run history) and how
   much the policy saved (target: at least 40 %), the best best_val_acc each reached (target:
   the same within noise), and each sweep's wall time. The more epochs a trial has, the more a
   policy can save: a trial stopped at its first report still ran one epoch and started up.
2. The sweep's own cost: a trivial script (no torch: it logs one value) run as N trials one at
   a time by `expkit sweep`, and the same N values as `expkit run` one after another: the
   sweep's added seconds per trial (target: under 0.5 s).

Everything runs in a fresh workspace in a temporary folder, through the `expkit` command (the
`python -m expkit` of this interpreter). Prints a table and writes the figures as JSON to
stdout's last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TRAINING = REPO / "training"
PRIMARY = "best_val_acc"

TRIVIAL = """import argparse

from expkit import Run

parser = argparse.ArgumentParser()
parser.add_argument("--x", type=float, default=0.5)
x = parser.parse_args().x
Run.get_context().log("score", 1 - (x - 0.3) ** 2)
"""


def expkit(args: list[str], workspace: Path, cwd: Path, timeout: float = 7200) -> float:
    """Run `python -m expkit ARGS` in `workspace`; its wall time in seconds. Raises with its
    output's tail when it fails."""
    env = {**os.environ, "EXPKIT_WORKSPACE": str(workspace)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "expkit", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(
            f"expkit {' '.join(args)} exited {done.returncode}:\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return seconds


def sample_job(epochs: int) -> dict[str, Any]:
    """training/job.yaml inline: `epochs` epochs, one torch thread (trials share the cores), no
    ONNX export (a trial's post-process is not what a policy saves)."""
    job = yaml.safe_load((TRAINING / "job.yaml").read_text())
    job["source_directory"] = str(TRAINING)
    job["args"] = {**job["args"], "num_epochs": epochs, "threads": 1}
    job.pop("exports", None)
    return job


def sample_sweep(args: argparse.Namespace, policy: bool) -> dict[str, Any]:
    """training/sweep.yaml's search space, objective and Bandit policy, at the bench's counts."""
    shipped = yaml.safe_load((TRAINING / "sweep.yaml").read_text())
    spec: dict[str, Any] = {
        "job": sample_job(args.epochs),
        "search_space": {k: shipped["search_space"][k] for k in ("learning_rate", "momentum")},
        "sampling_algorithm": {"type": "random", "seed": args.seed},
        "objective": shipped["objective"],
        "limits": {"max_total_trials": args.trials, "max_concurrent_trials": args.concurrent},
    }
    if policy:
        spec["early_termination"] = shipped["early_termination"]
    return spec


def trials_of(workspace: Path, sweep_id: str) -> list[dict[str, Any]]:
    """Each trial of `sweep_id`: its state, why it was stopped, the seconds of its `run` stage
    and the last value of the primary metric it logged (the history's records)."""
    from expkit.workspace import Workspace

    history = Workspace(workspace).history
    rows = []
    for run in history.runs.of_sweep(sweep_id):
        stages = {stage.stage: stage for stage in history.stages.of(run.id)}
        ran = stages.get("run")
        rows.append(
            {
                "trial": run.trial,
                "state": run.state,
                "reason": run.cancel_reason,
                "run_s": (ran.seconds or 0.0) if ran is not None else 0.0,
                PRIMARY: history.metrics.latest(run.id).get(PRIMARY),
                "args": run.job.get("args", {}),
            }
        )
    return rows


def latest_sweep(workspace: Path) -> str:
    from expkit.workspace import Workspace

    found = Workspace(workspace).history.sweeps.find("latest")
    if found is None:
        raise SystemExit("the sweep left no record")
    return found.id


def bench_early_termination(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The sample job swept with and without the Bandit policy (see the module's docstring)."""
    workspace = folder / ".expkit"
    expkit(["init", str(folder)], workspace, folder)
    # one plain epoch first, so that both sweeps find the environment and the data cached
    warm = folder / "warm.yaml"
    warm.write_text(yaml.safe_dump(sample_job(1)))
    expkit(["run", str(warm), "--quiet"], workspace, folder)
    results: dict[str, Any] = {}
    for name, policy in (("bandit", True), ("no policy", False)):
        file = folder / f"sweep-{name.replace(' ', '-')}.yaml"
        file.write_text(yaml.safe_dump(sample_sweep(args, policy), sort_keys=False))
        wall = expkit(["sweep", str(file)], workspace, folder)
        trials = trials_of(workspace, latest_sweep(workspace))
        values = [t[PRIMARY] for t in trials if t["state"] == "completed" and t[PRIMARY]]
        results[name] = {
            "wall_s": wall,
            "trial_s": sum(t["run_s"] for t in trials),
            "best": max(values) if values else None,
            "stopped": sum(1 for t in trials if (t["reason"] or "").startswith("early")),
            "trials": trials,
        }
    return results


def bench_overhead(count: int, seed: int, folder: Path) -> dict[str, float]:
    """`count` trivial trials by `expkit sweep` (one at a time) against the same values by
    `expkit run` one after another; the wall time of each, in seconds."""
    workspace = folder / ".expkit"
    expkit(["init", str(folder)], workspace, folder)
    (folder / "trial.py").write_text(TRIVIAL)
    job = {"experiment": "bench-sweep", "entry_script": "trial.py", "args": {"x": 0.5}}
    (folder / "trial.yaml").write_text(yaml.safe_dump(job))
    sweep = {
        "job": "trial.yaml",
        "search_space": {"x": {"type": "uniform", "min_value": 0.0, "max_value": 1.0}},
        "sampling_algorithm": {"type": "random", "seed": seed},
        "objective": {"primary_metric": "score", "goal": "maximize"},
        "limits": {"max_total_trials": count, "max_concurrent_trials": 1},
    }
    (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    expkit(["run", "trial.yaml", "--quiet"], workspace, folder)  # warm the file cache
    swept = expkit(["sweep", "sweep.yaml"], workspace, folder)
    values = [t["args"]["x"] for t in trials_of(workspace, latest_sweep(workspace))]
    if len(values) != count:
        raise SystemExit(f"the sweep ran {len(values)} trials of {count}")
    start = time.perf_counter()
    for x in values:
        expkit(["run", "trial.yaml", "--quiet", "--set", f"args.x={x!r}"], workspace, folder)
    return {"expkit sweep": swept, "expkit run, one after another": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6, help="trials per sweep (default 6)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial (default 3)")
    parser.add_argument("--concurrent", type=int, default=2, help="trials at once (default 2)")
    parser.add_argument(
        "--overhead-trials", type=int, default=10, help="trivial trials (default 10)"
    )
    parser.add_argument("--seed", type=int, default=2, help="the random sampler's seed")
    parser.add_argument(
        "--skip-sample", action="store_true", help="only the overhead (no torch training)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "overhead").mkdir()
        overhead = bench_overhead(args.overhead_trials, args.seed, Path(tmp) / "overhead")
        early: dict[str, Any] = {}
        if not args.skip_sample:
            Path(tmp, "sample").mkdir()
            early = bench_early_termination(args, Path(tmp) / "sample")

    figures: dict[str, Any] = {}
    if early:
        with_policy, without = early["bandit"], early["no policy"]
        saved = 1 - with_policy["trial_s"] / without["trial_s"] if without["trial_s"] else 0.0
        print(
            f"sample job, {args.trials} trials of {args.epochs} epochs, "
            f"{args.concurrent} at once (seed {args.seed})"
        )
        header = f"{'sweep':<12} {'trial-seconds':>14} {'wall':>9} {'stopped':>8}"
        print(f"{header} {'best ' + PRIMARY:>18}")
        for name, row in early.items():
            best = f"{row['best']:.4f}" if row["best"] is not None else "-"
            print(
                f"{name:<12} {row['trial_s']:>13.1f}s {row['wall_s']:>8.1f}s "
                f"{row['stopped']:>8} {best:>18}"
            )
        print(f"{'saved by the policy':<36} {saved:>8.1%}  (target: at least 40 %)")
        print()
        figures["early_termination"] = {
            "trial_s": {k: round(v["trial_s"], 1) for k, v in early.items()},
            "wall_s": {k: round(v["wall_s"], 1) for k, v in early.items()},
            "best": {k: v["best"] for k, v in early.items()},
            "stopped": {k: v["stopped"] for k, v in early.items()},
            "saved": round(saved, 3),
        }
    per_trial = (
        overhead["expkit sweep"] - overhead["expkit run, one after another"]
    ) / args.overhead_trials
    print(f"a trivial script, {args.overhead_trials} trials one at a time")
    print(f"{'command':<36} {'wall':>9} {'per trial':>10}")
    for name, seconds in overhead.items():
        print(f"{name:<36} {seconds:>8.2f}s {seconds / args.overhead_trials:>9.3f}s")
    print(f"{'added by the sweep, per trial':<36} {per_trial:>+19.3f}s  (target: under 0.5 s)")
    figures["overhead_s"] = {k: round(v, 3) for k, v in overhead.items()}
    figures["added_per_trial_s"] = round(per_trial, 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
