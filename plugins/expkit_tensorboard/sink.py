"""The `tensorboard` metric sink: numeric metrics become TensorBoard scalars, the run's
parameters HParams.

It runs on the driver's sink worker thread (see `expkit.metrics`), never in the training
script: the script never waits for it. tensorboard's event writer costs about 80 µs per
scalar (checksums in pure Python), so a script that logs faster than that sees its curves
late, and the rest is written at post-process. At close the run becomes an HParams session
(`expkit_tensorboard.hparams`): its parameters as recorded then, and its final state.
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

    def where(self, run: RunInfo, options: dict[str, Any]) -> str | None:
        """The run's log folder, as the command that shows it; None before the sink opened
        (no folder yet)."""
        folder = run.run_dir / FOLDER
        return f"tensorboard --logdir {folder}" if folder.is_dir() else None


class TensorBoardWriter(MetricWriter):
    """One event file per writer, written with tensorboard's own event writer (no torch)."""

    def __init__(self, run: RunInfo) -> None:
        # heavy (numpy, protobuf): only when used
        import numpy as np
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        from tensorboard.util import tensor_util

        self._float32, self._tensor, self._event = (
            np.float32,
            tensor_util.make_tensor_proto,
            event_pb2.Event,
        )
        self._scalar_metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
            data_class=summary_pb2.DataClass.DATA_CLASS_SCALAR,
        )
        self.run = run
        self.logdir = run.run_dir / FOLDER
        self.events = EventFileWriter(str(self.logdir))
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
            self.events.add_event(self._scalar(tag, metric.value, step, metric.timestamp))
        self.events.flush()  # so that a running `tensorboard` shows the curves as they come

    def _scalar(self, tag: str, value: float, step: int, wall_time: float) -> Any:
        """A scalar as tensorboard's own `Writer.add_scalar` writes it: a float32 tensor
        summary of the scalars plugin."""
        event = self._event(wall_time=wall_time, step=int(step))
        tensor = self._tensor(self._float32(value))
        event.summary.value.add(tag=tag, tensor=tensor, metadata=self._scalar_metadata)
        return event

    def close(self, outcome: RunOutcome) -> None:
        """The run's HParams session (its parameters, its final state), then the file
        closed; a second close does nothing."""
        if self.closed:
            return
        from expkit_tensorboard.hparams import session_events

        for event in session_events(self.run.params(), outcome.state, self.run.created):
            self.events.add_event(event)
        self.closed = True
        self.events.close()
