"""Errors a user can act on, and errors raised inside plugins, each with one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class UserError(Exception):
    """Bad input from the user (job spec, flag, name): one line, exit code 2, no traceback."""

    exit_code = 2


class JobSpecError(UserError):
    """A job spec that cannot be used; names the file and the field path."""

    def __init__(self, source: str, field: str, reason: str) -> None:
        self.source, self.field, self.reason = source, field, reason
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {reason}")


class PluginUnavailable(ImportError):
    """Raised by a plugin module at import time when an optional dependency is missing.

    The message is shown by `expkit plugins` as the reason, so say how to install it.
    """


class PluginError(Exception):
    """An exception raised inside a plugin, reported as `plugin X, hook Y: message`, on one
    line (the lines of a message that has several are joined with "; ")."""

    def __init__(self, plugin: str, hook: str, error: BaseException) -> None:
        self.plugin, self.hook, self.error = plugin, hook, error
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        message = "; ".join(lines) or type(error).__name__
        super().__init__(f"plugin {plugin}, {hook}: {message}")


class StageFailed(Exception):
    """A stage could not finish (the script failed, a timeout, no outputs); one-line reason."""


class Interrupted(StageFailed):
    """The attempt ended without its script failing on its own: `outcome` is "preempted",
    "node_failure" or "time_limit" (expkit.stages.AttemptOutcome), which `retry.on` may name
    as retryable. Raised by a compute target's `execute` (Slurm's PREEMPTED, NODE_FAIL,
    TIMEOUT; the local runner at the job's `timeout`); a StageFailed, so that code that does
    not know attempts fails the run with its message."""

    def __init__(self, outcome: str, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.outcome, self.exit_code = outcome, exit_code


class Canceled(Exception):
    """The run was canceled (Ctrl-C, SIGTERM or `expkit runs cancel`)."""


class Detached(BaseException):
    """The driver lets go of a run whose job goes on without it: the terminal closed (SIGHUP)
    while a cluster job runs, or the service that runs it cannot be reached to follow it. The
    run stays unfinished, its job id recorded (`RunContext.set_remote_job`), and a later
    expkit command re-attaches (`ComputeTarget.reattach`). A BaseException, so that a
    target's `except Exception` never takes it for a failure and cancels the job."""


class NoSpace(UserError):
    """The disk filled up and not even the run's record could be written: one line, exit 1."""

    exit_code = 1


def shown_path(path: str | Path) -> str:
    """`path` as an error message shows it: relative to the current folder when inside it
    (`.expkit/history.db`), else absolute."""
    path = Path(path)
    try:  # the folder resolved, not a link's target: `.expkit/history.db`, not `/dev/null`
        return str((path.parent.resolve() / path.name).relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def printable(text: str, limit: int = 120) -> str:
    """`text` as part of a one-line message: control characters escaped, cut at `limit`."""
    shown = text if text.isprintable() else repr(text)[1:-1]
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def quoted(value: Any, limit: int = 80) -> str:
    """A value as a message quotes it: its repr on one short line, whatever its size."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested too deep, a number too long to print
        text = f"<{type(value).__name__}>"
    return printable(text, limit)
