"""A bounded, seeded fuzz test of the job spec parser: mutations of training/job.yaml (values of
other types, huge numbers, NaN, NUL bytes, deep nesting, long and unicode strings, aliases,
broken bytes) and `--set` items, through `expkit run --dry-run`. Each ends with exit 0 or
with exit 2 and one line per problem naming the file, never an internal error, a traceback,
a plugin error or a stall.

Most inputs go through `cli.main` in this process (milliseconds each); a few through the real
command. Hypothesis runs derandomized (the same inputs every time) and keeps no database.
"""

from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, bare_env
from expkit import cli

SECONDS_PER_INPUT = 20  # far above the milliseconds one takes: only a stall passes it

BASE: dict[str, Any] = yaml.safe_load((REPO / "training" / "job.yaml").read_text())
# torchscript is loaded wherever torch is; onnx needs onnxscript, which CI has and not every
# machine: the base spec must pass its own dry run.
BASE["exports"] = [{"format": "torchscript"}]

FUZZ = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- what goes in ------------------------------------------------------------------------------
def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


PATHS = [p for p in _paths(BASE) if p]


def _nested(depth: int, leaf: Any, as_map: bool) -> Any:
    for _ in range(depth):
        leaf = {"a": leaf} if as_map else [leaf]
    return leaf


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**18, max_value=10**400),
    st.integers(min_value=-(10**30), max_value=0),
    st.floats(),  # NaN and the infinities included
    st.text(max_size=40),  # any unicode, NUL and newlines included
    st.text(alphabet="a/.\0\n\x7f\u202e", min_size=200, max_size=3000),
    st.sampled_from(["abc", "1.9", "100000000", "local", "outputs/", "../../x", "*", "~"]),
    st.dates(),
)
values = st.one_of(
    scalars,
    st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=12),
    st.dictionaries(st.text(max_size=12), scalars, max_size=4),
    st.builds(_nested, st.integers(0, 400), scalars, st.booleans()),
)


# Where the built-in plugins' options go, and the names they take (and one they do not).
OPTIONS = [
    (("compute",), {"target": "local"}, ["slots", "gpus", "queue"]),
    (("distributed",), {"backend": "torchrun"}, ["node_rank", "rdzv_endpoint", "x"]),
    (("distributed",), {"backend": "none"}, ["workers"]),
    (("environment",), {"builder": "pip", "packages": ["pillow"]}, ["index_url", "x"]),
    (("metrics",), {"name": "tensorboard"}, ["flush"]),
    (("exports",), {"format": "torchscript"}, ["method", "strict"]),
]


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict[str, Any]:
    """The base spec with a plugin option set, and a few values replaced, removed or added."""
    spec = yaml.safe_load(yaml.safe_dump(BASE))
    if draw(st.booleans()):
        (field,), entry, names = draw(st.sampled_from(OPTIONS))
        entry = {**entry, "options": {draw(st.sampled_from(names)): draw(values)}}
        spec[field] = [entry] if field in ("metrics", "exports") else entry
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = spec
        for key in path[:-1]:
            try:
                parent = parent[key]
            except (KeyError, IndexError, TypeError):
                break
        else:
            action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
            key = path[-1]
            if action == "delete" and isinstance(parent, dict):
                parent.pop(key, None)
            elif action == "add" and isinstance(parent, dict):
                parent[draw(st.text(max_size=20))] = draw(values)
            elif isinstance(parent, dict) or (isinstance(parent, list) and isinstance(key, int)):
                with contextlib.suppress(IndexError):  # an earlier change shortened the list
                    parent[key] = draw(values)
    return spec


def _dump(spec: dict[str, Any]) -> bytes:
    try:
        return yaml.safe_dump(spec, allow_unicode=True, sort_keys=False).encode()
    except RecursionError:  # the dumper's own limit, below expkit's 100 levels
        return yaml.safe_dump({"experiment": "deep", "args": [[[]]]}).encode()


LAUGHS = "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" if i else 'l0: &l0 ["lol"]\n'
    for i in range(1, 10)
)
TEXT_EDITS = st.one_of(
    st.tuples(st.just("insert"), st.sampled_from(["&a ", "*a", "<<: *a\n", "\t", "\0", "\ufeff"])),
    st.tuples(st.just("insert"), st.just("args:\n  " + LAUGHS.replace("\n", "\n  "))),
    st.tuples(st.just("insert"), st.just("x: &s [*s]\n")),
    st.tuples(st.just("insert"), st.just("[" * 2000)),
    st.tuples(st.just("truncate"), st.none()),
    st.tuples(st.just("bytes"), st.binary(min_size=1, max_size=8)),
)


@st.composite
def job_files(draw: st.DrawFn) -> bytes:
    """A mutated spec as YAML, sometimes edited as text, sometimes just bytes."""
    kind = draw(st.sampled_from(["spec", "spec", "spec", "edited", "edited", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=600))
    data = _dump(draw(mutated_specs()))
    if kind == "edited":
        for action, what in draw(st.lists(TEXT_EDITS, min_size=1, max_size=3)):
            at = draw(st.integers(0, len(data)))
            if action == "truncate":
                data = data[:at]
            elif action == "bytes":
                data = data[:at] + what + data[at:]
            else:
                data = data[:at] + what.encode() + data[at:]
    return data


set_items = st.one_of(
    st.builds(
        lambda path, value: ".".join(map(str, path)) + "=" + value,
        st.sampled_from(PATHS),
        st.one_of(st.text(max_size=30), st.just("[" * 500 + "]" * 500), st.just("9" * 5000)),
    ),
    st.text(max_size=30),
)


# -- running it -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source folder with the scripts the sample job names (their content does not matter)."""
    folder = tmp_path_factory.mktemp("fuzz")
    for name in ("pytorch_train.py", "prepare_digits.py"):
        (folder / name).write_text("print('hello')\n")
    return folder


class Stalled(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise Stalled(f"one input took more than {SECONDS_PER_INPUT}s")


def dry_run_here(job: Path, sets: list[str]) -> tuple[int, str, str]:
    """`expkit run --dry-run JOB --set=...` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(SECONDS_PER_INPUT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["run", "--dry-run", str(job), *(f"--set={s}" for s in sets)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, out.getvalue(), err.getvalue()


def assert_clean_end(job: Path, code: int, stdout: str, stderr: str) -> None:
    """Exit 0 with a plan, or exit 2 with one line per problem, each naming the job file
    (or --set); never an internal error, a plugin error or a traceback."""
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    if code == 0:
        assert stdout.startswith("dry run of "), stdout
        return
    assert code == 2, (code, stderr)
    lines = stderr.rstrip("\n").split("\n")
    assert lines[0].startswith("expkit: error: "), stderr
    named = (str(job), "--set")
    assert lines[0].removeprefix("expkit: error: ").startswith(named), stderr
    for line in lines[1:]:  # further problems of the same file, one a line
        assert line.startswith(str(job)), stderr


@FUZZ
@given(data=job_files(), sets=st.lists(set_items, max_size=2))
def test_any_job_file_ends_cleanly(project: Path, data: bytes, sets: list[str]) -> None:
    job = project / "job.yaml"
    job.write_bytes(data)
    assert_clean_end(job, *dry_run_here(job, sets))


def test_the_base_spec_passes(project: Path) -> None:
    job = project / "job.yaml"
    job.write_bytes(_dump(BASE))
    code, _, stderr = dry_run_here(job, [])
    assert code == 0, stderr


@settings(FUZZ, max_examples=6)
@given(data=job_files())
def test_any_job_file_ends_cleanly_through_the_command(project: Path, data: bytes) -> None:
    job = project / "job-cli.yaml"
    job.write_bytes(data)
    result = subprocess.run(
        [sys.executable, "-m", "expkit", "run", "--dry-run", str(job)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        env=bare_env(),
        stdin=subprocess.DEVNULL,
    )
    assert_clean_end(job, result.returncode, result.stdout, result.stderr)
