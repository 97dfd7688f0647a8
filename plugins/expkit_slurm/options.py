"""The options the `slurm` target takes (`compute.options`), named as Slurm names them.

Each becomes one sbatch flag (see `expkit_slurm.batch.directives`); anything else a Slurm user
needs (`--exclusive`, `--nodelist`, `--mail-type`) goes through `sbatch_args`, which
refuses the flags expkit sets itself and names what to set instead (`--requeue` comes from the
job's `retry:`, `--signal` from its `checkpoints:`).
"""

from __future__ import annotations

from expkit.plugin import Option, declare_options

# sbatch flags expkit sets from the job: their long name, short letter and what to set instead.
SET_BY_EXPKIT: dict[str, tuple[str | None, str]] = {
    "nodes": ("N", "resources.nodes"),
    "ntasks": ("n", "resources.processes_per_node"),
    "ntasks-per-node": (None, "resources.processes_per_node"),
    "ntasks-per-socket": (None, "resources.processes_per_node"),
    "ntasks-per-core": (None, "resources.processes_per_node"),
    "ntasks-per-gpu": (None, "resources.processes_per_node"),
    "gpus": ("G", "resources.gpus_per_node"),
    "gpus-per-node": (None, "resources.gpus_per_node"),
    "gpus-per-task": (None, "resources.gpus_per_node"),
    "gpus-per-socket": (None, "resources.gpus_per_node"),
    "gres": (None, "resources.gpus_per_node (and compute.options.gpus: gres)"),
    "time": ("t", "the job's `timeout` (seconds)"),
    "job-name": ("J", "nothing: expkit names the job after the run"),
    "output": ("o", "nothing: the batch step writes the run's logs/launcher.log"),
    "error": ("e", "nothing: the batch step writes the run's logs/launcher.log"),
    "chdir": ("D", "nothing: the job runs in the run's work folder"),
    "open-mode": (None, "nothing: a requeued job appends to the log it wrote before"),
    "export": (None, "nothing: the job gets the submitting environment (--export=ALL)"),
    "wrap": (None, "entry_script"),
    "parsable": (None, "nothing: expkit reads the job id itself"),
    "wait": ("W", "nothing: expkit follows the job itself"),
    "test-only": (None, "nothing: expkit checks the job before each run"),
    "array": ("a", "one run per array member"),
    "clusters": ("M", "SLURM_CONF naming the cluster's controller"),
    "partition": ("p", "compute.options.partition"),
    "account": ("A", "compute.options.account"),
    "qos": ("q", "compute.options.qos"),
    "constraint": ("C", "compute.options.constraint"),
    "mem": (None, "compute.options.mem"),
    "reservation": (None, "compute.options.reservation"),
    "cpus-per-task": ("c", "compute.options.cpus_per_task"),
    "requeue": (None, "retry.max_attempts (more than 1: Slurm may requeue the job)"),
    "no-requeue": (None, "retry.max_attempts (1: Slurm never requeues the job)"),
    "signal": (None, "checkpoints (its signal and grace_seconds before the time limit)"),
}
_BY_LETTER = {letter: name for name, (letter, _) in SET_BY_EXPKIT.items() if letter}

# How often the driver asks Slurm about a live job (`squeue -j`, about 10 ms here). One second
# sees a job's end about half a second late on average, well within the 1 s expkit may add;
# a login node's slurmctld serves a few hundred users, and one small RPC a second per run is
# what `sbatch --wait` (every 2 s at first) and submitit (1 s) already cost it.
POLL_SECONDS = 1.0


def refused_flag(arg: str) -> str | None:
    """The reason `arg`, one of `sbatch_args`, may not be given (a flag expkit sets from the
    job, named with what to set instead), or None for a flag expkit leaves to the user.

    sbatch takes any unambiguous prefix of a long flag (`--node=2` is `--nodes=2`), so a
    prefix of a refused flag is refused too."""
    if arg.startswith("--"):
        name = arg[2:].split("=", 1)[0]
        matches = [full for full in SET_BY_EXPKIT if full == name] or [
            full for full in SET_BY_EXPKIT if name and full.startswith(name)
        ]
    elif arg.startswith("-") and len(arg) > 1 and arg[1] in _BY_LETTER:
        matches = [_BY_LETTER[arg[1]]]
    else:
        return None
    if not matches:
        return None
    full = matches[0]
    if full == "gres" and "=" not in arg:
        return (
            f"{arg!r}: give other generic resources in one item (--gres=nvme:1); GPUs "
            "come from resources.gpus_per_node"
        )
    if full == "gres" and arg.startswith("--gres="):
        # Other generic resources (--gres=nvme:1) are the user's; GPUs come from the job.
        names = [item.split(":")[0] for item in arg.split("=", 1)[1].split(",")]
        if not any(name.startswith("gpu") for name in names):
            return None
    return f"{arg!r} is a flag expkit sets (--{full}); instead set {SET_BY_EXPKIT[full][1]}"


def _check_sbatch_args(args: list[str]) -> None:
    for arg in args:
        reason = refused_flag(arg)
        if reason:
            raise ValueError(reason)


# Slurm's own names: partitions, accounts, QOS and reservations are words with . _ - (and a
# comma-separated list of partitions, which Slurm tries in turn).
_NAME = r"[A-Za-z0-9_.@+-]+"

TAKES = declare_options(
    partition=Option(
        str,
        pattern=rf"{_NAME}(,{_NAME})*",
        text="a Slurm partition name (or several, comma-separated), e.g. gpu",
        help="the partition to submit to (sbatch --partition; default: the cluster's default)",
    ),
    account=Option(
        str,
        pattern=_NAME,
        text="a Slurm account name, e.g. proj42",
        help="the account charged for the job (sbatch --account)",
    ),
    qos=Option(
        str,
        pattern=_NAME,
        text="a Slurm QOS name, e.g. normal",
        help="the quality of service (sbatch --qos)",
    ),
    constraint=Option(
        str,
        pattern=r"[^\s'\"]+",
        text="a Slurm feature expression without spaces, e.g. a100 or a100&ib",
        help="node features the job needs (sbatch --constraint)",
    ),
    mem=Option(
        str,
        pattern=r"[0-9]+[KMGT]?",
        text="a memory size in Slurm's syntax: a number with K, M (the default), G or T, "
        "e.g. 64G; 0 for all of a node's memory",
        help="memory per node (sbatch --mem, e.g. 64G; default: the partition's)",
    ),
    cpus_per_task=Option(
        int,
        minimum=1,
        maximum=4096,
        help="CPUs per process, e.g. for data-loader workers (sbatch --cpus-per-task)",
    ),
    reservation=Option(
        str,
        pattern=_NAME,
        text="a Slurm reservation name",
        help="run in this reservation (sbatch --reservation)",
    ),
    gpus=Option(
        str,
        choices=("gpus-per-node", "gres"),
        default="gpus-per-node",
        help="how resources.gpus_per_node is asked for: --gpus-per-node=N (Slurm 19.05+), "
        "or --gres=gpu:N for clusters that only configure GRES",
    ),
    gpu_type=Option(
        str,
        pattern=r"[A-Za-z0-9_.-]+",
        text="a GPU type as the cluster's gres.conf names it, e.g. a100",
        help="the GPU type to ask for (--gpus-per-node=TYPE:N or --gres=gpu:TYPE:N)",
    ),
    sbatch_args=Option(
        list,
        items=str,
        max_length=64,
        validate=_check_sbatch_args,
        text="a list of sbatch flags, e.g. ['--exclusive']",
        help="more sbatch flags, e.g. ['--exclusive']; flags expkit sets from "
        "the job (--nodes, --time, --output, ...) are refused",
    ),
    poll_seconds=Option(
        float,
        minimum=0.2,
        maximum=300,
        default=POLL_SECONDS,
        help="how often the driver asks Slurm for the job's state (squeue), in seconds",
    ),
)
