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
        record = history.create_run("demo", {"experiment": "demo", "entry_script": "train.py"})
        history.add_metrics(
            record.id, [("loss", s, 1.0 / (s + 1), None, 0.0, 0) for s in range(400)]
        )
        history.finish_run(record.id, "completed")
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
    assert len(history.runs()) == 2
    truncated(project / ".expkit" / "history.db")
    with pytest.raises(UserError, match=r"history\.db is damaged"):
        for run in ("demo_1", "demo_2"):
            history.metrics(run)
            history.runs()


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
    History(Path(path)).runs()


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
    Workspace.init(path).history.runs()


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
        assert Workspace.find(start=folder).history.runs() == []
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "train.py").write_text(SCRIPT)
    (folder / "job.yaml").write_text(
        "experiment: demo\nentry_script: train.py\ncompute: {target: local, options: {slots: 8}}\n"
    )
    _all_succeed([_start(folder, "run", "job.yaml") for _ in range(PROCESSES)], "first runs")
    runs = Workspace.find(start=folder).history.runs()
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
        (["init", str(in_the_way)], "", "cannot create a workspace (Not a directory)"),
    ]
    for args, start, reason in cases:
        line = error_line(expkit_at(tmp_path, *args))
        assert line.startswith(f"expkit: error: {start}") and line.endswith(reason), line
    assert in_the_way.read_text() == "not a folder\n"
