"""The `none` distributed backend: the job runs as one process."""

from __future__ import annotations

from expkit.plugin import (
    Allocation,
    DistributedBackend,
    JobSpec,
    Process,
    RunContext,
    UserError,
    declare_options,
)


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
