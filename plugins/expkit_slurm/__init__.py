"""Built-in plugin: the `slurm` compute target (`compute: {target: slurm}`).

Submits the job to a Slurm cluster with `sbatch` from the machine expkit runs on (a login
node), shows Slurm's pending reason while it waits, streams every rank's output from the run's
folder (on a file system the nodes share) and ends the run as Slurm says the job ended. Only
Slurm's own commands are used (sbatch, squeue, scontrol, sacct, scancel): nothing to install on
the nodes but the job's environment.
"""

from __future__ import annotations

from expkit.plugin import ComputeTarget, hookimpl
from expkit_slurm.target import SlurmTarget


@hookimpl
def expkit_compute_targets() -> list[ComputeTarget]:
    return [SlurmTarget()]
