"""The model registry's records: numbered versions of each model, their files, their aliases,
where other registries put them, and exports (of a run's outputs or of a model version)."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from expkit.history.connection import Owner, Part

# A model version exists only for a run that completed: one that a run's register stage made
# is hidden by the very transaction that ends the run otherwise (a signal or a kill -9 during
# register, reaped at the next open; a failing registry plugin), and its number is never given
# again. Versions registered later from a finished run (the Python API) are not affected.
VISIBLE = (
    "NOT EXISTS (SELECT 1 FROM runs WHERE runs.id = models.run_id"
    " AND runs.state IN ('failed', 'canceled') AND runs.ended >= models.created)"
)


class Models(Part):
    """Registered model versions (rows of `models`) and the files of each (`model_files`)."""

    def __init__(self, history: Owner, model_taken: Callable[[str, int], bool]) -> None:
        super().__init__(history)
        self._model_taken = model_taken

    def add_version(
        self,
        name: str,
        run_id: str | None,
        lineage: dict[str, Any],
        tags: dict[str, str],
        files: dict[str, tuple[int, str]],
    ) -> int:
        """Insert the next version of `name` with its files; returns the version number,
        never one whose folder exists already (`model_taken`)."""
        with self.transaction() as db:
            (version,) = db.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM models WHERE name = ?", (name,)
            ).fetchone()
            while self._model_taken(name, version):  # a version the history lost
                version += 1
            db.execute(
                "INSERT INTO models (name, version, run_id, created, lineage, tags)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (name, version, run_id, time.time(), json.dumps(lineage), json.dumps(tags)),
            )
            db.executemany(
                "INSERT INTO model_files (name, version, path, sha256, size)"
                " VALUES (?, ?, ?, ?, ?)",
                [(name, version, p, digest, size) for p, (size, digest) in files.items()],
            )
        return version

    def versions(self, name: str | None = None) -> list[sqlite3.Row]:
        """The visible model versions (see `VISIBLE`), of `name` or of every model."""
        sql, args = f"SELECT * FROM models WHERE {VISIBLE}", []
        if name:
            sql, args = sql + " AND name = ?", [name]
        return self.db.execute(sql + " ORDER BY name, version", args).fetchall()

    def find(self, name: str, version: int | None = None) -> sqlite3.Row | None:
        """Version `version` of model `name` (default: the latest), if it is visible."""
        sql = f"SELECT * FROM models WHERE {VISIBLE} AND name = ?"
        args: list[Any] = [name]
        if version is None:
            sql += " ORDER BY version DESC LIMIT 1"
        else:
            sql, args = sql + " AND version = ?", [*args, version]
        return self.db.execute(sql, args).fetchone()

    def add_files(
        self, name: str, version: int, files: dict[str, tuple[int, str]], lineage: dict[str, Any]
    ) -> None:
        """Add files (exports made later) to an existing version, with its updated lineage."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO model_files (name, version, path, sha256, size)"
                " VALUES (?, ?, ?, ?, ?)",
                [(name, version, p, digest, size) for p, (size, digest) in files.items()],
            )
            db.execute(
                "UPDATE models SET lineage = ? WHERE name = ? AND version = ?",
                (json.dumps(lineage), name, version),
            )

    def files(self, name: str, version: int) -> dict[str, tuple[int, str]]:
        """The version's files: path -> (size in bytes, sha256), sorted by path."""
        rows = self.db.execute(
            "SELECT path, size, sha256 FROM model_files WHERE name = ? AND version = ?"
            " ORDER BY path",
            (name, version),
        )
        return {p: (size, digest) for p, size, digest in rows}


# The alias rows that count: a removal (version NULL) or one pointing at a kept version.
_ALIAS_COUNTS = (
    "(b.version IS NULL OR EXISTS (SELECT 1 FROM models WHERE models.name = b.name"
    f" AND models.version = b.version AND {VISIBLE}))"
)


class Aliases(Part):
    """Aliases of model versions (`champion` -> version 3), as MLflow's registry has them:
    one version per alias and model, a version may have several. Every change is a new row
    (`model_aliases`); an alias points where its latest row that still counts says: a row
    pointing at a version withdrawn with its failed run does not count, so the alias points
    where it did before that run."""

    def set(self, name: str, alias: str, version: int, run_id: str | None = None) -> None:
        """Point `alias` of model `name` at `version` (from now on; `run_id`: the run whose
        register stage set it, if one did)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO model_aliases (name, alias, version, created, run_id)"
                " VALUES (?, ?, ?, ?, ?)",
                (name, alias, version, time.time(), run_id),
            )

    def delete(self, name: str, alias: str) -> int | None:
        """Remove `alias` of model `name`; returns the version it pointed at (None: none)."""
        with self.transaction() as db:
            before = self._current(db, name).get(alias)
            if before is not None:
                db.execute(
                    "INSERT INTO model_aliases (name, alias, version, created)"
                    " VALUES (?, ?, NULL, ?)",
                    (name, alias, time.time()),
                )
        return before

    def of_model(self, name: str) -> dict[str, int]:
        """Model `name`'s aliases: alias -> version, sorted by alias."""
        return self._current(self.db, name)

    def find(self, name: str, alias: str) -> int | None:
        """The version `alias` of model `name` points at, or None."""
        return self._current(self.db, name).get(alias)

    @staticmethod
    def _current(db: sqlite3.Connection, name: str) -> dict[str, int]:
        rows = db.execute(
            "SELECT a.alias, a.version FROM model_aliases a WHERE a.name = ? AND a.id = ("
            f"SELECT MAX(b.id) FROM model_aliases b WHERE b.name = a.name AND b.alias = a.alias"
            f" AND {_ALIAS_COUNTS}) ORDER BY a.alias",
            (name,),
        )
        return {alias: version for alias, version in rows if version is not None}


@dataclass
class RegistrationRecord:
    """Where model registry `registry` (a plugin's registry name, e.g. `mlflow`) put version
    `version` of model `name`: `reference` is shown, `locator` lets the registry find that
    version again (expkit.capabilities.Registration); `created`: seconds since the epoch."""

    name: str
    version: int
    registry: str
    reference: str
    locator: dict[str, str]
    created: float


class Registrations(Part):
    """Where each model version was registered besides the workspace (`model.registries`)."""

    def add(
        self, name: str, version: int, registry: str, reference: str, locator: dict[str, str]
    ) -> None:
        """Record that `registry` registered `name:version` as `reference` (`locator`)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO registrations (name, version, registry, reference, locator,"
                " created) VALUES (?, ?, ?, ?, ?, ?)",
                (name, version, registry, reference, json.dumps(locator), time.time()),
            )

    def of(self, name: str, version: int) -> list[RegistrationRecord]:
        """Version `version` of model `name`'s registrations, in the order they were made."""
        rows = self.db.execute(
            "SELECT name, version, registry, reference, locator, created FROM registrations"
            " WHERE name = ? AND version = ? ORDER BY id",
            (name, version),
        )
        return [
            RegistrationRecord(n, v, registry, ref, json.loads(locator), created)
            for n, v, registry, ref, locator, created in rows
        ]


@dataclass
class ExportRecord:
    """One export attempt: what it produced (paths relative to the run's outputs or the model
    version), how it was checked, and whether it passed."""

    format: str
    ok: bool
    message: str
    checks: dict[str, Any]
    files: dict[str, tuple[int, str]]
    run_id: str | None = None
    model: str | None = None
    version: int | None = None
    created: float = 0.0

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ExportRecord:
        files = {p: (size, digest) for p, (size, digest) in json.loads(row["files"]).items()}
        return cls(
            format=row["format"],
            ok=bool(row["ok"]),
            message=row["message"],
            checks=json.loads(row["checks"]),
            files=files,
            run_id=row["run_id"],
            model=row["model"],
            version=row["version"],
            created=row["created"],
        )


class Exports(Part):
    """Export attempts, of a run's outputs or of a model version, passed or failed."""

    def add(self, export: ExportRecord) -> None:
        """Record the attempt `export` (its time: now, unless it carries one)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO exports (run_id, model, version, format, ok, message, checks,"
                " files, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    export.run_id,
                    export.model,
                    export.version,
                    export.format,
                    int(export.ok),
                    export.message,
                    json.dumps(export.checks),
                    json.dumps(export.files),
                    export.created or time.time(),
                ),
            )

    def of(
        self, run_id: str | None = None, model: str | None = None, version: int | None = None
    ) -> list[ExportRecord]:
        """Exports of a run (made in its post-process or later), or of a model version."""
        if model is not None:
            sql, args = "model = ? AND version = ?", [model, version]
        else:
            sql, args = "run_id = ? AND model IS NULL", [run_id]
        rows = self.db.execute(f"SELECT * FROM exports WHERE {sql} ORDER BY id", args)
        return [ExportRecord.from_row(row) for row in rows]
