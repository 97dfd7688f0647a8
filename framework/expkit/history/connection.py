"""The SQLite layer under the history: opening the file, refusing one that is not expkit's
history (or is a newer expkit's), naming a damaged file in every error, waiting for locks.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar, cast

from expkit.errors import UserError, shown_path
from expkit.history import schema

BUSY_SECONDS = 60  # how long a command waits for another one's write to end

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


def check_regular_file(path: Path) -> int | None:
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
    history (its tables, application_id 0) or a new, empty one; a UserError when a newer
    expkit made it (`check_version`)."""
    (app_id,) = conn.execute("PRAGMA application_id").fetchone()
    if app_id not in (0, APPLICATION_ID):
        raise not_ours(path, f"application_id {app_id}")
    if app_id == 0:
        present = {
            name
            for (name,) in conn.execute("SELECT name FROM sqlite_master")
            if not name.startswith("sqlite_")
        }
        others = sorted(present - schema.UNMARKED_NAMES)
        if others:
            raise not_ours(path, "tables " + ", ".join(others[:5]))
        if present and "runs" not in present:
            raise not_ours(path, "no runs table")
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    check_version(path, version)


def check_version(path: Path, version: int) -> None:
    """Raise UserError when the history at `path` is at a schema version past the last one
    this expkit knows: an older expkit must not write into a newer one's history."""
    if version > schema.latest():
        raise UserError(
            f"{shown_path(path)}: made by a newer expkit (history version {version}, this "
            f"expkit reads up to {schema.latest()}); upgrade expkit (pip install -U expkit)"
        )


def not_ours(path: Path, what: str) -> DamagedHistory:
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

    def _guarded(self, call: Callable[..., Any], *args: Any) -> Any:
        conn = cast(_Connection, self.connection)
        return _guarded(conn.file, call, *args, no_room=conn.no_room)

    def execute(self, sql: str, parameters: Any = (), /) -> Self:
        return self._guarded(super().execute, sql, parameters)

    def executemany(self, sql: str, rows: Iterable[Any], /) -> Self:
        return self._guarded(super().executemany, sql, rows)

    def executescript(self, script: str, /) -> Self:
        return self._guarded(super().executescript, script)

    def fetchone(self) -> Any:
        return self._guarded(super().fetchone)

    def fetchmany(self, size: int | None = 1) -> list[Any]:
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

    Raises DamagedHistory when the file is not a usable database, UserError when a newer
    expkit made it."""
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


class Owner(Protocol):
    """What a Part needs of the history it belongs to (`expkit.history.store.History`)."""

    @property
    def db(self) -> sqlite3.Connection: ...

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]: ...

    def reading(self) -> AbstractContextManager[sqlite3.Connection]: ...


class Part:
    """One aggregate of the history (its runs, stages, metrics, models...): the queries on its
    tables, over the one connection of the History it belongs to."""

    def __init__(self, history: Owner) -> None:
        self._history = history

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection to the history (reads run outside any transaction)."""
        return self._history.db

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """One atomic write on the history (see `History.transaction`)."""
        return self._history.transaction()

    def reading(self) -> AbstractContextManager[sqlite3.Connection]:
        """One consistent read of the history (see `History.reading`)."""
        return self._history.reading()
