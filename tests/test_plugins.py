"""Hook specs and plugin discovery: how plugins are found, listed, isolated and called.

Plugins are found for real, through the `expkit` entry-point group: a test "installs" a
distribution by writing its `.dist-info` (METADATA and entry_points.txt) and its module into
a folder, then puts that folder on the path (in this process, or via PYTHONPATH for the CLI).
"""

from __future__ import annotations

import inspect
import os
import subprocess
from importlib.metadata import entry_points, version

import pluggy
import pytest

import expkit
from conftest import FakeSite, error_line
from expkit import hookspecs
from expkit import plugins as plugin_manager
from expkit.capabilities import KINDS, Allocation
from expkit.errors import UserError

LOCAL_SCRIPT = "print('hello from the script')\n"

# The module source of a plugin supplying one compute target; `{name}` is the target's name.
TARGET_PLUGIN = """
import subprocess, os
import expkit
from expkit.capabilities import Allocation

class Target(expkit.ComputeTarget):
    name = {name!r}

    def acquire(self, ctx):
        return Allocation(hosts=["localhost"], slots=[0], description="one slot")

    def execute(self, ctx, processes, allocation):
        codes = [
            subprocess.run(p.argv, cwd=ctx.work_dir, env={{**os.environ, **p.env}}).returncode
            for p in processes
        ]
        return max(codes, default=0)

@expkit.hookimpl
def expkit_compute_targets():
    return [Target()]
"""


@pytest.fixture
def local_job(write_job):
    """A job spec file for a small job on the local target."""
    return write_job({}, script=LOCAL_SCRIPT)


def plugin_line(listing: str, name: str) -> str:
    """The first line of `expkit plugins` output about plugin `name`."""
    found = [line for line in listing.splitlines() if line.startswith(f"{name}  ")]
    assert found, listing
    return found[0]


# -- built-in plugins ----------------------------------------------------------------------------
def test_builtin_plugins_are_registered_under_the_expkit_entry_point_group():
    found = {ep.name: ep for ep in entry_points(group="expkit")}
    assert found["local"].value == "expkit_local"
    assert found["venv"].value == "expkit_venv"
    assert found["local"].dist.name == "expkit"


def test_builtin_plugins_load_and_supply_the_default_capabilities():
    plugins = plugin_manager.load()

    for name in ("local", "venv"):
        info = plugins.infos[name]
        assert info.error is None
        assert (info.distribution, info.version) == ("expkit", version("expkit"))
    assert plugins.get("compute_targets", "local").plugin == "local"
    assert plugins.get("distributed_backends", "none").plugin == "local"
    assert plugins.get("environment_builders", "inherit").plugin == "venv"
    assert plugins.get("environment_builders", "pip").plugin == "venv"
    assert plugins.conflicts == []


def test_expkit_plugins_shows_the_builtin_plugins(expkit_cli):
    result = expkit_cli("plugins")

    assert result.returncode == 0, result.stderr
    local = plugin_line(result.stdout, "local")
    assert f"(expkit {version('expkit')})" in local
    assert local.endswith("loaded")
    assert "compute target 'local'" in result.stdout
    assert "distributed backend 'none'" in result.stdout
    assert "environment builder 'inherit'" in result.stdout
    assert "environment builder 'pip'" in result.stdout
    assert "hooks:    expkit_environment_builders" in result.stdout


# -- expkit plugins NAME: one plugin and its options ---------------------------------------------
def option_rows(out: str) -> dict[str, list[str]]:
    """The option tables of `expkit plugins NAME`: each option's cells (type, default, help)."""
    rows: dict[str, list[str]] = {}
    header = None
    for line in out.splitlines():
        if line.strip().startswith("OPTION "):
            header = [line.index(h) for h in ("OPTION", "TYPE/RANGE", "DEFAULT", "HELP")]
        elif header and line.startswith("    ") and line.strip():
            cells = [line[a:b].strip() for a, b in zip(header, [*header[1:], None], strict=True)]
            rows[cells[0]] = cells[1:]
        else:
            header = None
    return rows


def test_expkit_plugins_name_shows_a_builtin_plugins_capabilities_and_options(expkit_cli):
    from expkit_local.target import MAX_GPUS, MAX_SLOTS

    local = expkit_cli("plugins", "local")
    onnx = expkit_cli("plugins", "onnx")

    assert local.returncode == 0, local.stderr
    assert plugin_line(local.stdout, "local").endswith("loaded")
    assert "compute target 'local': processes on this machine" in local.stdout
    assert "distributed backend 'none': one process, no distribution" in local.stdout
    assert "takes no options" in local.stdout  # the backend `none`
    rows = option_rows(local.stdout)
    assert rows["slots"][0] == f"a whole number from 1 to {MAX_SLOTS}"
    assert rows["gpus"][0] == f"a whole number from 0 to {MAX_GPUS}"
    assert "venv" not in local.stdout  # one plugin only
    assert onnx.returncode == 0, onnx.stderr
    assert "exporter 'onnx'" in onnx.stdout
    assert "ONNX opset number" in option_rows(onnx.stdout)["opset"][0]


def test_expkit_plugins_name_shows_each_options_default_and_help(site, expkit_cli):
    site.install(
        "expkit-tuned",
        {
            "tuned": """
                import expkit
                from expkit.capabilities import Option, declare_options

                class Sink(expkit.MetricSink):
                    name = "tuned-sink"
                    description = "metrics to a tuned server"
                    takes = declare_options(
                        url=Option(str, default="http://localhost:9", help="where to send"),
                        batch=Option(int, minimum=1, maximum=64, default=8),
                        verbose=Option(bool, default=False, help="say more"),
                        tags=Option(list, help="extra tags"),
                    )

                    def open(self, run, options):
                        raise NotImplementedError

                class Free(Sink):
                    name = "free-sink"
                    description = ""
                    takes = None

                @expkit.hookimpl
                def expkit_metric_sinks():
                    return [Sink(), Free()]
            """
        },
    )

    result = expkit_cli("plugins", "tuned", env=site.env)

    assert result.returncode == 0, result.stderr
    assert plugin_line(result.stdout, "tuned") == "tuned  (expkit-tuned 1.0)  loaded"
    assert "metric sink 'tuned-sink': metrics to a tuned server" in result.stdout
    assert option_rows(result.stdout) == {
        "url": ["a string", "http://localhost:9", "where to send"],
        "batch": ["a whole number from 1 to 64", "8", "-"],
        "verbose": ["true or false", "false", "say more"],
        "tags": ["a list of strings", "-", "extra tags"],
    }
    assert "metric sink 'free-sink': -" in result.stdout
    assert "options: not declared (the plugin checks them itself)" in result.stdout


def test_expkit_plugins_name_of_a_plugin_that_did_not_load_says_why(site, expkit_cli):
    site.install("expkit-broken", BROKEN_PLUGINS)

    result = expkit_cli("plugins", "needs-foo", env=site.env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "needs-foo  (expkit-broken 1.0)  not loaded: install it with pip install foo"
    )


def test_expkit_plugins_with_an_unknown_name_is_one_line_naming_the_known_ones(expkit_cli):
    result = expkit_cli("plugins", "lcoal")

    assert result.returncode == 2
    assert result.stdout == ""
    line = error_line(result)
    assert line.startswith("expkit: error: no plugin named 'lcoal' (did you mean 'local'?); ")
    known = line.split("known plugins: ")[1].split(", ")
    assert {"local", "venv", "onnx"} <= set(known)
    assert known == sorted(known)


# -- plugins that cannot load --------------------------------------------------------------------
BROKEN_PLUGINS = {
    "needs-torch-xyz": "import torch_xyz_not_installed\n",
    "needs-foo": (
        "import expkit\nraise expkit.PluginUnavailable('install it with pip install foo')\n"
    ),
}


def test_a_plugin_that_fails_to_import_is_skipped_with_a_one_line_reason(site):
    site.install("expkit-broken", BROKEN_PLUGINS)

    plugins = plugin_manager.load()

    missing = plugins.infos["needs-torch-xyz"]
    assert missing.error == "ModuleNotFoundError: No module named 'torch_xyz_not_installed'"
    assert missing.distribution == "expkit-broken"
    assert plugins.infos["needs-foo"].error == "install it with pip install foo"
    assert not plugins.pm.has_plugin("needs-foo")
    assert plugins.get("compute_targets", "local").plugin == "local"


def test_broken_plugins_are_listed_and_other_commands_still_work(site, expkit_cli, local_job):
    site.install("expkit-broken", BROKEN_PLUGINS)

    listing = expkit_cli("plugins", env=site.env)
    run = expkit_cli("run", str(local_job), env=site.env)

    assert listing.returncode == 0, listing.stderr
    assert plugin_line(listing.stdout, "needs-foo") == (
        "needs-foo  (expkit-broken 1.0)  not loaded: install it with pip install foo"
    )
    assert plugin_line(listing.stdout, "needs-torch-xyz").endswith(
        "not loaded: ModuleNotFoundError: No module named 'torch_xyz_not_installed'"
    )
    assert plugin_line(listing.stdout, "local").endswith("loaded")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "hello from the script" in run.stdout
    assert ": completed" in run.stdout


# -- two plugins claiming one name ---------------------------------------------------------------
def install_twins(site: FakeSite) -> None:
    site.install("expkit-twin-a", {"twin_a": TARGET_PLUGIN.format(name="twin")})
    site.install("expkit-twin-b", {"twin_b": TARGET_PLUGIN.format(name="twin")})


def test_two_plugins_supplying_one_name_is_an_error_naming_both(site):
    install_twins(site)

    plugins = plugin_manager.load()

    with pytest.raises(UserError) as error:
        plugins.get("compute_targets", "twin")
    message = str(error.value)
    assert "compute target 'twin' is supplied by two plugins" in message
    assert "twin_a (expkit-twin-a 1.0)" in message
    assert "twin_b (expkit-twin-b 1.0)" in message
    assert "EXPKIT_DISABLE_PLUGINS=" in message


def test_a_conflict_fails_expkit_plugins_and_expkit_run(site, expkit_cli, local_job):
    install_twins(site)

    listing = expkit_cli("plugins", env=site.env)
    run = expkit_cli("run", str(local_job), env=site.env)

    assert listing.returncode == 2
    conflict = [line for line in listing.stdout.splitlines() if line.startswith("error: ")]
    assert len(conflict) == 1
    assert "twin_a (expkit-twin-a 1.0)" in conflict[0]
    assert "twin_b (expkit-twin-b 1.0)" in conflict[0]
    assert run.returncode == 2
    line = error_line(run)
    assert "compute target 'twin' is supplied by two plugins" in line
    assert "no runs yet" in expkit_cli("runs", "list").stdout


def test_blocking_one_of_two_conflicting_plugins_resolves_the_conflict(site, expkit_cli, write_job):
    install_twins(site)
    job = write_job({"compute": "twin"}, script=LOCAL_SCRIPT)
    env = {**site.env, "EXPKIT_DISABLE_PLUGINS": "twin_b"}

    listing = expkit_cli("plugins", env=env)
    run = expkit_cli("run", str(job), env=env)

    assert listing.returncode == 0, listing.stdout
    assert plugin_line(listing.stdout, "twin_a").endswith("loaded")
    assert plugin_line(listing.stdout, "twin_b").endswith("blocked by EXPKIT_DISABLE_PLUGINS")
    assert "supplies: compute target 'twin'" in listing.stdout
    assert run.returncode == 0, run.stdout + run.stderr
    assert "hello from the script" in run.stdout


# -- EXPKIT_DISABLE_PLUGINS ----------------------------------------------------------------------
def test_a_disabled_plugin_is_blocked_and_its_capabilities_are_gone(site, monkeypatch):
    site.install("expkit-extra", {"extra": TARGET_PLUGIN.format(name="extra")})
    monkeypatch.setenv("EXPKIT_DISABLE_PLUGINS", "extra")

    plugins = plugin_manager.load()

    info = plugins.infos["extra"]
    assert info.blocked
    assert info.error == "blocked by EXPKIT_DISABLE_PLUGINS"
    assert "extra" not in plugins.all("compute_targets")
    with pytest.raises(UserError, match=r"no compute target named 'extra' \(available: .*local"):
        plugins.get("compute_targets", "extra", "compute")


def test_a_disabled_builtin_plugin_takes_its_capabilities_with_it(monkeypatch):
    monkeypatch.setenv("EXPKIT_DISABLE_PLUGINS", " venv , unknown-name")

    plugins = plugin_manager.load()

    assert plugins.infos["venv"].blocked
    assert "inherit" not in plugins.all("environment_builders")
    assert "local" in plugins.all("compute_targets")


def test_a_job_naming_a_disabled_plugin_gets_a_clear_error(site, expkit_cli, write_job):
    site.install("expkit-extra", {"extra": TARGET_PLUGIN.format(name="extra")})
    job = write_job({"compute": "extra"}, script=LOCAL_SCRIPT)
    env = {**site.env, "EXPKIT_DISABLE_PLUGINS": "extra"}

    enabled = expkit_cli("run", str(job), env=site.env)
    listing = expkit_cli("plugins", env=env)
    blocked = expkit_cli("run", str(job), env=env)

    assert enabled.returncode == 0, enabled.stdout + enabled.stderr
    assert plugin_line(listing.stdout, "extra") == (
        "extra  (expkit-extra 1.0)  not loaded: blocked by EXPKIT_DISABLE_PLUGINS"
    )
    assert blocked.returncode == 2
    line = error_line(blocked)
    assert "compute: no compute target named 'extra' (available: " in line
    assert "local" in line.split("available: ")[1]


# -- tracing ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "env"),
    [([], {"EXPKIT_TRACE": "1"}), (["--debug"], {})],
    ids=["EXPKIT_TRACE", "--debug"],
)
def test_tracing_prints_hook_calls_to_stderr(expkit_cli, local_job, flags, env):
    result = expkit_cli(*flags, "run", str(local_job), env=env)

    assert result.returncode == 0, result.stdout + result.stderr
    trace = result.stderr.splitlines()
    [targets] = [line for line in trace if line.startswith("expkit_compute_targets -> ")]
    assert "local" in targets
    started = trace.index(next(line for line in trace if line.startswith("expkit_stage_started")))
    assert "    stage: prepare" in trace[started + 1 : started + 3]
    assert any(line.startswith("expkit_run_finished") for line in trace)
    assert "    state: completed" in trace
    assert "expkit_stage_started" not in result.stdout


def test_without_tracing_no_hook_calls_are_printed(expkit_cli, local_job):
    result = expkit_cli("run", str(local_job), env={"EXPKIT_TRACE": ""})

    assert result.returncode == 0
    assert "expkit_" not in result.stderr


# -- event hooks ---------------------------------------------------------------------------------
class RaisingObserver:
    @expkit.hookimpl
    def expkit_stage_started(self, run, stage):
        raise RuntimeError(f"observer broke in {stage}")


def test_an_observer_that_raises_does_not_fail_the_run(register_plugin, run_job):
    register_plugin(RaisingObserver(), "fragile-observer")

    result = run_job({}, script=LOCAL_SCRIPT)

    assert result.state == "completed"
    expected = "plugin fragile-observer, expkit_stage_started: observer broke in prepare"
    assert f"warning: {expected}" in result.output
    warnings = [
        e["message"] for e in result.workspace.history.events.of(result.record.id, "warning")
    ]
    assert expected in warnings
    assert "plugin fragile-observer, expkit_stage_started: observer broke in run" in warnings


class Recorder:
    """Writes down every event hook call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    @expkit.hookimpl
    def expkit_stage_started(self, run, stage):
        self.calls.append(("started", stage))

    @expkit.hookimpl
    def expkit_stage_finished(self, run, stage, outcome, error):
        if outcome == "skipped":
            self.calls.append(("finished", stage, outcome, error))
        else:
            self.calls.append(("finished", stage, outcome))

    @expkit.hookimpl
    def expkit_run_finished(self, run, state, error):
        self.calls.append(("run", state, error, run.run_id))


MODEL_SCRIPT = """
import os, sys
os.makedirs("outputs", exist_ok=True)
open("outputs/model.txt", "w").write("weights")
print("training done")
"""


def test_observers_see_every_stage_in_order(register_plugin, run_job):
    recorder = Recorder()
    register_plugin(recorder, "recorder")

    result = run_job({"model": {"name": "tiny"}}, script=MODEL_SCRIPT)

    assert result.state == "completed"
    assert recorder.calls == [
        ("started", "prepare"),
        ("finished", "prepare", "completed"),
        ("started", "scale"),
        ("finished", "scale", "completed"),
        ("started", "run"),
        ("finished", "run", "completed"),
        ("started", "post-process"),
        ("finished", "post-process", "completed"),
        ("started", "register"),
        ("finished", "register", "completed"),
        ("run", "completed", None, result.record.id),
    ]


def test_observers_see_a_failed_run_keep_its_outputs_and_skip_register(register_plugin, run_job):
    recorder = Recorder()
    register_plugin(recorder, "recorder")

    result = run_job({"model": {"name": "tiny"}}, script=MODEL_SCRIPT + "sys.exit('loss is nan')\n")

    assert result.state == "failed"
    stages = [call for call in recorder.calls if call[0] != "run"]
    assert stages == [
        ("started", "prepare"),
        ("finished", "prepare", "completed"),
        ("started", "scale"),
        ("finished", "scale", "completed"),
        ("started", "run"),
        ("finished", "run", "failed"),
        ("started", "post-process"),
        ("finished", "post-process", "completed"),
        ("finished", "register", "skipped", "run failed"),  # skipped: said, never started
    ]
    (hook, state, error, run_id) = recorder.calls[-1]
    assert (hook, state, run_id) == ("run", "failed", result.record.id)
    assert error.startswith("run: the script exited with code 1")
    assert "loss is nan" in error
    assert result.run.get_file_names() == ["logs/rank-0.log", "outputs/model.txt"]


def test_observers_are_told_of_every_skipped_stage_as_the_record_shows_it(register_plugin, run_job):
    recorder = Recorder()
    register_plugin(recorder, "recorder")

    no_model = run_job({}, script="print('no model named')\n")
    calls = recorder.calls[:]
    recorder.calls.clear()
    no_data = run_job(
        {"data": {"raw": {"prepare": "false {dest}"}}},  # the data cannot be made
        script="print('never runs')\n",
    )

    assert no_model.state == "completed"
    assert calls[-2] == ("finished", "register", "skipped", "no model named in the job")
    assert no_data.state == "failed"
    assert [c for c in recorder.calls if c[0] != "run"] == [
        ("started", "prepare"),
        ("finished", "prepare", "failed"),
        ("finished", "post-process", "skipped", "the script never started"),
        ("finished", "register", "skipped", "run failed"),
    ]
    # The events agree with the record, stage by stage.
    recorded = no_data.workspace.history.stages.of(no_data.record.id)
    assert [(s.stage, s.state) for s in recorded] == [
        ("prepare", "failed"),
        ("post-process", "skipped"),
        ("register", "skipped"),
    ]


# -- capability hooks that misbehave -------------------------------------------------------------
class WrongTypePlugin:
    @expkit.hookimpl
    def expkit_compute_targets(self):
        return ["not a target"]


class BareObjectPlugin:
    """Returns one target instead of a list of targets (an easy mistake)."""

    @expkit.hookimpl
    def expkit_compute_targets(self):
        class Lonely(expkit.ComputeTarget):
            name = "lonely"

            def acquire(self, ctx):
                raise AssertionError("never used")

            def execute(self, ctx, processes, allocation):
                raise AssertionError("never used")

        return Lonely()


class RaisingHookPlugin:
    @expkit.hookimpl
    def expkit_exporters(self):
        raise RuntimeError("exporter registry offline")


def test_a_misbehaving_capability_hook_marks_only_its_plugin(
    expkit_plugins, register_plugin, run_job
):
    register_plugin(WrongTypePlugin(), "wrong-type")
    register_plugin(BareObjectPlugin(), "bare-object")
    register_plugin(RaisingHookPlugin(), "raising-hook")

    targets = expkit_plugins.all("compute_targets")
    exporters = expkit_plugins.all("exporters")  # a kind's hooks are called once it is used
    result = run_job({}, script=LOCAL_SCRIPT)

    assert "local" in targets
    assert "torchscript" in exporters
    assert "lonely" not in targets
    assert expkit_plugins.infos["wrong-type"].error == (
        "expkit_compute_targets returned 'not a target', not a named ComputeTarget"
    )
    assert expkit_plugins.infos["bare-object"].error.startswith("expkit_compute_targets returned")
    assert expkit_plugins.infos["raising-hook"].error == (
        "expkit_exporters raised: exporter registry offline"
    )
    assert expkit_plugins.infos["local"].error is None
    assert result.state == "completed"


def test_expkit_plugins_marks_a_misbehaving_plugin_and_the_rest_works(site, expkit_cli, local_job):
    site.install(
        "expkit-sloppy",
        {
            "sloppy": """
                import expkit

                @expkit.hookimpl
                def expkit_compute_targets():
                    return [42]
            """,
            "crashy": """
                import expkit

                @expkit.hookimpl
                def expkit_metric_sinks():
                    raise RuntimeError("sink server unreachable")
            """,
        },
    )

    listing = expkit_cli("plugins", env=site.env)
    run = expkit_cli("run", str(local_job), env=site.env)

    assert listing.returncode == 0, listing.stderr
    assert plugin_line(listing.stdout, "sloppy") == (
        "sloppy  (expkit-sloppy 1.0)  loaded, with an error: "
        "expkit_compute_targets returned 42, not a named ComputeTarget"
    )
    assert plugin_line(listing.stdout, "crashy") == (
        "crashy  (expkit-sloppy 1.0)  loaded, with an error: "
        "expkit_metric_sinks raised: sink server unreachable"
    )
    assert plugin_line(listing.stdout, "local").endswith("loaded")
    assert "compute target 'local'" in listing.stdout
    assert run.returncode == 0, run.stdout + run.stderr


# -- exceptions inside capability methods --------------------------------------------------------
class FlakyTarget(expkit.ComputeTarget):
    name = "flaky"

    def acquire(self, ctx):
        raise RuntimeError("quota exceeded")

    def execute(self, ctx, processes, allocation):
        raise AssertionError("never reached")


class FlakyPlugin:
    def __init__(self) -> None:
        self.target = FlakyTarget()

    @expkit.hookimpl
    def expkit_compute_targets(self):
        return [self.target]


def test_an_exception_in_a_capability_method_fails_the_run_naming_the_plugin(
    register_plugin, run_job
):
    register_plugin(FlakyPlugin(), "flaky-cloud")

    result = run_job({"compute": "flaky"}, script=LOCAL_SCRIPT)

    assert result.state == "failed"
    assert result.record.error == (
        "scale: plugin flaky-cloud, compute target 'flaky' acquire: quota exceeded"
    )
    stages = {s.stage: s.state for s in result.workspace.history.stages.of(result.record.id)}
    assert stages["prepare"] == "completed"
    assert stages["scale"] == "failed"
    assert stages["post-process"] == "skipped"
    assert "hello from the script" not in result.output


# -- the hook specs themselves -------------------------------------------------------------------
def hook_specs() -> dict[str, object]:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    names = [name for name in dir(pm.hook) if not name.startswith("_")]
    return {name: getattr(hookspecs, name) for name in names}


def test_every_hook_spec_is_named_and_documented():
    specs = hook_specs()

    assert len(specs) >= len(KINDS) + 3
    for name, function in specs.items():
        assert name.startswith("expkit_"), name
        doc = inspect.getdoc(function) or ""
        arguments = list(inspect.signature(function).parameters)
        described = bool(arguments) and all(arg in doc for arg in arguments)
        assert "Example" in doc or described, f"{name} needs an example or its arguments described"


def test_every_capability_kind_has_its_hook_spec():
    specs = hook_specs()

    for kind, base in KINDS.items():
        function = specs.get(f"expkit_{kind}")
        assert function is not None, f"no hook spec expkit_{kind}"
        assert base.__name__ in function.__annotations__["return"]
        assert not inspect.signature(function).parameters


# -- a third-party compute target, written as the docs describe ---------------------------------
class SandboxTarget(expkit.ComputeTarget):
    """Runs each process with its own subprocess call, one after another."""

    name = "sandbox"
    description = "processes started one by one"

    def acquire(self, ctx):
        ctx.say("sandbox ready")
        return Allocation(hosts=["sandbox-host"], slots=[0], description="sandbox slot 0")

    def execute(self, ctx, processes, allocation):
        code = 0
        for process in processes:
            ctx.log_dir.mkdir(parents=True, exist_ok=True)
            with open(ctx.log_dir / f"rank-{process.rank}.log", "wb") as log:
                done = subprocess.run(
                    process.argv,
                    cwd=ctx.work_dir,
                    env={**os.environ, **process.env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            code = code or done.returncode
        return code


class SandboxPlugin:
    @expkit.hookimpl
    def expkit_compute_targets(self):
        return [SandboxTarget()]


SANDBOX_SCRIPT = """
import os, sys
from expkit import Run

run = Run.get_context()
run.log("accuracy", 0.75)
os.makedirs("outputs", exist_ok=True)
open("outputs/where.txt", "w").write(" ".join(sys.argv[1:]))
"""


def test_a_third_party_compute_target_runs_a_job(expkit_plugins, register_plugin, run_job):
    register_plugin(SandboxPlugin(), "my-sandbox")

    result = run_job(
        {"compute": "sandbox", "args": {"epochs": 3}, "model": {"name": "sandboxed"}},
        script=SANDBOX_SCRIPT,
    )

    assert result.state == "completed", result.output
    assert result.run.get_metrics() == {"accuracy": 0.75}
    assert (result.run_dir / "outputs" / "where.txt").read_text() == "--epochs 3"
    stages = {s.stage: s for s in result.workspace.history.stages.of(result.record.id)}
    assert stages["scale"].message == "sandbox slot 0"
    assert stages["register"].state == "completed"
    assert expkit_plugins.get("compute_targets", "sandbox").plugin == "my-sandbox"
