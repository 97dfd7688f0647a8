"""Signals at every stage, drivers that die, a full disk, and processes that hide.

Every test drives the real `expkit run` in a subprocess, stops it as an operator, a closed
terminal, the kernel or a full disk would, and checks what a user relies on afterwards: the
run's state and reason, its exit code, its sealed outputs, no working copy left, and nothing
of the run still running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import alive, eventually
from expkit.procs import run_processes
from expkit.workspace import Workspace

# Writes outputs/kept.txt, then its pid to the file named by its first argument, then prints
# a line every 0.2 s forever.
FOREVER = """
    import os
    import sys
    import time

    os.makedirs("outputs", exist_ok=True)
    with open("outputs/kept.txt", "w") as f:
        f.write("epoch 1 done\\n")
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    print("training started", flush=True)
    while True:
        print("tick", flush=True)
        time.sleep(0.2)
"""

# Writes outputs/kept.txt, logs one metric (which the gate sink holds in post-process) and ends.
QUICK = """
    import os

    from expkit import Run

    os.makedirs("outputs", exist_ok=True)
    with open("outputs/kept.txt", "w") as f:
        f.write("epoch 1 done\\n")
    Run.get_context().log("loss", 0.5)
    print("done", flush=True)
"""

# A data-prepare command: writes its pid next to `{dest}` (argument 2), then sleeps.
SLOW_PREPARE = """
    import os
    import sys
    import time

    with open(sys.argv[2] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(sys.argv[2] + ".tmp", sys.argv[2])
    os.makedirs(sys.argv[1], exist_ok=True)
    time.sleep(300)
"""

# A plugin that holds post-process (a metric sink) or register (a model registry) until the
# file `$EXPKIT_TEST_GATE.go` exists, after touching `$EXPKIT_TEST_GATE.<which>`.
GATE_PLUGIN = """
    import os
    import time
    from pathlib import Path

    import expkit
    from expkit import exportkit
    from expkit.capabilities import Exporter, MetricSink, MetricWriter, ModelRegistry


    def gate(which):
        base = os.environ["EXPKIT_TEST_GATE"]
        Path(f"{base}.{which}").touch()
        deadline = time.monotonic() + 120
        while not os.path.exists(base + ".go") and time.monotonic() < deadline:
            time.sleep(0.05)


    class Writer(MetricWriter):
        def send(self, metrics):
            gate("sink")


    class Sink(MetricSink):
        name = "gate-sink"

        def open(self, run, options):
            return Writer()


    class Registry(ModelRegistry):
        name = "gate-registry"

        def register(self, model, run, options):
            gate("registry")
            return "held"


    @expkit.hookimpl
    def expkit_metric_sinks():
        return [Sink(), CheckSink()]


    @expkit.hookimpl
    def expkit_model_registries():
        return [Registry()]


    class CheckSink(MetricSink):
        # Its check of the job (before the run is recorded) holds at the gate.

        name = "gate-check"

        def check(self, job):
            gate("check")

        def open(self, run, options):
            return Writer()


    class SlowExporter(Exporter):
        # Its worker (gate_worker) holds until the gate opens, then writes model.slow.

        name = "slow"

        def export(self, request):
            return exportkit.run_worker(request, "gate_worker")


    @expkit.hookimpl
    def expkit_exporters():
        return [SlowExporter()]
"""

# The slow exporter's worker: its pid to `$EXPKIT_TEST_GATE.worker`, then the gate, then a file.
GATE_WORKER = """
    import os
    import time
    from pathlib import Path

    from expkit import exportkit
    from expkit.capabilities import ExportResult


    def export(request):
        base = os.environ["EXPKIT_TEST_GATE"]
        Path(f"{base}.worker.tmp").write_text(str(os.getpid()))
        os.replace(f"{base}.worker.tmp", f"{base}.worker")
        deadline = time.monotonic() + 120
        while not os.path.exists(base + ".go") and time.monotonic() < deadline:
            time.sleep(0.05)
        path = Path(request.out_dir) / "model.slow"
        path.write_text("exported")
        return ExportResult([path], {}, True, "")


    if __name__ == "__main__":
        exportkit.worker_main(export)
"""

# Holds its slot until `<arg>.end` exists.
HOLD = """
    import os
    import sys
    import time

    print("holding", flush=True)
    while not os.path.exists(sys.argv[1] + ".end"):
        time.sleep(0.05)
"""

# Starts a daemon that escapes the run's marker (double fork, setsid, `env -i`), writes its pid
# to the file named by the first argument, and ends (or, with a second argument, waits).
ESCAPE = """
    import os
    import sys
    import time

    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            with open(sys.argv[1] + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(sys.argv[1] + ".tmp", sys.argv[1])
            os.execvp("env", ["env", "-i", "sleep", "1000"])
        os._exit(0)
    os.wait()
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
    print("daemon started", flush=True)
    if len(sys.argv) > 2:
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.05)
"""


# -- helpers --------------------------------------------------------------------------------
def install_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install GATE_PLUGIN as a distribution the `expkit` command finds; returns the gate."""
    site = tmp_path / "site-packages"
    info = site / "gate_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gate-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[expkit]\ngate = gate_plugin\n")
    (site / "gate_plugin.py").write_text(textwrap.dedent(GATE_PLUGIN))
    (site / "gate_worker.py").write_text(textwrap.dedent(GATE_WORKER))
    paths = [str(site), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    gate = tmp_path / "gate"
    monkeypatch.setenv("EXPKIT_TEST_GATE", str(gate))
    return gate


def state(workspace: Workspace, run_id: str) -> str:
    return workspace.history.runs.get(run_id).state


def waits_for_slots(workspace: Workspace, run_id: str) -> bool:
    """The run is queued in scale (not merely created, which is also state queued)."""
    record = workspace.history.runs.get(run_id)
    return record.state == "queued" and record.status is not None


def stages(workspace: Workspace, run_id: str) -> dict[str, str]:
    return {s.stage: s.state for s in workspace.history.stages.of(run_id)}


def read_pid(path: Path, timeout: float = 30) -> int:
    eventually(path.exists, timeout=timeout, what=f"{path.name} being written")
    return int(path.read_text())


def assert_ended(
    workspace: Workspace, run_id: str, expected: str, reason: str, kept: bool = True
) -> None:
    """The run's final record, its sealed outputs, no working copy and nothing running."""
    record = workspace.history.runs.get(run_id)
    assert record.state == expected, record
    assert reason in (record.error or ""), record.error
    run_dir = workspace.run_dir(run_id)
    assert not (run_dir / "work").exists()
    if kept:
        assert "kept.txt" in workspace.history.outputs.of(run_id)
        assert (run_dir / "outputs" / "kept.txt").read_text() == "epoch 1 done\n"
    assert run_processes(run_id, workspace.path) == []
    held = workspace.history.db.execute("select * from slots where run_id = ?", (run_id,))
    assert held.fetchall() == []


# -- SIGTERM and SIGHUP at each stage -------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_while_running_cancels_keeps_outputs_and_names_the_signal(
    expkit_workspace, background, write_job, tmp_path, sig
):
    pid_file = tmp_path / "pid"
    live = background("run", str(write_job({"args": [str(pid_file)]}, script=FOREVER)))
    live.wait_for("tick")
    script = read_pid(pid_file)
    live.proc.send_signal(sig)
    assert live.wait(timeout=30) == 130, live.output
    assert_ended(expkit_workspace, live.run_id, "canceled", f"terminated by {sig.name}")
    assert stages(expkit_workspace, live.run_id)["run"] == "canceled"
    assert "canceled by the user" not in live.output
    assert not alive(script)


def test_a_signal_while_preparing_data_cancels_and_stops_the_prepare_command(
    expkit_workspace, background, write_job, tmp_path
):
    pid_file = tmp_path / "prepare-pid"
    job = write_job(
        {"data": {"set": {"prepare": f"python prep.py {{dest}} {pid_file}"}}},
        script="print('never')\n",
        files={"prep.py": SLOW_PREPARE},
    )
    live = background("run", str(job))
    prepare = read_pid(pid_file)
    assert state(expkit_workspace, live.run_id) == "preparing"
    live.proc.send_signal(signal.SIGTERM)
    assert live.wait(timeout=30) == 130, live.output
    assert_ended(expkit_workspace, live.run_id, "canceled", "terminated by SIGTERM", kept=False)
    assert stages(expkit_workspace, live.run_id)["prepare"] == "canceled"
    eventually(lambda: not alive(prepare), timeout=10, what="the prepare command stopping")
    assert not any(expkit_workspace.data_dir.glob(".*.tmp"))


def test_a_signal_while_queued_cancels_before_the_script_starts(
    expkit_workspace, background, write_job, tmp_path
):
    base = tmp_path / "hold"
    job = write_job(
        {"args": [str(base)], "compute": {"target": "local", "options": {"slots": 1}}},
        script=HOLD,
    )
    holder = background("run", str(job))
    holder.wait_for("holding")
    waiter = background("run", str(job))
    waiting = waiter.run_id
    eventually(lambda: waits_for_slots(expkit_workspace, waiting), what="the run queued")
    waiter.proc.send_signal(signal.SIGHUP)
    assert waiter.wait(timeout=30) == 130, waiter.output
    assert_ended(expkit_workspace, waiting, "canceled", "terminated by SIGHUP", kept=False)
    assert stages(expkit_workspace, waiting)["scale"] == "canceled"
    Path(f"{base}.end").touch()
    assert holder.wait() == 0, holder.output


def test_a_signal_in_post_process_still_seals_the_outputs_and_ends_canceled(
    expkit_workspace, background, write_job, tmp_path, monkeypatch
):
    gate = install_gate(tmp_path, monkeypatch)
    live = background("run", str(write_job({"metrics": ["gate-sink"]}, script=QUICK)))
    eventually(
        lambda: (
            Path(f"{gate}.sink").exists()
            and state(expkit_workspace, live.run_id) == "post-processing"
        ),
        what="post-process waiting for the sink",
    )
    live.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the signal is noted while post-process goes on
    Path(f"{gate}.go").touch()
    assert live.wait(timeout=60) == 130, live.output
    assert_ended(expkit_workspace, live.run_id, "canceled", "terminated by SIGTERM")
    assert stages(expkit_workspace, live.run_id)["post-process"] == "completed"
    assert "internal error" not in live.output


def test_a_signal_in_register_cancels_and_leaves_no_model_version(
    expkit_workspace, expkit_cli, background, write_job, tmp_path, monkeypatch
):
    gate = install_gate(tmp_path, monkeypatch)
    job = write_job({"model": {"name": "net", "registries": ["gate-registry"]}}, script=QUICK)
    live = background("run", str(job))
    eventually(lambda: Path(f"{gate}.registry").exists(), what="register reaching the registry")
    live.proc.send_signal(signal.SIGTERM)
    assert live.wait(timeout=30) == 130, live.output
    assert_ended(expkit_workspace, live.run_id, "canceled", "terminated by SIGTERM")
    assert stages(expkit_workspace, live.run_id)["register"] == "canceled"
    assert "no models yet" in expkit_cli("models", "list").stdout
    assert expkit_cli("models", "show", "net").returncode == 2
    # Nothing claims the version exists: no "registered" line, and no folder left for it.
    assert "registered net:1" not in live.output, live.output
    assert "net:1 not kept: the run canceled" in live.output, live.output
    assert not (expkit_workspace.models_dir / "net" / "1").exists()


def test_sigterm_to_a_submitted_run_s_background_driver_cancels_it(
    expkit_workspace, write_job, tmp_path
):
    from expkit import Experiment, JobSpec

    daemon_file = tmp_path / "daemon"
    job = write_job({"args": [str(daemon_file), str(tmp_path / "never")]}, script=ESCAPE)
    run = Experiment(expkit_workspace, "test").submit(JobSpec.from_yaml(job))
    daemon = read_pid(daemon_file)
    eventually(lambda: run.get_status() == "running", what="the run running")
    os.kill(expkit_workspace.history.runs.get(run.id).driver_pid, signal.SIGTERM)
    details = run.wait_for_completion(timeout=30, raise_on_error=False)
    assert details["state"] == "canceled"
    assert details["error"] == "terminated by SIGTERM"
    assert not (run.run_dir / "work").exists()
    eventually(lambda: not alive(daemon), timeout=10, what="the escaped daemon stopping")


# -- the terminal goes away -----------------------------------------------------------------
def test_a_closed_terminal_cancels_the_run_and_keeps_its_outputs(
    expkit_workspace, write_job, tmp_path
):
    """A hang-up: SIGHUP to the foreground process group, and nobody reads the output."""
    pid_file = tmp_path / "pid"
    job = write_job({"args": [str(pid_file)]}, script=FOREVER)
    read, write = os.pipe()
    driver = subprocess.Popen(
        [sys.executable, "-m", "expkit", "run", str(job)],
        stdin=subprocess.DEVNULL,
        stdout=write,
        stderr=write,
        env={**os.environ, "EXPKIT_WORKSPACE": str(expkit_workspace.path)},
        start_new_session=True,
    )
    os.close(write)
    try:
        script = read_pid(pid_file)
        os.close(read)  # the terminal is gone: every later write fails
        os.killpg(driver.pid, signal.SIGHUP)
        assert driver.wait(timeout=30) == 130
    finally:
        if driver.poll() is None:
            driver.kill()
    (run_id,) = [r.id for r in expkit_workspace.history.runs.recent()]
    assert_ended(expkit_workspace, run_id, "canceled", "terminated by SIGHUP")
    assert not alive(script)


def test_nohup_keeps_the_run_going_when_the_terminal_closes(expkit_workspace, write_job, tmp_path):
    """A driver started with SIGHUP ignored (`nohup expkit run ...`) keeps it ignored."""
    pid_file = tmp_path / "pid"
    job = write_job({"args": [str(pid_file)]}, script=FOREVER)
    driver = subprocess.Popen(
        [sys.executable, "-m", "expkit", "run", str(job)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "EXPKIT_WORKSPACE": str(expkit_workspace.path)},
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    try:
        script = read_pid(pid_file)
        driver.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert driver.poll() is None and alive(script)
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=30) == 130
    finally:
        if driver.poll() is None:
            driver.kill()
    (run_id,) = [r.id for r in expkit_workspace.history.runs.recent()]
    assert_ended(expkit_workspace, run_id, "canceled", "terminated by SIGTERM")


# -- dead drivers ---------------------------------------------------------------------------
def test_a_waiting_run_notices_that_the_holder_s_driver_died(
    expkit_workspace, background, write_job, tmp_path
):
    base = tmp_path / "hold"
    job = write_job(
        {"args": [str(base)], "compute": {"target": "local", "options": {"slots": 1}}},
        script=HOLD,
    )
    holder = background("run", str(job))
    holder.wait_for("holding")
    waiter = background("run", str(job))
    waiting = waiter.run_id
    eventually(lambda: waits_for_slots(expkit_workspace, waiting), what="the run queued")
    os.kill(holder.proc.pid, signal.SIGKILL)  # the driver only: its script dies with it
    holder.wait()
    # No other expkit command opens the workspace: the waiting run finds out by itself.
    waiter.wait_for("holding", timeout=20)
    Path(f"{base}.end").touch()
    assert waiter.wait(timeout=30) == 0, waiter.output
    record = expkit_workspace.history.runs.get(holder.run_id)
    assert record.state == "failed"
    assert "driver process" in record.error


def test_kill_9_while_preparing_data_stops_the_prepare_command_and_cleans_the_cache(
    expkit_workspace, expkit_cli, background, write_job, tmp_path
):
    pid_file = tmp_path / "prepare-pid"
    job = write_job(
        {"data": {"set": {"prepare": f"python prep.py {{dest}} {pid_file}"}}},
        script="print('never')\n",
        files={"prep.py": SLOW_PREPARE},
    )
    live = background("run", str(job))
    prepare = read_pid(pid_file)
    run_id = live.run_id
    eventually(lambda: any(expkit_workspace.data_dir.glob(".*.tmp")), what="the temporary folder")
    assert prepare in run_processes(run_id, expkit_workspace.path)  # it carries the marker
    os.kill(live.proc.pid, signal.SIGKILL)
    live.wait()
    eventually(lambda: not alive(prepare), timeout=10, what="the prepare command dying with it")

    assert expkit_cli("runs", "list").returncode == 0  # the next open
    assert state(expkit_workspace, run_id) == "failed"
    assert not any(expkit_workspace.data_dir.glob(".*.tmp"))
    assert not (expkit_workspace.run_dir(run_id) / "work").exists()


def test_kill_9_while_pip_installs_stops_pip_and_removes_the_unfinished_environment(
    expkit_workspace, expkit_cli, background, write_job
):
    # An index that accepts the connection and never answers: pip waits on it.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        index = f"http://127.0.0.1:{server.getsockname()[1]}/simple"
        job = write_job(
            {"environment": {"builder": "pip", "packages": ["nothing-here"],
                             "options": {"index_url": index}}},
            script="print('never')\n",
        )  # fmt: skip
        live = background("run", str(job))
        run_id = live.run_id
        eventually(
            lambda: run_processes(run_id, expkit_workspace.path), what="pip carrying the marker"
        )
        server.accept()  # pip is waiting for an answer
        pip = run_processes(run_id, expkit_workspace.path)
        os.kill(live.proc.pid, signal.SIGKILL)
        live.wait()
        # pip and the pip it started in the new environment die with the driver
        eventually(lambda: not any(map(alive, pip)), timeout=10, what="pip stopping")
        assert run_processes(run_id, expkit_workspace.path) == []
        assert expkit_cli("runs", "list").returncode == 0  # the next open
        assert state(expkit_workspace, run_id) == "failed"
        envs = [p for p in expkit_workspace.envs_dir.iterdir() if p.is_dir()]
        assert envs == [], envs
    finally:
        server.close()


def test_kill_9_in_post_process_keeps_the_outputs_and_removes_the_working_copy(
    expkit_workspace, expkit_cli, background, write_job, tmp_path, monkeypatch
):
    gate = install_gate(tmp_path, monkeypatch)
    live = background("run", str(write_job({"metrics": ["gate-sink"]}, script=QUICK)))
    run_id = live.run_id
    eventually(lambda: Path(f"{gate}.sink").exists(), what="post-process waiting for the sink")
    os.kill(live.proc.pid, signal.SIGKILL)
    live.wait()

    shown = expkit_cli("runs", "show", run_id)  # the next open
    assert shown.returncode == 0, shown.stderr
    record = expkit_workspace.history.runs.get(run_id)
    assert record.state == "failed"
    outputs = expkit_workspace.run_dir(run_id) / "outputs"
    assert str(outputs) in record.error, record.error
    assert (outputs / "kept.txt").read_text() == "epoch 1 done\n"
    assert not (expkit_workspace.run_dir(run_id) / "work").exists()


def test_kill_9_in_register_leaves_no_model_version(
    expkit_workspace, expkit_cli, background, write_job, tmp_path, monkeypatch
):
    gate = install_gate(tmp_path, monkeypatch)
    job = write_job({"model": {"name": "net", "registries": ["gate-registry"]}}, script=QUICK)
    live = background("run", str(job))
    run_id = live.run_id
    eventually(lambda: Path(f"{gate}.registry").exists(), what="register reaching the registry")
    os.kill(live.proc.pid, signal.SIGKILL)
    live.wait()

    listed = expkit_cli("models", "list")  # the next open
    assert listed.returncode == 0, listed.stderr
    assert "no models yet" in listed.stdout
    assert state(expkit_workspace, run_id) == "failed"
    Path(f"{gate}.go").touch()
    again = write_job({"model": {"name": "net"}}, script=QUICK)
    assert expkit_cli("run", str(again)).returncode == 0
    listed = expkit_cli("models", "list").stdout
    assert "net" in listed and run_id not in listed


# -- processes that escape the marker -------------------------------------------------------
def test_a_daemon_that_clears_its_environment_is_stopped_when_the_run_ends(
    expkit_workspace, expkit_cli, write_job, tmp_path
):
    pid_file = tmp_path / "daemon-pid"
    result = expkit_cli("run", str(write_job({"args": [str(pid_file)]}, script=ESCAPE)))
    assert result.returncode == 0, result.stdout + result.stderr
    daemon = int(pid_file.read_text())
    eventually(lambda: not alive(daemon), timeout=10, what="the escaped daemon stopping")


def test_stopping_a_run_s_daemons_spares_another_run_s_processes(
    expkit_workspace, background, expkit_cli, write_job, tmp_path
):
    pid_file, other_pid = tmp_path / "daemon-pid", tmp_path / "other-pid"
    other = background("run", str(write_job({"args": [str(other_pid)]}, script=FOREVER)))
    other.wait_for("tick")
    result = expkit_cli("run", str(write_job({"args": [str(pid_file)]}, script=ESCAPE)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert alive(read_pid(other_pid))
    assert state(expkit_workspace, other.run_id) == "running"


def test_the_driver_reaps_what_it_inherits(tmp_path):
    """A subreaper that stops its descendants leaves neither them nor their zombies."""
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DRIVER_REAPS), str(tmp_path / "pid")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.split()[-3:] == ["stopped", "zombies", "0"], child.stdout


DRIVER_REAPS = f"""
    import os, subprocess, sys, time
    from expkit.procs import become_subreaper, descendants, stop_descendants
    assert become_subreaper()
    script = subprocess.Popen([sys.executable, "-c", {textwrap.dedent(ESCAPE)!r}, sys.argv[1]])
    assert script.wait() == 0
    daemon = int(open(sys.argv[1]).read())
    assert daemon in descendants(), "the daemon was not re-parented here"
    stop_descendants(grace=2)
    print("stopped" if not os.path.exists(f"/proc/{{daemon}}") else "still there")
    zombies = [p for p in os.listdir("/proc") if p.isdigit() and
               open(f"/proc/{{p}}/stat").read().rsplit(")", 1)[1].split()[:2]
               == ["Z", str(os.getpid())]]
    print("zombies", len(zombies))
"""


# -- a full disk ----------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MiB tmpfs mounted in the test's folder (root only; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(path: Path) -> None:
    """Write zeros to `path` until the disk is full. Unbuffered: a buffered file would try
    again to write what did not fit when it closes, and raise there."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass


FILLS_THE_DISK = """
    import os

    os.makedirs("outputs", exist_ok=True)
    with open("outputs/kept.txt", "w") as f:
        f.write("epoch 1 done\\n")
    with open("scratch.bin", "wb", buffering=0) as f:  # nothing left to write at close
        try:
            while True:
                f.write(b"\\0" * 65536)
        except OSError as error:
            print("disk full:", error, flush=True)
    {end}
"""


@pytest.mark.parametrize("end", ["", "raise SystemExit(1)"], ids=["script-ok", "script-fails"])
def test_a_full_disk_fails_the_run_naming_the_disk_and_reading_still_works(
    small_disk, write_job, monkeypatch, end
):
    workspace = Workspace.init(small_disk)
    monkeypatch.setenv("EXPKIT_WORKSPACE", str(workspace.path))
    job = write_job({}, script=FILLS_THE_DISK.replace("{end}", end))
    command = [sys.executable, "-m", "expkit"]
    result = subprocess.run([*command, "run", str(job)], capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "internal error" not in result.stderr
    assert "Traceback" not in result.stderr
    history = Workspace(workspace.path).history
    (record,) = history.runs.recent()
    assert record.state == "failed"
    assert "No space left on device" in (record.error or ""), record.error
    assert str(small_disk) in record.error, record.error
    assert not (workspace.run_dir(record.id) / "work").exists()
    assert "kept.txt" in history.outputs.of(record.id)
    history.close()
    workspace.history.close()  # no connection left: SQLite's WAL files are gone

    fill(small_disk / "filler.bin")  # full again: reading needs no room
    for args in (["runs", "list"], ["runs", "show", record.id], ["runs", "show", "1", "--json"]):
        shown = subprocess.run([*command, *args], capture_output=True, text=True)
        assert shown.returncode == 0, shown.stderr
        assert record.id in shown.stdout
    refused = subprocess.run([*command, "run", str(job)], capture_output=True, text=True)
    assert refused.returncode == 1
    assert refused.stderr.startswith("expkit: error: No space left on device on "), refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_a_full_disk_keeps_the_checkpoint_folder_for_a_resume(small_disk, write_job, monkeypatch):
    """The room made after "no space left" never costs the run the checkpoint it wrote: the
    folder is kept in the run (for `expkit runs resume`), while scratch files go."""
    workspace = Workspace.init(small_disk)
    monkeypatch.setenv("EXPKIT_WORKSPACE", str(workspace.path))
    script = FILLS_THE_DISK.replace("{end}", "raise SystemExit(1)").replace(
        'os.makedirs("outputs", exist_ok=True)',
        'open(os.path.join(os.environ["EXPKIT_CHECKPOINT_DIR"], "epoch-1.pt"), "w").write("w")\n'
        '    os.makedirs("outputs", exist_ok=True)',
    )
    job = write_job({"checkpoints": "./ckpt"}, script=script)
    result = subprocess.run(
        [sys.executable, "-m", "expkit", "run", str(job)], capture_output=True, text=True
    )
    assert result.returncode == 1, result.stdout + result.stderr
    history = Workspace(workspace.path).history
    (record,) = history.runs.recent()
    assert "No space left on device" in (record.error or ""), record.error
    run_dir = workspace.run_dir(record.id)
    assert (run_dir / "checkpoints" / "epoch-1.pt").read_text() == "w"
    assert not (run_dir / "work").exists()
    history.close()


# -- more signals after the first -----------------------------------------------------------
@pytest.mark.parametrize("gap", [0.0, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["SIGTERM", "SIGHUP", "SIGINT"])  # fmt: skip
def test_signals_after_the_first_are_noted_not_fatal(
    expkit_workspace, background, write_job, tmp_path, gap, second
):
    """An operator who presses Ctrl-C twice, or a service manager that sends SIGTERM again,
    still gets exit 130 and a run recorded canceled for the first signal's reason."""
    pid_file = tmp_path / "pid"
    live = background("run", str(write_job({"args": [str(pid_file)]}, script=FOREVER)))
    live.wait_for("tick")
    script = read_pid(pid_file)
    live.proc.send_signal(signal.SIGTERM)
    time.sleep(gap)
    if live.proc.poll() is None:
        live.proc.send_signal(second)
    assert live.wait(timeout=30) == 130, live.output
    # Two signals pending at once are handled in signal-number order: no "first" to name.
    reason = "terminated by SIGTERM" if gap else ""
    assert_ended(expkit_workspace, live.run_id, "canceled", reason)
    assert not alive(script)


@pytest.mark.parametrize("gap", [0.0, 0.1, 0.3])
def test_ctrl_c_then_sigterm_is_recorded_as_ctrl_c(
    expkit_workspace, background, write_job, tmp_path, gap
):
    pid_file = tmp_path / "pid"
    live = background("run", str(write_job({"args": [str(pid_file)]}, script=FOREVER)))
    live.wait_for("tick")
    read_pid(pid_file)
    live.proc.send_signal(signal.SIGINT)
    time.sleep(gap)
    if live.proc.poll() is None:
        live.proc.send_signal(signal.SIGTERM)
    assert live.wait(timeout=30) == 130, live.output
    reason = "canceled by the user" if gap else ""  # pending together: number order
    assert_ended(expkit_workspace, live.run_id, "canceled", reason)


def test_a_second_signal_while_preparing_data_is_not_fatal(
    expkit_workspace, background, write_job, tmp_path
):
    pid_file = tmp_path / "prepare-pid"
    job = write_job(
        {"data": {"set": {"prepare": f"python prep.py {{dest}} {pid_file}"}}},
        script="print('never')\n",
        files={"prep.py": SLOW_PREPARE},
    )
    live = background("run", str(job))
    prepare = read_pid(pid_file)
    live.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    if live.proc.poll() is None:
        live.proc.send_signal(signal.SIGTERM)
    assert live.wait(timeout=30) == 130, live.output
    assert_ended(expkit_workspace, live.run_id, "canceled", "terminated by SIGTERM", kept=False)
    eventually(lambda: not alive(prepare), timeout=10, what="the prepare command stopping")


# -- export workers die with their driver -----------------------------------------------------
SLOW_EXPORT = {
    "model": {"name": "net", "load": {"file": "kept.txt"}, "input": {"shape": [1, 4]}},
    "exports": ["slow"],
}


def test_kill_9_in_an_export_stops_the_worker_and_nothing_is_written_later(
    expkit_workspace, expkit_cli, background, write_job, tmp_path, monkeypatch
):
    gate = install_gate(tmp_path, monkeypatch)
    live = background("run", str(write_job(SLOW_EXPORT, script=QUICK)))
    run_id = live.run_id
    worker = read_pid(Path(f"{gate}.worker"))
    os.kill(live.proc.pid, signal.SIGKILL)
    live.wait()
    eventually(lambda: not alive(worker), timeout=10, what="the export worker dying with it")
    Path(f"{gate}.go").touch()  # what would make a surviving worker write its file

    assert expkit_cli("runs", "list").returncode == 0  # the next open
    assert state(expkit_workspace, run_id) == "failed"
    exports = expkit_workspace.run_dir(run_id) / "exports"
    left = sorted(p.relative_to(exports).as_posix() for p in exports.rglob("*"))
    assert left in ([], ["slow"], ["slow", "slow/export.log"]), left


def test_sigterm_to_expkit_export_stops_the_worker_and_keeps_nothing(
    expkit_workspace, expkit_cli, background, write_job, tmp_path, monkeypatch
):
    gate = install_gate(tmp_path, monkeypatch)
    job = write_job({"model": SLOW_EXPORT["model"]}, script=QUICK)
    assert expkit_cli("run", str(job)).returncode == 0
    live = background("export", "net:1", "--format", "slow")
    worker = read_pid(Path(f"{gate}.worker"))
    live.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    if live.proc.poll() is None:
        live.proc.send_signal(signal.SIGTERM)  # a second one is not fatal either
    assert live.wait(timeout=30) == 130, live.output
    eventually(lambda: not alive(worker), timeout=10, what="the export worker stopping")
    Path(f"{gate}.go").touch()
    time.sleep(0.5)
    assert not (expkit_workspace.path / "exports" / "net-1-slow").exists()
    assert expkit_workspace.history.exports.of(expkit_workspace.history.runs.recent()[0].id) == []
    assert "slow" not in expkit_cli("models", "show", "net:1").stdout


def test_an_export_stopped_by_sigterm_is_recorded_as_stopped_not_failed(
    expkit_workspace, background, write_job, tmp_path, monkeypatch
):
    gate = install_gate(tmp_path, monkeypatch)
    live = background("run", str(write_job(SLOW_EXPORT, script=QUICK)))
    worker = read_pid(Path(f"{gate}.worker"))
    live.proc.send_signal(signal.SIGTERM)
    assert live.wait(timeout=30) == 130, live.output
    assert not alive(worker)
    assert_ended(expkit_workspace, live.run_id, "canceled", "terminated by SIGTERM")
    (export,) = expkit_workspace.history.exports.of(live.run_id)
    assert not export.ok and export.message == "stopped: terminated by SIGTERM", export
    assert "FAILED" not in live.output and "export slow failed" not in live.output
    assert "exports: slow stopped" in live.output


# A data-prepare command that starts a worker (as multiprocessing or a shell pipeline does):
# the worker's pid goes next to `{dest}` (argument 2), then both sleep.
PREPARE_WITH_WORKER = """
    import os
    import subprocess
    import sys
    import time

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    with open(sys.argv[2] + ".tmp", "w") as f:
        f.write(str(worker.pid))
    os.replace(sys.argv[2] + ".tmp", sys.argv[2])
    os.makedirs(sys.argv[1], exist_ok=True)
    time.sleep(300)
"""


@pytest.mark.parametrize("how", ["python", "sh"])
def test_kill_9_while_preparing_data_stops_what_the_prepare_command_started(
    expkit_workspace, background, write_job, tmp_path, how
):
    """Without the next expkit command: the processes die with the driver."""
    pid_file = tmp_path / "worker-pid"
    command = f"python prep.py {{dest}} {pid_file}"
    if how == "sh":
        command = f"sh -c '{sys.executable} prep.py \"$0\" {pid_file}; true' {{dest}}"
    job = write_job(
        {"data": {"set": {"prepare": command}}},
        script="print('never')\n",
        files={"prep.py": PREPARE_WITH_WORKER},
    )
    live = background("run", str(job))
    worker = read_pid(pid_file)
    run_id = live.run_id
    assert worker in run_processes(run_id, expkit_workspace.path)
    os.kill(live.proc.pid, signal.SIGKILL)
    live.wait()
    eventually(lambda: not alive(worker), timeout=10, what="the prepare's worker dying too")
    eventually(
        lambda: run_processes(run_id, expkit_workspace.path) == [],
        timeout=10,
        what="every process of the prepare gone",
    )


FILLS_THE_DISK_IN_OUTPUTS = """
    import os

    os.makedirs("outputs", exist_ok=True)
    with open("outputs/kept.txt", "w") as f:
        f.write("epoch 1 done\\n")
    with open("outputs/big.bin", "wb", buffering=0) as f:  # nothing left to write at close
        try:
            while True:
                f.write(b"\\0" * 65536)
        except OSError as error:
            print("disk full:", error, flush=True)
"""


def test_an_output_that_fills_the_disk_still_gets_the_run_recorded(
    small_disk, write_job, monkeypatch
):
    """The outputs are kept, so the room freed by removing the working copy is not enough:
    the run's record must still be finished, failed, naming the disk and the kept file."""
    workspace = Workspace.init(small_disk)
    monkeypatch.setenv("EXPKIT_WORKSPACE", str(workspace.path))
    job = write_job({}, script=FILLS_THE_DISK_IN_OUTPUTS)
    command = [sys.executable, "-m", "expkit"]
    result = subprocess.run([*command, "run", str(job)], capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    history = Workspace(workspace.path).history
    (record,) = history.runs.recent()
    assert record.state == "failed", record  # now, not after someone frees space
    assert "No space left on device" in (record.error or ""), record.error
    kept = "kept.txt" in history.outputs.of(record.id) or str(
        workspace.run_dir(record.id) / "outputs"
    ) in (record.error or "")
    assert kept, record.error
    assert (workspace.run_dir(record.id) / "outputs" / "kept.txt").read_text() == "epoch 1 done\n"
    assert not (workspace.run_dir(record.id) / "work").exists()
    history.close()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_kill_9_during_a_real_torchscript_export_writes_nothing_afterwards(
    expkit_workspace, expkit_cli, background, write_job
):
    """The real exporter's worker (torch) dies with the driver: no model.torchscript.pt
    appears in the failed run's exports seconds later, and no request file is left."""
    pytest.importorskip("torch")
    from test_export_e2e import NET, TRAIN, spec

    live = background(
        "run", str(write_job(spec(["torchscript"]), script=TRAIN, files={"net.py": NET}))
    )
    run_id = live.run_id

    def worker() -> list[int]:
        found = []
        for pid in run_processes(run_id, expkit_workspace.path):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"expkit_torchscript.worker" in f.read():
                    found.append(pid)
        return found

    eventually(worker, timeout=120, what="the torchscript worker starting")
    (pid,) = worker()
    os.kill(live.proc.pid, signal.SIGKILL)
    live.wait()
    eventually(lambda: not alive(pid), timeout=10, what="the worker dying with the driver")
    time.sleep(3)  # what a surviving worker would have needed to write its file
    exports = expkit_workspace.run_dir(run_id) / "exports"
    assert not list(exports.rglob("*.pt")), list(exports.rglob("*"))
    assert expkit_cli("runs", "list").returncode == 0  # the next open
    assert state(expkit_workspace, run_id) == "failed"
    assert not list(exports.rglob(".expkit-worker-*")), list(exports.rglob("*"))


def test_a_signal_before_the_run_is_recorded_cancels_it_without_killing_the_driver(
    expkit_workspace, background, write_job, tmp_path, monkeypatch
):
    """`expkit run` checks the plugins before it records the run (seconds, for some)."""
    gate = install_gate(tmp_path, monkeypatch)
    live = background("run", str(write_job({"metrics": ["gate-check"]}, script=QUICK)))
    eventually(lambda: Path(f"{gate}.check").exists(), what="the plugins being checked")
    live.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    Path(f"{gate}.go").touch()
    assert live.wait(timeout=30) == 130, live.output
    (record,) = expkit_workspace.history.runs.recent()
    assert_ended(expkit_workspace, record.id, "canceled", "terminated by SIGTERM", kept=False)
