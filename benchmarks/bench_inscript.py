"""What a script's `mlflow.log_metric` and Azure ML's `Run.log` cost inside an expkit run,
next to expkit's own `run.log()` and to bare MLflow.

    python benchmarks/bench_inscript.py [--log-calls 1000000] [--inscript-calls 20000]
                                        [--mlflow-calls 100]

Each loop runs in a fresh Python process, as a training script would:
1. `run.log()` (expkit's in-script API) calls per second;
2. `mlflow.log_metric` inside an expkit run: the import hook on `mlflow` (as the driver sets
   it up) points MLflow at the `expkit` tracking store, which writes to the run's channel;
3. Azure ML's `Run.get_context().log()` inside an expkit run (the import hook on
   `azureml.core.run`: a run that records into expkit's channel);
4. bare `mlflow.log_metric` on MLflow's file store and on a SQLite store, in a temporary
   folder (MLflow's default local stores).
Every value is checked to have arrived (channel lines; the MLflow store's metric history).
Prints a table with the ratios, and the figures as JSON on stdout's last line. About 30 s
(most of it importing mlflow and azureml).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_core import LOG_LOOP  # the same loop as bench_core's run.log() figure
from expkit import importhooks
from expkit.channel import calls_in

AZUREML_LOOP = """
import sys, time
from azureml.core.run import Run
run = Run.get_context()
n = int(sys.argv[1])
log = run.log
start = time.perf_counter()
for i in range(n):
    log("loss", 0.5)
elapsed = time.perf_counter() - start
from expkit.context import get_context
get_context().flush()
print(type(run).__name__, n / elapsed)
"""

MLFLOW_LOOP = """
import sys, time, mlflow
n, uris = int(sys.argv[1]), sys.argv[2:] or [None]
log_metric = mlflow.log_metric
for uri in uris:
    if uri:
        mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        log_metric("loss", 0.5, step=0)  # the store is made on first use: not timed
        start = time.perf_counter()
        for i in range(1, n + 1):
            log_metric("loss", 0.5, step=i)
        elapsed = time.perf_counter() - start
    if uri:  # every value arrived
        held = len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss"))
        assert held == n + 1, f"{uri} holds {held} of {n + 1} values"
    else:  # under expkit: the values are in the channel (checked by the caller)
        from expkit.context import get_context
        get_context().flush()
    print(mlflow.get_tracking_uri().split(":")[0], n / elapsed)
"""


def python(code: str, args: list[str], env: dict[str, str], cwd: Path) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.split()


def channel_lines(channel: Path) -> int:
    return sum(sum(1 for _ in calls_in(path)) for path in channel.glob("*.jsonl"))


def bench(folder: Path, log_calls: int, inscript_calls: int, mlflow_calls: int) -> dict:
    results: dict[str, float] = {}
    run_env = {**os.environ, "EXPKIT_RUN_ID": "bench", "EXPKIT_RUN_DIR": str(folder / "run")}
    (folder / "run" / "work").mkdir(parents=True)

    channel = folder / "channel-log"
    channel.mkdir()
    out = python(
        LOG_LOOP, [str(log_calls)], {**run_env, "EXPKIT_METRICS_DIR": str(channel)}, folder
    )
    assert channel_lines(channel) == log_calls
    results["expkit run.log()"] = float(out[-1])

    channel = folder / "channel-mlflow"
    channel.mkdir()
    hooks = importhooks.script_env({"mlflow": ["expkit_mlflow.inscript:install"]}, dict(os.environ))
    env = {**run_env, **hooks, "EXPKIT_METRICS_DIR": str(channel)}
    env.pop("MLFLOW_TRACKING_URI", None)
    scheme, rate = python(MLFLOW_LOOP, [str(inscript_calls)], env, folder / "run" / "work")
    assert scheme == "expkit", f"MLflow used {scheme}, not expkit's store"
    assert channel_lines(channel) == inscript_calls + 1
    results["mlflow.log_metric under expkit"] = float(rate)

    channel = folder / "channel-azureml"
    channel.mkdir()
    hooks = importhooks.script_env(
        {"azureml.core.run": ["expkit_azureml.inscript:install"]}, dict(os.environ)
    )
    env = {**run_env, **hooks, "EXPKIT_METRICS_DIR": str(channel)}
    kind, rate = python(AZUREML_LOOP, [str(log_calls)], env, folder / "run" / "work")[-2:]
    assert kind == "ExpkitRun", f"Run.get_context() gave {kind}, not expkit's run"
    assert channel_lines(channel) == log_calls
    results["azureml Run.log under expkit"] = float(rate)

    bare = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}  # the file store, still supported
    uris = [(folder / "mlruns").as_uri(), f"sqlite:///{folder / 'mlflow.db'}"]
    out = python(MLFLOW_LOOP, [str(mlflow_calls), *uris], bare, folder)
    results["bare mlflow.log_metric (file store)"] = float(out[1])
    results["bare mlflow.log_metric (SQLite)"] = float(out[3])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-calls", type=int, default=1_000_000)
    parser.add_argument("--inscript-calls", type=int, default=20_000)
    parser.add_argument("--mlflow-calls", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = bench(Path(tmp), args.log_calls, args.inscript_calls, args.mlflow_calls)
    inscript = results["mlflow.log_metric under expkit"]
    print(f"{'calls per second':<40} {'calls/s':>12} {'vs mlflow under expkit':>24}")
    for name, rate in results.items():
        print(f"{name:<40} {rate:>12,.0f} {rate / inscript:>23.3g}x")
    print(json.dumps({"calls_per_s": {k: round(v) for k, v in results.items()}}))


if __name__ == "__main__":
    main()
