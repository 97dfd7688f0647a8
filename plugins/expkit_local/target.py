"""The `local` compute target: processes on this machine, with leased slots and GPUs.

A GPU lease is an index into the GPUs the caller may use: with CUDA_VISIBLE_DEVICES set
(indices or UUIDs) lease N is its Nth entry, so a run never sees a GPU the caller hid.

Slots and GPUs are leased through the run's `leases` service (see expkit.leases), so
concurrent `expkit run`s on one machine never oversubscribe it: a run that does not fit waits
in state `queued`.
"""

from __future__ import annotations

import glob
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
    runner,
)

POLL_SECONDS = 0.5
RECOVER_SECONDS = 2.0  # how often a waiting run checks that the holders' drivers are alive
# Bounds of compute.options: slots are leased one row each, so a bound keeps a typo
# (slots: 100000000) from filling the memory; more GPUs than any machine has is a typo too.
MAX_SLOTS = 4096
MAX_GPUS = 256


def detect_gpus() -> int:
    """GPUs this machine can give to runs: CUDA_VISIBLE_DEVICES if set, else /dev/nvidiaN."""
    visible = caller_gpus()
    if visible is not None:
        return len(visible)
    return len(glob.glob("/dev/nvidia[0-9]*"))


def caller_gpus() -> list[str] | None:
    """The GPUs the caller's CUDA_VISIBLE_DEVICES names (indices or UUIDs, in its order),
    up to the first "-1" (CUDA ignores what follows); None when it is not set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    names = []
    for name in (part.strip() for part in visible.split(",")):
        if not name:
            continue
        if name == "-1":
            break
        names.append(name)
    return names


def visible_devices(leased: list[int], caller: list[str] | None) -> str:
    """CUDA_VISIBLE_DEVICES for the leased GPU indices: positions in the caller's own
    CUDA_VISIBLE_DEVICES when it names GPUs (with `2,3`, lease 0 is GPU `2`), else the
    indices themselves. A lease beyond the caller's list (compute.options.gpus declares
    more GPUs than it names) is refused by `check`."""
    if not caller:
        return ",".join(map(str, leased))
    return ",".join(caller[index] for index in leased)


class LocalTarget(ComputeTarget):
    name = "local"
    description = "processes on this machine"
    takes = declare_options(
        slots=Option(
            int,
            minimum=1,
            maximum=MAX_SLOTS,
            help="process slots the runs on this machine share (default: its CPU count)",
        ),
        gpus=Option(
            int,
            minimum=0,
            maximum=MAX_GPUS,
            help="GPUs the runs on this machine share (default: those CUDA_VISIBLE_DEVICES "
            "names, else every /dev/nvidiaN)",
        ),
    )

    def capacity(self, options: dict) -> tuple[int, int]:
        """The slots and GPUs runs may lease here: the options, else this machine's."""
        slots = options.get("slots") or os.cpu_count() or 1
        gpus = options.get("gpus")
        return slots, detect_gpus() if gpus is None else gpus

    def check(self, job: JobSpec) -> None:
        res = job.resources
        if res.nodes != 1:
            raise UserError(
                f"resources.nodes: the local target runs on this machine only (nodes: 1), "
                f"not {res.nodes}; use a cluster compute target for more nodes"
            )
        slots, gpus = self.capacity(job.compute.options)
        if res.processes_per_node > slots:
            raise UserError(
                f"resources.processes_per_node: {res.processes_per_node} processes do not fit "
                f"this machine's {slots} slots (set compute.options.slots to allow more)"
            )
        caller = caller_gpus()
        if caller and gpus > len(caller):
            raise UserError(
                f"compute.options.gpus: {gpus} GPUs, but CUDA_VISIBLE_DEVICES names "
                f"{len(caller)} ({','.join(caller)}); declare at most {len(caller)}, or unset "
                "CUDA_VISIBLE_DEVICES"
            )
        if res.gpus_per_node > gpus:
            raise UserError(
                f"resources.gpus_per_node: the job asks for {res.gpus_per_node} GPUs and this "
                f"machine has {gpus}"
            )

    def acquire(self, ctx: RunContext) -> Allocation:
        res = ctx.job.resources
        slots, gpus = self.capacity(ctx.job.compute.options)
        wants = {"process": (res.processes_per_node, slots), "gpu": (res.gpus_per_node, gpus)}
        leases = ctx.leases
        if leases is None:
            raise RuntimeError("the local target needs the run's leases (RunContext.leases)")
        said, checked = None, time.monotonic()
        while True:
            leased = leases.take(wants)
            if leased is not None:
                break
            if time.monotonic() - checked >= RECOVER_SECONDS:  # a holder's driver may be dead
                checked = time.monotonic()
                if leases.recover():
                    continue
            holders = leases.holders("process", "gpu")
            text = (
                f"waiting for {res.processes_per_node} process slot(s) and {res.gpus_per_node} "
                f"GPU(s); held by {', '.join(sorted(holders)) or 'nobody'}"
            )
            if text != said:
                ctx.waiting(text)
                said = text
            if ctx.canceled():
                raise Canceled()
            time.sleep(POLL_SECONDS)
        if said:
            ctx.waiting(None)
        gpu_text = f", GPUs {leased['gpu']}" if leased["gpu"] else ""
        return Allocation(
            hosts=["localhost"],
            slots=leased["process"],
            gpus=leased["gpu"],
            description=f"slots {leased['process']} of {slots}{gpu_text}",
        )

    def execute(self, ctx: RunContext, processes: list[Process], allocation: Allocation) -> int:
        """Run the processes here on the leased GPUs (`expkit.runner`): the job's timeout
        raises Interrupted("time_limit", ...), and it and a cancel or requeue stop them as
        planned (the stop signal of the job's `checkpoints:` and its grace, then SIGTERM)."""
        gpus = visible_devices(allocation.gpus, caller_gpus())
        return runner.run(ctx, processes, {**os.environ, "CUDA_VISIBLE_DEVICES": gpus})

    def release(self, ctx: RunContext, allocation: Allocation) -> None:
        if ctx.leases is not None:
            ctx.leases.release()
