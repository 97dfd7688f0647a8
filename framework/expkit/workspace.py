"""The workspace: a folder (`.expkit/`) holding the run history, the runs and the models.

Found from `--workspace`, then `$EXPKIT_WORKSPACE`, then a `.expkit/config.json` in the current
folder or one of its parents; `expkit init` creates one.
"""

from __future__ import annotations

import json
import os
import time
from functools import cached_property
from pathlib import Path

from expkit.errors import UserError
from expkit.history import History

FOLDER = ".expkit"
CONFIG = "config.json"
ENV = "EXPKIT_WORKSPACE"


class Workspace:
    """An opened workspace folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.config = json.loads((self.path / CONFIG).read_text())

    # -- finding and creating -------------------------------------------------------------------
    @classmethod
    def find(cls, explicit: str | Path | None = None, start: Path | None = None) -> Workspace:
        """The workspace named by the flag or env var, else the nearest one above `start`."""
        named = explicit or os.environ.get(ENV)
        if named:
            folder = _config_folder(Path(named))
            if folder is None:
                origin = "--workspace" if explicit else ENV
                raise UserError(
                    f"{origin}: {named} is not an expkit workspace; create it with "
                    f"`expkit init {named}`"
                )
            return cls(folder)
        here = (start or Path.cwd()).resolve()
        for folder in (here, *here.parents):
            if (folder / FOLDER / CONFIG).is_file():
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
        """Create (or open, if it exists) the workspace `where/.expkit`."""
        where = Path(where)
        folder = where if where.name == FOLDER else where / FOLDER
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # private: see the README
        config = folder / CONFIG
        if not config.exists():
            tmp = folder / f".{CONFIG}.tmp"
            tmp.write_text(json.dumps({"format": 1, "created": time.time()}, indent=2) + "\n")
            tmp.replace(config)
        workspace = cls(folder)
        workspace.history  # noqa: B018 - creates the database
        return workspace

    # -- what it holds ----------------------------------------------------------------------------
    @cached_property
    def history(self) -> History:
        """The run history; opening it marks runs whose driver died as failed."""
        history = History(self.path / "history.db")
        self.recover(history)
        return history

    def recover(self, history: History | None = None) -> list[str]:
        """Mark failed every run whose driver process is gone, stop what it left running, keep
        its outputs and remove its working copy (see expkit.recovery); returns the run ids."""
        from expkit.recovery import recover

        return recover(self, history or self.history)

    def run_dir(self, run_id: str) -> Path:
        return self.path / "runs" / run_id

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


def _config_folder(path: Path) -> Path | None:
    for folder in (path, path / FOLDER):
        if (folder / CONFIG).is_file():
            return folder
    return None
