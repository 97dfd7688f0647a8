"""The live table of `expkit sweep` on a terminal: the sweep's trials, redrawn in place."""

from __future__ import annotations

import time
from typing import IO

from expkit.sweeps.driver import Reporter, TrialView, format_number, format_values


class LiveTable(Reporter):
    """The trials as a table redrawn in place on a terminal (ANSI cursor movement): trial,
    run, parameters, state, latest primary metric, best so far. Notes print above it."""

    MAX_ROWS = 20  # the latest trials shown (the best one always)

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.views: dict[int, TrialView] = {}
        self.best: TrialView | None = None
        self.drawn = 0  # lines of the table on the screen now
        self.last_draw = 0.0

    def started(self, view: TrialView) -> None:
        self.views[view.number] = view
        self.draw(force=True)

    def changed(self, view: TrialView) -> None:
        self.views[view.number] = view
        self.draw()

    def ended(self, view: TrialView, best: TrialView | None) -> None:
        self.views[view.number] = view
        self.best = best
        self.draw(force=True)

    def note(self, text: str) -> None:
        self.clear()
        print(text, file=self.stream)
        self.draw(force=True)

    def clear(self) -> None:
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def rows(self) -> list[list[str]]:
        shown = sorted(self.views.values(), key=lambda v: v.number)[-self.MAX_ROWS :]
        if self.best is not None and self.best not in shown:
            shown = [self.best, *shown[1:]]
        rows = []
        for view in shown:
            mark = "*" if view is self.best else ""
            state = "canceled" if view.state == "pruned" else view.state
            rows.append(
                [
                    str(view.number),
                    view.run_id or "-",
                    format_values(view.values),
                    state,
                    format_number(view.latest if view.value is None else view.value),
                    mark,
                ]
            )
        return rows

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_draw < 0.2:
            return
        self.last_draw = now
        headers = ["trial", "run", "parameters", "state", "metric", "best"]
        rows = self.rows()
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip()
                 for r in [headers, *rows]]  # fmt: skip
        self.clear()
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self.drawn = len(lines)

    def close(self) -> None:
        self.draw(force=True)
