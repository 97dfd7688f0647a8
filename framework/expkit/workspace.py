"""The workspace: a folder (`.expkit/`) holding the run history, the runs and the models.

Found from `--workspace`, then `$EXPKIT_WORKSPACE`, then a `.expkit/config.json` in the current
folder or one of its parents; `expkit init` creates one.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expkit.errors import UserError, printable, shown_path

if TYPE_CHECKING:  # imported when the history is opened: `from expkit import Run` in a
    from expkit.history import History  # training script needs none of it (SQLite, ...)

FOLDER = ".expkit"
CONFIG = "config.json"
ENV = "EXPKIT_WORKSPACE"
MAX_CONFIG_BYTES = 1024 * 1024  # config.json holds a few settings


class Workspace:
    """An opened workspace folder.

    Raises UserError (naming the file and what to do) when its config.json cannot be read
    as a JSON object; a damaged history.db shows when `history` is first used.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.config = read_config(self.path / CONFIG)

    # -- finding and creating -------------------------------------------------------------------
    @classmethod
    def find(cls, explicit: str | Path | None = None, start: Path | None = None) -> Workspace:
        """The workspace named by the flag or env var, else the nearest one above `start`."""
        named = explicit or os.environ.get(ENV)
        if named:
            origin = "--workspace" if explicit else ENV
            shown = printable(str(named))
            try:
                folder = _config_folder(Path(named))
            except OSError as error:  # a name the file system refuses (too long, ...)
                raise UserError(f"{origin}: {shown}: {error.strerror or error}") from None
            if folder is None:
                raise UserError(f"{origin}: {shown} {_not_a_workspace(Path(named), shown)}")
            return cls(folder)
        here = (start or Path.cwd()).resolve()
        for folder in (here, *here.parents):
            if _entry_exists(folder / FOLDER / CONFIG):  # a damaged one is named, not skipped
                return cls(folder / FOLDER)
        raise UserError(
            f"no expkit workspace in {here} or its parents; create one with `expkit init` "
            f"(or name one with --workspace or {ENV})"
        )

    @classmethod
    def from_config(cls, path: str | Path | None = None) -> Workspace:
        """Azure ML's name for `find`: the workspace at `path`, in $EXPKIT_WORKSPACE, or above."""
        return cls.find(path)

    @classmethod
    def init(cls, where: str | Path = ".") -> Workspace:
        """Create (or open, if it exists) the workspace `where/.expkit`. Raises UserError when
        it cannot be made (a file or a link to nothing in the way, no room, a refused name)."""
        where = Path(where)
        folder = where if where.name == FOLDER else where / FOLDER
        try:
            folder = _config_folder(where) or folder  # one there already, maybe via a link
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # private: see the README
            config = folder / CONFIG
            if not os.path.lexists(config):
                write_new_config(config)
        except (OSError, ValueError) as error:  # a refused name, a file in the way, no room
            reason = _in_the_way(where, folder) or getattr(error, "strerror", None) or str(error)
            raise UserError(
                f"{printable(str(folder))}: cannot create a workspace ({reason})"
            ) from None
        workspace = cls(folder)
        workspace.history  # noqa: B018 - creates the database
        return workspace

    # -- what it holds ----------------------------------------------------------------------------
    @cached_property
    def history(self) -> History:
        """The run history; opening it marks runs whose driver died as failed."""
        from expkit.history import History

        history = History(
            self.path / "history.db",
            run_taken=lambda run_id: os.path.lexists(self.run_dir(run_id)),
            model_taken=lambda name, version: os.path.lexists(
                self.models_dir / name / str(version)
            ),
            has_records=self._has_records,
        )
        self.recover(history)
        return history

    def _has_records(self) -> bool:
        """Whether runs/ or models/ hold anything (a workspace that has been used)."""
        for folder in (self.path / "runs", self.models_dir):
            try:
                with os.scandir(folder) as entries:
                    if any(True for _ in entries):
                        return True
            except OSError:
                continue
        return False

    def recover(self, history: History | None = None) -> list[str]:
        """Mark failed every run whose driver process is gone, stop what it left running, keep
        its outputs and remove its working copy (see expkit.recovery); returns the run ids."""
        from expkit.recovery import recover

        return recover(self, history or self.history)

    def run_dir(self, run_id: str) -> Path:
        return self.path / "runs" / run_id

    def sweep_dir(self, sweep_id: str) -> Path:
        """The sweep's own folder: its Optuna study journal and its driver's log."""
        return self.path / "sweeps" / sweep_id

    @property
    def blobs_dir(self) -> Path:
        return self.path / "blobs"

    @property
    def models_dir(self) -> Path:
        return self.path / "models"

    @property
    def envs_dir(self) -> Path:
        return self.path / "envs"

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    def __repr__(self) -> str:
        return f"Workspace({str(self.path)!r})"


def read_config(path: Path) -> dict[str, Any]:
    """The workspace's settings; a UserError naming the file when it is not a regular file
    of at most MAX_CONFIG_BYTES holding a JSON object (never opens a FIFO or a device)."""
    advice = "move it aside and run `expkit init` for a new one, or restore it from a backup"
    try:
        info = os.stat(path)  # before opening: a FIFO blocks, /dev/zero never ends
        if not stat.S_ISREG(info.st_mode) and not stat.S_ISDIR(info.st_mode):  # a folder:
            kind = "not a regular file"  # "cannot be read (Is a directory)" below
            if stat.S_ISFIFO(info.st_mode):
                kind = "a FIFO"
            elif stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
                kind = "a device"
            raise UserError(f"{shown_path(path)} is damaged (it is {kind}); {advice}")
        if info.st_size > MAX_CONFIG_BYTES:
            raise UserError(
                f"{shown_path(path)} is damaged ({info.st_size} bytes, more than a workspace's "
                f"config may be: {MAX_CONFIG_BYTES // 1024} KiB); {advice}"
            )
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise UserError(f"{shown_path(path)} is damaged (it keeps growing); {advice}")
        config = json.loads(data.decode("utf-8"))
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserError(f"{shown_path(path)} cannot be read ({reason}); {advice}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(f"{shown_path(path)} is damaged (not JSON: {reason}); {advice}") from None
    if not isinstance(config, dict):
        kinds = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}
        kind = kinds.get(type(config), "a number")
        raise UserError(
            f"{shown_path(path)} is damaged (it holds {kind}, not a JSON object); {advice}"
        )
    return config


def write_new_config(config: Path) -> None:
    """Create config.json whole, once: the first of several commands creating the same
    workspace at the same moment wins, and no one reads a half-written file."""
    text = json.dumps({"format": 1, "created": time.time()}, indent=2) + "\n"
    tmp = config.with_name(f".{config.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    with open(tmp, "x", encoding="utf-8") as f:
        f.write(text)
    try:
        os.link(tmp, config)  # atomic, and never replaces a config another command made
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links
        if not config.exists():
            os.replace(tmp, config)
    finally:
        tmp.unlink(missing_ok=True)


def _in_the_way(where: Path, folder: Path) -> str | None:
    """Why `folder` cannot be made in plain words, when a file or a link to nothing is in
    the way (mkdir says "Not a directory" or "File exists"); None otherwise."""
    for path in (where, folder):
        if os.path.islink(path) and not os.path.exists(path):
            try:
                target = printable(os.readlink(path))
            except OSError:
                target = "a missing folder"
            return f"{printable(str(path))} is a link to {target}, which does not exist"
        if os.path.lexists(path) and not os.path.isdir(path):
            return f"{printable(str(path))} is a file; name a folder"
    return None


def _not_a_workspace(path: Path, shown: str) -> str:
    """What to say of a named `path` that holds no workspace, with what to do: `expkit init`
    where that would make one, never where it cannot (a file, a link to nothing)."""
    if os.path.islink(path) and not path.exists():
        target = printable(os.readlink(path))
        return (
            f"is a link to {target}, which does not exist; name the workspace's folder, or "
            f"create it with `expkit init {target}`"
        )
    if path.exists() and not path.is_dir():
        return (
            "is a file, not an expkit workspace; name the folder that holds .expkit/ (or "
            "the .expkit/ folder itself)"
        )
    return f"is not an expkit workspace; create it with `expkit init {shown}`"


def _config_folder(path: Path) -> Path | None:
    """The workspace folder a named `path` means: `path/.expkit`, else `path` itself when it
    is one (named .expkit, or holding a history.db as a workspace copied under another name
    does); None when neither. A `config.json` of the user's own (a project folder's) never
    makes a folder a workspace: expkit would write its history.db there."""
    if _entry_exists(path / FOLDER / CONFIG):  # of any kind: a damaged config is named
        return path / FOLDER
    if not _entry_exists(path / CONFIG):
        return None
    names = {path.name, Path(os.path.realpath(path)).name}
    if FOLDER in names or _entry_exists(path / "history.db"):
        return path
    return None


def _entry_exists(path: Path) -> bool:
    """Whether there is an entry of any kind at `path` (a dangling link too); OSError for a
    name the file system refuses (too long, ...)."""
    try:
        os.lstat(path)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # as Path.is_file
            return False
        raise
    return True
