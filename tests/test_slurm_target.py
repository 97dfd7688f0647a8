"""The `slurm` compute target end to end: `expkit run` on a real private Slurm cluster (the
`slurm_cluster` fixture: one node with 2 CPUs; `slurm_cluster2`: two simulated nodes).

What a user relies on: the job submitted and the run completed with its output, metrics and
outputs as for a local run; Slurm's pending reason as the run's status; a request the cluster
can never serve refused at once, with Slurm's reason, and no run left queued; Ctrl-C and
`expkit runs cancel` calling scancel; the job's timeout; a failing rank named with its node;
torchrun and Horovod across two nodes; a run that outlives a killed driver and is finished by
`expkit runs follow`; the exact batch script in the dry run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import error_line, eventually
from expkit.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]

# Logs a metric, prints, and (with SLEEP set) sleeps before it writes its output.
SIMPLE = """
    import os, socket, sys, time
    from expkit import Run

    run = Run.get_context()
    print("hello from", os.environ.get("SLURM_JOB_ID"), "on", os.environ.get("SLURMD_NODENAME"))
    print("to stderr", file=sys.stderr)
    run.log("loss", 0.5, step=1)
    time.sleep(float(os.environ.get("SLEEP", sys.argv[1] if len(sys.argv) > 1 else "0")))
    run.log("loss", 0.25, step=2)
    os.makedirs("outputs", exist_ok=True)
    with open("outputs/result.txt", "w") as f:
        f.write("done\\n")
    print("done")
"""

# Each rank trains a DDP (or Horovod) model from its own seed on its own data; every rank
# writes the checksum of its parameters after training.
DISTRIBUTED = """
    import hashlib, json, os, sys
    import torch
    import distributed

    dist = distributed.setup()
    torch.manual_seed(dist.rank)
    model = dist.wrap_model(torch.nn.Linear(4, 2))
    optimizer = dist.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    for step in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
    data = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    os.makedirs("outputs", exist_ok=True)
    with open(f"outputs/rank-{dist.rank}.json", "w") as f:
        json.dump({"size": dist.size, "params": hashlib.sha256(data).hexdigest(),
                   "node": os.environ.get("SLURMD_NODENAME")}, f)
    print(f"rank {dist.rank} of {dist.size} on {os.environ.get('SLURMD_NODENAME')} done")
    dist.shutdown()
"""

# Rank 1 fails with 3 once it has printed; the others sleep until stopped.
RANK_FAILS = """
    import os, sys, time
    rank = int(os.environ["RANK"])
    print(f"rank {rank} up", flush=True)
    if rank == 1:
        print("rank 1 gives up", flush=True)
        sys.exit(3)
    time.sleep(300)
"""


def job_spec(**changes) -> dict:
    spec = {
        "compute": {"target": "slurm", "options": {"poll_seconds": 0.5}},
        "resources": {"nodes": 1, "processes_per_node": 1},
        "distributed": "none",
        "timeout": 120,
    }
    spec.update(changes)
    return spec


def squeue(cluster) -> str:
    return subprocess.run(
        ["squeue", "-h", "-o", "%i %T %r"],
        capture_output=True,
        text=True,
        env={**os.environ, **cluster.env},
        check=True,
    ).stdout.strip()


def take_every_cpu(cluster) -> str:
    """Submit a job that holds the 2 CPUs of a 1-node cluster, once it runs: its id."""
    blocker = subprocess.run(
        ["sbatch", "--parsable", "-n", "2", "--output=/dev/null", "--wrap", "sleep 300"],
        capture_output=True,
        text=True,
        env={**os.environ, **cluster.env},
        check=True,
    ).stdout.strip()
    eventually(lambda: "RUNNING" in squeue(cluster), what="the blocking job running")
    return blocker


def record(workspace: Workspace, ref: str = "latest"):
    return workspace.history.runs.find(ref)


def test_a_job_runs_on_slurm_with_its_output_metrics_and_outputs(
    slurm_cluster, expkit_workspace, expkit_cli, write_job
):
    job = write_job(job_spec(), SIMPLE)
    result = expkit_cli("run", str(job), env=slurm_cluster.env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hello from" in result.stdout and "done" in result.stdout  # rank 0, live
    assert re.search(r"submitted Slurm job \d+", result.stdout)
    run = record(expkit_workspace)
    assert run.state == "completed"
    assert run.remote_job and run.remote_job.startswith("slurm:")
    job_id = run.remote_job.removeprefix("slurm:")
    run_dir = expkit_workspace.run_dir(run.id)
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert f"hello from {job_id}" in log and "to stderr" in log
    history = expkit_workspace.history
    assert [m["value"] for m in history.metrics.of(run.id, "loss")] == [0.5, 0.25]
    assert history.outputs.of(run.id).keys() == {"result.txt"}
    tags = history.tags.of(run.id)
    assert tags["slurm.job_id"] == job_id and tags["slurm.state"] == "COMPLETED"
    shown = expkit_cli("runs", "show", run.id).stdout
    assert f"remote job  slurm:{job_id}" in shown
    assert squeue(slurm_cluster) == ""


def test_the_dry_run_prints_the_batch_script_and_the_sbatch_command(expkit_cli, write_job):
    spec = job_spec(
        compute={
            "target": "slurm",
            "options": {"partition": "gpu", "account": "proj42", "sbatch_args": ["--exclusive"]},
        },
        resources={"nodes": 2, "processes_per_node": 4, "gpus_per_node": 4},
        distributed="torchrun",
        timeout=7200,
    )
    result = expkit_cli("run", str(write_job(spec, SIMPLE)), "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for directive in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj42",
        "#SBATCH --exclusive",
    ):
        assert directive in out, out
    assert "#SBATCH --time=" in out and "launch.py" in out
    assert re.search(r"^\$ sbatch .*job\.sh$", out, re.M), out


def test_a_request_the_cluster_can_never_serve_is_refused_before_a_run_exists(
    slurm_cluster, expkit_workspace, expkit_cli, write_job
):
    spec = job_spec(resources={"nodes": 3, "processes_per_node": 1}, distributed="torchrun")
    job = write_job(spec, SIMPLE)
    result = expkit_cli("run", str(job), env=slurm_cluster.env)
    assert result.returncode == 2, result.stdout + result.stderr
    line = error_line(result)
    assert "Slurm" in line and "node" in line.lower(), line
    assert expkit_workspace.history.runs.recent(limit=10) == []
    assert squeue(slurm_cluster) == ""

    job = write_job(job_spec(compute={"target": "slurm", "options": {"partition": "nope"}}), SIMPLE)
    result = expkit_cli("run", str(job), env=slurm_cluster.env)
    assert result.returncode == 2 and "partition" in error_line(result).lower()


def test_the_pending_reason_is_the_runs_status_while_the_job_waits(
    slurm_cluster, expkit_workspace, expkit_cli_background, write_job
):
    env = {**os.environ, **slurm_cluster.env}
    blocker = take_every_cpu(slurm_cluster)
    job = write_job(job_spec(), SIMPLE)
    live = expkit_cli_background("run", str(job), env=slurm_cluster.env)
    live.wait_for(re.compile(r"\b(Resources|Priority)\b"), timeout=60)
    run = record(expkit_workspace)
    assert run.state == "queued" and re.search(r"Resources|Priority", run.status or "")
    subprocess.run(["scancel", blocker], env=env, check=True)
    assert live.wait(timeout=120) == 0, live.output
    assert record(expkit_workspace).state == "completed"


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_signal_while_the_job_waits_in_the_queue_cancels_the_slurm_job(
    how, slurm_cluster, expkit_workspace, expkit_cli_background, write_job
):
    env = {**os.environ, **slurm_cluster.env}
    blocker = take_every_cpu(slurm_cluster)
    live = expkit_cli_background("run", str(write_job(job_spec(), SIMPLE)), env=slurm_cluster.env)
    live.wait_for(re.compile(r"\b(Resources|Priority)\b"), timeout=60)
    live.interrupt() if how == "ctrl-c" else live.terminate()
    assert live.wait(timeout=60) != 0, live.output
    assert record(expkit_workspace).state == "canceled"
    try:  # the run's job left the queue: it must never start after the run ended
        queue = squeue(slurm_cluster)
        assert [line.split()[0] for line in queue.splitlines()] == [blocker], queue
    finally:
        subprocess.run(["scancel", blocker], env=env, check=True)


@pytest.mark.parametrize("how", ["ctrl-c", "runs cancel"])
def test_a_cancel_calls_scancel_and_keeps_the_outputs(
    how, slurm_cluster, expkit_workspace, expkit_cli, expkit_cli_background, write_job
):
    job = write_job(job_spec(), SIMPLE.replace('"0")))', '"300")))'))
    live = expkit_cli_background("run", str(job), env=slurm_cluster.env)
    live.wait_for("hello from", timeout=60)
    if how == "ctrl-c":
        live.interrupt()
    else:
        result = expkit_cli("runs", "cancel", "latest", env=slurm_cluster.env)
        assert result.returncode == 0, result.stderr
    assert live.wait(timeout=60) == 130, live.output
    run = record(expkit_workspace)
    assert run.state == "canceled"
    assert squeue(slurm_cluster) == ""
    assert (expkit_workspace.run_dir(run.id) / "logs" / "rank-0.log").exists()


def test_the_jobs_timeout_stops_the_slurm_job(
    slurm_cluster, expkit_workspace, expkit_cli, write_job
):
    job = write_job(job_spec(timeout=3), SIMPLE.replace('"0")))', '"300")))'))
    result = expkit_cli("run", str(job), env=slurm_cluster.env)
    assert result.returncode == 1, result.stdout + result.stderr
    run = record(expkit_workspace)
    assert run.state == "failed" and "timed out after 3s" in run.error
    assert squeue(slurm_cluster) == ""


def test_a_rank_failing_on_the_second_node_fails_the_run_naming_rank_and_node(
    slurm_cluster2, expkit_workspace, expkit_cli, write_job
):
    spec = job_spec(resources={"nodes": 2, "processes_per_node": 1}, distributed="torchrun")
    result = expkit_cli("run", str(write_job(spec, RANK_FAILS)), env=slurm_cluster2.env)
    assert result.returncode == 1, result.stdout + result.stderr
    run = record(expkit_workspace)
    second = slurm_cluster2.node_names[1]
    assert run.state == "failed"
    assert f"rank 1 on node {second}: the script exited with code 3" in run.error, run.error
    assert "rank 1 gives up" in run.error
    assert squeue(slurm_cluster2) == ""  # rank 0 was stopped with the job


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchrun", "horovod"])
def test_training_across_two_nodes_ends_with_equal_parameters_on_every_rank(
    backend, slurm_cluster2, expkit_workspace, expkit_cli, write_job
):
    if backend == "horovod":
        pytest.importorskip("horovod.torch")
    spec = job_spec(resources={"nodes": 2, "processes_per_node": 1}, distributed=backend)
    files = {"distributed.py": (REPO / "training" / "distributed.py").read_text()}
    job = write_job(spec, DISTRIBUTED, files=files)
    result = expkit_cli("run", str(job), "--all-ranks", env=slurm_cluster2.env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    run = record(expkit_workspace)
    outputs = expkit_workspace.run_dir(run.id) / "outputs"
    ranks = [json.loads((outputs / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["size"] for r in ranks] == [2, 2]
    assert ranks[0]["params"] == ranks[1]["params"]
    assert {r["node"] for r in ranks} == set(slurm_cluster2.node_names)


def test_metrics_reach_the_history_while_the_job_runs(
    slurm_cluster, expkit_workspace, expkit_cli_background, write_job
):
    job = write_job(job_spec(), SIMPLE.replace('"0")))', '"300")))'))
    live = expkit_cli_background("run", str(job), env=slurm_cluster.env)
    live.wait_for("hello from", timeout=60)
    run_id = live.run_id
    eventually(
        lambda: expkit_workspace.history.metrics.latest(run_id).get("loss") == 0.5,
        timeout=30,
        what="the first loss recorded while the job runs",
    )
    assert expkit_workspace.history.runs.get(run_id).state == "running"
    live.interrupt()
    assert live.wait(timeout=60) == 130


def test_a_killed_driver_leaves_the_job_running_and_runs_follow_finishes_the_run(
    slurm_cluster, expkit_workspace, expkit_cli, expkit_cli_background, write_job
):
    job = write_job(job_spec(), SIMPLE.replace('"0")))', '"8")))'))
    live = expkit_cli_background("run", str(job), env=slurm_cluster.env)
    live.wait_for("hello from", timeout=60)
    run_id = live.run_id
    os.killpg(live.proc.pid, signal.SIGKILL)  # the driver and its terminal gone at once
    live.proc.wait()
    assert "RUNNING" in squeue(slurm_cluster)  # the job goes on
    shown = expkit_cli("runs", "show", run_id, env=slurm_cluster.env)  # a command looks
    assert "failed" not in shown.stdout.split("\n")[2], shown.stdout
    result = expkit_cli("runs", "follow", run_id, env=slurm_cluster.env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "done" in result.stdout
    run = expkit_workspace.history.runs.get(run_id)
    assert run.state == "completed", run.error
    assert [m["value"] for m in expkit_workspace.history.metrics.of(run_id, "loss")] == [0.5, 0.25]
    assert expkit_workspace.history.outputs.of(run_id).keys() == {"result.txt"}
    stages = {s.stage: s.state for s in expkit_workspace.history.stages.of(run_id)}
    assert stages == {
        "prepare": "completed",
        "scale": "completed",
        "run": "completed",
        "post-process": "completed",
        "register": "skipped",
    }


def test_a_driver_that_re_attaches_keeps_the_timeout_counted_from_the_first(
    slurm_cluster, expkit_workspace, expkit_cli, expkit_cli_background, write_job
):
    script = """
        import time
        print("started", flush=True)
        time.sleep(10)
        print("past the timeout", flush=True)
        time.sleep(6)  # ends within a fresh 8 s timeout: only the first count stops it
    """
    live = expkit_cli_background(
        "run", str(write_job(job_spec(timeout=8), script)), env=slurm_cluster.env
    )
    live.wait_for("started", timeout=60)
    run_id = live.run_id
    os.killpg(live.proc.pid, signal.SIGKILL)
    live.proc.wait()
    log = expkit_workspace.run_dir(run_id) / "logs" / "rank-0.log"
    eventually(lambda: "past the timeout" in log.read_text(), timeout=60, what="the timeout past")
    result = expkit_cli("runs", "follow", run_id, env=slurm_cluster.env, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    run = expkit_workspace.history.runs.get(run_id)
    assert run.state == "failed" and "timed out after 8s" in run.error, run.error


def test_a_closed_terminal_detaches_and_a_background_driver_finishes_the_run(
    slurm_cluster, expkit_workspace, expkit_cli_background, write_job
):
    job = write_job(job_spec(), SIMPLE.replace('"0")))', '"5")))'))
    live = expkit_cli_background("run", str(job), env=slurm_cluster.env)
    live.wait_for("hello from", timeout=60)
    run_id = live.run_id
    os.kill(live.proc.pid, signal.SIGHUP)
    assert live.wait(timeout=30) == 3, live.output  # let go: neither done nor failed
    assert "RUNNING" in squeue(slurm_cluster)
    eventually(
        lambda: expkit_workspace.history.runs.get(run_id).state == "completed",
        timeout=90,
        what="the background driver finishing the run",
    )


def test_detach_submits_and_returns_and_the_run_completes(
    slurm_cluster, expkit_workspace, expkit_cli, write_job
):
    job = write_job(job_spec(), SIMPLE)
    result = expkit_cli("run", str(job), "--detach", env=slurm_cluster.env)
    assert result.returncode == 0, result.stderr
    assert "expkit runs follow 1" in result.stdout
    result = expkit_cli("runs", "follow", "1", env=slurm_cluster.env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert record(expkit_workspace).state == "completed"


def test_the_slurm_target_keeps_the_compute_target_contract(slurm_cluster, monkeypatch, tmp_path):
    from expkit.plugin import check_compute_target
    from expkit_slurm.target import SlurmTarget

    for name, value in slurm_cluster.env.items():
        monkeypatch.setenv(name, value)
    job = {"compute": {"target": "slurm", "options": {"poll_seconds": 0.2}}}
    checked = check_compute_target(SlurmTarget(), job=job, folder=tmp_path / "check")
    assert "cancel" in checked and "timeout" in checked


@pytest.mark.parametrize("conf", ["controller down", "no slurm.conf"])
def test_a_cluster_that_cannot_be_reached_is_one_line_before_a_run_exists(
    conf, slurm_cluster, expkit_workspace, expkit_cli, write_job, tmp_path
):
    if conf == "controller down":  # the cluster's slurm.conf, a port nothing listens on
        text = Path(slurm_cluster.env["SLURM_CONF"]).read_text()
        text = re.sub(r"(?m)^SlurmctldPort=.*$", "SlurmctldPort=1", text)
        (tmp_path / "slurm.conf").write_text(text)
        said = "slurmctld at localhost:1 does not answer"
    else:
        said = "SLURM_CONF"
    env = {"SLURM_CONF": str(tmp_path / "slurm.conf")}  # absent for "no slurm.conf"
    result = expkit_cli("run", str(write_job(job_spec(), SIMPLE)), env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert said in error_line(result)
    assert expkit_workspace.history.runs.recent() == []


def test_without_slurm_the_job_is_refused_naming_the_install(expkit_cli, write_job):
    job = write_job(job_spec(), SIMPLE)
    result = expkit_cli("run", str(job), env={"PATH": os.path.dirname(sys.executable)})
    assert result.returncode == 2
    assert "Slurm" in error_line(result) and "install" in error_line(result)


@pytest.mark.slow
def test_the_sample_slurm_job_trains_on_two_nodes_and_registers_its_model(
    slurm_cluster2, expkit_workspace, expkit_cli
):
    job = REPO / "training" / "job-slurm.yaml"
    one_epoch = ["--set", "args.num_epochs=1", "--set", "environment=inherit"]
    result = expkit_cli("run", str(job), *one_epoch, env=slurm_cluster2.env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "epoch 1/1" in result.stdout  # rank 0's output, streamed from the shared folder
    assert "model pt-dnn version 1" in result.stdout
    run = record(expkit_workspace)
    assert expkit_workspace.history.tags.of(run.id)["slurm.nodes"] == ",".join(
        slurm_cluster2.node_names
    )
    assert expkit_workspace.history.metrics.latest(run.id)["best_val_acc"] > 0.1


def test_ctrl_c_in_runs_follow_stops_following_only(
    slurm_cluster, expkit_workspace, expkit_cli_background, write_job
):
    job = write_job(job_spec(), SIMPLE.replace('"0")))', '"300")))'))
    live = expkit_cli_background("run", str(job), env=slurm_cluster.env)
    live.wait_for("hello from", timeout=60)
    watcher = expkit_cli_background("runs", "follow", live.run_id, env=slurm_cluster.env)
    watcher.wait_for("hello from", timeout=60)
    watcher.interrupt()
    assert watcher.wait(timeout=30) == 130
    assert "stopped following; run 1 goes on" in watcher.output
    assert expkit_workspace.history.runs.get(live.run_id).state == "running"
    live.interrupt()
    assert live.wait(timeout=60) == 130
