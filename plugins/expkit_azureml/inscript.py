"""Azure ML's in-script API inside an expkit run: `Run.get_context()` records into expkit.

A script written for Azure ML does `from azureml.core.run import Run; run = Run.get_context();
run.log("acc", 0.9)`. Outside Azure ML, azureml returns its offline run, which prints
"Attempted to log scalar metric" and drops the value. Inside an expkit run (EXPKIT_RUN_ID set)
that is not on Azure ML, `install` (the import hook on `azureml.core.run`, see
`expkit.importhooks`) makes `Run.get_context()` return an `ExpkitRun` instead: the same
calls reach the expkit run through `expkit.context` (metrics, tables, tags, files in outputs/).

On Azure ML (azureml finds its run: AZUREML_RUN_ID and the service) azureml's own run is
returned, untouched; the `azureml` target's forwarder already sends expkit's calls there.

`ExpkitRun` subclasses azureml's `_OfflineRun`, so `isinstance(run, _OfflineRun)` still says
"not on Azure ML"; its `id` is the expkit run id (so `run.id.startswith("OfflineRun")` is
false: the script records as it would on Azure ML). `get_metrics()` answers as azureml's,
read back from the run's metric channel (every process's). What it cannot do here
(register_model, child runs, datasets, ...) is a no-op with one notice on stderr per method,
never an exception in the script. Standard library only beyond what azureml already imported.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

from expkit import context

RUN_ID_ENV = context.RUN_ID_ENV
RUN_DIR_ENV = "EXPKIT_RUN_DIR"
OUTPUTS = "outputs"

# _OfflineRun methods that do nothing useful here: one notice, and nothing else (azureml's
# offline ones only print "Attempted to ..." again); child_run still returns azureml's
# offline child run, which the script may go on calling.
OFFLINE_ONLY = (
    "add_properties",
    "fail",
    "cancel",
    "log_residuals",
    "log_predictions",
    "log_accuracy_table",
    "log_confusion_matrix",
)
OFFLINE_CHILD = "child_run"

# What ExpkitRun records; whatever they raise (a bad argument) is a notice, never an exception
# (`log` only queues the value, as expkit's own: it has nothing to raise, and is the hot path).
RECORDING = (
    "log_list",
    "log_row",
    "log_table",
    "log_image",
    "set_tags",
    "tag",
    "upload_file",
    "upload_files",
    "upload_folder",
)

_noticed: set[str] = set()
_noticed_lock = threading.Lock()
_runs: dict[type, Any] = {}  # one ExpkitRun per process (per _OfflineRun class)


def install(module: Any) -> None:
    """Make `module.Run.get_context()` (`module`: azureml.core.run, just imported) return an
    `ExpkitRun` inside an expkit run where azureml itself would return its offline run."""
    run_class = module.Run
    original = run_class.__dict__["get_context"].__func__
    if getattr(original, "_expkit", False):  # installed already
        return
    offline = module._OfflineRun
    not_in_run = getattr(module, "RunEnvironmentException", None)

    @functools.wraps(original)
    def get_context(cls: Any, allow_offline: bool = True, *args: Any, **kwargs: Any) -> Any:
        if not os.environ.get(RUN_ID_ENV):
            return original(cls, allow_offline, *args, **kwargs)
        try:
            run = original(cls, allow_offline, *args, **kwargs)
        except Exception as error:  # allow_offline=False outside Azure ML: expkit's run is it
            if not_in_run is None or not isinstance(error, not_in_run):
                raise
            return expkit_run(offline)
        if type(run) is offline:
            return expkit_run(offline)
        return run

    get_context._expkit = True  # type: ignore[attr-defined]
    run_class.get_context = classmethod(get_context)


def expkit_run(offline: type) -> Any:
    """The process's `ExpkitRun` (made on first use) built on azureml's `_OfflineRun`."""
    run = _runs.get(offline)
    if run is None:
        run = _runs[offline] = _run_class(offline)(os.environ.get(RUN_ID_ENV) or "")
    return run


def experiment_name(run_id: str) -> str:
    """The job's experiment: EXPKIT_RUN_ID is `<experiment>_<n>`; else the run folder's
    job.yaml says it (EXPKIT_RUN_DIR); "" when neither does."""
    head, _, number = run_id.rpartition("_")
    if head and number.isdigit():
        return head
    job = Path(os.environ.get(RUN_DIR_ENV, "."), "job.yaml")
    try:
        found = re.search(r"^experiment:\s*['\"]?([^'\"\s#]+)", job.read_text(), re.MULTILINE)
    except OSError:
        return ""
    return found.group(1) if found else ""


def outputs_dir() -> Path:
    """The run's working outputs/ (sealed into the run at post-process), made if missing."""
    run_dir = os.environ.get(RUN_DIR_ENV)
    folder = Path(run_dir, "work", OUTPUTS) if run_dir else Path(OUTPUTS).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def output_path(name: str) -> Path | None:
    """Where the artifact `name` ("outputs/model.pt", "model.pt", "plots/") goes in outputs/;
    None (after a notice) for a name that leaves it."""
    parts = [p for p in re.split(r"[\\/]+", name) if p not in ("", ".")]
    if parts[:1] == [OUTPUTS]:
        parts = parts[1:]
    if ".." in parts or re.match(r"^[A-Za-z]:", name):
        notice(f"{name!r} is not a path inside outputs/; not copied")
        return None
    return outputs_dir().joinpath(*parts)


def notice(text: str, key: str | None = None) -> None:
    """One line on stderr, once per `key` (default: the text) in this process."""
    key = text if key is None else key
    with _noticed_lock:
        if key in _noticed:
            return
        _noticed.add(key)
    try:
        sys.stderr.write(f"expkit: azureml: {text}\n")
        sys.stderr.flush()
    except Exception:
        pass


def unsupported(what: str) -> None:
    """The one notice for a call this run cannot do outside Azure ML."""
    notice(f"Run.{what} is not supported in an expkit run outside Azure ML; ignored", what)


class _Experiment:
    """`run.experiment` of an ExpkitRun: the job's experiment name; other attributes are None
    with a notice (there is no Azure ML workspace here)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        unsupported(f"experiment.{attribute}")
        return None

    def __repr__(self) -> str:
        return f"Experiment(Name: {self.name})"


def _run_class(offline: type) -> type:
    """The ExpkitRun class on azureml's `_OfflineRun` (a subclass, so that scripts' offline
    checks keep their meaning)."""

    class ExpkitRun(offline):  # type: ignore[misc, valid-type, unused-ignore]
        """An azureml run object that records into the expkit run (`expkit.context`)."""

        def __init__(self, run_id: str) -> None:
            super().__init__(run_id=run_id)
            self._tags: dict[str, str] = {}
            self._experiment = _Experiment(experiment_name(run_id))

        @property
        def experiment(self) -> _Experiment:
            """The job's experiment (its `name`)."""
            return self._experiment

        @property
        def parent(self) -> Any:
            """This run: under expkit there is no parent run to log to."""
            notice("Run.parent is the run itself in an expkit run", "parent")
            return self

        # -- metrics ------------------------------------------------------------------------
        def log(self, name: str, value: Any, description: str = "", step: Any = None) -> None:
            """Record one value of metric `name` (at `step` if given)."""
            context.get_context().log(name, value, step)

        def log_list(self, name: str, value: Any, description: str = "") -> None:
            """Record a list of values of metric `name`, stepped 0..n-1."""
            context.get_context().log_list(name, list(value))

        def log_row(self, name: str, description: Any = None, **kwargs: Any) -> None:
            """Record one row of the table `name`."""
            context.get_context().log_row(name, **kwargs)

        def log_table(self, name: str, value: Any, description: str = "") -> None:
            """Record the table `name` given as columns (`{"epoch": [1, 2], "loss": [.5, .4]}`),
            one row per index."""
            record = context.get_context()
            columns = {str(k): v if isinstance(v, (list, tuple)) else [v] for k, v in value.items()}
            for i in range(max((len(v) for v in columns.values()), default=0)):
                record.log_row(name, **{k: v[i] for k, v in columns.items() if i < len(v)})

        def log_image(
            self, name: str, path: Any = None, plot: Any = None, description: str = ""
        ) -> None:
            """Save the image file at `path`, or the matplotlib `plot` (pyplot or a figure), in
            outputs/ as `<name>.<ext>`, and tag the run `image.<name>` with its place there."""
            stem = re.sub(r"[^\w.-]+", "_", name).strip("._") or "image"
            try:
                if plot is not None:
                    target = outputs_dir() / f"{stem}.png"
                    plot.savefig(target)
                elif path is not None:
                    source = Path(path)
                    target = outputs_dir() / f"{stem}{source.suffix or '.png'}"
                    if source.resolve() != target.resolve():
                        shutil.copyfile(source, target)
                else:
                    return notice(f"log_image({name!r}) got neither path nor plot; ignored")
            except Exception as error:
                return notice(f"log_image({name!r}) failed ({type(error).__name__}: {error})")
            self.set_tags({f"image.{name}": f"{OUTPUTS}/{target.name}"})

        def get_metrics(
            self, name: str | None = None, recursive: bool = False, *args: Any, **kwargs: Any
        ) -> dict[str, Any]:
            """What the run's processes logged so far, as azureml answers: {name: value} for a
            metric logged once, {name: [values]} for one logged repeatedly, {name: {column:
            [values]}} for a table; `recursive`: {run id: that} (there are no child runs)."""
            context.get_context().flush()
            metrics = channel_metrics(os.environ.get(context.CHANNEL_ENV), name)
            return {self.id: metrics} if recursive else metrics

        @property
        def input_datasets(self) -> dict[str, Any]:
            """{}: Azure ML datasets are not delivered to an expkit run (the job's `data:` is)."""
            notice("Run.input_datasets is {} in an expkit run: the job's data: is on disk", "ds")
            return {}

        @property
        def output_datasets(self) -> dict[str, Any]:
            """{}: write outputs under outputs/, which expkit seals with the run."""
            notice("Run.output_datasets is {} in an expkit run: write under outputs/", "out-ds")
            return {}

        # -- tags -----------------------------------------------------------------------------
        def set_tags(self, tags: dict[str, Any]) -> None:
            """Tag the run (values as text; None is "")."""
            tags = {str(k): "" if v is None else str(v) for k, v in tags.items()}
            self._tags.update(tags)
            context.get_context().set_tags(tags)

        def tag(self, key: str, value: Any = None) -> None:
            """Tag the run with one key (value "" when not given)."""
            self.set_tags({key: value})

        def get_tags(self) -> dict[str, str]:
            """The tags this process set on the run."""
            return dict(self._tags)

        # -- files ------------------------------------------------------------------------------
        def upload_file(self, name: str, path_or_stream: Any, datastore_name: Any = None) -> None:
            """Copy a file (or a binary stream) to outputs/`name` ("outputs/" prefix optional):
            it becomes one of the run's outputs."""
            target = output_path(name)
            if target is None:
                return
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                if hasattr(path_or_stream, "read"):
                    with open(target, "wb") as out:
                        shutil.copyfileobj(path_or_stream, out)
                elif Path(path_or_stream).resolve() != target.resolve():
                    shutil.copyfile(path_or_stream, target)
            except Exception as error:
                notice(f"upload_file({name!r}) failed ({type(error).__name__}: {error})")

        def upload_files(
            self, names: Any, paths: Any, return_artifacts: bool = False, **kwargs: Any
        ) -> None:
            """`upload_file` for each name and path."""
            for name, path in zip(names, paths, strict=False):
                self.upload_file(name, path)

        def upload_folder(self, name: str, path: Any, datastore_name: Any = None) -> None:
            """Copy the folder `path` to outputs/`name`."""
            target = output_path(name)
            if target is None:
                return
            try:
                if Path(path).resolve() != target.resolve():
                    shutil.copytree(path, target, dirs_exist_ok=True)
            except Exception as error:
                notice(f"upload_folder({name!r}) failed ({type(error).__name__}: {error})")

        # -- the run's life: nothing to do here -------------------------------------------------
        def complete(self, *args: Any, **kwargs: Any) -> None:
            """Write what was logged; expkit ends the run when the script exits."""
            context.get_context().flush()

        def flush(self, *args: Any, **kwargs: Any) -> None:
            """Write what was logged to the run's channel."""
            context.get_context().flush()

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: Any) -> None:
            context.get_context().flush()

        def __repr__(self) -> str:
            return f"Run(Experiment: {self._experiment.name}, Id: {self.id}, expkit)"

        def __getattr__(self, attribute: str) -> Any:
            # What azureml's Run has and this one does not (get_metrics, register_model, ...)
            found = getattr(sys.modules["azureml.core.run"].Run, attribute, None)
            if attribute.startswith("_") or found is None:
                raise AttributeError(
                    f"{type(self).__name__!r} object has no attribute {attribute!r}"
                )
            if callable(found):
                unsupported(f"{attribute}()")
                return _ignored
            unsupported(attribute)
            return None

    for method in RECORDING:
        setattr(ExpkitRun, method, _never_raises(ExpkitRun.__dict__[method]))
    for method in OFFLINE_ONLY:
        setattr(ExpkitRun, method, _noticed_only(method))
    if hasattr(offline, OFFLINE_CHILD):
        setattr(ExpkitRun, OFFLINE_CHILD, _noticed_offline(getattr(offline, OFFLINE_CHILD)))
    ExpkitRun.__qualname__ = ExpkitRun.__name__ = "ExpkitRun"
    return ExpkitRun


def _never_raises(method: Any) -> Any:
    """`method`, with whatever it raises turned into one notice (per method) and None: a
    script's logging call never fails the script."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as error:
            name = method.__name__
            notice(f"Run.{name}() failed ({type(error).__name__}: {error}); ignored", name)
            return None

    return call


def _ignored(*args: Any, **kwargs: Any) -> None:
    return None


def _noticed_only(name: str) -> Any:
    """A method that does nothing but say once that it is not supported here."""

    def call(self: Any, *args: Any, **kwargs: Any) -> None:
        unsupported(f"{name}()")

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"`{name}`: not supported in an expkit run outside Azure ML (one notice)."
    return call


def _noticed_offline(method: Any) -> Any:
    """azureml's offline `method`, after one notice that it is not supported here."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        unsupported(f"{method.__name__}()")
        return method(self, *args, **kwargs)

    return call


def channel_metrics(folder: str | None, name: str | None = None) -> dict[str, Any]:
    """The metrics in the run's channel `folder` (every process's `*.jsonl`, lines as
    `expkit.context` writes them), in the order they were logged, shaped as azureml's
    `get_metrics` shapes them; only `name` when given. {} without a channel; a line being
    written (or unreadable) is skipped."""
    grouped: dict[str, list[tuple[float, Any]]] = {}
    for path in sorted(Path(folder).glob("*.jsonl")) if folder else ():
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                calls = list(context.calls_of(json.loads(line)))
            except (ValueError, TypeError):
                continue
            for kind, key, value, _step, ts, _rank in calls:
                if kind in ("m", "r") and (name is None or key == name):
                    grouped.setdefault(key, []).append((ts, value))
    result: dict[str, Any] = {}
    for key, stamped in grouped.items():
        values = [value for _ts, value in sorted(stamped, key=lambda pair: pair[0])]
        if all(isinstance(v, dict) for v in values):
            columns: dict[str, list[Any]] = {}
            for row in values:
                for column, cell in row.items():
                    columns.setdefault(column, []).append(cell)
            result[key] = columns
        else:
            result[key] = values[0] if len(values) == 1 else values
    return result
