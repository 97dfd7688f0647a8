"""Cutting a process's output into what the console shows as it comes.

Output is shown line by line, and a line being redrawn with carriage returns (a progress bar:
tqdm writes "\\r 50%|#####     | 2/4" and later "\\r100%|...|\\n") as each state arrives, not
only when its newline comes. The pieces put together are the bytes as written.
"""

from __future__ import annotations

import re

_PIECE = re.compile(rb"[^\r\n]*(?:\r\n|\n|\r(?!\n)|\r$)|[^\r\n]+$")


def cut(chunk: bytes) -> list[bytes]:
    """`chunk` cut after each newline and each carriage return not followed by a newline;
    the last piece may end with neither (the start of a line)."""
    return [piece for piece in _PIECE.findall(chunk) if piece]


class LivePieces:
    """Turns chunks of output into pieces to show: whole lines; a piece ending with "\\r"
    (a state of a line being redrawn); and, once a line has been redrawn, what arrives of
    it. The start of an ordinary line waits for the rest of it (`print("a", "b")` arrives
    in parts, and is shown whole)."""

    def __init__(self) -> None:
        self.held = b""  # the start of a line not shown yet
        self._redrawing = False  # the current line has had a "\r": show it as it comes

    def feed(self, chunk: bytes) -> list[bytes]:
        """The pieces of `chunk` (with what was held before it) to show now."""
        shown = []
        for piece in cut(chunk):
            if piece.endswith(b"\n"):
                shown.append(self.held + piece)
                self.held, self._redrawing = b"", False
            elif piece.endswith(b"\r") or self._redrawing:
                shown.append(self.held + piece)
                self.held, self._redrawing = b"", True
            else:
                self.held += piece
        return shown

    def rest(self) -> bytes:
        """What is still held (the output ended without a newline), and forget it."""
        held, self.held, self._redrawing = self.held, b"", False
        return held
