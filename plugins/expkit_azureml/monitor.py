"""Following a submitted Azure ML run: its states as expkit's, its logs and metrics streamed live.

Each poll asks the run object for its status (`get_status`) and its log files (`get_details`,
whose `logFiles` maps each file to a URL that can be read while it grows). Those two calls,
the reads of those URLs, `cancel` and `download_files` are the only ones that reach Azure.

    Azure ML status   expkit          what it means
    NotStarted        queued          submitted; the service has not picked the run up yet
    Starting          queued          the service is processing the submission
    Provisioning      scaling         on-demand compute is being created for the run
    Preparing         preparing       the environment's image is built (or found) and pulled
    Queued            scaling         waiting for the cluster's nodes
    Running           running         the script runs
    Finalizing        post-processing the script ended; Azure ML uploads outputs and logs
    CancelRequested   canceling       a cancel was asked for; the run is being stopped
    NotResponding     running         no heartbeat from the run lately
    Completed         completed       -> the run stage ends with exit code 0
    Failed            failed          -> the run stage fails with Azure ML's error
    Canceled          canceled        -> the run is canceled

While the run stage lasts, the expkit run stays in state `running`; the Azure ML status is its
status text (`expkit runs show`) and each change is a progress line of the stage.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from expkit.plugin import Canceled, RunContext, StageFailed

STATES: dict[str, tuple[str, str]] = {
    "NotStarted": ("queued", "submitted; the service has not picked the run up yet"),
    "Starting": ("queued", "the service is processing the submission"),
    "Provisioning": ("scaling", "on-demand compute is being created for the run"),
    "Preparing": ("preparing", "the environment's image is built (or found) and pulled"),
    "Queued": ("scaling", "waiting for the cluster's nodes"),
    "Running": ("running", "the script runs"),
    "Finalizing": ("post-processing", "the script ended; Azure ML uploads outputs and logs"),
    "CancelRequested": ("canceling", "a cancel was asked for; the run is being stopped"),
    "NotResponding": ("running", "no heartbeat from the run lately"),
    "Completed": ("completed", "the run completed"),
    "Failed": ("failed", "the run failed"),
    "Canceled": ("canceled", "the run was canceled"),
}
FINAL = ("Completed", "Failed", "Canceled")
WAITING = ("NotStarted", "Starting", "Provisioning", "Queued")  # the run waits for compute
POLL_SECONDS = 5.0
MAX_POLL_FAILURES = 8  # consecutive failed polls (with growing pauses) before giving up
CANCEL_WAIT_SECONDS = 120.0  # how long a canceled run is followed until Azure says Canceled

# A rank's output: azureml-logs/70_driver_log[_N].txt (older runtime) or
# user_logs/std_log[_process_N].txt; N is the process's global rank.
RANK_LOG = re.compile(r"(?:^|/)(70_driver_log|std_log)(?:_process)?(?:_(\d+))?\.txt$")
METRIC_LOG = re.compile(r"(?:^|/)expkit-metrics/([^/]+\.jsonl)$")


def expkit_state(status: str) -> str:
    """The expkit state an Azure ML run status corresponds to (see the table above)."""
    return STATES.get(status, ("running", ""))[0]


def describe(status: str) -> str:
    state, meaning = STATES.get(status, ("running", "a status expkit does not know"))
    return f"azureml {status} ({state}): {meaning}"


def rank_of(name: str) -> tuple[str, int] | None:
    """(family, rank) of a log file holding a rank's output, else None."""
    match = RANK_LOG.search(name)
    if match is None:
        return None
    return match[1], int(match[2] or 0)


class LogReader:
    """Reads what was added to log files (blob URLs) since the last read; never raises."""

    def __init__(self, timeout: float = 30.0) -> None:
        import requests

        self.session = requests.Session()
        self.timeout = timeout
        self.offsets: dict[str, int] = {}
        self.errors = 0

    def new_bytes(self, name: str, url: str) -> bytes:
        offset = self.offsets.get(name, 0)
        try:
            response = self.session.get(
                url, headers={"Range": f"bytes={offset}-"}, timeout=self.timeout
            )
        except Exception:
            self.errors += 1
            return b""
        if response.status_code == 206:
            data = response.content
        elif response.status_code == 200:  # the server ignored the range: all of it
            data = response.content[offset:]
        else:  # 416: nothing new; 404: not there yet; anything else: next time
            return b""
        self.offsets[name] = offset + len(data)
        return data


@dataclass
class RankStream:
    file: BinaryIO
    partial: bytes = b""


@dataclass
class Follower:
    """Follows one Azure ML run until it ends; `follow()` returns its final status."""

    run: Any  # azureml.core.Run (a ScriptRun)
    ctx: RunContext
    poll_seconds: float = POLL_SECONDS
    cancel_wait_seconds: float = CANCEL_WAIT_SECONDS
    reader: LogReader = field(default_factory=LogReader)
    statuses: list[str] = field(default_factory=list)  # every distinct status seen, in order
    details: dict[str, Any] = field(default_factory=dict)  # the last get_details()
    waiting: Callable[[], None] | None = None  # called on each poll while the run waits
    cancel_sent: bool = False
    _ranks: dict[int, RankStream] = field(default_factory=dict)
    _family: str | None = None

    def follow(self) -> str:
        canceled_at: float | None = None
        failures = 0
        try:
            while True:
                try:
                    status = self.poll()
                    failures = 0
                except Exception as error:  # the service or the network, for a moment
                    failures += 1
                    if failures >= MAX_POLL_FAILURES:
                        from expkit_azureml.workspace import first_line

                        raise StageFailed(
                            f"lost contact with Azure ML run {self.run.id} ({first_line(error)});"
                            " it may still be running: see the Azure ML studio"
                        ) from error
                    time.sleep(self.poll_seconds * failures)
                    continue
                if status in FINAL:
                    return status
                if status in WAITING and self.waiting is not None:
                    with contextlib.suppress(Exception):  # progress only
                        self.waiting()
                if self.ctx.canceled():
                    if not self.cancel_sent:
                        self.cancel()
                        canceled_at = time.monotonic()
                    elif time.monotonic() - (canceled_at or 0) > self.cancel_wait_seconds:
                        self.ctx.say(
                            f"Azure ML run {self.run.id} still says {status} "
                            f"{self.cancel_wait_seconds:.0f}s after the cancel; not waiting longer"
                        )
                        return "Canceled"
                time.sleep(self.poll_seconds)
        except (KeyboardInterrupt, Canceled, SystemExit):  # the user stops the driver
            if not self.cancel_sent:
                self.cancel()
            raise
        finally:
            self.close()

    def poll(self) -> str:
        """One look at the run: its status (reported when it changed) and its new log lines."""
        status = self.run.get_status()
        if not self.statuses or self.statuses[-1] != status:
            self.statuses.append(status)
            self.ctx.say(describe(status))
            self.ctx.status(f"azureml {status}")
        self.details = self.run.get_details() or {}
        self.stream(self.details.get("logFiles") or {})
        return status

    def cancel(self) -> None:
        self.cancel_sent = True
        self.ctx.say(f"canceling Azure ML run {self.run.id}")
        try:
            self.run.cancel()
        except Exception as error:
            from expkit_azureml.workspace import first_line

            self.ctx.say(f"could not cancel Azure ML run {self.run.id}: {first_line(error)}")

    # -- logs -------------------------------------------------------------------------------
    def stream(self, log_files: dict[str, str]) -> None:
        """Each rank's new output into logs/rank-N.log and the terminal; new metric lines into
        the run's metric channel."""
        ranked = {name: rank_of(name) for name in log_files}
        families = {r[0] for r in ranked.values() if r}
        if self._family is None and families:  # the newer runtime's user_logs when both exist
            self._family = "std_log" if "std_log" in families else "70_driver_log"
        for name in sorted(log_files):
            where = ranked[name]
            if where is not None and where[0] == self._family:
                self._rank_output(where[1], self.reader.new_bytes(name, log_files[name]))
            metric = METRIC_LOG.search(name)
            if metric is not None:
                data = self.reader.new_bytes(name, log_files[name])
                if data:
                    with open(self.ctx.run_dir / "metrics" / metric[1], "ab") as f:
                        f.write(data)

    def _rank_output(self, rank: int, data: bytes) -> None:
        if not data:
            return
        stream = self._ranks.get(rank)
        if stream is None:
            self.ctx.log_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.ctx.log_dir / f"rank-{rank}.log", "ab", buffering=0)  # noqa: SIM115
            stream = self._ranks[rank] = RankStream(log)
        stream.file.write(data)
        lines = (stream.partial + data).split(b"\n")
        stream.partial = lines.pop()
        for line in lines:
            self.ctx.echo(rank, line + b"\n")

    def close(self) -> None:
        for rank, stream in self._ranks.items():
            if stream.partial:
                self.ctx.echo(rank, stream.partial + b"\n")
                stream.partial = b""
            stream.file.close()
        self._ranks.clear()

    # -- the end ------------------------------------------------------------------------------
    def error(self) -> str:
        """Azure ML's reason for a failed run, on one line."""
        error = self.details.get("error") or {}
        inner = error.get("error", error) if isinstance(error, dict) else {}
        message = inner.get("message") if isinstance(inner, dict) else None
        text = str(message or error or "no error message from Azure ML; see logs/azureml/")
        return " ".join(text.split())


def merge_metric_files(downloaded: Path, channel: Path) -> int:
    """Append to each metric file of the run's channel what the downloaded copy has beyond it
    (the channel is append-only: the pump remembers how far it read). Returns files merged."""
    merged = 0
    for source in sorted(downloaded.glob("*.jsonl")):
        target = channel / source.name
        have = target.stat().st_size if target.exists() else 0
        data = source.read_bytes()
        if len(data) > have:
            with open(target, "ab") as f:
                f.write(data[have:])
        merged += 1
    return merged
