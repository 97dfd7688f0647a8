"""The MLflow sink's drain at the end of a run, measured side by side with its peers in one run.

    python benchmarks/bench_sink_drain.py [--repeat 5] [--values 50] [--million] [--quick]

1. A script logging --values values (default 50) under `expkit run` with the `mlflow` sink on
   a `mlflow server` (loopback port, SQLite backend): the post-process stage's seconds, from
   the run history's stage timestamps (that stage stops the metric pump and drains the sinks:
   goal under 1 s), and the whole `expkit run`. The sink talks to a server through MLflow's
   REST API (`expkit_mlflow.rest`, no mlflow import); beside it: the same sink through
   MLflow's own client (`expkit_mlflow.library`, what it used before: importing mlflow is
   most of its post-process), the same run with no sink, and the peer, a bare script that
   logs the same values with `mlflow.log_metric` to the same server (its set-up, import to
   `start_run`, and its logging, timed by the script itself).
   And the sink's run again with a script that logs the same values over --script-seconds
   (default 5 s): longer than importing mlflow takes, so that the sink is open when the
   script ends and post-process is the drain alone. Configurations alternate within each
   repetition; medians are reported.
2. `--million`: a script logging 1,000,000 values under `expkit run` with the `mlflow` sink on
   its embedded default (SQLite in the workspace): `expkit run`'s seconds and its
   post-process's, beside the peer: `MlflowClient.log_batch` of the same values into a SQLite
   store of its own, measured on 100,000 and extrapolated linearly.

Prints a table, the ratios and the figures as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_metrics import start_server, stop_server  # a `mlflow server` on a loopback port

ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
ENV.pop("MLFLOW_TRACKING_URI", None)

LOG = """
import sys, time
from expkit import Run
run = Run.get_context()
n, seconds = int(sys.argv[1]), float(sys.argv[2])
for i in range(n):
    run.log("loss", 1.0 / (i + 1), step=i)
    time.sleep(seconds / n)
"""

# `expkit run` with the sink sent through MLflow's library, as for a store the REST client
# does not take (expkit_mlflow.tracking.connect).
LIBRARY = """
import sys
import expkit_mlflow.tracking
expkit_mlflow.tracking.library_only = lambda uri: "the library, for the benchmark"
from expkit.cli import main
sys.exit(main(sys.argv[1:]))
"""

PEER = """
import sys, time
start = time.perf_counter()
import mlflow
n, uri = int(sys.argv[1]), sys.argv[2]
mlflow.set_tracking_uri(uri)
mlflow.set_experiment("peer")
with mlflow.start_run():
    ready = time.perf_counter()
    for i in range(n):
        mlflow.log_metric("loss", 1.0 / (i + 1), step=i)
    logged = time.perf_counter()
ended = time.perf_counter()
print(ready - start, logged - ready, ended - logged)  # set-up; the calls; end_run
"""

PEER_BATCH = """
import sys, time
from mlflow import MlflowClient
from mlflow.entities import Metric
n, uri = int(sys.argv[1]), sys.argv[2]
client = MlflowClient(tracking_uri=uri)
run = client.create_run(client.create_experiment("peer")).info.run_id
now = int(time.time() * 1000)
metrics = [Metric("loss", 1.0 / (i + 1), now, i) for i in range(n)]
start = time.perf_counter()
client.log_batch(run, metrics=metrics)
print(time.perf_counter() - start)
"""


def new_workspace(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "expkit", "init", str(folder)], check=True, stdout=subprocess.DEVNULL
    )
    return {**ENV, "EXPKIT_WORKSPACE": str(folder / ".expkit")}


def expkit_run(
    folder: Path,
    env: dict[str, str],
    values: int,
    sinks: list,
    seconds: float = 0.0,
    library: bool = False,
) -> dict[str, float]:
    """`expkit run` of a script logging `values` values over `seconds` (with the mlflow sink
    through MLflow's library when `library`): its wall seconds, and the seconds of its
    post-process and run stages as the run history recorded them."""
    (folder / "train.py").write_text(LOG)
    args = [values, seconds]
    job = {"experiment": "bench", "entry_script": "train.py", "args": args, "metrics": sinks}
    (folder / "job.yaml").write_text(json.dumps(job))  # JSON is YAML
    command = ["-c", LIBRARY] if library else ["-m", "expkit"]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *command, "run", "job.yaml"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0 or "warning" in done.stdout:
        raise RuntimeError(f"expkit run failed or warned:\n{done.stdout[-3000:]}")
    with sqlite3.connect(folder / ".expkit" / "history.db") as history:
        (run_id,) = history.execute("SELECT id FROM runs ORDER BY number DESC LIMIT 1").fetchone()
        stages = {
            stage: ended - started
            for stage, started, ended in history.execute(
                "SELECT stage, started, ended FROM stages WHERE run_id = ?", (run_id,)
            )
            if started is not None and ended is not None
        }
    return {"expkit_run_s": wall, "post_process_s": stages["post-process"], "run_s": stages["run"]}


def peer(values: int, uri: str) -> dict[str, float]:
    """The bare script with `mlflow.log_metric`: its wall seconds and its own timings."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", PEER, str(values), uri],
        env=ENV,
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    setup, calls, end = (float(x) for x in out.stdout.split()[-3:])
    return {"wall_s": wall, "setup_s": setup, "log_metric_s": calls, "end_run_s": end}


def mlflow_values(url: str, experiment: str) -> tuple[int, str]:
    """Points of `loss` in the latest run of `experiment` on the server, and its status."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    (run,) = client.search_runs([found.experiment_id], max_results=1)
    return len(client.get_metric_history(run.info.run_id, "loss")), run.info.status


def bench_drain(
    folder: Path, repeat: int, values: int, seconds: float
) -> dict[str, dict[str, float]]:
    server, url = start_server(folder)
    try:
        env = new_workspace(folder / "ws")
        sink = [{"name": "mlflow", "options": {"tracking_uri": url}}]
        expkit_run(folder / "ws", env, values, sink)  # warms the caches, makes the experiment
        peer(1, url)
        rows: dict[str, list[dict[str, float]]] = {
            "mlflow sink": [],
            "mlflow sink, library client": [],
            "no sink": [],
            "peer": [],
            "mlflow sink, longer script": [],
        }
        for _ in range(repeat):
            rows["mlflow sink"].append(expkit_run(folder / "ws", env, values, sink))
            got, status = mlflow_values(url, "bench")
            assert (got, status) == (values, "FINISHED"), (got, status)
            library = expkit_run(folder / "ws", env, values, sink, library=True)
            rows["mlflow sink, library client"].append(library)
            got, status = mlflow_values(url, "bench")
            assert (got, status) == (values, "FINISHED"), (got, status)
            rows["no sink"].append(expkit_run(folder / "ws", env, values, []))
            rows["peer"].append(peer(values, url))
            if seconds:
                longer = expkit_run(folder / "ws", env, values, sink, seconds)
                rows["mlflow sink, longer script"].append(longer)
                got, status = mlflow_values(url, "bench")
                assert (got, status) == (values, "FINISHED"), (got, status)
    finally:
        stop_server(server)
    return {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in rows.items()
        if runs
    }


def bench_million(folder: Path, values: int) -> dict[str, float]:
    env = new_workspace(folder / "ws")
    ours = expkit_run(folder / "ws", env, values, ["mlflow"])
    with sqlite3.connect(folder / "ws" / ".expkit" / "mlflow.db") as store:
        (got,) = store.execute("SELECT COUNT(*) FROM metrics WHERE key = 'loss'").fetchone()
    assert got == values, f"MLflow holds {got} of {values} values"
    measured = min(values, 100_000)
    uri = f"sqlite:///{folder / 'peer.db'}"
    subprocess.run([sys.executable, "-c", PEER_BATCH, "1", uri], env=ENV, check=True)
    uri = f"sqlite:///{folder / 'peer2.db'}"
    subprocess.run([sys.executable, "-c", PEER_BATCH, "1", uri], env=ENV, check=True)
    out = subprocess.run(
        [sys.executable, "-c", PEER_BATCH, str(measured), uri],
        env=ENV,
        check=True,
        capture_output=True,
        text=True,
    )
    batch = float(out.stdout.split()[-1])
    return {**ours, "peer_log_batch_s": batch * values / measured, "peer_measured": measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each; medians (5)")
    parser.add_argument("--values", type=int, default=50, help="values the script logs (50)")
    parser.add_argument(
        "--script-seconds",
        type=float,
        default=5.0,
        help="also a script logging the values over this long (longer than mlflow's import)",
    )
    parser.add_argument("--million", action="store_true", help="also 1,000,000 values on SQLite")
    parser.add_argument("--quick", action="store_true", help="2 repetitions")
    args = parser.parse_args()
    repeat = 2 if args.quick else args.repeat
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        figures["drain"] = bench_drain(Path(tmp, "drain"), repeat, args.values, args.script_seconds)
        if args.million:
            figures["million"] = bench_million(Path(tmp, "million"), 1_000_000)
    drain = figures["drain"]
    sink, bare, other = drain["mlflow sink"], drain["no sink"], drain["peer"]
    print(f"1. {args.values} values on a `mlflow server`, median of {repeat} runs each")
    print(f"{'':<34} {'post-process':>13} {'run stage':>10} {'expkit run':>11}")
    shown = [
        ("expkit run, mlflow sink (REST)", sink),
        ("  same, through mlflow's library", drain["mlflow sink, library client"]),
        ("expkit run, no sink", bare),
    ]
    if "mlflow sink, longer script" in drain:
        shown.append(
            (f"  same, script of {args.script_seconds:g} s", drain["mlflow sink, longer script"])
        )
    for name, row in shown:
        print(
            f"{name:<34} {row['post_process_s']:>12.2f}s {row['run_s']:>9.2f}s"
            f" {row['expkit_run_s']:>10.2f}s"
        )
    print(
        f"{'peer: bare script, log_metric':<34} set-up {other['setup_s']:.2f}s, "
        f"{args.values} log_metric {other['log_metric_s']:.2f}s, end_run {other['end_run_s']:.2f}s,"
        f" wall {other['wall_s']:.2f}s"
    )
    library = drain["mlflow sink, library client"]
    figures["ratio"] = {
        "post_process_rest_vs_library": sink["post_process_s"] / library["post_process_s"],
        "post_process_sink_vs_no_sink": sink["post_process_s"] / bare["post_process_s"],
        "post_process_sink_vs_peer_log_metric": sink["post_process_s"]
        / (other["log_metric_s"] + other["end_run_s"]),
        "expkit_run_sink_minus_no_sink_s": sink["expkit_run_s"] - bare["expkit_run_s"],
    }
    ratio = figures["ratio"]
    print(
        f"post-process through the REST client: {ratio['post_process_rest_vs_library']:.2f}x "
        f"the one through mlflow's library"
    )
    print(
        f"post-process with the sink: {ratio['post_process_sink_vs_no_sink']:.1f}x the one "
        f"without; {ratio['post_process_sink_vs_peer_log_metric']:.1f}x the peer's logging + "
        f"end_run; the sink adds {ratio['expkit_run_sink_minus_no_sink_s']:+.2f}s to expkit run"
    )
    if "million" in figures:
        m = figures["million"]
        print(
            f"\n2. 1,000,000 values, embedded SQLite store: expkit run {m['expkit_run_s']:.1f}s "
            f"(post-process {m['post_process_s']:.1f}s); peer MlflowClient.log_batch "
            f"{m['peer_log_batch_s']:.1f}s (measured on {m['peer_measured']:,}, extrapolated)"
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
