"""The `horovod` distributed backend: `horovodrun` starts nodes × processes_per_node ranks.

    distributed:
      backend: horovod
      options:
        controller: gloo   # how horovodrun starts and connects the ranks: gloo (the default)
                           # or mpi (needs `mpirun` on PATH and a horovod built with MPI)
        args: []           # more horovodrun flags, e.g. [--timeline-filename, timeline.json]

The collective operations (Gloo on CPU, NCCL on GPU) are chosen when horovod is built, not
here; `.ci/build-horovod` builds Gloo only. Each host of the allocation offers
processes_per_node slots (`-H localhost:2` on the local target).

horovodrun prints every rank's lines as `[1]<stdout>:text` or `[1]<stderr>:text` (with
`--output-filename` too, which only copies them into files), and its own lines bare, e.g.
`Process 1 exit with status code 3.` and, when a rank failed, a traceback that ends with
`Process name: 1` / `Exit code: 3`: the first rank to fail. `split_output` sends each rank's
lines, unprefixed, to logs/rank-N.log and the rest to logs/launcher.log, where `failed_rank`
reads which rank failed and how.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from pathlib import Path

from expkit.plugin import (
    Allocation,
    DistributedBackend,
    JobSpec,
    Option,
    Process,
    RankPieces,
    RunContext,
    UserError,
    declare_options,
)

CONTROLLERS = ("gloo", "mpi")
# horovodrun prefixes each piece of a rank's output that ends in a newline or in "\r" (progress
# bars), and the threads forwarding each rank's stdout and stderr write in turn with the
# others': one launcher line can hold pieces of several ranks, each after a "\r" (RankPieces).
RANK_PIECE = re.compile(rb"(?:^|(?<=\r))\[(\d+)\]<std(?:out|err)>:")
# horovodrun's summary of the first rank to fail, else each failed rank's own line.
FIRST_FAILED = re.compile(r"^Process name: (\d+)\nExit code: (\d+)$", re.M)
EXITED = re.compile(r"^Process (\d+) exit with status code (\d+)\.$", re.M)


def find_horovodrun(python: str) -> str | None:
    """horovodrun next to the job's python, else next to expkit's own, else on PATH."""
    for folder in (Path(python).parent, Path(sys.executable).parent):
        candidate = folder / "horovodrun"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("horovodrun")


class HorovodBackend(DistributedBackend):
    name = "horovod"
    description = "horovodrun: Gloo (or MPI) controller, one rank per slot"
    takes = declare_options(
        controller=Option(
            str,
            choices=CONTROLLERS,
            default="gloo",
            help="how the ranks meet: gloo, or mpi (needs mpirun on PATH)",
        ),
        args=Option(
            list,
            items=str,
            max_length=256,
            text="a list of horovodrun flags",
            default=[],
            help="more horovodrun flags, e.g. [--timeline-filename, timeline.json]",
        ),
    )

    def check(self, job: JobSpec) -> None:
        options, res = job.distributed.options, job.resources
        if options["controller"] == "mpi" and shutil.which("mpirun") is None:
            raise UserError(
                "distributed.options.controller: mpi needs `mpirun` on PATH, and this machine "
                "has none; leave the option out to use gloo"
            )
        if 0 < res.gpus_per_node < res.processes_per_node:
            raise UserError(
                f"resources.gpus_per_node: each of the {res.processes_per_node} processes per "
                f"node needs its own GPU, but the job asks for {res.gpus_per_node}"
            )
        if find_horovodrun(sys.executable) is None:
            raise UserError("distributed: horovod is installed but `horovodrun` is not found")

    def launch(self, ctx: RunContext, command: list[str], allocation: Allocation) -> list[Process]:
        """One horovodrun process; it starts, watches and stops the ranks."""
        options, res = ctx.job.distributed.options, ctx.job.resources
        horovodrun = find_horovodrun(command[0])
        if horovodrun is None:
            raise UserError("distributed: `horovodrun` is not found next to the job's python")
        hosts = ",".join(f"{host}:{res.processes_per_node}" for host in allocation.hosts)
        argv = [
            horovodrun,
            *("-np", str(res.processes), "-H", hosts),
            f"--{options['controller']}",
            *options["args"],
            *command,
        ]
        # As torchrun does: one thread per rank unless told otherwise, so that ranks sharing a
        # machine's cores do not each start a thread per core (5x slower on 2 cores).
        env = (
            {}
            if "OMP_NUM_THREADS" in os.environ or res.processes_per_node == 1
            else {"OMP_NUM_THREADS": "1"}
        )
        return [Process(argv=argv, env=env, rank=0, split_output=RankPieces(RANK_PIECE))]

    def _first_failure(self, ctx: RunContext) -> tuple[int, int] | None:
        log = ctx.log_dir / "launcher.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        match = FIRST_FAILED.search(text) or EXITED.search(text)
        return (int(match[1]), int(match[2])) if match else None

    def failed_rank(self, ctx: RunContext) -> int | None:
        failure = self._first_failure(ctx)
        return failure[0] if failure else None

    def failed_exit_code(self, ctx: RunContext) -> int | None:
        """The rank's own code: horovodrun itself exits 1, and reports a signal N as 128 + N."""
        failure = self._first_failure(ctx)
        if failure is None:
            return None
        code = failure[1]
        return 128 - code if 128 < code < 128 + signal.NSIG else code
