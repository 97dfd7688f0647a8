"""Exports in the lifecycle: post-process runs the job's exporters, a passing export joins the
model version, a failing one is recorded and left out, and `expkit export` does it later.

The exporter here is a third-party plugin written against the hook contract (a byte-for-byte
copy "format", checked by comparing bytes), so that these tests are about the lifecycle; the
ONNX and TorchScript exporters themselves are tested in test_exporters.py and end to end in
test_export_e2e.py.
"""

from __future__ import annotations

import json

import pytest

import expkit
from expkit.capabilities import Exporter, ExportRequest, ExportResult, Option, declare_options
from expkit.cli import main as cli_main
from expkit.registry import ModelStore

SCRIPT = """
import os
os.makedirs("outputs", exist_ok=True)
with open("outputs/model.pt", "wb") as f:
    f.write(b"weights" * 100)
with open("outputs/notes.txt", "w") as f:
    f.write("trained")
"""


class CopyExporter(Exporter):
    """Writes model.copy (the model file's bytes) and checks it against the original."""

    name = "copy"

    def __init__(self) -> None:
        self.requests: list[ExportRequest] = []

    takes = declare_options(
        corrupt=Option(bool, help="write the bytes reversed (a failing check)"),
        fail_with=Option(str, help="raise ValueError with this message"),
        folder=Option(bool, help="also write a folder of three files, as an MLflow model is"),
    )

    def export(self, request: ExportRequest) -> ExportResult:
        self.requests.append(request)
        if request.options.get("fail_with"):
            raise ValueError(request.options["fail_with"])
        source = request.model_dir / request.load["file"]
        data = source.read_bytes()
        if request.options.get("corrupt"):
            data = data[::-1] + b"!"
        target = request.out_dir / "model.copy"
        target.write_bytes(data)
        extra = []
        if request.options.get("folder"):
            for name in ("MLmodel", "data/model.pth", "code/net.py"):
                (request.out_dir / "copied" / name).parent.mkdir(parents=True, exist_ok=True)
                (request.out_dir / "copied" / name).write_bytes(data)
                extra.append(request.out_dir / "copied" / name)
        same = target.read_bytes() == source.read_bytes()
        checks = {
            "max_abs_error": 0.0 if same else 1.0,
            "checked": [{"input": "bytes", "ok": same}],
        }
        message = "" if same else f"bytes differ from {request.load['file']}"
        return ExportResult([target, *extra], checks, same, message)


class CopyPlugin:
    def __init__(self) -> None:
        self.exporter = CopyExporter()

    @expkit.hookimpl
    def expkit_exporters(self) -> list[Exporter]:
        return [self.exporter]


@pytest.fixture
def copy_plugin(register_plugin):
    plugin = CopyPlugin()
    register_plugin(plugin, "copy-plugin")
    return plugin


def job(exports, path="outputs/", **model):
    return {
        "model": {
            "name": "net",
            "path": path,
            "load": {"file": "model.pt"},
            "input": {"shape": [1, 4]},
            **model,
        },
        "exports": exports,
    }


def test_a_passing_export_joins_the_outputs_and_the_model_version(copy_plugin, run_job):
    result = run_job(job(["copy"]), script=SCRIPT)
    assert result.state == "completed", result.output
    assert (result.run_dir / "outputs" / "model.copy").read_bytes() == b"weights" * 100
    assert "outputs/model.copy" in result.run.get_file_names()
    model = ModelStore(result.workspace).get("net")
    assert set(model.files) == {"model.pt", "notes.txt", "model.copy"}
    assert (model.path / "model.copy").read_bytes() == b"weights" * 100
    entry = model.lineage["exports"]["copy"]
    assert entry["files"] == ["model.copy"]
    assert entry["checks"]["max_abs_error"] == 0.0
    assert entry["run_id"] == result.record.id
    tags = model.lineage_tags()  # what the MLflow and Azure ML registries are given
    assert tags["expkit.exports"] == "copy" and tags["expkit.run_id"] == result.record.id
    (export,) = result.workspace.history.exports.of(result.record.id)
    assert export.ok and export.format == "copy"
    assert "export copy: model.copy (max_abs_error 0" in result.output
    # the exporter was asked with the job's settings and the run's environment
    request = copy_plugin.exporter.requests[0]
    assert request.load == {"file": "model.pt", "factory": None, "args": {}}
    assert request.input["shape"] == [1, 4] and request.input["dynamic_axes"] == [0]
    assert (request.atol, request.rtol, request.timeout) == (1e-4, 1e-3, 600.0)
    assert request.code_dir == result.run_dir / "snapshot"
    assert request.env["EXPKIT_RUN_ID"] == result.record.id


def test_an_export_s_folder_is_named_once_with_its_count_not_file_by_file(
    copy_plugin, run_job, capsys
):
    """An export that writes a folder (the mlflow export's `mlflow-model/`, ten files) shows
    as `copied/ (3 files)` in the run's summary and `runs show`, and in `models show`'s
    exports (whose files section lists each file)."""
    result = run_job(job([{"format": "copy", "options": {"folder": True}}]), script=SCRIPT)
    assert result.state == "completed", result.output
    line = "export copy: model.copy, copied/ (3 files) (max_abs_error 0"
    assert line in result.output
    assert "copied/MLmodel" not in result.output
    capsys.readouterr()
    assert cli_main(["runs", "show", result.record.id]) == 0
    shown = capsys.readouterr().out
    exports = shown[shown.index("\nexports\n") :].split("\n\n")[0]
    assert "copy: model.copy, copied/ (3 files) (max_abs_error 0" in exports
    assert "copied/MLmodel" not in exports
    assert cli_main(["models", "show", "net"]) == 0
    shown = capsys.readouterr().out
    exports = shown[shown.index("\nexports\n") :]
    assert "copy              model.copy, copied/ (3 files)  (max_abs_error 0)" in exports
    assert "copied/MLmodel" not in exports
    assert "copied/MLmodel" in shown[: shown.index("\nexports\n")]  # in the files section


def test_the_export_settings_reach_the_exporter(copy_plugin, run_job):
    spec = {"format": "copy", "atol": 0.5, "rtol": 0, "timeout": 42}
    result = run_job(job([spec]), script=SCRIPT)
    assert result.state == "completed", result.output
    request = copy_plugin.exporter.requests[0]
    assert (request.atol, request.rtol, request.timeout) == (0.5, 0.0, 42.0)


def test_a_single_file_model_path_still_gets_its_exports(copy_plugin, run_job):
    result = run_job(job(["copy"], path="outputs/model.pt"), script=SCRIPT)
    assert result.state == "completed", result.output
    model = ModelStore(result.workspace).get("net")
    assert set(model.files) == {"model.pt", "model.copy"}


def test_a_failed_check_is_recorded_and_not_registered(copy_plugin, run_job, capsys):
    result = run_job(job([{"format": "copy", "options": {"corrupt": True}}]), script=SCRIPT)
    assert result.state == "completed", result.output
    assert "export copy failed: bytes differ from model.pt; not registered" in result.output
    model = ModelStore(result.workspace).get("net")
    assert "model.copy" not in model.files and "exports" not in model.lineage
    assert not (result.run_dir / "outputs" / "model.copy").exists()
    # the failed file is kept aside for a look, outside the outputs
    assert (result.run_dir / "exports" / "copy" / "model.copy").exists()
    (export,) = result.workspace.history.exports.of(result.record.id)
    assert not export.ok and export.files == {}
    assert export.message == "bytes differ from model.pt"
    stages = {s.stage: s for s in result.workspace.history.stages.of(result.record.id)}
    post = stages["post-process"]
    assert "exports: copy FAILED" in post.message
    assert cli_main(["runs", "show", result.record.id]) == 0
    shown = capsys.readouterr().out
    assert "copy: failed: bytes differ from model.pt" in shown


def test_a_raising_exporter_is_a_failed_export_not_a_crash(copy_plugin, run_job):
    spec = job([{"format": "copy", "options": {"fail_with": "no such op: aten::frobnicate"}}])
    result = run_job(spec, script=SCRIPT)
    assert result.state == "completed", result.output
    (export,) = result.workspace.history.exports.of(result.record.id)
    assert export.message == "ValueError: no such op: aten::frobnicate"
    assert "export copy failed: ValueError: no such op: aten::frobnicate" in result.output


def test_a_required_export_that_fails_fails_the_run(copy_plugin, run_job):
    spec = job([{"format": "copy", "required": True, "options": {"corrupt": True}}])
    result = run_job(spec, script=SCRIPT)
    assert result.state == "failed"
    assert result.record.error == (
        "post-process: required export copy failed: bytes differ from model.pt"
    )
    assert result.workspace.history.models.versions() == []
    # the script's outputs are kept all the same
    assert (result.run_dir / "outputs" / "model.pt").exists()


def test_an_export_never_replaces_a_file_the_script_wrote(copy_plugin, run_job):
    script = SCRIPT + "\nopen('outputs/model.copy', 'w').write('mine')\n"
    result = run_job(job(["copy"]), script=script)
    assert result.state == "completed"
    assert (result.run_dir / "outputs" / "model.copy").read_text() == "mine"
    (export,) = result.workspace.history.exports.of(result.record.id)
    assert not export.ok
    assert export.message == "its file model.copy would replace one already there"


def test_no_export_when_the_script_failed(copy_plugin, run_job):
    result = run_job(job(["copy"]), script=SCRIPT + "\nraise SystemExit(3)\n")
    assert result.state == "failed"
    assert copy_plugin.exporter.requests == []
    assert "exports skipped: the run failed" in result.output


def test_unknown_formats_and_options_are_refused_before_the_run(
    copy_plugin, write_job, expkit_workspace, capsys
):
    path = write_job(job(["onnnx"]), script=SCRIPT)
    assert cli_main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "exports.0: no exporter named 'onnnx'" in err
    path = write_job(job([{"format": "copy", "options": {"opset": 3}}]), script=SCRIPT)
    assert cli_main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "exports.0.options.opset: unknown option of exporter 'copy'; it takes corrupt" in err
    assert expkit_workspace.history.runs.recent() == []


def test_exports_need_to_know_how_to_load_the_model(write_job, capsys):
    path = write_job({"model": {"name": "net"}, "exports": ["copy"]}, script=SCRIPT)
    assert cli_main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"expkit: error: {path}: exports: exports need `model.load`")
    assert len(err.splitlines()) == 1


def test_export_a_run_after_the_fact(copy_plugin, run_job, capsys):
    result = run_job({"model": {"name": "net"}}, script=SCRIPT)
    assert result.state == "completed"
    run_id = result.record.id
    # the run's job did not say how to load the model: the command says what to add
    assert cli_main(["export", run_id, "--format", "copy"]) == 2
    assert "has no model.load" in capsys.readouterr().err
    load, shape = "model.load.file=model.pt", "model.input.shape=[1,4]"
    code = cli_main(["export", run_id, "--format", "copy", "--set", load, "--set", shape])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"added to the outputs of run {run_id}: model.copy" in out
    assert "outputs/model.copy" in result.run.get_file_names()
    (export,) = result.workspace.history.exports.of(run_id)
    assert export.ok and export.files["model.copy"][1]


def test_export_a_model_version_after_the_fact(copy_plugin, run_job, capsys):
    model = {"name": "net", "load": "model.pt", "input": {"shape": [2]}}
    result = run_job({"model": model}, script=SCRIPT)
    store = ModelStore(result.workspace)
    before = store.get("net", 1)
    assert cli_main(["export", "net:1", "--format", "copy", "--option", "corrupt=true"]) == 1
    out = capsys.readouterr().out
    assert "copy: failed: bytes differ from model.pt" in out and "not added to net:1" in out
    assert store.get("net", 1).files == before.files
    assert cli_main(["export", "net:1", "--format", "copy"]) == 0
    assert "added to model net:1: model.copy" in capsys.readouterr().out
    after = store.get("net", 1)
    assert set(after.files) == set(before.files) | {"model.copy"}
    assert {k: after.files[k] for k in before.files} == before.files  # nothing else changed
    assert (after.path / "model.copy").read_bytes() == b"weights" * 100
    assert after.lineage["exports"]["copy"]["files"] == ["model.copy"]
    assert cli_main(["models", "show", "net:1"]) == 0
    shown = capsys.readouterr().out
    assert "copy" in shown and "model.copy" in shown and "failed, not added" in shown
    # a version's files never change: a second export of that format is refused at once,
    # before the exporter runs (a large model's export takes minutes), by its alias too
    asked = len(copy_plugin.exporter.requests)
    assert cli_main(["models", "alias", "net:1", "champion"]) == 0
    capsys.readouterr()
    assert cli_main(["export", "net@champion", "--format", "copy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "expkit: error: net:1 already has a passing copy export (model.copy); a version's "
        "files never change: register a new version for another"
    )
    assert len(copy_plugin.exporter.requests) == asked
    history = result.workspace.history
    assert [e.ok for e in history.exports.of(model="net", version=1)] == [False, True]
    assert json.loads(json.dumps(after.lineage))  # the lineage stays plain JSON


def test_a_run_s_second_export_of_a_format_is_refused_before_it_runs(copy_plugin, run_job, capsys):
    result = run_job(job(["copy"]), script=SCRIPT)
    assert result.state == "completed", result.output
    asked = len(copy_plugin.exporter.requests)
    run_id = result.record.id
    assert cli_main(["export", run_id, "--format", "copy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"expkit: error: run {run_id} already has a passing copy export (model.copy); its "
        "outputs never change"
    )
    assert len(copy_plugin.exporter.requests) == asked
    assert len(result.workspace.history.exports.of(run_id)) == 1


def test_export_names_what_is_missing(copy_plugin, run_job, capsys):
    run_job({"model": {"name": "net"}}, script=SCRIPT)
    assert cli_main(["export", "nosuch:1", "--format", "copy"]) == 2
    assert "no model 'nosuch:1'" in capsys.readouterr().err
    assert cli_main(["export", "net", "--format", "tflite"]) == 2
    assert "--format: no exporter named 'tflite'" in capsys.readouterr().err
