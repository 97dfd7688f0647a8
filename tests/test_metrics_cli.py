"""`expkit metrics`: a run's curves as a picture (--plot), and runs compared side by side."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.image import imread

from conftest import error_line
from expkit import plot

TRAIN = """
from expkit import Run
run = Run.get_context()
run.log("lr", {lr})
for epoch in range({epochs}):
    run.log("loss", {scale} / (epoch + 1), step=epoch)
    run.log("acc", 1 - {scale} / (epoch + 2), step=epoch)
for i in range(3):
    run.log("lap", i * {scale})  # no step
run.log("note", "done")
run.log_row("per_class", cls=0, precision=0.9)
"""


@pytest.fixture
def runs(run_job):
    """test_1 (5 epochs) and test_2 (3 epochs, a metric of its own): different curves."""
    first = run_job({}, script=TRAIN.format(lr=0.1, epochs=5, scale=1))
    second = run_job(
        {}, script=TRAIN.format(lr=0.01, epochs=3, scale=2) + "run.log('best_acc', 0.875)\n"
    )
    assert [first.state, second.state] == ["completed", "completed"]
    return first, second


def ok(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def check_png(path: Path) -> None:
    """A picture that decodes, of a plausible size, not blank."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    height, width, _ = pixels.shape
    assert width >= 600 and height >= 300, pixels.shape
    assert pixels.std() > 0.05  # curves, text and axes on the white background


# -- the picture ----------------------------------------------------------------------------------
def test_plot_of_one_run_draws_its_numeric_metrics(expkit_cli, runs, tmp_path):
    picture = tmp_path / "curves.png"

    out = ok(expkit_cli("metrics", "test_1", "--plot", str(picture)))

    check_png(picture)
    assert out.splitlines() == [
        f"wrote {picture}",
        "  runs     test_1",
        "  metrics  lr, loss, acc, lap",
        "  not numeric, not plotted: note, per_class",
    ]


def test_plot_of_two_runs_overlays_them_with_a_legend_by_run(expkit_cli, runs, tmp_path):
    picture = tmp_path / "compare.png"

    out = ok(expkit_cli("metrics", "test_1", "2", "--plot", str(picture)))

    check_png(picture)
    assert "  runs     test_1, test_2" in out.splitlines()
    assert "  metrics  lr, loss, acc, lap, best_acc" in out.splitlines()


def test_the_figure_has_a_subplot_per_metric_and_a_curve_per_run(runs, expkit_workspace, tmp_path):
    """The figure behind --plot, looked at through matplotlib's own objects."""
    history = expkit_workspace.history
    curves = {run: plot.curves(history, run)[0] for run in ("test_1", "test_2")}

    figure = plot.plot_runs(curves, tmp_path / "compare.svg")

    assert (tmp_path / "compare.svg").read_text().lstrip().startswith("<?xml")
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["test_1", "test_2"]
    axes = {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}
    assert list(axes) == ["lr", "loss", "acc", "lap", "best_acc"]
    loss = {line.get_label(): line for line in axes["loss"].get_lines()}
    assert list(loss) == ["test_1", "test_2"]
    assert list(loss["test_1"].get_xdata()) == [0, 1, 2, 3, 4]
    assert list(loss["test_2"].get_ydata()) == pytest.approx([2.0, 1.0, 2 / 3])
    assert axes["loss"].get_xlabel() == "step"
    lap = {line.get_label(): line for line in axes["lap"].get_lines()}
    assert list(lap["test_2"].get_xdata()) == [0, 1, 2]  # no step: the order logged
    assert axes["lap"].get_xlabel() == "order logged"
    # logged once: a labelled bar per run, or the value written out for one run only
    assert [t.get_text() for t in axes["lr"].texts] == ["0.1", "0.01"]
    assert [t.get_text() for t in axes["best_acc"].texts] == ["0.875"]
    assert axes["best_acc"].get_xlabel() == "logged once"


def test_plot_of_one_metric_only(expkit_cli, runs, tmp_path):
    picture = tmp_path / "loss.png"

    out = ok(expkit_cli("metrics", "1", "2", "loss", "--plot", str(picture)))

    check_png(picture)
    assert "  metrics  loss" in out.splitlines()


def test_nothing_numeric_to_plot_exits_2_and_writes_nothing(run_job, expkit_cli, runs, tmp_path):
    words = run_job({}, script="from expkit import Run\nRun.get_context().log('note', 'hi')\n")
    picture = tmp_path / "none.png"

    result = expkit_cli("metrics", words.record.id, "--plot", str(picture))
    assert result.returncode == 2
    assert error_line(result) == (
        "expkit: error: nothing to plot: no numeric metrics in run test_3 (not numeric: note)"
    )
    result = expkit_cli("metrics", "1", "2", "note", "--plot", str(picture))
    assert result.returncode == 2
    assert "no numeric metric 'note' in runs test_1, test_2" in error_line(result)
    assert not picture.exists()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("curves.txt", "name the picture with a known extension (.png, .svg, .pdf, ...)"),
        ("curves", "name the picture with a known extension"),
        ("missing/curves.png", "does not exist"),
    ],
)
def test_a_picture_that_cannot_be_written_exits_2(expkit_cli, runs, tmp_path, target, message):
    result = expkit_cli("metrics", "test_1", "--plot", str(tmp_path / target))
    assert result.returncode == 2
    assert message in error_line(result)


# -- side by side ---------------------------------------------------------------------------------
def test_runs_side_by_side_latest_value_of_each_metric(expkit_cli, runs):
    lines = ok(expkit_cli("metrics", "test_1", "test_2")).splitlines()

    rows = [line.split(None, 2) for line in lines]
    assert rows[0] == ["METRIC", "test_1", "test_2"]
    table = {row[0]: row[1:] for row in rows[1:]}
    assert list(table) == ["lr", "loss", "acc", "lap", "note", "per_class", "best_acc"]
    assert table["lr"] == ["0.1", "0.01"]
    assert table["loss"] == ["0.2", "0.6667"]
    assert table["lap"] == ["2", "4"]
    assert table["note"] == ["done", "done"]
    assert table["best_acc"] == ["-", "0.875"]  # test_1 never logged it
    assert lines[6].split()[1:3] == ["cls=0", "precision=0.9"]


def test_side_by_side_of_one_metric_and_by_number(expkit_cli, runs):
    lines = ok(expkit_cli("metrics", "1", "latest", "loss")).splitlines()
    assert [line.split() for line in lines] == [
        ["METRIC", "test_1", "test_2"],
        ["loss", "0.2", "0.6667"],
    ]


def test_an_unknown_run_among_several_exits_2(expkit_cli, runs, tmp_path):
    for args in (["test_1", "nope_9", "loss"], ["nope_9", "test_1"]):
        result = expkit_cli("metrics", *args)
        assert result.returncode == 2
        assert "no run 'nope_9'" in error_line(result)
    result = expkit_cli("metrics", "nope_9", "--plot", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert "no run 'nope_9'" in error_line(result)


def test_a_last_word_that_is_neither_run_nor_metric_is_named(expkit_cli, runs):
    result = expkit_cli("metrics", "test_1", "test_7")
    assert result.returncode == 2
    assert error_line(result) == (
        "expkit: error: run test_1 has no metric 'test_7' (and there is no run 'test_7'); its "
        "metrics: lr, loss, acc, lap, note, per_class"
    )
