"""Plugin `tensorboard`: a metric sink that writes TensorBoard event files into each run.

A job selects it with `metrics: [tensorboard]`; then `tensorboard --logdir RUN_DIR/tensorboard`
shows that run's curves, and `tensorboard --logdir WORKSPACE/.expkit/runs` every run side by
side. It is also the template for a metric sink: check the optional dependency cheaply here,
import it only when a run opens the sink (`sink.py`), so that `expkit` starts fast without it.
"""

from __future__ import annotations

import importlib.util

from expkit.plugin import MetricSink, PluginUnavailable, hookimpl

if importlib.util.find_spec("tensorboard") is None:  # cheap: finds it, does not import it
    raise PluginUnavailable("tensorboard is not installed; pip install 'expkit[tensorboard]'")


@hookimpl
def expkit_metric_sinks() -> list[MetricSink]:
    from expkit_tensorboard.sink import TensorBoardSink  # for a job that uses the sink only

    return [TensorBoardSink()]
