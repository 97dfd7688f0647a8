"""A Slurm job's state, pending reason, nodes and exit code, as the driver polls them, on a
real private cluster; and what each final state means for the run.

Sources, cheapest first: squeue (a live job), scontrol show job (for MinJobAge after it ends),
sacct -c (the jobcomp file, no slurmdbd). The slurmdbd path (`sacct -X`) cannot run here (no
slurmdbd installed): its parsing is tested on the `sacct -P` lines Slurm documents.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from expkit.plugin import StageFailed
from expkit_slurm import states
from expkit_slurm.states import JobState


@pytest.fixture
def env(slurm_cluster) -> dict[str, str]:
    return {**os.environ, **slurm_cluster.env}


def sbatch(env: dict[str, str], *flags: str, wrap: str, cwd: Path) -> str:
    """Submit `wrap` as a batch job (output into `cwd`) and return its id."""
    done = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={cwd}", "--output=job-%j.log", *flags, f"--wrap={wrap}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def poll(job_id: str, env: dict[str, str], until, what: str, timeout: float = 60) -> JobState:
    """Query the job as the driver does until `until(state)`; the states seen on the way are
    kept in `poll.seen`."""
    deadline = time.monotonic() + timeout
    poll.seen = []
    while True:
        state = states.query(job_id, env)
        if state is not None and (not poll.seen or poll.seen[-1] != state.state):
            poll.seen.append(state.state)
        if state is not None and until(state):
            return state
        assert time.monotonic() < deadline, f"{what} did not happen (seen: {poll.seen})"
        time.sleep(0.05)


@contextlib.contextmanager
def reconfigured(cluster, **settings: str):
    """The cluster's slurm.conf with `settings` changed (`scontrol reconfigure`), restored
    afterwards."""
    conf = Path(cluster.env["SLURM_CONF"])
    before = conf.read_text()
    lines = before.splitlines()
    for key, value in settings.items():
        lines = [ln for ln in lines if not ln.startswith(f"{key}=")]
        lines.insert(0, f"{key}={value}")
    env = {**os.environ, **cluster.env}
    conf.write_text("\n".join(lines) + "\n")
    subprocess.run(["scontrol", "reconfigure"], env=env, check=True)
    try:
        yield
    finally:
        conf.write_text(before)
        subprocess.run(["scontrol", "reconfigure"], env=env, check=True)


def cleared(env: dict[str, str]) -> None:
    subprocess.run(["scancel", "--user=root"], env=env, check=True)
    deadline = time.monotonic() + 30
    while subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "the queue did not drain"
        time.sleep(0.05)


# -- on the cluster ------------------------------------------------------------------------
def test_a_job_waits_with_its_reason_then_runs_and_completes(slurm_cluster, env, tmp_path):
    """Pending behind a job holding every CPU (reason Resources or Priority), then running on
    the node, then completed with exit code 0."""
    blocker = sbatch(env, "--exclusive", wrap="sleep 60", cwd=tmp_path)
    poll(blocker, env, lambda s: s.state == "RUNNING", "the blocker running")
    job_id = sbatch(env, wrap="sleep 0.5", cwd=tmp_path)
    try:
        waiting = poll(job_id, env, lambda s: s.reason is not None, "a pending reason")
        assert waiting.state == "PENDING"
        assert waiting.reason in ("Resources", "Priority")
        assert waiting.nodes == [] and not waiting.finished
        assert states.never_starts(waiting) is None
    finally:
        states.cancel(blocker, env)
    running = poll(job_id, env, lambda s: s.state == "RUNNING", "the job running")
    assert running.nodes == slurm_cluster.node_names and running.reason is None
    done = poll(job_id, env, lambda s: s.finished, "the job's end")
    assert (done.state, done.exit_code, done.signal) == ("COMPLETED", 0, None)
    assert done.nodes == slurm_cluster.node_names
    assert states.outcome(done, None) == ("completed", None)
    assert poll.seen[-1] == "COMPLETED"


def test_a_failing_job_fails_with_its_exit_code(env, tmp_path):
    job_id = sbatch(env, wrap="exit 3", cwd=tmp_path)
    done = poll(job_id, env, lambda s: s.finished, "the job's end")
    assert (done.state, done.exit_code, done.signal) == ("FAILED", 3, None)
    assert states.outcome(done, 600) == ("failed", "Slurm job failed with exit code 3")


def test_a_job_killed_by_a_signal_says_which(env, tmp_path):
    job_id = sbatch(env, wrap="kill -9 $$", cwd=tmp_path)
    done = poll(job_id, env, lambda s: s.finished, "the job's end")
    assert (done.state, done.signal) == ("FAILED", 9)
    assert states.outcome(done, None) == ("failed", "Slurm job failed: killed by signal 9")


def test_cancel_ends_a_running_job_canceled_and_is_idempotent(env, tmp_path):
    job_id = sbatch(env, wrap="sleep 60", cwd=tmp_path)
    poll(job_id, env, lambda s: s.state == "RUNNING", "the job running")
    states.cancel(job_id, env)
    done = poll(job_id, env, lambda s: s.finished, "the job's end")
    assert done.state == "CANCELLED"
    assert states.outcome(done, None) == ("canceled", "canceled by Slurm (scancel)")
    states.cancel(job_id, env)  # already ended: nothing to do
    states.cancel("999999", env)  # never existed: nothing to do


def test_a_job_slurm_has_forgotten_is_read_from_the_jobcomp_file(slurm_cluster, env, tmp_path):
    """After MinJobAge neither squeue nor scontrol knows the job; without slurmdbd, `sacct -c`
    still gives its state, exit code and nodes."""
    with reconfigured(slurm_cluster, MinJobAge="2"):
        job_id = sbatch(env, wrap="exit 3", cwd=tmp_path)
        kept = poll(job_id, env, lambda s: s.finished, "the job's end")
        deadline = time.monotonic() + 120  # slurmctld purges old jobs every few seconds
        while subprocess.run(["scontrol", "show", "job", job_id], env=env).returncode == 0:
            assert time.monotonic() < deadline, "slurmctld kept the job past MinJobAge"
            time.sleep(0.5)
    gone = subprocess.run(["squeue", "-h", "-j", job_id], env=env, capture_output=True, text=True)
    assert "Invalid job id" in gone.stderr  # so the state below came from the jobcomp file
    forgotten = states.query(job_id, env)
    assert forgotten is not None
    assert (forgotten.state, forgotten.exit_code, forgotten.nodes) == ("FAILED", 3, kept.nodes)
    assert forgotten.finished


@pytest.mark.slow
def test_a_job_past_its_time_limit_ends_timeout(env, tmp_path):
    """Slurm's own time limit (the backstop when the driver is gone): a minute, the least
    Slurm takes, enforced on slurmctld's next check (about 80 s here)."""
    job_id = sbatch(env, "--time=1", wrap="sleep 300", cwd=tmp_path)
    done = poll(job_id, env, lambda s: s.finished, "the time limit", timeout=300)
    assert done.state == "TIMEOUT"
    assert states.outcome(done, 30) == ("time_limit", "time limit of 30 s reached")


def test_a_job_nobody_knows_is_none(env):
    assert states.query("999999", env) is None


def test_a_job_over_the_partitions_limit_never_starts(slurm_cluster, env, tmp_path):
    """A cluster that does not refuse it at submit (EnforcePartLimits=NO) leaves it pending
    with a reason that never clears: never_starts says so in one line."""
    with reconfigured(slurm_cluster, EnforcePartLimits="NO"):
        job_id = sbatch(env, "--nodes=2", wrap="true", cwd=tmp_path)
        try:
            waiting = poll(job_id, env, lambda s: s.reason is not None, "a pending reason")
        finally:
            cleared(env)
    # Slurm 22.05 says PartitionConfig for too many nodes at first, PartitionNodeLimit later
    assert waiting.state == "PENDING"
    assert waiting.reason in ("PartitionNodeLimit", "PartitionConfig")
    said = states.never_starts(waiting)
    assert said is not None and "\n" not in said
    assert said.startswith("Slurm can never start the job: ")
    assert said.endswith(f"(pending reason {waiting.reason})")


def test_two_node_job_names_both_nodes(slurm_cluster2, tmp_path):
    env = {**os.environ, **slurm_cluster2.env}
    job_id = sbatch(env, "--nodes=2", wrap="sleep 30", cwd=tmp_path)
    try:
        running = poll(job_id, env, lambda s: s.state == "RUNNING", "the job running")
        listed = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%N"], env=env, capture_output=True, text=True
        ).stdout.strip()
    finally:
        states.cancel(job_id, env)
    assert running.nodes == slurm_cluster2.node_names
    assert "[" in listed  # Slurm's compressed list (n[1-2]), expanded by Slurm itself
    assert states.hostnames(listed, env) == slurm_cluster2.node_names
    poll(job_id, env, lambda s: s.finished, "the job's end")


def test_a_node_failing_under_a_job_is_named(slurm_cluster2, tmp_path):
    """The second node taken down (and drained, so it stays out of service) under a running
    2-node job: the job ends NODE_FAIL (not requeued: expkit submits with --no-requeue) and
    the run's reason names that node with Slurm's reason."""
    env = {**os.environ, **slurm_cluster2.env}
    second = slurm_cluster2.node_names[1]
    job_id = sbatch(env, "--nodes=2", "--no-requeue", wrap="srun sleep 60", cwd=tmp_path)
    poll(job_id, env, lambda s: s.state == "RUNNING", "the job running")
    update = ["scontrol", "update", f"nodename={second}"]
    try:
        subprocess.run([*update, "state=drain", "reason=disk on fire"], env=env, check=True)
        subprocess.run([*update, "state=down", "reason=disk on fire"], env=env, check=True)
        done = poll(job_id, env, lambda s: s.finished, "the job's end")
    finally:
        subprocess.run([*update, "state=resume"], env=env)
        deadline = time.monotonic() + 60
        while True:  # back in service for the tests that follow
            sinfo = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True)
            if set(sinfo.stdout.split()) == {b"idle"}:
                break
            assert time.monotonic() < deadline, f"{second} did not come back: {sinfo.stdout}"
            time.sleep(0.1)
    assert done.state == "NODE_FAIL"
    assert list(done.failed_nodes) == [second]
    run_state, reason = states.outcome(done, None)
    assert run_state == "node_failure"
    assert reason.startswith(f"node {second} failed (Slurm: NODE_FAIL; {second} is ")
    assert reason.endswith("DRAIN: disk on fire)")


def test_a_controller_that_does_not_answer_is_a_stage_failure(slurm_cluster, tmp_path):
    conf = Path(slurm_cluster.env["SLURM_CONF"]).read_text()
    port = 1  # nothing listens there
    (tmp_path / "slurm.conf").write_text(
        re.sub(r"(?m)^SlurmctldPort=.*$", f"SlurmctldPort={port}", conf)
    )
    env = {**os.environ, "SLURM_CONF": str(tmp_path / "slurm.conf")}
    with pytest.raises(StageFailed, match=r"slurmctld at localhost:1 does not answer"):
        states.query("1", env)


def test_a_controller_that_accepts_but_never_replies_is_a_stage_failure(slurm_cluster, tmp_path):
    """As a paused or overloaded slurmctld: the connection is taken, no answer comes, and
    Slurm's commands say "Socket timed out on send/recv operation". That is no news of the
    job: the run must not end as if Slurm had forgotten it."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # never accepted: the kernel takes the connections, nobody answers
    conf = Path(slurm_cluster.env["SLURM_CONF"]).read_text()
    conf = re.sub(r"(?m)^SlurmctldPort=.*$", f"SlurmctldPort={silent.getsockname()[1]}", conf)
    (tmp_path / "slurm.conf").write_text("MessageTimeout=1\n" + conf)
    env = {**os.environ, "SLURM_CONF": str(tmp_path / "slurm.conf")}
    try:
        with pytest.raises(StageFailed, match=r"does not answer"):
            states.query("1", env)
    finally:
        silent.close()


# -- parsing and mapping -------------------------------------------------------------------
def test_sacct_lines_as_slurmdbd_gives_them():
    """`sacct -P -n -X -o JobID,State,ExitCode,NodeList`, in the format sacct(1) documents:
    a canceled state carries who canceled it, a requeued job has a line per start (the
    last is the newest), a one-node job names no range."""
    text = "41|CANCELLED by 1000|0:15|gpu[01-02]\n42|NODE_FAIL|0:0|gpu07\n42|FAILED|2:0|gpu03\n"
    env = dict(os.environ)  # only a host list with a range asks Slurm (scontrol hostnames)
    forty_two = states.parse_sacct("42", text, env)
    assert forty_two == JobState("42", "FAILED", None, ["gpu03"], 2, None, True)
    assert states.parse_sacct("43", text, env) is None
    assert states.parse_sacct("41", "41|TIMEOUT|0:0|gpu07\n", env) == JobState(
        "41", "TIMEOUT", None, ["gpu07"], 0, None, True
    )
    assert states.parse_sacct("41", "41|CANCELLED by 1000|0:15|None assigned\n", env).state == (
        "CANCELLED"
    )


def job(state: str, nodes=("n1",), exit_code=0, signal=None) -> JobState:
    return JobState("7", state, None, list(nodes), exit_code, signal, state in states.FINAL_STATES)


@pytest.mark.parametrize(
    "state, nodes, expected",
    [
        ("COMPLETED", ["n1"], ("completed", None)),
        ("CANCELLED", ["n1"], ("canceled", "canceled by Slurm (scancel)")),
        ("TIMEOUT", ["n1"], ("time_limit", "time limit of 7200 s reached")),
        ("NODE_FAIL", ["n2"], ("node_failure", "node n2 failed (Slurm: NODE_FAIL)")),
        (
            "BOOT_FAIL",
            ["n1", "n2"],
            ("node_failure", "a node of n1, n2 failed to boot (Slurm: BOOT_FAIL)"),
        ),
        ("NODE_FAIL", ["n1", "n2"], ("node_failure", "a node of n1, n2 failed (Slurm: NODE_FAIL)")),
        ("OUT_OF_MEMORY", ["n1"], ("failed", "out of memory on n1 (Slurm: OUT_OF_MEMORY)")),
        ("PREEMPTED", ["n1"], ("preempted", "preempted by another job (Slurm: PREEMPTED)")),
        ("BOOT_FAIL", ["n3"], ("node_failure", "node n3 failed to boot (Slurm: BOOT_FAIL)")),
        ("DEADLINE", ["n1"], ("failed", "the job's deadline passed (Slurm: DEADLINE)")),
        ("SPECIAL_EXIT", ["n1"], ("failed", "Slurm ended the job with state SPECIAL_EXIT")),
    ],
)
def test_each_final_state_ends_the_run(state, nodes, expected):
    assert states.outcome(job(state, nodes), 7200) == expected


def test_a_node_slurm_holds_down_is_the_one_named():
    failed = job("NODE_FAIL", ["n1", "n2"])
    failed.failed_nodes = {"n2": "DOWN: Not responding"}
    assert states.outcome(failed, None) == (
        "node_failure",
        "node n2 failed (Slurm: NODE_FAIL; n2 is DOWN: Not responding)",
    )


def test_time_limit_without_a_timeout_says_slurms_limit():
    assert states.outcome(job("TIMEOUT"), None) == (
        "time_limit",
        "Slurm's time limit for the job reached (Slurm: TIMEOUT)",
    )


def test_a_live_job_has_no_outcome_yet():
    for live in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        with pytest.raises(ValueError, match="has not finished"):
            states.outcome(job(live), None)


@pytest.mark.parametrize(
    "reason, never",
    [
        ("Resources", False),
        ("Priority", False),
        ("ReqNodeNotAvail, UnavailableNodes:n1", False),
        ("AssocGrpGRES", False),
        ("QOSMaxJobsPerUserLimit", False),
        ("JobHeldUser", False),
        ("PartitionNodeLimit", True),
        ("PartitionTimeLimit", True),
        ("BadConstraints", True),
        ("InvalidAccount", True),
        ("InvalidQOS", True),
        ("QOSMaxNodePerJobLimit", True),
        ("AssocMaxCpuPerJobLimit", True),
        ("QOSMinGRES", True),
        ("DependencyNeverSatisfied", True),
    ],
)
def test_never_starts_only_for_reasons_that_never_clear(reason, never):
    pending = JobState("7", "PENDING", reason)
    said = states.never_starts(pending)
    assert (said is not None) is never
    if never:
        assert said.startswith("Slurm can never start the job: ") and reason in said
    assert states.never_starts(JobState("7", "RUNNING", reason)) is None


def test_squeue_told_to_show_ended_jobs_still_gives_the_exit_code(env, tmp_path):
    """A user's SQUEUE_STATES=all makes squeue list ended jobs, without an exit code: the
    exit code still comes from Slurm's record."""
    job_id = sbatch(env, wrap="exit 4", cwd=tmp_path)
    poll(job_id, env, lambda s: s.finished, "the job's end")
    done = states.query(job_id, {**env, "SQUEUE_STATES": "all"})
    assert (done.state, done.exit_code) == ("FAILED", 4)


def test_waiting_text_is_the_pending_reason():
    assert states.waiting_text(JobState("7", "PENDING", "Priority")) == "Priority"
    assert states.waiting_text(JobState("7", "PENDING", None)) == "pending"
    assert states.waiting_text(JobState("7", "CONFIGURING")) == "configuring nodes"
    assert states.waiting_text(JobState("7", "RUNNING", None, ["n1"])) is None
