"""The `torchrun` distributed backend, end to end: real `python -m torch.distributed.run`
launches of 2 ranks on CPU (gloo), through the lifecycle and through the `expkit` command.

What a user relies on: every rank's output in its own log without torchrun's prefixes, the
collective operations and DDP working inside the script, a crashing rank failing the whole run
at once with that rank named and nothing left running, Ctrl-C stopping every rank, and the
launch command for several nodes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import error_line
from expkit import options as declared
from expkit.capabilities import Allocation, RankPieces, RunContext
from expkit.errors import UserError
from expkit.job import JobSpec
from expkit.procs import run_processes
from expkit_torchrun.backend import PREFIX

REPO = Path(__file__).resolve().parents[1]

# Prints 100 lines in several writes each (torchrun may tee a line in pieces), sums rank + 1
# over the ranks, and trains a DDP model from different seeds on different data.
RANKS = """
    import hashlib
    import json
    import os

    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    size, backend = os.environ["WORLD_SIZE"], os.environ["EXPKIT_DIST_BACKEND"]
    print(f"rank {rank} of {size} started; backend {backend}", flush=True)
    for i in range(100):
        print("rank", rank, "line", i)
    dist.init_process_group("gloo")

    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)


    def checksum(model):
        data = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
        return hashlib.sha256(data).hexdigest()


    torch.manual_seed(rank)  # different weights and data on each rank
    model = torch.nn.Linear(4, 2)
    before = checksum(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(3):
        optimizer.zero_grad()
        ddp(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()

    os.makedirs("outputs", exist_ok=True)
    with open(f"outputs/rank-{rank}.json", "w") as f:
        json.dump({"before": before, "after": checksum(model)}, f)
    if rank == 0:
        with open("outputs/allreduce.json", "w") as f:
            json.dump({"sum": total.item()}, f)
    print(f"rank {rank} done", flush=True)
    del ddp  # no DDP reducer left holding the group's work when it is destroyed
    dist.barrier()
    dist.destroy_process_group()
"""

# Rank 0 sleeps; rank 1 fails once rank 0 is sleeping.
CRASH = """
    import os
    import time

    rank = int(os.environ["RANK"])
    print(f"rank {rank} started", flush=True)
    if rank == 0:
        open("rank-0-sleeping", "w").close()
        time.sleep(300)
    while not os.path.exists("rank-0-sleeping"):
        time.sleep(0.05)
    raise RuntimeError("rank 1 lost its data")
"""

SLEEP = """
    import os
    import time

    print(f"rank {os.environ['RANK']} sleeping", flush=True)
    time.sleep(300)
"""


# The ranks fail the first time they run and complete when torchrun restarts them.
FLAKY = """
    import os

    rank, restart = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
    print(f"rank {rank} restart {restart}", flush=True)
    if restart == "0":
        raise SystemExit(3)
"""


def two_ranks(**spec: object) -> dict:
    return {
        "environment": "inherit",
        "resources": {"processes_per_node": 2},
        "distributed": "torchrun",
        "timeout": 300,
        **spec,
    }


def processes_running(script: str) -> list[int]:
    """Pids of the processes whose command line names `script` (the process table)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(script.encode()) for arg in argv):
            found.append(int(entry))
    return found


def run_id_of(output: str) -> str:
    return re.search(r"^run (\S+) in workspace ", output, re.M).group(1)


# -- a run of 2 ranks -----------------------------------------------------------------------
def test_two_ranks_complete_with_a_log_per_rank_allreduce_and_ddp(run_job, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # torchrun then says it sets it
    result = run_job(two_ranks(entry_script="ranks.py"), script=RANKS)
    assert result.state == "completed", result.output

    logs = result.run_dir / "logs"
    for rank in (0, 1):
        text = (logs / f"rank-{rank}.log").read_text()
        lines = text.splitlines()
        assert lines[0] == f"rank {rank} of 2 started; backend gloo"
        assert [line for line in lines if " line " in line] == [
            f"rank {rank} line {i}" for i in range(100)
        ]
        assert f"rank {rank} done" in lines
        assert f"rank {1 - rank} " not in text
        assert "expkit-rank" not in text  # torchrun's prefix is gone
    launcher = (logs / "launcher.log").read_text()
    assert "Setting OMP_NUM_THREADS" in launcher
    assert "rank 0" not in launcher and "rank 1" not in launcher
    assert "rank 0 done" in result.output and "rank 1 done" not in result.output  # rank 0 shown

    outputs = result.run_dir / "outputs"
    assert json.loads((outputs / "allreduce.json").read_text()) == {"sum": 3.0}
    rank0, rank1 = (json.loads((outputs / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert rank0["before"] != rank1["before"]  # different seeds ...
    assert rank0["after"] == rank1["after"]  # ... yet the same parameters after DDP steps
    assert rank0["after"] != rank0["before"]


def test_a_rank_crash_fails_the_run_at_once_naming_the_rank_and_leaves_no_process(
    expkit_cli, expkit_workspace, write_job
):
    job = write_job(two_ranks(entry_script="rank_crash.py"), script=CRASH)
    started = time.monotonic()
    result = expkit_cli("run", str(job), timeout=200)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert took < 60  # rank 0 was stopped, not waited for: it would sleep 300 s

    run_id = run_id_of(result.stdout)
    record = expkit_workspace.history.runs.get(run_id)
    assert record.state == "failed"
    assert record.error == (
        "run: rank 1: the script exited with code 1; last output: "
        "RuntimeError: rank 1 lost its data"
    )
    assert run_processes(run_id, expkit_workspace.path) == []
    assert processes_running("rank_crash.py") == []

    shown = result.stdout.splitlines()
    assert "rank 0 started" in shown and "rank 1 started" not in shown  # rank 0 by default
    rank1 = expkit_cli("runs", "logs", run_id, "--rank", "1")
    assert rank1.returncode == 0
    assert rank1.stdout.startswith("rank 1 started\n")
    assert "RuntimeError: rank 1 lost its data" in rank1.stdout
    assert "rank 0" not in rank1.stdout


def test_ctrl_c_stops_every_rank_and_cancels_the_run(background, expkit_workspace, write_job):
    job = write_job(two_ranks(entry_script="rank_sleep.py"), script=SLEEP)
    live = background("run", str(job), "--all-ranks")
    live.wait_for("[rank 0] rank 0 sleeping", timeout=60)
    live.wait_for("[rank 1] rank 1 sleeping", timeout=60)
    assert len(processes_running("rank_sleep.py")) == 3  # torchrun and the two ranks

    os.killpg(live.proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
    assert live.wait(timeout=30) == 130
    record = expkit_workspace.history.runs.get(live.run_id)
    assert record.state == "canceled"
    assert run_processes(record.id, expkit_workspace.path) == []
    assert processes_running("rank_sleep.py") == []


# -- what expkit refuses before anything starts ---------------------------------------------
def test_more_processes_than_the_machine_has_slots_fails_clearly(expkit_cli, write_job):
    slots = os.cpu_count()
    job = write_job(two_ranks(resources={"processes_per_node": slots + 1}), script="")
    result = expkit_cli("run", str(job), timeout=60)
    assert result.returncode == 2
    line = error_line(result)
    assert "resources.processes_per_node" in line and f"{slots} slots" in line


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (
            {"rdzv_endpont": "node0:29400"},
            "distributed.options.rdzv_endpont: unknown option of distributed backend "
            "'torchrun' (did you mean 'rdzv_endpoint'?)",
        ),
        ({"rdzv_endpoint": "node0"}, "distributed.options.rdzv_endpoint: must be host:port"),
        ({"node_rank": 1}, "distributed.options.node_rank: must be a whole number from 0 to 0"),
    ],
)
def test_nonsense_options_are_refused_naming_the_field(expkit_cli, write_job, options, field):
    job = write_job(two_ranks(distributed={"backend": "torchrun", "options": options}), script="")
    result = expkit_cli("run", str(job), timeout=60)
    assert result.returncode == 2
    assert field in error_line(result)


# -- several nodes: the launch command (the local target runs one node) ---------------------
def launch(plugins, spec: dict, gpus: list[int], tmp_path: Path) -> list:
    job = JobSpec.from_dict({"experiment": "x", "entry_script": "train.py", **spec}, source="t")
    backend = plugins.get("distributed_backends", "torchrun")
    given = job.distributed.options  # as the core hands them over: checked, defaults filled
    filled = declared.check(backend, given, "distributed.options")
    job = job.replace(distributed=job.distributed.replace(options=filled))
    backend.check(job)
    ctx = RunContext(
        run_id="x_7",
        job=job,
        run_dir=tmp_path,
        work_dir=tmp_path,
        log_dir=tmp_path,
        script_env={},
        say=print,
        waiting=print,
        canceled=lambda: False,
        echo=lambda rank, line: None,
    )
    command = [sys.executable, "train.py", "--lr", "0.1"]
    allocation = Allocation(hosts=["node0", "node1"], slots=[0, 1, 2, 3], gpus=gpus)
    return backend.launch(ctx, command, allocation)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_several_nodes_meet_at_the_rendezvous_endpoint(expkit_plugins, tmp_path):
    spec = {
        "resources": {"nodes": 2, "processes_per_node": 4, "gpus_per_node": 4},
        "distributed": {
            "backend": "torchrun",
            "options": {"rdzv_endpoint": "node0:29400", "node_rank": 1},
        },
    }
    [process] = launch(expkit_plugins, spec, gpus=[0, 1, 2, 3], tmp_path=tmp_path)
    argv = process.argv
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" not in argv
    assert option(argv, "--nnodes") == "2"
    assert option(argv, "--node_rank") == "1"
    assert option(argv, "--nproc_per_node") == "4"
    assert option(argv, "--rdzv_backend") == "c10d"
    assert option(argv, "--rdzv_endpoint") == "node0:29400"
    assert option(argv, "--rdzv_id") == "x_7"  # the same on every node of the run
    assert option(argv, "--max_restarts") == "0"
    assert argv[-3:] == ["train.py", "--lr", "0.1"]
    assert process.env["EXPKIT_DIST_BACKEND"] == "nccl"


def test_one_node_uses_the_standalone_rendezvous(expkit_plugins, tmp_path):
    [process] = launch(expkit_plugins, two_ranks(), gpus=[], tmp_path=tmp_path)
    assert "--standalone" in process.argv and "--rdzv_endpoint" not in process.argv
    assert option(process.argv, "--nnodes") == "1"
    assert option(process.argv, "--nproc_per_node") == "2"
    assert process.env["EXPKIT_DIST_BACKEND"] == "gloo"


def test_several_nodes_need_an_endpoint_and_gpu_runs_a_gpu_per_rank(expkit_plugins, tmp_path):
    spec = {"resources": {"nodes": 2}, "distributed": "torchrun"}
    with pytest.raises(UserError, match=r"^distributed.options.rdzv_endpoint: 2 nodes need"):
        launch(expkit_plugins, spec, gpus=[], tmp_path=tmp_path)
    spec = {"resources": {"processes_per_node": 2, "gpus_per_node": 1}, "distributed": "torchrun"}
    with pytest.raises(UserError, match=r"^resources.gpus_per_node: each of the 2 processes"):
        launch(expkit_plugins, spec, gpus=[0], tmp_path=tmp_path)


def test_retry_in_place_becomes_torchruns_max_restarts(expkit_plugins, tmp_path):
    spec = two_ranks(retry={"in_place": 2})
    [process] = launch(expkit_plugins, spec, gpus=[], tmp_path=tmp_path)
    assert option(process.argv, "--max_restarts") == "2"
    [process] = launch(expkit_plugins, two_ranks(), gpus=[], tmp_path=tmp_path)
    assert option(process.argv, "--max_restarts") == "0"  # no restarts unless asked for


def test_ranks_that_fail_are_restarted_in_place_within_the_attempt(run_job):
    result = run_job(two_ranks(entry_script="flaky.py", retry={"in_place": 1}), script=FLAKY)
    assert result.state == "completed", result.output
    logs = [(result.run_dir / "logs" / f"rank-{r}.log").read_text().splitlines() for r in (0, 1)]
    assert [lines[-1] for lines in logs] == ["rank 0 restart 1", "rank 1 restart 1"]
    # the first run failed (a rank slow to start may be stopped before it printed)
    assert "rank 0 restart 0" in logs[0] or "rank 1 restart 0" in logs[1]


@pytest.mark.parametrize("dry_run", [True, False])
def test_retry_in_place_without_a_launcher_that_restarts_is_refused(expkit_cli, write_job, dry_run):
    job = write_job(
        {"environment": "inherit", "distributed": "none", "retry": {"in_place": 2}},
        script="print('never started')",
    )
    result = expkit_cli("run", str(job), *(["--dry-run"] if dry_run else []), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert error_line(result) == (
        f"expkit: error: {job}: retry.in_place: distributed: none on compute: local does not "
        "restart the ranks within an attempt (torchrun does); use retry.max_attempts for a new "
        "attempt instead"
    )
    assert "never started" not in result.stdout
    assert "Traceback" not in result.stderr


def test_retry_in_place_on_a_target_that_starts_the_ranks_itself_is_refused(expkit_cli, write_job):
    """On Slurm, srun starts every rank (no torchrun agent): the refusal says so instead of
    saying that torchrun does not restart ranks and that torchrun does."""
    job = write_job(
        {
            "environment": "inherit",
            "compute": "slurm",
            "distributed": "torchrun",
            "resources": {"nodes": 1, "processes_per_node": 2},
            "retry": {"in_place": 2},
        },
        script="print('never started')",
    )
    result = expkit_cli("run", str(job), "--dry-run", timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert error_line(result) == (
        f"expkit: error: {job}: retry.in_place: compute: slurm starts the ranks itself, "
        "without torchrun's agent, so nothing restarts them within an attempt; use "
        "retry.max_attempts for a new attempt instead"
    )
    assert "Traceback" not in result.stderr


def test_lines_torchrun_tees_in_pieces_are_put_back_together_per_rank():
    split = RankPieces(PREFIX)
    assert split(b"[expkit-rank-1]:loss [expkit-rank-0]:epoch 1\n") == (0, b"epoch 1\n")
    assert split(b"[expkit-rank-1]:0.3\n") == (1, b"loss 0.3\n")
    assert split(b"W1127 torch/distributed/elastic ... SIGTERM\n") == (
        None,
        b"W1127 torch/distributed/elastic ... SIGTERM\n",
    )
    assert split(b"[expkit-rank-12]:[rank12]:[W1127] a warning\n") == (
        12,
        b"[rank12]:[W1127] a warning\n",
    )


# -- the sample job -------------------------------------------------------------------------
@pytest.mark.slow
def test_the_sample_torchrun_job_trains_on_two_ranks_and_registers(expkit_cli, expkit_workspace):
    job = REPO / "training" / "job-torchrun.yaml"
    result = expkit_cli("run", str(job), "--set", "args.num_epochs=1", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "model pt-dnn version 1" in result.stdout

    run_id = run_id_of(result.stdout)
    logs = expkit_workspace.run_dir(run_id) / "logs"
    assert "rank 0 of 2 (torchrun)" in (logs / "rank-0.log").read_text()
    assert "rank 1 of 2 (torchrun)" in (logs / "rank-1.log").read_text()
    assert "epoch 1/1" in (logs / "rank-0.log").read_text()

    history = expkit_workspace.history
    rows = history.metrics.of(run_id, "best_val_acc")
    assert [row["rank"] for row in rows] == [0]  # logged once, by rank 0
    shown = json.loads(expkit_cli("runs", "show", run_id, "--json").stdout)
    assert shown["tags"]["world_size"] == "2"
    assert shown["metrics"]["train_acc"] > 0.3  # ten classes: chance is 0.1
    assert 0 < shown["metrics"]["best_val_acc"] <= 1  # one epoch on 2 ranks: 19 steps only
    assert set(shown["outputs"]) == {"model.pt", "classes.json", "example_inputs.npy"}
