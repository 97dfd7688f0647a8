"""Plugin `tensorboard`: a metric sink that writes TensorBoard event files into each run.

A job selects it with `metrics: [tensorboard]`; then `tensorboard --logdir RUN_DIR/tensorboard`
shows that run's curves, and `tensorboard --logdir WORKSPACE/.expkit/runs` every run side by
side. It is also the template for a metric sink: check the optional dependency cheaply here,
import it only when a run opens the sink (`sink.py`), so that `expkit` starts fast without it.
"""

from __future__ import annotations

import importlib.util

import expkit

if importlib.util.find_spec("tensorboard") is None:  # cheap: finds it, does not import it
    raise expkit.PluginUnavailable(
        "tensorboard is not installed; pip install 'expkit[tensorboard]'"
    )

from expkit_tensorboard.sink import TensorBoardSink


@expkit.hookimpl
def expkit_metric_sinks() -> list[expkit.MetricSink]:
    return [TensorBoardSink()]
