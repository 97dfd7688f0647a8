"""What the core does when a plugin raises: one test per method kind, each asserting what the
user sees (the state, the one-line reason naming the plugin and the method, exit codes) and
that the run's record agrees with itself (the stage that failed is the one the error names).

The plugin here, `fragile`, supplies one capability of each kind, all named `fragile`; each
method raises `RuntimeError("<method> broke")` when FRAGILE_FAIL names it, and writes its
name to the file FRAGILE_LOG on every call. The same source is registered in-process
(`register_plugin`) or installed as a distribution for the `expkit` command (`site`).
"""

from __future__ import annotations

import types

import pytest

import expkit
from conftest import error_line
from expkit import metrics as metric_pipeline
from expkit import plugins as plugin_manager
from expkit.capabilities import MetricWriter
from expkit.errors import UserError
from expkit.registry import ModelStore

FRAGILE = '''
import os, subprocess, sys

import expkit
from expkit.capabilities import Allocation, Environment, ExportResult, MetricWriter, Process


def visit(method):
    """Note the call; raise when FRAGILE_FAIL names `method`."""
    with open(os.environ["FRAGILE_LOG"], "a") as log:
        log.write(method + "\\n")
    if method in os.environ.get("FRAGILE_FAIL", "").split(","):
        raise RuntimeError(f"{method} broke")


class Target(expkit.ComputeTarget):
    name = "fragile"

    def check(self, job):
        visit("check")

    def preflight(self, job):
        visit("preflight")

    def prepare(self, ctx):
        visit("prepare")

    def acquire(self, ctx):
        visit("acquire")
        return Allocation(hosts=["localhost"], slots=[0], description="one slot")

    def execute(self, ctx, processes, allocation):
        visit("execute")
        ctx.log_dir.mkdir(parents=True, exist_ok=True)
        code = 0
        for process in processes:
            with open(ctx.log_dir / f"rank-{process.rank}.log", "wb") as log:
                done = subprocess.run(
                    process.argv, cwd=ctx.work_dir, env={**os.environ, **process.env},
                    stdout=log, stderr=subprocess.STDOUT,
                )
            code = code or done.returncode
        return code

    def release(self, ctx, allocation):
        visit("release")

    def dry_run(self, job):
        visit("dry_run")
        return "submit fragile"


class Backend(expkit.DistributedBackend):
    name = "fragile"

    def launch(self, ctx, command, allocation):
        visit("launch")
        return [Process(argv=command)]


class Builder(expkit.EnvironmentBuilder):
    name = "fragile"

    def build(self, spec, ctx):
        visit("build")
        return Environment(python=sys.executable, hash="fragile", cache_hit=True, reason="here")


class Writer(MetricWriter):
    def send(self, metrics):
        visit("send")

    def close(self, outcome):
        visit("close")


class Sink(expkit.MetricSink):
    name = "fragile"

    def open(self, run, options):
        visit("open")
        return Writer()


class Registry(expkit.ModelRegistry):
    name = "fragile"

    def register(self, model, run, options):
        visit("register")
        return f"fragile:{model.name}/{model.version}"


class Exporter(expkit.Exporter):
    name = "fragile"

    def export(self, request):
        visit("export")
        target = request.out_dir / "model.fragile"
        target.write_bytes(b"exported")
        return ExportResult([target], {}, True)


class Importer(expkit.JobImporter):
    name = "fragile"

    def import_job(self, ref, options):
        visit("import_job")
        return {"experiment": "imported", "entry_script": "train.py"}


@expkit.hookimpl
def expkit_compute_targets():
    return [Target()]


@expkit.hookimpl
def expkit_distributed_backends():
    return [Backend()]


@expkit.hookimpl
def expkit_environment_builders():
    return [Builder()]


@expkit.hookimpl
def expkit_metric_sinks():
    return [Sink()]


@expkit.hookimpl
def expkit_model_registries():
    return [Registry()]


@expkit.hookimpl
def expkit_exporters():
    return [Exporter()]


@expkit.hookimpl
def expkit_job_importers():
    return [Importer()]
'''

SCRIPT = """
import os
from expkit import Run
Run.get_context().log("loss", 0.5)
os.makedirs("outputs", exist_ok=True)
open("outputs/model.pt", "wb").write(b"weights")
print("trained")
"""


STAGES = ("prepare", "scale", "run", "post-process", "register")


def fragile_job(required_sink: bool = False) -> dict:
    """A job that uses every capability of the fragile plugin."""
    return {
        "compute": "fragile",
        "distributed": "fragile",
        "environment": "fragile",
        "metrics": [{"name": "fragile", "required": required_sink}],
        "model": {
            "name": "net",
            "load": {"file": "model.pt"},
            "input": {"shape": [1, 4]},
            "registries": ["fragile"],
        },
        "exports": ["fragile"],
    }


class Calls:
    """The fragile plugin's calls, as FRAGILE_LOG has them."""

    def __init__(self, path) -> None:
        self.path = path

    def __call__(self) -> list[str]:
        return self.path.read_text().split() if self.path.exists() else []

    def count(self, method: str) -> int:
        return self().count(method)


@pytest.fixture
def calls(tmp_path, monkeypatch) -> Calls:
    path = tmp_path / "fragile.log"
    monkeypatch.setenv("FRAGILE_LOG", str(path))
    monkeypatch.delenv("FRAGILE_FAIL", raising=False)
    return Calls(path)


@pytest.fixture
def fragile(register_plugin, calls, monkeypatch):
    """The fragile plugin, registered in-process; `fragile("acquire", ...)` picks what raises."""
    monkeypatch.setattr(metric_pipeline, "RETRY_DELAYS", (0.01, 0.01))
    module = types.ModuleType("fragile_plugin")
    exec(compile(FRAGILE, "fragile_plugin.py", "exec"), module.__dict__)
    register_plugin(module, "fragile")

    def fail(*methods: str) -> None:
        monkeypatch.setenv("FRAGILE_FAIL", ",".join(methods))

    return fail


@pytest.fixture
def installed(site, calls):
    """The fragile plugin installed as the distribution expkit-fragile, for the command."""
    site.install("expkit-fragile", {"fragile": FRAGILE})
    return site


def stages(result) -> dict[str, tuple[str, str | None]]:
    return {
        s.stage: (s.state, s.message) for s in result.workspace.history.stages.of(result.record.id)
    }


def events(result, kind: str) -> list[str]:
    return [e["message"] for e in result.workspace.history.events.of(result.record.id, kind)]


def versions(result) -> list[int]:
    """The versions of the model `net` that were kept."""
    try:
        return [ModelStore(result.workspace).get("net").version]
    except UserError:
        return []


def summary(result) -> dict[str, str]:
    """The rows of the summary `expkit run` prints at the end: {"run": "failed  0.1s ..."}."""
    rows = [line.strip().split(None, 1) for line in result.stdout.splitlines()]
    return {row[0]: row[1] for row in rows if len(row) == 2}


def one_line(text: str) -> str:
    assert "\n" not in text and "Traceback" not in text, text
    return text


# -- the stages' methods: the stage that ran them fails, naming plugin and method -----------------
@pytest.mark.parametrize(
    ("method", "stage", "kind"),
    [
        ("prepare", "prepare", "compute target"),
        ("build", "prepare", "environment builder"),
        ("acquire", "scale", "compute target"),
        ("launch", "run", "distributed backend"),
        ("execute", "run", "compute target"),
    ],
)
def test_a_stage_method_that_raises_fails_its_stage_naming_plugin_and_method(
    fragile, calls, run_job, method, stage, kind
):
    fragile(method)

    result = run_job(fragile_job(), script=SCRIPT)

    reason = f"plugin fragile, {kind} 'fragile' {method}: {method} broke"
    assert result.state == "failed"
    assert one_line(result.record.error) == f"{stage}: {reason}"
    recorded = stages(result)
    assert recorded[stage] == ("failed", reason)
    before, after = STAGES[: STAGES.index(stage)], STAGES[STAGES.index(stage) + 1 :]
    assert all(recorded[s][0] == "completed" for s in before)
    for later in after:  # none of the later stages says it completed, but outputs are kept
        kept = later == "post-process" and stage == "run"
        assert (recorded.get(later, ("never started",))[0] == "completed") is kept, later
    assert "trained" not in result.output
    # What was acquired is given back once, whatever failed after it; nothing before it.
    assert calls.count("release") == (1 if stage == "run" else 0)
    assert calls.count("register") == 0
    assert versions(result) == []


def test_a_release_that_raises_fails_the_run_stage_and_the_record_says_so(fragile, calls, run_job):
    fragile("release")

    result = run_job(fragile_job(), script=SCRIPT)

    reason = "release failed: plugin fragile, compute target 'fragile' release: release broke"
    assert result.state == "failed"
    assert result.record.error == f"run: {reason}"
    assert result.record.exit_code == 0  # the script itself succeeded
    recorded = stages(result)
    assert recorded["run"] == ("failed", reason)
    assert recorded["post-process"][0] == "completed"  # outputs kept
    assert recorded["register"] == ("skipped", "run failed")
    assert "outputs/model.pt" in result.run.get_file_names()
    assert calls.count("release") == 1
    assert calls.count("export") == 0  # exports are made for a completed run only


def test_a_release_that_raises_after_a_failure_is_a_warning_and_the_first_reason_stays(
    fragile, calls, run_job
):
    fragile("execute", "release")

    result = run_job(fragile_job(), script=SCRIPT)

    assert result.state == "failed"
    assert result.record.error == (
        "run: plugin fragile, compute target 'fragile' execute: execute broke"
    )
    warning = "release failed: plugin fragile, compute target 'fragile' release: release broke"
    assert warning in events(result, "warning")
    assert f"warning: {warning}" in result.output
    assert calls.count("release") == 1


def test_a_release_that_raises_fails_the_run_with_exit_1_from_the_command(
    installed, calls, expkit_cli, write_job
):
    job = write_job(fragile_job(), script=SCRIPT)

    result = expkit_cli("run", str(job), env={**installed.env, "FRAGILE_FAIL": "release"})

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    shown = summary(result)
    assert shown["run"].startswith("failed")
    assert "release failed: plugin fragile, compute target 'fragile' release" in shown["run"]
    assert shown["error"] == (
        "run: release failed: plugin fragile, compute target 'fragile' release: release broke"
    )
    assert calls.count("release") == 1


# -- register and export ------------------------------------------------------------------------
def test_a_registry_that_raises_fails_the_register_stage_and_keeps_no_version(
    fragile, calls, run_job
):
    fragile("register")

    result = run_job(fragile_job(), script=SCRIPT)

    reason = (
        "plugin fragile, model registry 'fragile' register: register broke; "
        "net:1 is not kept, as the run failed"
    )
    assert result.state == "failed"
    assert result.record.error == f"register: {reason}"
    assert stages(result)["register"] == ("failed", reason)
    assert versions(result) == []
    assert "net:1 not kept: the run failed" in result.output


def test_an_exporter_that_raises_is_a_failed_export_and_the_run_completes(fragile, calls, run_job):
    fragile("export")

    result = run_job(fragile_job(), script=SCRIPT)

    assert result.state == "completed", result.output
    (export,) = result.workspace.history.exports.of(result.record.id)
    assert not export.ok
    assert export.message == "RuntimeError: export broke"
    assert "export fragile (fragile)" in result.output  # the line before names the plugin
    assert "warning: export fragile failed: RuntimeError: export broke; not registered" in (
        result.output
    )
    assert "model.fragile" not in ModelStore(result.workspace).get("net").files


# -- metric sinks --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["open", "send"])
def test_a_sink_that_keeps_raising_is_tried_again_then_reported(fragile, calls, run_job, method):
    fragile(method)

    result = run_job(fragile_job(), script=SCRIPT)

    problem = f"plugin fragile, metric sink 'fragile' {method}: {method} broke"
    assert result.state == "completed", result.output
    assert events(result, "sink-failed") == [problem]
    assert f"warning: {problem}" in result.output
    assert calls.count(method) == 1 + len(metric_pipeline.RETRY_DELAYS)
    assert calls.count("close") == 0  # a sink that failed is told nothing more


@pytest.mark.parametrize("method", ["open", "send"])
def test_a_required_sink_that_keeps_raising_fails_post_process(fragile, run_job, method):
    fragile(method)

    result = run_job(fragile_job(required_sink=True), script=SCRIPT)

    problem = f"plugin fragile, metric sink 'fragile' {method}: {method} broke"
    assert result.state == "failed"
    assert result.record.error == f"post-process: required {problem}"
    assert stages(result)["post-process"] == ("failed", f"required {problem}")
    assert versions(result) == []


def test_a_sink_whose_close_raises_is_a_warning_and_an_event(fragile, calls, run_job):
    fragile("close")

    result = run_job(fragile_job(), script=SCRIPT)

    problem = "plugin fragile, metric sink 'fragile' close: close broke"
    assert result.state == "completed", result.output
    assert events(result, "sink-failed") == [problem]
    assert f"warning: {problem}" in result.output
    assert calls.count("close") == 1  # a close is not tried again
    assert ModelStore(result.workspace).get("net").version == 1


def test_a_required_sink_whose_close_raises_fails_the_run(fragile, calls, run_job):
    fragile("close")

    result = run_job(fragile_job(required_sink=True), script=SCRIPT)

    problem = "plugin fragile, metric sink 'fragile' close: close broke"
    assert result.state == "failed"
    assert result.record.error == f"required {problem}"
    assert events(result, "sink-failed") == [problem]
    assert f"warning: {problem}" in result.output
    # The sink is closed after the last stage: every stage did complete, the run did not.
    assert {state for state, _ in stages(result).values()} == {"completed"}
    assert versions(result) == []
    assert "net:1 not kept: the run failed" in result.output
    assert "net:1 not kept: the run failed" in events(result, "warning")  # runs show says it
    assert calls.count("close") == 1


def test_a_required_sink_whose_close_raises_fails_the_command(
    installed, calls, expkit_cli, write_job
):
    job = write_job(fragile_job(required_sink=True), script=SCRIPT)

    result = expkit_cli("run", str(job), env={**installed.env, "FRAGILE_FAIL": "close"})

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    problem = "plugin fragile, metric sink 'fragile' close: close broke"
    assert f"warning: {problem}" in result.stdout
    assert summary(result)["error"] == f"required {problem}"


class Batches(MetricWriter):
    """Raises on the first two sends of each batch, keeps each batch it finally accepts."""

    def __init__(self) -> None:
        self.tries: list[list] = []
        self.accepted: list[list] = []

    def send(self, metrics) -> None:
        self.tries.append(metrics)
        if sum(batch is metrics for batch in self.tries) <= 2:
            raise ConnectionError("collector busy")
        self.accepted.append(metrics)


class BatchesSink(expkit.MetricSink):
    name = "batches"

    def __init__(self) -> None:
        self.writer = Batches()

    def open(self, run, options):
        return self.writer


class BatchesPlugin:
    def __init__(self) -> None:
        self.sink = BatchesSink()

    @expkit.hookimpl
    def expkit_metric_sinks(self):
        return [self.sink]


def test_a_failed_send_is_tried_again_with_the_very_same_batch(
    register_plugin, run_job, monkeypatch
):
    monkeypatch.setattr(metric_pipeline, "RETRY_DELAYS", (0.01, 0.01, 0.01))
    plugin = BatchesPlugin()
    register_plugin(plugin, "batches-plugin")

    result = run_job({"metrics": ["batches"]}, script=SCRIPT)

    writer = plugin.sink.writer
    assert result.state == "completed", result.output
    assert events(result, "sink-failed") == []
    assert writer.accepted  # every batch got through on its third try...
    for batch in writer.accepted:
        assert sum(tried is batch for tried in writer.tries) == 3  # ...the same list each time
    delivered = [(m.name, m.value) for batch in writer.accepted for m in batch]
    assert delivered == [("loss", 0.5)]  # and each value was accepted once


# -- checks before a run, and commands outside a run ----------------------------------------------
@pytest.mark.parametrize("method", ["check", "preflight"])
def test_a_check_that_raises_is_one_line_and_records_no_run(
    installed, calls, expkit_cli, write_job, method
):
    job = write_job(fragile_job(), script=SCRIPT)

    result = expkit_cli("run", str(job), env={**installed.env, "FRAGILE_FAIL": method})

    assert result.returncode == 1
    assert error_line(result) == (
        f"expkit: error: plugin fragile, compute target 'fragile' {method}: {method} broke"
    )
    assert "no runs yet" in expkit_cli("runs", "list").stdout


def test_an_importer_that_raises_is_one_line_naming_plugin_and_method(installed, expkit_cli):
    result = expkit_cli(
        "import", "fragile", "train.py:job", env={**installed.env, "FRAGILE_FAIL": "import_job"}
    )

    assert result.returncode == 1
    assert error_line(result) == (
        "expkit: error: plugin fragile, job importer 'fragile' import_job: import_job broke"
    )


def test_a_dry_run_that_raises_is_one_line_naming_plugin_and_method(
    installed, expkit_cli, write_job
):
    job = write_job(fragile_job(), script=SCRIPT)

    result = expkit_cli(
        "run", str(job), "--dry-run", env={**installed.env, "FRAGILE_FAIL": "dry_run"}
    )

    assert result.returncode == 1
    assert error_line(result) == (
        "expkit: error: plugin fragile, compute target 'fragile' dry_run: dry_run broke"
    )


# -- plugins that cannot be loaded: a misspelt hook, arguments the hook does not pass -------------
MISSPELT = """
import expkit

@expkit.hookimpl
def expkit_compute_target():  # singular: not a hook expkit has
    return []
"""

WRONG_ARGUMENTS = """
import expkit

@expkit.hookimpl
def expkit_stage_finished(run, stage, result):  # the hook passes outcome and error, not result
    pass
"""


def plugin_line(listing: str, name: str) -> str:
    (line,) = [line for line in listing.splitlines() if line.startswith(f"{name}  ")]
    return line


def test_a_plugin_with_a_misspelt_hook_is_not_loaded_and_the_closest_hook_is_named(site):
    site.install("expkit-typo", {"typo": MISSPELT})

    plugins = plugin_manager.load()

    assert plugins.infos["typo"].error == (
        "implements unknown hook expkit_compute_target (did you mean expkit_compute_targets?)"
    )
    assert plugins.infos["typo"].hooks == []
    assert not plugins.pm.has_plugin("typo")
    assert plugins.infos["local"].error is None


def test_a_plugin_whose_hook_asks_for_an_argument_the_hook_does_not_pass_is_not_loaded(site):
    site.install("expkit-args", {"args": WRONG_ARGUMENTS})

    plugins = plugin_manager.load()

    assert plugins.infos["args"].error == (
        "expkit_stage_finished(run, stage, result) asks for result, which hook "
        "expkit_stage_finished does not pass (it passes run, stage, outcome, error)"
    )
    assert not plugins.pm.has_plugin("args")


def test_expkit_plugins_shows_plugins_that_did_not_load_with_the_whole_reason(
    site, expkit_cli, write_job
):
    site.install("expkit-typo", {"typo": MISSPELT, "args": WRONG_ARGUMENTS})

    listing = expkit_cli("plugins", env=site.env)
    run = expkit_cli("run", str(write_job({}, script=SCRIPT)), env=site.env)

    assert listing.returncode == 0, listing.stderr
    assert plugin_line(listing.stdout, "typo") == (
        "typo  (expkit-typo 1.0)  not loaded: implements unknown hook expkit_compute_target "
        "(did you mean expkit_compute_targets?)"
    )
    assert plugin_line(listing.stdout, "args").endswith(
        "not loaded: expkit_stage_finished(run, stage, result) asks for result, which hook "
        "expkit_stage_finished does not pass (it passes run, stage, outcome, error)"
    )
    assert run.returncode == 0, run.stdout + run.stderr  # the others still work


class Misspelt:
    @expkit.hookimpl
    def expkit_stage_start(self, run, stage):
        pass


class WrongArguments:
    @expkit.hookimpl
    def expkit_run_finished(self, run, state, reason):
        pass


def test_registering_a_plugin_by_hand_refuses_an_unknown_hook_or_argument(expkit_plugins):
    with pytest.raises(UserError) as misspelt:
        expkit_plugins.register(Misspelt(), "misspelt")
    with pytest.raises(UserError) as arguments:
        expkit_plugins.register(WrongArguments(), "arguments")

    assert str(misspelt.value) == (
        "plugin misspelt: implements unknown hook expkit_stage_start "
        "(did you mean expkit_stage_started?)"
    )
    assert str(arguments.value) == (
        "plugin arguments: expkit_run_finished(run, state, reason) asks for reason, which hook "
        "expkit_run_finished does not pass (it passes run, state, error)"
    )
    assert not expkit_plugins.pm.has_plugin("misspelt")
    assert not expkit_plugins.pm.has_plugin("arguments")


# -- capability hooks that raise ------------------------------------------------------------------
RAISING_HOOK = """
import expkit

@expkit.hookimpl
def expkit_compute_targets():
    raise RuntimeError("cloud SDK not configured\\nsee the docs")
"""


def test_a_job_naming_what_a_raising_hook_would_supply_is_told_that_hook_raised(
    site, expkit_cli, write_job
):
    site.install("expkit-cloud", {"cloud": RAISING_HOOK})
    job = write_job({"compute": "cloud"}, script=SCRIPT)

    result = expkit_cli("run", str(job), env=site.env)

    assert result.returncode == 2
    line = error_line(result)
    assert "compute: no compute target named 'cloud' (available: " in line
    assert line.endswith("; plugin cloud: expkit_compute_targets raised: cloud SDK not configured")


# -- event hooks that raise: isolated, reported, the run goes on ----------------------------------
class RaisingObservers:
    @expkit.hookimpl
    def expkit_stage_finished(self, run, stage, outcome, error):
        raise RuntimeError(f"observer broke after {stage}")

    @expkit.hookimpl
    def expkit_run_finished(self, run, state, error):
        raise RuntimeError(f"observer broke at {state}")


def test_observers_that_raise_when_a_stage_or_the_run_ends_do_not_change_the_run(
    register_plugin, run_job
):
    register_plugin(RaisingObservers(), "fragile-observers")

    result = run_job({"model": {"name": "net"}}, script=SCRIPT)

    assert result.state == "completed", result.output
    assert result.record.error is None
    assert {s.state for s in result.workspace.history.stages.of(result.record.id)} == {"completed"}
    warnings = events(result, "warning")
    for stage in ("prepare", "scale", "run", "post-process", "register"):
        assert (
            f"plugin fragile-observers, expkit_stage_finished: observer broke after {stage}"
        ) in warnings
    assert "plugin fragile-observers, expkit_run_finished: observer broke at completed" in warnings
    assert versions(result) == [1]


# -- tracing capability calls ---------------------------------------------------------------------
def test_tracing_shows_each_capability_method_call_with_its_plugin_and_outcome(
    expkit_cli, write_job
):
    job = write_job({}, script=SCRIPT)

    result = expkit_cli("run", str(job), env={"EXPKIT_TRACE": "1"})

    assert result.returncode == 0, result.stdout + result.stderr
    trace = result.stderr.splitlines()
    run_id = result.stdout.split("run ", 1)[1].split()[0]
    for method in ("acquire", "execute", "release"):
        [called] = [line for line in trace if f"(plugin local).{method}(" in line]
        assert called.startswith(f"expkit: call compute target 'local' (plugin local).{method}(")
        assert f"run {run_id}" in called
        assert any(
            line.startswith(f"expkit: compute target 'local'.{method} returned ") for line in trace
        )
    assert "expkit: call environment builder 'inherit' (plugin venv).build(" in result.stderr
    assert "(plugin local)" not in result.stdout
