"""Defects found by trying the snapshot index and the metric pump as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_without_root_powers(code: str, *args: Path) -> subprocess.CompletedProcess[str]:
    """`python -c code *args` with this checkout's expkit, without root's power to read what
    its mode forbids (`_without_root_powers`)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'framework'}:{ROOT / 'plugins'}"}
    return subprocess.run(
        [*_without_root_powers(), sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
    )


def _without_root_powers() -> list[str]:
    """A command prefix under which file permissions apply: root without the capabilities
    that let it read any file (setpriv), anyone else as they are."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root needs setpriv to be refused a file")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_a_source_file_that_cannot_be_read_is_left_out_with_a_warning(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.py").write_text("print('train')\n")
    secret = source / "secret.env"
    secret.write_text("TOKEN=1\n")
    secret.chmod(0)
    unsearchable = source / "nox"  # its names can be listed, its files not reached
    unsearchable.mkdir()
    (unsearchable / "f.txt").write_text("f\n")
    unsearchable.chmod(0o644)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from expkit import snapshot\n"
        "from expkit.blobs import BlobStore\n"
        "ws = Path(sys.argv[2])\n"
        "snap = snapshot.take(Path(sys.argv[1]), ws / 'snap', BlobStore(ws / 'blobs'),"
        " ws / 'index')\n"
        "print(sorted(snap.files))\n"
        "print('\\n'.join(snap.warnings))\n"
    )
    result = _run_without_root_powers(code, source, tmp_path / "ws")
    assert result.returncode == 0, result.stderr
    listed, *warnings = result.stdout.splitlines()
    assert listed == "['train.py']"
    assert any("nox/f.txt cannot be read (Permission denied): not in" in w for w in warnings)
    assert any("secret.env cannot be read (Permission denied): not in" in w for w in warnings)
    assert os.stat(secret).st_mode & 0o777 == 0  # the user's files as they were
    assert os.stat(unsearchable).st_mode & 0o777 == 0o644
    unsearchable.chmod(0o755)  # for pytest to remove it


# Logs COUNT values once the file `<arg>.go` exists (the test has stopped the driver by then),
# writes them to the channel, says so in `<arg>.logged`, then waits to be stopped.
LOG_WHILE_THE_DRIVER_IS_STOPPED = """
    import os, sys, time
    from expkit import Run
    run = Run.get_context()
    print("ready", flush=True)
    while not os.path.exists(sys.argv[1] + ".go"):
        time.sleep(0.02)
    for i in range(COUNT):
        run.log("x", float(i), step=i)
    run.flush()
    open(sys.argv[1] + ".logged", "w").close()
    time.sleep(300)
"""


def test_values_in_the_channel_when_the_driver_dies_are_recorded_by_the_recovery(
    background, write_job, expkit_cli, expkit_workspace, tmp_path
):
    import signal
    import textwrap

    from conftest import eventually

    count = 50_000  # several of the pump's batches
    base = tmp_path / "signal"
    script = textwrap.dedent(LOG_WHILE_THE_DRIVER_IS_STOPPED).replace("COUNT", str(count))
    live = background("run", str(write_job({"args": [str(base)]}, script=script)))
    live.wait_for("ready")
    live.proc.send_signal(signal.SIGSTOP)  # the driver's pump stores nothing from now on
    base.with_suffix(".go").touch()
    eventually(lambda: base.with_suffix(".logged").exists(), timeout=120, what="the burst")
    history = expkit_workspace.history
    assert history.metrics.count(live.run_id) == 0
    live.proc.send_signal(signal.SIGKILL)
    live.wait()

    listing = expkit_cli("runs", "list")  # the recovery of the dead driver's run
    assert listing.returncode == 0, listing.stderr
    assert history.runs.get(live.run_id).state == "failed"
    rows = history.metrics.of(live.run_id)  # one row per value, row groups unpacked
    assert [(row["step"], row["value"]) for row in rows] == [(i, float(i)) for i in range(count)]
    expkit_cli("runs", "list")  # a second look stores nothing twice
    assert history.metrics.count(live.run_id) == count


def test_a_source_folder_whose_path_is_not_utf8_is_snapshotted(
    write_job, expkit_cli, expkit_workspace, tmp_path
):
    job = write_job({}, script="print(open('data.txt').read())\n", files={"data.txt": "ok\n"})
    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))  # Latin-1 'café'
    job.parent.rename(folder)

    result = expkit_cli("run", str(folder / "job.yaml"))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "snapshot of " + str(tmp_path) + "/caf\\xe9/src: 2 files" in result.stdout
    snap = expkit_workspace.path / "runs" / "test_1" / "snapshot"
    assert (snap / "data.txt").read_text() == "ok\n"


# The README's pattern: the run object made at the top of the script. A spawned worker imports
# the script as its main module, and so makes its run object while multiprocessing starts it.
POOL_WITH_A_MODULE_LEVEL_RUN = """
import multiprocessing as mp
import sys
from expkit import Run

run = Run.get_context()

def work(i):
    for step in range(3):
        run.log(f"w{i}", float(step), step=step)
    return i  # the last thing a worker does: Pool.__exit__ terminates it (SIGTERM) at once

if __name__ == "__main__":
    with mp.get_context(sys.argv[1]).Pool(2) as pool:
        print("mapped", pool.map(work, range(4)))
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_values_of_started_workers_with_a_run_made_at_import_are_all_recorded(
    expkit_cli, write_job, expkit_workspace, method
):
    job = write_job({"args": [method]}, script=POOL_WITH_A_MODULE_LEVEL_RUN)
    done = expkit_cli("run", str(job))
    assert done.returncode == 0 and "mapped [0, 1, 2, 3]" in done.stdout, done.stdout + done.stderr

    rows = sorted((r["name"], r["step"]) for r in expkit_workspace.history.metrics.of("test_1"))
    assert rows == [(f"w{i}", s) for i in range(4) for s in range(3)]


def test_an_ignore_file_that_cannot_be_read_is_a_clear_error_not_a_snapshot_without_it(
    tmp_path,
):
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.py").write_text("print('train')\n")
    (source / "big.log").write_text("what the user left out\n")
    rules = source / ".expkitignore"
    rules.write_text("*.log\n")
    rules.chmod(0)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from expkit import snapshot\n"
        "from expkit.blobs import BlobStore\n"
        "from expkit.errors import UserError\n"
        "ws = Path(sys.argv[2])\n"
        "try:\n"
        "    snapshot.take(Path(sys.argv[1]), ws / 'snap', BlobStore(ws / 'blobs'))\n"
        "except UserError as error:\n"
        "    print('UserError:', error)\n"
    )
    result = _run_without_root_powers(code, source, tmp_path / "ws")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"UserError: {rules}: cannot be read (Permission denied)")


def test_two_pumps_on_one_channel_store_each_value_once(expkit_workspace, tmp_path):
    """The recovery of a dead driver's run and a driver resuming it (`expkit runs resume`)
    may read the same channel at once: what one stored, the other does not store again."""
    from expkit.metrics import MetricPump
    from test_metric_pump import burst

    channel = tmp_path / "metrics"
    channel.mkdir()
    count = 120_000  # several batches
    burst(tmp_path, channel, count)
    history = expkit_workspace.history
    late = MetricPump(history, "run_1", channel)  # began where the history stood: nothing read
    first = MetricPump(history, "run_1", channel)
    first.pump()

    late.pump()

    steps = [row["step"] for row in history.metrics.of("run_1")]
    assert steps == list(range(count))
    assert first.count == count and late.count == 0
