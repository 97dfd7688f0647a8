"""The `tensorboard` metric sink: numeric metrics become TensorBoard scalars.

It runs on the driver's sink worker thread (see `expkit.metrics`), never in the training
script: the script never waits for it. tensorboard's writer costs about 80 µs per scalar
(checksums in pure Python), so a script that logs faster than that sees its curves late, and
the rest is written at post-process.
"""

from __future__ import annotations

from typing import Any

from expkit.plugin import Metric, MetricSink, MetricWriter, RunInfo, RunOutcome, declare_options

FOLDER = "tensorboard"  # inside the run folder


def is_number(value: Any) -> bool:
    """Numbers become scalars; strings and table rows (log_row) stay in the run history only."""
    return isinstance(value, int | float) and not isinstance(value, bool)


class TensorBoardSink(MetricSink):
    name = "tensorboard"
    description = "TensorBoard event files in the run folder (tensorboard --logdir RUN/tensorboard)"
    takes = declare_options()

    def open(self, run: RunInfo, options: dict[str, Any]) -> MetricWriter:
        return TensorBoardWriter(run)


class TensorBoardWriter(MetricWriter):
    """One event file per run, written with tensorboard's own writer (no torch needed)."""

    def __init__(self, run: RunInfo) -> None:
        from tensorboard.summary import Writer  # heavy (numpy, protobuf): only when used

        self.logdir = run.run_dir / FOLDER
        self.writer = Writer(str(self.logdir))
        self.counters: dict[str, int] = {}  # the next running step of each tag logged stepless
        self.closed = False

    def send(self, metrics: list[Metric]) -> None:
        for metric in metrics:
            if not is_number(metric.value):
                continue
            # Ranks other than 0 (scripts that log from every rank) get curves of their own.
            tag = metric.name if metric.rank == 0 else f"{metric.name}/rank-{metric.rank}"
            step = metric.step
            if step is None:
                step = self.counters.get(tag, 0)
                self.counters[tag] = step + 1
            self.writer.add_scalar(tag, metric.value, step, wall_time=metric.timestamp)
        self.writer.flush()  # so that a running `tensorboard` shows the curves as they come

    def close(self, outcome: RunOutcome) -> None:
        if not self.closed:  # once: a second close does nothing
            self.closed = True
            self.writer.close()
