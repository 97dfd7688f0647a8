"""The `none` distributed backend: the job runs as one process."""

from __future__ import annotations

from expkit.capabilities import (
    Allocation,
    DistributedBackend,
    Process,
    RunContext,
    declare_options,
)
from expkit.errors import UserError
from expkit.job import JobSpec


class SingleProcess(DistributedBackend):
    name = "none"
    description = "one process, no distribution"
    takes = declare_options()

    def check(self, job: JobSpec) -> None:
        processes = job.resources.processes
        if processes != 1:
            raise UserError(
                f"distributed: none runs one process, but resources ask for {processes}; "
                "set `distributed: horovod` or `distributed: torchrun`"
            )

    def launch(self, ctx: RunContext, command: list[str], allocation: Allocation) -> list[Process]:
        return [Process(argv=command, rank=0)]
