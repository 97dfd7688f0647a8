"""The `torchrun` distributed backend: one `python -m torch.distributed.run` per node.

On one node the launch uses torchrun's standalone rendezvous; on several nodes a c10d
rendezvous at `distributed.options.rdzv_endpoint`. The job spec's options:

    distributed:
      backend: torchrun
      options:
        rdzv_endpoint: node0:29400  # host:port of the rendezvous (required for nodes > 1)
        node_rank: 0                # this node's rank among resources.nodes (default 0)
    retry:
      in_place: 2                   # torchrun's --max-restarts: all ranks restarted after a
                                    # failure, within the attempt (default 0)

torchrun copies every rank's output into its own, each line prefixed with the rank; `RankLines`
takes the prefix off again, so each rank's lines land in `logs/rank-N.log` and torchrun's own
in `launcher.log`, where `failed_rank` finds torchrun's error summary. The script picks gloo
or nccl itself; EXPKIT_DIST_BACKEND tells it which one suits the GPUs the run was given.
"""

from __future__ import annotations

import re

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

# torchrun prefixes each tee'd chunk with this (`${rank}` is the global rank). It must be
# something no script prints: torch's own C++ warnings already start with "[rank0]:".
PREFIX_TEMPLATE = "[expkit-rank-${rank}]:"
# torchrun tails each rank's output file and prefixes every chunk it reads, not every line:
# `[expkit-rank-1]:loss [expkit-rank-0]:ok\n` ... `[expkit-rank-1]:0.3\n` (RankPieces).
PREFIX = re.compile(rb"\[expkit-rank-(\d+)\]:")
# torchrun tails a rank's stdout and stderr files separately, so lines of the two can swap
# (a traceback before the line printed just ahead of it); a rank started as `sh -c 'exec
# python -u script ... 2>&1'` writes both to one stream, in order.
MERGED_OUTPUT = ["--no-python", "sh", "-c", 'exec "$0" "$@" 2>&1']
# Seconds torchrun waits for the other ranks to exit after SIGTERM before it kills them:
# below expkit's 10 s bound on stopping a failed run (torchrun's default is 30).
SHUTDOWN_TIMEOUT = 5


class Torchrun(DistributedBackend):
    name = "torchrun"
    description = "python -m torch.distributed.run: gloo on CPU, nccl on GPU"
    restarts_in_place = True  # retry.in_place becomes torchrun's --max-restarts
    takes = declare_options(
        rdzv_endpoint=Option(
            str,
            pattern=r"[^\s:]+:\d{1,5}",
            text="host:port, e.g. node0:29400",
            help="the rendezvous every node reaches, needed for more than one node "
            "(default: a standalone one on this machine)",
        ),
        node_rank=Option(
            int,
            minimum=0,
            text="a whole number from 0 to resources.nodes - 1",
            default=0,
            help="which node this one is, from 0 to resources.nodes - 1",
        ),
    )

    def check(self, job: JobSpec) -> None:
        options, res = job.distributed.options, job.resources
        node_rank = options["node_rank"]
        if node_rank >= res.nodes:
            raise UserError(
                f"distributed.options.node_rank: must be a whole number from 0 to "
                f"{res.nodes - 1} (resources.nodes is {res.nodes}), not {node_rank!r}"
            )
        endpoint = options.get("rdzv_endpoint")
        if endpoint is None and res.nodes > 1:
            raise UserError(
                f"distributed.options.rdzv_endpoint: {res.nodes} nodes need a rendezvous "
                "endpoint every node can reach, e.g. `rdzv_endpoint: node0:29400`"
            )
        if 0 < res.gpus_per_node < res.processes_per_node:
            raise UserError(
                f"resources.gpus_per_node: each of the {res.processes_per_node} processes per "
                f"node needs its own GPU, but the job asks for {res.gpus_per_node}"
            )

    def launch(self, ctx: RunContext, command: list[str], allocation: Allocation) -> list[Process]:
        """torchrun starts the ranks; the interpreter that runs it is the job's environment's."""
        options, res = ctx.job.distributed.options, ctx.job.resources
        python, script_and_args = command[0], command[1:]
        argv = [python, "-m", "torch.distributed.run"]
        if res.nodes == 1 and "rdzv_endpoint" not in options:
            argv += ["--standalone"]
        else:
            argv += [
                "--rdzv_backend", "c10d",
                "--rdzv_endpoint", str(options["rdzv_endpoint"]),
                "--rdzv_id", ctx.run_id,  # the nodes of one run meet under its id
                "--node_rank", str(options["node_rank"]),
            ]  # fmt: skip
        argv += [
            "--nnodes", str(res.nodes),
            "--nproc_per_node", str(res.processes_per_node),
            # the job's retry.in_place: torchrun restarts every rank after a failure, this
            # often, within the attempt (the script resumes from its checkpoint); 0: a
            # failed rank fails the attempt, and retry.max_attempts decides what follows
            "--max_restarts", str(ctx.job.retry.in_place),
            "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
            "--tee", "3",  # both streams of every rank, prefixed ...
            "--log-line-prefix-template", PREFIX_TEMPLATE,  # ... with the global rank
        ]  # fmt: skip
        argv += [*MERGED_OUTPUT, python, "-u", *script_and_args]  # -u: what torchrun adds
        # Each local rank uses GPU LOCAL_RANK of the leased CUDA_VISIBLE_DEVICES.
        env = {"EXPKIT_DIST_BACKEND": "nccl" if allocation.gpus else "gloo"}
        return [Process(argv, env=env, rank=0, split_output=RankPieces(PREFIX))]

    def failed_rank(self, ctx: RunContext) -> int | None:
        """The rank of torchrun's "Root Cause (first observed failure)" in launcher.log."""
        match = re.match(r"\d+", _root_cause(ctx).get("rank", ""))
        return int(match.group()) if match else None

    def failed_exit_code(self, ctx: RunContext) -> int | None:
        """That rank's own exit code (negative: its signal); torchrun itself exits 1."""
        match = re.match(r"-?\d+", _root_cause(ctx).get("exitcode", ""))
        return int(match.group()) if match else None


def _root_cause(ctx: RunContext) -> dict[str, str]:
    """The fields of the last "Root Cause" block torchrun printed (rank, exitcode, ...).

    It reads, after the ranks' failures:
        Root Cause (first observed failure):
        [0]:
          rank      : 1 (local_rank: 1)
          exitcode  : 1 (pid: 8844)
    """
    log = ctx.log_dir / "launcher.log"
    if not log.exists():
        return {}
    text = log.read_text(encoding="utf-8", errors="replace")
    _, found, block = text.rpartition("Root Cause")
    block = block.split("=====")[0]
    return dict(re.findall(r"^\s+(\w+)\s*:\s*(.*)$", block, re.M)) if found else {}
