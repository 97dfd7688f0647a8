"""`expkit export RUN_OR_MODEL[:VERSION] --format F`: export a trained model after the fact.

The job spec of the run that trained the model says how to rebuild it and what it takes
(`model.load`, `model.input`); `--set` fills in or changes those, e.g. for a model registered
from the Python API. The export runs in the run's own environment, like post-process does.
What it needs (the exporters, the job spec, the stores) is imported only when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expkit.cli.common import examples_epilog, open_workspace

if TYPE_CHECKING:
    from expkit.job import ExportSpec, JobSpec


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `export` with its arguments."""
    export = commands.add_parser(
        "export",
        help="export a run's model or a model version (ONNX, TorchScript, ...)",
        description="Export the model of RUN (id, number or `latest`) or of a registered "
        "model (NAME, NAME:VERSION or NAME@ALIAS) with the exporter FORMAT, check it against "
        "the PyTorch model, and add the exported files to the run's outputs or to the model "
        "version when the check passes. The run's job spec says how to load the model "
        "(model.load) and what it takes (model.input); change or add those with --set.",
        epilog=examples_epilog(
            "expkit export latest --format onnx",
            "expkit export pt-dnn:2 --format onnx --option opset=18",
            "expkit export pt-dnn@champion --format torchscript",
        ),
    )
    export.add_argument(
        "ref", metavar="RUN_OR_MODEL", help="run id or number, or NAME[:VERSION] or NAME@ALIAS"
    )
    export.add_argument("--format", required=True, help="the exporter, e.g. onnx or torchscript")
    export.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an exporter option, e.g. --option opset=18",
    )
    export.add_argument("--atol", type=float, help="absolute tolerance of the check")
    export.add_argument("--rtol", type=float, help="relative tolerance of the check")
    export.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the job spec used, e.g. --set model.input.shape=[1,3,32,32]",
    )
    export.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run's model or a model version; SIGTERM and SIGHUP stop it as Ctrl-C does
    (the worker stopped, its files removed, nothing recorded, exit 130)."""
    from expkit.interrupts import like_ctrl_c

    with like_ctrl_c():
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    from expkit import exports
    from expkit.blobs import BlobStore
    from expkit.errors import UserError
    from expkit.options import check as check_options
    from expkit.plugins import get_plugins
    from expkit.registry import ModelStore

    workspace = open_workspace(args)
    history = workspace.history
    plugins = get_plugins()
    exporter = plugins.get("exporters", args.format, "--format")
    record = history.runs.find(args.ref)
    version = None
    if record is None:
        try:
            version = ModelStore(workspace).resolve(args.ref)
        except UserError:
            if args.ref == "latest" or args.ref.isdigit():  # meant a run: say that first
                model = f", and no model {args.ref!r}" * (args.ref != "latest")
                raise UserError(
                    f"no run {args.ref!r} in {workspace.path} (`expkit runs list` shows the "
                    f"runs){model}"
                ) from None
            raise
        run_id = version.lineage.get("run_id")
        record = history.runs.find(run_id) if run_id else None
    elif record.state != "completed":
        raise UserError(f"run {record.id} is {record.state}; only a completed run's model exports")
    what = f"{version.name}:{version.version}" if version else f"run {record.id}"
    _refuse_a_second(history, version, record, args.format, what)

    job = _job(record, version, args.overrides, what)
    spec = _export_spec(job, args)
    spec = spec.replace(options=check_options(exporter, spec.options, "--option"))
    run_dir = workspace.run_dir(record.id) if record else None
    python, env = _environment(workspace, job, run_dir)
    say = _say
    say(f"export {spec.format} of {what} ({exporter.plugin}), in {python}")
    for line in _verify(workspace, version, record, job):
        say(f"warning: {line}")
    model = job.model
    assert model is not None  # `_job` refuses a job without one
    if version is not None:
        code_dir = run_dir / "snapshot" if run_dir and (run_dir / "snapshot").is_dir() else None
        export = exports.into_version(
            ModelStore(workspace), version, model, spec, exporter, python, code_dir, env, say
        )
    else:
        assert record is not None and run_dir is not None  # a run was found: no version
        blobs = BlobStore(workspace.blobs_dir)
        export = exports.into_run(
            history, blobs, record.id, run_dir, model, spec, exporter, python, env, say
        )
    _print_export(export, what)
    return 0 if export.ok else 1


def _refuse_a_second(history: Any, version: Any, record: Any, format: str, what: str) -> None:
    """A UserError, before any work, when the version (or the run) already has a passing
    export of `format`: its files never change, so a second one would only be refused
    after the whole export ran (minutes for a large model)."""
    from expkit.errors import UserError
    from expkit.exports import name_files

    if version is not None:
        entry = version.lineage.get("exports", {}).get(format)
        files = entry.get("files", []) if entry else None
    else:
        done = [e for e in history.exports.of(record.id) if e.ok and e.format == format]
        files = list(done[-1].files) if done else None
    if files is not None:
        raise UserError(
            f"{what} already has a passing {format} export ({name_files(files)}); a "
            "version's files never change: register a new version for another"
            if version is not None
            else f"{what} already has a passing {format} export ({name_files(files)}); "
            "its outputs never change"
        )


def _job(record: Any, version: Any, overrides: list[str], what: str) -> JobSpec:
    """The job spec of the run behind the export, with `--set` applied."""
    from expkit.errors import UserError
    from expkit.job import JobSpec, apply_override

    raw = dict(record.job) if record else {"experiment": "export", "entry_script": "-"}
    model = raw["model"] = dict(raw.get("model") or {})
    model.setdefault("name", version.name if version else "model")
    for item in overrides:
        apply_override(raw, item)
    job = JobSpec.from_dict(raw, source=what)
    assert job.model is not None
    for name, example in (("load", "model.load.file=model.pt"),
                          ("input", "model.input.shape=[1,3,32,32]")):  # fmt: skip
        if getattr(job.model, name) is None:
            raise UserError(
                f"{what}: the job spec has no model.{name}, needed to export; "
                f"give it with --set {example}"
            )
    return job


def _export_spec(job: JobSpec, args: argparse.Namespace) -> ExportSpec:
    """The job's own settings for this format, if it lists it, changed by the options given."""
    from expkit.errors import UserError
    from expkit.job import ExportSpec, apply_override

    spec = next((e for e in job.exports if e.format == args.format), ExportSpec(args.format))
    options = dict(spec.options)
    for item in args.option:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option {item!r}: expected KEY=VALUE, e.g. --option opset=18")
        apply_override(options, item)
    return spec.replace(
        options=options,
        atol=spec.atol if args.atol is None else args.atol,
        rtol=spec.rtol if args.rtol is None else args.rtol,
    )


def _environment(workspace: Any, job: JobSpec, run_dir: Path | None) -> tuple[str, dict]:
    """The run's environment (found in the cache, or built again), as post-process used it."""
    from expkit import exports
    from expkit.capabilities import RunContext
    from expkit.plugins import call, get_plugins

    builder = get_plugins().get("environment_builders", job.environment.builder, "environment")
    folder = run_dir or workspace.path
    ctx = RunContext(
        run_id="export",
        job=job,
        run_dir=folder,
        work_dir=folder,
        log_dir=folder,
        script_env={},
        say=_say,
        waiting=lambda text: None,
        canceled=lambda: False,
        echo=lambda rank, line: None,
        cache_dir=workspace.envs_dir,
    )
    env = call(builder, "build", job.environment, ctx)
    return exports.interpreter(env.python), env.env


def _verify(workspace: Any, version: Any, record: Any, job: JobSpec) -> list[str]:
    """The model files the export reads, checked against their recorded sha256 (a damaged
    one replaced by an intact stored copy); raises `downloads.Damaged` when none is left."""
    from expkit.registry import ModelStore, select_model_files, verify_folder

    if version is not None:
        return ModelStore(workspace).verify(version)
    assert job.model is not None
    files, base = select_model_files(workspace.history.outputs.of(record.id), job.model.path)
    folder = workspace.run_dir(record.id) / "outputs" / base
    prefix = f"run {record.id}: outputs/" + (f"{base}/" if base else "")
    return verify_folder(workspace, folder, files, prefix)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _print_export(export: Any, what: str) -> None:
    from expkit import exports

    print(f"export {exports.describe(export)}")
    checked = [c for c in export.checks.get("checked", []) if isinstance(c, dict)]
    width = max((len(str(c.get("input", "?"))) for c in checked), default=0)
    for check in checked:
        mark = "ok" if check.get("ok") else "DIFFERS"
        print(
            f"  {check.get('input', '?'):<{width}}  max abs error "
            f"{check.get('max_abs_error', 0):.3g}  max rel error "
            f"{check.get('max_rel_error', 0):.3g}  {mark}"
        )
    if export.ok:
        where = f"model {what}" if export.model else f"the outputs of {what}"
        print(f"added to {where}: {exports.name_files(export.files)}")
    else:
        print(f"not added to {what}")
