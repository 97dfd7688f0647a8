"""A sweep in a picture (`expkit sweeps show SWEEP --plot FILE.png`): Optuna's optimization
history above its hyperparameter importances (or, when those cannot be computed, the
parallel coordinates of the trials), drawn from the sweep's study by
`optuna.visualization.matplotlib`.

matplotlib and Optuna are imported only here, only when a picture is asked for; the study is
read from its journal (see `expkit.sweeps.study`) without the sampler or pruner, which a
reader does not need.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expkit.errors import UserError

if TYPE_CHECKING:
    import optuna

    from expkit.history import SweepRecord
    from expkit.workspace import Workspace

MISSING = "--plot needs matplotlib and optuna; pip install 'expkit[sweep,plot]'"
DPI = 100


def load_study(workspace: Workspace, sweep: SweepRecord) -> optuna.Study:
    """The sweep's study as its journal holds it, for reading. UserError when the sweep has
    no study yet (its driver never asked for a trial)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from expkit.sweeps.study import JOURNAL

    journal = workspace.sweep_dir(sweep.id) / JOURNAL
    if not journal.is_file():
        raise UserError(f"sweep {sweep.id} has no study yet ({journal} is missing): no trials")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    try:
        return optuna.load_study(study_name=sweep.id, storage=storage)
    except KeyError:
        raise UserError(f"sweep {sweep.id}: its journal {journal} holds no study") from None


def plot_sweep(workspace: Workspace, sweep: SweepRecord, path: Path) -> str:
    """Draw the sweep's optimization history and its parameters' importances (parallel
    coordinates when importances cannot be computed: fewer than two completed trials, or
    one parameter) into `path`; returns the name of the second panel. UserError (exit 2)
    when matplotlib or optuna is missing, no trial completed yet (nothing to draw), or the
    file cannot be written."""
    try:
        import matplotlib
        import optuna  # noqa: F401 - said missing here, not inside Optuna's plotting
    except ImportError:
        raise UserError(MISSING) from None
    from expkit.plot import check_file

    check_file(path)
    study = load_study(workspace, sweep)
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise UserError(f"sweep {sweep.id}: no completed trial to plot yet")
    matplotlib.use("Agg")
    from matplotlib import pyplot

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are "experimental"
        history = _figure(_history(study))
        second, name = _second_panel(study)
        panels = [_pixels(history), _pixels(second)]
        pyplot.close(history)
        pyplot.close(second)
    _save(panels, path, f"sweep {sweep.id}")
    return name


def _history(study: optuna.Study) -> Any:
    """The optimization history, trial numbers as whole numbers on its x axis."""
    from matplotlib.ticker import MaxNLocator
    from optuna.visualization.matplotlib import plot_optimization_history

    axes = plot_optimization_history(study)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    return axes


def _second_panel(study: optuna.Study) -> tuple[Any, str]:
    """The importances' figure, or the parallel coordinates' when importances cannot be
    computed (fewer than two completed trials, one parameter, or Optuna refusing)."""
    from optuna.trial import TrialState
    from optuna.visualization.matplotlib import plot_parallel_coordinate, plot_param_importances

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = {name for trial in complete for name in trial.params}
    if len(complete) >= 2 and len(names) >= 2:
        try:
            return _figure(plot_param_importances(study)), "importances"
        except (RuntimeError, ValueError, ZeroDivisionError):
            pass
    return _figure(plot_parallel_coordinate(study)), "parallel coordinates"


def _figure(axes: Any) -> Any:
    """The figure Optuna drew on (it returns an Axes, or an array of them)."""
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.figure


def _pixels(figure: Any) -> Any:
    """The figure drawn into an RGBA array, cut to what it shows (Optuna puts legends
    outside the axes, past the figure's edge)."""
    import io

    from matplotlib.image import imread

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    buffer.seek(0)
    return imread(buffer, format="png")


def _save(panels: list[Any], path: Path, title: str) -> None:
    """The panels one above the other in one figure, saved to `path` (its format from its
    extension); UserError when it cannot be written."""
    from matplotlib.figure import Figure

    width = max(p.shape[1] for p in panels)
    height = sum(p.shape[0] for p in panels)
    figure = Figure(figsize=(width / DPI, height / DPI + 0.4), dpi=DPI)
    figure.suptitle(title)
    top = 1 - 0.4 / (height / DPI + 0.4)
    bottom = top
    for panel in panels:
        share = panel.shape[0] / height * top
        bottom -= share
        ax = figure.add_axes((0, bottom, panel.shape[1] / width, share))
        ax.imshow(panel, interpolation="nearest")
        ax.set_axis_off()
    try:
        figure.savefig(path, dpi=DPI)
    except OSError as error:
        raise UserError(f"--plot {path}: cannot write it ({error.strerror or error})") from None
