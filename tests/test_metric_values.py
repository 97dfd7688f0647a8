"""Every value a script logs is recorded, from every process it forks; a bad one alone is not.

Each test drives a real script through `expkit run` and reads what was recorded back through
`expkit runs show --json`, `expkit metrics` and the Python API, as a user would.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from expkit import Run


def _run(expkit_cli, write_job, script: str) -> tuple[str, str]:
    """Run `script` with `expkit run`: (its run id, everything the command printed)."""
    job = write_job({}, script=script)
    done = expkit_cli("run", str(job))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    found = re.search(r"run (\S+): completed", out)
    assert found, out
    return found.group(1), out


def _metrics(expkit_cli, run_id: str) -> dict:
    shown = expkit_cli("runs", "show", run_id, "--json")
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout, parse_constant=_strict)["metrics"]


def _all(workspace, run_id: str) -> dict:
    """Every value of every metric, through the Python API (`Run.get_metrics`)."""
    return Run(workspace, run_id).get_metrics()


def _strict(text: str):
    raise ValueError(f"not strict JSON: {text}")


NUMBERS = """
import numpy as np
import torch
from expkit import Run

run = Run.get_context()
run.log("np_float32", np.float32(0.25))
run.log("np_float16", np.float16(0.5))
run.log("np_int64", np.int64(7))
run.log("np_uint8", np.uint8(200))
run.log("np_bool", np.bool_(True))
run.log("zero_d_array", np.array(1.5))
run.log("torch_scalar", torch.tensor(0.75))
run.log("torch_bf16", torch.tensor(2.0, dtype=torch.bfloat16))
run.log("torch_int", torch.tensor(3))
from decimal import Decimal
run.log("decimal", Decimal("0.125"))
weights = torch.tensor(1.0)
run.log("changed_after", weights)
weights.add_(100.0)  # in place, after logging: the logged value stays 1.0
array = np.array(4.0)
run.log("array_after", array)
array += 1
run.log_list("list_of_numpy", [np.float64(0.5), np.float32(0.25)])
run.log_row("table", acc=np.float32(0.5), n=np.int32(3))
run.log("np_step", 0.5, step=np.int64(4))
print("logged")
"""


def test_numbers_that_are_not_python_floats_are_stored_as_numbers(
    expkit_cli, write_job, expkit_workspace
):
    run_id, _ = _run(expkit_cli, write_job, NUMBERS)

    got = _metrics(expkit_cli, run_id)

    assert got["np_float32"] == 0.25
    assert got["np_float16"] == 0.5
    assert got["np_int64"] == 7
    assert got["np_uint8"] == 200
    assert got["np_bool"] == 1
    assert got["zero_d_array"] == 1.5
    assert got["torch_scalar"] == 0.75
    assert got["torch_bf16"] == 2.0
    assert got["torch_int"] == 3
    assert got["decimal"] == 0.125
    assert got["changed_after"] == 1.0
    assert got["array_after"] == 4.0
    every = _all(expkit_workspace, run_id)
    assert every["list_of_numpy"] == [0.5, 0.25]
    assert every["table"] == {"acc": [0.5], "n": [3]}
    for name in ("np_float32", "torch_scalar", "torch_int", "decimal", "changed_after"):
        assert isinstance(got[name], float | int), (name, got[name])
    listed = expkit_cli("metrics", run_id, "np_step")
    assert [line.split()[:3] for line in listed.stdout.splitlines()[1:]] == [
        ["np_step", "4", "0.5"]
    ]


BAD_VALUES = """
from expkit import Run

run = Run.get_context()
for i in range(3000):
    run.log("loss", 1.0, step=i)
    if i == 1000:
        run.log("huge", 2**1024)
        run.log("acc", 0.5, step="epoch_1")
        run.log("acc", 0.5, step=2**70)
        run.log("huge", 2**1024)
print("still running")
run.log("after", 2.0)
"""


def test_a_bad_value_or_step_is_rejected_alone_with_one_notice(
    expkit_cli, write_job, expkit_workspace
):
    run_id, out = _run(expkit_cli, write_job, BAD_VALUES)

    assert "still running" in out
    notices = [line for line in out.splitlines() if "was not recorded" in line]
    assert len(notices) == 2, out
    assert "'huge'" in notices[0] and "too large for a float" in notices[0]
    assert "'acc'" in notices[1] and "'epoch_1' is not an integer" in notices[1]
    got = _all(expkit_workspace, run_id)
    assert len(got["loss"]) == 3000
    assert got["after"] == 2.0
    assert "huge" not in got and "acc" not in got


BAD_LINES = """
import json, os
from expkit import Run

run = Run.get_context()
run.log("before", 1.0)
run.flush()
# a process that writes the channel by hand (another client, an older expkit)
folder = os.environ["EXPKIT_METRICS_DIR"]
with open(os.path.join(folder, "rank-0.hand.jsonl"), "w") as f:
    f.write('["m","good",1.0,1,1.0,0]\\n')
    f.write('["m","far",1.0,%d,1.0,0]\\n' % 2**70)
    f.write('["m","wide",%d,null,1.0,0]\\n' % 2**1100)
    f.write('["m","\\\\ud800",1.0,null,1.0,0]\\n')
    f.write('not json\\n')
    f.write('["m","good",2.0,2,1.0,0]\\n')
run.log("after", 3.0)
"""


def test_a_channel_line_the_history_cannot_store_does_not_take_others_with_it(run_job):
    result = run_job({}, script=BAD_LINES)

    assert result.state == "completed", result.output
    got = result.run.get_metrics()
    assert got["good"] == [1.0, 2.0]
    assert got["before"] == 1.0 and got["after"] == 3.0
    assert "far" not in got and "wide" not in got
    warning = next(line for line in result.output.splitlines() if "unreadable" in line)
    assert "4 unreadable metric lines were skipped" in warning
    assert "'far': step" in warning


FORKS = """
import multiprocessing as mp
import os
import sys
from expkit import Run

run = Run.get_context()

def child(i):
    Run.get_context().log("child", float(i), step=i)  # and exit at once, through os._exit

if __name__ == "__main__":
    for i in range(500):
        run.log("parent", float(i), step=i)  # still queued when the children are forked
    fork = mp.get_context("fork")
    children = [fork.Process(target=child, args=(i,)) for i in range(4)]
    for process in children:
        process.start()
    for process in children:
        process.join()
    with fork.Pool(2) as pool:
        pool.map(child, range(10, 14))
        pool.close()
        pool.join()
    pid = os.fork()
    if pid == 0:
        Run.get_context().log("plain_fork", 1.0)
        sys.exit(0)
    os.waitpid(pid, 0)
    print("forked")
"""


def test_metrics_from_forked_processes_are_recorded_once(expkit_cli, write_job, expkit_workspace):
    run_id, _ = _run(expkit_cli, write_job, FORKS)

    got = _all(expkit_workspace, run_id)

    assert got["parent"] == [float(i) for i in range(500)]
    assert sorted(got["child"]) == [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0]
    assert got["plain_fork"] == 1.0


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_runs_show_json_is_strict_json(expkit_cli, write_job, value):
    run_id, _ = _run(
        expkit_cli,
        write_job,
        f"from expkit import Run\nRun.get_context().log('v', float({str(value)!r}))\n",
    )

    got = _metrics(expkit_cli, run_id)

    assert got["v"] == {math.inf: "Infinity", -math.inf: "-Infinity"}.get(value, "NaN")
    assert isinstance(Run, type)


POOL = """
import multiprocessing as mp
import sys
from expkit import Run

def work(i):
    Run.get_context().log("w", float(i), step=i)  # the last thing a worker does: it is killed
    return i

if __name__ == "__main__":
    run = Run.get_context()
    mp.set_start_method(sys.argv[1])
    with mp.Pool(4) as pool:  # __exit__ terminates the workers (SIGTERM), at once
        print("mapped", pool.map(work, range(8)))
    run.log("main", 1.0)
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_values_of_pool_workers_terminated_by_the_pool_are_recorded_once(
    expkit_cli, write_job, expkit_workspace, method
):
    job = write_job({"args": [method]}, script=POOL)
    done = expkit_cli("run", str(job))
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "mapped [0, 1, 2, 3, 4, 5, 6, 7]" in out, out
    run_id = re.search(r"run (\S+): completed", out).group(1)

    got = _all(expkit_workspace, run_id)

    assert sorted(got["w"]) == [float(i) for i in range(8)]
    assert got["main"] == 1.0


OS_EXIT = """
import os
from expkit import Run

run = Run.get_context()
for i in range(4):
    pid = os.fork()
    if pid == 0:
        Run.get_context().log("w", float(i), step=i)
        os._exit(0)  # no atexit, no multiprocessing finalizers
    os.waitpid(pid, 0)
run.log("main", 1.0)
"""


def test_values_of_a_forked_child_that_leaves_through_os_exit_are_recorded_once(
    expkit_cli, write_job, expkit_workspace
):
    run_id, _ = _run(expkit_cli, write_job, OS_EXIT)

    got = _all(expkit_workspace, run_id)

    assert got["w"] == [0.0, 1.0, 2.0, 3.0]
    assert got["main"] == 1.0


KILLED = """
import multiprocessing as mp
import os
import signal
import sys
from expkit import Run

def work(i):
    Run.get_context().log("w", float(i), step=i)
    os.kill(os.getpid(), signal.SIGKILL)  # no exit handler, no writer thread gets a turn

if __name__ == "__main__":
    method = mp.get_context(sys.argv[1])
    children = [method.Process(target=work, args=(i,)) for i in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join()
    print("exit codes", [child.exitcode for child in children])
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_value_is_in_the_childs_channel_once_log_returns(
    expkit_cli, write_job, expkit_workspace, method
):
    done = expkit_cli("run", str(write_job({"args": [method]}, script=KILLED)))
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "exit codes [-9, -9, -9]" in out, out
    run_id = re.search(r"run (\S+): completed", out).group(1)

    assert sorted(_all(expkit_workspace, run_id)["w"]) == [0.0, 1.0, 2.0]


def test_a_metric_name_with_a_newline_stays_on_the_summarys_metrics_line(
    expkit_cli, write_job, expkit_workspace
):
    run_id, out = _run(
        expkit_cli,
        write_job,
        "from expkit import Run\nrun = Run.get_context()\n"
        'run.log("a\\nb\\tc", 1.5)\nrun.log("z", 2.0)\n',
    )
    (line,) = [line for line in out.splitlines() if line.lstrip().startswith("metrics")]
    assert "a\\nb\\tc 1.5, z 2" in line
    assert _metrics(expkit_cli, run_id)["a\nb\tc"] == 1.5  # stored as logged
