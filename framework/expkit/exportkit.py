"""Tools for exporter plugins: run the export in the run's interpreter, load the model, make
check inputs and compare the exported model with the eager one.

Part of the plugin contract: import it as `from expkit.plugin import exportkit`.

expkit's driver never imports torch, and the model's code lives in the run's environment, so
an exporter runs a worker module there. The exporter's side is one line:

    def export(self, request: ExportRequest) -> ExportResult:
        return exportkit.run_worker(request, "expkit_onnx.worker")

and the worker module (`expkit_onnx/worker.py`) does the export and its check:

    def export_and_check(req: ExportRequest) -> ExportResult:
        model = exportkit.load_model(req)
        inputs = exportkit.check_inputs(req)
        expected = exportkit.eager_outputs(req, model, inputs)
        ...  # write the exported file(s) into req.out_dir, load them back as `run`
        checks, message = exportkit.check_parity(req, expected, run, inputs, "onnxruntime")
        return ExportResult(files, {**checks, ...}, ok=not message, message=message)

    if __name__ == "__main__":
        exportkit.worker_main(export_and_check)

The worker gets the same ExportRequest (its `say` sends progress lines to the parent's);
raise `ExportFailed` for a failure with a reason of your own; any other exception becomes a
failed export whose message is `ExceptionType: first line`. The worker's whole output goes to
`export.log` in the request's out_dir (not one of the exported files), for a look afterwards.

This module imports only the standard library at module level; torch and numpy are imported
inside the worker-side functions.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expkit.capabilities import ExportRequest, ExportResult

# Modules only one side uses (tempfile, threading, zipfile, ...) are imported where they are
# used: every exporter plugin imports this module, and `expkit plugins` loads them all.
if TYPE_CHECKING:
    import numpy as np
    import torch

LOG_NAME = "export.log"  # the worker's stdout and stderr, in the request's out_dir
SEED = 0  # random check inputs are the same on every run
MAX_EXAMPLE_ROWS = 64  # rows of `input.examples` checked (the first ones)
MAX_MESSAGE = 400  # characters of a failure message
DDP_PREFIX = "module."  # what DistributedDataParallel puts before every key of a state dict
_KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL of a worker that ran out of time
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SOURCE_LINE = re.compile(r'File "([^"]+)", line (\d+)')


class ExportFailed(Exception):
    """A failed export with its one-line reason, raised in a worker (or by the tools here).

    `checks` are the figures gathered so far; they are recorded with the failure.
    """

    def __init__(self, message: str, checks: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.checks = checks or {}


# -- the exporter's side (expkit's driver process) --------------------------------------------
def run_worker(request: ExportRequest, module: str, timeout: float | None = None) -> ExportResult:
    """Run `python -m <module> REQUEST.json` in `request.python` and return its result.

    The worker runs in `request.out_dir` with `request.env` added to this environment, in its
    own session, and its progress lines reach `request.say` as they come. A worker that dies
    without a result, or runs longer than `timeout` seconds, is a failed export whose message
    says why in one line; the worker and anything it started are gone when this returns.
    `timeout` defaults to the request's (the job's `exports[].timeout`).

    The worker dies with this process (a kill -9 of the driver stops it before it writes
    into a run that has ended), and its request and result files live in a hidden folder
    of `out_dir`, removed when this returns: nothing is left in the system's temporary
    folder, even when this process is killed.
    """
    import shutil
    import tempfile

    timeout = request.timeout if timeout is None else timeout

    out_dir = Path(request.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".expkit-worker-", dir=out_dir)
    try:
        return _run_worker(request, module, timeout, out_dir, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_worker(
    request: ExportRequest, module: str, timeout: float, out_dir: Path, tmp: str
) -> ExportResult:
    from expkit.procs import die_with_parent

    result_file = Path(tmp) / "result.json"
    read_end, write_end = os.pipe()  # progress lines, apart from the worker's own output
    payload = {
        f.name: _jsonable(getattr(request, f.name)) for f in fields(request) if f.name != "say"
    }
    payload |= {"result_file": str(result_file), "progress_fd": write_end}
    request_file = Path(tmp) / "request.json"
    request_file.write_text(json.dumps(payload))
    log_path = out_dir / LOG_NAME
    env = {**os.environ, **request.env, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [request.python, "-m", module, str(request_file)],
                cwd=out_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(write_end,),
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
    except OSError as error:
        os.close(read_end)
        os.close(write_end)
        return ExportResult([], {}, False, f"cannot start {request.python}: {error}")
    os.close(write_end)
    try:
        timed_out = _follow(proc, read_end, request.say, started + timeout)
    finally:
        _stop_group(proc)
    seconds = time.monotonic() - started
    if timed_out:
        message = f"the export worker ran past its time limit ({timeout:g} s) and was stopped"
        return ExportResult(_files_in(out_dir), {}, False, message)
    try:
        data = json.loads(result_file.read_text())
    except (OSError, ValueError):
        message = f"the export worker {_describe_exit(proc.returncode)} without a result"
        if proc.returncode == -signal.SIGKILL:
            message += " (out of memory?)"  # what the kernel's OOM killer sends
        elif last := last_error_line(log_path):
            message += f": {last}"
        return ExportResult(_files_in(out_dir), {}, False, one_line(message))
    files = [out_dir / name for name in data.get("files", [])]
    checks = data.get("checks", {})
    checks.setdefault("seconds", round(seconds, 2))
    return ExportResult(files, checks, bool(data.get("ok")), one_line(data.get("message", "")))


def _follow(
    proc: subprocess.Popen[bytes], fd: int, say: Callable[[str], None], deadline: float
) -> bool:
    """Pass the worker's progress lines to `say` (on this thread) until it exits; True when
    it ran past `deadline` (it is then still running)."""
    import queue
    import threading

    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        with open(fd, encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, name="export-progress", daemon=True).start()
    exited_at = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        try:
            line = lines.get(timeout=min(0.1, remaining))
        except queue.Empty:
            if proc.poll() is not None:  # exited; a process it started may still hold the pipe
                exited_at = exited_at or time.monotonic()
                if time.monotonic() - exited_at > 1.0:
                    break
            continue
        if line is None:
            break
        say(line)
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return True
    return False


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the worker's process group, then SIGKILL what is left; reap the worker."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + _KILL_GRACE
        while time.monotonic() < deadline:
            proc.poll()  # reap the worker, or the group never empties
            if not _group_alive(proc.pid):
                break
            time.sleep(0.05)
        if not _group_alive(proc.pid):
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != LOG_NAME)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def last_error_line(log: Path) -> str:
    """The last line of a log that says something: a traceback's exception line, not its
    frames, carets or blank lines."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    for line in reversed(_ANSI.sub("", text).splitlines()):
        if line.strip() and not line[0].isspace() and not line.startswith("Traceback ("):
            return line.strip()
    return ""


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` on one line, at most `limit` characters."""
    text = " ".join(_ANSI.sub("", str(text)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_error(error: BaseException, lines: int = 1) -> str:
    """`ExceptionType: first line` of the error's root cause, plus where in the user's code
    (outside site-packages) it points, if it says: `(at model.py:12)`.

    Exporters wrap the real error (torch.onnx's "Failed to convert ... step 3/3" holds the
    operator that has no ONNX function), so the innermost `__cause__` is the one that says it.
    """
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    text = _ANSI.sub("", str(root))
    said = [line.strip() for line in text.splitlines() if line.strip()][:lines]
    said_text = " ".join(said).rstrip(":")
    message = f"{type(root).__name__}: {said_text}" if said else type(root).__name__
    for source in (text, _ANSI.sub("", str(error))):
        found = [m for m in _SOURCE_LINE.finditer(source) if "site-packages" not in m.group(1)]
        if found:
            message += f" (at {Path(found[-1].group(1)).name}:{found[-1].group(2)})"
            break
    return one_line(message)


# -- the worker's side (the run's interpreter) ------------------------------------------------
def worker_main(export_and_check: Callable[[ExportRequest], ExportResult]) -> None:
    """The body of a worker module: read the request, export, write the result.

    Run as `python -m your_plugin.worker REQUEST.json` by `run_worker`.
    """
    import traceback

    payload = json.loads(Path(sys.argv[1]).read_text())
    result_file = Path(payload.pop("result_file"))
    progress = open(payload.pop("progress_fd"), "w", buffering=1, encoding="utf-8")  # noqa: SIM115

    def say(line: str) -> None:
        with contextlib.suppress(OSError):  # the parent stopped listening: keep working
            progress.write(one_line(line, 1000) + "\n")

    for name in ("model_dir", "out_dir", "code_dir"):
        if payload.get(name) is not None:
            payload[name] = Path(payload[name])
    request = ExportRequest(**payload, say=say)
    try:
        result = export_and_check(request)
    except ExportFailed as error:
        traceback.print_exception(error)  # the whole story, in export.log
        result = ExportResult(_files_in(request.out_dir), error.checks, False, str(error))
    except (Exception, SystemExit) as error:
        traceback.print_exception(error)
        result = ExportResult(_files_in(request.out_dir), {}, False, describe_error(error))
    data = {
        "files": [
            str(Path(p).resolve().relative_to(request.out_dir.resolve())) for p in result.files
        ],
        "checks": _jsonable(result.checks),
        "ok": bool(result.ok),
        "message": one_line(result.message),
    }
    partial = result_file.with_suffix(".partial")
    partial.write_text(json.dumps(data))
    os.replace(partial, result_file)  # the parent reads a whole result or none
    progress.close()


def load_model(req: ExportRequest) -> torch.nn.Module:
    """The trained model on CPU in eval mode, as `req.load` says to rebuild it.

    With `factory` ("module:function", imported from `req.code_dir`), `file` holds a state
    dict loaded into `function(**args)`; without, `file` holds a whole module saved with
    `torch.save` or a TorchScript file saved with `torch.jit.save`.
    """
    import torch

    name = req.load.get("file", "model.pt")
    file = Path(req.model_dir) / name
    if not file.is_file():
        raise ExportFailed(f"model.load.file: {name} is not among the model's files")
    if req.code_dir is not None:  # the factory's module, or the classes of a pickled module
        sys.path.insert(0, str(req.code_dir))
    factory = req.load.get("factory")
    if factory:
        model = _build(factory, req.load.get("args") or {}, req.code_dir)
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ExportFailed(
                f"model.load.file: {name} is not a state dict ({describe_error(error)}); "
                "a whole saved module needs no model.load.factory"
            ) from error
        stripped = strip_ddp_prefix(state, model)
        if stripped:
            req.say(
                f"{name}: saved from DistributedDataParallel (keys prefixed `module.`), "
                "loaded without the prefix"
            )
        try:
            model.load_state_dict(state)
        except Exception as error:
            how = (
                " (after removing the `module.` prefix of DistributedDataParallel)"
                if stripped
                else ""
            )
            raise ExportFailed(
                f"model.load.file: {name} does not fit {factory}{how}: {describe_error(error, 2)}"
            ) from error
    elif _is_torchscript(file):
        model = torch.jit.load(file, map_location="cpu")
    else:
        try:
            model = torch.load(file, map_location="cpu", weights_only=False)
        except Exception as error:
            message = f"model.load.file: cannot load {name}: {describe_error(error)}"
            raise ExportFailed(message) from error
        if isinstance(model, dict):
            raise ExportFailed(
                f"model.load.file: {name} holds a state dict, not a module; name the function "
                "that builds the model in model.load.factory (`module:function`)"
            )
    if not isinstance(model, torch.nn.Module):
        raise ExportFailed(f"model.load: {name} holds a {type(model).__name__}, not a torch module")
    return model.cpu().eval()


def strip_ddp_prefix(state: Any, model: torch.nn.Module) -> bool:
    """Remove, in place, the `module.` prefix that a model wrapped in DistributedDataParallel
    (or DataParallel) puts on every key of its state dict, when `state`'s keys do not match
    `model`'s as they are and every one of them has that prefix. True when it did."""
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    if not isinstance(state, dict) or not state:
        return False
    if set(state) == set(model.state_dict()) or not all(
        isinstance(key, str) and key.startswith(DDP_PREFIX) for key in state
    ):
        return False
    consume_prefix_in_state_dict_if_present(state, DDP_PREFIX)
    return True


def _build(factory: str, args: dict[str, Any], code_dir: Path | None) -> torch.nn.Module:
    module_name, _, function_name = factory.partition(":")
    where = f" from {code_dir}" if code_dir else ""
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise ExportFailed(
            f"model.load.factory {factory!r}: cannot import {module_name}{where}: "
            f"{describe_error(error)}"
        ) from error
    function: Any = module
    for part in function_name.split("."):
        function = getattr(function, part, None)
    if not callable(function):
        raise ExportFailed(f"model.load.factory {factory!r}: {module_name} has no {function_name}")
    try:
        return function(**args)
    except Exception as error:
        called = ", ".join(f"{k}={v!r}" for k, v in args.items())
        raise ExportFailed(
            f"model.load.factory {factory!r}: {function_name}({called}) raised "
            f"{describe_error(error)}"
        ) from error


def _is_torchscript(file: Path) -> bool:
    """A `torch.jit.save` archive holds constants.pkl and code/; `torch.save` ones do not."""
    import zipfile

    if not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as archive:
        return any(n.endswith("/constants.pkl") for n in archive.namelist())


def check_inputs(req: ExportRequest) -> list[tuple[str, np.ndarray]]:
    """The inputs an export is checked on, each with its label.

    A seeded random one of `input.shape`; for each dynamic axis another with that axis of a
    different size (batch 3 for batch 1, else twice the size), which proves the exported
    model really takes other sizes; the first rows of `input.examples`, if given.
    """
    import numpy as np

    shape = list(req.input["shape"])
    dtype = np.dtype(req.input.get("dtype", "float32"))
    dynamic = list(req.input.get("dynamic_axes", [0]))
    rng = np.random.default_rng(SEED)

    def random(size: list[int]) -> np.ndarray:
        if dtype.kind in "iu":
            return rng.integers(0, 10, size=size).astype(dtype)
        return rng.standard_normal(size).astype(dtype)

    inputs = [(f"random batch {shape[0]}", random(shape))]
    for axis in dynamic:
        other = list(shape)
        other[axis] = 3 if shape[axis] == 1 else 2 * shape[axis]
        label = (
            f"random batch {other[0]}" if axis == 0 else f"random axis {axis} size {other[axis]}"
        )
        inputs.append((label, random(other)))
    if req.input.get("examples"):
        inputs.append(_examples(req, shape, dtype, dynamic))
    return inputs


def _examples(
    req: ExportRequest, shape: list[int], dtype: np.dtype, dynamic: list[int]
) -> tuple[str, np.ndarray]:
    import numpy as np

    name = req.input["examples"]
    path = Path(req.model_dir) / name
    if not path.is_file():
        raise ExportFailed(f"model.input.examples: {name} is not among the model's files")
    try:
        examples = np.load(path, allow_pickle=False)
    except Exception as error:
        message = f"model.input.examples: cannot read {name}: {describe_error(error)}"
        raise ExportFailed(message) from error
    fixed = [a for a in range(1, len(shape)) if a not in dynamic]
    if examples.ndim != len(shape) or any(examples.shape[a] != shape[a] for a in fixed):
        raise ExportFailed(
            f"model.input.examples: {name} holds an array of shape {list(examples.shape)}; "
            f"the model takes {shape} (axis 0 may differ)"
        )
    rows = min(len(examples), MAX_EXAMPLE_ROWS)
    if 0 not in dynamic:  # whole batches of the model's fixed size
        rows -= rows % shape[0]
        if rows == 0:
            raise ExportFailed(
                f"model.input.examples: {name} has {len(examples)} rows; the model takes "
                f"batches of {shape[0]} (axis 0 is not dynamic)"
            )
    count = f"{rows} rows" if rows == len(examples) else f"first {rows} of {len(examples)} rows"
    return f"examples {name} ({count})", np.ascontiguousarray(examples[:rows], dtype=dtype)


def _batches(req: ExportRequest, x: np.ndarray) -> list[np.ndarray]:
    """`x` as the model takes it: whole, or split into batches of a fixed axis 0."""
    size = req.input["shape"][0]
    if 0 in req.input.get("dynamic_axes", [0]) or len(x) == size:
        return [x]
    return [x[i : i + size] for i in range(0, len(x), size)]


def eager_outputs(
    req: ExportRequest, model: torch.nn.Module, inputs: list[tuple[str, np.ndarray]]
) -> list[np.ndarray]:
    """The eager model's output for each input (before exporting: a model that does not run
    on its own inputs is a spec error, said plainly rather than as an exporter's)."""
    import numpy as np
    import torch

    outputs = []
    for label, x in inputs:
        try:
            with torch.inference_mode():
                parts = [_output(model(torch.from_numpy(b))) for b in _batches(req, x)]
        except ExportFailed:
            raise
        except Exception as error:
            raise ExportFailed(
                f"the eager model failed on {label} (shape {list(x.shape)}): "
                f"{describe_error(error)}"
            ) from error
        outputs.append(np.concatenate(parts) if len(parts) > 1 else parts[0])
    return outputs


def _output(value: Any) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor):
        raise ExportFailed(
            f"the model returns a {type(value).__name__}; exporters take a model with one "
            "tensor output"
        )
    return value.detach().cpu().numpy()


def compare(expected: np.ndarray, actual: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    """How far `actual` is from `expected`: max_abs_error, max_rel_error (|a-e| / max(|e|,
    tiny)), ok (same shape and |a-e| <= atol + rtol*|e| everywhere, as np.allclose) and, for
    2-D outputs (rows of scores), argmax_agreement: the fraction of rows with the same argmax.
    """
    import numpy as np

    e, a = np.asarray(expected), np.asarray(actual)
    if e.shape != a.shape:
        return {"max_abs_error": None, "max_rel_error": None, "ok": False, "shape_got": a.shape}
    e64, a64 = e.astype(np.float64), a.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a64 - e64)
        diff[(e64 == a64) | (np.isnan(e64) & np.isnan(a64))] = 0.0  # inf == inf, nan where nan
        tiny = np.finfo(e.dtype if e.dtype.kind == "f" else np.float64).tiny
        rel = diff / np.maximum(np.abs(e64), tiny)
        ok = bool(np.all(diff <= atol + rtol * np.abs(np.nan_to_num(e64))))
    result = {
        "max_abs_error": _figure(diff.max() if diff.size else 0.0),
        "max_rel_error": _figure(rel.max() if rel.size else 0.0),
        "ok": ok,
    }
    if e.ndim == 2 and e.shape[1] > 1 and len(e):
        result["argmax_agreement"] = float(np.mean(e.argmax(1) == a.argmax(1)))
    return result


def _figure(value: Any) -> float | str:
    """A float for JSON; nan and inf as text (what json cannot hold)."""
    value = float(value)
    return value if value == value and abs(value) != float("inf") else str(value)


def check_parity(
    req: ExportRequest,
    expected: list[np.ndarray],
    run_exported: Callable[[np.ndarray], np.ndarray],
    inputs: list[tuple[str, np.ndarray]],
    runtime: str = "the exported model",
) -> tuple[dict[str, Any], str]:
    """Run the exported form on each input and compare with the eager outputs.

    Returns the standard checks (max_abs_error, max_rel_error, atol, rtol and `checked`: one
    entry per input) and the failure message, "" when every input matched. `runtime` names
    what runs the exported model in a message ("onnxruntime failed on random batch 3: ...").
    """
    import numpy as np

    checked, failures = [], []
    for (label, x), want in zip(inputs, expected, strict=True):
        entry: dict[str, Any] = {"input": label, "shape": list(x.shape)}
        try:
            parts = [np.asarray(run_exported(b)) for b in _batches(req, x)]
            got = np.concatenate(parts) if len(parts) > 1 else parts[0]
        except Exception as error:
            entry |= {"max_abs_error": None, "max_rel_error": None, "ok": False}
            entry["error"] = describe_error(error)
            failures.append(f"{runtime} failed on {label}: {entry['error']}")
            checked.append(entry)
            continue
        entry |= compare(want, got, req.atol, req.rtol)
        if "shape_got" in entry:
            got_shape = list(entry.pop("shape_got"))
            entry["output_shape"] = got_shape
            failures.append(
                f"{runtime} gave output shape {got_shape} on {label}; "
                f"the eager model gives {list(want.shape)}"
            )
        elif not entry["ok"]:
            worst = entry["max_abs_error"]
            shown = f"{worst:.2g}" if isinstance(worst, float) else worst
            failures.append(
                f"outputs differ from the eager model on {label}: max abs error {shown} > "
                f"tolerance (atol {req.atol:g}, rtol {req.rtol:g})"
            )
        checked.append(entry)
    figures = {key: _worst([c[key] for c in checked]) for key in ("max_abs_error", "max_rel_error")}
    checks = {**figures, "atol": req.atol, "rtol": req.rtol, "checked": checked}
    return checks, one_line(failures[0]) if failures else ""


def _worst(values: list[Any]) -> float | str | None:
    """The largest figure; a nan or inf (text) wins, None when no input gave one."""
    text = [v for v in values if isinstance(v, str)]
    if text:
        return text[0]
    numbers = [v for v in values if isinstance(v, float | int)]
    return max(numbers) if numbers else None


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_checks(files: list[Path]) -> dict[str, Any]:
    """The standard `sha256` ({file name: hex}) and `torch` (version) checks."""
    import torch

    return {"sha256": {p.name: sha256(p) for p in files}, "torch": torch.__version__}


@contextlib.contextmanager
def collect_warnings(*categories: type[Warning]) -> Iterator[list[str]]:
    """Collect the warnings of `categories` raised inside, each once, as `Category: first
    sentence (at file:line)` (the tracer's "Converting a tensor to a Python boolean might
    cause the trace to be incorrect" says why a trace may be wrong); the others are shown as
    usual (in the worker's log)."""
    import warnings

    said: list[str] = []
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            for category in categories:
                warnings.simplefilter("always", category)
            yield said
    finally:
        for w in caught:
            if not issubclass(w.category, categories):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
                continue
            first = one_line(str(w.message)).split(". ")[0].rstrip(".")
            line = f"{w.category.__name__}: {first}"
            if "site-packages" not in w.filename:
                line += f" (at {Path(w.filename).name}:{w.lineno})"
            if line not in said:
                said.append(line)
