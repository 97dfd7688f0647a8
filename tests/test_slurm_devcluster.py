"""The private Slurm cluster (expkit_slurm.devcluster): the fixtures' clusters, and the
`python -m expkit_slurm.devcluster start|status|stop DIR` command a user runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import alive
from expkit_slurm import devcluster


def slurm(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def devcluster_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "expkit_slurm.devcluster", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_two_simulated_nodes_run_one_step_across_both(slurm_cluster2):
    assert slurm_cluster2.node_names == ["n1", "n2"]
    step = slurm(
        "srun",
        "--nodes=2",
        "--ntasks-per-node=2",
        "sh",
        "-c",
        "echo $SLURM_PROCID $SLURMD_NODENAME",
    )
    assert step.returncode == 0, step.stderr
    assert sorted(step.stdout.splitlines()) == ["0 n1", "1 n1", "2 n2", "3 n2"]


def test_the_partition_a_job_asks_for_decides_whether_it_can_ever_run(slurm_cluster2):
    """`small` holds the first node only: two nodes there fail at submit, not pend forever."""
    small = slurm("sbatch", "--partition=small", "--nodes=2", "-o", "/dev/null", "--wrap=true")
    assert small.returncode != 0
    assert "Node count specification invalid" in small.stderr
    debug = slurm(
        "sbatch", "--parsable", "--partition=debug", "--nodes=2", "-o", "/dev/null", "--wrap=true"
    )
    assert debug.returncode == 0, debug.stderr


def test_cancel_all_leaves_an_empty_queue(slurm_cluster):
    for _ in range(2):
        job = slurm("sbatch", "--parsable", "-o", "/dev/null", "--wrap=sleep 300")
        assert job.returncode == 0, job.stderr
    assert len(slurm("squeue", "-h").stdout.splitlines()) == 2
    slurm_cluster.cancel_all()
    assert slurm("squeue", "-h").stdout == ""


@pytest.fixture
def cluster_folder(slurm_cluster):
    """A folder for a cluster of the test's own, under a world-searchable parent."""
    parent = Path(tempfile.mkdtemp(prefix="expkit-devcluster-", dir="/tmp"))
    parent.chmod(0o755)
    yield parent / "cluster"
    if devcluster._running(parent / "cluster"):
        devcluster_cli("stop", str(parent / "cluster"))
    shutil.rmtree(parent, ignore_errors=True)


def test_start_status_and_stop_from_the_command_line(cluster_folder, monkeypatch):
    started = devcluster_cli("start", str(cluster_folder), "--nodes", "2")
    assert started.returncode == 0, started.stderr
    conf = cluster_folder / "etc" / "slurm.conf"
    assert started.stdout == f"export SLURM_CONF={conf}\n"

    monkeypatch.setenv("SLURM_CONF", str(conf))
    nodes = slurm("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %T")
    assert nodes.stdout.split("\n")[:2] == ["n1 idle", "n2 idle"]
    status = devcluster_cli("status", str(cluster_folder))
    assert status.returncode == 0
    assert "running" in status.stdout and "n1 n2" in status.stdout

    again = devcluster_cli("start", str(cluster_folder))
    assert again.returncode == 2
    assert again.stderr == (
        f"devcluster: error: {cluster_folder}: a cluster is already running there; stop it first\n"
    )

    supervisor = json.loads((cluster_folder / "devcluster.json").read_text())["pid"]
    daemons = [int((cluster_folder / "run" / f"slurmd-{n}.pid").read_text()) for n in ("n1", "n2")]
    slurm(
        "sbatch", "-o", "/dev/null", "--wrap=sleep 300"
    )  # a job left running does not stop the stop
    stopped = devcluster_cli("stop", str(cluster_folder))
    assert stopped.returncode == 0, stopped.stderr
    assert not alive(supervisor)
    assert not any(alive(pid) for pid in daemons)
    assert devcluster_cli("status", str(cluster_folder)).returncode == 1
    # and it starts again in the same folder, with a fresh state
    assert devcluster_cli("start", str(cluster_folder)).returncode == 0
    assert slurm("squeue", "-h").stdout == ""
    assert devcluster_cli("stop", str(cluster_folder)).returncode == 0


def test_a_folder_below_a_private_one_is_refused_naming_it(tmp_path):
    """pytest's tmp_path lies under a 0700 folder: munged would refuse it, and a user's
    folder is never chmod-ed."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    result = devcluster_cli("start", str(private / "cluster"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"devcluster: error: {private / 'cluster'}: munged needs")
    assert f"and {private} is not (mode 700)" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert (private.stat().st_mode & 0o777) == 0o700


def test_a_folder_holding_something_else_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = devcluster_cli("start", str(tmp_path))
    assert result.returncode == 2
    assert "not empty and not a dev cluster's folder" in result.stderr


def test_a_file_in_place_of_the_folder_is_refused_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = devcluster_cli("start", str(tmp_path / "notes.txt"))
    assert result.returncode == 2
    assert result.stderr == f"devcluster: error: {tmp_path / 'notes.txt'}: not a folder\n"


def test_a_missing_slurm_names_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(devcluster, "SBIN", ())
    monkeypatch.setenv("PATH", str(tmp_path))
    assert devcluster.main(["start", str(tmp_path / "cluster")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("devcluster: error: Slurm is not installed (munged, slurmctld,")
    assert "bash .ci/install" in error and "apt-get install slurmctld slurmd" in error


def test_a_cluster_that_cannot_start_says_why_with_the_daemon_logs():
    """Nodes that claim more CPUs than Slurm can count (65535): slurmctld refuses the
    configuration, and start() raises with the daemons' last lines, leaving nothing running."""
    folder = Path(tempfile.mkdtemp(prefix="expkit-devcluster-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        cluster = devcluster.DevCluster(folder, nodes=1, cpus_per_node=100_000)
        with pytest.raises(RuntimeError) as raised:
            cluster.start(timeout=20)
        assert "slurmctld exited with status 1" in str(raised.value)
        assert "CPUs value (100000) is greater than 65535" in str(raised.value)
        assert not any(alive(child.pid) for child in cluster._children.values())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
