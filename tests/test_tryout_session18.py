"""Edge cases found by trying the plugin-scan cache and the metric pump as a user would."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from expkit import entrycache


def test_a_relative_cache_dir_writes_nothing_into_the_current_folder(
    site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """EXPKIT_CACHE_DIR=relcache run from a project must not create relcache/ in the project
    (relative cache paths are ignored, as XDG says); the plugins are still found."""
    site.install("rel-plugin", {"rel": "x = 1\n"})
    past = time.time() - 60
    for path in site.path.glob("*.dist-info/*"):
        os.utime(path, (past, past))
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setenv(entrycache.CACHE_ENV, "relcache")
    names = [ep.name for ep in entrycache.entry_points("expkit")]
    assert "rel" in names
    assert list(project.iterdir()) == []


@pytest.mark.parametrize(
    "run_id",
    ["back\\slash'", "ünï–códe🙂", "q''''", "x" * 100_000, "tab\tid", "line\nid"],
)
def test_the_pump_stores_values_under_any_run_id(expkit_workspace, run_id: str):
    """Backslashes, unicode, runs of quotes, a very long id, control characters: each run's
    values come back under its own id, nothing under another."""
    metrics = expkit_workspace.history.metrics
    rows = [("loss", i, float(i), 1.0, 0) for i in range(3)]
    assert metrics.add_values(run_id, [(1, rows)]) == 3
    assert metrics.add_values("other", [(1, [("loss", 0, 9.0, 1.0, 0)])]) == 1
    got = [(r["run_id"], r["step"], r["value"]) for r in metrics.of(run_id, "loss")]
    assert got == [(run_id, i, float(i)) for i in range(3)]
