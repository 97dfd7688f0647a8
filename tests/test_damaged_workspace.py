"""Damaged or raced workspaces: a history.db or config.json that is not what expkit wrote ends
every command with one line naming the file and what to do (exit 2), and commands creating the
same workspace at the same moment all succeed."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import bare_env, error_line
from expkit.errors import UserError
from expkit.history import History
from expkit.workspace import Workspace

SCRIPT = "print('hello')\n"


def expkit_at(folder: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`expkit ARGS` run from `folder`, finding the workspace there (no EXPKIT_WORKSPACE)."""
    return subprocess.run(
        [sys.executable, "-m", "expkit", *args],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        cwd=folder,
        env=bare_env(),
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with a workspace holding two finished runs with metrics, and a job spec."""
    (tmp_path / "train.py").write_text(SCRIPT)
    (tmp_path / "job.yaml").write_text("experiment: demo\nentry_script: train.py\n")
    workspace = Workspace.init(tmp_path)
    history = workspace.history
    for _ in range(2):
        record = history.runs.create("demo", {"experiment": "demo", "entry_script": "train.py"})
        history.metrics.add(
            record.id, [("loss", s, 1.0 / (s + 1), None, 0.0, 0) for s in range(400)]
        )
        history.runs.finish(record.id, "completed")
    history.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    history.close()
    return tmp_path


def garbage(db: Path) -> None:
    db.write_bytes(bytes(range(256)) * 16)


def text_file(db: Path) -> None:
    db.write_text("these are my notes, not a database\n")


def truncated(db: Path) -> None:
    """A real history cut after its first pages (a copy that stopped half way)."""
    assert db.stat().st_size > 4 * 4096
    with open(db, "r+b") as f:
        f.truncate(2 * 4096)


def folder_in_its_place(db: Path) -> None:
    db.unlink()
    db.mkdir()


DAMAGES = {
    "garbage": garbage,
    "text": text_file,
    "truncated": truncated,
    "folder": folder_in_its_place,
}
COMMANDS = [
    ["runs", "list"],
    ["runs", "show", "1"],
    ["run", "job.yaml"],
    ["models", "list"],
    ["metrics", "1"],
]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_history_is_named_by_every_command(project: Path, damage: str) -> None:
    db = project / ".expkit" / "history.db"
    for side in (".expkit/history.db-wal", ".expkit/history.db-shm"):
        (project / side).unlink(missing_ok=True)
    DAMAGES[damage](db)
    for args in COMMANDS:
        result = expkit_at(project, *args)
        line = error_line(result)
        assert result.returncode == 2, (args, result.stderr)
        assert line.startswith("expkit: error: .expkit/history.db "), (args, line)
        if damage == "folder":
            assert "cannot be opened" in line
        else:
            assert "is damaged" in line and "move it aside" in line, line
    assert not (project / ".expkit" / "runs").exists()  # `run` stopped before starting


def test_the_python_api_names_a_damaged_history(project: Path, monkeypatch) -> None:
    from expkit.api import Experiment

    monkeypatch.chdir(project)
    garbage(project / ".expkit" / "history.db")
    workspace = Workspace.from_config()
    with pytest.raises(UserError, match=r"\.expkit/history\.db is damaged \(file is not a"):
        Experiment(workspace, "demo").get_runs()


def test_a_history_damaged_after_opening_is_named_at_the_query(project: Path) -> None:
    """SQLite reads pages as queries need them: a file cut short while open shows at the
    query that reads the missing page, not when it was opened."""
    history = History(project / ".expkit" / "history.db")
    assert len(history.runs.recent()) == 2
    truncated(project / ".expkit" / "history.db")
    with pytest.raises(UserError, match=r"history\.db is damaged"):
        for run in ("demo_1", "demo_2"):
            history.metrics.of(run)
            history.runs.recent()


CONFIGS = {
    "not json": b'{"format": 1,',
    "an array": b"[1, 2]",
    "a number": b"7",
    "empty": b"",
    "not utf-8": b'{"format": "\xff\xfe"}',
}


@pytest.mark.parametrize("content", CONFIGS)
def test_a_damaged_config_is_named_by_every_command(project: Path, content: str) -> None:
    (project / ".expkit" / "config.json").write_bytes(CONFIGS[content])
    for args in [*COMMANDS, ["init"]]:
        result = expkit_at(project, *args)
        line = error_line(result)
        assert result.returncode == 2, (args, result.stderr)
        assert line.startswith("expkit: error: .expkit/config.json is damaged ("), line
        assert "move it aside and run `expkit init`" in line


def test_an_unreadable_config_is_named(project: Path) -> None:
    config = project / ".expkit" / "config.json"
    config.unlink()
    config.mkdir()  # unreadable as a file, whoever runs the test (root reads any mode)
    result = expkit_at(project, "init")
    assert result.returncode == 2
    assert "config.json cannot be read (Is a directory)" in error_line(result)


def test_the_python_api_names_a_damaged_config(project: Path) -> None:
    (project / ".expkit" / "config.json").write_text("[]")
    with pytest.raises(UserError, match=r"config\.json is damaged \(it holds an array"):
        Workspace.from_config(project)


def test_moving_a_damaged_history_aside_and_init_gives_a_working_workspace(project: Path) -> None:
    db = project / ".expkit" / "history.db"
    garbage(db)
    db.rename(project / "history.db.damaged")
    assert expkit_at(project, "init").returncode == 0
    result = expkit_at(project, "runs", "list")
    assert result.returncode == 0 and "no runs yet" in result.stdout


# -- races -------------------------------------------------------------------------------------
ROUNDS, PROCESSES = 10, 8


def _open_history(path: str, barrier: Any) -> None:
    barrier.wait()
    History(Path(path)).runs.recent()


def test_many_processes_opening_a_new_history_at_once_all_succeed(tmp_path: Path) -> None:
    """The schema and WAL set-up of a new database, raced: each used to fail about 1 time in
    40 with "database is locked" (SQLite's busy timeout does not cover those locks)."""
    context = multiprocessing.get_context("fork")
    for round_ in range(3 * ROUNDS):
        path = tmp_path / f"history-{round_}.db"
        barrier = context.Barrier(PROCESSES)
        workers = [
            context.Process(target=_open_history, args=(str(path), barrier))
            for _ in range(PROCESSES)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        assert [w.exitcode for w in workers] == [0] * PROCESSES, f"round {round_}"
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _init_workspace(path: str, barrier: Any) -> None:
    barrier.wait()
    Workspace.init(path).history.runs.recent()


def test_many_processes_creating_one_workspace_at_once_all_succeed(tmp_path: Path) -> None:
    """config.json was written through one shared temporary name: a rename error, or a
    config read empty, for about 1 process in 20."""
    context = multiprocessing.get_context("fork")
    for round_ in range(3 * ROUNDS):
        folder = tmp_path / f"workspace-{round_}"
        barrier = context.Barrier(PROCESSES)
        workers = [
            context.Process(target=_init_workspace, args=(str(folder), barrier))
            for _ in range(PROCESSES)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        assert [w.exitcode for w in workers] == [0] * PROCESSES, f"round {round_}"
        assert sorted(p.name for p in (folder / ".expkit").iterdir())[:2] == [
            "config.json",
            "history.db",
        ]
        assert Workspace.find(start=folder).config["format"] == 1


@pytest.mark.slow
def test_commands_creating_one_workspace_at_once_all_succeed(tmp_path: Path) -> None:
    """8 `expkit init` started together in an empty folder, 10 times; then 8 first `expkit
    run`s. The config was written through one shared temporary name (a rename error, or a
    reader seeing it empty) and the database set-up raced."""
    for round_ in range(ROUNDS):
        folder = tmp_path / f"init-{round_}"
        folder.mkdir()
        procs = [_start(folder, "init") for _ in range(PROCESSES)]
        _all_succeed(procs, f"init round {round_}")
        assert sorted(os.listdir(folder / ".expkit"))[:2] == ["config.json", "history.db"]
        assert not list((folder / ".expkit").glob("*.tmp"))
        assert Workspace.find(start=folder).history.runs.recent() == []
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "train.py").write_text(SCRIPT)
    (folder / "job.yaml").write_text(
        "experiment: demo\nentry_script: train.py\ncompute: {target: local, options: {slots: 8}}\n"
    )
    _all_succeed([_start(folder, "run", "job.yaml") for _ in range(PROCESSES)], "first runs")
    runs = Workspace.find(start=folder).history.runs.recent()
    assert sorted(r.number for r in runs) == list(range(1, PROCESSES + 1))
    assert {r.state for r in runs} == {"completed"}


def _start(folder: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "expkit", *args],
        cwd=folder,
        env=bare_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _all_succeed(procs: list[subprocess.Popen], what: str) -> None:
    errors = [(p.wait(180), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    assert [code for code, _ in errors] == [0] * len(procs), (what, errors)


def test_a_workspace_path_the_file_system_refuses_is_one_line(tmp_path: Path) -> None:
    long_name = "w" * 300
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder\n")
    cases = [
        (["--workspace", long_name, "runs", "list"], "--workspace: ", "File name too long"),
        (["init", long_name], "", "cannot create a workspace (File name too long)"),
        (["init", str(in_the_way)], "", f"workspace ({in_the_way} is a file; name a folder)"),
    ]
    for args, start, reason in cases:
        line = error_line(expkit_at(tmp_path, *args))
        assert line.startswith(f"expkit: error: {start}") and line.endswith(reason), line
    assert in_the_way.read_text() == "not a folder\n"


# -- a history that is not expkit's, or that lost rows ---------------------------------------
MODEL_SCRIPT = """\
import os, sys
os.makedirs("outputs", exist_ok=True)
with open(os.path.join("outputs", sys.argv[1] + ".txt"), "w") as f:
    f.write(sys.argv[1])
"""


@pytest.fixture
def used(tmp_path: Path) -> Path:
    """A folder whose workspace holds a real run (runs/<id>/) that registered model m:1."""
    (tmp_path / "train.py").write_text(MODEL_SCRIPT)
    (tmp_path / "job.yaml").write_text(
        "experiment: demo\nentry_script: train.py\nargs: [old]\nmodel: {name: m}\n"
    )
    assert expkit_at(tmp_path, "init").returncode == 0
    result = expkit_at(tmp_path, "run", "job.yaml")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".expkit" / "models" / "m" / "1" / "old.txt").is_file()
    return tmp_path


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _empty_file(db: Path) -> None:
    db.write_bytes(b"")


def _unrelated_table(db: Path) -> None:
    db.unlink()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE x (a)")


def _another_programs_runs(db: Path) -> None:
    """Another tool's database (MLflow's has `experiments` and a `runs` of its own)."""
    db.unlink()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE experiments (experiment_id INTEGER, name TEXT)")
        conn.execute("CREATE TABLE runs (run_uuid TEXT, status TEXT)")


def _another_programs_application_id(db: Path) -> None:
    db.unlink()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA application_id=1234")


FOREIGN = {
    "empty file": (_empty_file, "is empty, but the workspace holds runs or models"),
    "unrelated table": (_unrelated_table, "is not an expkit history (it is a SQLite database"),
    "another program's runs table": (_another_programs_runs, "with tables experiments"),
    "another application_id": (_another_programs_application_id, "application_id 1234"),
}


@pytest.mark.parametrize("kind", FOREIGN)
def test_a_database_that_is_not_the_workspaces_history_is_refused(used: Path, kind: str) -> None:
    """An empty file or another program's SQLite database was taken as a new history and
    written to; the next run reused run id demo_1's folder (FileExistsError), or failed
    with "no such column: experiment"."""
    ws = used / ".expkit"
    for side in ("history.db-wal", "history.db-shm"):
        (ws / side).unlink(missing_ok=True)
    make, expected = FOREIGN[kind]
    make(ws / "history.db")
    before, content = _listing(ws), (ws / "history.db").read_bytes()
    for args in (["runs", "list"], ["run", "job.yaml"], ["models", "list"]):
        result = expkit_at(used, *args)
        line = error_line(result)
        assert result.returncode == 2, (args, result.stderr)
        assert line.startswith("expkit: error: .expkit/history.db "), line
        assert expected in line and "expkit init" in line, line
    assert (ws / "history.db").read_bytes() == content
    assert _listing(ws) == before


def test_an_older_workspaces_history_is_marked_as_expkits(used: Path) -> None:
    """A history written before the application_id mark (0) is expkit's: kept and marked."""
    db = used / ".expkit" / "history.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA application_id=0")
    result = expkit_at(used, "runs", "list")
    assert result.returncode == 0 and "demo_1" in result.stdout, result.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] != 0


def test_a_history_that_lost_its_rows_never_reuses_a_folder(used: Path) -> None:
    """Following the advice (move the history aside, `expkit init`) gave the next run the
    id demo_1 again (its folder still held the old run) and registered m:1 in a folder that
    still held the old model's files."""
    ws = used / ".expkit"
    (ws / "history.db").rename(used / "history.db.old")
    for side in ("history.db-wal", "history.db-shm"):
        (ws / side).unlink(missing_ok=True)
    old_run = _listing(ws / "runs" / "demo_1")
    assert expkit_at(used, "init").returncode == 0
    result = expkit_at(used, "run", "job.yaml", "--set", "args=[new]")
    assert result.returncode == 0, result.stderr
    assert _listing(ws / "runs" / "demo_1") == old_run
    assert sorted(os.listdir(ws / "models" / "m")) == ["1", "2"]
    assert os.listdir(ws / "models" / "m" / "1") == ["old.txt"]
    assert os.listdir(ws / "models" / "m" / "2") == ["new.txt"]
    shown = expkit_at(used, "models", "show", "m")
    assert shown.returncode == 0 and "models/m/2" in shown.stdout, shown.stdout
    listed = expkit_at(used, "runs", "list")
    assert "demo_2" in listed.stdout and "demo_1" not in listed.stdout


def test_a_version_folder_holding_other_files_is_moved_aside(used: Path) -> None:
    """A version's folder never shows files its record does not name."""
    folder = used / ".expkit" / "models" / "m" / "1"
    (folder / "stray.txt").write_text("not m:1's\n")
    shown = expkit_at(used, "models", "show", "m:1")
    assert shown.returncode == 0, shown.stderr
    assert os.listdir(folder) == ["old.txt"]
    assert (folder.parent / "1.unrecorded" / "stray.txt").read_text() == "not m:1's\n"


def _fifo(db: Path) -> None:
    db.unlink()
    os.mkfifo(db)


def _link_to_dev_null(db: Path) -> None:
    db.unlink()
    db.symlink_to("/dev/null")


NOT_FILES = {"a FIFO": (_fifo, "is a FIFO"), "a link to /dev/null": (_link_to_dev_null, "device")}


@pytest.mark.parametrize("kind", NOT_FILES)
def test_a_history_that_is_not_a_regular_file_is_one_line(project: Path, kind: str) -> None:
    """Was `internal error: OperationalError: disk I/O error` (or a hang on the FIFO)."""
    make, expected = NOT_FILES[kind]
    make(project / ".expkit" / "history.db")
    for args in (["runs", "list"], ["run", "job.yaml"]):
        result = expkit_at(project, *args, timeout=60)
        line = error_line(result)
        assert result.returncode == 2
        assert line.startswith("expkit: error: .expkit/history.db is ") and expected in line


def _config_fifo(config: Path) -> None:
    config.unlink()
    os.mkfifo(config)


def _config_link(target: str):
    def make(config: Path) -> None:
        config.unlink()
        config.symlink_to(target)

    return make


def _config_folder(config: Path) -> None:
    config.unlink()
    config.mkdir()


def _config_huge(config: Path) -> None:
    config.write_text('{"format": 1, "pad": "' + "x" * (2 * 1024 * 1024) + '"}')


CONFIG_KINDS = {
    "a FIFO": (_config_fifo, "is damaged (it is a FIFO)"),
    "a link to /dev/zero": (_config_link("/dev/zero"), "is damaged (it is a device)"),
    "a link to /dev/null": (_config_link("/dev/null"), "is damaged (it is a device)"),
    "a folder": (_config_folder, "cannot be read (Is a directory)"),
    "2 MiB": (_config_huge, "more than a workspace's config may be: 1024 KiB"),
}


@pytest.mark.parametrize("kind", CONFIG_KINDS)
def test_a_config_that_is_not_a_small_regular_file_is_named(project: Path, kind: str) -> None:
    """`expkit init` hung on a FIFO or /dev/zero; `runs list` said "no expkit workspace"
    for a folder, a FIFO or a link to /dev/null instead of naming the damaged file."""
    make, expected = CONFIG_KINDS[kind]
    make(project / ".expkit" / "config.json")
    for args in (["init"], ["runs", "list"], ["run", "job.yaml"]):
        result = expkit_at(project, *args, timeout=60)
        line = error_line(result)
        assert result.returncode == 2, (args, result.stderr)
        assert line.startswith("expkit: error: .expkit/config.json "), line
        assert expected in line, line
