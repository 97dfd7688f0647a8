"""Attempts on Slurm: requeues, the planned stop before the time limit, checkpoints carried.

What a user relies on: Slurm may requeue a job only when the job's `retry` allows another
attempt, and signals the launcher before the time limit only when the job has `checkpoints`;
the stop signal reaches each rank's own process (not its data loader workers); the ranks see
which attempt they are (EXPKIT_ATTEMPT = the attempt submitted + Slurm's restart count); a job
requeued by `scontrol requeue` comes back as attempt 2 of the same run (one run, one model
version); a time limit makes the script checkpoint, and the next attempt resumes from it.

The e2e tests use the private cluster of the `slurm_cluster` fixture, which starts a requeued
job again about 6 s after the requeue (devcluster's cred_expire and sched_interval).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import eventually
from expkit.plugin import JobSpec
from expkit_slurm import batch, launch
from expkit_slurm.options import TAKES
from expkit_slurm.target import SlurmTarget


def job(**fields) -> JobSpec:
    return JobSpec.from_dict({"experiment": "t", "entry_script": "train.py", **fields})


def options() -> dict:
    return {n: o.default for n, o in TAKES.items() if o.default is not None}


def signal_flags(spec: JobSpec) -> list[str]:
    return [d for d in batch.directives(spec, options(), "r", Path("/r")) if "signal" in d]


# -- the batch job's directives (no cluster) --------------------------------------------------
def test_slurm_may_requeue_the_job_only_when_retry_allows_another_attempt():
    once = batch.directives(job(), options(), "r", Path("/r"))
    assert "--no-requeue" in once and "--requeue" not in once
    for retry in ({"max_attempts": 2}, {"max_attempts": 3, "on": ["time_limit"]}):
        again = batch.directives(job(retry=retry), options(), "r", Path("/r"))
        assert "--requeue" in again and "--no-requeue" not in again


def test_the_launcher_is_signalled_before_the_time_limit_only_with_checkpoints():
    assert signal_flags(job(timeout=600)) == []
    assert signal_flags(job(retry={"max_attempts": 2})) == []
    spec = job(timeout=600, checkpoints={"path": "ckpt", "grace_seconds": 30})
    got = batch.directives(spec, options(), "r", Path("/r"))
    # 600 s and 30 s to checkpoint: 11 minutes, plus the margin; the signal at 600 s into it
    assert "--time=12" in got
    assert signal_flags(spec) == ["--signal=B:URG@120"]
    # No `timeout`: the partition's limit, `grace_seconds` before it.
    assert signal_flags(job(checkpoints="ckpt")) == ["--signal=B:URG@30"]


def test_the_launcher_passes_the_stop_signal_on_only_with_checkpoints():
    plain = SlurmTarget().dry_run(job(timeout=60))
    assert "--stop-signal" not in plain and "--signal" not in plain
    script = SlurmTarget().dry_run(job(timeout=60, checkpoints={"path": "c", "signal": "SIGUSR2"}))
    assert "--stop-signal SIGUSR2" in script
    assert "#SBATCH --signal=B:URG@" in script


def test_sbatch_args_may_not_truncate_the_log_a_requeued_job_appends_to():
    """`--open-mode=append` keeps attempt 1's launcher lines when Slurm requeues the job (and
    the launcher's log is where a failing rank is found): a user's `--open-mode=truncate`
    after it would silently win, so it is refused like the other flags expkit sets."""
    from expkit_slurm.options import refused_flag

    for arg in ("--open-mode=truncate", "--open-mode", "--open=append"):
        reason = refused_flag(arg)
        assert reason is not None and "(--open-mode)" in reason, arg
    assert refused_flag("--exclusive") is None


@pytest.mark.parametrize(
    "submitted, restarts, attempt",
    [(None, None, 1), ("1", None, 1), ("1", "1", 2), ("2", "3", 5), ("x", "", 1)],
)
def test_the_ranks_attempt_is_the_submitted_one_plus_slurms_restarts(
    submitted, restarts, attempt, monkeypatch
):
    for name, value in (("EXPKIT_ATTEMPT", submitted), ("SLURM_RESTART_COUNT", restarts)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert launch.attempt() == attempt


# -- the node side on the real cluster --------------------------------------------------------
# A rank with a data loader-like worker (forked: it inherits the rank's handlers, as torch's
# workers do): each says what it got; the rank exits 0 after the stop signal.
RANK = """
    import multiprocessing, os, signal, sys, time
    out = sys.argv[1]

    def note(text):
        with open(os.path.join(out, text), "w") as f:
            f.write(os.environ.get("EXPKIT_ATTEMPT", "-"))

    def stop(number, frame):
        note(f"{'rank' if os.getpid() == rank else 'worker'} got {signal.Signals(number).name}")
        if os.getpid() == rank:
            sys.exit(0)

    rank = os.getpid()
    signal.signal(signal.SIGUSR1, stop)
    fork = multiprocessing.get_context("fork")
    worker = fork.Process(target=time.sleep, args=(300,), daemon=True)
    worker.start()
    note(f"up.{os.environ.get('SLURM_RESTART_COUNT', '0')}")
    time.sleep(300)
"""


def slurm(env: dict, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=True)


def submit_launcher(env: dict, tmp_path: Path, *flags: str) -> tuple[str, Path]:
    """Submit a batch job that starts RANK through launch.py with `--stop-signal SIGUSR1`;
    its id and the folder where the rank notes what it got."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "rank.py").write_text(textwrap.dedent(RANK))
    body = launch.launcher_argv(
        sys.executable,
        "none",
        1,
        1,
        0,
        tmp_path / "logs",
        [sys.executable, str(tmp_path / "rank.py"), str(out)],
        stop_signal="SIGUSR1",
        state_dir=tmp_path,
    )
    script = tmp_path / "job.sh"
    script.write_text(batch.script([f"--output={tmp_path / 'launcher.log'}", *flags], body))
    job_id = slurm(env, "sbatch", "--parsable", str(script)).stdout.strip()
    return job_id, out


@pytest.fixture
def env(slurm_cluster) -> dict[str, str]:
    return {**os.environ, **slurm_cluster.env, "EXPKIT_ATTEMPT": "1"}


@pytest.mark.parametrize("who", ["the driver", "Slurm's time limit"])
def test_the_stop_signal_reaches_each_ranks_own_process_not_its_workers(who, env, tmp_path):
    job_id, out = submit_launcher(env, tmp_path)
    eventually(lambda: (out / "up.0").exists(), timeout=60, what="the rank up")
    if who == "the driver":  # what SlurmTarget does at a planned stop (states.signal_steps)
        slurm(env, "scancel", f"--signal={batch.RELAY_SIGNAL}", job_id)
    else:  # what Slurm does at `--signal=B:URG@N`: the batch script (the launcher) only
        slurm(env, "scancel", "--batch", f"--signal={batch.RELAY_SIGNAL}", job_id)
    eventually(lambda: (out / "rank got SIGUSR1").exists(), timeout=30, what="the stop signal")
    eventually(
        lambda: "COMPLETED" in slurm(env, "scontrol", "show", "job", job_id).stdout,
        timeout=30,
        what="the job completed",
    )
    assert sorted(p.name for p in out.iterdir()) == ["rank got SIGUSR1", "up.0"]
    assert (out / "up.0").read_text() == "1"  # EXPKIT_ATTEMPT of the first start
    mark = launch.time_limit_mark(tmp_path, job_id, 0)
    assert mark.exists() is (who == "Slurm's time limit")


def test_a_requeued_job_starts_its_ranks_again_as_the_next_attempt(env, tmp_path):
    job_id, out = submit_launcher({**env, "EXPKIT_ATTEMPT": "3"}, tmp_path, "--requeue")
    eventually(lambda: (out / "up.0").exists(), timeout=60, what="the rank up")
    slurm(env, "scontrol", "requeue", job_id)
    eventually(lambda: (out / "up.1").exists(), timeout=60, what="the job started again")
    assert (out / "up.0").read_text() == "3" and (out / "up.1").read_text() == "4"
    slurm(env, "scancel", job_id)


# -- end to end: `expkit run` (needs the lifecycle's attempts) ---------------------------------
def job_spec(**changes) -> dict:
    spec = {
        "compute": {"target": "slurm", "options": {"poll_seconds": 0.5}},
        "resources": {"nodes": 1, "processes_per_node": 1},
        "distributed": "none",
        "timeout": 120,
    }
    spec.update(changes)
    return spec


# Attempt 1 waits to be requeued; attempt 2 writes the model.
WAITS_FOR_A_REQUEUE = """
    import os, time
    from expkit import Run

    run = Run.get_context()
    job, restarts = os.environ["SLURM_JOB_ID"], os.environ.get("SLURM_RESTART_COUNT", "0")
    print(f"attempt {run.attempt} in job {job} restart {restarts}", flush=True)
    run.log("attempt", run.attempt)
    if run.attempt == 1:
        time.sleep(300)
    os.makedirs("outputs", exist_ok=True)
    with open("outputs/model.pt", "w") as f:
        f.write(f"weights of attempt {run.attempt}")
"""


def test_a_job_requeued_by_scontrol_comes_back_as_attempt_2_of_the_same_run(
    slurm_cluster, expkit_workspace, expkit_cli_background, write_job
):
    spec = job_spec(retry={"max_attempts": 2}, model={"name": "m", "path": "outputs/model.pt"})
    live = expkit_cli_background(
        "run", str(write_job(spec, WAITS_FOR_A_REQUEUE)), env=slurm_cluster.env
    )
    live.wait_for("attempt 1 in job", timeout=60)
    history = expkit_workspace.history
    eventually(  # attempt 1's value recorded before the requeue stops it
        lambda: history.metrics.latest(live.run_id).get("attempt") == 1,
        what="attempt 1's metric",
    )
    run = history.runs.get(live.run_id)
    job_id = run.remote_job.removeprefix("slurm:")
    subprocess.run(
        ["scontrol", "requeue", job_id],
        env={**os.environ, **slurm_cluster.env},
        check=True,
    )
    assert live.wait(timeout=120) == 0, live.output
    assert f"attempt 2 in job {job_id} restart 1" in live.output  # the same Slurm job
    run = history.runs.get(live.run_id)
    assert run.state == "completed" and run.attempt == 2, run.error
    assert [runs.id for runs in history.runs.recent(limit=10)] == [run.id]  # no new run
    attempts = history.attempts.of(run.id)
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "preempted"), (2, "completed")]
    assert "requeue" in (attempts[0].reason or "")
    versions = history.models.versions("m")
    assert [(v["version"], v["run_id"]) for v in versions] == [(1, run.id)]
    model = expkit_workspace.models_dir / "m" / "1" / "model.pt"
    assert model.read_text() == "weights of attempt 2"
    # Each attempt's values are kept with it (the channel file of attempt 2 says so).
    assert sorted(m["value"] for m in history.metrics.of(run.id, "attempt")) == [1, 2]


def test_a_driver_that_re_attaches_records_the_requeue_it_did_not_see(
    slurm_cluster, expkit_workspace, expkit_cli, expkit_cli_background, write_job
):
    env = {**os.environ, **slurm_cluster.env}
    spec = job_spec(retry={"max_attempts": 2})
    live = expkit_cli_background(
        "run", str(write_job(spec, WAITS_FOR_A_REQUEUE)), env=slurm_cluster.env
    )
    live.wait_for("attempt 1 in job", timeout=60)
    run_id = live.run_id
    job_id = expkit_workspace.history.runs.get(run_id).remote_job.removeprefix("slurm:")
    os.killpg(live.proc.pid, signal.SIGKILL)  # no driver follows the job any more
    live.proc.wait()
    subprocess.run(["scontrol", "requeue", job_id], env=env, check=True)
    log = expkit_workspace.run_dir(run_id) / "logs" / "rank-0.log"
    eventually(lambda: "attempt 2 in job" in log.read_text(), timeout=60, what="attempt 2")
    result = expkit_cli("runs", "follow", run_id, env=slurm_cluster.env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    history = expkit_workspace.history
    run = history.runs.get(run_id)
    assert run.state == "completed" and run.attempt == 2, run.error
    attempts = history.attempts.of(run_id)
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "preempted"), (2, "completed")]


def test_a_job_slurm_requeues_after_its_node_failed_is_the_next_attempt(
    slurm_cluster2, expkit_workspace, expkit_cli_background, write_job
):
    env = {**os.environ, **slurm_cluster2.env}
    live = expkit_cli_background(
        "run",
        str(write_job(job_spec(retry={"max_attempts": 2}), WAITS_FOR_A_REQUEUE)),
        env=slurm_cluster2.env,
    )
    live.wait_for("attempt 1 in job", timeout=60)
    node = expkit_workspace.history.tags.of(live.run_id)["slurm.nodes"]
    update = ["scontrol", "update", f"nodename={node}"]
    try:
        subprocess.run([*update, "state=drain", "reason=disk on fire"], env=env, check=True)
        subprocess.run([*update, "state=down", "reason=disk on fire"], env=env, check=True)
        assert live.wait(timeout=120) == 0, live.output  # attempt 2 on the other node
    finally:
        subprocess.run([*update, "state=resume"], env=env)
        eventually(
            lambda: set(slurm(env, "sinfo", "-h", "-o", "%t").stdout.split()) == {"idle"},
            timeout=60,
            what=f"{node} back in service",
        )
    run = expkit_workspace.history.runs.get(live.run_id)
    assert run.state == "completed" and run.attempt == 2, run.error
    attempts = expkit_workspace.history.attempts.of(run.id)
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "node_failure"), (2, "completed")]
    reason = attempts[0].reason or ""
    assert f"after a node failed ({node} is " in reason and "DRAIN: disk on fire" in reason, reason


# The stop signal's handler writes the step reached; an attempt that finds it resumes there.
CHECKPOINTS_AT_THE_STOP = """
    import signal, sys

    def stop(number, frame):  # first of all: Slurm's signal may come early (sbatch(1))
        stopped.append(number)

    stopped = []
    signal.signal(signal.SIGUSR1, stop)

    import json, os, time
    from expkit import Run

    run = Run.get_context()
    path = os.path.join(run.checkpoint_dir, "state.json")
    step = 0
    if os.path.exists(path):
        with open(path) as f:
            step = json.load(f)["step"]
        print(f"resuming from checkpoint: step {step} (attempt {run.attempt})", flush=True)
    print(f"attempt {run.attempt} running", flush=True)
    while run.attempt == 1 and not stopped:
        step += 1
        run.log("step", step, step=step)
        time.sleep(0.05)
    if stopped:
        with open(path + ".tmp", "w") as f:
            json.dump({"step": step}, f)
        os.replace(path + ".tmp", path)
        print(f"checkpoint written at step {step}", flush=True)
        sys.exit(0)
    os.makedirs("outputs", exist_ok=True)
    with open("outputs/done.txt", "w") as f:
        f.write(f"resumed at step {step}")
"""


def test_the_time_limit_makes_the_script_checkpoint_and_the_next_attempt_resumes(
    slurm_cluster, expkit_workspace, expkit_cli, write_job
):
    spec = job_spec(
        timeout=6,
        retry={"max_attempts": 2, "on": ["time_limit"]},
        checkpoints={"path": "./ckpt", "grace_seconds": 20},
    )
    job = write_job(spec, CHECKPOINTS_AT_THE_STOP)
    result = expkit_cli("run", str(job), env=slurm_cluster.env, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    # Each line once: attempt 2's job is followed from where attempt 1's lines end.
    assert result.stdout.count("checkpoint written at step") == 1, result.stdout
    assert result.stdout.count("attempt 1 running") == 1
    history = expkit_workspace.history
    run = history.runs.find("latest")
    assert run.state == "completed" and run.attempt == 2, run.error
    attempts = history.attempts.of(run.id)
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "time_limit"), (2, "completed")]
    reached = int(result.stdout.split("checkpoint written at step ")[1].split()[0])
    assert f"resuming from checkpoint: step {reached} (attempt 2)" in result.stdout
    assert history.outputs.of(run.id).keys() == {"done.txt"}


@pytest.mark.slow
def test_without_a_driver_slurms_time_limit_signal_makes_the_script_checkpoint(
    slurm_cluster, expkit_workspace, expkit_cli, expkit_cli_background, write_job
):
    """Slurm's own `--signal=B:URG@N` (no driver follows: it was killed): the launcher relays
    the stop signal, the script checkpoints and ends; the driver that re-attaches ends the
    attempt `time_limit` and the next attempt resumes. Slurm checks the time about every
    30 s, so the signal comes 0-60 s early or late of the nominal 10 s here."""
    spec = job_spec(
        timeout=10,
        retry={"max_attempts": 2, "on": ["time_limit"]},
        checkpoints={"path": "./ckpt", "grace_seconds": 20},
    )
    live = expkit_cli_background(
        "run", str(write_job(spec, CHECKPOINTS_AT_THE_STOP)), env=slurm_cluster.env
    )
    live.wait_for("attempt 1 running", timeout=60)
    run_id = live.run_id
    os.killpg(live.proc.pid, signal.SIGKILL)  # no driver follows the job any more
    live.proc.wait()
    log = expkit_workspace.run_dir(run_id) / "logs" / "rank-0.log"
    eventually(
        lambda: "checkpoint written at step" in log.read_text(),
        timeout=150,
        what="Slurm's signal before the time limit",
    )
    result = expkit_cli("runs", "follow", run_id, env=slurm_cluster.env, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    history = expkit_workspace.history
    run = history.runs.get(run_id)
    assert run.state == "completed" and run.attempt == 2, run.error
    attempts = history.attempts.of(run_id)
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "time_limit"), (2, "completed")]
    assert "stopped at the time limit" in (attempts[0].reason or "")
    reached = int(log.read_text().split("checkpoint written at step ")[1].split()[0])
    assert f"resuming from checkpoint: step {reached} (attempt 2)" in log.read_text()


def test_a_requeue_request_stops_the_attempt_with_the_stop_signal_and_the_next_resumes(
    slurm_cluster, expkit_workspace, expkit_cli_background, write_job
):
    """`expkit runs cancel --requeue` (the request it records): a planned stop, so the ranks
    get the stop signal and checkpoint before scancel; the next attempt resumes."""
    spec = job_spec(
        retry={"max_attempts": 2},
        checkpoints={"path": "./ckpt", "grace_seconds": 30},
    )
    live = expkit_cli_background(
        "run", str(write_job(spec, CHECKPOINTS_AT_THE_STOP)), env=slurm_cluster.env
    )
    live.wait_for("attempt 1 running", timeout=60)
    expkit_workspace.history.runs.request_requeue(live.run_id)
    assert live.wait(timeout=120) == 0, live.output
    assert "get SIGUSR1 and 30s to write a checkpoint" in live.output
    reached = int(live.output.split("checkpoint written at step ")[1].split()[0])
    assert f"resuming from checkpoint: step {reached} (attempt 2)" in live.output
    run = expkit_workspace.history.runs.get(live.run_id)
    assert run.state == "completed" and run.attempt == 2, run.error
    attempts = expkit_workspace.history.attempts.of(run.id)
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "preempted"), (2, "completed")]
