"""What `expkit run` shows while it works: stage progress, the script's output, a summary.

On a terminal a status line ticks the current stage's elapsed time while nothing else is
printed; piped into a file the output is plain lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from typing import IO, Any

MARK = {"completed": "✓", "failed": "✗", "canceled": "■", "skipped": "·"}


def _supports_color(stream: IO) -> bool:
    return (
        stream.isatty() and os.environ.get("NO_COLOR") is None and os.environ.get("TERM") != "dumb"
    )


class Console:
    """Serializes stage lines, output lines and the ticking status line on one stream."""

    def __init__(self, stream: IO | None = None, ranks: str = "0", quiet: bool = False) -> None:
        self.stream = stream or sys.stdout
        self.ranks = ranks  # "0": rank 0 only; "all": every rank, prefixed; "none": no output
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self.color = _supports_color(self.stream)
        self._lock = threading.Lock()
        self._status = ""
        self._stage: str | None = None
        self._stage_start = 0.0
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self._partial: dict[int, bytes] = {}  # by rank: the start of a line not yet ended
        self._progress = False  # the status line shows a progress bar, not the ticker
        self.gone = False  # the stream's reader has gone: nothing more is written

    # -- styling ------------------------------------------------------------------------------
    def style(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def _mark(self, outcome: str) -> str:
        color = {"completed": "32", "failed": "31", "canceled": "33", "skipped": "2"}
        return self.style(MARK.get(outcome, "?"), color.get(outcome, "0"))

    # -- writing ------------------------------------------------------------------------------
    def _write(self, text: str, status: str | None = None) -> None:
        """Write `text` under the status line (redrawn after it); `status`: its new text."""
        with self._lock:
            if self.gone:
                return
            try:
                if self._status:
                    self.stream.write("\r\033[K")
                self.stream.write(text)
                if status is not None:
                    self._status = status
                if self._status:
                    self.stream.write(self._status)
                self.stream.flush()
            except OSError:  # the terminal or the pipe has gone (a closed SSH session)
                self._lost()

    def _lost(self) -> None:
        """Stop writing to a stream whose reader has gone; the run goes on and is recorded.

        The stream's file descriptor is pointed at /dev/null, so that nothing else (Python's
        own flush at exit included) fails on it."""
        self.gone = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)

    def line(self, text: str = "") -> None:
        self._write(text + "\n")

    def info(self, text: str) -> None:
        if not self.quiet:
            self.line(self.style(text, "2"))

    def warn(self, text: str) -> None:
        self.line(self.style(f"warning: {text}", "33"))

    # -- stages -------------------------------------------------------------------------------
    def stage_started(self, stage: str) -> None:
        self._stage, self._stage_start = stage, time.monotonic()
        if self.tty and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        if not self.quiet:
            self.line(self.style(f"▶ {stage}", "1"))

    def stage_line(self, stage: str, text: str) -> None:
        if not self.quiet:
            self.line(f"  {self.style(stage, '36')} │ {text}")

    def stage_finished(self, stage: str, outcome: str, seconds: float, note: str = "") -> None:
        self.end_output()
        self._stage = None
        self._set_status("")
        if not self.quiet or outcome != "completed":
            tail = f"  {note}" if note else ""
            self.line(f"{self._mark(outcome)} {stage:<13} {human_seconds(seconds):>8}{tail}")

    def _set_status(self, text: str) -> None:
        with self._lock:
            if (self._status or text) and not self.gone:
                try:
                    self.stream.write("\r\033[K" + text)
                    self.stream.flush()
                except OSError:
                    self._lost()
            self._status = text

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            stage = self._stage
            if stage is None:
                continue
            elapsed = time.monotonic() - self._stage_start
            if elapsed >= 1 and not self._progress:
                self._set_status(self.style(f"… {stage} {human_seconds(elapsed)}", "2"))

    def close(self) -> None:
        self._stop.set()
        self._set_status("")

    # -- the script's output ------------------------------------------------------------------
    def output(self, rank: int, line: bytes) -> None:
        """A piece of a rank's output (rank -1: the launcher's): a line, or a piece that ends
        with a carriage return or nothing yet (undecodable bytes are replaced).

        A line is printed whole. On a terminal the latest state of a line still being
        written (a tqdm bar redrawn with "\\r") is shown at once on the status line, and
        replaced by the line when it ends; piped, the line is printed when it ends."""
        if self.ranks == "none" or (self.ranks != "all" and rank > 0):
            return
        data = self._partial.pop(rank, b"") + line
        if not data.endswith(b"\n") and len(data) < PARTIAL_LIMIT:
            self._partial[rank] = data
            if self.tty:
                shown = _last_state(data.decode("utf-8", errors="replace"))
                self._progress = True
                self._write("", status=self._prefixed(rank, shown) if shown else "")
            return
        text = data.decode("utf-8", errors="replace").rstrip("\r\n")
        if self.tty:
            text = _last_state(text)
        status = None
        if self._progress and not self._partial:
            self._progress, status = False, ""
        self._write(self._prefixed(rank, text) + "\n", status=status)

    def end_output(self) -> None:
        """Print the lines still being written (the output ended without a newline)."""
        for rank in list(self._partial):
            self.output(rank, b"\n")

    def _prefixed(self, rank: int, text: str) -> str:
        if rank < 0:  # a launcher's own line (horovodrun, torchrun): always shown
            return f"{self.style('[launcher]', '2')} {text}"
        if self.ranks == "all":
            return f"{self.style(f'[rank {rank}]', '35')} {text}"
        return text

    # -- the end ------------------------------------------------------------------------------
    def table(self, rows: list[tuple[str, Any]]) -> None:
        width = max((len(k) for k, _ in rows), default=0)
        for key, value in rows:
            self.line(f"  {key:<{width}}  {value}")


PARTIAL_LIMIT = 1 << 20  # a line longer than this (bytes) is printed in parts


def _last_state(text: str) -> str:
    """What a terminal shows of a line redrawn with carriage returns: its last non-empty
    part (tqdm's latest bar)."""
    if "\r" not in text:
        return text
    parts = text.replace("\r\n", "\n").split("\r")
    return next((part for part in reversed(parts) if part.strip()), "")


def human_size(n: float) -> str:
    """A size in bytes as people read it: `51 B`, `66.6 KB`, `89.8 MB` (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_seconds(s: float | None) -> str:
    """A duration in seconds, the one way every command shows one: `0.04s`, `7.12s`, `2m56s`,
    `1h02m03s`; "-" for none. Under a minute to the hundredth, from a minute on to the
    second (both rounded)."""
    if s is None:
        return "-"
    if round(s, 2) < 60:
        return f"{max(s, 0.0):.2f}s"
    hours, rest = divmod(round(s), 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02d}s"
    return f"{minutes}m{seconds:02d}s"


HASH_CHARS = 16  # how many hex digits of a hash every command shows


def short_hash(value: str) -> str:
    """A hash as every command shows it: its first HASH_CHARS hex digits, the prefix of a
    hash-named id kept (`sha256:592b6e160872...`, `pip-06a63f72fe8d393d`). The full value
    stays in the history and in `--json`."""
    found = _HASHED.fullmatch(value)
    return f"{found['head']}{found['digest'][:HASH_CHARS]}" if found else value


_HASHED = re.compile(r"(?P<head>(?:[A-Za-z0-9_]+[:-])?)(?P<digest>[0-9a-f]+)")


def count_files(count: int, size: float) -> str:
    """How many files and their size, the one way every command counts them: `4 files,
    89.8 MB` (`1 file, 51 B`)."""
    return f"{count} file{'s' * (count != 1)}, {human_size(size)}"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
