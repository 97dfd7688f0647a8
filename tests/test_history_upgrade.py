"""A workspace made by an older expkit opens and is upgraded in place; one made by a newer
expkit is refused before anything is written to it.

tests/fixtures/workspace_v0 was made by expkit before its history had a version, workspace_v2 by
expkit at history version 2, before parameters (step 3) were recorded, workspace_v3 before
sweeps (step 4), workspace_v4 before attempts (step 5), workspace_v5 before model aliases and
registrations (step 6), workspace_v6 before metric row groups (step 7) (see
tests/fixtures/make_workspace.py).
Each holds three runs of experiment `fixture` (1 and 3 completed and registered `digits` versions
1 and 2, 2 failed with exit code 3; their job had `args`), each with metrics (steps, a number, a
string, a table row), a tag and an output, and an export of fixture_3.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import pytest

import test_signals_and_disk as disk
from conftest import bare_env, error_line
from expkit.history import schema
from expkit.workspace import Workspace

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "workspace_v0"
small_disk = disk.small_disk  # a real 16 MiB tmpfs (root only)
RUNS = {"fixture_1": "completed", "fixture_2": "failed", "fixture_3": "completed"}


def expkit_at(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`expkit ARGS` run from `folder`, finding the workspace there."""
    return subprocess.run(
        [sys.executable, "-m", "expkit", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=folder,
        env=bare_env(),
        stdin=subprocess.DEVNULL,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def user_version(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def state_of(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of the workspace folder, with its bytes and modification time; SQLite's
    shared-memory index (rebuilt by every reader) and an empty write-ahead log left out."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.suffix != ".db-shm"
        and not (p.suffix == ".db-wal" and not p.stat().st_size)
    }


def settle(db: Path) -> None:
    """Write what the log holds into the database file, as the last connection's close does."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def copy_of(version: int, folder: Path) -> Path:
    """`folder`, a project folder whose workspace is a copy of the version-`version` fixture."""
    shutil.copytree(FIXTURES / f"workspace_v{version}", folder / ".expkit", symlinks=True)
    assert user_version(folder / ".expkit" / "history.db") == version
    return folder


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """A project folder whose workspace is a copy of the version-0 fixture."""
    return copy_of(0, tmp_path)


@pytest.mark.parametrize("version", [0, 2, 3, 4, 5, 6])
def test_an_old_workspace_shows_every_run_metric_tag_and_model(
    version: int, tmp_path: Path
) -> None:
    old = copy_of(version, tmp_path)
    listed = ok(expkit_at(old, "runs", "list")).splitlines()
    assert {line.split()[0]: line.split()[1] for line in listed[1:]} == RUNS

    shown = ok(expkit_at(old, "runs", "show", "fixture_3"))
    for expected in ("completed", "model digits version 2", "warmup done", "seed", "onnx"):
        assert expected in shown, shown
    failed = ok(expkit_at(old, "runs", "show", "fixture_2"))
    assert "the script exited with code 3" in failed and "register      skipped" in failed

    metrics = [line.split()[:3] for line in ok(expkit_at(old, "metrics", "fixture_1")).split("\n")]
    assert ["loss", "2", "0.3333"] in metrics and ["acc", "-", "0.5"] in metrics
    assert ["note", "-", "warmup"] in metrics and ["per_class", "-", "{'cls':"] in metrics

    models = [line.split()[:3] for line in ok(expkit_at(old, "models", "list")).splitlines()]
    assert models[1:] == [["digits", "1", "fixture_1"], ["digits", "2", "fixture_3"]]
    model = ok(expkit_at(old, "models", "show", "digits"))
    assert "version     2" in model and "model.pt" in model and "stage             dev" in model
    assert "aliases     -" in model and "registered in" not in model

    history = Workspace(old / ".expkit").history
    try:
        assert {r.id: r.state for r in history.runs.recent()} == RUNS
        assert history.runs.get("fixture_2").exit_code == 3
        for run_id in RUNS:
            assert [r["step"] for r in history.metrics.of(run_id, "loss")] == [0, 1, 2]
            assert history.tags.of(run_id) == {"seed": "7"}
            assert list(history.outputs.of(run_id)) == ["model.pt"]
        assert history.metrics.latest("fixture_1") == {
            "loss": pytest.approx(1 / 3),
            "acc": 0.5,
            "note": "warmup done",
            "per_class": {"cls": 0, "precision": 0.5},
        }
        versions = [(m["name"], m["version"], m["run_id"]) for m in history.models.versions()]
        assert versions == [("digits", 1, "fixture_1"), ("digits", 2, "fixture_3")]
        assert list(history.models.files("digits", 2)) == ["model.pt"]
        (export,) = history.exports.of("fixture_3")
        assert (export.format, export.ok, list(export.files)) == ("onnx", True, ["model.onnx"])
        # Step 2: runs that outlive their driver, and how far a run's metric channel was read.
        assert history.runs.get("fixture_1").remote_job is None
        channel = old / ".expkit" / "runs" / "fixture_1" / "metrics"
        read = {f.name: f.stat().st_size for f in channel.glob("*.jsonl")}  # read to the end
        assert history.metrics.offsets_of("fixture_1") == (read if version >= 2 else {})
        history.metrics.add("fixture_1", [("late", 3, 1.0, None, 0.0, 0)], {"0.jsonl": 42})
        assert history.metrics.offsets_of("fixture_1") == {
            **(read if version >= 2 else {}),
            "0.jsonl": 42,
        }
        # Step 3: parameters (the job's args, from version 3 on), sinks' cursors.
        for run_id in RUNS:
            assert history.params.of(run_id) == ({"args": ANY} if version >= 3 else {})
            assert history.sink_cursors.get(run_id, "mlflow") == (0, 0)
        # Step 4: sweeps (none yet); the old runs are trials of none.
        assert history.sweeps.recent() == []
        assert {(r.sweep, r.trial, r.cancel_reason) for r in map(history.runs.get, RUNS)} == {
            (None, None, None)
        }
        # Step 6: aliases (none yet) and registrations elsewhere (none were recorded).
        assert history.aliases.of_model("digits") == {}
        assert history.registrations.of("digits", 2) == []
    finally:
        history.close()
    assert user_version(old / ".expkit" / "history.db") == schema.latest()


def test_a_version_5_workspace_takes_aliases_of_its_old_versions(tmp_path: Path) -> None:
    """Step 6 on a workspace made just before it: an old version takes an alias, is named
    by it, and a new run's version takes the job's alias from it."""
    old = copy_of(5, tmp_path)
    assert ok(expkit_at(old, "models", "alias", "digits:1", "champion")).strip() == (
        "digits@champion -> version 1"
    )
    assert "version     1" in ok(expkit_at(old, "models", "show", "digits@champion"))
    (old / "train.py").write_text(
        "import os\nos.makedirs('outputs', exist_ok=True)\n"
        "open('outputs/model.pt', 'w').write('new')\n"
    )
    (old / "job.yaml").write_text(
        "experiment: fixture\nentry_script: train.py\n"
        "model: {name: digits, path: outputs/model.pt, aliases: [champion]}\n"
    )
    ok(expkit_at(old, "run", "job.yaml"))
    listed = [line.split() for line in ok(expkit_at(old, "models", "list")).splitlines()]
    assert [(row[1], row[-1]) for row in listed[1:]] == [
        ("1", "0.5"),
        ("2", "0.9"),
        ("3", "@champion"),
    ]
    assert user_version(old / ".expkit" / "history.db") == schema.latest()


def test_a_version_6_workspace_reads_its_values_and_groups_new_ones_after_them(
    tmp_path: Path,
) -> None:
    """Step 7 on a workspace made just before it: the values stored one a row read as
    before, and values the pump adds to the same run (row groups) come after them, by value
    id, in `of`, pages, `count`, `latest` and `expkit metrics`."""
    old = copy_of(6, tmp_path)
    history = Workspace(old / ".expkit").history
    try:
        before = history.metrics.of("fixture_1")
        assert [r["step"] for r in history.metrics.of("fixture_1", "loss")] == [0, 1, 2]
        rows = [("loss", step, step / 10, 1.0, 0) for step in range(3, 1003)]
        assert history.metrics.add_values("fixture_1", [(1, rows)]) == 1000
        after = history.metrics.of("fixture_1")
        assert after[: len(before)] == before and len(after) == len(before) + 1000
        assert history.metrics.count("fixture_1") == len(after)
        assert history.metrics.span("fixture_1") == (after[0]["id"], after[-1]["id"])
        pages, last = [], 0
        while page := history.metrics.of("fixture_1", "loss", after_id=last, limit=100):
            pages += [r["step"] for r in page]
            last = page[-1]["id"]
        assert pages == list(range(1003))
        assert history.metrics.latest("fixture_1")["loss"] == 100.2
    finally:
        history.close()
    lines = ok(expkit_at(old, "metrics", "fixture_1", "loss")).splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [["loss", str(s)] for s in range(1003)]


def test_an_upgraded_workspace_takes_new_runs_and_versions(old: Path) -> None:
    (old / "train.py").write_text(
        "import os\nos.makedirs('outputs', exist_ok=True)\n"
        "open('outputs/model.pt', 'w').write('new')\n"
    )
    (old / "job.yaml").write_text(
        "experiment: fixture\nentry_script: train.py\n"
        "model: {name: digits, path: outputs/model.pt}\n"
    )
    ok(expkit_at(old, "run", "job.yaml"))
    listed = ok(expkit_at(old, "runs", "list")).splitlines()
    assert listed[1].split()[:2] == ["fixture_4", "completed"]
    models = ok(expkit_at(old, "models", "list")).splitlines()
    assert models[-1].split()[:3] == ["digits", "3", "fixture_4"]


def test_a_version_2_workspace_takes_parameters_and_keeps_its_runs(tmp_path: Path) -> None:
    """Step 3 on a workspace made just before it: its runs show no parameters (none were
    recorded; their `args` are still in the job), and new runs record theirs."""
    old = copy_of(2, tmp_path)

    details = json.loads(ok(expkit_at(old, "runs", "show", "fixture_3", "--json")))
    assert (details["state"], details["params"], details["param_sources"]) == (
        "completed",
        {},
        {},
    )
    assert details["metrics"]["acc"] == 0.9 and details["tags"] == {"seed": "7"}
    assert "\nparams" not in ok(expkit_at(old, "runs", "show", "fixture_1"))
    listed = ok(expkit_at(old, "runs", "list", "--param", "lr", "--metric", "acc"))
    assert listed.splitlines()[0].split()[-2:] == ["lr", "acc"]
    assert {line.split()[0]: line.split()[-1] for line in listed.splitlines()[1:]} == {
        "fixture_3": "0.9",
        "fixture_2": "-1",
        "fixture_1": "0.5",
    }  # blank lr: the column's last word is acc
    assert user_version(old / ".expkit" / "history.db") == schema.latest()

    (old / "train.py").write_text(
        "from expkit import Run\nRun.get_context().log_params({'seed': 11})\n"
    )
    (old / "job.yaml").write_text(
        "experiment: fixture\nentry_script: train.py\nargs: {lr: 0.01, epochs: 2}\n"
    )
    ok(expkit_at(old, "run", "job.yaml"))
    details = json.loads(ok(expkit_at(old, "runs", "show", "fixture_4", "--json")))
    assert details["params"] == {"lr": "0.01", "epochs": "2", "seed": "11"}
    assert details["param_sources"] == {"lr": "job", "epochs": "job", "seed": "script"}


def test_a_second_open_writes_nothing(old: Path) -> None:
    ok(expkit_at(old, "runs", "list"))  # upgrades
    assert user_version(old / ".expkit" / "history.db") == schema.latest()
    settle(old / ".expkit" / "history.db")
    before = state_of(old / ".expkit")
    for args in (["runs", "list"], ["runs", "show", "latest"], ["models", "list"]):
        ok(expkit_at(old, *args))
    assert state_of(old / ".expkit") == before

    writer = sqlite3.connect(old / ".expkit" / "history.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another command writing: a reader does not wait for it
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "expkit", "runs", "list"],
            capture_output=True,
            text=True,
            timeout=30,  # an open that took the write lock would wait 60 s for it
            cwd=old,
            env=bare_env(),
        )
        assert listed.returncode == 0 and "fixture_3" in listed.stdout, listed.stderr
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_commands_opening_an_old_workspace_at_once_all_succeed(old: Path) -> None:
    command = [sys.executable, "-m", "expkit", "runs", "list"]
    started = [
        subprocess.Popen(command, cwd=old, env=bare_env(), stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    for process in started:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0 and "fixture_3" in out
    assert user_version(old / ".expkit" / "history.db") == schema.latest()


def test_a_history_from_a_newer_expkit_is_refused_and_left_as_it_is(old: Path) -> None:
    db = old / ".expkit" / "history.db"
    newer = schema.latest() + 1
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version={newer}")
    conn.close()
    settle(db)
    (old / "train.py").write_text("print('hello')\n")
    (old / "job.yaml").write_text("experiment: fixture\nentry_script: train.py\n")
    before = state_of(old / ".expkit")
    for args in (["runs", "list"], ["models", "list"], ["run", "job.yaml"]):
        result = expkit_at(old, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert error_line(result) == (
            f"expkit: error: .expkit/history.db: made by a newer expkit (history version "
            f"{newer}, this expkit reads up to {schema.latest()}); upgrade expkit "
            "(pip install -U expkit)"
        )
    assert state_of(old / ".expkit") == before


def test_a_step_appended_to_the_schema_reaches_old_and_current_workspaces(
    old: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How the next schema change (a column for Slurm job ids, retries) will be taken."""
    current = Workspace.init(tmp_path / "current")  # made at today's version
    current.history.close()
    step = (
        "ALTER TABLE runs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;"
        "CREATE INDEX IF NOT EXISTS runs_by_state ON runs (state)"
    )
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, step])
    fresh = tmp_path / "fresh"
    for folder in (old / ".expkit", current.path, fresh):
        history = Workspace.init(folder).history
        try:
            (version,) = history.db.execute("PRAGMA user_version").fetchone()
            assert version == len(schema.MIGRATIONS)
            columns = [row[1] for row in history.db.execute("PRAGMA table_info(runs)")]
            assert columns[-1] == "retries"
            record = history.runs.create("fixture", {"entry_script": "train.py"})
            history.runs.finish(record.id, "completed")
            retries = history.db.execute("SELECT id, retries FROM runs").fetchall()
            assert all(count == 0 for _, count in retries) and record.id in dict(retries)
            assert history.runs.get(record.id).state == "completed"
        finally:
            history.close()
    assert len(Workspace(old / ".expkit").history.runs.recent()) == 4


def test_an_old_workspace_on_a_full_disk_is_named_not_half_upgraded(small_disk: Path) -> None:
    """Upgrading writes; on a full disk the command stops with one line saying so, and the
    workspace is upgraded by the first command once there is room."""
    shutil.copytree(FIXTURE, small_disk / ".expkit", symlinks=True)
    disk.fill(small_disk / "filler.bin")
    before = state_of(small_disk / ".expkit")
    result = expkit_at(small_disk, "runs", "list")
    assert result.returncode == 2, result.stdout + result.stderr
    line = error_line(result)
    assert line.startswith("expkit: error: .expkit/history.db: this expkit must upgrade"), line
    assert "disk holding it is full; free some space" in line, line
    assert state_of(small_disk / ".expkit") == before
    (small_disk / "filler.bin").unlink()
    assert "fixture_3" in ok(expkit_at(small_disk, "runs", "list"))
    assert user_version(small_disk / ".expkit" / "history.db") == schema.latest()


def test_a_failing_step_leaves_the_workspace_as_it_was(
    old: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The steps run in one transaction: a step that fails undoes the ones before it."""
    db = old / ".expkit" / "history.db"
    good = "ALTER TABLE runs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0"
    bad = "ALTER TABLE no_such_table ADD COLUMN x TEXT"
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, good, bad])
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        Workspace(old / ".expkit").history  # noqa: B018 - opening upgrades
    assert user_version(db) == 0
    with sqlite3.connect(db) as conn:
        assert "retries" not in [row[1] for row in conn.execute("PRAGMA table_info(runs)")]
