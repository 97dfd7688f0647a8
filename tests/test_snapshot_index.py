"""The snapshot index (expkit.snapindex): an unchanged file is not read again, and the index
never makes a snapshot record a hash that is not the file's content (a change within the
same timestamp tick, a rename, a file replaced by a link, a damaged or missing index)."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from expkit import snapshot
from expkit.blobs import WHOLE_READ_BYTES, BlobStore
from expkit.snapindex import RACY_MARGIN_NS, SnapshotIndex, stat_key


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_out_the_racy_window() -> None:
    """Files written before this are older than any index begun after it by more than the
    racy margin: the next snapshot's entries for them are trusted by the one after."""
    time.sleep(RACY_MARGIN_NS / 1e9 + 0.05)


class Workspace:
    """A workspace folder (the part a snapshot uses): blobs, the index, runs' snapshots."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.blobs = BlobStore(path / "blobs")
        self.index_dir = path / snapshot.INDEX_FOLDER
        self.runs = 0

    def take(self, source: Path, **options) -> snapshot.Snapshot:
        self.runs += 1
        dest = self.path / "runs" / str(self.runs) / "snapshot"
        return snapshot.take(source, dest, self.blobs, self.index_dir, **options)

    def dest(self) -> Path:
        return self.path / "runs" / str(self.runs) / "snapshot"

    def index_file(self, source: Path) -> Path:
        return SnapshotIndex(self.index_dir, os.path.realpath(source)).path


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / ".expkit")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A source folder of a few files in nested folders."""
    folder = tmp_path / "src"
    for name, text in {
        "train.py": "print('train')\n",
        "lib/model.py": "WIDTH = 64\n",
        "lib/data/loader.py": "BATCH = 32\n",
        "config.yaml": "lr: 0.1\n",
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def contents(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of each file under `folder` (read now)."""
    return {
        path.relative_to(folder).as_posix(): sha256(path.read_bytes())
        for path in folder.rglob("*")
        if path.is_file()
    }


def recorded(snap: snapshot.Snapshot) -> dict[str, str]:
    return {rel: digest for rel, (_, digest) in snap.files.items()}


def assert_true_to(snap: snapshot.Snapshot, ws: Workspace, expected: dict[str, str]) -> None:
    """The snapshot records `expected` (path -> sha256), its folder holds that content, and
    every blob holds the content it is named for."""
    assert recorded(snap) == expected
    assert contents(ws.dest()) == expected
    for blob in (ws.path / "blobs").rglob("*"):
        if blob.is_file():
            assert sha256(blob.read_bytes()) == blob.name


# -- unchanged ---------------------------------------------------------------------------------
def test_an_unchanged_tree_gives_the_same_hash_and_is_not_read_again(ws, source):
    wait_out_the_racy_window()
    first = ws.take(source)
    second = ws.take(source)

    assert first.rehashed == 4 and second.rehashed == 0
    assert second.hash == first.hash and second.files == first.files
    assert_true_to(second, ws, contents(source))
    for path in ws.dest().rglob("*"):  # the run's snapshot: read-only names of the blobs
        if path.is_file():
            assert path.stat().st_mode & 0o222 == 0
            assert os.path.samefile(path, ws.blobs.path(second.files[_rel(ws, path)][1]))


def _rel(ws: Workspace, path: Path) -> str:
    return path.relative_to(ws.dest()).as_posix()


def test_only_what_changed_is_read_again(ws, source):
    wait_out_the_racy_window()
    ws.take(source)
    (source / "lib" / "model.py").write_text("WIDTH = 128\n")
    (source / "new.py").write_text("NEW = 1\n")
    (source / "config.yaml").unlink()

    snap = ws.take(source)

    assert snap.rehashed == 2
    assert_true_to(snap, ws, contents(source))


# -- the racy-git rule -------------------------------------------------------------------------
def test_a_file_changed_within_the_same_second_is_read_again(ws, source):
    """Written, snapshotted and written again at once, with its size and mtime as before."""
    first = ws.take(source)
    path = source / "lib" / "model.py"
    before = path.stat()
    path.write_text("WIDTH = 99\n")  # the same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

    second = ws.take(source)

    assert (
        second.files["lib/model.py"][1] == sha256(b"WIDTH = 99\n") != first.files["lib/model.py"][1]
    )
    assert_true_to(second, ws, contents(source))


def _forge(ws: Workspace, source: Path, rel: str, digest: str, began_ns: int) -> None:
    """Rewrite the index as a change within the timestamp tick of the last read leaves it:
    `rel`'s entry records the file's stat data as they are now, with the `digest` of the
    content it held before."""
    index = SnapshotIndex(ws.index_dir, os.path.realpath(source)).open()
    index.new = dict(index.old)
    index.new[rel] = (stat_key(os.stat(source / rel)), digest)
    index.began_ns = began_ns
    index.save(rehashed=1)


def test_an_entry_as_recent_as_the_index_is_racy_and_read_again(ws, source):
    """git's racy-git case (Documentation/technical/racy-git.txt): the stat data match, but
    the file changed within the tick of its timestamps, after the index read it."""
    first = ws.take(source)
    old = first.files["lib/model.py"][1]
    (source / "lib" / "model.py").write_text("WIDTH = 99\n")
    changed = os.stat(source / "lib" / "model.py")

    _forge(ws, source, "lib/model.py", old, began_ns=changed.st_ctime_ns)  # the same tick
    racy = ws.take(source)

    assert racy.files["lib/model.py"][1] == sha256(b"WIDTH = 99\n")
    assert racy.rehashed >= 1
    assert_true_to(racy, ws, contents(source))

    # The same index with its entry older than the margin is trusted: the racy rule alone
    # kept the stale hash out above.
    _forge(ws, source, "lib/model.py", old, began_ns=changed.st_ctime_ns + RACY_MARGIN_NS + 1)
    trusted = ws.take(source)
    assert trusted.files["lib/model.py"][1] == old


# -- renames and links ---------------------------------------------------------------------------
def test_renamed_and_swapped_files_are_recorded_under_their_new_names(ws, source):
    (source / "a.txt").write_text("content A\n")
    (source / "b.txt").write_text("content B\n")  # the same size
    same = os.stat(source / "a.txt").st_mtime_ns
    os.utime(source / "b.txt", ns=(same, same))
    wait_out_the_racy_window()
    ws.take(source)

    os.rename(source / "a.txt", source / "swap")
    os.rename(source / "b.txt", source / "a.txt")
    os.rename(source / "swap", source / "b.txt")
    os.rename(source / "train.py", source / "main.py")
    snap = ws.take(source)

    assert snap.files["a.txt"][1] == sha256(b"content B\n")
    assert snap.files["b.txt"][1] == sha256(b"content A\n")
    assert snap.files["main.py"][1] == sha256(b"print('train')\n") and "train.py" not in snap.files
    assert snap.rehashed == 3
    assert_true_to(snap, ws, contents(source))


def test_a_file_replaced_by_a_link_inside_the_source_folder_takes_the_target_content(ws, source):
    wait_out_the_racy_window()
    ws.take(source)
    (source / "config.yaml").unlink()
    (source / "config.yaml").symlink_to("lib/model.py")

    snap = ws.take(source)

    assert snap.files["config.yaml"][1] == sha256(b"WIDTH = 64\n")
    assert_true_to(snap, ws, contents(source))
    (source / "lib" / "model.py").write_text("WIDTH = 65\n")  # the target changes: so does it
    again = ws.take(source)
    assert again.files["config.yaml"][1] == sha256(b"WIDTH = 65\n")
    assert_true_to(again, ws, contents(source))


def test_a_file_replaced_by_a_link_out_of_the_source_folder_is_left_out(ws, source, tmp_path):
    secret = tmp_path / "outside" / "secret.key"
    secret.parent.mkdir()
    secret.write_text("s3cr3t\n")
    wait_out_the_racy_window()
    ws.take(source)
    (source / "config.yaml").unlink()
    (source / "config.yaml").symlink_to(secret)

    snap = ws.take(source)

    assert "config.yaml" not in snap.files
    assert any("config.yaml is a link to" in w and "outside" in w for w in snap.warnings)
    assert not (ws.dest() / "config.yaml").exists()
    blobs = [p.read_bytes() for p in (ws.path / "blobs").rglob("*") if p.is_file()]
    assert b"s3cr3t\n" not in blobs
    assert_true_to(snap, ws, {k: v for k, v in contents(source).items() if k != "config.yaml"})


# -- the index is a cache ------------------------------------------------------------------------
def test_a_missing_index_costs_a_full_read_and_nothing_else(ws, source):
    wait_out_the_racy_window()
    first = ws.take(source)
    ws.index_file(source).unlink()

    again = ws.take(source)

    assert again.rehashed == 4 and again.hash == first.hash
    assert_true_to(again, ws, contents(source))


@pytest.mark.parametrize(
    "damage",
    ["empty", "garbage", "one byte flipped", "truncated", "a stale hash, checksum kept"],
)
def test_a_damaged_index_is_never_trusted(ws, source, damage):
    wait_out_the_racy_window()
    first = ws.take(source)
    index = ws.index_file(source)
    data = index.read_bytes()
    if damage == "empty":
        data = b""
    elif damage == "garbage":
        data = os.urandom(len(data))
    elif damage == "one byte flipped":
        data = data[:-10] + bytes([data[-10] ^ 1]) + data[-9:]
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:  # the body names another hash for a file, the header still vouches for the old
        old = first.files["train.py"][1].encode()
        data = data.replace(old, sha256(b"something else").encode())
    index.write_bytes(data)

    again = ws.take(source)

    assert again.rehashed == 4 and again.hash == first.hash
    assert_true_to(again, ws, contents(source))
    assert ws.take(source).rehashed == 0  # and a sound index was written in its place


def test_an_index_naming_a_path_for_a_hash_is_never_trusted(ws, source, tmp_path):
    """Blobs are linked by their hash relative to the store's folders: a hash in the index that
    is a path (here one from the store's `..` folder to a file outside) makes the index
    unusable, so nothing outside the store is ever linked into a snapshot."""
    outside = tmp_path / "secret.txt"
    outside.write_text("not for the snapshot\n")
    wait_out_the_racy_window()
    first = ws.take(source)
    index = ws.index_file(source)
    header, body = index.read_bytes().split(b"\n", 1)
    escape = os.path.relpath(outside, ws.path)  # "../secret.txt": from blobs/.. to it
    assert escape.startswith("..")
    body = body.replace(first.files["train.py"][1].encode(), os.fsencode(escape))
    fields = json.loads(header)
    fields["entries_sha256"] = sha256(body)  # a consistent file: only the hash is wrong
    index.write_bytes(json.dumps(fields).encode() + b"\n" + body)

    again = ws.take(source)

    assert again.rehashed == 4 and again.hash == first.hash
    assert_true_to(again, ws, contents(source))
    assert outside.stat().st_nlink == 1


def test_folders_holding_files_are_laid_out_also_under_folders_holding_only_folders(ws, tmp_path):
    source = tmp_path / "src"
    for rel in ["a/b/c/deep.py", "a/b/c/d/deeper.py", "x/y.py", "z.py", "cache/m.pyc"]:
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_text(rel)
    (source / "empty" / "inner").mkdir(parents=True)
    wait_out_the_racy_window()

    for _ in range(2):  # read, then known to the index
        snap = ws.take(source)
        laid_out = sorted(p.relative_to(ws.dest()).as_posix() for p in ws.dest().rglob("*"))
        assert laid_out == [
            "a", "a/b", "a/b/c", "a/b/c/d", "a/b/c/d/deeper.py", "a/b/c/deep.py", "x", "x/y.py",
            "z.py",
        ]  # fmt: skip
        assert sorted(snap.files) == ["a/b/c/d/deeper.py", "a/b/c/deep.py", "x/y.py", "z.py"]
    assert snap.rehashed == 0


def test_an_index_folder_that_cannot_be_made_leaves_the_snapshot_as_without_one(ws, source):
    ws.path.mkdir()
    ws.index_dir.write_text("a file in the way")

    snap = ws.take(source)

    assert snap.rehashed == 4
    assert_true_to(snap, ws, contents(source))
    assert ws.index_dir.read_text() == "a file in the way"


def test_a_blob_gone_from_the_store_is_stored_again(ws, source):
    wait_out_the_racy_window()
    first = ws.take(source)
    gone = ws.blobs.path(first.files["lib/model.py"][1])
    gone.unlink()
    (ws.path / "runs").rename(ws.path / "old-runs")  # no other name of it left

    again = ws.take(source)

    assert again.rehashed == 1 and again.hash == first.hash
    assert gone.read_bytes() == b"WIDTH = 64\n"
    assert_true_to(again, ws, contents(source))


def test_snapshots_taken_at_once_all_come_out_right_and_leave_a_sound_index(ws, source):
    """Runs started together each read the index, write a new one and rename it in place."""
    for number in range(200):
        (source / "many" / f"m{number:03d}.py").parent.mkdir(exist_ok=True)
        (source / "many" / f"m{number:03d}.py").write_text(f"N = {number}\n" * (number + 1))
    wait_out_the_racy_window()
    ws.take(source)
    (source / "lib" / "model.py").write_text("WIDTH = 128\n")
    expected = contents(source)
    script = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from expkit import snapshot\n"
        "from expkit.blobs import BlobStore\n"
        "ws, source, run = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]\n"
        "snap = snapshot.take(source, ws / 'runs' / run / 'snapshot', BlobStore(ws / 'blobs'),\n"
        "                     ws / snapshot.INDEX_FOLDER)\n"
        "print(json.dumps({p: d for p, (_, d) in snap.files.items()}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(ws.path), str(source), f"at-once-{n}"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in range(4)
    ]
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        assert json.loads(out) == expected

    after = ws.take(source)
    assert_true_to(after, ws, expected)
    assert not [p for p in ws.index_dir.iterdir() if p.name.endswith(".tmp")]


# -- reading ---------------------------------------------------------------------------------------
def test_a_file_larger_than_one_read_is_hashed_and_stored_whole(ws, source):
    big = os.urandom(WHOLE_READ_BYTES + 12345)
    (source / "weights.bin").write_bytes(big)
    (source / "copy.bin").write_bytes(big)  # the same content: one blob

    snap = ws.take(source, workers=4)

    assert snap.files["weights.bin"] == (len(big), sha256(big)) == snap.files["copy.bin"]
    assert_true_to(snap, ws, contents(source))
    assert os.path.samefile(ws.dest() / "weights.bin", ws.dest() / "copy.bin")


def test_many_files_read_by_threads_come_out_as_read_by_one(ws, tmp_path):
    source = tmp_path / "many"  # 24 MB: enough for threads to share the reading
    for number in range(400):
        path = source / f"d{number % 7}" / f"e{number % 5}" / f"f{number}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(60_000) if number % 4 else b"the same" * (number % 3))
    one = Workspace(tmp_path / "one").take(source, workers=1)
    several = ws.take(source, workers=4)

    assert several.hash == one.hash and several.files == one.files
    assert_true_to(several, ws, contents(source))


# -- ignore rules ----------------------------------------------------------------------------------
def _one_rule_at_a_time(patterns: list[str], rel: str, is_dir: bool) -> bool:
    """.expkitignore's rules as documented: each in turn, the last that matches decides."""
    result = False
    name = rel.rsplit("/", 1)[-1]
    for line in patterns:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        line = line.lstrip("!")
        if line.endswith("/") and not is_dir:
            continue
        line = line.strip("/")
        if fnmatch.fnmatchcase(rel if "/" in line else name, line):
            result = not keep
    return result


@pytest.mark.parametrize(
    "extra",
    [
        [
            "*.log", "!keep.log", "data/", "docs/*.md", "!docs/README.md", "# a comment",
            "build", "[abc]?.tmp", "!b1.tmp", "*.log",
        ],
        # names and endings only (files are decided by a set and `endswith` first)
        ["*.log", "!keep.log", "data/", "build", "!docs/README.md", "*.tmp", "!b1.tmp", "x"],
    ],
    ids=["any rules", "plain names and endings"],
)  # fmt: skip
def test_the_compiled_ignore_rules_decide_as_the_rules_one_at_a_time(extra):
    patterns = [*snapshot.ALWAYS_IGNORED, *extra]
    rels = [
        "train.py", "run.log", "keep.log", "x/keep.log", "data", "x/data", "docs/a.md",
        "docs/README.md", "docs/sub/a.md", "build", "x/build", "a1.tmp", "b1.tmp", "d1.tmp",
        "__pycache__", "m.pyc", "outputs", ".git", "weird[1].py", "a/b/c.txt", "x", "y/x",
        "build.py", "a.pyc.txt", "tmp", ".tmp",
    ]  # fmt: skip
    ignore = snapshot.Ignore(patterns)
    for rel in rels:
        for is_dir in (False, True):
            assert ignore.ignored(rel, is_dir) == _one_rule_at_a_time(patterns, rel, is_dir), (
                rel,
                is_dir,
            )


# -- end to end ------------------------------------------------------------------------------------
def test_expkit_run_says_how_many_files_were_re_hashed_and_keeps_the_index_in_the_workspace(
    expkit_cli, write_job, expkit_workspace, tmp_path
):
    job = write_job({}, script="print('ran')\n", files={"lib/a.py": "A = 1\n", "b.txt": "b\n"})
    source = job.parent / "src"
    wait_out_the_racy_window()
    before = _everything_outside(tmp_path, expkit_workspace.path)

    first = expkit_cli("run", str(job))
    second = expkit_cli("run", str(job))
    (source / "b.txt").write_text("B\n")
    third = expkit_cli("run", str(job))

    for result in (first, second, third):
        assert result.returncode == 0, result.stdout + result.stderr
    line = r"snapshot of .*src: 3 files, 21 B, {} re-hashed, \d+\.\d\ds \(hash [0-9a-f]{{16}}\)"
    assert re.search(line.format(3), first.stdout)
    assert re.search(line.format(0), second.stdout)
    assert re.search(line.format(1), third.stdout)
    index = list((expkit_workspace.path / snapshot.INDEX_FOLDER).iterdir())
    assert [p.suffix for p in index] == [".index"]
    (source / "b.txt").write_text("b\n")  # as before the runs: nothing else differs
    assert _everything_outside(tmp_path, expkit_workspace.path) == before
    history = expkit_workspace.history
    hashes = [history.runs.get(f"test_{n}").snapshot_hash for n in (1, 2, 3)]
    assert hashes[0] == hashes[1] != hashes[2]


def _everything_outside(tmp_path: Path, workspace: Path) -> dict[str, tuple]:
    """Every entry under tmp_path outside the workspace: (mode, inode, links, content)."""
    found = {}
    for path in sorted(tmp_path.rglob("*")):
        if path == workspace or workspace in path.parents:
            continue
        info = os.lstat(path)
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        found[path.relative_to(tmp_path).as_posix()] = (
            info.st_mode,
            info.st_ino,
            info.st_nlink,
            content,
        )
    return found
