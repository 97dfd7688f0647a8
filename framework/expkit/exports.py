"""Making one export and keeping its result: used by post-process and by `expkit export`.

An exporter writes into an empty staging folder. When its check passes, the files move next
to the model (in the run's outputs, or into the model version) and are recorded with their
hashes; when it fails, they stay in the staging folder for a look, and only the reason and
the figures are recorded. Nothing an exporter does can fail the run by accident: a raising
exporter is a failed export with its error as the reason.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from expkit.blobs import BlobStore, hash_file
from expkit.capabilities import Exporter, ExportRequest, ExportResult, ModelVersion
from expkit.errors import PluginError, UserError
from expkit.history import ExportRecord
from expkit.job import ExportSpec, ModelSpec
from expkit.plugins import call
from expkit.registry import ModelStore, select_model_files

# The figures shown with an export, in this order, when the exporter reports them.
SUMMARY_FIGURES = ("max_abs_error", "max_rel_error")


def make(
    exporter: Exporter,
    spec: ExportSpec,
    model: ModelSpec,
    model_dir: Path,
    staging: Path,
    python: str,
    code_dir: Path | None,
    env: dict[str, str],
    say: Callable[[str], None],
) -> ExportResult:
    """Run `exporter` on the model in `model_dir`; a raising exporter is a failed export."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    assert model.load is not None and model.input is not None  # the job spec checks it
    request = ExportRequest(
        format=spec.format,
        model_dir=model_dir,
        load=model.load.to_dict(),
        input=model.input.to_dict(),
        options=dict(spec.options),
        atol=spec.atol,
        rtol=spec.rtol,
        out_dir=staging,
        python=python,
        code_dir=code_dir,
        env={**env, "PYTHONDONTWRITEBYTECODE": "1"},  # the snapshot stays as it was taken
        say=say,
        timeout=spec.timeout,
    )
    try:
        result = call(exporter, "export", request)
    except UserError:
        raise
    except Exception as failure:  # the export names the exporter: the reason is its error's
        error = failure.error if isinstance(failure, PluginError) else failure
        return ExportResult([], {}, False, f"{type(error).__name__}: {error}")
    except BaseException:  # stopped (Ctrl-C, SIGTERM): nothing half-written is left behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not isinstance(result, ExportResult):
        return ExportResult([], {}, False, f"export returned {result!r}, not an ExportResult")
    for path in result.files:
        path = staging / path
        if not path.is_file() or staging.resolve() not in path.resolve().parents:
            return ExportResult([], result.checks, False, f"export did not write {path}")
    if result.ok and not result.files:
        return ExportResult([], result.checks, False, "export reported success but wrote no file")
    return result


def keep(
    result: ExportResult, staging: Path, dest: Path, taken: set[str], blobs: BlobStore
) -> dict[str, tuple[int, str]]:
    """Move a passing export's files from `staging` into `dest`, read-only in the blob store.

    `taken` are the names already in `dest` (the script's own outputs, other exports): an
    export never overwrites one. Returns the files by name relative to `dest`.
    """
    names = _names(result, staging)
    clash = sorted(set(names) & taken)
    if clash:
        raise UserError(f"its file {clash[0]} would replace one already there")
    kept = {}
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, target)
        digest = hash_file(target)
        blobs.adopt(target, digest)
        kept[name] = (target.stat().st_size, digest)
    return kept


def into_run(
    history: Any,
    blobs: BlobStore,
    run_id: str,
    run_dir: Path,
    model: ModelSpec,
    spec: ExportSpec,
    exporter: Exporter,
    python: str,
    env: dict[str, str],
    say: Callable[[str], None],
    stopped: Callable[[], str | None] = lambda: None,
) -> ExportRecord:
    """Export a run's model; a passing export's files join the model's folder in the run's
    outputs (and its outputs manifest). The attempt is recorded either way.

    `stopped()`: why the run is being stopped (a signal), or None; an export that did not
    pass while it was is recorded as "stopped: <why>", not as a failure of the exporter."""
    outputs = history.outputs.of(run_id)
    files, base = select_model_files(outputs, model.path)
    staging, sealed = run_dir / "exports" / spec.format, run_dir / "outputs" / base
    if files:
        code_dir = run_dir / "snapshot"
        result = make(exporter, spec, model, sealed, staging, python, code_dir, env, say)
    else:
        result = ExportResult([], {}, False, f"model.path {model.path!r} matched no output")
    why = None if result.ok else stopped()
    if why:
        result = ExportResult([], result.checks, False, f"stopped: {why}")
    kept: dict[str, tuple[int, str]] = {}
    if result.ok:
        taken = {p.removeprefix(f"{base}/") if base else p for p in outputs}
        try:
            kept = keep(result, staging, sealed, taken, blobs)
        except UserError as error:
            result = ExportResult([], result.checks, False, str(error))
    prefix = f"{base}/" if base else ""
    record = ExportRecord(
        format=spec.format,
        ok=result.ok,
        message=result.message,
        checks=result.checks,
        files={prefix + name: value for name, value in kept.items()},
        run_id=run_id,
    )
    history.exports.add(record)
    if record.files:
        history.outputs.set(run_id, {**outputs, **record.files})
    return record


def into_version(
    store: ModelStore,
    version: ModelVersion,
    model: ModelSpec,
    spec: ExportSpec,
    exporter: Exporter,
    python: str,
    code_dir: Path | None,
    env: dict[str, str],
    say: Callable[[str], None],
) -> ExportRecord:
    """Export a registered model version; a passing export's files are added to the version
    (its existing files never change). The attempt is recorded either way."""
    staging = store.ws.path / "exports" / f"{version.name}-{version.version}-{spec.format}"
    result = make(exporter, spec, model, version.path, staging, python, code_dir, env, say)
    files: dict[str, tuple[int, str]] = {}
    if result.ok:
        for name in _names(result, staging):
            path = staging / name
            files[name] = (path.stat().st_size, hash_file(path))
    record = ExportRecord(
        format=spec.format,
        ok=result.ok,
        message=result.message,
        checks=result.checks,
        files=files,
        run_id=version.lineage.get("run_id"),
        model=version.name,
        version=version.version,
    )
    if record.ok:
        lineage = dict(version.lineage)
        lineage.setdefault("exports", {})[spec.format] = lineage_entry(record)
        try:
            store.attach(version, files, staging, lineage)
        except UserError as error:
            record.ok, record.message, record.files = False, str(error), {}
        else:
            shutil.rmtree(staging, ignore_errors=True)
    store.ws.history.exports.add(record)
    return record


def interpreter(python: str) -> str:
    """The environment's interpreter, or this one when it is not on this machine (a remote
    target's): exports run here."""
    return python if Path(python).is_file() else sys.executable


def _names(result: ExportResult, staging: Path) -> list[str]:
    """The exported files by name relative to the staging folder they were written in."""
    root = staging.resolve()
    return [(staging / path).resolve().relative_to(root).as_posix() for path in result.files]


def describe(record: ExportRecord) -> str:
    """One line: `onnx: model.onnx, max_abs_error 3.1e-06 over 3 inputs` or the failure."""
    if not record.ok:
        return f"{record.format}: failed: {record.message}"
    figures = [
        f"{name} {record.checks[name]:.2g}"
        for name in SUMMARY_FIGURES
        if isinstance(record.checks.get(name), int | float)
    ]
    checked = record.checks.get("checked")
    if isinstance(checked, list) and checked:
        figures.append(f"over {len(checked)} inputs")
    files = name_files(record.files)
    return f"{record.format}: {files}" + (f" ({', '.join(figures)})" if figures else "")


def name_files(names: Iterable[str]) -> str:
    """An export's files in a few words: each top-level file by name, each folder as
    `folder/ (N files)` (an MLflow model folder holds ten), so the line stays readable;
    `expkit models show` and `runs show --json` list every file."""
    top: list[str] = []
    folders: dict[str, int] = {}
    for name in sorted(names):
        head, sep, _ = name.partition("/")
        if sep:
            folders[head] = folders.get(head, 0) + 1
        else:
            top.append(name)
    shown = top + [f"{f}/ ({n} file{'s' if n != 1 else ''})" for f, n in sorted(folders.items())]
    return ", ".join(shown) or "no files"


def lineage_entry(record: ExportRecord, prefix: str = "") -> dict[str, Any]:
    """What a model version's lineage says about one of its exports."""
    return {
        "files": sorted(name.removeprefix(prefix) for name in record.files),
        "checks": record.checks,
        "run_id": record.run_id,
    }
