"""Distributed benchmarks of the sample job, each measured side by side with its peer in one run.

    python benchmarks/bench_distributed.py [--repeat 3] [--epochs 1] [--seed 0]

Run it with the interpreter that has expkit, torch and horovod (the dev venv); horovodrun and
torchrun are taken from that interpreter's folder. The digits are built once, beforehand, by
training/prepare_digits.py, and every launch below reads that one folder, so no side pays for
data preparation; the script runs from a copy of training/.

1. Launch overhead: wall seconds of the same 2-rank job (pytorch_train.py on the digits,
   `--num_epochs EPOCHS --seed SEED`) started by
     - expkit: `python -m expkit run JOB --quiet` in a temporary workspace, `processes_per_node:
       2`, `distributed: horovod` and then `torchrun`. The job spec (in a temporary folder) takes
       the prepared digits as `data.digits.source` (linked into the run) and has `environment:
       inherit`, so no virtual environment is built or looked up; it registers the model as
       the sample job does, so snapshot, leases, metric capture, output hashing and
       registration are all in the figure;
     - the bare command a user would type in the copy of training/:
       `horovodrun --gloo -np 2 -H localhost:2 python pytorch_train.py ...` with
       OMP_NUM_THREADS=1 (what expkit's horovod backend sets), and
       `torchrun --standalone --nproc_per_node 2 pytorch_train.py ...`.
   Target: expkit adds under 5 % to the bare command's wall time.
2. Training throughput (images per second, the script's `images_per_sec` metric, averaged over
   the epochs of a run) of the sample job through expkit with 1 rank (`distributed: none`) and
   with 2 ranks under Horovod and under torchrun (the 2-rank figures come from the expkit runs
   of part 1). The bare commands' throughput, read from their epoch lines, is shown next to
   them: launching through expkit should not change it (no target; expected equal within noise).

Every command is run once to warm the caches, then REPEAT times; within each round the bare
and the expkit side alternate which goes first, so that machine noise is spread over both.
Figures are medians; the overhead table also shows the best of the rounds, which is less
sensitive to other load on the machine. Each 2-rank launch is ~16-20 s of mostly training, so
other processes on the machine move single runs by several seconds: read the per-run figures
(on stderr, and in the JSON) and the load average printed at the end before trusting a
percentage. The default (3 rounds of 5 launches plus 5 warm-up launches, 1 epoch) takes about
7.5 minutes on 2 CPU cores (10 when the machine is busy), which is why it repeats 3 times.
Prints a table and writes the figures as JSON to stdout's last line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TRAINING = Path(__file__).resolve().parent.parent / "training"
BIN = Path(sys.executable).parent  # the venv's bin: horovodrun, torchrun, python
EPOCH_LINE = re.compile(r"epoch \d+/\d+ .*\((\d+(?:\.\d+)?) images/s\)")
RUN_LINE = re.compile(r"^run (\S+): completed$", re.M)

JOB = """\
# Written by benchmarks/bench_distributed.py: training/job-{backend}.yaml with the data
# prepared beforehand and this interpreter as the environment.
experiment: bench-distributed
source_directory: {source}
entry_script: pytorch_train.py
args:
  num_epochs: {epochs}
  seed: {seed}
  output_dir: ./outputs
  data_dir: ${{data.digits}}
environment: inherit           # no virtual environment built or looked up
compute: local
resources: {{nodes: 1, processes_per_node: {processes}, gpus_per_node: 0}}
distributed: {backend}
data:
  digits:
    source: {data}             # prepared once by prepare_digits.py, linked into the run
model:
  name: bench-dnn
  path: outputs/
timeout: 1800
"""


@dataclass
class Case:
    """One command to time: its argv, environment and where it runs."""

    name: str
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    workspace: Path | None = None  # expkit's: where the run's metrics are read back
    walls: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)

    def run(self, record: bool = True) -> None:
        start = time.perf_counter()
        done = subprocess.run(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(
                f"error: {self.name} exited {done.returncode}:\n{done.stdout[-3000:]}"
                f"\ncommand: {' '.join(self.argv)}"
            )
        rate = self.images_per_sec(done.stdout)
        if record:
            self.walls.append(seconds)
            self.rates.append(rate)
        warm = "" if record else " (warm)"
        print(
            f"  {self.name:<34} {seconds:7.2f}s {rate:7.1f} images/s{warm}",
            file=sys.stderr,
            flush=True,
        )

    def images_per_sec(self, output: str) -> float:
        """Mean images/s over the run's epochs: expkit's recorded metric, else the epoch lines."""
        if self.workspace is None:
            values = [float(v) for v in EPOCH_LINE.findall(output)]
        else:
            from expkit.workspace import Workspace

            match = RUN_LINE.search(output)
            if match is None:
                sys.exit(f"error: {self.name}: no `run ID: completed` line in:\n{output[-3000:]}")
            history = Workspace(self.workspace).history
            try:
                values = [row["value"] for row in history.metrics.of(match[1], "images_per_sec")]
            finally:
                history.close()
        if not values:
            sys.exit(f"error: {self.name}: no images/s figure in its output:\n{output[-3000:]}")
        return statistics.fmean(values)


def prepare(folder: Path, epochs: int, seed: int) -> tuple[dict[str, tuple[Case, Case]], Case]:
    """The copy of training/, the digits, the workspace and job specs; the cases to time."""
    source, data, jobs = folder / "training", folder / "digits", folder / "jobs"
    shutil.copytree(TRAINING, source, ignore=shutil.ignore_patterns("data", "outputs", "logs"))
    jobs.mkdir()
    subprocess.run(
        [sys.executable, "prepare_digits.py", "--out", str(data)],
        cwd=source,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        [sys.executable, "-m", "expkit", "init", str(folder)], check=True, stdout=subprocess.DEVNULL
    )
    workspace = folder / ".expkit"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` is this one
        "EXPKIT_WORKSPACE": str(workspace),
    }
    # Outside the source folder, so that expkit's snapshot of it never holds a model.
    script = [
        "pytorch_train.py",
        *("--data_dir", str(data)),
        *("--num_epochs", str(epochs)),
        *("--seed", str(seed)),
        *("--output_dir", str(folder / "bare-outputs")),
    ]
    bare = {
        "horovod": Case(
            "horovodrun --gloo -np 2",
            [str(BIN / "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2", "python", *script],
            source,
            # What expkit's horovod backend does: one thread per rank unless told otherwise.
            {"OMP_NUM_THREADS": "1", **env},
        ),
        "torchrun": Case(
            "torchrun --standalone --nproc 2",
            [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *script],
            source,
            env,  # torchrun sets OMP_NUM_THREADS=1 itself when it starts several ranks
        ),
    }

    def expkit_case(backend: str, processes: int) -> Case:
        job = jobs / f"job-{backend}.yaml"
        job.write_text(
            JOB.format(
                backend=backend,
                processes=processes,
                source=source,
                data=data,
                epochs=epochs,
                seed=seed,
            )
        )
        argv = [sys.executable, "-m", "expkit", "run", str(job), "--quiet"]
        ranks = f"{processes} rank" + ("s" if processes > 1 else "")
        return Case(f"expkit run ({backend}, {ranks})", argv, jobs, env, workspace)

    pairs = {backend: (bare[backend], expkit_case(backend, 2)) for backend in bare}
    return pairs, expkit_case("none", 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="the script's --seed (default 0)")
    args = parser.parse_args()
    for tool in ("horovodrun", "torchrun"):
        if not (BIN / tool).is_file():
            sys.exit(f"error: no {tool} next to {sys.executable}; run this with the dev venv")

    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        pairs, single = prepare(Path(tmp), args.epochs, args.seed)
        everything = [case for pair in pairs.values() for case in pair] + [single]
        print("warming every command once", file=sys.stderr)
        for case in everything:
            case.run(record=False)
        for round_ in range(args.repeat):
            print(f"round {round_ + 1} of {args.repeat}", file=sys.stderr)
            for bare, expkit in pairs.values():
                for case in (bare, expkit) if round_ % 2 == 0 else (expkit, bare):
                    case.run()
            single.run()
    total = time.perf_counter() - started
    load_after = os.getloadavg()

    med = statistics.median
    print(
        f"\nlaunch overhead: 2 ranks, {args.epochs} epoch(s), median of {args.repeat} "
        "(target: expkit under +5 %)"
    )
    print(
        f"{'backend':<10} {'bare command':>13} {'expkit run':>11} {'added':>8} {'added %':>8}"
        f"   {'best of: bare':>13} {'expkit':>7} {'added %':>8}"
    )
    overhead = {}
    for backend, (bare, expkit) in pairs.items():
        b, e = med(bare.walls), med(expkit.walls)
        bmin, emin = min(bare.walls), min(expkit.walls)
        overhead[backend] = {
            "bare_s": round(b, 3),
            "expkit_s": round(e, 3),
            "added_s": round(e - b, 3),
            "added_pct": round(100 * (e - b) / b, 2),
            "best_added_pct": round(100 * (emin - bmin) / bmin, 2),
            "bare_runs_s": [round(w, 3) for w in bare.walls],
            "expkit_runs_s": [round(w, 3) for w in expkit.walls],
        }
        print(
            f"{backend:<10} {b:>12.2f}s {e:>10.2f}s {e - b:>+7.2f}s {100 * (e - b) / b:>+7.1f}%"
            f"   {bmin:>12.2f}s {emin:>6.2f}s {100 * (emin - bmin) / bmin:>+7.1f}%"
        )

    print(f"\ntraining throughput: images/s, median of {args.repeat}")
    print(f"{'ranks':<22} {'expkit run':>11} {'bare command':>13}")
    throughput = {
        "none (1 rank)": {
            "expkit": round(med(single.rates), 1),
            "expkit_runs": [round(r, 1) for r in single.rates],
        }
    }
    print(f"{'none (1 rank)':<22} {med(single.rates):>11.1f} {'-':>13}")
    for backend, (bare, expkit) in pairs.items():
        label = f"{backend} (2 ranks)"
        throughput[label] = {
            "expkit": round(med(expkit.rates), 1),
            "bare": round(med(bare.rates), 1),
            "expkit_runs": [round(r, 1) for r in expkit.rates],
            "bare_runs": [round(r, 1) for r in bare.rates],
        }
        print(f"{label:<22} {med(expkit.rates):>11.1f} {med(bare.rates):>13.1f}")
    print(
        f"\n{len(everything) * (args.repeat + 1)} launches in {total:.0f}s; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after, on {os.cpu_count()} CPUs"
    )
    print(
        json.dumps(
            {
                "repeat": args.repeat,
                "epochs": args.epochs,
                "launch_overhead": overhead,
                "images_per_sec": throughput,
                "total_s": round(total, 1),
                "loadavg_1min": [round(load_before[0], 2), round(load_after[0], 2)],
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
