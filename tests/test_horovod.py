"""The `horovod` backend end to end: real `horovodrun`, two real ranks, through `expkit`.

Each test runs a tiny script on 2 ranks with the Gloo controller (about 5 s of horovodrun
start-up and `import torch` per job here), except the last, which trains the sample model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, alive, error_line
from expkit.procs import run_processes

needs_horovod = pytest.mark.skipif(
    importlib.util.find_spec("horovod") is None,
    reason="horovod is not installed (bash .ci/install builds it)",
)

TWO_RANKS = {
    "environment": "inherit",
    "distributed": "horovod",
    "resources": {"processes_per_node": 2},
    "compute": {"target": "local", "options": {"slots": 2}},
}

# Lines on stdout and stderr, a progress line ending in "\r", and an allreduce whose result
# rank 0 writes to outputs/.
ALLREDUCE = """
    import json
    import os
    import sys

    import horovod.torch as hvd
    import torch

    hvd.init()
    print(f"hello from rank {hvd.rank()} of {hvd.size()}", flush=True)
    print(f"rank {hvd.rank()} on stderr", file=sys.stderr, flush=True)
    if hvd.rank() == 1:
        sys.stdout.write("progress 50%\\rprogress 100%\\n")
        sys.stdout.flush()
    total = hvd.allreduce(torch.tensor([hvd.rank() + 1.0]), op=hvd.Sum)
    if hvd.rank() == 0:
        os.makedirs("outputs", exist_ok=True)
        with open("outputs/allreduce.json", "w") as f:
            json.dump({"sum": total.item(), "size": hvd.size()}, f)
"""

# Each rank starts from its own random model; after broadcast_parameters and a few steps of
# DistributedOptimizer on its own data, each writes its parameters to outputs/rank-N.json.
TRAIN = """
    import json
    import os

    import horovod.torch as hvd
    import torch

    hvd.init()
    torch.manual_seed(100 + hvd.rank())
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    before = [p.detach().clone() for p in model.parameters()]
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    broadcast = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    inputs, labels = torch.randn(64, 8), torch.randint(0, 2, (64,))  # this rank's own data
    for step in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
        print(f"rank {hvd.rank()} step {step} loss {loss.item():.4f}", flush=True)
    os.makedirs("outputs", exist_ok=True)
    with open(f"outputs/rank-{hvd.rank()}.json", "w") as f:
        json.dump({
            "before": [p.flatten().tolist() for p in before],
            "broadcast": [p.flatten().tolist() for p in broadcast],
            "after": [p.detach().flatten().tolist() for p in model.parameters()],
        }, f)
"""

# Each rank writes its pid to ARG.rank-N; rank 1 fails (code 3) after noting the time, rank 0
# would sleep for five minutes.
CRASH = """
    import os
    import sys
    import time

    import horovod.torch as hvd

    hvd.init()
    with open(f"{sys.argv[1]}.rank-{hvd.rank()}", "w") as f:
        f.write(str(os.getpid()))
    if hvd.rank() == 1:
        time.sleep(1)
        with open(sys.argv[1] + ".failed-at", "w") as f:
            f.write(str(time.time()))
        print("rank 1 is failing now", flush=True)
        sys.exit(3)
    print("rank 0 is waiting", flush=True)
    time.sleep(300)
"""

# Like CRASH without the failure: both ranks wait until they are stopped.
WAIT = """
    import os
    import sys
    import time

    import horovod.torch as hvd

    hvd.init()
    with open(f"{sys.argv[1]}.rank-{hvd.rank()}", "w") as f:
        f.write(str(os.getpid()))
    print(f"rank {hvd.rank()} is waiting", flush=True)
    time.sleep(300)
"""


def processes_running(text: str) -> list[str]:
    """Command lines in the process table that contain `text` (horovodrun, shells, ranks)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and alive(int(entry)):
                found.append(cmdline)
    return found


def pids(base: Path) -> list[int]:
    return [int(Path(f"{base}.rank-{rank}").read_text()) for rank in (0, 1)]


def log_lines(run_dir: Path, name: str) -> list[str]:
    """A log's lines, split at newlines only: a carriage return stays in its line, as written."""
    text = (run_dir / "logs" / name).read_bytes().decode()
    assert text.endswith("\n")
    return text.split("\n")[:-1]


@needs_horovod
def test_two_ranks_complete_with_the_allreduce_and_a_log_per_rank(
    expkit_cli, expkit_workspace, write_job
):
    job = write_job({**TWO_RANKS, "entry_script": "allreduce.py"}, script=ALLREDUCE)

    result = expkit_cli("run", str(job), "--all-ranks", timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    record = expkit_workspace.history.runs.recent(limit=1)[0]
    assert record.state == "completed"
    run_dir = expkit_workspace.run_dir(record.id)
    assert json.loads((run_dir / "outputs" / "allreduce.json").read_text()) == {
        "sum": 3.0,
        "size": 2,
    }
    # Each rank's lines in its own log, as the rank wrote them (stdout and stderr are read by
    # separate threads of horovodrun, so their order within a rank is not fixed).
    assert sorted(log_lines(run_dir, "rank-0.log")) == [
        "hello from rank 0 of 2",
        "rank 0 on stderr",
    ]
    # horovodrun forwards a piece ending in "\r" at once (progress bars), and its stdout and
    # stderr threads race: rank 1's stderr line may land right after that piece. The rank's
    # log has all of its pieces, the carriage return kept, nothing of another rank.
    text = (run_dir / "logs" / "rank-1.log").read_bytes().decode()
    assert "progress 50%\r" in text and text.endswith("\n")
    assert sorted(piece for piece in re.split(r"[\r\n]", text) if piece) == [
        "hello from rank 1 of 2",
        "progress 100%",
        "progress 50%",
        "rank 1 on stderr",
    ]
    # horovodrun said nothing of its own: no launcher.log, no prefix left anywhere.
    assert not (run_dir / "logs" / "launcher.log").exists()
    assert "<stdout>" not in result.stdout and "<stderr>" not in result.stdout
    # --all-ranks shows every rank's lines, marked with the rank.
    assert "[rank 0] hello from rank 0 of 2\n" in result.stdout
    assert "[rank 1] hello from rank 1 of 2\n" in result.stdout

    logs = expkit_cli("runs", "logs", record.id, "--rank", "1")
    assert logs.returncode == 0, logs.stderr
    assert "hello from rank 1 of 2\n" in logs.stdout
    assert "rank 0" not in logs.stdout


@needs_horovod
def test_parameters_are_identical_on_both_ranks_after_training(
    expkit_cli, expkit_workspace, write_job
):
    job = write_job({**TWO_RANKS, "entry_script": "train_two.py"}, script=TRAIN)

    result = expkit_cli("run", str(job), timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    record = expkit_workspace.history.runs.recent(limit=1)[0]
    outputs = expkit_workspace.run_dir(record.id) / "outputs"
    rank0, rank1 = (json.loads((outputs / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert rank0["before"] != rank1["before"]  # different seeds: different starting points
    assert rank1["broadcast"] == rank0["before"]  # rank 0's parameters everywhere
    assert rank0["after"] != rank0["broadcast"]  # training changed them...
    assert rank1["after"] == rank0["after"]  # ...identically on both ranks
    # Without --all-ranks the terminal shows rank 0; rank 1's lines are in its log.
    assert "rank 0 step 4" in result.stdout
    assert "rank 1 step" not in result.stdout
    rank1_log = (expkit_workspace.run_dir(record.id) / "logs" / "rank-1.log").read_text()
    assert "rank 1 step 4" in rank1_log


@needs_horovod
def test_a_failing_rank_fails_the_run_fast_naming_it_and_leaves_no_process(
    expkit_cli, expkit_workspace, write_job, tmp_path
):
    base = tmp_path / "crash"
    job = write_job(
        {**TWO_RANKS, "entry_script": "crash_rank_one.py", "args": [str(base)]}, script=CRASH
    )

    result = expkit_cli("run", str(job), timeout=120)
    ended = time.time()

    assert result.returncode == 1, result.stdout + result.stderr
    # Rank 0 was stopped (it would have slept 300 s) and the run recorded within 10 s.
    assert ended - float(Path(f"{base}.failed-at").read_text()) < 10
    record = expkit_workspace.history.runs.recent(limit=1)[0]
    assert record.state == "failed"
    assert record.error == (
        "run: rank 1: the script exited with code 3; last output: rank 1 is failing now"
    )
    assert f"run {record.id}: failed" in result.stdout
    launcher = (expkit_workspace.run_dir(record.id) / "logs" / "launcher.log").read_text()
    assert "Process 1 exit with status code 3." in launcher
    # Nothing left: not the ranks, not horovodrun or its helpers.
    assert run_processes(record.id, expkit_workspace.path) == []
    assert not any(alive(pid) for pid in pids(base))
    assert processes_running("crash_rank_one.py") == []


@needs_horovod
def test_ctrl_c_stops_every_rank_and_cancels_the_run(
    background, expkit_workspace, write_job, tmp_path
):
    base = tmp_path / "wait"
    job = write_job({**TWO_RANKS, "entry_script": "wait_two.py", "args": [str(base)]}, script=WAIT)
    live = background("run", str(job), "--all-ranks")
    live.wait_for("[rank 0] rank 0 is waiting", timeout=60)
    live.wait_for("[rank 1] rank 1 is waiting", timeout=60)
    run_id = live.run_id

    os.killpg(live.proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C

    assert live.wait(timeout=30) == 130
    assert expkit_workspace.history.runs.get(run_id).state == "canceled"
    assert run_processes(run_id, expkit_workspace.path) == []
    assert not any(alive(pid) for pid in pids(base))
    assert processes_running("wait_two.py") == []


@needs_horovod
def test_more_ranks_than_the_machine_has_slots_is_refused(expkit_cli, write_job):
    job = write_job(
        {**TWO_RANKS, "resources": {"processes_per_node": 3}}, script="print('never runs')\n"
    )

    result = expkit_cli("run", str(job))

    assert result.returncode == 2
    assert "3 processes do not fit this machine's 2 slots" in error_line(result)


@needs_horovod
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"controler": "gloo"},
            "distributed.options.controler: unknown option of distributed backend 'horovod' "
            "(did you mean 'controller'?)",
        ),
        ({"controller": "nccl"}, "distributed.options.controller: must be gloo or mpi, not 'nccl'"),
        pytest.param(
            {"controller": "mpi"},
            "distributed.options.controller: mpi needs `mpirun` on PATH",
            marks=pytest.mark.skipif(
                shutil.which("mpirun") is not None, reason="this machine has mpirun"
            ),
        ),
    ],
)
def test_bad_options_are_refused_before_the_run(expkit_cli, write_job, options, message):
    spec = {**TWO_RANKS, "distributed": {"backend": "horovod", "options": options}}
    job = write_job(spec, script="print('never runs')\n")

    result = expkit_cli("run", str(job))

    assert result.returncode == 2
    assert message in error_line(result)


# -- without horovod ------------------------------------------------------------------------
# `sys.modules["horovod"] = None` is Python's own way to make a package unimportable: `import
# horovod` raises ImportError and importlib.util.find_spec("horovod") returns None.
WITHOUT_HOROVOD = (
    "import sys; sys.modules['horovod'] = None; "
    "from expkit.cli import main; sys.exit(main(sys.argv[1:]))"
)
INSTALL_HINT = (
    "horovod is not installed; run `bash .ci/install` "
    "(it builds horovod 0.28.1 for torch 2.14 and caches the wheel)"
)


def expkit_without_horovod(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_HOROVOD, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EXPKIT_WORKSPACE": str(workspace)},
        stdin=subprocess.DEVNULL,
    )


def test_without_horovod_the_plugin_says_how_to_install_it(expkit_workspace, write_job):
    listing = expkit_without_horovod(expkit_workspace.path, "plugins")
    job = write_job(TWO_RANKS, script="print('never runs')\n")
    run = expkit_without_horovod(expkit_workspace.path, "run", str(job))

    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert any(
        line.startswith("horovod  (") and line.endswith(f")  not loaded: {INSTALL_HINT}")
        for line in lines
    ), listing.stdout
    assert "  loaded" in listing.stdout  # the other plugins still load
    assert run.returncode == 2
    line = error_line(run)
    assert "distributed: no distributed backend named 'horovod'" in line
    assert f"plugin horovod did not load: {INSTALL_HINT}" in line


# -- the sample job -------------------------------------------------------------------------
@needs_horovod
@pytest.mark.slow
def test_the_sample_job_trains_on_two_horovod_ranks_and_registers_the_model(
    expkit_cli, expkit_workspace
):
    job = REPO / "training" / "job-horovod.yaml"
    assert yaml.safe_load(job.read_text())["distributed"] == "horovod"

    one_small_epoch = ["--set", "args.num_epochs=1", "--set", "args.image_size=16"]
    result = expkit_cli("run", str(job), *one_small_epoch, timeout=900)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "model pt-dnn version 1" in result.stdout
    record = expkit_workspace.history.runs.recent(limit=1)[0]
    assert record.state == "completed"
    logs = expkit_workspace.run_dir(record.id) / "logs"
    assert "epoch 1/1" in (logs / "rank-0.log").read_text()
    assert "rank 1 of 2" in (logs / "rank-1.log").read_text()
    best = expkit_workspace.history.metrics.of(record.id, "best_val_acc")
    assert len(best) == 1  # logged by rank 0 only


def test_horovodrun_pieces_of_several_ranks_on_one_line_go_to_their_ranks():
    from expkit.capabilities import RankPieces
    from expkit_horovod.backend import RANK_PIECE

    split = RankPieces(RANK_PIECE)
    # rank 1's progress piece, then rank 0's line, on one line of horovodrun's output
    line = b"[1]<stdout>:progress 50%\r[0]<stdout>:hello from rank 0\n"
    assert split(line) == (0, b"hello from rank 0\n")
    assert split(b"[1]<stdout>:progress 100%\n") == (1, b"progress 50%\rprogress 100%\n")
    # a rank's own stderr after its progress piece stays in its log, in that order
    assert split(b"[1]<stdout>:50%\r[1]<stderr>:warning\n") == (1, b"50%\rwarning\n")
    # a prefix-like text inside a line is the rank's text, and horovodrun's own lines are its
    assert split(b"[0]<stdout>:see [1]<stdout>: here\n") == (0, b"see [1]<stdout>: here\n")
    assert split(b"Process 1 exit with status code 3.\n") == (
        None,
        b"Process 1 exit with status code 3.\n",
    )
