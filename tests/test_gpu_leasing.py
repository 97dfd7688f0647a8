"""GPUs are leased like process slots and handed to the script through CUDA_VISIBLE_DEVICES.

This machine has no GPU, so the tests declare the local target's GPUs with
`compute.options.gpus`; the leasing, the waiting and the variable the script sees are real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SHOW_GPUS = """
import json, os, pathlib, time
pathlib.Path("outputs").mkdir(exist_ok=True)
visible = os.environ.get("CUDA_VISIBLE_DEVICES")
pathlib.Path("outputs/gpus.json").write_text(json.dumps(visible))
time.sleep(float(os.environ.get("HOLD", "0")))
"""


def gpus_seen(result) -> str | None:
    return json.loads((result.run_dir / "outputs" / "gpus.json").read_text())


def test_a_run_gets_the_gpus_it_leased(run_job):
    result = run_job(
        {"compute": {"target": "local", "options": {"gpus": 4}}, "resources": {"gpus_per_node": 2}},
        script=SHOW_GPUS,
    )

    assert result.state == "completed"
    assert gpus_seen(result) == "0,1"
    assert "GPUs [0, 1]" in result.output  # the scale stage says what it holds


def test_a_run_without_gpus_sees_none(run_job):
    result = run_job({"compute": {"target": "local", "options": {"gpus": 4}}}, script=SHOW_GPUS)

    assert gpus_seen(result) == ""  # hidden, so it cannot take a GPU another run leased


def test_concurrent_runs_get_disjoint_gpus(expkit_workspace, write_job, tmp_path):
    """Both scripts hold their GPU until the other has started, so the leases overlap."""
    spec = {
        "compute": {"target": "local", "options": {"gpus": 2, "slots": 2}},
        "resources": {"gpus_per_node": 1},
    }
    jobs = [write_job(spec, script=SHOW_GPUS + MEET) for _ in range(2)]
    env = {**os.environ, "MEET_DIR": str(tmp_path / "meet")}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "expkit", "run", str(job), "--quiet"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        for job in jobs
    ]
    outputs = [run.communicate(timeout=120)[0].decode() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs

    seen = sorted(
        json.loads((expkit_workspace.run_dir(r.id) / "outputs" / "gpus.json").read_text())
        for r in expkit_workspace.history.runs.recent()
    )
    assert seen == ["0", "1"]


# Appended to SHOW_GPUS: wait (up to 60 s) until both runs are in their run stage.
MEET = """
meet = pathlib.Path(os.environ["MEET_DIR"])
meet.mkdir(exist_ok=True)
(meet / str(os.getpid())).touch()
deadline = time.time() + 60
while len(list(meet.iterdir())) < 2 and time.time() < deadline:
    time.sleep(0.05)
"""


def _seen_with(expkit_cli, expkit_workspace, write_job, visible: str, spec: dict) -> str | None:
    """Run SHOW_GPUS with `expkit run` under the caller's CUDA_VISIBLE_DEVICES=`visible`."""
    done = expkit_cli(
        "run", str(write_job(spec, script=SHOW_GPUS)), env={"CUDA_VISIBLE_DEVICES": visible}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    record = expkit_workspace.history.runs.recent()[0]
    return json.loads((expkit_workspace.run_dir(record.id) / "outputs" / "gpus.json").read_text())


def test_a_leased_gpu_is_one_of_the_callers_visible_gpus(expkit_cli, expkit_workspace, write_job):
    seen = _seen_with(
        expkit_cli, expkit_workspace, write_job, "2,3", {"resources": {"gpus_per_node": 1}}
    )

    assert seen == "2"  # the caller's first GPU, never physical GPU 0


def test_gpus_named_by_uuid_are_passed_on_as_uuids(expkit_cli, expkit_workspace, write_job):
    visible = "GPU-8f6e1c2a-0000-0000-0000-000000000001,GPU-8f6e1c2a-0000-0000-0000-000000000002"

    seen = _seen_with(
        expkit_cli, expkit_workspace, write_job, visible, {"resources": {"gpus_per_node": 2}}
    )

    assert seen == visible


def test_declaring_more_gpus_than_the_caller_may_use_is_refused(expkit_cli, write_job):
    spec = {
        "compute": {"target": "local", "options": {"gpus": 4}},
        "resources": {"gpus_per_node": 1},
    }

    done = expkit_cli(
        "run", str(write_job(spec, script=SHOW_GPUS)), env={"CUDA_VISIBLE_DEVICES": "2,3"}
    )

    assert done.returncode == 2, done.stdout + done.stderr
    assert "CUDA_VISIBLE_DEVICES names 2 (2,3)" in done.stderr
    assert "Traceback" not in done.stderr
