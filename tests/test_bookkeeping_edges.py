"""Edge cases of the bookkeeping: the plugin-scan cache, the metric pump, the snapshot walk."""

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


def _python(snippet: str, folder: Path) -> str:
    """What `snippet` prints, run by this interpreter in a process of its own (its limits
    set there stay there) with `folder` as its argument."""
    return subprocess.run(
        [sys.executable, "-c", snippet, str(folder)], capture_output=True, text=True, check=True
    ).stdout


def test_a_snapshot_under_a_low_open_files_limit_is_complete(tmp_path: Path):
    """Under `ulimit -n 64`, the snapshot that links known blobs by the store's folder
    descriptors must not use up the descriptors its walk needs: no folder left out."""
    out = _python(SNAPSHOT_UNDER_LOW_FD_LIMIT, tmp_path).splitlines()
    assert out == ["0 601 601 []", "1 0 601 []"]
    assert (tmp_path / "snap1" / "zzz" / "last").read_text() == "walked after the links"


def test_a_folder_swapped_for_a_link_after_it_was_listed_is_not_walked_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A folder above the next one to open becomes a link to outside the source between
    the listing and the open (O_NOFOLLOW guards only the last part of a path): nothing
    outside the source folder may enter the snapshot, and the warning says what happened."""
    from expkit import snapshot
    from expkit.blobs import BlobStore

    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "ok.py").write_text("inside")
    (outside / "b").mkdir(parents=True)
    (outside / "b" / "leak.txt").write_text("a secret outside the source")
    listed = snapshot._list

    def list_then_swap(fd, folder, prefix, *rest):
        found = listed(fd, folder, prefix, *rest)
        if prefix == "a/":  # a/ listed, a/b not opened yet: a/ becomes a link
            os.rename(src / "a", tmp_path / "a-moved")
            os.symlink(outside, src / "a")
        return found

    monkeypatch.setattr(snapshot, "_list", list_then_swap)
    snap = snapshot.take(src, tmp_path / "snap", BlobStore(tmp_path / "blobs"))
    assert "a/b/leak.txt" not in snap.files
    assert not (tmp_path / "snap" / "a" / "b" / "leak.txt").exists()
    assert any("a/b/ was moved or replaced" in w for w in snap.warnings), snap.warnings
    assert (outside / "b" / "leak.txt").read_text() == "a secret outside the source"


SNAPSHOT_WITHOUT_DESCRIPTORS = """
import errno, os, resource, sys
from pathlib import Path
from expkit.blobs import BlobStore
from expkit.snapshot import take
base = Path(sys.argv[1])
(base / "src" / "sub").mkdir(parents=True)
(base / "src" / "sub" / "train.py").write_text("print(1)")
store = BlobStore(base / "blobs")
resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
try:
    snap = take(base / "src", base / "snap", store)
    print("taken", sorted(snap.files), snap.warnings)
except OSError as error:
    print("failed", errno.errorcode[error.errno])
"""


def test_a_snapshot_that_runs_out_of_file_descriptors_fails_instead_of_leaving_folders_out(
    tmp_path: Path,
):
    """No descriptor left (`ulimit -n`, or the system's table full) is not a folder that
    cannot be read: the prepare stage fails rather than record an incomplete snapshot."""
    out = _python(SNAPSHOT_WITHOUT_DESCRIPTORS, tmp_path).strip()
    assert out == "failed EMFILE", out
