"""The run's parameters as TensorBoard HParams: one session per run, in the run's event file.

No experiment summary is written: TensorBoard's HParams dashboard then builds the table from
every session it finds (`tensorboard --logdir WORKSPACE/runs` compares the runs, each row a
run, its columns the parameters and the last value of each scalar: the final metrics).
"""

from __future__ import annotations

import math
import time
from typing import Any

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

STATUS = {
    "completed": api_pb2.STATUS_SUCCESS,
    "failed": api_pb2.STATUS_FAILURE,
    "canceled": api_pb2.STATUS_FAILURE,
}


def typed(value: str) -> bool | float | str:
    """A parameter's text as the HParams value TensorBoard sorts and filters best: `true`
    and `false` as booleans, a finite number as a number, anything else as text."""
    if value in ("true", "false"):
        return value == "true"
    try:
        number = float(value)
    except ValueError:
        return value
    return number if math.isfinite(number) else value


def session_events(
    params: dict[str, str], state: str, started: float, ended: float | None = None
) -> list[event_pb2.Event]:
    """The events that make the run one HParams session: its start (the parameters) and
    its end (the run's final state)."""
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=started)
    for key, text in params.items():
        value = typed(text)
        if isinstance(value, bool):
            start.hparams[key].bool_value = value
        elif isinstance(value, float):
            start.hparams[key].number_value = value
        else:
            start.hparams[key].string_value = value
    end = plugin_data_pb2.SessionEndInfo(
        status=STATUS.get(state, api_pb2.STATUS_UNKNOWN),
        end_time_secs=time.time() if ended is None else ended,
    )
    return [
        _event(metadata.SESSION_START_INFO_TAG, started, session_start_info=start),
        _event(metadata.SESSION_END_INFO_TAG, end.end_time_secs, session_end_info=end),
    ]


def _event(tag: str, wall_time: float, **data: Any) -> event_pb2.Event:
    content = plugin_data_pb2.HParamsPluginData(**data)
    value = summary_pb2.Summary.Value(
        tag=tag, metadata=metadata.create_summary_metadata(content), tensor=metadata.NULL_TENSOR
    )
    return event_pb2.Event(wall_time=wall_time, summary=summary_pb2.Summary(value=[value]))
