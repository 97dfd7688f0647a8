"""The run history: one SQLite database (WAL) that is the source of truth for every run.

Every state change is its own committed transaction, written before the next stage starts, so
a crash, a kill -9 or a full disk leaves a record that can be read and, once its driver is
gone, is marked failed with that reason (`reap_orphans`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from expkit.errors import UserError, shown_path

STAGES = ("prepare", "scale", "run", "post-process", "register")
STAGE_STATE = {
    "prepare": "preparing",
    "scale": "scaling",
    "run": "running",
    "post-process": "post-processing",
    "register": "registering",
}
FINAL_STATES = ("completed", "failed", "canceled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    number INTEGER NOT NULL UNIQUE,
    experiment TEXT NOT NULL,
    state TEXT NOT NULL,
    status TEXT,
    job TEXT NOT NULL,
    created REAL NOT NULL,
    ended REAL,
    exit_code INTEGER,
    error TEXT,
    snapshot_hash TEXT,
    environment_hash TEXT,
    driver_pid INTEGER,
    driver_start TEXT,
    driver_host TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_experiment ON runs (experiment, number);
CREATE TABLE IF NOT EXISTS stages (
    run_id TEXT NOT NULL, stage TEXT NOT NULL, state TEXT NOT NULL,
    started REAL, ended REAL, message TEXT,
    PRIMARY KEY (run_id, stage)
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL, ts REAL NOT NULL, stage TEXT, kind TEXT NOT NULL, message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, ts);
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL, name TEXT NOT NULL, step INTEGER,
    value REAL, payload TEXT, ts REAL NOT NULL, rank INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS metrics_by_run ON metrics (run_id, name, id);
CREATE TABLE IF NOT EXISTS tags (
    run_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (run_id, key)
);
CREATE TABLE IF NOT EXISTS outputs (
    run_id TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (run_id, path)
);
CREATE TABLE IF NOT EXISTS slots (
    kind TEXT NOT NULL, slot INTEGER NOT NULL, run_id TEXT NOT NULL, PRIMARY KEY (kind, slot)
);
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL, version INTEGER NOT NULL, run_id TEXT, created REAL NOT NULL,
    lineage TEXT NOT NULL, tags TEXT NOT NULL, PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS model_files (
    name TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL,
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (name, version, path)
);
CREATE TABLE IF NOT EXISTS exports (
    id INTEGER PRIMARY KEY, run_id TEXT, model TEXT, version INTEGER, format TEXT NOT NULL,
    ok INTEGER NOT NULL, message TEXT NOT NULL, checks TEXT NOT NULL, files TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS exports_by_run ON exports (run_id);
CREATE TABLE IF NOT EXISTS output_links (
    run_id TEXT NOT NULL, path TEXT NOT NULL, target TEXT NOT NULL, PRIMARY KEY (run_id, path)
);
"""
# What SCHEMA creates: when all of it is there, opening the history writes nothing.
SCHEMA_NAMES = frozenset(re.findall(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", SCHEMA))
BUSY_SECONDS = 60  # how long a command waits for another one's write to end


# A model version exists only for a run that completed: one that a run's register stage made
# is hidden by the very transaction that ends the run otherwise (a signal or a kill -9 during
# register, reaped at the next open; a failing registry plugin), and its number is never given
# again. Versions registered later from a finished run (the Python API) are not affected.
VISIBLE = (
    "NOT EXISTS (SELECT 1 FROM runs WHERE runs.id = models.run_id"
    " AND runs.state IN ('failed', 'canceled') AND runs.ended >= models.created)"
)


@dataclass
class RunRecord:
    """One row of the run history."""

    id: str
    number: int
    experiment: str
    state: str
    status: str | None
    job: dict[str, Any]
    created: float
    ended: float | None
    exit_code: int | None
    error: str | None
    snapshot_hash: str | None
    environment_hash: str | None
    driver_pid: int | None
    driver_start: str | None
    driver_host: str | None
    cancel_requested: int

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> RunRecord:
        values = dict(row)
        values["job"] = json.loads(values["job"])
        return cls(**values)


@dataclass
class StageRecord:
    stage: str
    state: str
    started: float | None
    ended: float | None
    message: str | None

    @property
    def seconds(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.time()) - self.started


def process_start(pid: int) -> str | None:
    """The start time of live process `pid` (Linux clock ticks), to tell it from a reused pid.

    None when there is no such process, or only its zombie is left.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == b"Z" else fields[19].decode()


def driver_alive(pid: int | None, start: str | None) -> bool:
    if not pid:
        return False
    if os.path.exists("/proc/self/stat"):
        return start is not None and process_start(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# SQLite's codes for "no room": the disk is full, or WAL's shared-memory file cannot grow.
NO_ROOM_CODES = (13, 4618, 4874)  # SQLITE_FULL, SQLITE_IOERR_SHMOPEN, SQLITE_IOERR_SHMSIZE


def no_room(error: BaseException) -> bool:
    """True when a SQLite error says the disk holding the database is full."""
    return isinstance(error, sqlite3.OperationalError) and (
        getattr(error, "sqlite_errorcode", None) in NO_ROOM_CODES or "disk is full" in str(error)
    )


# -- opening the database -----------------------------------------------------------------------
# Marks expkit's history in the SQLite header (PRAGMA application_id): "EXKT". A database with
# expkit's tables and 0 there is an older expkit workspace's, marked when next opened.
APPLICATION_ID = 0x45584B54


def _check_regular_file(path: Path) -> int | None:
    """The size of the file at `path` in bytes, None when there is none; DamagedHistory when
    it is not a regular file (a FIFO, a device, a link to /dev/null), found without opening
    it (opening a FIFO blocks)."""
    import stat

    try:
        mode = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DamagedHistory(
                f"{shown_path(path)} is a link to a missing file; remove the link, then restore "
                "history.db from a backup or run `expkit init` for a new, empty history"
            ) from None
        return None
    except OSError as error:
        reason = error.strerror or str(error)
        raise DamagedHistory(f"{shown_path(path)} cannot be opened ({reason})") from None
    if stat.S_ISREG(mode.st_mode):
        return mode.st_size
    if stat.S_ISDIR(mode.st_mode):
        return None  # SQLite says "unable to open": named as before
    fifo = stat.S_ISFIFO(mode.st_mode)
    device = stat.S_ISCHR(mode.st_mode) or stat.S_ISBLK(mode.st_mode)
    kind = "a FIFO" if fifo else "a device" if device else "not a regular file"
    raise DamagedHistory(
        f"{shown_path(path)} is {kind}, not a database file; move it aside and run "
        "`expkit init` for a new, empty history, or restore it from a backup"
    )


def _check_ours(conn: sqlite3.Connection, path: Path) -> None:
    """Raise DamagedHistory unless the database is expkit's history, an older expkit
    history (its tables, application_id 0) or a new, empty one."""
    (app_id,) = conn.execute("PRAGMA application_id").fetchone()
    if app_id not in (0, APPLICATION_ID):
        raise _not_ours(path, f"application_id {app_id}")
    if app_id == APPLICATION_ID:
        return
    present = {
        name
        for (name,) in conn.execute("SELECT name FROM sqlite_master")
        if not name.startswith("sqlite_")
    }
    others = sorted(present - SCHEMA_NAMES)
    if others:
        raise _not_ours(path, "tables " + ", ".join(others[:5]))
    if present and "runs" not in present:
        raise _not_ours(path, "no runs table")


def _not_ours(path: Path, what: str) -> DamagedHistory:
    return DamagedHistory(
        f"{shown_path(path)} is not an expkit history (it is a SQLite database with {what}); "
        "it was left as it is: restore expkit's history.db from a backup, or move this one "
        "aside and run `expkit init` for a new, empty history"
    )


# SQLite's primary result codes (sqlite3.h) for a file that cannot serve as the history.
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 5, 6, 8
_SQLITE_CORRUPT, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 11, 14, 26


class DamagedHistory(UserError):
    """The history database file cannot be used: damaged, not a database, or not openable.

    One line naming the file and what to do (exit 2), instead of SQLite's bare error at
    whichever query first reads the bad page.
    """


def damage(path: Path, error: sqlite3.Error, no_room: bool = False) -> DamagedHistory | None:
    """`error` as a DamagedHistory naming `path`, or None for an error of another kind
    (a busy database, a full disk, a bug in a query), which keeps its own type. On a
    connection opened read-only because the disk is full (`no_room`), "read-only" is that,
    not a damaged file."""
    code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
    if no_room and code == _SQLITE_READONLY:
        return None
    shown = shown_path(path)
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return DamagedHistory(
            f"{shown} is damaged ({error}); move it aside and run `expkit init` for a new, "
            "empty history (the files of runs and models stay, and new ones never reuse "
            "their folders), or restore it from a backup"
        )
    if code == _SQLITE_CANTOPEN:
        return DamagedHistory(
            f"{shown} cannot be opened ({error}); it must be a file you can read and write, "
            "in a folder you can write"
        )
    if code == _SQLITE_READONLY:
        return DamagedHistory(
            f"{shown} cannot be written ({error}); make it and its folder writable"
        )
    return None


_T = TypeVar("_T")


def _guarded(path: Path, call: Callable[..., _T], *args: Any, no_room: bool = False) -> _T:
    try:
        return call(*args)
    except sqlite3.DatabaseError as error:
        translated = damage(path, error, no_room)
        if translated is None:
            raise
        raise translated from error


class _Cursor(sqlite3.Cursor):
    """A cursor whose damaged-file errors name the file: SQLite reads pages as a query needs
    them, so a truncated or overwritten file may fail at any fetch, not only when opened."""

    def _guarded(self, call: Callable[..., _T], *args: Any) -> _T:
        conn = self.connection
        return _guarded(conn.file, call, *args, no_room=conn.no_room)

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        return self._guarded(super().execute, sql, parameters)

    def executemany(self, sql: str, rows: Iterable[Any], /) -> _Cursor:
        return self._guarded(super().executemany, sql, rows)

    def executescript(self, script: str, /) -> _Cursor:
        return self._guarded(super().executescript, script)

    def fetchone(self) -> Any:
        return self._guarded(super().fetchone)

    def fetchmany(self, size: int = 1) -> list[Any]:
        return self._guarded(super().fetchmany, size)

    def fetchall(self) -> list[Any]:
        return self._guarded(super().fetchall)

    def __next__(self) -> Any:
        return self._guarded(super().__next__)


class _Connection(sqlite3.Connection):
    """A connection to the history whose every query runs on a `_Cursor`."""

    file: Path
    no_room = False  # opened read-only (immutable) because the disk is full

    def cursor(self, factory: Any = _Cursor) -> Any:
        return super().cursor(factory)

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, rows: Iterable[Any], /) -> Any:
        return self.cursor().executemany(sql, rows)

    def executescript(self, script: str, /) -> Any:
        return self.cursor().executescript(script)


def patiently(call: Callable[..., _T], *args: Any, seconds: float = BUSY_SECONDS) -> _T:
    """`call(*args)`, tried again while another connection holds the lock it needs.

    SQLite's busy timeout does not cover every lock: switching a new database to WAL, or
    taking the write lock while another command does the same, can fail at once with
    "database is locked". Many commands opening a new workspace at the same moment hit it.
    """
    deadline = time.monotonic() + seconds
    pause = 0.005
    while True:
        try:
            return call(*args)
        except sqlite3.OperationalError as error:
            code = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
            locked = code in (_SQLITE_BUSY, _SQLITE_LOCKED) or "locked" in str(error)
            if not locked or time.monotonic() > deadline:
                raise
        import random  # only when waiting: start-up stays light

        time.sleep(pause * (0.5 + random.random()))  # apart, so that they do not retry in step
        pause = min(pause * 2, 0.2)


def connect(path: Path) -> sqlite3.Connection:
    """A connection to the history database at `path` (WAL, autocommit, Row results).

    Raises DamagedHistory when the file is not a usable database."""
    conn = _guarded(
        path,
        lambda: sqlite3.connect(
            path, timeout=BUSY_SECONDS, isolation_level=None, factory=_Connection
        ),
    )
    conn.file = path
    conn.row_factory = sqlite3.Row
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_SECONDS * 1000}")
        _check_ours(conn, path)  # before anything writes: another program's file stays as it is
        patiently(conn.execute, "PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.OperationalError as error:
        conn.close()
        if not no_room(error) or not Path(path).is_file():
            raise
        return _read_only(path)
    except BaseException:
        conn.close()
        raise
    return conn


def _read_only(path: Path) -> sqlite3.Connection:
    """On a full disk, where WAL cannot set up its shared memory: the database as the last
    writer left it, read-only. Reading never needs room; every write fails with "attempt to
    write a readonly database" (SQLITE_READONLY), which callers treat as no room."""
    uri = f"{Path(path).resolve().as_uri()}?immutable=1"
    conn = sqlite3.connect(
        uri, uri=True, timeout=BUSY_SECONDS, isolation_level=None, factory=_Connection
    )
    conn.file, conn.no_room = path, True
    conn.row_factory = sqlite3.Row
    return conn


class History:
    """Reads and writes the run history database; safe to share between threads.

    Raises DamagedHistory (a UserError naming the file) when the file is not a usable
    database, whether that shows when it is opened or at a later query.
    """

    def __init__(
        self,
        path: Path,
        *,
        run_taken: Callable[[str], bool] | None = None,
        model_taken: Callable[[str, int], bool] | None = None,
        has_records: Callable[[], bool] | None = None,
    ) -> None:
        """Open (creating if needed) the history at `path`.

        `run_taken(run_id)` and `model_taken(name, version)` say whether a folder of that
        run or model version already exists: new ids skip those, so that a history that lost
        rows never lays a new run or version over an old one's files. `has_records()` says
        whether the workspace holds runs or models: an empty database file there is a lost
        history, refused, not a new one. Raises DamagedHistory."""
        self.path = Path(path)
        self._run_taken = run_taken or (lambda run_id: False)
        self._model_taken = model_taken or (lambda name, version: False)
        self._has_records = has_records or (lambda: False)
        self._local = threading.local()
        size = _check_regular_file(self.path)
        if size == 0 and self._has_records():  # before SQLite writes a header into it
            raise self._lost()
        self._create_schema(size is not None)

    def _create_schema(self, existed: bool = True) -> None:
        """Create what SCHEMA names and the file lacks, in one write transaction taken
        patiently: several commands may open a new workspace at the same moment. Refuses
        (DamagedHistory) a database of another program, or an empty one where runs exist."""
        db = self.db
        present = {
            name
            for (name,) in db.execute("SELECT name FROM sqlite_master")
            if not name.startswith("sqlite_")
        }
        (app_id,) = db.execute("PRAGMA application_id").fetchone()
        if present >= SCHEMA_NAMES and app_id == APPLICATION_ID:
            return  # the usual case: a read, no write lock
        self._check_empty(present, app_id, existed)

        def create() -> None:
            with self.transaction() as db:
                (now,) = db.execute("PRAGMA application_id").fetchone()
                if now not in (0, APPLICATION_ID):  # another program's, since the check
                    raise _not_ours(self.path, f"application_id {now}")
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA application_id={APPLICATION_ID}")

        patiently(create)

    def _check_empty(self, present: set[str], app_id: int, existed: bool) -> None:
        """Raise DamagedHistory for a database with no tables in a workspace with runs."""
        if not present and app_id == 0 and existed and self._has_records():
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

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- runs -------------------------------------------------------------------------------
    def create_run(self, experiment: str, job: dict[str, Any]) -> RunRecord:
        """A new run in state `queued`, owned by this process until a driver claims it; its
        number is past every recorded one and every run folder found (`run_taken`)."""
        with self.transaction() as db:
            (number,) = db.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM runs").fetchone()
            while self._run_taken(f"{experiment}_{number}"):  # a run the history lost
                number += 1
            run_id = f"{experiment}_{number}"
            pid = os.getpid()
            db.execute(
                "INSERT INTO runs (id, number, experiment, state, job, created, driver_pid,"
                " driver_start, driver_host) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                (
                    run_id,
                    number,
                    experiment,
                    json.dumps(job),
                    time.time(),
                    pid,
                    process_start(pid),
                    socket.gethostname(),
                ),
            )
        return self.run(run_id)

    def claim(self, run_id: str, pid: int | None = None) -> None:
        """Record `pid` (default: this process) as the run's driver."""
        pid = pid or os.getpid()
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET driver_pid = ?, driver_start = ?, driver_host = ? WHERE id = ?",
                (pid, process_start(pid), socket.gethostname(), run_id),
            )

    def run(self, run_id: str) -> RunRecord:
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(run_id)
        return RunRecord.from_row(row)

    def find_run(self, ref: str) -> RunRecord | None:
        """A run by id, by number (`7`), or `latest`."""
        if ref == "latest":
            row = self.db.execute("SELECT * FROM runs ORDER BY number DESC LIMIT 1").fetchone()
        elif ref.isdigit():
            row = self.db.execute("SELECT * FROM runs WHERE number = ?", (int(ref),)).fetchone()
        else:
            row = self.db.execute("SELECT * FROM runs WHERE id = ?", (ref,)).fetchone()
        return RunRecord.from_row(row) if row else None

    def runs(self, experiment: str | None = None, limit: int = 50) -> list[RunRecord]:
        sql, args = "SELECT * FROM runs", []
        if experiment:
            sql, args = sql + " WHERE experiment = ?", [experiment]
        rows = self.db.execute(sql + " ORDER BY number DESC LIMIT ?", (*args, limit))
        return [RunRecord.from_row(r) for r in rows]

    def update_run(self, run_id: str, **fields: Any) -> None:
        columns = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE runs SET {columns} WHERE id = ?", (*fields.values(), run_id))

    def finish_run(self, run_id: str, state: str, error: str | None = None) -> None:
        assert state in FINAL_STATES
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET state = ?, error = COALESCE(?, error), status = NULL, ended = ?"
                " WHERE id = ?",
                (state, error, time.time(), run_id),
            )
            db.execute("DELETE FROM slots WHERE run_id = ?", (run_id,))

    def request_cancel(self, run_id: str) -> None:
        self.update_run(run_id, cancel_requested=1)

    def cancel_requested(self, run_id: str) -> bool:
        row = self.db.execute("SELECT cancel_requested FROM runs WHERE id = ?", (run_id,))
        return bool(row.fetchone()[0])

    # -- stages -----------------------------------------------------------------------------
    def stage_started(self, run_id: str, stage: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO stages VALUES (?, ?, 'running', ?, NULL, NULL)",
                (run_id, stage, time.time()),
            )
            db.execute(
                "UPDATE runs SET state = ?, status = NULL WHERE id = ?",
                (STAGE_STATE[stage], run_id),
            )

    def stage_finished(self, run_id: str, stage: str, outcome: str, message: str | None) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE stages SET state = ?, ended = ?, message = ?"
                " WHERE run_id = ? AND stage = ?",
                (outcome, time.time(), message, run_id, stage),
            )

    def stage_skipped(self, run_id: str, stage: str, reason: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO stages VALUES (?, ?, 'skipped', NULL, NULL, ?)",
                (run_id, stage, reason),
            )

    def stages(self, run_id: str) -> list[StageRecord]:
        rows = self.db.execute(
            "SELECT stage, state, started, ended, message FROM stages WHERE run_id = ?", (run_id,)
        ).fetchall()
        order = {s: i for i, s in enumerate(STAGES)}
        return sorted((StageRecord(**dict(r)) for r in rows), key=lambda s: order[s.stage])

    # -- events, tags, outputs ----------------------------------------------------------------
    def add_event(self, run_id: str, kind: str, message: str, stage: str | None = None) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                (run_id, time.time(), stage, kind, message),
            )

    def events(self, run_id: str, kind: str | None = None) -> list[sqlite3.Row]:
        sql, args = "SELECT * FROM events WHERE run_id = ?", [run_id]
        if kind:
            sql, args = sql + " AND kind = ?", [*args, kind]
        return self.db.execute(sql + " ORDER BY ts", args).fetchall()

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO tags VALUES (?, ?, ?)",
                [(run_id, str(k), str(v)) for k, v in tags.items()],
            )

    def tags(self, run_id: str) -> dict[str, str]:
        rows = self.db.execute("SELECT key, value FROM tags WHERE run_id = ?", (run_id,))
        return dict(rows.fetchall())

    def set_outputs(
        self,
        run_id: str,
        manifest: dict[str, tuple[int, str]],
        links: dict[str, str] | None = None,
    ) -> None:
        """Record the run's sealed outputs (path -> (size, sha256)), and with `links` the links
        found in outputs/ that were recorded, not stored (path -> target; "." is outputs/
        itself). Without `links`, the recorded links stay as they are."""
        with self.transaction() as db:
            db.execute("DELETE FROM outputs WHERE run_id = ?", (run_id,))
            db.executemany(
                "INSERT INTO outputs VALUES (?, ?, ?, ?)",
                [(run_id, p, size, digest) for p, (size, digest) in manifest.items()],
            )
            if links is not None:
                db.execute("DELETE FROM output_links WHERE run_id = ?", (run_id,))
                db.executemany(
                    "INSERT INTO output_links VALUES (?, ?, ?)",
                    [(run_id, p, target) for p, target in links.items()],
                )

    def outputs(self, run_id: str) -> dict[str, tuple[int, str]]:
        rows = self.db.execute(
            "SELECT path, size, sha256 FROM outputs WHERE run_id = ? ORDER BY path", (run_id,)
        )
        return {p: (size, digest) for p, size, digest in rows}

    def output_links(self, run_id: str) -> dict[str, str]:
        """The links in the run's outputs that were recorded, not stored: path -> target."""
        rows = self.db.execute(
            "SELECT path, target FROM output_links WHERE run_id = ? ORDER BY path", (run_id,)
        )
        return dict(rows.fetchall())

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

    # -- metrics ----------------------------------------------------------------------------
    def add_metrics(self, run_id: str, rows: Iterable[tuple]) -> None:
        """Append (name, step, value, payload, ts, rank) rows in one transaction."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO metrics (run_id, name, step, value, payload, ts, rank)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                ((run_id, *row) for row in rows),
            )

    def metrics(
        self, run_id: str, name: str | None = None, after_id: int = 0, limit: int = -1
    ) -> list[sqlite3.Row]:
        sql = "SELECT * FROM metrics WHERE run_id = ? AND id > ?"
        args: list[Any] = [run_id, after_id]
        if name:
            sql, args = sql + " AND name = ?", [*args, name]
        return self.db.execute(sql + " ORDER BY id LIMIT ?", (*args, limit)).fetchall()

    def latest_metrics(self, run_id: str) -> dict[str, Any]:
        """The last value of each metric, in the order the names were first logged."""
        rows = self.db.execute(
            "SELECT name, value, payload FROM metrics WHERE id IN"
            " (SELECT MAX(id) FROM metrics WHERE run_id = ? GROUP BY name)"
            " ORDER BY (SELECT MIN(id) FROM metrics m"
            " WHERE m.run_id = ? AND m.name = metrics.name)",
            (run_id, run_id),
        )
        return {r["name"]: metric_value(r) for r in rows}

    # -- slots (the local compute target's leases) ----------------------------------------------
    def lease_slots(
        self, run_id: str, wants: dict[str, tuple[int, int]]
    ) -> dict[str, list[int]] | None:
        """Take slots for every kind at once, {kind: (count, capacity)}, or None if not free."""
        chosen: dict[str, list[int]] = {}
        with self.transaction() as db:
            for kind, (count, capacity) in wants.items():
                rows = db.execute("SELECT slot FROM slots WHERE kind = ?", (kind,))
                taken = {s for (s,) in rows}
                free = [s for s in range(capacity) if s not in taken]
                if len(free) < count:
                    return None  # the transaction commits nothing
                chosen[kind] = free[:count]
            db.executemany(
                "INSERT INTO slots VALUES (?, ?, ?)",
                [(kind, s, run_id) for kind, slots in chosen.items() for s in slots],
            )
        return chosen

    def slot_holders(self, kind: str) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT run_id, COUNT(*) FROM slots WHERE kind = ? GROUP BY run_id", (kind,)
        )
        return dict(rows.fetchall())

    def release_slots(self, run_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM slots WHERE run_id = ?", (run_id,))

    # -- recovery ---------------------------------------------------------------------------
    def reap_orphans(self) -> list[str]:
        """Mark failed every unfinished run of this host whose driver process is gone."""
        host = socket.gethostname()
        reaped = []
        rows = self.db.execute(
            "SELECT id, driver_pid, driver_start FROM runs"
            " WHERE state NOT IN ('completed', 'failed', 'canceled') AND driver_host = ?",
            (host,),
        ).fetchall()
        for run_id, pid, start in rows:
            if driver_alive(pid, start):
                continue
            reason = f"the driver process (pid {pid}) ended without finishing the run"
            now = time.time()
            with self.transaction() as db:
                state = db.execute("SELECT state FROM runs WHERE id = ?", (run_id,)).fetchone()
                if state[0] in FINAL_STATES:  # finished meanwhile
                    continue
                db.execute(
                    "UPDATE stages SET state = 'failed', ended = ?, message = ?"
                    " WHERE run_id = ? AND state = 'running'",
                    (now, reason, run_id),
                )
                db.execute(
                    "UPDATE runs SET state = 'failed', error = ?, status = NULL, ended = ?"
                    " WHERE id = ?",
                    (reason, now, run_id),
                )
                db.execute("DELETE FROM slots WHERE run_id = ?", (run_id,))
            reaped.append(run_id)
        return reaped

    # -- models -----------------------------------------------------------------------------
    def add_model_version(
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
                "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?)",
                (name, version, run_id, time.time(), json.dumps(lineage), json.dumps(tags)),
            )
            db.executemany(
                "INSERT INTO model_files VALUES (?, ?, ?, ?, ?)",
                [(name, version, p, digest, size) for p, (size, digest) in files.items()],
            )
        return version

    def models(self, name: str | None = None) -> list[sqlite3.Row]:
        """The visible model versions (see `VISIBLE`), of `name` or of every model."""
        sql, args = f"SELECT * FROM models WHERE {VISIBLE}", []
        if name:
            sql, args = sql + " AND name = ?", [name]
        return self.db.execute(sql + " ORDER BY name, version", args).fetchall()

    def model(self, name: str, version: int | None = None) -> sqlite3.Row | None:
        """Version `version` of model `name` (default: the latest), if it is visible."""
        sql, args = f"SELECT * FROM models WHERE {VISIBLE} AND name = ?", [name]
        if version is None:
            sql += " ORDER BY version DESC LIMIT 1"
        else:
            sql, args = sql + " AND version = ?", [*args, version]
        return self.db.execute(sql, args).fetchone()

    def add_model_files(
        self, name: str, version: int, files: dict[str, tuple[int, str]], lineage: dict[str, Any]
    ) -> None:
        """Add files (exports made later) to an existing version, with its updated lineage."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO model_files VALUES (?, ?, ?, ?, ?)",
                [(name, version, p, digest, size) for p, (size, digest) in files.items()],
            )
            db.execute(
                "UPDATE models SET lineage = ? WHERE name = ? AND version = ?",
                (json.dumps(lineage), name, version),
            )

    def model_files(self, name: str, version: int) -> dict[str, tuple[int, str]]:
        rows = self.db.execute(
            "SELECT path, size, sha256 FROM model_files WHERE name = ? AND version = ?"
            " ORDER BY path",
            (name, version),
        )
        return {p: (size, digest) for p, size, digest in rows}

    # -- exports ----------------------------------------------------------------------------
    def add_export(self, export: ExportRecord) -> None:
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

    def exports(
        self, run_id: str | None = None, model: str | None = None, version: int | None = None
    ) -> list[ExportRecord]:
        """Exports of a run (made in its post-process or later), or of a model version."""
        if model is not None:
            sql, args = "model = ? AND version = ?", [model, version]
        else:
            sql, args = "run_id = ? AND model IS NULL", [run_id]
        rows = self.db.execute(f"SELECT * FROM exports WHERE {sql} ORDER BY id", args)
        return [ExportRecord.from_row(row) for row in rows]


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


def metric_value(row: sqlite3.Row) -> Any:
    """A stored metric's value: the number, or the decoded payload (strings, table rows)."""
    return json.loads(row["payload"]) if row["payload"] is not None else row["value"]
