"""The slurm target's options, batch script and submission, against a real private cluster.

What a user relies on: the options refuse what would break the job and name what to set
instead; the batch script asks Slurm for exactly the job's shape and writes where the run
reads; a request Slurm refuses is one line with Slurm's own reason, at submit and before any
run (`sbatch --test-only`); a controller that does not answer is said as such.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from pathlib import Path

import pytest

from expkit.plugin import JobSpec, StageFailed, UserError
from expkit_slurm import batch
from expkit_slurm.options import TAKES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True)


def job(**fields) -> JobSpec:
    return JobSpec.from_dict({"experiment": "t", "entry_script": "train.py", **fields})


def options(**given) -> dict:
    """compute.options as the target gets them: checked, with the declared defaults."""
    for name, value in given.items():
        assert TAKES[name].problem(value) is None, name
    return {**{n: o.default for n, o in TAKES.items() if o.default is not None}, **given}


@pytest.fixture
def env(slurm_cluster) -> dict[str, str]:
    return {**os.environ, **slurm_cluster.env}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run's folder as the lifecycle lays it out, on a path the "nodes" can read (with a
    space, which the #SBATCH lines must quote)."""
    run_dir = tmp_path / "run 1"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "work").mkdir()
    return run_dir


def wait_for_end(job_id: str, env: dict[str, str]) -> None:
    deadline = time.monotonic() + 60
    while _slurm(["squeue", "-h", "-j", job_id], env).stdout.strip():
        assert time.monotonic() < deadline, f"job {job_id} did not end"
        time.sleep(0.1)


# -- options -------------------------------------------------------------------------------
def test_every_option_has_a_help_line():
    assert set(TAKES) >= {"partition", "account", "qos", "constraint", "mem", "gpus"}
    assert set(TAKES) >= {"sbatch_args", "poll_seconds"}
    for name, option in TAKES.items():
        assert option.help, name


@pytest.mark.parametrize(
    "arg, instead",
    [
        ("--nodes=2", "resources.nodes"),
        ("-N", "resources.nodes"),
        ("--node=2", "resources.nodes"),  # sbatch takes a prefix of a long flag
        ("--ntasks=8", "resources.processes_per_node"),
        ("--ntasks-per-node=4", "resources.processes_per_node"),
        ("--gpus-per-node=2", "resources.gpus_per_node"),
        ("--time=10", "timeout"),
        ("-t", "timeout"),
        ("--output=x.log", "launcher.log"),
        ("--error=x.log", "launcher.log"),
        ("--job-name=x", "names the job"),
        ("--chdir=/tmp", "work folder"),
        ("--wrap=hostname", "entry_script"),
        ("--parsable", "job id"),
        ("--wait", "follows the job"),
        ("--array=1-3", "array"),
        ("--partition=gpu", "compute.options.partition"),
        ("-p", "compute.options.partition"),
        ("-A", "compute.options.account"),
        ("--mem=4G", "compute.options.mem"),
        ("--export=NONE", "--export=ALL"),
        ("--gres=gpu:2", "resources.gpus_per_node"),
        ("--gres", "--gres=nvme:1"),
        ("--requeue", "retry.max_attempts"),
        ("--no-requeue", "retry.max_attempts"),
        ("--signal=B:USR1@60", "checkpoints"),
    ],
)
def test_sbatch_args_refuse_the_flags_expkit_sets(arg, instead):
    problem = TAKES["sbatch_args"].problem(["--exclusive", arg])
    assert problem is not None and arg in problem and instead in problem


@pytest.mark.parametrize(
    "arg",
    ["--exclusive", "--nodelist=n1", "--mem-per-cpu=2G", "--time-min=5",
     "--dependency=afterok:12", "-w", "--gres=nvme:1"],
)  # fmt: skip
def test_sbatch_args_take_what_expkit_leaves_to_the_user(arg):
    assert TAKES["sbatch_args"].problem([arg]) is None


@pytest.mark.parametrize("mem, good", [("64G", True), ("4096", True), ("512M", True),
                                       ("0", True), ("64GB", False), ("64 G", False),
                                       ("lots", False)])  # fmt: skip
def test_mem_takes_slurms_syntax(mem, good):
    assert (TAKES["mem"].problem(mem) is None) is good


def test_gpus_is_gpus_per_node_or_gres():
    assert TAKES["gpus"].default == "gpus-per-node"
    assert TAKES["gpus"].problem("gres") is None
    assert "gpus-per-node or gres" in TAKES["gpus"].problem("gpu")


# -- the batch script ----------------------------------------------------------------------
def test_directives_ask_for_the_jobs_shape():
    spec = job(resources={"nodes": 2, "processes_per_node": 4, "gpus_per_node": 4}, timeout=7200)
    got = batch.directives(
        spec,
        options(partition="gpu", account="proj42", qos="normal", constraint="a100", mem="64G",
                sbatch_args=["--exclusive"]),
        "r1",
        Path("/shared/runs/r1"),
    )  # fmt: skip
    assert got == [
        "--job-name=expkit-r1",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--time=121",  # 7200 s = 120 min, plus a minute so the driver's own timeout fires first
        "--output=/shared/runs/r1/logs/launcher.log",
        "--open-mode=append",
        "--no-requeue",
        "--chdir=/shared/runs/r1/work",
        "--export=ALL",
        "--partition=gpu",
        "--account=proj42",
        "--qos=normal",
        "--constraint=a100",
        "--mem=64G",
        "--exclusive",
    ]


def test_gpus_through_gres_with_a_type_and_the_users_other_gres():
    spec = job(resources={"gpus_per_node": 2})
    got = batch.directives(
        spec, options(gpus="gres", gpu_type="a100", sbatch_args=["--gres=nvme:1"]), "r", Path("/r")
    )
    assert "--gres=gpu:a100:2,nvme:1" in got
    assert not any(d.startswith("--gpus") for d in got)
    assert got.count("--gres=gpu:a100:2,nvme:1") == 1 and "--gres=nvme:1" not in got
    assert "--gpus-per-node=a100:2" in batch.directives(
        spec, options(gpu_type="a100"), "r", Path("/r")
    )


def test_no_gpus_no_time_limit_no_flags_for_them():
    got = batch.directives(job(), options(), "r", Path("/r"))
    assert not any(d.startswith(("--gpus", "--gres", "--time")) for d in got)


@pytest.mark.parametrize(
    "seconds, minutes", [(7200, 121), (60, 2), (61, 3), (0.5, 2), (None, None)]
)
def test_time_limit_rounds_up_to_minutes_plus_a_margin(seconds, minutes):
    assert batch.time_limit(seconds) == minutes


def test_script_is_readable_and_quotes_the_command():
    text = batch.script(
        ["--job-name=expkit-r1", "--nodes=2", "--chdir=/runs/a b/work"],
        ["/venv/bin/python", "-m", "expkit_slurm.launch", "--run-dir", "/runs/a b"],
    )
    assert text == (
        "#!/bin/bash\n"
        "#SBATCH --job-name=expkit-r1\n"
        "#SBATCH --nodes=2\n"
        "#SBATCH '--chdir=/runs/a b/work'\n"
        "\n"
        "# expkit run r1\n"
        "exec /venv/bin/python -m expkit_slurm.launch --run-dir '/runs/a b'\n"
    )


def test_command_line_is_what_submit_runs(tmp_path):
    assert batch.command_line(tmp_path / "job.sh") == [
        "sbatch",
        "--parsable",
        str(tmp_path / "job.sh"),
    ]


# -- submission on a real cluster ----------------------------------------------------------
def test_submitted_script_runs_where_the_run_reads(env, run_dir):
    """The job's name, working folder and output file are those the directives say, and the
    body runs with its arguments intact."""
    flags = batch.directives(job(timeout=300), options(), "r-1", run_dir)
    body = ["bash", "-c", 'echo "$SLURM_JOB_NAME in $PWD: $1"', "x", "two words"]
    path = run_dir / "job.sh"
    path.write_text(batch.script(flags, body))
    job_id = batch.submit(path, env)
    assert job_id.isdigit()
    wait_for_end(job_id, env)
    log = (run_dir / "logs" / "launcher.log").read_text()
    assert log == f"expkit-r-1 in {run_dir / 'work'}: two words\n"


def test_a_run_folder_with_a_percent_sign_is_written_as_is(env, tmp_path):
    """Slurm expands %j in --output: a run folder named `100%j` is still the one written."""
    run_dir = tmp_path / "100%j"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "work").mkdir()
    path = run_dir / "job.sh"
    path.write_text(batch.script(batch.directives(job(), options(), "r", run_dir), ["pwd"]))
    wait_for_end(batch.submit(path, env), env)
    assert (run_dir / "logs" / "launcher.log").read_text() == f"{run_dir / 'work'}\n"


def test_two_node_job_gets_both_nodes(slurm_cluster2, run_dir):
    env = {**os.environ, **slurm_cluster2.env}
    flags = batch.directives(job(resources={"nodes": 2}), options(), "r2", run_dir)
    path = run_dir / "job.sh"
    path.write_text(batch.script(flags, ["bash", "-c", "echo $SLURM_JOB_NUM_NODES $SLURM_NTASKS"]))
    wait_for_end(batch.submit(path, env), env)
    assert (run_dir / "logs" / "launcher.log").read_text() == "2 2\n"


@pytest.mark.parametrize("ask", ["nodes", "cpus", "partition", "mem"])
def test_a_request_slurm_refuses_is_one_line_with_its_reason(env, run_dir, ask):
    """One node more than the partition has, one CPU more than a node has, a partition that
    does not exist, more memory than any node has."""
    parts = batch.partitions(env)
    name, part = next((n, p) for n, p in parts.items() if p["default"])
    plural = "s" if part["nodes"] != 1 else ""
    fields, opts, reason = {
        "nodes": (
            {"resources": {"nodes": part["nodes"] + 1}},
            {},
            f"Node count specification invalid (partition {name} has {part['nodes']} node{plural})",
        ),
        "cpus": (
            {"resources": {"processes_per_node": part["cpus"] // part["nodes"] + 1}},
            {},
            f"More processors requested than permitted (partition {name} has {part['cpus']} "
            f"CPUs on {part['nodes']} node(s))",
        ),
        "partition": (
            {},
            {"partition": "nope"},
            f"invalid partition specified: nope (partitions: {', '.join(sorted(parts))})",
        ),
        "mem": ({}, {"mem": "100000G"}, "Requested node configuration is not available"),
    }[ask]
    flags = batch.directives(job(**fields), options(**opts), "r", run_dir)
    with pytest.raises(UserError) as before_run:
        batch.test_only(flags, env)
    assert str(before_run.value) == f"compute: Slurm refuses the job: {reason}"
    path = run_dir / "job.sh"
    path.write_text(batch.script(flags, ["true"]))
    with pytest.raises(UserError) as at_submit:
        batch.submit(path, env)
    assert "\n" not in str(at_submit.value)
    assert reason.split(" (")[0] in str(at_submit.value)  # sbatch may say more than --test-only
    assert _slurm(["squeue", "-h"], env).stdout == ""  # nothing left queued


def test_a_timeout_over_the_partitions_time_limit_names_both(env, run_dir):
    """A timeout equal to the partition's MaxTime is refused: Slurm's --time gets expkit's
    margin on top. The reason Slurm gives does not say which limit; the hint does."""
    parts = batch.partitions(env)
    name, part = next(
        ((n, p) for n, p in parts.items() if p["max_time"] != "UNLIMITED"), (None, None)
    )
    if part is None:
        pytest.skip("no partition with a time limit on this cluster")
    hours, minutes, _ = (int(x) for x in part["max_time"].split("-")[-1].split(":"))
    seconds = (hours * 60 + minutes) * 60
    flags = batch.directives(job(timeout=seconds), options(partition=name), "r", run_dir)
    with pytest.raises(UserError) as refused:
        batch.test_only(flags, env)
    assert f"(partition {name} allows {part['max_time']}; the job asks --time=" in str(
        refused.value
    )


def test_a_flag_sbatch_does_not_know_is_named(env, run_dir):
    flags = batch.directives(job(), options(sbatch_args=["--bogus"]), "r", run_dir)
    with pytest.raises(UserError) as refused:
        batch.test_only(flags, env)
    assert str(refused.value) == "compute: Slurm refuses the job: unrecognized option '--bogus'"


def test_test_only_accepts_a_job_that_fits(env, run_dir):
    batch.test_only(batch.directives(job(), options(), "r", run_dir), env)
    assert _slurm(["squeue", "-h"], env).stdout == ""


def test_reason_lines_lose_sbatchs_prefixes():
    stderr = (
        "sbatch: error: invalid partition specified: nope\n"
        "sbatch: error: Batch job submission failed: Invalid partition name specified\n"
    )
    assert batch.slurm_reason(stderr) == "invalid partition specified: nope"
    assert batch.slurm_reason("allocation failure: Node count specification invalid\n") == (
        "Node count specification invalid"
    )


@pytest.fixture
def down_env(slurm_cluster, tmp_path) -> dict[str, str]:
    """The cluster's slurm.conf with a controller port nothing listens on."""
    conf = Path(slurm_cluster.env["SLURM_CONF"]).read_text()
    port = _free_port()
    lines = [f"SlurmctldPort={port}" if ln.startswith("SlurmctldPort=") else ln
             for ln in conf.splitlines()]  # fmt: skip
    (tmp_path / "slurm.conf").write_text("\n".join(lines) + "\n")
    return {**os.environ, "SLURM_CONF": str(tmp_path / "slurm.conf"), "_PORT": str(port)}


def test_controller_down_is_a_stage_failure(down_env, run_dir):
    said = f"slurmctld at localhost:{down_env['_PORT']} does not answer (scontrol ping)"
    with pytest.raises(StageFailed) as before_run:
        batch.test_only(batch.directives(job(), options(), "r", run_dir), down_env)
    assert str(before_run.value) == said
    path = run_dir / "job.sh"
    path.write_text(batch.script(["--job-name=expkit-r"], ["true"]))
    with pytest.raises(StageFailed) as at_submit:  # after sbatch's own retries (about 9 s)
        batch.submit(path, down_env)
    assert str(at_submit.value) == said


def test_script_directives_round_trip(run_dir):
    flags = batch.directives(job(), options(partition="gpu"), "r", Path("/a b"))
    path = run_dir / "job.sh"
    path.write_text(batch.script(flags, ["true"]))
    assert batch._directives_of(path) == flags
    assert shlex.split(path.read_text().splitlines()[-1]) == ["exec", "true"]
