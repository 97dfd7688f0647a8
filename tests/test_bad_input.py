"""Job specs that used to break the parser: each kind ends with one line naming the file and
the field, exit 2, before anything is created (no internal error, traceback, stall or memory
blow-up). Driven through the real `expkit run --dry-run` and `expkit run`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import bare_env
from expkit.workspace import Workspace

BASE = "experiment: bad-input\nentry_script: train.py\n"
LAUGHS = "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" if i else 'l0: &l0 ["lol"]\n'
    for i in range(10)
)


def _bytes(text: str) -> bytes:
    return text.encode()


# name -> (job file bytes, --set items, what the one line says)
CASES: dict[str, tuple[bytes, list[str], str]] = {
    "non-UTF-8 file": (
        b"experiment: caf\xe9\nentry_script: train.py\n",
        [],
        "job.yaml: line 1: not UTF-8 text (byte 0xe9); save it as UTF-8",
    ),
    "a thousand levels of lists": (
        _bytes(BASE + "args: {x: " + "[" * 1000 + "]" * 1000 + "}\n"),
        [],
        "not valid YAML: nested more than 100 levels deep",
    ),
    "a thousand levels of mappings": (
        _bytes(BASE + "args: " + "{a: " * 1000 + "1" + "}" * 1000 + "\n"),
        [],
        "not valid YAML: nested more than 100 levels deep",
    ),
    "billion laughs": (
        _bytes(BASE + "args:\n" + "".join("  " + line + "\n" for line in LAUGHS.splitlines())),
        [],
        "not valid YAML: expands to more than 100000 values through aliases",
    ),
    "an anchor containing itself": (
        _bytes(BASE + "args: &a {x: *a}\n"),
        [],
        "not valid YAML: an alias refers to a value that contains it",
    ),
    "a 5000-digit number": (
        _bytes(BASE + "timeout: " + "9" * 5000 + "\n"),
        [],
        "job.yaml: line 3: not valid YAML: a number with more than 4300 digits",
    ),
    "a number too large for a float": (
        _bytes(BASE + "timeout: " + "9" * 400 + "\n"),
        [],
        "job.yaml: timeout: 9999",
    ),
    "a timeout that is not a number": (
        _bytes(BASE + "timeout: .nan\n"),
        [],
        "job.yaml: timeout: must be a finite number, not nan",
    ),
    "an impossible date": (
        _bytes("experiment: 2024-13-45\nentry_script: train.py\n"),
        [],
        "job.yaml: line 1: not valid YAML: month must be in 1..12",
    ),
    "NUL in entry_script": (
        _bytes(BASE.replace("train.py", '"train\\0.py"')),
        [],
        "job.yaml: entry_script: 'train\\x00.py' contains a NUL byte",
    ),
    "NUL in source_directory": (
        _bytes(BASE + 'source_directory: "src\\0"\n'),
        [],
        "job.yaml: source_directory: 'src\\x00' contains a NUL byte",
    ),
    "NUL in a data source": (
        _bytes(BASE + 'data: {d: {source: "d\\0"}}\n'),
        [],
        "job.yaml: data.d.source: 'd\\x00' contains a NUL byte",
    ),
    "NUL in an argument": (
        _bytes(BASE + 'args: {name: "a\\0b"}\n'),
        [],
        "job.yaml: args: 'a\\x00b' contains a NUL byte",
    ),
    "an argument longer than a command line takes": (
        _bytes(BASE + "args: {notes: " + "n" * 200_000 + "}\n"),
        [],
        "job.yaml: args: 'nnnn",
    ),
    "entry_script longer than a file name may be": (
        _bytes(BASE.replace("train.py", "t" * 300 + ".py")),
        [],
        "job.yaml: entry_script: File name too long",
    ),
    "source_directory longer than a file name may be": (
        _bytes(BASE + "source_directory: " + "s" * 300 + "\n"),
        [],
        "job.yaml: source_directory: File name too long",
    ),
    "data source longer than a file name may be": (
        _bytes(BASE + "data: {d: {source: " + "d" * 300 + "}}\n"),
        [],
        "job.yaml: data.d.source: File name too long",
    ),
    "a field name with a newline": (
        _bytes(BASE + '"a\\nb": 1\n'),
        [],
        "job.yaml: a\\nb: unknown field",
    ),
    "slots that are not a number": (
        _bytes(BASE + "compute: {target: local, options: {slots: abc}}\n"),
        [],
        "job.yaml: compute.options.slots: must be a whole number from 1 to 4096, not 'abc'",
    ),
    "slots of an absurd size": (
        _bytes(BASE + "compute: {target: local, options: {slots: 100000000}}\n"),
        [],
        "compute.options.slots: must be a whole number from 1 to 4096, not 100000000",
    ),
    "slots that are not whole": (
        _bytes(BASE + "compute: {target: local, options: {slots: 1.9}}\n"),
        [],
        "compute.options.slots: must be a whole number from 1 to 4096, not 1.9",
    ),
    "gpus below zero": (
        _bytes(BASE + "compute: {target: local, options: {gpus: -1}}\n"),
        [],
        "compute.options.gpus: must be a whole number from 0 to 256, not -1",
    ),
    "an option the backend none does not take": (
        _bytes(BASE + "distributed: {backend: none, options: {workers: 4}}\n"),
        [],
        "distributed.options.workers: unknown option of distributed backend 'none'; it takes "
        "no options",
    ),
    "an index_url that is not a string": (
        _bytes(BASE + "environment: {builder: pip, options: {index_url: [1]}}\n"),
        [],
        "environment.options.index_url: must be a package index URL",
    ),
    "a torchrun endpoint that is not host:port": (
        _bytes(BASE + "distributed: {backend: torchrun, options: {rdzv_endpoint: 7}}\n"),
        [],
        "distributed.options.rdzv_endpoint: must be host:port, e.g. node0:29400, not 7",
    ),
    "a tensorboard option": (
        _bytes(BASE + "metrics: [{name: tensorboard, options: {flush: 1}}]\n"),
        [],
        "metrics.0.options.flush: unknown option of metric sink 'tensorboard'; it takes no options",
    ),
    "--set slots=abc": (
        _bytes(BASE),
        ["compute.options.slots=abc"],
        "compute.options.slots: must be a whole number from 1 to 4096, not 'abc'",
    ),
    "alias amplification of text": (
        _bytes(BASE + f'args:\n  a: &s "{"x" * 10_000}"\n  b: [{", ".join(["*s"] * 50_000)}]\n'),
        [],
        "not valid YAML: expands to more than 4 MiB of text through aliases",
    ),
    "a command line too long for exec": (
        _bytes(BASE + f'args:\n  a: &s "{"x" * 10_000}"\n  b: [{", ".join(["*s"] * 300)}]\n'),
        [],
        "job.yaml: args: the script's command line would be 2939 KiB, more than 1024 KiB",
    ),
    "200,000 plain values": (
        _bytes(BASE + "args: [" + ",".join(["a"] * 200_000) + "]\n"),
        [],
        "job.yaml: line 3: not valid YAML: holds more than 100000 values",
    ),
    "a job file over 1 MiB": (
        _bytes(BASE + "# " + "x" * (1024 * 1024) + "\n"),
        [],
        "job.yaml: is 1048624 bytes; a job spec may be at most 1024 KiB",
    ),
    "a mapping in args": (
        _bytes(BASE + "args: {x: {y: 1}}\n"),
        [],
        "job.yaml: args.x: must be a string, a number, true/false or a list of those, "
        "not a mapping",
    ),
    "a list of lists in args": (
        _bytes(BASE + "args: [[1, 2]]\n"),
        [],
        "job.yaml: args.0: must be a string, a number, true/false or a list of those",
    ),
    "binary in args": (
        _bytes(BASE + "args: {a: !!binary aGk=}\n"),
        [],
        "job.yaml: args.a: must be a string, a number, true/false or a list of those, not bytes",
    ),
    "--set a mapping in args": (
        _bytes(BASE),
        ["args.x={y: 1}"],
        "job.yaml (--set args.x={y: 1}): args.x: must be a string, a number, true/false or a "
        "list of those",
    ),
    "an absolute entry_script": (
        _bytes("experiment: bad-input\nentry_script: /tmp/train.py\n"),
        [],
        "job.yaml: entry_script: '/tmp/train.py' must be a path inside source_directory",
    ),
    "an entry_script outside source_directory": (
        _bytes("experiment: bad-input\nentry_script: ../train.py\nsource_directory: src\n"),
        [],
        "job.yaml: entry_script: '../train.py' must be a path inside source_directory",
    ),
    "a key given twice": (
        _bytes(BASE + "args: {x: 1}\nargs: {y: 2}\n"),
        [],
        "job.yaml: line 4: not valid YAML: the key 'args' is given twice",
    ),
    "an empty package name": (
        _bytes(BASE + "environment: {pip: ['']}\n"),
        [],
        "job.yaml: environment.packages.0: is empty",
    ),
    "a registry listed twice": (
        _bytes(BASE + "model: {name: m, registries: [local, local]}\n"),
        [],
        "job.yaml: model.registries: each registry may be listed once",
    ),
    "--set a thousand levels": (
        _bytes(BASE),
        ["args.x=" + "[" * 1000 + "]" * 1000],
        "--set: args.x: nested more than 100 levels deep",
    ),
    "--set an empty field name": (
        _bytes(BASE),
        ["args..x=1"],
        "--set: args..x: a field name is empty",
    ),
    "checkpoints as a number": (
        _bytes(BASE + "checkpoints: 5\n"),
        [],
        "job.yaml: checkpoints: must be its path as text or a mapping, not 5",
    ),
    "an unknown key beside retry.on's exit_codes": (
        _bytes(BASE + "retry: {max_attempts: 2, on: [{exit_codes: [75], exit_code: [1]}]}\n"),
        [],
        "job.yaml: retry.on.0.exit_code: unknown field; a mapping here is {exit_codes: [75]}",
    ),
    "retries on nothing": (
        _bytes(BASE + "retry: {max_attempts: 2, on: []}\n"),
        [],
        "job.yaml: retry.on: lists nothing to retry, so max_attempts 2 would never be used",
    ),
    "exit code 0 to retry": (
        _bytes(BASE + "retry: {max_attempts: 2, on: [{exit_codes: [75, 0]}]}\n"),
        [],
        "job.yaml: retry.on.0.exit_codes.1: must be an exit code from 1 to 255 (0 is success",
    ),
}


def _project(tmp_path: Path, data: bytes) -> Path:
    (tmp_path / "train.py").write_text("print('trained')\n")
    (tmp_path / "src").mkdir()
    job = tmp_path / "job.yaml"
    job.write_bytes(data)
    return job


def _expkit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "expkit", *args],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,  # the billion laughs took 96 s and 2.8 GB before
        cwd=tmp_path,
        env=bare_env(EXPKIT_WORKSPACE=str(tmp_path / "ws")),
        stdin=subprocess.DEVNULL,
    )


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("expkit: error: ")
    assert result.returncode == 2, result.stderr
    return lines[0]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_job_spec_is_one_line_naming_the_field(tmp_path: Path, case: str) -> None:
    data, overrides, expected = CASES[case]
    _project(tmp_path, data)
    sets = [arg for item in overrides for arg in ("--set", item)]
    line = _one_line(_expkit(tmp_path, "run", "--dry-run", "job.yaml", *sets))
    assert expected in line
    # Without --dry-run the same line, and no run is created.
    workspace = Workspace.init(tmp_path / "ws")
    assert _one_line(_expkit(tmp_path, "run", "job.yaml", *sets)) == line
    assert workspace.history.runs.recent() == []
    assert not (workspace.path / "runs").exists()


def test_a_job_path_the_file_system_refuses_is_one_line(tmp_path: Path) -> None:
    line = _one_line(_expkit(tmp_path, "run", "--dry-run", "j" * 300 + ".yaml"))
    assert line.endswith(": File name too long")


def test_a_nul_byte_in_a_job_path_or_a_set_is_one_line(tmp_path: Path, capsys, monkeypatch):
    """argv cannot carry a NUL byte; cli.main (and the Python API) can."""
    from expkit import cli

    monkeypatch.chdir(tmp_path)
    _project(tmp_path, _bytes(BASE))
    assert cli.main(["run", "--dry-run", "job\0.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == "expkit: error: job\\x00.yaml: a path cannot contain a NUL byte\n"
    assert cli.main(["run", "--dry-run", "job.yaml", "--set", "entry_script=tr\0ain.py"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "expkit: error: job.yaml (--set entry_script=tr\\x00ain.py): entry_script: "
        "'tr\\x00ain.py' contains a NUL byte\n"
    )


def test_an_anchor_used_a_few_times_still_works(tmp_path: Path) -> None:
    """Aliases are bounded, not refused: a shared list of flags is fine."""
    _project(tmp_path, _bytes(BASE + "args:\n  a: &flags [1, 2]\n  b: *flags\n"))
    result = _expkit(tmp_path, "run", "--dry-run", "job.yaml")
    assert result.returncode == 0, result.stderr
    assert "train.py --a 1 2 --b 1 2" in result.stdout


def test_declared_options_in_range_pass(tmp_path: Path) -> None:
    spec = BASE + "compute: {target: local, options: {slots: 4096, gpus: 0}}\n"
    _project(tmp_path, _bytes(spec))
    result = _expkit(tmp_path, "run", "--dry-run", "job.yaml")
    assert result.returncode == 0, result.stderr


def test_a_job_file_that_is_not_a_regular_file_is_one_line(tmp_path: Path) -> None:
    """/dev/zero reached 4 GB of memory; /dev/urandom and a FIFO hung."""
    _project(tmp_path, _bytes(BASE))
    os.mkfifo(tmp_path / "fifo.yaml")
    cases = {
        "/dev/zero": "/dev/zero: is a device; a job spec is a YAML file",
        "/dev/urandom": "/dev/urandom: is a device; a job spec is a YAML file",
        "fifo.yaml": "fifo.yaml: is a FIFO; a job spec is a YAML file",
        "src": "src: is a folder; a job spec is a YAML file",
    }
    for name, expected in cases.items():
        assert _one_line(_expkit(tmp_path, "run", "--dry-run", name)).endswith(expected)


def test_args_that_are_nan_or_infinite_reach_the_script_as_text(tmp_path: Path) -> None:
    """args are text for the script: `.nan` and `.inf` are passed as Python writes them."""
    _project(tmp_path, _bytes(BASE))
    result = _expkit(
        tmp_path, "run", "--dry-run", "job.yaml", "--set", "args.a=.nan", "--set", "args.b=.inf"
    )
    assert result.returncode == 0, result.stderr
    assert "train.py --a nan --b inf" in result.stdout


def test_a_data_source_holding_the_workspace_is_refused(tmp_path: Path) -> None:
    """`source: .` with `mode: copy` copied the workspace into itself: RecursionError, and
    work/ left with hundreds of nested entries."""
    _project(tmp_path, _bytes(BASE))
    workspace = Workspace.init(tmp_path / "ws")
    for source in (".", "ws", "ws/.expkit"):
        sets = ["--set", f"data.d.source={source}", "--set", "data.d.mode=copy"]
        line = _one_line(_expkit(tmp_path, "run", "job.yaml", *sets))
        prefix = f"expkit: error: job.yaml (--set data.d.source={source}): data.d.source: "
        assert line.startswith(prefix), line
        assert "the workspace" in line
    assert workspace.history.runs.recent() == []
    assert not (workspace.path / "runs").exists()
