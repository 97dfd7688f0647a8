"""The workspace's model registry: immutable, numbered versions of named models.

A version's files are hard links to blobs, laid out at `models/<name>/<version>/`, with the
lineage (run, snapshot and environment hashes, final metrics) in the run history. A version
is named by a reference (`NAME`, `NAME:VERSION`, `NAME@ALIAS`: expkit.modelrefs); aliases and
where other registries put a version (`model.registries`) are kept in the history too, and an
alias set here is mirrored to each registry that has the version (`ModelRegistry.set_alias`).
Whether a run's version is made at all is the job's `model.register_if` (`check_register_if`).
"""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expkit.blobs import BlobStore, copy_private, manifest, short_temporary_name, stored_mode
from expkit.capabilities import ModelVersion, Registration
from expkit.errors import PluginError, StageFailed, UserError
from expkit.modelrefs import ModelRef, check_alias, parse_model_ref
from expkit.workspace import Workspace

if TYPE_CHECKING:
    from expkit.capabilities import ModelRegistry
    from expkit.job import JobSpec
    from expkit.register_if import Verdict

__all__ = ["ModelRef", "ModelStore", "NoModelFiles", "parse_model_ref"]


class NoModelFiles(UserError):
    """The job's `model.path` names no stored file among the run's outputs (nothing matched,
    or a link out of the run that was recorded, not stored): nothing to register."""


class ModelStore:
    def __init__(self, workspace: Workspace) -> None:
        self.ws = workspace
        self.blobs = BlobStore(workspace.blobs_dir)

    def register(
        self,
        name: str,
        files: dict[str, tuple[int, str]],
        source: Path,
        run_id: str | None = None,
        lineage: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
    ) -> ModelVersion:
        """Create the next version of `name` from `files` (paths relative to `source`).

        Raises UserError when `name` breaks the job spec's rules for `model.name` (it names
        a folder of the workspace), or when there are no files."""
        check_model_name(name)
        if not files:
            raise UserError(f"model {name!r}: nothing to register, {source} holds no files")
        for rel, (_, digest) in files.items():
            if not self.blobs.path(digest).exists():
                self.blobs.add_copy(source / rel, digest)
        version = self.ws.history.models.add_version(name, run_id, lineage or {}, tags or {}, files)
        self._lay_out(name, version, files)
        return self.get(name, version)

    def register_path(self, name: str, path: Path, **kwargs: Any) -> ModelVersion:
        """Register a file or folder that is not yet in the store (e.g. from the Python API)."""
        path = Path(path)
        if path.is_file():
            return self.register(name, manifest_of_file(path), path.parent, **kwargs)
        if not path.is_dir():
            raise UserError(f"model {name!r}: {path} does not exist")
        return self.register(name, manifest(path), path, **kwargs)

    def attach(
        self,
        model: ModelVersion,
        files: dict[str, tuple[int, str]],
        source: Path,
        lineage: dict[str, Any],
    ) -> ModelVersion:
        """Add new files (a later export) to a version; its existing files never change."""
        clash = sorted(set(files) & set(model.files))
        if clash:
            raise UserError(
                f"model {model.name}:{model.version} already has {clash[0]}; a version's files "
                "never change (register a new version to replace it)"
            )
        for rel, (_, digest) in files.items():
            if not self.blobs.path(digest).exists():
                self.blobs.add_copy(source / rel, digest)
        self.ws.history.models.add_files(model.name, model.version, files, lineage)
        for rel, (_, digest) in files.items():
            self.blobs.link_to(digest, model.path / rel)
        return self.get(model.name, model.version)

    def _lay_out(self, name: str, version: int, files: dict[str, tuple[int, str]]) -> Path:
        """The folder `models/<name>/<version>/` holding the recorded `files`: kept when it
        holds them, completed when some are missing (a crash), and moved aside to
        `<version>.unrecorded[.n]` when it holds a file the record does not name (files of a
        version the history lost): a version's folder never shows files not its own."""
        folder = self.ws.models_dir / name / str(version)
        if folder.is_dir() and not folder.is_symlink():
            if self._matches(folder, files):
                for rel, (_, digest) in files.items():
                    if not os.path.lexists(folder / rel):
                        self.blobs.link_to(digest, folder / rel)
                return folder
            _move_aside(folder)
        elif os.path.lexists(folder):
            _move_aside(folder)
        tmp = folder.with_name(f".{version}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, (_, digest) in files.items():
            self.blobs.link_to(digest, tmp / rel)
        tmp.replace(folder)
        return folder

    @staticmethod
    def _matches(folder: Path, files: dict[str, tuple[int, str]]) -> bool:
        """Whether every file in `folder` is one of `files` by name (their content is
        checked, and repaired, by `verify`: see downloads)."""
        for path in folder.rglob("*"):
            if path.is_dir() and not path.is_symlink():
                continue
            if path.relative_to(folder).as_posix() not in files:
                return False
        return True

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """Version `version` of model `name` (None: the latest). Raises UserError naming an
        unknown model, or a version the model does not have (with its latest)."""
        history = self.ws.history
        # SQLite integers are 64-bit: a larger number is no version (not an OverflowError).
        row = history.models.find(name, version) if (version or 0) < 2**63 else None
        if row is None:
            latest = history.models.find(name) if version is not None else None
            if latest is not None:
                raise UserError(
                    f"model {name!r} has no version {version} (its latest is "
                    f"{name}:{latest['version']}; `expkit models list {name}` lists them)"
                )
            known = sorted({r["name"] for r in history.models.versions()})
            which = f"{name}:{version}" if version is not None else name
            raise UserError(
                f"no model {which!r} in this workspace"
                + (f" (models: {', '.join(known)})" if known else " (no models registered yet)")
            )
        files = self.ws.history.models.files(name, row["version"])
        folder = self._lay_out(name, row["version"], files)  # rebuilt if a crash lost it
        return ModelVersion(
            name=name,
            version=row["version"],
            path=folder,
            files={p: d for p, (_, d) in files.items()},
            lineage=json.loads(row["lineage"]),
            tags=json.loads(row["tags"]),
        )

    def resolve(self, ref: str | ModelRef) -> ModelVersion:
        """The version a reference names (`NAME`: the latest, `NAME:VERSION`, `NAME@ALIAS`).
        Raises UserError for a malformed reference, an unknown model, version or alias."""
        if isinstance(ref, str):
            ref = parse_model_ref(ref)
        if ref.alias is None:
            return self.get(ref.name, ref.version)
        version = self.ws.history.aliases.find(ref.name, ref.alias)
        if version is None:
            self.get(ref.name)  # an unknown model is said as such
            aliases = self.ws.history.aliases.of_model(ref.name)
            known = (
                f"its aliases: {', '.join(f'@{a}' for a in aliases)}"
                if aliases
                else f"it has none; set one with `expkit models alias {ref.name}:VERSION "
                f"{ref.alias}`"
            )
            raise UserError(f"model {ref.name!r} has no alias {ref.alias!r} ({known})")
        return self.get(ref.name, version)

    def download(
        self, name: str, version: int | None, dest: Path, overwrite: bool = False
    ) -> list[Path]:
        """Copy a version's files into the folder `dest` (created if needed), each checked
        against its recorded sha256 and rebuilt from any intact stored copy. Nothing is written
        unless every file can be: raises UserError for a file already there (unless
        `overwrite`) or a link on the way, `downloads.Damaged` when no intact copy is left."""
        from expkit import downloads

        model = self.get(name, version)
        dest = Path(dest)
        if dest.exists() and not dest.is_dir():
            raise UserError(f"{dest} is a file; `models download` writes into a folder")
        dest.mkdir(parents=True, exist_ok=True)
        wanted = []
        for rel, digest in model.files.items():
            stored = downloads.inside_folder(model.path, rel)
            wanted.append(
                downloads.Wanted(
                    f"{model.name}:{model.version} {rel}",
                    downloads.inside_folder(dest, rel),
                    digest,
                    partial(downloads.candidates, self.ws, digest, [stored]),
                )
            )
        return downloads.fetch(wanted, overwrite, root=dest)

    def verify(self, model: ModelVersion) -> list[str]:
        """Check a version's files against their recorded sha256 before they are read (an
        export); a damaged file is replaced by an intact stored copy. Returns what was
        repaired; raises `downloads.Damaged` when a file has no intact copy left."""
        files = {rel: (0, digest) for rel, digest in model.files.items()}
        return verify_folder(self.ws, model.path, files, f"model {model.name}:{model.version} ")


def verify_folder(
    workspace: Workspace, folder: Path, files: dict[str, tuple[int, str]], what: str
) -> list[str]:
    """Check that each of `files` in `folder` (a folder of the store: a model version, a
    run's outputs; `what` prefixes their names in messages) has its recorded sha256; a
    damaged one is replaced by an intact stored copy. Returns one line per repair; raises
    `downloads.Damaged` when no copy is intact."""
    from expkit import downloads
    from expkit.blobs import hash_file

    repaired = []
    for rel, (_, digest) in files.items():
        path = downloads.inside_folder(folder, rel)
        actual = hash_file(path) if path.is_file() and not path.is_symlink() else "missing"
        if actual == digest:
            continue
        for copy in downloads.candidates(workspace, digest, []):
            intact = copy != path and copy.is_file() and not copy.is_symlink()
            if intact and hash_file(copy) == digest:
                _relink(copy, path)
                repaired.append(
                    f"{what}{rel}: did not match its record (sha256 {actual}, recorded "
                    f"{digest}); replaced by the intact copy {copy}"
                )
                break
        else:
            raise downloads.Damaged(
                f"{what}{rel}: the stored file does not match its record (sha256 {actual}, "
                f"recorded {digest}) and no intact copy is left"
            )
    return repaired


def _move_aside(folder: Path) -> None:
    """Rename `folder` to a free `<name>.unrecorded[.n]` next to it (nothing is deleted)."""
    for n in range(1000):
        aside = folder.with_name(f"{folder.name}.unrecorded" + (f".{n}" if n else ""))
        if not os.path.lexists(aside):
            folder.rename(aside)
            return
    raise UserError(f"{folder}: holds files of no recorded version; move it away")


def _relink(good: Path, path: Path) -> None:
    """Make the store's name `path` the intact file `good` (a copy across file systems)."""
    tmp = path.with_name(short_temporary_name())  # a name built from path's may be too long
    try:
        try:
            os.link(good, tmp)
        except OSError:
            copy_private(good, tmp, stored_mode(good.stat().st_mode))
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def check_model_name(name: str, field: str = "model.name") -> None:
    """Refuse a model name the job spec would refuse: it becomes a folder of the workspace
    (models/<name>/), so `../x` or `a/b` must never reach the file system."""
    from expkit.job import NAME, NAME_RULE

    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(f"{field} {name!r}: {NAME_RULE}, at most 100 characters")


def register_run_model(
    workspace: Workspace, run_id: str, job: JobSpec, lineage: dict[str, Any] | None = None
) -> ModelVersion:
    """Register the next version of `job.model` from run `run_id`'s sealed outputs, as a
    run's register stage does: the files `model.path` names, with its passing exports'
    files; lineage: the run, its experiment, snapshot and environment hashes, entry script,
    last numeric metrics and exports, then `lineage` (e.g. the sweep a trial belongs to);
    tags: the job's, then the model's. Used by the register stage (`Lifecycle.register`) and
    by a sweep registering its best trial (`expkit.sweeps.best.register_best`). Raises
    NoModelFiles when `model.path` matches no stored output, UserError for a bad name."""
    from expkit import exports

    spec = job.model
    if spec is None:
        raise UserError(f"run {run_id}: its job names no model (model.name)")
    history = workspace.history
    files, base = select_model_files(history.outputs.of(run_id), spec.path)
    if not files:
        links = history.outputs.links(run_id)
        named = spec.path.removeprefix("outputs").strip("/") or "."
        if named in links:
            raise NoModelFiles(
                f"model.path {spec.path!r} is a link to {links[named]}, out of the run: "
                "recorded, not stored, so not registered"
            )
        raise NoModelFiles(f"model.path {spec.path!r} matched no file in the run's outputs")
    record = history.runs.get(run_id)
    numbers = {
        k: v for k, v in history.metrics.latest(run_id).items() if isinstance(v, int | float)
    }
    found: dict[str, Any] = {
        "run_id": run_id,
        "experiment": job.experiment,
        "snapshot_hash": record.snapshot_hash,
        "environment_hash": record.environment_hash,
        "entry_script": job.entry_script,
        "metrics": numbers,
    }
    prefix = f"{base}/" if base else ""
    for export in history.exports.of(run_id):
        if export.ok:  # the export's files, wherever model.path points within its folder
            files.update({p.removeprefix(prefix): v for p, v in export.files.items()})
            found.setdefault("exports", {})[export.format] = exports.lineage_entry(export, prefix)
    found.update(lineage or {})
    return ModelStore(workspace).register(
        spec.name,
        files,
        workspace.run_dir(run_id) / "outputs" / base,
        run_id,
        found,
        {**job.tags, **spec.tags},
    )


def select_model_files(
    outputs: dict[str, tuple[int, str]], model_path: str
) -> tuple[dict[str, tuple[int, str]], str]:
    """The files `model.path` names among a run's outputs, relative to the model's folder, and
    that folder (relative to outputs/): `outputs/` -> all of them, "" ; `outputs/model.pt` ->
    that file, ""; `outputs/net/` -> the files under net/, "net"."""
    prefix = model_path.removeprefix("outputs").strip("/")
    if prefix in outputs:  # one file
        return {Path(prefix).name: outputs[prefix]}, str(Path(prefix).parent).strip(".")
    cut = len(prefix) + 1 if prefix else 0
    files = {p[cut:]: v for p, v in outputs.items() if not prefix or p.startswith(prefix + "/")}
    return files, prefix


def manifest_of_file(path: Path) -> dict[str, tuple[int, str]]:
    from expkit.blobs import hash_file

    return {path.name: (path.stat().st_size, hash_file(path))}


# -- registrations and aliases ---------------------------------------------------------------
def record_registration(
    workspace: Workspace, model: ModelVersion, registry: str, returned: str | Registration
) -> Registration:
    """Keep in the history where `registry` put `model` (what its `register` returned: a
    Registration, or a bare reference), for `expkit models show` and alias mirroring."""
    found = returned if isinstance(returned, Registration) else Registration(str(returned))
    locator = {str(k): str(v) for k, v in found.locator.items()}
    workspace.history.registrations.add(
        model.name, model.version, registry, found.reference, locator
    )
    return found


def set_alias(
    workspace: Workspace,
    model: ModelVersion,
    alias: str,
    run_id: str | None = None,
    registries: dict[str, ModelRegistry] | None = None,
) -> tuple[list[str], list[str]]:
    """Point `alias` of `model.name` at `model` in the workspace, then in each registry that
    registered this version (`ModelRegistry.set_alias`); in a registry that has only the
    version the alias pointed at before, the alias is removed, so that it never points
    elsewhere there. `registries`: registry name -> the plugin object (default: the
    installed ones). Returns (lines to show, warnings): a registry that refuses, or is not
    installed, is a warning; the workspace's alias is set anyway. UserError for a bad name."""
    check_alias(alias)
    history = workspace.history
    before = history.aliases.find(model.name, alias)
    history.aliases.set(model.name, alias, model.version, run_id)
    said = [f"{model.name}@{alias} -> version {model.version}"]
    if before is not None and before != model.version:
        said[0] += f" (was version {before})"
    warnings: list[str] = []
    now = history.registrations.of(model.name, model.version)
    mirrored = {r.registry for r in now}
    for record in now:
        registration = Registration(record.reference, record.locator)
        _mirror(
            record.registry, "set_alias", (alias, model, registration), registries, said, warnings
        )
    if before is not None and before != model.version:
        for record in history.registrations.of(model.name, before):
            if record.registry not in mirrored:
                registration = Registration(record.reference, record.locator)
                args = (alias, model.name, registration)
                _mirror(record.registry, "delete_alias", args, registries, said, warnings)
    return said, warnings


def delete_alias(
    workspace: Workspace, name: str, alias: str, registries: dict[str, ModelRegistry] | None = None
) -> tuple[list[str], list[str]]:
    """Remove `alias` of model `name` in the workspace and in each registry that registered
    the version it pointed at (`ModelRegistry.delete_alias`). Returns (lines, warnings) as
    `set_alias`; UserError when the model has no such alias."""
    check_alias(alias)
    ModelStore(workspace).get(name)  # an unknown model is said as such
    history = workspace.history
    version = history.aliases.delete(name, alias)
    if version is None:
        raise UserError(f"model {name!r} has no alias {alias!r}; nothing to delete")
    said = [f"{name}@{alias} removed (it pointed at version {version})"]
    warnings: list[str] = []
    for record in history.registrations.of(name, version):
        registration = Registration(record.reference, record.locator)
        _mirror(
            record.registry, "delete_alias", (alias, name, registration), registries, said, warnings
        )
    return said, warnings


def _mirror(
    registry_name: str,
    method: str,
    args: tuple[Any, ...],
    registries: dict[str, ModelRegistry] | None,
    said: list[str],
    warnings: list[str],
) -> None:
    """Call `method` of the registry named `registry_name` with `args`; what it says goes to
    `said`, a failure (or a registry not installed) to `warnings`."""
    from expkit.plugins import call, get_plugins

    alias = args[0]
    try:
        if registries is not None and registry_name in registries:
            registry = registries[registry_name]
        else:
            registry = get_plugins().get("model_registries", registry_name)
        line = call(registry, method, *args)
    except (UserError, StageFailed, PluginError) as failure:
        doing = "set" if method == "set_alias" else "removed"
        warnings.append(
            f"model registry {registry_name!r}: alias {alias!r} not {doing} there: {failure}"
        )
        return
    if line:
        said.append(f"model registry {registry_name!r}: {line}")


# -- register_if ------------------------------------------------------------------------------
def check_register_if(workspace: Workspace, job: JobSpec, run_id: str) -> list[Verdict]:
    """Each condition of the job's `model.register_if` checked against run `run_id`'s final
    metrics (empty: none); a `better` condition compares with the version alias `than` points
    at, else with the model's latest version (see expkit.register_if)."""
    from expkit import register_if

    spec = job.model
    if spec is None or spec.register_if is None:
        return []
    conditions = register_if.parse(spec.register_if)
    history = workspace.history
    metrics = history.metrics.latest(run_id)

    def compared(condition: register_if.BetterThan) -> tuple[str, float] | str:
        assert spec is not None
        if condition.than:
            version = history.aliases.find(spec.name, condition.than)
            if version is None:
                return f"no version of {spec.name} has alias {condition.than!r} to compare with"
            what = f"{spec.name}@{condition.than}, version {version}"
        else:
            row = history.models.find(spec.name)
            if row is None:
                return f"no version of {spec.name} yet to compare with"
            version, what = row["version"], f"{spec.name}:{row['version']}"
        row = history.models.find(spec.name, version)
        value = json.loads(row["lineage"]).get("metrics", {}).get(condition.metric) if row else None
        # A NaN (that version diverged) beats nothing and is beaten by nothing: no value.
        if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
            return f"{what} has no value of {condition.metric} to compare with"
        return what, float(value)

    return register_if.check(conditions, metrics, compared)


def unmet(verdicts: list[Verdict]) -> str | None:
    """The reason a version is not registered ("best_val_acc 0.84 is not > 0.9"), from
    `check_register_if`'s verdicts; None when every condition holds."""
    # Each reason once: two conditions on a metric the run never logged fail alike.
    failed = list(dict.fromkeys(v.text for v in verdicts if not v.ok))
    return "; ".join(failed) if failed else None
