"""The plugin contract and its test kit: `expkit.plugin` is all a plugin imports, the
conformance checks pass for the built-in plugins and catch the faults they exist to catch,
and a compute target written with the public runner alone
(training/plugins/expkit_nice.py) works.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from expkit.conformance import COMPUTE_OBLIGATIONS
from expkit.plugin import (
    HOOKS,
    Process,
    ProcessGroup,
    RunContext,
    assert_no_processes_left,
    check_compute_target,
    check_distributed_backend,
    check_environment_builder,
    check_metric_sink,
    runner,
)
from expkit_local.target import LocalTarget

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "training" / "plugins"
# What a built-in plugin may import of expkit: the contract, the in-script API, the test kit.
PUBLIC = {"expkit.plugin", "expkit.context", "expkit.testing"}


# -- the contract -------------------------------------------------------------------------------
def expkit_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of an expkit module in `path`, wherever it is (inside
    functions and TYPE_CHECKING blocks too); `from expkit import x` counts as expkit.x."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "expkit"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "expkit":
                found += [(node.lineno, f"expkit.{a.name}") for a in node.names]
            elif node.module.split(".")[0] == "expkit":
                found.append((node.lineno, node.module))
    return found


def test_built_in_plugins_and_the_example_import_only_the_public_contract():
    files = sorted((REPO / "plugins").rglob("*.py")) + sorted(EXAMPLES.rglob("*.py"))
    assert len(files) > 20
    internal = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for path in files
        for line, module in expkit_imports(path)
        if module not in PUBLIC
    ]
    assert internal == [], "plugins must import expkit.plugin, not internals:\n" + "\n".join(
        internal
    )


def test_the_import_walk_sees_every_kind_of_import(tmp_path):
    path = tmp_path / "p.py"
    path.write_text(
        "import expkit\nfrom expkit import history\nfrom expkit.job import JobSpec\n"
        "from expkit.plugin import hookimpl\nimport expkit_local\nfrom . import sibling\n"
        "def f():\n    import expkit.procs\n"
    )
    assert expkit_imports(path) == [
        (1, "expkit"),
        (2, "expkit.history"),
        (3, "expkit.job"),
        (4, "expkit.plugin"),
        (8, "expkit.procs"),
    ]


def test_every_name_of_the_contract_resolves_and_the_hooks_are_the_hookspecs():
    import expkit.plugin as contract
    from expkit import hookspecs

    for name in contract.__all__:
        assert getattr(contract, name) is not None, name
    specs = [
        name
        for name, value in vars(hookspecs).items()
        if callable(value) and hasattr(value, "expkit_spec")
    ]
    assert sorted(HOOKS) == sorted(specs)
    with pytest.raises(AttributeError, match="no attribute 'History'"):
        contract.History  # noqa: B018


def test_importing_the_contract_is_cheap():
    """`import expkit.plugin` loads nothing of the core; the names a compute target uses load
    pluggy (for hookimpl) and the capabilities, never torch, numpy, SQLite or a service SDK."""
    code = (
        "import sys, expkit.plugin\n"
        "first = sorted(m for m in sys.modules if m.startswith(('expkit.', 'pluggy')))\n"
        "from expkit.plugin import ComputeTarget, Option, hookimpl, runner\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'mlflow',"
        " 'azureml', 'sqlite3', 'yaml', 'pytest'})\n"
        "print(first, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['expkit.plugin'] []"


# -- compute targets ------------------------------------------------------------------------------
def test_the_local_target_keeps_the_compute_target_contract():
    assert check_compute_target(LocalTarget()) == list(COMPUTE_OBLIGATIONS)


class IgnoresTimeout(LocalTarget):
    def execute(self, ctx, processes, allocation):
        return runner.run(ctx, processes, dict(os.environ), timeout=3600)


class ReturnsZero(LocalTarget):
    def execute(self, ctx, processes, allocation):
        runner.run(ctx, processes, dict(os.environ))
        return 0


class IgnoresCancel(LocalTarget):
    def execute(self, ctx, processes, allocation):
        deaf = dataclasses.replace(ctx, canceled=lambda: False)
        return runner.run(deaf, processes, dict(os.environ))


class ThroughAShell(LocalTarget):
    """Runs each command under `sh -c`: a signal becomes exit code 128 + N."""

    def execute(self, ctx, processes, allocation):
        def wrap(process):
            return ["sh", "-c", 'exec_it() { "$@"; }; exec_it "$@"; exit $?', "sh", *process.argv]

        return runner.run(ctx, processes, dict(os.environ), wrap=wrap)


class LeaderOnly(ProcessGroup):
    """Stops only the processes it started, not what they started in their groups."""

    def stop(self):
        for _, popen in self.children:
            if popen.poll() is None:
                popen.kill()
            popen.wait()


class LeaksChildren(LocalTarget):
    def execute(self, ctx, processes, allocation):
        with LeaderOnly(ctx, dict(os.environ)) as group:
            for process in processes:
                group.start(process)
            return group.wait(ctx.job.timeout)


class KeepsLeases(LocalTarget):
    def release(self, ctx, allocation):
        pass


class LosesStderr(LocalTarget):
    def execute(self, ctx, processes, allocation):
        def wrap(process):
            return ["sh", "-c", 'exec "$@" 2>/dev/null', "sh", *process.argv]

        return runner.run(ctx, processes, dict(os.environ), wrap=wrap)


@pytest.mark.parametrize(
    ("target", "only", "broken"),
    [
        (IgnoresTimeout(), ("timeout",), r"timeout: execute did not return within 8s"),
        (ReturnsZero(), ("exit_codes",), r"exit_codes: rank 0 exited 3 .*; returned 0"),
        (IgnoresCancel(), ("cancel",), r"cancel: execute did not raise Canceled within 3s"),
        (ThroughAShell(), ("exit_codes",), r"exit_codes: each rank was killed by SIGKILL: "
                                           r"execute must return -9; returned 137"),
        (LeaksChildren(), ("exit_codes", "no_leftovers"), r"no_leftovers: after execute "
                                                          r"returned 0: 2 process\(es\) of run"),
        (KeepsLeases(), ("acquire_release",), r"acquire_release: release left leases of the "
                                              r"run held: process \d, process \d"),
        (LosesStderr(), ("logs",), r"logs: logs/rank-0.log must hold rank 0's output byte for "
                                   r"byte"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, LocalTarget) else None,
)  # fmt: skip
def test_a_target_that_breaks_an_obligation_fails_the_check_naming_it(target, only, broken):
    with pytest.raises(AssertionError) as failure:
        # A call counts as hung after `limit` seconds: short only where hanging is the fault.
        limit = 8 if isinstance(target, IgnoresTimeout) else 60
        check_compute_target(target, only=only, limit=limit, cancel_within=3)
    message = str(failure.value)
    assert message.startswith("compute target 'local' breaks its contract: "), message
    assert re.search(broken, message), message


def test_an_unknown_obligation_is_refused():
    with pytest.raises(ValueError, match="unknown obligation 'logz'"):
        check_compute_target(LocalTarget(), only=("logz",))


# -- the example: a target that differs from local only in how processes start --------------------
@pytest.fixture
def nice_plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import expkit_nice

    return expkit_nice


def test_the_nice_example_is_a_whole_compute_target_in_under_80_lines(nice_plugin):
    assert len(Path(nice_plugin.__file__).read_text().splitlines()) < 80
    assert check_compute_target(nice_plugin.NiceTarget()) == list(COMPUTE_OBLIGATIONS)


def test_a_job_on_the_nice_target_runs_niced_and_pinned(nice_plugin, register_plugin, run_job):
    register_plugin(nice_plugin, "nice")
    cpu = min(os.sched_getaffinity(0))
    script = (
        "import json, os\n"
        "print(json.dumps({'nice': os.nice(0), 'cpus': sorted(os.sched_getaffinity(0))}))\n"
    )
    job = {"compute": {"target": "nice", "options": {"niceness": 7, "cpus": [cpu]}}}
    result = run_job(job, script=script)
    assert result.state == "completed", result.output
    seen = json.loads((result.run_dir / "logs" / "rank-0.log").read_text())
    assert seen == {"nice": min(os.nice(0) + 7, 19), "cpus": [cpu]}


def test_the_nice_targets_options_are_checked_before_a_run(
    nice_plugin, register_plugin, run_job, expkit_workspace
):
    from expkit.plugin import UserError

    register_plugin(nice_plugin, "nice")
    with pytest.raises(UserError, match=r"compute.options.niceness: must be a whole number"):
        run_job({"compute": {"target": "nice", "options": {"niceness": 40}}}, script="pass\n")
    assert expkit_workspace.history.runs.recent() == []


# -- the runner's hooks ---------------------------------------------------------------------------
def test_the_runners_preexec_runs_in_each_child_and_die_with_parent_is_kept(tmp_path):
    from expkit.job import JobSpec

    job = JobSpec.from_dict({"experiment": "x", "entry_script": "t.py"})
    echoed = []
    ctx = RunContext(
        run_id="x_1", job=job, run_dir=tmp_path, work_dir=tmp_path, log_dir=tmp_path / "logs",
        script_env={}, say=print, waiting=lambda text: None, canceled=lambda: False,
        echo=lambda rank, line: echoed.append((rank, line)),
    )  # fmt: skip
    script = (
        "import ctypes, os, signal\n"
        "sig = ctypes.c_int()\n"
        "ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)\n"  # PR_GET_PDEATHSIG
        "print(os.nice(0), sig.value == signal.SIGKILL)\n"
    )
    processes = [Process([sys.executable, "-c", script], rank=r) for r in (0, 1)]
    assert runner.run(ctx, processes, dict(os.environ), preexec=lambda: os.nice(3)) == 0
    line = f"{min(os.nice(0) + 3, 19)} True\n"
    assert (tmp_path / "logs" / "rank-1.log").read_text() == line
    assert sorted(echoed) == [(0, line.encode()), (1, line.encode())]


# -- other capabilities ---------------------------------------------------------------------------
def test_the_built_in_backends_keep_the_backend_contract(expkit_plugins):
    none = expkit_plugins.get("distributed_backends", "none", "distributed")
    assert check_distributed_backend(none, processes=1) == ["check", "launch"]
    torchrun = expkit_plugins.get("distributed_backends", "torchrun", "distributed")
    assert check_distributed_backend(torchrun, processes=2) == ["check", "launch"]


def test_a_backend_that_numbers_its_ranks_wrong_fails_the_check(expkit_plugins):
    none = expkit_plugins.get("distributed_backends", "none", "distributed")

    class FromOne(type(none)):
        def check(self, job):
            pass

        def launch(self, ctx, command, allocation):
            return [Process(argv=command, rank=r + 1) for r in range(2)]

    with pytest.raises(AssertionError, match=r"launch: 2 ranks must be .* got ranks \[1, 2\]"):
        check_distributed_backend(FromOne(), processes=2)


def test_tensorboard_keeps_the_metric_sink_contract(expkit_plugins):
    sink = expkit_plugins.get("metric_sinks", "tensorboard", "metrics")
    assert check_metric_sink(sink) == ["open", "send", "close"]


def test_mlflow_keeps_the_metric_sink_contract(expkit_plugins, tmp_path):
    pytest.importorskip("mlflow")
    sink = expkit_plugins.get("metric_sinks", "mlflow", "metrics")
    options = {
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "artifact_location": str(tmp_path / "artifacts"),
    }
    assert check_metric_sink(sink, options) == ["open", "send", "close"]
    assert list((tmp_path / "artifacts").rglob("table.json"))  # the table row, as a table


BUILDER_OBLIGATIONS = ["build", "python", "hash", "cache", "no_leftovers"]


@pytest.mark.parametrize("name", ["inherit", "pip"])
def test_the_built_in_builders_keep_the_builder_contract(expkit_plugins, name):
    builder = expkit_plugins.get("environment_builders", name, "environment")
    assert check_environment_builder(builder) == BUILDER_OBLIGATIONS


def test_a_builder_that_misses_its_own_cache_or_names_a_missing_python_fails_the_check(
    expkit_plugins,
):
    from expkit.plugin import Environment, EnvironmentBuilder

    class Forgetful(EnvironmentBuilder):
        name = "forgetful"
        builds = 0

        def build(self, spec, ctx):
            self.builds += 1
            return Environment(sys.executable, f"h{self.builds}", False, "built again")

    class Nowhere(EnvironmentBuilder):
        name = "nowhere"

        def build(self, spec, ctx):
            return Environment("/nonexistent/python", "h", True, "found")

    with pytest.raises(AssertionError, match=r"'forgetful' breaks its contract: hash: one spec"):
        check_environment_builder(Forgetful())
    with pytest.raises(AssertionError, match=r"'nowhere' breaks its contract: python: "):
        check_environment_builder(Nowhere())


def test_a_sink_whose_close_fails_the_second_time_fails_the_check(expkit_plugins):
    from expkit.plugin import MetricSink, MetricWriter

    class Once(MetricWriter):
        closed = False

        def send(self, metrics):
            pass

        def close(self, outcome):
            if self.closed:
                raise RuntimeError("already closed")
            self.closed = True

    class OnceSink(MetricSink):
        name = "once"

        def open(self, run, options):
            return Once()

    with pytest.raises(AssertionError, match=r"metric sink 'once' breaks its contract: close: "
                                             r"a second close raised RuntimeError"):  # fmt: skip
        check_metric_sink(OnceSink())


# -- the background command and the leftover check ----------------------------------------
def test_a_background_run_is_interrupted_like_ctrl_c_and_leaves_nothing(
    expkit_cli_background, write_job, expkit_workspace
):
    job = write_job({}, script="import time\nprint('training', flush=True)\ntime.sleep(300)\n")
    live = expkit_cli_background("run", str(job))
    match = live.wait_for(re.compile(r"^run (\S+) in workspace "))
    assert live.wait_for("training").strip().endswith("training")
    live.interrupt()
    assert live.wait() == 130, live.output
    assert expkit_workspace.history.runs.get(match.group(1)).state == "canceled"
    assert_no_processes_left(match.group(1), expkit_workspace.path)


def test_a_process_left_of_a_run_is_named(expkit_workspace):
    env = {**os.environ, "EXPKIT_RUN_ID": "leaky_1", "EXPKIT_WORKSPACE": str(expkit_workspace.path)}
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        with pytest.raises(AssertionError, match=r"1 process\(es\) of run leaky_1 still running: "
                                                 rf"{sleeper.pid} \(.*time.sleep"):  # fmt: skip
            assert_no_processes_left("leaky_1", expkit_workspace.path, grace=0.2)
        assert_no_processes_left("other_1", expkit_workspace.path, grace=0)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert_no_processes_left("leaky_1", expkit_workspace.path)
