"""Edge cases found by trying the plugin-scan cache and the metric pump as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
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


SNAPSHOT_UNDER_LOW_FD_LIMIT = """
import os, resource, sys, time
from pathlib import Path
from expkit.blobs import BlobStore
from expkit.snapshot import take
base = Path(sys.argv[1])
src = base / "src"
for i in range(600):  # blobs in (nearly) every one of the store's 256 folders
    (src / "many").mkdir(parents=True, exist_ok=True)
    (src / "many" / f"f{i}").write_text(f"content {i}")
(src / "zzz").mkdir()
(src / "zzz" / "last").write_text("walked after the links")
past = time.time() - 60
for folder, _, names in os.walk(src):
    for name in names:
        os.utime(os.path.join(folder, name), (past, past))
time.sleep(2.5)  # the files' ctime (set by utime) no longer racy for the index
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
store = BlobStore(base / "blobs")
for n in range(2):  # the second links from the index: the BlobLinker's folders
    snap = take(src, base / f"snap{n}", store, base / "index")
    print(n, snap.rehashed, len(snap.files), sorted(snap.warnings))
"""


def test_a_snapshot_under_a_low_open_files_limit_is_complete(tmp_path: Path):
    """Under `ulimit -n 64`, the snapshot that links known blobs by the store's folder
    descriptors must not use up the descriptors its walk needs: no folder left out."""
    out = subprocess.run(
        [sys.executable, "-c", SNAPSHOT_UNDER_LOW_FD_LIMIT, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out == ["0 601 601 []", "1 0 601 []"]
    assert (tmp_path / "snap1" / "zzz" / "last").read_text() == "walked after the links"
