"""Metric sink benchmarks, each measured side by side with its peer in the same run.

    python benchmarks/bench_metrics.py [--repeat 7] [--seconds 10] [--values 100000]
                                       [--log-metric-calls 2000] [--server] [--only PART]
                                       [--bursts 1000000,3000000] [--log-batch-values 100000]
                                       [--rate 1000000] [--ranks 1] [--stream-seconds 10]
                                       [--pump-values N]
                                       [--quick]

1. What sinks cost the training script (target: under 2 % slower): a script doing ~10 s of
   CPU work and logging a few thousand values, with no sink, with `mlflow`, and with `mlflow`
   and `tensorboard` (when that plugin loads). The script times itself (what training feels);
   `expkit run` is timed too (the sink's set-up and drain at post-process show there).
   Configurations alternate within each repetition; the median, the best and the range of
   the script's wall time are reported, with its CPU time (the work it did, whatever else
   ran on the machine).
2. Time until N values (default 100,000) are queryable in MLflow (target: expkit at least 20x
   faster): a script logging them through `run.log()` under `expkit run` with the `mlflow`
   sink (timed until `expkit run` returns: the MLflow run is FINISHED and holds every value),
   vs the script calling `mlflow.log_metric` itself, and with MLflow's asynchronous logging
   (`synchronous=False`, until flushed). Those two are measured on --log-metric-calls values
   and extrapolated linearly to N: the measured time plus the per-call time of the calls
   times the calls left (each row says which).

3. A burst (`--only burst`; target: the driver under 150 MB at 3 M values, 1 M values stored
   within 6 s of the script's end): a script logging --bursts values as fast as it can,
   through `expkit run` (no sink); the driver's peak resident memory (its own getrusage) and
   the time from the script's end (its last `run.log()` flushed) until the history holds
   every value. Beside it, the peer: `MlflowClient.log_batch` (1,000 values a call, MLflow's
   limit) into a SQLite store, its process's peak memory and its time for the same values
   (measured on --log-batch-values and extrapolated linearly).
4. Latency (`--only latency`; target: under 0.5 s at 1 M values/s): a script logging a
   steady --rate values per second (as close as it gets) for --stream-seconds, with a probe
   value (the time it was logged) every 10 ms (--ranks N: N processes launched by torchrun,
   --rate / N each, rank 0 logging the probe); the benchmark reads the probe back as
   `expkit runs show` does (`history.metrics.latest`) every 10 ms: how long after
   `run.log()` each probe became visible (median, 95th percentile, max; the medians of the
   stream's first and second halves: a backlog that grows shows as a slower second half), and
   the rate the script achieved.
5. The pump (`--only pump`): --pump-values values (four metric names, random values) logged
   by `run.log()` in process, and the time a value took to log and write (the writer's
   encoding included: `expkit.channel`'s columns lines); then how many values a second the
   driver's `MetricPump` stores from that channel, and how many a second it only reads and
   parses it (`ChannelReader.read`), the rest being SQLite's (each series' values of a batch
   go into one row, `expkit.history.metric_groups`; the rows written are shown). Beside it,
   the same values as one-call lines, the form a channel had before columns lines. Part 4's
   latency stays bounded only while the pump stores faster than the script logs; the ratio
   is to --rate.

The MLflow store is SQLite, the sink's embedded default; `--server` also runs part 2 against
a `mlflow server` on a loopback port. Prints a table and the figures as JSON on the last line.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
ENV.pop("MLFLOW_TRACKING_URI", None)

WORK = """
def work(n):  # stands in for a training step: pure CPU, one core
    total = 0
    for i in range(n):
        total += i * i % 7
    return total
"""

TRAIN = f"""
import json, sys, time
from expkit import Run
{WORK}
run = Run.get_context()
steps, per_step, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
start, cpu = time.perf_counter(), time.process_time()
for step in range(steps):
    work(per_step)
    run.log("loss", 1.0 / (step + 1), step=step)
    run.log("acc", step / steps, step=step)
    run.log("lr", 0.1 * 0.99**step, step=step)
    run.log("images_per_sec", 1000.0 + step, step=step)
elapsed = time.perf_counter() - start
with open(out, "w") as f:
    json.dump([elapsed, time.process_time() - cpu], f)
"""

FLOOD = """
import sys
from expkit import Run
run = Run.get_context()
for i in range(int(sys.argv[1])):
    run.log("loss", 1.0 / (i + 1), step=i)
"""

LOG_METRIC = """
import sys, time
start = time.perf_counter()
import mlflow
n, uri, synchronous = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "sync"
mlflow.set_tracking_uri(uri)
mlflow.set_experiment("log-metric")
with mlflow.start_run():
    ready = time.perf_counter()
    for i in range(n):
        mlflow.log_metric("loss", 1.0 / (i + 1), step=i, synchronous=synchronous)
    mlflow.flush_async_logging()
    logged = time.perf_counter()
print(ready - start, logged - ready)  # set-up; the calls (async: until flushed at the end)
"""

STEPS = 1000  # x 4 metrics: 4000 values


def calibrate(seconds: float) -> int:
    """Iterations of the script's work() per step so that STEPS of them take `seconds` of CPU
    (CPU time, not wall time: other load on the machine does not change the script's size)."""
    namespace: dict = {}
    exec(WORK, namespace)
    n, elapsed = 20_000, 0.0
    while elapsed < 0.5:
        n *= 2
        start = time.process_time()
        namespace["work"](n)
        elapsed = time.process_time() - start
    return int(n / elapsed * seconds / STEPS)


def new_workspace(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "expkit", "init", str(folder)], check=True, stdout=subprocess.DEVNULL
    )
    return {**ENV, "EXPKIT_WORKSPACE": str(folder / ".expkit")}


def expkit_run(folder: Path, env: dict[str, str], script: str, args: list, sinks: list) -> float:
    """Wall time of `expkit run` on a job of `script` with these sinks."""
    return expkit_run_cpu(folder, env, script, args, sinks)[0]


def expkit_run_cpu(
    folder: Path, env: dict[str, str], script: str, args: list, sinks: list
) -> tuple[float, float]:
    """Wall time of `expkit run` on a job of `script` with these sinks, and the CPU time of
    its processes (the driver and the script)."""
    (folder / "train.py").write_text(script)
    job = {"experiment": "bench", "entry_script": "train.py", "args": args, "metrics": sinks}
    (folder / "job.yaml").write_text(json.dumps(job))  # JSON is YAML
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "expkit", "run", "job.yaml", "--quiet"],
        cwd=folder,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu


def mlflow_count(db: Path, key: str) -> int:
    """Points of `key` in the latest run of a SQLite MLflow store."""
    with sqlite3.connect(db) as store:
        (run,) = store.execute(
            "SELECT run_uuid FROM runs ORDER BY start_time DESC LIMIT 1"
        ).fetchone()
        return store.execute(
            "SELECT COUNT(*) FROM metrics WHERE run_uuid = ? AND key = ?", (run, key)
        ).fetchone()[0]


def tensorboard_available() -> bool:
    from expkit.errors import UserError
    from expkit.plugins import get_plugins

    try:
        get_plugins().get("metric_sinks", "tensorboard")
    except UserError:
        return False
    return True


# -- 1. what the sinks cost the script ------------------------------------------------------------
def bench_overhead(folder: Path, repeat: int, seconds: float) -> dict[str, dict[str, float]]:
    per_step = calibrate(seconds)
    configs = {"no sink": [], "mlflow": ["mlflow"]}
    if tensorboard_available():
        configs["mlflow + tensorboard"] = ["mlflow", "tensorboard"]
    env = new_workspace(folder)
    runs: dict[str, list[tuple[float, ...]]] = {name: [] for name in configs}
    for round_ in range(repeat + 1):  # round 0 warms the caches (and creates mlflow.db)
        for name, sinks in configs.items():
            out = folder / "elapsed.json"
            total, all_cpu = expkit_run_cpu(folder, env, TRAIN, [STEPS, per_step, str(out)], sinks)
            wall, cpu = json.loads(out.read_text())
            if round_:
                runs[name].append((wall, cpu, total, all_cpu - cpu))
            if sinks:
                got = mlflow_count(folder / ".expkit" / "mlflow.db", "loss")
                assert got == STEPS, f"{name}: MLflow holds {got} of {STEPS} loss values"
    figures = {}
    for name, rows in runs.items():
        walls = [row[0] for row in rows]
        figures[name] = {
            "script_s": statistics.median(walls),
            "script_min_s": min(walls),
            "script_max_s": max(walls),
            "script_cpu_s": statistics.median(row[1] for row in rows),
            "expkit_run_s": statistics.median(row[2] for row in rows),
            "driver_cpu_s": statistics.median(row[3] for row in rows),
        }
    return figures


# -- 2. time until N values are queryable in MLflow -----------------------------------------------
def bench_queryable(folder: Path, values: int, calls: int, server: str | None) -> dict[str, float]:
    env = new_workspace(folder)
    if server:
        sinks: list = [{"name": "mlflow", "options": {"tracking_uri": server}}]
        uri = server
    else:
        sinks, uri = ["mlflow"], f"sqlite:///{folder / 'log-metric.db'}"
    expkit_run(folder, env, "print('warm')\n", [], sinks)  # creates the store: not timed
    through_expkit = expkit_run(folder, env, FLOOD, [values], sinks)
    if not server:
        got = mlflow_count(folder / ".expkit" / "mlflow.db", "loss")
        assert got == values, f"MLflow holds {got} of {values} values"
    subprocess.run(  # creates the peer's store: not timed either
        [sys.executable, "-c", LOG_METRIC, "1", uri, "sync"],
        env=ENV,
        check=True,
        capture_output=True,
    )
    results = {"expkit run.log() + mlflow sink": through_expkit}
    for mode, label in (("sync", "mlflow.log_metric"), ("async", "log_metric(synchronous=False)")):
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", LOG_METRIC, str(calls), uri, mode],
            env=ENV,
            check=True,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        logging = float(out.stdout.split()[-1])
        results[f"{label}, {calls:,} measured"] = wall
        results[f"{label}, {values:,} extrapolated"] = wall + logging / calls * (values - calls)
    return results


# -- 3. a burst: the driver's memory and the time until every value is stored -------------------
BURST = """
import json, sys, time
from expkit import Run
run = Run.get_context()
for i in range(int(sys.argv[1])):
    run.log("loss", 1.0 / (i + 1), step=i)
run.flush()
with open(sys.argv[2], "w") as f:
    json.dump(time.time(), f)  # the script's end: every value is in the channel
"""

# The peak resident memory of the process image that runs it (scripts below start with it):
# VmHWM, which exec resets; getrusage's ru_maxrss keeps the forking parent's peak (pytest's,
# gigabytes late in a suite) across exec.
PEAK_KIB = """
import json, sys


def peak_kib():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0])
"""

MEASURED_DRIVER = (
    PEAK_KIB
    + """
sys.argv = ["expkit", "run", "job.yaml", "--quiet"]
from expkit.cli import main
code = main()
with open("driver-rss.json", "w") as f:
    json.dump(peak_kib() * 1024, f)  # bytes
sys.exit(code)
"""
)

LOG_BATCH = (
    PEAK_KIB
    + """
import time
start = time.perf_counter()
import mlflow
from mlflow.entities import Metric
n, uri = int(sys.argv[1]), sys.argv[2]
client = mlflow.MlflowClient(uri)
experiment = client.create_experiment(f"burst-{time.time()}")
run_id = client.create_run(experiment).info.run_id
ready = time.perf_counter()
now = int(time.time() * 1000)
for first in range(0, n, 1000):
    batch = [Metric("loss", 1.0 / (i + 1), now, i) for i in range(first, min(first + 1000, n))]
    client.log_batch(run_id, metrics=batch)
done = time.perf_counter()
peak = peak_kib() * 1024
print(json.dumps([ready - start, done - ready, peak]))
"""
)


def bench_burst(folder: Path, counts: list[int], peer_values: int) -> dict[str, dict]:
    """Each burst through `expkit run`, then the peer's log_batch (see the module's part 3)."""
    from expkit.workspace import Workspace

    env = new_workspace(folder)
    (folder / "train.py").write_text(BURST)
    history = Workspace(folder / ".expkit").history
    figures: dict[str, dict] = {}
    for count in counts:
        end_file = folder / f"end-{count}.json"
        job = {"experiment": "burst", "entry_script": "train.py", "args": [count, str(end_file)]}
        (folder / "job.yaml").write_text(json.dumps(job))
        base = _last_row(history)  # only this run writes meanwhile: its rows follow on
        driver = subprocess.Popen(
            [sys.executable, "-c", MEASURED_DRIVER],
            cwd=folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        start = time.time()
        while not end_file.exists() and driver.poll() is None:
            time.sleep(0.05)
        while _last_row(history) - base < count:
            if driver.poll() is not None:
                raise RuntimeError(f"expkit run ended with {driver.returncode}, values missing")
            time.sleep(0.02)
        stored_at = time.time()
        assert driver.wait() == 0
        script_end = json.loads(end_file.read_text())
        figures[f"{count:,} values"] = {
            "driver_peak_mb": json.loads((folder / "driver-rss.json").read_text()) / 2**20,
            "stored_after_script_end_s": stored_at - script_end,
            "script_s": script_end - start,
            "expkit_run_s": time.time() - start,
        }
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return figures
    uri = f"sqlite:///{folder / 'log-batch.db'}"
    subprocess.run(  # creates the store: not timed
        [sys.executable, "-c", LOG_BATCH, "1", uri], env=ENV, check=True, capture_output=True
    )
    out = subprocess.run(
        [sys.executable, "-c", LOG_BATCH, str(peer_values), uri],
        env=ENV,
        check=True,
        capture_output=True,
        text=True,
    )
    _, logging, rss = json.loads(out.stdout.splitlines()[-1])
    for count in counts:
        figures[f"{count:,} values"]["log_batch_peak_mb"] = rss / 2**20
        figures[f"{count:,} values"]["log_batch_s"] = logging / peer_values * count
    figures["log_batch_measured"] = {"values": peer_values, "seconds": logging}
    return figures


def _last_row(history: Any) -> int:
    """The id of the history's last metric row (a look-up of the table's last row id)."""
    return history.db.execute("SELECT MAX(id) FROM metrics").fetchone()[0] or 0


# -- 4. latency from run.log() to `expkit runs show` under a steady stream ------------------------
STREAM = """
import os, sys, time
from expkit import Run
run = Run.get_context()
rank, ranks = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
rate, seconds, rates = int(sys.argv[1]) // ranks, float(sys.argv[2]), sys.argv[3]
per_tick = rate // 100  # one tick every 10 ms
log = run.log
start = time.time()
ticks = logged = 0
while time.time() - start < seconds:
    for _ in range(per_tick):
        log("loss", 0.5, step=logged)
        logged += 1
    if rank == 0:
        log("probe", time.time(), step=ticks)  # the value is when it was logged
    ticks += 1
    pause = start + ticks / 100 - time.time()
    if pause > 0:
        time.sleep(pause)
with open(os.path.join(rates, f"rate-{rank}"), "w") as f:
    f.write(str(logged / (time.time() - start)))
"""


def bench_latency(folder: Path, rate: int, seconds: float, ranks: int) -> dict[str, float]:
    """See the module's part 4."""
    from expkit.workspace import Workspace

    env = new_workspace(folder)
    (folder / "train.py").write_text(STREAM)
    rates = folder / "rates"  # each rank's achieved values/s
    rates.mkdir()
    job: dict = {
        "experiment": "stream",
        "entry_script": "train.py",
        "args": [rate, seconds, str(rates)],
    }
    if ranks > 1:  # torchrun's processes on this machine, rank 0 logging the probe
        job.update(resources={"processes_per_node": ranks}, distributed="torchrun")
    (folder / "job.yaml").write_text(json.dumps(job))
    history = Workspace(folder / ".expkit").history
    driver = subprocess.Popen(
        [sys.executable, "-m", "expkit", "run", "job.yaml"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    delays: list[float] = []
    seen = None
    while driver.poll() is None:
        time.sleep(0.01)
        runs = history.runs.recent("stream", limit=1)
        if not runs or runs[0].state != "running":
            continue
        probe = history.metrics.latest(runs[0].id).get("probe")
        if probe is not None and probe != seen:
            seen = probe
            delays.append(time.time() - probe)
    output = driver.stdout.read() if driver.stdout else ""
    assert driver.returncode == 0, output
    achieved = sum(float(path.read_text()) for path in rates.iterdir())
    half = len(delays) // 2  # a backlog that grows shows as a later half slower than the first
    first, second = statistics.median(delays[:half]), statistics.median(delays[half:])
    delays.sort()
    return {
        "ranks": ranks,
        "achieved_values_per_s": achieved,
        "probes_seen": len(delays),
        "median_s": statistics.median(delays),
        "p95_s": delays[int(len(delays) * 0.95)],
        "max_s": delays[-1],
        "median_first_half_s": first,
        "median_second_half_s": second,
    }


# -- 5. the pump's throughput, in process ---------------------------------------------------------
def bench_pump(folder: Path, values: int) -> dict[str, float]:
    """See the module's part 5: the writer's cost a value, then values/s stored (wall and CPU
    seconds) and values/s parsed, from the lines the writer writes and, beside them, from the
    same values as one-call lines (a channel written before columns lines)."""
    import random

    from expkit.context import ScriptRun

    names, rnd = ["loss", "lr", "accuracy", "grad_norm"], random.Random(1)
    logged = [(names[i % 4], rnd.random(), i) for i in range(values)]
    channel = folder / "columns"
    channel.mkdir(parents=True)
    run = ScriptRun(None, str(channel / "rank-0.1.jsonl"))
    atexit.unregister(run._at_exit)
    log, write = run.log, time.perf_counter()
    for name, value, step in logged:
        log(name, value, step=step)
    run.flush()
    write = time.perf_counter() - write
    figures = {"values": values, "us_per_value_logged": write / values * 1e6}
    figures.update(_pump_channel(folder / "columns", channel, values))

    one_call = folder / "one-call" / "metrics"
    one_call.mkdir(parents=True)
    start = time.time()
    with open(one_call / "rank-0.1.jsonl", "w") as f:
        for i, (name, value, step) in enumerate(logged):
            f.write(f'["m","{name}",{value!r},{step},{start + i * 1e-6!r},0]\n')
    one = _pump_channel(folder / "one-call", one_call, values)
    figures.update({f"{key}_one_call_lines": figure for key, figure in one.items()})
    return figures


def _pump_channel(folder: Path, channel: Path, values: int) -> dict[str, float]:
    """The channel read alone (parsing), then pumped into a new history (storing)."""
    from expkit.history import History
    from expkit.metrics import ChannelReader, MetricPump

    reader, parse_s = ChannelReader(channel), time.perf_counter()
    while batch := reader.read():
        reader.commit(batch)
    parse_s = time.perf_counter() - parse_s
    history = History(folder / "history.db")
    pump = MetricPump(history, "20261130-120000-bench0", channel)
    wall, cpu = time.perf_counter(), time.process_time()
    stored = pump.pump()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert stored == values, (stored, values)
    (rows,) = history.db.execute("SELECT COUNT(*) FROM metrics").fetchone()
    return {
        "rows": rows,  # row groups: a row per series and batch (expkit.history.metric_groups)
        "stored_values_per_s": values / wall,
        "stored_values_per_cpu_s": values / cpu,
        "parsed_values_per_s": values / parse_s,
        "us_per_value": wall / values * 1e6,
        "us_per_value_parse": parse_s / values * 1e6,
    }


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """A `mlflow server` on a loopback port (SQLite backend, artifacts served by it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server", "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{folder / 'server.db'}"),
            *("--default-artifact-root", "mlflow-artifacts:/"),
            *("--artifacts-destination", str(folder / "artifacts")),
            *("--host", "127.0.0.1", "--port", str(port)),
        ],
        env={**ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.25)
    raise RuntimeError("mlflow server did not start")


def stop_server(server: subprocess.Popen) -> None:
    """Stop a server from `start_server` (its whole process group), killing it after 15 s."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="rounds of part 1 (7)")
    parser.add_argument("--seconds", type=float, default=10.0, help="part 1's CPU work (s)")
    parser.add_argument("--values", type=int, default=100_000, help="part 2's values")
    parser.add_argument(
        "--log-metric-calls", type=int, default=2000, help="part 2's peer calls, extrapolated"
    )
    parser.add_argument("--server", action="store_true", help="part 2 against mlflow server too")
    parser.add_argument(
        "--only",
        choices=["overhead", "queryable", "burst", "latency", "pump"],
        help="run one part",
    )
    parser.add_argument("--bursts", default="1000000,3000000", help="values per burst (part 3)")
    parser.add_argument(
        "--log-batch-values", type=int, default=100_000, help="part 3's peer values, extrapolated"
    )
    parser.add_argument("--rate", type=int, default=1_000_000, help="values/s (part 4)")
    parser.add_argument(
        "--ranks", type=int, default=1, help="part 4's processes (torchrun), sharing --rate"
    )
    parser.add_argument(
        "--stream-seconds", type=float, default=10.0, help="part 4's stream length (s)"
    )
    parser.add_argument(
        "--pump-values", type=int, default=1_000_000, help="part 5's channel lines (1000000)"
    )
    parser.add_argument("--quick", action="store_true", help="parts 3-5 smaller")
    args = parser.parse_args()
    if args.quick:
        args.bursts, args.log_batch_values, args.stream_seconds = "300000,1000000", 20_000, 5.0
        args.pump_values = 300_000
    figures: dict = {"overhead": {}, "queryable_s": {}, "burst": {}, "latency": {}, "pump": {}}
    overhead = figures["overhead"]
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "overhead"):
            overhead.update(bench_overhead(Path(tmp, "overhead"), args.repeat, args.seconds))
        if args.only in (None, "queryable"):
            figures["queryable_s"]["sqlite"] = bench_queryable(
                Path(tmp, "sqlite"), args.values, args.log_metric_calls, None
            )
        if args.server and args.only in (None, "queryable"):
            server, url = start_server(Path(tmp))
            try:
                figures["queryable_s"]["server"] = bench_queryable(
                    Path(tmp, "server"), args.values, args.log_metric_calls, url
                )
            finally:
                stop_server(server)
        if args.only in (None, "burst"):
            counts = [int(n) for n in args.bursts.split(",")]
            figures["burst"] = bench_burst(Path(tmp, "burst"), counts, args.log_batch_values)
        if args.only in (None, "latency"):
            figures["latency"] = bench_latency(
                Path(tmp, "latency"), args.rate, args.stream_seconds, args.ranks
            )
        if args.only in (None, "pump"):
            figures["pump"] = bench_pump(Path(tmp, "pump"), args.pump_values)

    if overhead:
        base = overhead["no sink"]
        print(
            f"1. a ~{args.seconds:.0f} s script logging {4 * STEPS} values, {args.repeat} runs each"
        )
        print(
            f"{'sinks':<22} {'script median':>15} {'best':>15} {'range':>14} {'script CPU':>11}"
            f" {'expkit run':>11} {'driver CPU':>11}"
        )
        for name, row in overhead.items():
            row["median_slower_pct"] = round((row["script_s"] / base["script_s"] - 1) * 100, 2)
            row["best_slower_pct"] = round(
                (row["script_min_s"] / base["script_min_s"] - 1) * 100, 2
            )
            print(
                f"{name:<22} {row['script_s']:>6.2f}s {row['median_slower_pct']:>+6.1f}%"
                f" {row['script_min_s']:>7.2f}s {row['best_slower_pct']:>+6.1f}%"
                f" {row['script_min_s']:>7.2f}-{row['script_max_s']:<5.2f}s"
                f" {row['script_cpu_s']:>10.2f}s {row['expkit_run_s']:>10.2f}s"
                f" {row['driver_cpu_s']:>10.2f}s"
            )
    for store, rows in figures["queryable_s"].items():
        print(f"\n2. time until {args.values:,} values are queryable in MLflow ({store})")
        ours = rows["expkit run.log() + mlflow sink"]
        for name, seconds in rows.items():
            print(f"{name:<52} {seconds:>8.1f}s {seconds / ours:>6.1f}x")
    bursts = {k: v for k, v in figures["burst"].items() if k != "log_batch_measured"}
    if bursts:
        print("\n3. a burst: peak memory and time until stored (after the script's end)")
        print(
            f"{'values':>12} {'expkit driver':>14} {'stored after':>13} {'log_batch':>10}"
            f" {'log_batch time':>15} {'memory ratio':>13}"
        )
        for name, row in bursts.items():
            peer = row.get("log_batch_peak_mb")
            print(
                f"{name.split()[0]:>12} {row['driver_peak_mb']:>11.0f} MB"
                f" {row['stored_after_script_end_s']:>12.1f}s"
                + (
                    f" {peer:>7.0f} MB {row['log_batch_s']:>14.1f}s"
                    f" {row['driver_peak_mb'] / peer:>12.2f}x"
                    if peer
                    else ""
                )
            )
    latency = figures["latency"]
    if latency:
        print(
            f"\n4. run.log() to `runs show` at {args.rate:,} values/s asked of"
            f" {latency['ranks']} process(es),"
            f" {latency['achieved_values_per_s']:,.0f} achieved: median"
            f" {latency['median_s']:.3f}s, p95 {latency['p95_s']:.3f}s,"
            f" max {latency['max_s']:.3f}s ({latency['probes_seen']} probes); median of the"
            f" stream's first half {latency['median_first_half_s']:.3f}s, second half"
            f" {latency['median_second_half_s']:.3f}s"
        )
    pump = figures["pump"]
    if pump:
        print(
            f"\n5. the pump, in process, {pump['values']:,} values logged by `run.log()`"
            f" ({pump['us_per_value_logged']:.2f} us each, the writer's encoding included)"
        )
        for label, tail in (
            ("as the writer writes them", ""),
            ("one-call lines", "_one_call_lines"),
        ):
            print(
                f"   {label:<26} {pump['stored_values_per_s' + tail]:>11,.0f} values/s stored"
                f" ({pump['us_per_value' + tail]:.2f} us each,"
                f" {pump['stored_values_per_s' + tail] / args.rate:.2f}x the {args.rate:,}/s"
                f" asked), parsing alone {pump['parsed_values_per_s' + tail]:,.0f}/s"
                f" ({pump['us_per_value_parse' + tail]:.2f} us), {pump['rows' + tail]:,} rows"
            )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
