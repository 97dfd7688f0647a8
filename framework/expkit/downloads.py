"""Serving stored files to the user: checked against their record, written without harm.

Every file a download serves (`runs download`, `models download`, `Run.download_file`,
`Model.download`) is hashed while it is copied and compared with the sha256 recorded when it
was sealed. A copy that does not match is skipped for any other stored copy of the same
content (the blob, another run's outputs, a model version); when none is left, the download
fails with one line naming the file and both hashes (exit code 1).

At the destination, a download never replaces an existing file unless asked (`--force`,
`overwrite=True`), never writes through a link (with `--force` the link itself is replaced,
not what it points to), and never turns a folder into a file. A destination that ends in
`/`, or is an existing folder, is a folder (created if needed): the file keeps its name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from expkit.blobs import stored_mode
from expkit.errors import UserError

if TYPE_CHECKING:
    from expkit.workspace import Workspace

CHUNK = 1024 * 1024
FORCE_HINT = "pass --force (overwrite=True from Python) to replace it"


class Damaged(UserError):
    """A stored file does not match its recorded sha256 and no intact copy is left."""

    exit_code = 1


@dataclass
class Wanted:
    """One file to serve: its name (for messages), where it goes, its recorded sha256 (None:
    not recorded, e.g. a log) and the stored copies to try, best first."""

    name: str
    target: Path
    digest: str | None
    copies: Callable[[], Iterable[Path]]


def destination(dest: str | Path | None, name: str) -> Path:
    """Where one file called `name` goes: `dest` itself, or `dest/<name's last part>` when
    `dest` ends in "/" or is a folder (created if needed); the current folder when None."""
    base = Path(name).name
    if dest is None or str(dest) == "":
        return Path(base)
    text = os.fspath(dest)
    folder = Path(text)
    try:
        is_folder = text.endswith(("/", os.sep)) or folder.is_dir()
    except OSError as error:  # a name too long, a folder that cannot be searched
        raise destination_error(error, folder) from None
    if is_folder:
        _make_folder(folder)
        return folder / base
    return folder


def check_folder(folder: Path) -> None:
    """Refuse a folder destination that is a link to nothing (it cannot be made a folder,
    and a download never writes through a link to create what it names)."""
    if folder.is_symlink() and not folder.exists():
        raise UserError(
            f"{folder} is a link to {os.readlink(folder)}, which does not exist; name an "
            "existing folder or a new path"
        )


def fetch(
    wanted: list[Wanted],
    overwrite: bool = False,
    root: Path | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write every file in `wanted` (all checked before any is put in place); returns the
    paths written. With `root` (the folder a model is downloaded into), no folder between it
    and a target may be a link. Raises UserError for a destination it must not write, Damaged
    when a file has no intact stored copy."""
    warn = warn or _stderr
    for item in wanted:
        if root is not None:
            _at_destination(_check_below, item.target, root, item.target)
        _at_destination(_check_target, item.target, item.target, overwrite)
    staged: list[tuple[Path, Path]] = []
    temporary: list[Path] = []  # every temporary file made, removed whatever happens
    with _signals_interrupt():  # also over the clean-up: a second signal must not skip it
        try:
            for item in wanted:
                _at_destination(item.target.parent.mkdir, item.target.parent, parents=True,
                                exist_ok=True)  # fmt: skip
                staged.append((_stage(item, warn, temporary), item.target))
            for tmp, target in staged:
                _at_destination(_place, target, tmp, target, overwrite)
        finally:
            for tmp in temporary:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
    return [target for _, target in staged]


def destination_error(error: OSError, where: Path) -> UserError:
    """One line for an OSError at a download's destination `where`: exit code 1 for a full
    disk (or quota), which freeing space fixes, 2 for anything else (a read-only or
    forbidden folder, a name too long), which another destination fixes."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        failure = UserError(f"{where}: cannot write the download ({reason}); free some space")
        failure.exit_code = 1
        return failure
    return UserError(f"{where}: cannot write the download ({reason}); choose another destination")


def _at_destination(call: Callable[..., object], where: Path, *args: object, **kw: object) -> None:
    try:
        call(*args, **kw)
    except OSError as error:
        raise destination_error(error, where) from None


class _Stopped(KeyboardInterrupt):
    """SIGTERM, SIGHUP or Ctrl-C during a download: stop, removing temporary files."""


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """While a download writes, SIGTERM and SIGHUP stop it the way Ctrl-C does (exit 130,
    temporary files removed) instead of killing the process where it stands. Only the first
    of them or of Ctrl-C raises: a later one (a service manager that sends SIGTERM again, a
    second Ctrl-C) is noted on stderr, so that the temporary files are still removed. A
    signal whose handler the program set itself (the driver's) is left to that handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    stopped: list[int] = []

    def stop(signum: int, frame: object) -> None:
        stopped.append(signum)
        if len(stopped) == 1:
            raise _Stopped()
        with contextlib.suppress(OSError):  # no lock here: the terminal may be gone
            os.write(2, b"expkit: removing the download's temporary files; it takes a moment\n")

    previous = {}
    for sig, default in (
        (signal.SIGTERM, signal.SIG_DFL),
        (signal.SIGHUP, signal.SIG_DFL),
        (signal.SIGINT, signal.default_int_handler),  # Python's own Ctrl-C
    ):
        if signal.getsignal(sig) in (default, None):
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def inside_folder(root: Path, rel: str) -> Path:
    """`root/rel` for a recorded relative path, refusing one that would leave `root`."""
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        raise UserError(f"recorded path {rel!r} is not inside its folder; not served")
    return root / rel


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{folder} is a file, not a folder; name a folder to write into") from None
    except OSError as error:
        raise destination_error(error, folder) from None


def _check_below(root: Path, target: Path) -> None:
    """No folder between `root` and `target` is a link or a file: nothing is written through
    a link inside the destination."""
    below = target.parent
    while below != root and root in below.parents:
        if below.is_symlink():
            raise UserError(
                f"{below} is a link (to {os.readlink(below)}); a download never writes through "
                "a link: remove it or choose another folder"
            )
        if below.exists() and not below.is_dir():
            raise UserError(f"{below} is a file, not a folder; cannot write {target}")
        below = below.parent


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse a target that is a folder, an existing file (unless overwriting), anything but
    a file or a link (a FIFO, a socket, a device such as /dev/null: never replaced, even with
    --force), or that lies below a link or a file."""
    _refuse_special(target)
    if target.is_symlink():
        if not overwrite:
            raise UserError(f"{target} exists (a link to {os.readlink(target)}); {FORCE_HINT}")
        return  # replaced by the download itself: the link goes, what it names stays
    if target.is_dir():
        raise UserError(f"{target} is a folder; a download never replaces a folder with a file")
    if target.exists() and not overwrite:
        raise UserError(f"{target} exists; {FORCE_HINT}")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{parent} is a file, not a folder; cannot write {target}")


def _refuse_special(target: Path) -> None:
    try:
        info = os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):
        return
    kind = _special_kind(info.st_mode)
    if kind:
        raise UserError(
            f"{target} is {kind}; a download replaces only a file or a link (even with "
            "--force): choose another destination"
        )


def _special_kind(mode: int) -> str | None:
    """What a destination that is neither a file, a link nor a folder is, in words."""
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Within: SIGINT, SIGTERM and SIGHUP wait (blocked, then delivered at the end of the
    block), so that a stop never comes between two steps that must go together."""
    import signal

    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _stage(item: Wanted, warn: Callable[[str], None], temporary: list[Path]) -> Path:
    """A private temporary file next to the target holding an intact copy of `item`; its
    name is added to `temporary` as soon as it exists (the caller removes it)."""
    bad: list[tuple[Path, str]] = []
    with _signals_held():  # a stop between making the file and naming it would leave it
        fd, name = _at_destination_value(_temporary, item.target.parent, item.target)
        tmp = Path(name)
        temporary.append(tmp)
    with os.fdopen(fd, "r+b") as out:
        for copy in item.copies():
            try:
                digest, mode = _copy_hashing(copy, out)
            except _WriteFailed as failed:
                raise destination_error(failed.error, item.target) from None
            except (OSError, _NotAFile):  # this copy cannot be read: try the next one
                continue
            if item.digest is None or digest == item.digest:
                os.fchmod(out.fileno(), stored_mode(mode) | stat.S_IWUSR)
                for path, other in bad:
                    warn(
                        f"{item.name}: {path} does not match its record (sha256 {other}, "
                        f"recorded {item.digest}); served from the intact copy {copy}"
                    )
                return tmp
            bad.append((copy, digest))
    os.unlink(tmp)
    if bad:
        raise Damaged(
            f"{item.name}: the stored file does not match its record (sha256 {bad[0][1]}, "
            f"recorded {item.digest}) and no intact copy is left; not served"
        )
    raise Damaged(f"{item.name}: no stored copy is left (recorded sha256 {item.digest})")


class _NotAFile(Exception):
    """A stored copy that is a link or not a regular file: never served."""


def _copy_hashing(source: Path, out: BinaryIO) -> tuple[str, int]:
    """Copy `source` (never through a link) into the open file `out`, from its start;
    returns the sha256 of what was copied and the source's mode."""
    # O_NONBLOCK: a FIFO put in place of a stored copy does not block the open (it is then
    # refused as not a regular file); reads of a regular file ignore the flag.
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as src:
        info = os.fstat(src.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _NotAFile(str(source))
        digest = hashlib.sha256()
        try:
            out.seek(0)
            out.truncate()
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                _write(out, chunk)
            out.flush()
        except _WriteFailed:
            raise
        except OSError as error:  # flush or truncate: the destination
            raise _WriteFailed(error) from None
    return digest.hexdigest(), info.st_mode


class _WriteFailed(Exception):
    """Writing the destination failed (a full disk): not the stored copy's fault."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _write(out: BinaryIO, chunk: bytes) -> None:
    try:
        out.write(chunk)
    except OSError as error:
        raise _WriteFailed(error) from None


def _temporary(target: Path) -> tuple[int, str]:
    """A new private file in the target's folder, under a short name (never built from the
    target's, which may already be as long as a name can be)."""
    import tempfile

    return tempfile.mkstemp(prefix=f".expkit-{os.getpid()}-", suffix=".download", dir=target.parent)


def _at_destination_value(
    call: Callable[[Path], tuple[int, str]], where: Path, arg: Path
) -> tuple[int, str]:
    try:
        return call(arg)
    except OSError as error:
        raise destination_error(error, where) from None


def _place(tmp: Path, target: Path, overwrite: bool) -> None:
    """Put `tmp` at `target`: never over an existing entry unless `overwrite` (then the entry
    itself is replaced, even a link, never written through), never over a folder."""
    if overwrite:
        if target.is_dir() and not target.is_symlink():
            raise UserError(f"{target} is a folder; a download never replaces a folder with a file")
        _refuse_special(target)  # checked again just before: never a device, FIFO, socket
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # fails if anything is there, even a dangling link
    except FileExistsError:
        raise UserError(f"{target} exists; {FORCE_HINT}") from None
    except OSError:  # a file system without hard links
        if os.path.lexists(target):
            raise UserError(f"{target} exists; {FORCE_HINT}") from None
        os.replace(tmp, target)


def candidates(workspace: Workspace, digest: str, first: Iterable[Path]) -> Iterator[Path]:
    """The stored copies of content `digest` to try, best first: `first`, then the blob, then
    every recorded name of the same content (runs' outputs, model versions)."""
    from expkit.blobs import BlobStore

    seen: set[Path] = set()

    def fresh(path: Path) -> bool:
        if path in seen:
            return False
        seen.add(path)
        return True

    for path in first:
        if fresh(path):
            yield path
    blob = BlobStore(workspace.blobs_dir).path(digest)
    if fresh(blob):
        yield blob
    for kind, owner, rel in workspace.history.names_of(digest):
        if kind == "run":
            folder = workspace.run_dir(owner) / "outputs"
        else:
            folder = workspace.models_dir / owner
        try:
            path = inside_folder(folder, rel)
        except UserError:
            continue
        if fresh(path):
            yield path


def _stderr(text: str) -> None:
    print(f"expkit: warning: {text}", file=sys.stderr, flush=True)
