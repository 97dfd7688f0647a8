"""The workspace's model registry: immutable, numbered versions of named models.

A version's files are hard links to blobs, laid out at `models/<name>/<version>/`, with the
lineage (run, snapshot and environment hashes, final metrics) in the run history.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from expkit.blobs import BlobStore, manifest
from expkit.capabilities import ModelVersion
from expkit.errors import UserError
from expkit.workspace import Workspace


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
        """Create the next version of `name` from `files` (paths relative to `source`)."""
        if not files:
            raise UserError(f"model {name!r}: nothing to register, {source} holds no files")
        for rel, (_, digest) in files.items():
            if not self.blobs.path(digest).exists():
                self.blobs.add_copy(source / rel, digest)
        version = self.ws.history.add_model_version(name, run_id, lineage or {}, tags or {}, files)
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
        self.ws.history.add_model_files(model.name, model.version, files, lineage)
        for rel, (_, digest) in files.items():
            self.blobs.link_to(digest, model.path / rel)
        return self.get(model.name, model.version)

    def _lay_out(self, name: str, version: int, files: dict[str, tuple[int, str]]) -> Path:
        folder = self.ws.models_dir / name / str(version)
        if folder.is_dir():
            return folder
        tmp = folder.with_name(f".{version}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, (_, digest) in files.items():
            self.blobs.link_to(digest, tmp / rel)
        tmp.replace(folder)
        return folder

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        row = self.ws.history.model(name, version)
        if row is None:
            known = sorted({r["name"] for r in self.ws.history.models()})
            which = f"{name}:{version}" if version else name
            raise UserError(
                f"no model {which!r} in this workspace"
                + (f" (models: {', '.join(known)})" if known else " (no models registered yet)")
            )
        files = self.ws.history.model_files(name, row["version"])
        folder = self._lay_out(name, row["version"], files)  # rebuilt if a crash lost it
        return ModelVersion(
            name=name,
            version=row["version"],
            path=folder,
            files={p: d for p, (_, d) in files.items()},
            lineage=json.loads(row["lineage"]),
            tags=json.loads(row["tags"]),
        )

    def download(self, name: str, version: int | None, dest: Path) -> list[Path]:
        model = self.get(name, version)
        written = []
        for rel in model.files:
            target = Path(dest) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model.path / rel, target)
            written.append(target)
        return written


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


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """`name` or `name:version` -> (name, version or None for the latest)."""
    name, _, version = ref.partition(":")
    if version and not version.isdigit():
        raise UserError(f"{ref!r}: a version is a number, e.g. {name}:2")
    return name, int(version) if version else None
