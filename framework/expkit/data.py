"""Data inputs: prepared once into the workspace's data cache, then linked or copied into runs."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from expkit.blobs import hash_file
from expkit.errors import UserError
from expkit.job import DataInput
from expkit.procs import die_with_parent, pid_alive


def cache_key(item: DataInput, source_dir: Path) -> str:
    """A hash of the prepare command and of the source files it names."""
    digest = hashlib.sha256((item.prepare or "").encode())
    for token in shlex.split(item.prepare or ""):
        path = source_dir / token
        if path.is_file():
            digest.update(f"\0{token}\0{hash_file(path)}".encode())
    return digest.hexdigest()[:16]


def prepare(
    name: str,
    item: DataInput,
    source_dir: Path,
    cache_dir: Path,
    python: str,
    say: Callable[[str], None],
    env: dict[str, str],
    log: Callable[[str], None] | None = None,
) -> Path:
    """The folder or file holding data input `name`, prepared now if not cached. What the
    `prepare` command prints goes to `log` (the run's log; default: `say`), not the
    terminal: it may name its temporary folder."""
    log = log or say
    if item.source and Path(item.source).exists():
        return Path(item.source)
    if not item.prepare:  # a source that went away since the job was checked
        raise UserError(
            f"data.{name}.source: {item.source} does not exist (any more); restore it, or "
            "give a `prepare` command that makes the data"
        )
    key = cache_key(item, source_dir)
    dest = cache_dir / f"{name}-{key}"
    if dest.exists():
        say(f"data {name!r}: cache hit ({key})")
        return dest
    say(f"data {name!r}: cache miss ({key}), running `{item.prepare}`")
    tmp = cache_dir / temporary_name(f"{name}-{key}")
    shutil.rmtree(tmp, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    argv = shlex.split(item.prepare.replace("{dest}", shlex.quote(str(tmp))))
    if argv and argv[0] in ("python", "python3"):
        argv[0] = python
    # `env` carries the run's marker, and the command runs under `expkit.guard`: it and
    # whatever it starts die with the driver, so a kill -9 of the driver leaves nothing
    # running (and the next open removes the temporary folder).
    proc = subprocess.Popen(
        [sys.executable, "-m", "expkit.guard", *argv],
        cwd=source_dir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    try:
        output, _ = proc.communicate()
    except BaseException:  # canceled (Ctrl-C, a signal): the command's tree stops, tmp goes
        _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    lines = output.decode("utf-8", errors="replace").splitlines()
    log(f"data {name!r}: $ {item.prepare}")
    for line in lines:
        log(f"data {name!r}: {line}")
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        said = next((line for line in reversed(lines) if line.strip()), "")
        raise UserError(
            f"data.{name}.prepare: `{item.prepare}` exited with code {proc.returncode}"
            + (f": {said}" if said else "")
        )
    if not tmp.exists():
        raise UserError(f"data.{name}.prepare: `{item.prepare}` wrote nothing into {{dest}}")
    try:
        os.replace(tmp, dest)
    except OSError:  # a folder: another run (a sweep's trial) prepared the same data meanwhile
        if not dest.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the same key: its copy is as good as ours
    return dest


def _stop(proc: subprocess.Popen) -> None:
    """Ask the guard to stop the command's tree (it needs a moment), then make sure."""
    with contextlib.suppress(OSError):
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.tmp$")


def temporary_name(final: str) -> str:
    """The name `final` is prepared under: it carries this host's name and this process's
    pid, so that the next open of the workspace can tell a folder whose builder died (see
    `remove_stale`); a workspace shared between machines only judges its own host's."""
    return f".{final}.{_host()}.{os.getpid()}.tmp"


def remove_stale(cache_dir: Path) -> list[Path]:
    """Remove the temporary folders of data prepares (on this host) whose process is gone;
    returns them."""
    removed = []
    with contextlib.suppress(OSError):
        for path in cache_dir.iterdir():
            found = TEMPORARY.match(path.name)
            if found and found["host"] == _host() and not pid_alive(int(found["pid"])):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _host() -> str:
    return os.uname().nodename.split(".")[0] or "host"


def place(name: str, origin: Path, mode: str, work_dir: Path) -> Path:
    """Link (or copy) the data into the working copy as `data/<name>`."""
    target = work_dir / "data" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        raise UserError(f"data.{name}: the source folder already has data/{name}; rename one")
    if mode == "link":
        target.symlink_to(origin.resolve(), target_is_directory=origin.is_dir())
    elif origin.is_dir():
        shutil.copytree(origin, target)
    else:
        shutil.copyfile(origin, target)
    return target
