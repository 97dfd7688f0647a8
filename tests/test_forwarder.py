"""The in-script API's forwarders: EXPKIT_FORWARDER=module:attribute names an object that also
gets what the script logs (on Azure ML the azureml target names its own, see
test_azureml_context.py). Here a recording forwarder, written as a module on PYTHONPATH, in
scripts run as subprocesses with the metric channel's variables set, and through a run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import bare_env, channel_calls

RECORDER = """
    import json
    import os


    class Recorder:
        def __init__(self):
            self.out = open(os.environ["RECORDER_OUT"], "a")
            self.before_exit = None

        def send(self, items):
            for kind, name, value, step, ts in items:
                self.out.write(json.dumps([kind, name, value, step]) + "\\n")
            self.out.flush()

        def close(self, timeout):
            self.out.write(json.dumps(["closed", timeout, callable(self.before_exit)]) + "\\n")
            self.out.close()


    def make():
        return Recorder()


    class Broken:
        def __init__(self):
            raise RuntimeError("no service here")


    class NotAForwarder:
        pass


    class Failing(Recorder):
        def send(self, items):
            raise ConnectionError("the service went away")
"""

SCRIPT = """
    from expkit import Run

    run = Run.get_context()
    run.log("acc", 0.5, step=0)
    run.log("acc", 0.9, step=1)
    run.log_row("per_class", cls=1, acc=0.9)
    run.set_tags({"model": "resnet18"})
    print("offline:", run.offline)
"""

LOGGED = [
    ["m", "acc", 0.5, 0],
    ["m", "acc", 0.9, 1],
    ["r", "per_class", {"cls": 1, "acc": 0.9}, None],
    ["t", "", {"model": "resnet18"}, None],
]


@pytest.fixture
def recorder(tmp_path: Path) -> Path:
    """The folder of the `recorder` module (to put on PYTHONPATH)."""
    folder = tmp_path / "forwarders"
    folder.mkdir()
    (folder / "recorder.py").write_text(textwrap.dedent(RECORDER))
    return folder


def run_script(tmp_path: Path, recorder: Path, **env: str) -> subprocess.CompletedProcess:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    variables = {"PYTHONPATH": str(recorder), "RECORDER_OUT": str(tmp_path / "sent.jsonl")}
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=bare_env(**variables, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def sent(tmp_path: Path) -> list[list]:
    path = tmp_path / "sent.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def channel_lines(folder: Path) -> list[list]:
    (channel,) = folder.glob("rank-0.*.jsonl")
    return [list(call) for call in channel_calls(channel)]


def test_a_named_forwarder_gets_what_the_script_logs(tmp_path, recorder):
    channel = tmp_path / "logs" / "expkit-metrics"  # not there yet: a forwarder's target's
    result = run_script(
        tmp_path,
        recorder,
        EXPKIT_FORWARDER="recorder:Recorder",
        EXPKIT_METRICS_DIR=str(channel),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == "offline: False\n"
    # every call, in order; then closed at exit, with the ScriptRun's flush as before_exit
    assert sent(tmp_path) == [*LOGGED, ["closed", 30.0, True]]
    assert [line[:4] for line in channel_lines(channel)] == LOGGED  # expkit's channel too


def test_a_factory_and_no_channel_the_forwarder_alone_records(tmp_path, recorder):
    result = run_script(tmp_path, recorder, EXPKIT_FORWARDER=" recorder : make ")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no "not running under expkit": the forwarder records
    assert result.stdout == "offline: False\n"
    assert sent(tmp_path) == [*LOGGED, ["closed", 30.0, True]]


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("no_such_forwarder_module:Recorder", "ModuleNotFoundError: No module named"),
        ("recorder", "ValueError: not module:attribute"),
        ("recorder:Missing", "AttributeError: module 'recorder' has no attribute 'Missing'"),
        ("recorder:Broken", "RuntimeError: no service here"),
        ("recorder:NotAForwarder", "TypeError: NotAForwarder has no send() and close()"),
    ],
)
def test_a_forwarder_that_cannot_be_had_is_one_notice(tmp_path, recorder, spec, why):
    channel = tmp_path / "logs" / "expkit-metrics"
    result = run_script(tmp_path, recorder, EXPKIT_FORWARDER=spec, EXPKIT_METRICS_DIR=str(channel))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "offline: False\n"
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"expkit: EXPKIT_FORWARDER={spec}: no forwarder ({why}"), line
    assert line.endswith("); metrics are recorded by expkit only")
    # the folder is made all the same, and the script's metrics are recorded
    assert [line[:4] for line in channel_lines(channel)] == LOGGED
    assert sent(tmp_path) == []


def test_an_empty_value_is_no_forwarder(tmp_path, recorder):
    """How a job turns the target's forwarder off; the channel's folder is made as with one."""
    channel = tmp_path / "logs" / "expkit-metrics"
    result = run_script(tmp_path, recorder, EXPKIT_FORWARDER="", EXPKIT_METRICS_DIR=str(channel))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert [line[:4] for line in channel_lines(channel)] == LOGGED
    assert sent(tmp_path) == []


def test_a_forwarder_that_fails_to_send_is_one_notice(tmp_path, recorder):
    channel = tmp_path / "metrics"
    result = run_script(
        tmp_path,
        recorder,
        EXPKIT_FORWARDER="recorder:Failing",
        EXPKIT_METRICS_DIR=str(channel),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        "expkit: the forwarder Failing failed (ConnectionError: the service went away); "
        "metrics are recorded by expkit only\n"
    )
    assert [line[:4] for line in channel_lines(channel)] == LOGGED


def test_a_run_through_expkit_also_goes_to_the_forwarder(run_job, recorder, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(recorder))
    monkeypatch.setenv("RECORDER_OUT", str(tmp_path / "sent.jsonl"))
    monkeypatch.setenv("EXPKIT_FORWARDER", "recorder:Recorder")
    result = run_job({}, script=SCRIPT)
    assert result.state == "completed", result.output
    assert sent(tmp_path) == [*LOGGED, ["closed", 30.0, True]]
    # and expkit's history has them, as without a forwarder
    assert result.run.get_metrics() == {"acc": [0.5, 0.9], "per_class": {"cls": [1], "acc": [0.9]}}
    assert result.run.get_tags()["model"] == "resnet18"


IMPORTS = """
import json, sys
before = set(sys.modules)
from expkit import Run
Run.get_context().log("acc", 1.0)
new = sorted(set(sys.modules) - before)
print(json.dumps([m for m in new if m.split(".")[0] not in sys.stdlib_module_names]))
"""


def test_without_a_forwarder_the_in_script_api_imports_only_the_standard_library(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS],
        env=bare_env(EXPKIT_METRICS_DIR=str(tmp_path)),  # no EXPKIT_FORWARDER
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    outside = json.loads(result.stdout)
    assert all(m == "expkit" or m.startswith("expkit.") for m in outside), outside
    assert "expkit.context" in outside
