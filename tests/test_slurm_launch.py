"""expkit_slurm/launch.py, the program a batch job ends with: it starts every rank with one
srun step on a real private cluster (batch scripts submitted with plain sbatch, no expkit
lifecycle), and reads srun's messages for the rank that failed first."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import alive, eventually
from expkit_slurm import launch
from expkit_slurm.launch import Failure, first_failure, launcher_argv

PYTHON = sys.executable


def submit(folder: Path, argv: list[str], nodes: int, per_node: int) -> str:
    """Submit a batch script that ends with `exec argv`; its log is folder/batch.log."""
    script = folder / "job.sh"
    script.write_text(f"#!/bin/sh\nexec {shlex.join(argv)}\n")
    result = subprocess.run(
        [
            *("sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={per_node}"),
            *(f"--output={folder / 'batch.log'}", str(script)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def wait_for(job: str, timeout: float = 120) -> dict[str, str]:
    """Poll `scontrol show job` until the job has ended; its fields (JobState, ExitCode...)."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=True
        ).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        if fields["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return fields
        assert time.monotonic() < deadline, f"job {job} still {fields['JobState']}"
        time.sleep(0.1)


def submit_ranks(tmp_path, script: str, backend: str, nodes: int, per_node: int, *args: str):
    """Submit `script` as nodes x per_node ranks through launch.py, run by a python that sees
    the standard library alone (-I -S: no site-packages, no PYTHONPATH), as a job's python
    without expkit would; horovod's launcher needs its site-packages. The job id."""
    (tmp_path / "task.py").write_text(textwrap.dedent(script))
    command = [PYTHON, str(tmp_path / "task.py"), *args]
    python, *rest = launcher_argv(PYTHON, backend, nodes, per_node, 0, tmp_path / "logs", command)
    isolated = [] if backend == "horovod" else ["-I", "-S"]
    return submit(tmp_path, [python, *isolated, *rest], nodes, per_node)


def run_ranks(tmp_path, script: str, backend: str, nodes: int, per_node: int, *args: str):
    """As submit_ranks, and wait for the job to end: (its fields, the batch log)."""
    fields = wait_for(submit_ranks(tmp_path, script, backend, nodes, per_node, *args))
    return fields, (tmp_path / "batch.log").read_text()


def rank_log(tmp_path: Path, rank: int) -> str:
    return (tmp_path / "logs" / f"rank-{rank}.log").read_text()


# -- reading srun's messages ------------------------------------------------------------------
# srun's own lines, as Slurm 22.05 wrote them in a batch log on the private cluster.
EXITED = """\
srun: error: n2: task 3: Exited with exit code 3
srun: launch/slurm: _step_signal: Terminating StepId=1.0
srun: error: n2: task 2: Terminated
srun: error: n1: tasks 0-1: Terminated
srun: Force Terminated StepId=1.0
"""


@pytest.mark.parametrize(
    ("how", "code"),
    [
        ("Exited with exit code 3", 3),
        ("Killed", -signal.SIGKILL),
        ("Segmentation fault", -signal.SIGSEGV),
        ("Segmentation fault (core dumped)", -signal.SIGSEGV),
        ("Terminated", -signal.SIGTERM),
    ],
)
def test_first_failure_reads_how_a_rank_ended(how, code):
    text = EXITED.replace("Exited with exit code 3", how)
    assert first_failure(text) == Failure(node="n2", rank=3, exit_code=code)


def test_first_failure_takes_the_first_line_and_the_lowest_rank_of_a_range():
    assert first_failure(EXITED.split("\n", 2)[2]) == Failure("n2", 2, -signal.SIGTERM)
    text = "srun: error: gpu-7: tasks 4-5,9: Exited with exit code 1\n"
    assert first_failure(text) == Failure("gpu-7", 4, 1)
    assert first_failure("srun: Job step aborted\ntraining...\n") is None
    assert Failure("n1", 0, -signal.SIGKILL).status == 137 and Failure("n1", 0, 3).status == 3


def test_launcher_argv_runs_this_file_in_the_jobs_python(tmp_path):
    argv = launcher_argv("/opt/py/bin/python", "torchrun", 2, 4, 4, tmp_path, ["python", "t.py"])
    assert argv[0] == "/opt/py/bin/python"
    assert Path(argv[1]).is_absolute() and Path(argv[1]).name == "launch.py"
    assert argv[-3:] == ["--", "python", "t.py"]
    with pytest.raises(ValueError, match="backend none runs one process, not 2 x 1"):
        launcher_argv("python", "none", 2, 1, 0, tmp_path, ["t.py"])
    with pytest.raises(ValueError, match="backend 'mpi'"):
        launcher_argv("python", "mpi", 1, 1, 0, tmp_path, ["t.py"])
    with pytest.raises(ValueError, match="srun reads % in an output path as a pattern"):
        launcher_argv("python", "torchrun", 1, 1, 0, tmp_path / "100%", ["t.py"])


def test_the_step_asks_for_the_gpus_of_each_node(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert launch.srun_argv(2, 4, 4, tmp_path) == [
        "srun",
        "--kill-on-bad-exit=1",
        "--nodes=2",
        "--ntasks=8",
        "--ntasks-per-node=4",
        "--distribution=block",
        f"--output={tmp_path}/rank-%t.log",
        "--open-mode=append",
        "--input=none",
        "--gpus-per-node=4",
    ]
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")  # what sbatch --cpus-per-task=3 sets
    assert launch.srun_argv(1, 1, 0, tmp_path)[-1] == "--cpus-per-task=3"


def test_torchrun_ranks_with_gpus_use_nccl_and_keep_a_users_thread_count(
    slurm_cluster, monkeypatch
):
    env, server = launch.ranks_env("torchrun", ["n1"], 4, 4)
    assert server is None
    assert env["EXPKIT_DIST_BACKEND"] == "nccl" and env["OMP_NUM_THREADS"] == "1"
    assert env["MASTER_ADDR"] == "127.0.0.1"
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert "OMP_NUM_THREADS" not in launch.ranks_env("torchrun", ["n1"], 4, 0)[0]


def test_the_launcher_imports_the_standard_library_only():
    """It runs in the job's python, which need not have expkit (horovod: for horovod only)."""
    tree = ast.parse(Path(launch.__file__).read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported - set(sys.stdlib_module_names) == {"horovod"}


# -- on the cluster -----------------------------------------------------------------------------
def test_none_runs_one_process_whose_output_is_kept_byte_for_byte(slurm_cluster, tmp_path):
    script = """\
        import os, sys
        sys.stdout.buffer.write(b"out 1\\n"); sys.stdout.flush()
        sys.stderr.buffer.write(b"err \\xff\\r\\n"); sys.stderr.flush()
        sys.stdout.buffer.write(b"no newline at the end, " + sys.argv[1].encode())
        assert "RANK" not in os.environ and "MASTER_ADDR" not in os.environ
        """
    fields, log = run_ranks(tmp_path, script, "none", 1, 1, "an argument")
    assert fields["JobState"] == "COMPLETED", log
    data = (tmp_path / "logs" / "rank-0.log").read_bytes()
    assert data == b"out 1\nerr \xff\r\nno newline at the end, an argument"
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["rank-0.log"]


ENV_SCRIPT = """\
    import json, os
    names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
             "MASTER_ADDR", "MASTER_PORT", "EXPKIT_DIST_BACKEND", "OMP_NUM_THREADS",
             "SLURMD_NODENAME"]
    print(json.dumps({name: os.environ.get(name) for name in names}))
    """


def test_torchrun_ranks_get_torchruns_variables_each_in_its_own_log(
    slurm_cluster2, tmp_path, monkeypatch
):
    monkeypatch.setenv("SLURM_DISTRIBUTION", "cyclic")  # as sbatch --distribution=cyclic sets
    fields, log = run_ranks(tmp_path, ENV_SCRIPT, "torchrun", 2, 2)
    assert fields["JobState"] == "COMPLETED", log
    seen = [json.loads(rank_log(tmp_path, rank)) for rank in range(4)]
    port = seen[0]["MASTER_PORT"]
    assert port.isdigit()
    for rank, env in enumerate(seen):
        assert env == {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank % 2),
            "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": str(rank // 2),
            "NODE_RANK": str(rank // 2),
            "MASTER_ADDR": "127.0.0.1",  # n1's NodeAddr: node names do not resolve
            "MASTER_PORT": port,
            "EXPKIT_DIST_BACKEND": "gloo",
            "OMP_NUM_THREADS": "1",  # two ranks share a node
            "SLURMD_NODENAME": f"n{rank // 2 + 1}",
        }


def test_torchrun_all_reduce_across_two_nodes(slurm_cluster2, tmp_path):
    script = """\
        import os, torch, torch.distributed as dist
        dist.init_process_group(os.environ["EXPKIT_DIST_BACKEND"])
        value = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(value)
        print(dist.get_rank(), dist.get_world_size(), os.environ["SLURMD_NODENAME"], value.item())
        dist.destroy_process_group()
        """
    fields, log = run_ranks(tmp_path, script, "torchrun", 2, 1)
    assert fields["JobState"] == "COMPLETED", log
    assert rank_log(tmp_path, 0) == "0 2 n1 3.0\n"
    assert rank_log(tmp_path, 1) == "1 2 n2 3.0\n"


def test_horovod_allreduce_across_two_nodes(slurm_cluster2, tmp_path):
    pytest.importorskip("horovod.torch")
    script = """\
        import os, torch, horovod.torch as hvd
        hvd.init()
        value = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum)
        print(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.cross_rank(),
              os.environ["SLURMD_NODENAME"], os.environ["HOROVOD_GLOO_IFACE"], value.item())
        hvd.shutdown()
        """
    fields, log = run_ranks(tmp_path, script, "horovod", 2, 1)
    assert fields["JobState"] == "COMPLETED", log
    assert rank_log(tmp_path, 0) == "0 2 0 0 n1 lo 3.0\n"
    assert rank_log(tmp_path, 1) == "1 2 0 1 n2 lo 3.0\n"


FAILING = """\
    import os, signal, sys, time
    rank = int(os.environ["RANK"])
    print("rank", rank, "started", flush=True)
    if rank == 1:  # fails once rank 0 runs
        while "started" not in open(os.path.join(sys.argv[2], "rank-0.log")).read():
            time.sleep(0.05)
        if sys.argv[1] == "exit":
            sys.exit(3)
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    time.sleep(300)
    print("rank", rank, "was not stopped", flush=True)
    """


def test_a_rank_failing_on_node_2_stops_the_others_and_is_named(slurm_cluster2, tmp_path):
    fields, log = run_ranks(tmp_path, FAILING, "torchrun", 2, 1, "exit", str(tmp_path / "logs"))
    assert first_failure(log) == Failure(node="n2", rank=1, exit_code=3)
    assert fields["JobState"] == "FAILED"
    assert fields["ExitCode"] == "3:0"  # the rank's own code, not srun's
    assert rank_log(tmp_path, 0).startswith("rank 0 started\n")
    assert "was not stopped" not in rank_log(tmp_path, 0)
    assert rank_log(tmp_path, 1) == "rank 1 started\n"


@pytest.mark.parametrize("name", ["SIGKILL", "SIGSEGV"])
def test_a_rank_killed_by_a_signal_is_named_with_the_signal(slurm_cluster2, tmp_path, name):
    number = getattr(signal, name)
    fields, log = run_ranks(tmp_path, FAILING, "torchrun", 2, 1, name, str(tmp_path / "logs"))
    assert first_failure(log) == Failure(node="n2", rank=1, exit_code=-number)
    assert fields["JobState"] == "FAILED"
    assert fields["ExitCode"] == f"{128 + number}:0"
    assert "was not stopped" not in rank_log(tmp_path, 0)


def test_scancel_stops_every_rank_on_every_node(slurm_cluster2, tmp_path):
    script = """\
        import os, time
        print(os.getpid(), flush=True)
        time.sleep(300)
        """
    job = submit_ranks(tmp_path, script, "torchrun", 2, 2)
    logs = [tmp_path / "logs" / f"rank-{rank}.log" for rank in range(4)]
    eventually(lambda: all(log.exists() and log.read_text() for log in logs), what="4 ranks")
    pids = [int(log.read_text().split()[0]) for log in logs]
    subprocess.run(["scancel", job], check=True)
    assert wait_for(job)["JobState"] == "CANCELLED"
    eventually(lambda: not any(alive(pid) for pid in pids), what="every rank gone")


def test_a_signal_for_the_batch_step_reaches_every_rank(slurm_cluster2, tmp_path):
    """As `sbatch --signal=B:USR1@60` does before the time limit: launch.py passes it on."""
    script = """\
        import os, signal, sys, time
        signal.signal(signal.SIGUSR1, lambda *_: sys.exit(print("got SIGUSR1", flush=True)))
        print("waiting", flush=True)
        time.sleep(300)
        """
    job = submit_ranks(tmp_path, script, "torchrun", 2, 1)
    logs = [tmp_path / "logs" / f"rank-{rank}.log" for rank in range(2)]
    eventually(lambda: all(log.exists() and log.read_text() for log in logs), what="2 ranks")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    assert wait_for(job)["JobState"] == "COMPLETED"
    assert [log.read_text() for log in logs] == ["waiting\ngot SIGUSR1\n"] * 2


def test_a_run_folder_the_node_cannot_see_is_named(tmp_path):
    """A workspace on a disk of the login node only: the batch job on the first node says so."""
    missing = tmp_path / "not-mounted-here" / "run"
    argv = launcher_argv(sys.executable, "none", 1, 1, 0, missing / "logs", ["true"])
    done = subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, "SLURMD_NODENAME": "n7"}
    )
    assert done.returncode == 2
    assert f"{missing} does not exist on node n7" in done.stderr
    assert "every node mounts" in done.stderr
