"""The source snapshot on a large tree, side by side with git on the same tree.

    python benchmarks/bench_snapshot.py [--files 20000] [--megabytes 200] [--repeat 3] [--quick]
                                        [--dir FOLDER] [--workers N]

A tree of `--files` files holding `--megabytes` MB in all (sizes spread from a few bytes to a
few MB, in nested folders, content random so nothing is shared) is made in a temporary folder,
then left alone past snapindex.RACY_MARGIN_NS (as a tree edited a while before the run). On it,
each measured `--repeat` times, expkit and git alternating, the median wall time of each:

- first snapshot: `snapshot.take` into a fresh workspace (every file read, hashed, copied into
  the blob store, hard-linked into the run's snapshot/, the index written), against
  `git add -A` into a fresh repository (every file read, hashed, compressed into .git/objects,
  the index written);
- unchanged tree: the next snapshot (the index finds every file unchanged: re-hashed 0, each
  blob linked into the new run's snapshot/), against `git status --porcelain`; and the same
  snapshot without the index (every file read again: what the index saves);
- one file changed: one file's content rewritten, then the next snapshot (re-hashed 1) against
  `git add -A` (git hashes the one file, writes its index);
- working copy: `snapshot.working_copy` (the run's writable copy of its snapshot) against
  `cp -r` of the tree;
- where an unchanged tree's snapshot spends its time: one more snapshot, its phases timed in
  this process (the index read, the walk listing folders and reading stat data, making and
  opening the run's folders, the hard links, the index look-ups, the rest), by wrapping
  expkit's own functions for that one snapshot (the wrappers add a few ms to it).

The repository's .git lives beside the tree (GIT_DIR and GIT_WORK_TREE), never in it; the tree
is this benchmark's own. expkit is timed in this process (the peers are commands: their
process start, a few ms, is in their figures). Prints a table (figures, ratio expkit / peer)
and the figures as JSON on the last line. Timings on a machine whose other load changes are
noisy: the ratio, from interleaved runs, is the figure to compare. `--dir` puts the
temporary folder elsewhere (`/dev/shm`: a file system in memory, to take the disk out).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "framework"))

from expkit import blobs, snapindex, snapshot  # noqa: E402
from expkit.blobs import BlobStore  # noqa: E402
from expkit.snapindex import RACY_MARGIN_NS  # noqa: E402

FILES_PER_FOLDER = 20


def make_tree(root: Path, files: int, total_bytes: int, seed: int = 17) -> int:
    """`files` files of random content, `total_bytes` in all (log-normal sizes: mostly a few
    KB, some MB), FILES_PER_FOLDER to a folder, folders nested up to a dozen deep. Returns
    the number of folders."""
    rng = random.Random(seed)
    weights = [rng.lognormvariate(0, 1.5) for _ in range(files)]
    scale = total_bytes / sum(weights)
    folders = [root]
    root.mkdir(parents=True)
    suffixes = [".py", ".txt", ".json", ".bin", ".yaml"]
    for number, weight in enumerate(weights):
        if number % FILES_PER_FOLDER == 0:
            parent = rng.choice(folders[-50:]) if rng.random() < 0.7 else root
            folder = parent / f"pkg{number // FILES_PER_FOLDER:05d}"
            folder.mkdir()
            folders.append(folder)
        name = f"mod{number:06d}{rng.choice(suffixes)}"
        (folders[-1] / name).write_bytes(rng.randbytes(max(1, round(weight * scale))))
    return len(folders)


def timed(action: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def git(tree: Path, git_dir: Path, *args: str) -> Callable[[], object]:
    env = {**os.environ, "GIT_DIR": str(git_dir), "GIT_WORK_TREE": str(tree)}
    env.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost")

    def run() -> object:
        return subprocess.run(
            ["git", *args], env=env, check=True, stdout=subprocess.DEVNULL, cwd=tree
        )

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20_000, help="files in the tree (20,000)")
    parser.add_argument("--megabytes", type=float, default=200, help="its size in MB (200)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians shown (3)")
    parser.add_argument("--quick", action="store_true", help="2,000 files, 20 MB")
    parser.add_argument("--workers", type=int, default=None, help="expkit's threads")
    parser.add_argument("--dir", default=None, help="where the temporary folder goes")
    args = parser.parse_args()
    if args.quick:
        args.files, args.megabytes = 2_000, 20
    if shutil.which("git") is None:
        raise SystemExit("git is not on PATH: it is the peer this benchmark compares with")
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-", dir=args.dir) as tmp:
        figures = bench(Path(tmp), args.files, round(args.megabytes * 1e6), args)
    report(figures, args.files, args.megabytes)


def bench(tmp: Path, files: int, total: int, args: argparse.Namespace) -> dict[str, dict]:
    tree = tmp / "tree"
    started = time.perf_counter()
    folders = make_tree(tree, files, total)
    print(
        f"tree: {files:,} files, {total / 1e6:,.0f} MB, {folders:,} folders, made in "
        f"{time.perf_counter() - started:.1f}s",
        flush=True,
    )
    time.sleep(RACY_MARGIN_NS / 1e9 + 0.5)  # out of the racy window: edited a while ago
    runs = iter(range(1_000_000))

    def take(workspace: Path, index: bool = True) -> snapshot.Snapshot:
        return snapshot.take(
            tree,
            workspace / "runs" / str(next(runs)) / "snapshot",
            BlobStore(workspace / "blobs"),
            workspace / snapshot.INDEX_FOLDER if index else None,
            workers=args.workers,
        )

    rows: dict[str, dict] = {}

    def row(name: str, peer: str, ours: list[float], theirs: list[float], **extra) -> None:
        rows[name] = {
            "expkit_s": round(statistics.median(ours), 4),
            "peer": peer,
            "peer_s": round(statistics.median(theirs), 4),
            **extra,
        }
        rows[name]["ratio"] = round(rows[name]["expkit_s"] / rows[name]["peer_s"], 2)
        print(f"  {name}: expkit {ours}, {peer} {theirs}", flush=True)

    # first snapshot vs git add -A, each into a fresh workspace / repository
    ours, theirs, rehashed = [], [], []
    for attempt in range(args.repeat):
        workspace, git_dir = tmp / f"ws{attempt}", tmp / f"git{attempt}"
        seconds, snap = timed(lambda workspace=workspace: take(workspace))
        ours.append(round(seconds, 3))
        rehashed.append(snap.rehashed)  # type: ignore[attr-defined]
        git(tree, git_dir, "init", "-q")()
        theirs.append(round(timed(git(tree, git_dir, "add", "-A"))[0], 3))
        if attempt:  # one workspace and one repository are kept for the next rows
            shutil.rmtree(workspace)
            shutil.rmtree(git_dir)
    row("first snapshot", "git add -A", ours, theirs, rehashed=rehashed)
    workspace, git_dir = tmp / "ws0", tmp / "git0"

    # unchanged tree: the next snapshot vs git status; and without the index
    ours, theirs, without, rehashed = [], [], [], []
    for _ in range(args.repeat):
        seconds, snap = timed(lambda: take(workspace))
        ours.append(round(seconds, 3))
        rehashed.append(snap.rehashed)  # type: ignore[attr-defined]
        theirs.append(round(timed(git(tree, git_dir, "status", "--porcelain"))[0], 3))
        without.append(round(timed(lambda: take(workspace, index=False))[0], 3))
    row("unchanged tree", "git status", ours, theirs, rehashed=rehashed)
    rows["unchanged tree"]["without_index_s"] = round(statistics.median(without), 4)
    print(f"  unchanged tree without the index: {without}", flush=True)

    rows["unchanged tree"]["phases_s"] = phases(lambda: take(workspace))
    print(f"  unchanged tree, phases: {rows['unchanged tree']['phases_s']}", flush=True)

    # one file changed: the next snapshot vs git add -A
    ours, theirs, rehashed = [], [], []
    everything = sorted(path for path in tree.rglob("*") if path.is_file())
    changed = everything[len(everything) // 2]
    for _ in range(args.repeat):
        changed.write_bytes(os.urandom(changed.stat().st_size))
        seconds, snap = timed(lambda: take(workspace))
        ours.append(round(seconds, 3))
        rehashed.append(snap.rehashed)  # type: ignore[attr-defined]
        theirs.append(round(timed(git(tree, git_dir, "add", "-A"))[0], 3))
    row("one file changed", "git add -A", ours, theirs, rehashed=rehashed)

    # the working copy of a run's snapshot vs cp -r of the tree
    ours, theirs = [], []
    snap_dir = workspace / "runs" / "0" / "snapshot"
    for attempt in range(args.repeat):
        work, copy = tmp / f"work{attempt}", tmp / f"copy{attempt}"
        made = timed(lambda work=work: snapshot.working_copy(snap_dir, work, args.workers))
        ours.append(round(made[0], 3))
        copied = timed(lambda copy=copy: subprocess.run(["cp", "-r", tree, copy], check=True))
        theirs.append(round(copied[0], 3))
        shutil.rmtree(work)
        shutil.rmtree(copy)
    row("working copy", "cp -r", ours, theirs)
    return rows


PHASES = {  # phase -> the functions whose time is its time (module, attribute path); one
    # missing from the code measured is left out (its time is then in the rest)
    "index read": [(snapindex, "SnapshotIndex.open")],
    "walk": [(snapshot, "_walk")],
    "folders": [(snapshot, "_Layout.folder")],
    "links": [(blobs, "BlobLinker.place"), (snapshot, "_Layout.link")],
    "look-ups": [(snapindex, "SnapshotIndex.lookup"), (snapshot, "stat_key")],
    "index write": [(snapindex, "SnapshotIndex.save")],
}


def phases(action: Callable[[], object]) -> dict[str, float]:
    """Seconds `action` (one snapshot) spends in each of PHASES, and the rest, timed by
    wrapping those functions for the while."""
    spent = dict.fromkeys(PHASES, 0.0)
    saved = []

    def timing(phase: str, function: Callable) -> Callable:
        def timed_call(*args, **kwargs):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[phase] += time.perf_counter() - started

        def timed_walk(*args, **kwargs):  # type: ignore[no-untyped-def]
            walk = function(*args, **kwargs)
            while True:  # the time inside the walk, not in what the caller does between
                started = time.perf_counter()
                try:
                    item = next(walk)
                except StopIteration:
                    return
                finally:
                    spent[phase] += time.perf_counter() - started
                yield item

        return timed_walk if phase == "walk" else timed_call

    for phase, functions in PHASES.items():
        for module, attribute in functions:
            *path, name = attribute.split(".")
            owner = module
            for step in path:
                owner = getattr(owner, step, None)
            function = getattr(owner, name, None)
            if function is not None:
                saved.append((owner, name, function))
                setattr(owner, name, timing(phase, function))
    try:
        total = timed(action)[0]
    finally:
        for owner, name, function in saved:
            setattr(owner, name, function)
    figures = {phase: round(seconds, 4) for phase, seconds in spent.items()}
    figures["rest"] = round(total - sum(spent.values()), 4)
    figures["total"] = round(total, 4)
    return figures


def report(rows: dict[str, dict], files: int, megabytes: float) -> None:
    print()
    print(f"{'':<20} {'expkit':>9} {'peer':>12} {'':>9} {'ratio':>7}  re-hashed")
    for name, figures in rows.items():
        rehashed = figures.get("rehashed", "")
        print(
            f"{name:<20} {figures['expkit_s']:>8.3f}s {figures['peer']:>12} "
            f"{figures['peer_s']:>8.3f}s {figures['ratio']:>6.2f}x  {rehashed}"
        )
    unchanged = rows["unchanged tree"]
    print(f"{'(without the index)':<20} {unchanged['without_index_s']:>8.3f}s")
    print(
        "unchanged tree, in-process phases: "
        + ", ".join(f"{phase} {seconds:.3f}s" for phase, seconds in unchanged["phases_s"].items())
    )
    print(json.dumps({"files": files, "megabytes": megabytes, **rows}))


if __name__ == "__main__":
    main()
