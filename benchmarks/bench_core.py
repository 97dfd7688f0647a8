"""Core benchmarks, each measured side by side with its peer in the same run.

    python benchmarks/bench_core.py [--repeat 7] [--quick] [--torchx PATH] [--baseline DIR]

1. Start-up, in turns: each round runs every command once, so that the load of a shared
   machine falls on all of them alike; each command's median wall time and median CPU time
   (user + system of the command and its children, which other processes' load inflates far
   less than the wall time), less the bare interpreter's:
   - `expkit run noop.yaml` less `python noop.py`: the lifecycle overhead (target: under
     +0.15 s; the plugin scan remembered, as from the second run on; "(plugin scan)": as
     the first run after an install, which scans the installed distributions), next to
     `torchx run -s local_cwd utils.python --script noop.py` and `mlflow run
     --env-manager local` of the same script;
   - `expkit --help` (target: under 0.1 s) next to `torchx --help` and `mlflow --help`;
   - `from expkit import Run` and `Run.get_context()` in a script (what every training script
     and rank pays), next to `import mlflow`.
   Every Python command runs with its bytecode cached (PYTHONPYCACHEPREFIX, warmed by one round
   first), as an installed tool runs. torchx is looked for with --torchx, $TORCHX, then on PATH;
   its script runs on this interpreter. --baseline DIR adds `expkit run` and `expkit --help` of
   another checkout (its framework/ and plugins/ on PYTHONPATH): before and after, one run.
2. Where the time of `expkit run noop.yaml` goes: perf counters around each phase (CLI parse,
   plugin discovery, job load, history open, submit, prepare, scale, run stage, post-process,
   finish, summary), measured inside the command, medians of the rounds.
3. `run.log()` calls per second inside the training process (target: over 1,000,000/s) vs
   `mlflow.log_metric` on a SQLite tracking store.

Prints tables, then the figures as JSON on stdout's last line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from expkit.channel import calls_in

NOOP = "print('noop')\n"
IN_SCRIPT = "from expkit import Run\nRun.get_context().log('x', 1.0)\n"
REPO = Path(__file__).resolve().parent.parent

# Runs inside `expkit run noop.yaml`: wraps each phase's function with a perf counter and
# prints {phase: seconds} as JSON on stderr's last line. A function a later expkit renames is
# left out, not an error.
PHASES = r"""
import atexit, json, sys, time
started = time.perf_counter()
spent = {}

def wrap(owner, name, phase):
    function = getattr(owner, name, None)
    if function is None:
        return
    def timed(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - begin
    setattr(owner, name, timed)

import expkit.cli.entry as entry
spent["import the CLI"] = time.perf_counter() - started
begin = time.perf_counter()
import expkit.cli.run as cli_run, expkit.job as job, expkit.lifecycle as lifecycle
import expkit.plugins as plugins
spent["import what a run needs"] = time.perf_counter() - begin
wrap(entry, "build_parser", "CLI parse")
wrap(job.JobSpec, "from_yaml", "job load (YAML)")
wrap(cli_run, "open_workspace", "history open")
wrap(plugins, "load", "plugin discovery")
wrap(lifecycle, "submit", "submit (checks, record)")
wrap(lifecycle, "drive", "drive")
for name, phase in [("prepare", "prepare"), ("scale", "scale"), ("run_attempts", "run stage"),
                    ("post_process", "post-process"), ("finish", "finish (sinks, register)")]:
    wrap(lifecycle.Lifecycle, name, phase)
wrap(cli_run, "print_summary", "summary")

def report():
    spent["in the process, all"] = time.perf_counter() - started
    if "plugin discovery" in spent and "submit (checks, record)" in spent:
        spent["submit (checks, record)"] -= spent["plugin discovery"]
    inner = ("prepare", "scale", "run stage", "post-process", "finish (sinks, register)")
    if "drive" in spent:
        spent["drive, the rest"] = spent.pop("drive") - sum(spent.get(p, 0.0) for p in inner)
    sys.stderr.write("\n" + json.dumps(spent) + "\n")

atexit.register(report)
sys.argv = ["expkit", *sys.argv[1:]]
sys.exit(entry.main())
"""


def timed_run(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the command and its children, stderr) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stderr


def find_torchx(given: str | None) -> str | None:
    """The torchx command: --torchx, else $TORCHX, else on PATH; None when there is none."""
    for candidate in (given, os.environ.get("TORCHX"), shutil.which("torchx")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def commands(
    folder: Path, env: dict[str, str], torchx: str | None, baseline: Path | None
) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each command measured, by name: (argv, environment)."""
    py = sys.executable
    table: dict[str, tuple[list[str], dict[str, str]]] = {
        "python -c pass": ([py, "-c", "pass"], env),
        "python noop.py": ([py, "noop.py"], env),
        "expkit run noop.yaml": ([py, "-m", "expkit", "run", "noop.yaml", "--quiet"], env),
        # the first run after an install, uninstall or upgrade: the plugin scan is not stored
        # (its cache folder cannot be made: a file is in the way)
        "expkit run noop.yaml (plugin scan)": (
            [py, "-m", "expkit", "run", "noop.yaml", "--quiet"],
            {**env, "EXPKIT_CACHE_DIR": str(folder / "not-a-folder" / "cache")},
        ),
        "expkit --help": ([py, "-m", "expkit", "--help"], env),
        "script: from expkit import Run": ([py, "in_script.py"], env),
    }
    if baseline is not None:
        other = {**env, "PYTHONPATH": f"{baseline / 'framework'}{os.pathsep}{baseline / 'plugins'}"}
        table["expkit run noop.yaml (baseline)"] = table["expkit run noop.yaml"][0], other
        table["expkit --help (baseline)"] = table["expkit --help"][0], other
    if torchx is not None:
        # its `utils.python` runs `python` from PATH: this interpreter, as the others do
        here = {**env, "PATH": f"{Path(py).parent}{os.pathsep}{env.get('PATH', '')}"}
        run = [torchx, "run", "-s", "local_cwd", "utils.python", "--script", "noop.py"]
        table["torchx run -s local_cwd"] = run, here
        table["torchx --help"] = [torchx, "--help"], here
    if importlib.util.find_spec("mlflow"):
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        mlflow_env = {**env, "MLFLOW_TRACKING_URI": uri}
        run = [py, "-m", "mlflow", "run", ".", "--env-manager", "local"]
        table["mlflow run --env-manager local"] = [*run, "--experiment-name", "bench"], mlflow_env
        table["mlflow --help"] = [py, "-m", "mlflow", "--help"], env
        table["script: import mlflow"] = [py, "-c", "import mlflow"], env
    return table


def bench_startup(
    folder: Path, repeat: int, torchx: str | None, baseline: Path | None
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """({command: {"wall": s, "cpu": s}} medians, {phase of expkit run: s} medians).

    Every command runs in `folder`/project, which holds the scripts, the job and the MLproject
    only, as a user's project would: the benchmark's own files (bytecode cache, MLflow's
    database, the workspace, the caches) lie beside it, not in the source folder that
    `expkit run` snapshots (MLflow's database changes in every round: the snapshot would hash
    it again each time)."""
    project = folder / "project"
    project.mkdir()
    (project / "noop.py").write_text(NOOP)
    (project / "in_script.py").write_text(IN_SCRIPT)
    (project / "noop.yaml").write_text("experiment: bench\nentry_script: noop.py\n")
    (project / "MLproject").write_text(
        "name: noop\nentry_points:\n  main:\n    command: python noop.py\n"
    )
    env = {
        **os.environ,
        "EXPKIT_WORKSPACE": str(folder / ".expkit"),
        "PYTHONPYCACHEPREFIX": str(folder / "pycache"),  # bytecode cached, as when installed
        "EXPKIT_METRICS_DIR": str(folder / "channel"),  # for in_script.py, as in a run
        "EXPKIT_RUN_ID": "bench",
        "EXPKIT_CACHE_DIR": str(folder / "cache"),  # the plugin scan, stored by the warm-up
    }
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    (folder / "channel").mkdir()
    (folder / "not-a-folder").write_text("")
    subprocess.run([sys.executable, "-m", "expkit", "init", str(folder)], check=True, env=env,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    table = commands(folder, env, torchx, baseline)
    walls: dict[str, list[float]] = {name: [] for name in table}
    cpus: dict[str, list[float]] = {name: [] for name in table}
    phases: dict[str, list[float]] = {}
    phased = [sys.executable, "-c", PHASES, "run", "noop.yaml", "--quiet"]
    for round_ in range(repeat + 1):  # the first round warms the caches, and is not counted
        for name, (argv, command_env) in table.items():
            wall, cpu, _ = timed_run(argv, project, command_env)
            if round_:
                walls[name].append(wall)
                cpus[name].append(cpu)
        _, _, stderr = timed_run(phased, project, env)
        if round_:
            for phase, seconds in json.loads(stderr.strip().splitlines()[-1]).items():
                phases.setdefault(phase, []).append(seconds)
    medians = {
        name: {"wall": statistics.median(walls[name]), "cpu": statistics.median(cpus[name])}
        for name in table
    }
    return medians, {phase: statistics.median(values) for phase, values in phases.items()}


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
    lines = sum(sum(1 for _ in calls_in(path)) for path in channel.glob("*.jsonl"))
    assert lines == calls, f"the channel holds {lines} of {calls} values"
    if not importlib.util.find_spec("mlflow"):
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


def print_startup(medians: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The start-up table; returns the overheads (wall and CPU, seconds) by command."""
    bare, noop = medians["python -c pass"], medians["python noop.py"]
    zero = {"wall": 0.0, "cpu": 0.0}

    def base(name: str) -> dict[str, float]:
        """What `name` adds to: running the script (a runner, a script), else starting Python."""
        if name == "python -c pass":
            return zero
        return (
            noop if name.startswith(("expkit run", "torchx run", "mlflow run", "script")) else bare
        )

    print(f"{'command':<40} {'wall':>8} {'added':>8}   {'CPU':>7} {'added':>8}")
    added: dict[str, dict[str, float]] = {}
    for name, m in medians.items():
        under = base(name)
        added[name] = {"wall": m["wall"] - under["wall"], "cpu": m["cpu"] - under["cpu"]}
        print(
            f"{name:<40} {m['wall']:>7.3f}s {added[name]['wall']:>+7.3f}s   "
            f"{m['cpu']:>6.3f}s {added[name]['cpu']:>+7.3f}s"
        )
    print("(added: over `python noop.py` for a runner or a script, else over `python -c pass`)")
    return added


def ratios(medians: dict[str, dict[str, float]], added: dict[str, dict[str, float]]) -> dict:
    """The peers' figures over expkit's, wall time: overheads for the runners, whole commands
    for --help."""
    found: dict[str, float] = {}
    run = added["expkit run noop.yaml"]["wall"]
    for peer in ("torchx run -s local_cwd", "mlflow run --env-manager local"):
        if peer in added and run > 0:
            found[f"{peer} overhead / expkit run overhead"] = added[peer]["wall"] / run
    helps = medians["expkit --help"]["wall"]
    for peer in ("torchx --help", "mlflow --help"):
        if peer in medians:
            found[f"{peer} / expkit --help"] = medians[peer]["wall"] / helps
    if "script: import mlflow" in added and added["script: from expkit import Run"]["wall"] > 0:
        found["import mlflow / from expkit import Run"] = (
            added["script: import mlflow"]["wall"] / added["script: from expkit import Run"]["wall"]
        )
    for name in ("expkit run noop.yaml", "expkit --help"):
        before = f"{name} (baseline)"
        if before in medians:
            found[f"{name}: baseline / this checkout"] = (
                medians[before]["wall"] / medians[name]["wall"]
            )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="counted rounds (default 7)")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 200,000 log calls")
    parser.add_argument("--log-calls", type=int, default=1_000_000, help="run.log() calls timed")
    parser.add_argument("--mlflow-calls", type=int, default=300, help="mlflow.log_metric calls")
    parser.add_argument("--torchx", help="the torchx command (default: $TORCHX, else PATH)")
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    args = parser.parse_args()
    repeat, calls = (3, 200_000) if args.quick else (args.repeat, args.log_calls)
    torchx = find_torchx(args.torchx)
    import expkit

    print(f"expkit from {Path(expkit.__file__).parent}; load average {os.getloadavg()[0]:.1f}")
    if torchx is None:
        print("torchx not found (--torchx PATH, $TORCHX or PATH; `pip install torchx`): no row")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "startup").mkdir()
        medians, phases = bench_startup(Path(tmp) / "startup", repeat, torchx, args.baseline)
        logging = bench_log_calls(Path(tmp), calls, args.mlflow_calls)
    print()
    added = print_startup(medians)
    found = ratios(medians, added)
    for name, value in found.items():
        print(f"  {name}: {value:.2f}x")
    print(f"\nexpkit run noop.yaml, phase by phase (inside the command, medians of {repeat}):")
    for phase, seconds in phases.items():
        print(f"  {phase:<32} {seconds * 1000:>8.1f} ms")
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
                "load_average": round(os.getloadavg()[0], 2),
                "wall_s": {k: round(v["wall"], 4) for k, v in medians.items()},
                "cpu_s": {k: round(v["cpu"], 4) for k, v in medians.items()},
                "overhead_s": {k: round(v["wall"], 4) for k, v in added.items()},
                "overhead_cpu_s": {k: round(v["cpu"], 4) for k, v in added.items()},
                "ratios": {k: round(v, 2) for k, v in found.items()},
                "expkit_run_phases_s": {k: round(v, 4) for k, v in phases.items()},
                "log_calls_per_s": {k: round(v) for k, v in logging.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
