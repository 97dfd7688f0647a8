"""Pictures of metric curves, for `expkit metrics RUN... --plot FILE.png`.

matplotlib is imported only here, only when a picture is asked for, and without pyplot: the
figure is drawn by the Agg canvas straight into the file, with no window and no global state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expkit.console import format_value
from expkit.errors import UserError
from expkit.history import History, metric_value

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

COLUMNS = 3  # subplots per row
MARKERS_UP_TO = 50  # curves this short show a dot per value


@dataclass
class Curve:
    """One metric of one run: x is the step, or the order logged for values without one."""

    xs: list[int] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)
    stepped: bool = False


def is_number(value: Any) -> bool:
    """Numbers are drawn (True counts as a number in the history: it is stored as 1.0)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def curves(
    history: History, run_id: str, name: str | None = None
) -> tuple[dict[str, Curve], list[str]]:
    """The run's numeric metrics as curves by name, and the names that are not numeric.

    Values logged without a step are numbered in the order logged, per metric, as the
    TensorBoard sink does; other ranks than 0 get curves of their own, `name/rank-N`. The
    curves are the run's current ones: a step a later attempt logged again is drawn with its
    later value (`expkit.history.metrics.Metrics.current`).
    """
    found: dict[str, Curve] = {}
    names: dict[str, bool] = {}  # every name logged: whether it had a number
    for row in history.metrics.current(run_id, name):
        value = metric_value(row)
        names[row["name"]] = names.get(row["name"], False) or is_number(value)
        if not is_number(value):
            continue
        key = row["name"] if row["rank"] == 0 else f"{row['name']}/rank-{row['rank']}"
        curve = found.setdefault(key, Curve())
        curve.stepped |= row["step"] is not None
        curve.xs.append(len(curve.xs) if row["step"] is None else row["step"])
        curve.ys.append(float(value))
    return found, [n for n, numeric in names.items() if not numeric]


def check_file(path: Path) -> None:
    """Refuse a file matplotlib cannot write before any work: folder, format."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise UserError("matplotlib is not installed; pip install 'expkit[plot]'") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    kind = path.suffix.lstrip(".").lower()
    if kind not in formats:
        some = ", ".join(f".{k}" for k in ("png", "svg", "pdf"))
        raise UserError(f"--plot {path}: name the picture with a known extension ({some}, ...)")
    if not path.parent.is_dir():
        raise UserError(f"--plot {path}: folder {path.parent} does not exist")


def plot_runs(
    runs: dict[str, dict[str, Curve]], path: Path, labels: dict[str, str] | None = None
) -> Figure:
    """One subplot per metric, one colour per run; returns the figure it saved to `path`.
    Runs are named by `labels` (run id -> label, e.g. "test_3 (lr=0.01)"), else by id."""
    check_file(path)
    names_of = {run: (labels or {}).get(run, run) for run in runs}
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    names = list(dict.fromkeys(name for metrics in runs.values() for name in metrics))
    colors = {run: f"C{i % 10}" for i, run in enumerate(runs)}
    columns = min(COLUMNS, len(names))
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(max(4.6 * columns, 7), 3.2 * rows + 0.5), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    for ax, name in zip(axes, names, strict=False):
        shown = {run: metrics[name] for run, metrics in runs.items() if name in metrics}
        ax.set_title(name)
        if all(len(curve.xs) == 1 for curve in shown.values()):
            _single_values(ax, shown, colors, names_of)
        else:
            _lines(ax, shown, colors, names_of)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    if len(runs) > 1:
        handles = [Line2D([], [], color=colors[run], lw=2.5, label=names_of[run]) for run in runs]
        figure.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 5))
    else:
        figure.suptitle(f"run {next(iter(runs))}")
    figure.savefig(path, dpi=100)
    return figure


def _finite(ys: list[float]) -> list[float]:
    return [y if math.isfinite(y) else math.nan for y in ys]  # inf would break the scale


def _lines(
    ax: Axes, shown: dict[str, Curve], colors: dict[str, str], names_of: dict[str, str]
) -> None:
    from matplotlib.ticker import EngFormatter, MaxNLocator

    for run, curve in shown.items():
        marker = "o" if len(curve.xs) <= MARKERS_UP_TO else None
        ys = _finite(curve.ys)
        ax.plot(curve.xs, ys, color=colors[run], marker=marker, ms=3.5, label=names_of[run])
    first = min(min(curve.xs) for curve in shown.values())
    if first == max(max(curve.xs) for curve in shown.values()):
        ax.set_xlim(first - 1, first + 1)  # one step only: whole steps around it, not fractions
    stepped = any(curve.stepped for curve in shown.values())
    ax.set_xlabel("step" if stepped else "order logged")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 150k, not 150000 (labels overlap)
    ax.grid(alpha=0.3)


def _single_values(
    ax: Axes, shown: dict[str, Curve], colors: dict[str, str], names_of: dict[str, str]
) -> None:
    """A value logged once: written out for one run, a labelled bar per run for several."""
    if len(shown) == 1:
        curve = next(iter(shown.values()))
        ax.text(0.5, 0.5, format_value(curve.ys[0]), ha="center", va="center", fontsize=22)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("logged once" + (f", step {curve.xs[0]}" if curve.stepped else ""))
        return
    runs = list(shown)
    heights = [y if math.isfinite(y) else 0 for y in (shown[run].ys[0] for run in runs)]
    bars = ax.bar(range(len(runs)), heights, width=0.6, color=[colors[run] for run in runs])
    ax.bar_label(bars, labels=[format_value(shown[run].ys[0]) for run in runs], padding=2)
    names = [names_of[run] for run in runs]
    if sum(map(len, names)) > 60:  # long labels (parameters) would overlap: slant them
        ax.set_xticks(range(len(runs)), names, fontsize=7, rotation=20, ha="right")
    else:
        ax.set_xticks(range(len(runs)), names, fontsize=8)
    ax.margins(y=0.15)
    ax.set_xlabel("logged once")
    ax.grid(alpha=0.3, axis="y")
