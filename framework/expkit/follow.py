"""Following a run from another process: its stages, progress lines and output, live.

Used by `expkit runs logs ID --follow` and `Run.wait_for_completion(show_output=True)`;
everything is read from the run history and the run's log files.
"""

from __future__ import annotations

import time
from pathlib import Path

from expkit.console import Console
from expkit.history import History, RunRecord, driver_alive
from expkit.pieces import LivePieces
from expkit.workspace import Workspace

POLL_SECONDS = 0.25


class LogTail:
    """What was added to one log file since the last read, as bytes: whole lines, and the
    states of a line redrawn with carriage returns (a progress bar) as they come (see
    `expkit.pieces`; the console joins the pieces of a line)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.live = LivePieces()

    def read(self) -> list[bytes]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        return self.live.feed(data)


def follow(
    workspace: Workspace,
    run_id: str,
    console: Console,
    rank: int | None = 0,
    stages: bool = True,
    timeout: float | None = None,
) -> bool:
    """Print the run as it goes until it ends (True) or `timeout` passes (False).

    Stage starts, progress lines and stage ends come in the order they were recorded; the
    script's output is printed before whatever was recorded after the run stage ended.
    """
    history, run_dir = workspace.history, workspace.run_dir(run_id)
    tails: dict[Path, LogTail] = {}
    shown: set[tuple] = set()
    deadline = time.monotonic() + timeout if timeout else None

    def print_output() -> None:
        if (run_dir / "logs").is_symlink():  # replaced by the script: never read through
            return
        for path in sorted((run_dir / "logs").glob("rank-*.log")):
            number = path.stem.removeprefix("rank-")
            this_rank = int(number) if number.isdigit() else 0
            if rank is not None and this_rank != rank:
                continue
            for line in tails.setdefault(path, LogTail(path)).read():
                console.output(0 if rank is not None else this_rank, line)

    while True:
        record = current_record(workspace, run_id)  # first: the rest is complete for a final run
        timeline = _timeline(history, run_id) if stages else []
        run_stage = next((t for t in timeline if t[2] == "start" and t[3].stage == "run"), None)
        run_end = next((t[0] for t in timeline if t[2] == "end" and t[3].stage == "run"), None)
        for ts, _, what, item in timeline:
            key = (what, ts, getattr(item, "stage", None))
            if key in shown:
                continue
            if run_end is not None and ts >= run_end:
                print_output()
            shown.add(key)
            if what == "start":
                console.stage_started(item.stage)
            elif what == "end":
                console.stage_finished(
                    item.stage, item.state, item.seconds or 0.0, item.message or ""
                )
            elif item["kind"] == "warning":
                console.warn(item["message"])
            else:
                console.stage_line(item["stage"] or "run", item["message"])
        if run_stage is not None or not stages:
            print_output()
        if record.finished:
            for path, tail in tails.items():  # a last line without a newline
                if rest := tail.live.rest():
                    number = path.stem.removeprefix("rank-")
                    this_rank = int(number) if number.isdigit() else 0
                    console.output(0 if rank is not None else this_rank, rest)
            console.end_output()
            return True
        if deadline and time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)


def current_record(workspace: Workspace, run_id: str) -> RunRecord:
    """The run's record; an unfinished run whose driver is gone (kill -9, OOM) is first
    marked failed and its processes stopped, as opening the workspace again would."""
    record = workspace.history.runs.get(run_id)
    if not record.finished and not driver_alive(record.driver_pid, record.driver_start):
        workspace.recover()
        record = workspace.history.runs.get(run_id)
    return record


def _timeline(history: History, run_id: str) -> list[tuple]:
    items: list[tuple] = []
    for stage in history.stages.of(run_id):
        if stage.started is not None:
            items.append((stage.started, 0, "start", stage))
        if stage.ended is not None:
            items.append((stage.ended, 2, "end", stage))
    for event in history.events.of(run_id):
        if event["kind"] in ("progress", "warning"):
            items.append((event["ts"], 1, "event", event))
    items.sort(key=lambda t: (t[0], t[1]))
    return items
