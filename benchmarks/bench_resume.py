"""What resuming from a checkpoint saves: the sample job killed half way, resumed vs started over.

    python benchmarks/bench_resume.py [--epochs 4] [--kill-after 2] [--threads N]

The sample job (training/job.yaml: the ResNet-18 on the digits, no ONNX export) is run twice
in one fresh workspace, each time with `retry: {max_attempts: 2, on: [{exit_codes: [137]}]}`,
and each time its script is killed with SIGKILL (no chance to save anything: a crash, a lost
node, an out-of-memory kill) once it has logged epoch `--kill-after` of `--epochs`. The job's
retry then starts attempt 2 at once:

- resumed: with `checkpoints: ./checkpoints` (as job.yaml ships), so attempt 2 starts from
  the checkpoint of the last epoch attempt 1 completed;
- started over: without `checkpoints:`, so attempt 2 trains every epoch again.

Figures per run, from the run history: the `run` stage's seconds (every attempt, each with its
start-up: what the machine was held for training), each attempt's seconds, and the epochs
trained in all. Then the ratio resumed / started over and the seconds saved. Everything runs
through the `expkit` command (`python -m expkit` of this interpreter) in a temporary folder.
Prints a table and writes the figures as JSON to stdout's last line. The two runs follow each
other: on a machine whose load changes (other jobs on its cores) their seconds are not
comparable, so run it on an otherwise idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TRAINING = REPO / "training"
KILLED = 128 + signal.SIGKILL  # how a shell (and retry.on's exit_codes) names a SIGKILL


def sample_job(epochs: int, threads: int | None, checkpoints: bool) -> dict[str, Any]:
    """training/job.yaml inline: `epochs` epochs, no ONNX export, retried once after a
    SIGKILL; with or without its checkpoint folder."""
    job = yaml.safe_load((TRAINING / "job.yaml").read_text())
    job["source_directory"] = str(TRAINING)
    job["args"] = {**job["args"], "num_epochs": epochs}
    if threads:
        job["args"]["threads"] = threads
    job.pop("exports", None)
    job["retry"] = {"max_attempts": 2, "on": [{"exit_codes": [KILLED]}], "backoff_seconds": 0}
    if not checkpoints:
        job.pop("checkpoints", None)
    elif "checkpoints" not in job:
        raise SystemExit("training/job.yaml has no `checkpoints:`; nothing to resume from")
    return job


def script_pid(run_id: str, workspace: Path) -> int | None:
    """The pid of the run's pytorch_train.py process (None when it is not running)."""
    from expkit.procs import run_processes

    for pid in run_processes(run_id, workspace):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"pytorch_train.py") for arg in argv):
            return pid
    return None


def run_killed_half_way(job: Path, workspace: Path, kill_after: int, epochs: int) -> str:
    """`expkit run JOB`, its script SIGKILLed once it printed epoch `kill_after`/`epochs`;
    waits for the run (attempt 2) to end and returns its run id. Raises with the output's
    tail when the run does not complete."""
    env = {**os.environ, "EXPKIT_WORKSPACE": str(workspace)}
    command = [sys.executable, "-u", "-m", "expkit", "run", str(job)]
    proc = subprocess.Popen(
        command, cwd=job.parent, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, errors="replace",
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    run_id, killed = None, False
    for line in proc.stdout:
        lines.append(line)
        if run_id is None and (found := re.match(r"run (\S+) in workspace ", line)):
            run_id = found.group(1)
        if not killed and run_id and line.startswith(f"epoch {kill_after}/{epochs} "):
            pid = script_pid(run_id, workspace)
            if pid is None:
                raise SystemExit(f"no pytorch_train.py process of run {run_id}")
            os.kill(pid, signal.SIGKILL)
            killed = True
    code = proc.wait()
    if code != 0 or run_id is None or not killed:
        tail = "".join(lines[-40:])
        raise SystemExit(f"{' '.join(command)} exited {code} (killed: {killed}):\n{tail}")
    return run_id


def figures_of(workspace: Path, run_id: str) -> dict[str, Any]:
    """The run's `run` stage seconds, each attempt's seconds and outcome, and the epochs its
    script completed in all attempts (the "epoch k/N" lines of its log: without checkpoints
    the script does not flush its metrics each epoch, so a SIGKILL may take the last ones)."""
    from expkit.workspace import Workspace

    ws = Workspace(workspace)
    history = ws.history
    stages = {stage.stage: stage for stage in history.stages.of(run_id)}
    attempts = history.attempts.of(run_id)
    log = (ws.run_dir(run_id) / "logs" / "rank-0.log").read_text(errors="replace")
    epochs = len(re.findall(r"^epoch \d+/\d+ ", log, re.M))
    return {
        "run_s": stages["run"].seconds or 0.0,
        "attempts": [
            {
                "seconds": (a.ended or a.started) - a.started,
                "outcome": a.outcome,
                "exit_code": a.exit_code,
            }
            for a in attempts
        ],
        "epochs_trained": epochs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the job (default 4)")
    parser.add_argument(
        "--kill-after", type=int, default=None, help="the epoch after which the script is "
        "killed (default: half the epochs)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the script")
    args = parser.parse_args()
    kill_after = args.kill_after or args.epochs // 2
    if not 1 <= kill_after < args.epochs:
        parser.error(f"--kill-after must be from 1 to {args.epochs - 1}")

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        workspace = folder / ".expkit"
        env = {**os.environ, "EXPKIT_WORKSPACE": str(workspace)}
        subprocess.run(
            [sys.executable, "-m", "expkit", "init", str(folder)],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        for name, checkpoints in (("resumed", True), ("started over", False)):
            job = folder / f"job-{name.replace(' ', '-')}.yaml"
            job.write_text(yaml.safe_dump(sample_job(args.epochs, args.threads, checkpoints)))
            started = time.perf_counter()
            run_id = run_killed_half_way(job, workspace, kill_after, args.epochs)
            results[name] = {
                "run_id": run_id,
                "wall_s": time.perf_counter() - started,
                **figures_of(workspace, run_id),
            }

    resumed, over = results["resumed"], results["started over"]
    ratio = resumed["run_s"] / over["run_s"]
    print(
        f"the sample job, {args.epochs} epochs, its script killed (SIGKILL) after epoch "
        f"{kill_after}, then attempt 2"
    )
    print(f"{'attempt 2':<14} {'run stage':>10} {'attempt 1':>10} {'attempt 2':>10} {'epochs':>7}")
    for name, row in results.items():
        first, second = (a["seconds"] for a in row["attempts"])
        print(
            f"{name:<14} {row['run_s']:>9.1f}s {first:>9.1f}s {second:>9.1f}s "
            f"{row['epochs_trained']:>7}"
        )
    print(
        f"resumed / started over: {ratio:.2f} of the training time; "
        f"{over['run_s'] - resumed['run_s']:.1f} s saved "
        f"({1 - ratio:.0%}; the epochs alone: {kill_after} of {args.epochs + kill_after} "
        f"= {kill_after / (args.epochs + kill_after):.0%})"
    )
    figures = {
        "epochs": args.epochs,
        "kill_after": kill_after,
        "run_s": {name: round(row["run_s"], 1) for name, row in results.items()},
        "attempt_s": {
            name: [round(a["seconds"], 1) for a in row["attempts"]] for name, row in results.items()
        },
        "epochs_trained": {name: row["epochs_trained"] for name, row in results.items()},
        "ratio": round(ratio, 3),
        "saved_s": round(over["run_s"] - resumed["run_s"], 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
