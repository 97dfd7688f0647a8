"""The run history: one SQLite database (WAL) that is the source of truth for every run.

`History` opens the file (refusing one that is not a usable expkit history), brings its
schema up to date (expkit.history.schema), and owns each thread's connection and the write
transaction. What it records is reached through its parts, one per aggregate, which share
that connection: `history.runs`, `.stages`, `.events`, `.tags`, `.outputs` (runs.py),
`.metrics` (metrics.py), `.params` and `.sink_cursors` (params.py), `.models`, `.aliases`,
`.registrations` and `.exports` (models.py), `.sweeps` (sweeps.py).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from expkit.errors import UserError, shown_path
from expkit.history import schema
from expkit.history.attempts import Attempts
from expkit.history.connection import (
    APPLICATION_ID,
    DamagedHistory,
    check_regular_file,
    check_version,
    connect,
    no_room,
    not_ours,
    patiently,
)
from expkit.history.metrics import Metrics
from expkit.history.models import Aliases, Exports, Models, Registrations
from expkit.history.params import Params, SinkCursors
from expkit.history.runs import Events, Outputs, Runs, Stages, Tags
from expkit.history.sweeps import Sweeps


class History:
    """Reads and writes the run history database; safe to share between threads.

    Raises DamagedHistory (a UserError naming the file) when the file is not a usable
    database, whether that shows when it is opened or at a later query, and a UserError when
    a newer expkit made it.
    """

    def __init__(
        self,
        path: Path,
        *,
        run_taken: Callable[[str], bool] | None = None,
        model_taken: Callable[[str, int], bool] | None = None,
        has_records: Callable[[], bool] | None = None,
    ) -> None:
        """Open (creating if needed, upgrading if older) the history at `path`.

        `run_taken(run_id)` and `model_taken(name, version)` say whether a folder of that
        run or model version already exists: new ids skip those, so that a history that lost
        rows never lays a new run or version over an old one's files. `has_records()` says
        whether the workspace holds runs or models: an empty database file there is a lost
        history, refused, not a new one. Raises DamagedHistory, or UserError."""
        self.path = Path(path)
        self._has_records = has_records or (lambda: False)
        self._local = threading.local()
        self.runs = Runs(self, run_taken or (lambda run_id: False))
        self.stages = Stages(self)
        self.events = Events(self)
        self.tags = Tags(self)
        self.outputs = Outputs(self)
        self.metrics = Metrics(self)
        self.params = Params(self)
        self.sink_cursors = SinkCursors(self)
        self.models = Models(self, model_taken or (lambda name, version: False))
        self.exports = Exports(self)
        self.aliases = Aliases(self)
        self.registrations = Registrations(self)
        self.sweeps = Sweeps(self)
        self.attempts = Attempts(self)
        size = check_regular_file(self.path)
        if size == 0 and self._has_records():  # before SQLite writes a header into it
            raise self._lost()
        self._upgrade(size is not None)

    def _upgrade(self, existed: bool = True) -> None:
        """Take the schema steps the file lacks (all of them for a new one), in one write
        transaction taken patiently: several commands may open a new workspace at the same
        moment. Refuses (DamagedHistory) a database of another program, or an empty one where
        runs exist; (UserError) a newer expkit's."""
        db = self.db
        (app_id,) = db.execute("PRAGMA application_id").fetchone()
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version == schema.latest() and app_id == APPLICATION_ID:
            return  # the usual case: a read, no write lock
        check_version(self.path, version)
        if version == 0 and app_id == 0 and existed:
            self._check_empty()

        def upgrade() -> None:
            with self.transaction() as db:
                (now,) = db.execute("PRAGMA application_id").fetchone()
                if now not in (0, APPLICATION_ID):  # another program's, since the check
                    raise not_ours(self.path, f"application_id {now}")
                (version,) = db.execute("PRAGMA user_version").fetchone()
                check_version(self.path, version)  # a newer expkit's, since the check
                if version < schema.latest():
                    schema.upgrade(db, version)
                if now != APPLICATION_ID:
                    db.execute(f"PRAGMA application_id={APPLICATION_ID}")

        try:
            patiently(upgrade)
        except sqlite3.OperationalError as error:
            code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
            opened_read_only = getattr(db, "no_room", False) and code == sqlite3.SQLITE_READONLY
            if not (no_room(error) or opened_read_only):
                raise
            doing = (
                f"this expkit must upgrade the history (version {version} to {schema.latest()})"
                if existed
                else "the history cannot be created"
            )
            raise UserError(
                f"{shown_path(self.path)}: {doing}, and the disk holding it is full; free some "
                "space and run the command again"
            ) from None

    def _check_empty(self) -> None:
        """Raise DamagedHistory for a database with no tables in a workspace with runs."""
        present = self.db.execute("SELECT 1 FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        if present.fetchone() is None and self._has_records():
            raise self._lost()

    def _lost(self) -> DamagedHistory:
        return DamagedHistory(
            f"{shown_path(self.path)} is empty, but the workspace holds runs or models: "
            "its history is lost; restore history.db from a backup, or move it aside and "
            "run `expkit init` for a new, empty history (the files of the old runs and "
            "models stay, and new ones never reuse their folders)"
        )

    # -- connections ------------------------------------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection (opened at first use); reads run outside transactions."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on error)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """One consistent read: BEGIN (deferred) ... COMMIT, so that every query inside sees
        the database as it was at the first (one WAL snapshot), whatever a writer commits
        meanwhile (SQLite's "Isolation In SQLite": a read transaction sees one version)."""
        db = self.db
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")

    def close(self) -> None:
        """Close this thread's connection (another use opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- across parts -------------------------------------------------------------------------
    def names_of(self, digest: str) -> list[tuple[str, str, str]]:
        """Every recorded name of the content `digest`: ("run", run id, path in outputs) and
        ("model", "name/version", path in the version), to find a surviving copy."""
        runs = self.db.execute("SELECT run_id, path FROM outputs WHERE sha256 = ?", (digest,))
        found = [("run", run_id, path) for run_id, path in runs]
        models = self.db.execute(
            "SELECT name, version, path FROM model_files WHERE sha256 = ?", (digest,)
        )
        found += [("model", f"{name}/{version}", path) for name, version, path in models]
        return found
