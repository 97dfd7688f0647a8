"""The live table of `expkit sweep` on a terminal: the sweep's trials, redrawn in place."""

from __future__ import annotations

import time
from typing import IO

from expkit.sweeps.driver import (
    Reporter,
    TrialView,
    format_number,
    format_values,
    shown_state,
)

REDRAW_SECONDS = 0.2  # the least time between two redraws for a new metric value


class LiveTable(Reporter):
    """The trials as a table redrawn in place (ANSI cursor movement; use it only when the
    stream is a terminal): trial, run, parameters, state, latest value of the primary metric
    (the trial's value once it completed), the best so far marked `*` and named above the
    table. Why a trial ended early, and notes about the sweep, print above it and stay."""

    MAX_ROWS = 20  # the latest trials shown (and the best one)

    def __init__(self, stream: IO[str], metric: str = "metric") -> None:
        self.stream = stream
        self.metric = metric
        self.views: dict[int, TrialView] = {}
        self.drawn: list[str] = []  # the table's lines on the screen now
        self.last_draw = 0.0

    def started(self, view: TrialView) -> None:
        self.views[view.number] = view
        self.draw(force=True)

    def changed(self, view: TrialView) -> None:
        self.views[view.number] = view
        self.draw()

    def ended(self, view: TrialView, best: TrialView | None) -> None:
        self.views[view.number] = view
        if view.state != "completed" and view.note:
            shown = shown_state(view.state)
            self.note(f"trial {view.number} (run {view.run_id}) {shown}: {view.note}")
        self.draw(force=True)

    def note(self, text: str) -> None:
        self.clear()
        print(text, file=self.stream)
        self.draw(force=True)

    def clear(self) -> None:
        """Take the table off the screen (the cursor back where it began)."""
        if self.drawn:
            self.stream.write(f"\x1b[{len(self.drawn)}F\x1b[J")
            self.drawn = []

    def lines(self) -> list[str]:
        """The table as it is now: a title naming the best trial so far, then the rows."""
        views = sorted(self.views.values(), key=lambda v: v.number)
        shown = views[-self.MAX_ROWS :]
        if self.best is not None and self.best not in shown:
            shown = [self.best, *shown[1:]]
        running = sum(v.state in ("queued", "scaling", "running") for v in views)
        title = f"{len(views)} trials, {running} running"
        if self.best is not None:
            title += (
                f"; best so far: trial {self.best.number}, {self.metric} "
                f"{format_number(self.best.value)}"
            )
        headers = ["trial", "run", "parameters", "state", self.metric, ""]
        rows = [headers]
        for view in shown:
            rows.append(
                [
                    str(view.number),
                    view.run_id or "-",
                    format_values(view.values),
                    shown_state(view.state),
                    format_number(view.latest if view.value is None else view.value),
                    "*" if view is self.best else "",
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
        table = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        return [title, *(line.rstrip() for line in table)]

    def draw(self, force: bool = False) -> None:
        """Redraw the table if it changed (a new metric value: at most every REDRAW_SECONDS)."""
        now = time.monotonic()
        if not force and now - self.last_draw < REDRAW_SECONDS:
            return
        lines = self.lines()
        if lines == self.drawn:
            return
        self.last_draw = now
        self.clear()
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self.drawn = lines

    def close(self) -> None:
        """Leave the table as it last was, on the screen."""
        self.draw(force=True)
