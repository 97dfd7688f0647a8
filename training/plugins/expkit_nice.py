"""A compute target like `local` whose processes run niced and pinned to CPUs: a whole plugin.

Copy it to write a target that runs processes on this machine: `runner.run` keeps every
obligation of `ComputeTarget.execute` (logs, exit codes, timeout, cancel, nothing left
behind), so the target is only what differs: `wrap` puts `nice -n N` before each command,
`preexec` pins the child to the CPUs. Slots are leased as `local` leases them; no GPUs.

    [project.entry-points.expkit]                   # your distribution's metadata
    nice = "expkit_nice"
"""

from __future__ import annotations

import os
import time

from expkit.plugin import (
    Allocation,
    Canceled,
    ComputeTarget,
    JobSpec,
    Option,
    Process,
    RunContext,
    UserError,
    declare_options,
    hookimpl,
    runner,
)


class NiceTarget(ComputeTarget):
    name = "nice"
    description = "processes on this machine, niced and pinned to CPUs"
    takes = declare_options(
        niceness=Option(int, minimum=0, maximum=19, default=10, help="added to the nice value"),
        cpus=Option(list, items=int, help="the CPUs the processes run on (default: all)"),
    )

    def check(self, job: JobSpec) -> None:
        usable = os.sched_getaffinity(0)
        if not set(job.compute.options.get("cpus", [])) <= usable:
            raise UserError(f"compute.options.cpus: this machine has CPUs {sorted(usable)}")
        if job.resources.nodes != 1 or job.resources.gpus_per_node:
            raise UserError("resources: the nice target runs on this machine, without GPUs")

    def acquire(self, ctx: RunContext) -> Allocation:
        assert ctx.leases is not None, "the nice target needs the run's leases"
        wants = {"process": (ctx.job.resources.processes, os.cpu_count() or 1)}
        while (leased := ctx.leases.take(wants)) is None:
            ctx.waiting(f"waiting for {ctx.job.resources.processes} process slot(s)")
            if ctx.canceled():
                raise Canceled()
            time.sleep(0.5)
        ctx.waiting(None)
        return Allocation(["localhost"], leased["process"], description=f"{leased['process']}")

    def execute(self, ctx: RunContext, processes: list[Process], allocation: Allocation) -> int:
        options = ctx.job.compute.options
        niceness = options.get("niceness", 10)
        cpus = set(options.get("cpus") or os.sched_getaffinity(0))

        def wrap(process: Process) -> list[str]:
            return ["nice", "-n", str(niceness), *process.argv]

        def preexec() -> None:  # in the child, before exec: system calls only
            os.sched_setaffinity(0, cpus)

        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        return runner.run(ctx, processes, env, wrap=wrap, preexec=preexec)

    def release(self, ctx: RunContext, allocation: Allocation) -> None:
        if ctx.leases is not None:
            ctx.leases.release()


@hookimpl
def expkit_compute_targets() -> list[ComputeTarget]:
    return [NiceTarget()]
