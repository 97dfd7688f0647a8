"""A source folder's executable files stay executable in the run: a script that runs a tool of
its own folder (`./prepare.sh`) works under `expkit run` as it does without it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from expkit import snapshot
from expkit.blobs import BlobStore

TOOL = '#!/bin/sh\necho tool ran with "$1"\n'
TRAIN = """
import subprocess, sys
print(subprocess.run(["./tools/prepare.sh", sys.argv[1]], check=True,
                     capture_output=True, text=True).stdout.strip())
"""


def _project(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    (source / "tools").mkdir(parents=True)
    (source / "train.py").write_text(TRAIN)
    (source / "tools" / "prepare.sh").write_text(TOOL)
    (source / "tools" / "prepare.sh").chmod(0o750)
    job = tmp_path / "job.yaml"
    job.write_text("experiment: tools\nsource_directory: src\nentry_script: train.py\nargs: [a]\n")
    return job


def test_a_script_runs_a_tool_of_its_source_folder_and_again_when_resumed_from_its_snapshot(
    expkit_cli, tmp_path
):
    job = _project(tmp_path)
    tool = tmp_path / "src" / "tools" / "prepare.sh"
    before = tool.stat()
    for _ in range(2):  # the second: the tool found unchanged in the snapshot index
        result = expkit_cli("run", str(job))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "tool ran with a" in result.stdout
    after = tool.stat()  # the user's file is left as it was: mode, links, content
    assert (after.st_mode, after.st_nlink, after.st_ino) == (
        before.st_mode,
        before.st_nlink,
        before.st_ino,
    )


def _take(tmp_path: Path, source: Path, name: str) -> tuple[snapshot.Snapshot, Path]:
    dest = tmp_path / "ws" / "runs" / name / "snapshot"
    blobs = BlobStore(tmp_path / "ws" / "blobs")
    return snapshot.take(source, dest, blobs, tmp_path / "ws" / snapshot.INDEX_FOLDER), dest


def test_the_execute_bits_are_in_the_snapshot_and_its_hash_but_not_in_the_store(tmp_path):
    job = _project(tmp_path)
    source = job.parent / "src"
    first, dest = _take(tmp_path, source, "1")
    assert first.executable == {"tools/prepare.sh"}
    mode = stat.S_IMODE((dest / "tools" / "prepare.sh").stat().st_mode)
    assert mode == 0o550  # the source's execute bits, read-only as every snapshot file
    assert os.access(dest / "tools" / "prepare.sh", os.X_OK)
    assert stat.S_IMODE((dest / "train.py").stat().st_mode) & 0o111 == 0
    for blob in (tmp_path / "ws" / "blobs").rglob("*"):  # blobs are shared: never executable
        if blob.is_file():
            assert stat.S_IMODE(blob.stat().st_mode) & 0o111 == 0, blob
    again, _ = _take(tmp_path, source, "2")
    assert again.hash == first.hash
    (source / "tools" / "prepare.sh").chmod(0o640)  # the same content, no longer executable
    plain, dest3 = _take(tmp_path, source, "3")
    assert plain.executable == frozenset()
    assert plain.files == first.files
    assert plain.hash != first.hash
    assert not os.access(dest3 / "tools" / "prepare.sh", os.X_OK)


def test_a_working_copy_keeps_the_execute_bits_and_is_writable(tmp_path):
    job = _project(tmp_path)
    _, dest = _take(tmp_path, job.parent / "src", "1")
    work = tmp_path / "work"
    snapshot.working_copy(dest, work)
    assert stat.S_IMODE((work / "tools" / "prepare.sh").stat().st_mode) == 0o750
    assert stat.S_IMODE((work / "train.py").stat().st_mode) & 0o111 == 0
