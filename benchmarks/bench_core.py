"""Core benchmarks, each measured side by side with its peer in the same run.

    python benchmarks/bench_core.py [--repeat 5] [--log-calls 1000000] [--mlflow-calls 300]

1. Lifecycle overhead: wall time of `expkit run noop.yaml` minus `python noop.py`
   (target: under +0.3 s), next to `mlflow run --env-manager local` on the same script.
2. `run.log()` calls per second inside the training process (target: over 1,000,000/s)
   vs `mlflow.log_metric` on a SQLite tracking store.

Prints a table and writes the figures as JSON to stdout's last line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NOOP = "print('noop')\n"


def wall(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def median_wall(argv: list[str], cwd: Path, env: dict[str, str], repeat: int) -> float:
    wall(argv, cwd, env)  # warm the file cache
    return statistics.median(wall(argv, cwd, env) for _ in range(repeat))


def bench_overhead(folder: Path, repeat: int) -> dict[str, float]:
    (folder / "noop.py").write_text(NOOP)
    (folder / "noop.yaml").write_text("experiment: bench\nentry_script: noop.py\n")
    (folder / "MLproject").write_text(
        "name: noop\nentry_points:\n  main:\n    command: python noop.py\n"
    )
    env = {**os.environ, "EXPKIT_WORKSPACE": str(folder / ".expkit")}
    subprocess.run(
        [sys.executable, "-m", "expkit", "init", str(folder)], check=True, stdout=subprocess.DEVNULL
    )
    results = {
        "python noop.py": median_wall([sys.executable, "noop.py"], folder, env, repeat),
        "expkit run noop.yaml": median_wall(
            [sys.executable, "-m", "expkit", "run", "noop.yaml", "--quiet"], folder, env, repeat
        ),
    }
    if importlib.util.find_spec("mlflow"):
        mlflow_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
        argv = [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            ".",
            "--env-manager",
            "local",
            "--experiment-name",
            "bench",
        ]
        results["mlflow run --env-manager local"] = median_wall(argv, folder, mlflow_env, repeat)
    return results


LOG_LOOP = """
import os, sys, time
from expkit import Run
run = Run.get_context()
n = int(sys.argv[1])
log = run.log
start = time.perf_counter()
for i in range(n):
    log("loss", 0.5, step=i)
elapsed = time.perf_counter() - start
run.flush()
print(n / elapsed)
"""

MLFLOW_LOOP = """
import sys, time, mlflow
mlflow.set_tracking_uri(sys.argv[2])
n = int(sys.argv[1])
with mlflow.start_run():
    start = time.perf_counter()
    for i in range(n):
        mlflow.log_metric("loss", 0.5, step=i)
    elapsed = time.perf_counter() - start
print(n / elapsed)
"""


def bench_log_calls(folder: Path, calls: int, mlflow_calls: int) -> dict[str, float]:
    channel = folder / "channel"
    channel.mkdir()
    env = {**os.environ, "EXPKIT_METRICS_DIR": str(channel), "EXPKIT_RUN_ID": "bench"}
    out = subprocess.run(
        [sys.executable, "-c", LOG_LOOP, str(calls)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    results = {"expkit run.log() calls/s": float(out.stdout.split()[-1])}
    lines = sum(path.read_bytes().count(b"\n") for path in channel.glob("*.jsonl"))
    assert lines == calls, f"the channel holds {lines} of {calls} values"
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return results
    uri = f"sqlite:///{folder / 'mlflow-log.db'}"
    out = subprocess.run(
        [sys.executable, "-c", MLFLOW_LOOP, str(mlflow_calls), uri],
        check=True,
        capture_output=True,
        text=True,
    )
    results["mlflow.log_metric calls/s (SQLite)"] = float(out.stdout.split()[-1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--log-calls", type=int, default=1_000_000)
    parser.add_argument("--mlflow-calls", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "overhead").mkdir()
        overhead = bench_overhead(Path(tmp) / "overhead", args.repeat)
        logging = bench_log_calls(Path(tmp), args.log_calls, args.mlflow_calls)
    base = overhead["python noop.py"]
    print(f"{'command':<40} {'median wall':>12} {'overhead':>10}")
    for name, seconds in overhead.items():
        print(f"{name:<40} {seconds:>11.3f}s {seconds - base:>+9.3f}s")
    print()
    for name, rate in logging.items():
        print(f"{name:<40} {rate:>14,.0f}")
    peer = logging.get("mlflow.log_metric calls/s (SQLite)")
    if peer:
        print(
            f"{'ratio expkit / mlflow':<40} {logging['expkit run.log() calls/s'] / peer:>14,.0f}x"
        )
    print(
        json.dumps(
            {
                "overhead_s": {k: round(v - base, 4) for k, v in overhead.items()},
                "log_calls_per_s": {k: round(v) for k, v in logging.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
