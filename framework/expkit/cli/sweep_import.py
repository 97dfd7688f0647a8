"""`expkit import FROM REF` of a sweep (Azure ML's HyperDriveConfig): the sweep spec and its
trial's job spec, checked as `expkit sweep` would check them, then written.

    expkit import azureml hyperdrive.py -o sweep.yaml   # sweep.yaml (job: sweep-job.yaml) and
                                                         # sweep-job.yaml, the trial's job
    expkit import azureml hyperdrive.py                 # prints the sweep spec, the job inline

An importer returns a sweep as the dict a sweep.yaml holds with its job inline (`job:` a job
spec's dict, and `search_space`); anything else it returns is a job spec (cli/run.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def is_sweep(raw: dict[str, Any]) -> bool:
    """Whether an importer's answer is a sweep spec (its trial's job inline) and not a job."""
    return isinstance(raw.get("job"), dict) and "search_space" in raw


def job_file(output: Path) -> Path:
    """Where the trial's job spec goes beside sweep spec `output`: sweep.yaml -> sweep-job.yaml."""
    return output.with_name(f"{output.stem}-job{output.suffix or '.yaml'}")


def write_sweep(args: argparse.Namespace, raw: dict[str, Any]) -> int:
    """Apply `--set` to the sweep spec `raw` (`job.args.num_epochs=2`, `limits.max_total_trials=4`),
    check it with SweepSpec.from_dict (a JobSpecError, exit 2, before anything is written), then
    print it (-o not given; the job inline) or write it to -o and its trial's job spec beside
    it, and say how to run it."""
    import yaml

    from expkit.job import apply_override
    from expkit.sweeps.spec import SweepSpec

    for item in args.overrides:
        apply_override(raw, item)
    output = Path(args.output) if args.output else None
    base = (output.parent if output else Path.cwd()).resolve()
    SweepSpec.from_dict(raw, source=args.ref, base_dir=base)  # checked before anything is written
    header = f"# imported from {args.ref} by `expkit import {args.source}`\n"
    if output is None:
        print(header + yaml.safe_dump(raw, sort_keys=False), end="")
        return 0
    job = dict(raw["job"])
    folder = job.get("source_directory")
    if folder and Path(folder).is_absolute():  # the job file moves with its code
        job["source_directory"] = os.path.relpath(folder, base)
    trial = job_file(output)
    sweep = {"job": trial.name, **{k: v for k, v in raw.items() if k != "job"}}
    trial.write_text(
        header + f"# the job each trial of {output.name} runs, its args overridden by the "
        "sampled values\n" + yaml.safe_dump(job, sort_keys=False),
        encoding="utf-8",
    )
    output.write_text(header + yaml.safe_dump(sweep, sort_keys=False), encoding="utf-8")
    print(
        f"wrote {output} (the sweep) and {trial} (its trial's job); run it with: "
        f"expkit sweep {output}",
        file=sys.stderr,
    )
    return 0
