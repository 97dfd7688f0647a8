"""What the sink and the registry share: the tracking URI, the client, and the MLflow run that
mirrors an expkit run.

The client is a `Tracker` (`expkit_mlflow.api`): for an `http://` or `https://` server, MLflow's
REST API without importing mlflow (`expkit_mlflow.rest`); for any other store, or a server
configured in a way only mlflow's library honours, MLflow's own client
(`expkit_mlflow.library`). See `connect`.

They must agree on all three, because the registry points its model versions at the run the
sink created. The sink records that run's id as the expkit run's tag `mlflow.run_id` (shown
by `expkit runs show`), and the registry reads it back; when no sink made one (a job with
`registries: [mlflow]` and no `metrics: [mlflow]`), the registry makes it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import getpass
import logging
import os
import posixpath
import re
import shutil
import socket
import stat
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expkit.plugin import Option, declare_options
from expkit_mlflow.api import TAGS_PER_CALL, AlreadyExists, Tracker
from expkit_mlflow.transport import BACKOFF, RETRIES, TIMEOUT, library_only

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from expkit.plugin import JobSpec, RunInfo

NAME = "mlflow"
RUN_TAG = "mlflow.run_id"
# MLflow's limits (mlflow.utils.validation): longer keys and values are refused, so they are
# shortened here (the limits on a log_batch call's size: `expkit_mlflow.api`).
KEY_LENGTH = 250
PARAM_LENGTH = 6000
TAG_LENGTH = 8000
WRITABLE = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
# The experiment tag MLflow 3's UI reads to choose an experiment's view (its
# ExperimentKind: "genai_development" opens traces and evaluations, "custom_model_development"
# the runs, models and metrics of model training: mlflow/server/js, ExperimentKind).
KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# MLflow retries a failed HTTP request 7 times with exponential backoff (about 4 minutes). The
# sink is already retried by expkit (a few seconds), and post-process waits for it at most
# 300 s: with MLflow's default a dead server would hold the run up instead of being reported.
# These apply unless the user set them (to the library through the environment; the REST
# client reads them likewise: `expkit_mlflow.transport.Settings`).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(RETRIES),
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(BACKOFF),
    "MLFLOW_HTTP_REQUEST_TIMEOUT": str(TIMEOUT),
}


# The options of the sink and the registry: both talk to the same server.
TAKES = declare_options(
    tracking_uri=Option(
        str,
        help="the MLflow tracking server or store (default: config.json's mlflow.tracking_uri, "
        "$MLFLOW_TRACKING_URI, else SQLite in the workspace)",
    ),
    artifact_location=Option(
        str,
        help="where a new MLflow experiment keeps its artifacts (default: the server's "
        "choice; the workspace's mlartifacts/ for the SQLite default)",
    ),
)


@dataclass
class Tracking:
    """Where MLflow data goes."""

    uri: str
    artifact_root: str | None = None  # where a new experiment keeps its artifacts


def sink_options(job: JobSpec) -> dict[str, Any]:
    """The options of the job's `mlflow` metric sink (the registry uses the same server)."""
    return next((dict(s.options) for s in job.metrics if s.name == NAME), {})


def resolve(run: RunInfo, options: dict[str, Any]) -> Tracking:
    """The tracking URI: the sink's options, the workspace's config.json, MLFLOW_TRACKING_URI,
    else SQLite in the workspace. The embedded default is a database file rather than
    MLflow's file store, which mlflow 3 refuses unless told otherwise, with its artifacts
    next to it (for any other SQLite URI, MLflow's default applies: ./mlruns).

    `artifact_location` (an option, or in config.json) is where a new experiment keeps its
    artifacts; a server decides that itself unless told."""
    workspace = run.workspace_dir
    root = options.get("artifact_location")
    if options.get("tracking_uri"):
        return Tracking(str(options["tracking_uri"]), root)
    config = run.plugin_config(NAME)
    if config.get("tracking_uri"):
        return Tracking(str(config["tracking_uri"]), root or config.get("artifact_location"))
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return Tracking(os.environ["MLFLOW_TRACKING_URI"], root)
    root = root or (workspace / "mlartifacts").as_uri()
    return Tracking(f"sqlite:///{workspace / 'mlflow.db'}", root)


def connect(tracking: Tracking) -> Tracker:
    """A client for `tracking`: for an `http://` or `https://` server, the REST client
    (`expkit_mlflow.rest.RestTracker`: no mlflow import, which alone takes longer than a short
    run's post-process); for any other store, or when the configuration asks for what only
    mlflow's library does (`expkit_mlflow.transport.library_only`: a request header or auth
    plugin, AWS SigV4, ...), MLflow's own client (`connect_library`)."""
    if library_only(tracking.uri) is None:
        from expkit_mlflow.rest import RestTracker

        return RestTracker(tracking.uri)
    from expkit_mlflow.library import LibraryTracker

    return LibraryTracker(connect_library(tracking))


def connect_library(tracking: Tracking) -> MlflowClient:
    """MLflow's own client for `tracking` (this is where mlflow is imported), its store ready.

    A SQLite store is created or upgraded here, by one process at a time (`store_lock`):
    MLflow migrates an empty database on first use, and runs that start at once on a fresh
    workspace would otherwise migrate it together and leave it half-made for every run."""
    for variable, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(variable, value)
    # Creating or upgrading a SQLite store logs a few INFO lines per run: noise in the terminal.
    for logger in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    from mlflow import MlflowClient

    database = sqlite_file(tracking.uri)
    if database is None:
        return MlflowClient(tracking_uri=tracking.uri)
    with store_lock(database):
        client = MlflowClient(tracking_uri=tracking.uri)
        client.search_experiments(max_results=1)  # the store open: created, migrated
    return client


# Clients being made ahead of the sink's open (`connect_early`), by tracking URI.
_EARLY: dict[str, Future[Tracker]] = {}
_EARLY_LOCK = threading.Lock()


def connect_early(tracking: Tracking) -> None:
    """Start `connect(tracking)` on a background thread, at once: importing mlflow takes 2-3 s
    of CPU (and creating a SQLite store seconds more), importing `requests` for the REST
    client about 0.1 s, which a short script would otherwise wait for at post-process. The
    sink's open takes the client with `connected`. Once per tracking URI until taken.

    Unlike the sink's thread (`expkit.metrics.SINK_NICENESS`), this one keeps its priority:
    it starts before the script and does a bounded piece of work once, and at a lower
    priority a busy machine starves it (under load, a niced sink took 3-4x as long to import
    mlflow as the peer did un-niced: benchmarks/bench_sink_drain.py),
    which post-process then waits for; Linux lets no thread raise its priority back."""
    with _EARLY_LOCK:
        if tracking.uri in _EARLY:
            return
        future: Future[Tracker] = Future()
        _EARLY[tracking.uri] = future

    def make() -> None:
        try:
            future.set_result(connect(tracking))
        except BaseException as error:  # told to `connected`, which connects again
            future.set_exception(error)

    thread = threading.Thread(target=make, name="expkit-mlflow-connect", daemon=True)
    thread.start()
    if sqlite_file(tracking.uri) is not None:  # never left half-made by a process that ends
        atexit.register(thread.join)  # meanwhile (a prepare that failed): it is finished


def connected(tracking: Tracking) -> Tracker:
    """A client for `tracking`: the one `connect_early` made (waiting for it to be ready),
    else a new one (`connect`). An early connection that failed is not reused: this connects
    again, so that the sink's open reports (and retries) the failure as it would have anyway.
    Each early client is taken once: a retried open, or the next run, connects anew."""
    with _EARLY_LOCK:
        future = _EARLY.pop(tracking.uri, None)
    if future is not None:
        with contextlib.suppress(Exception):
            return future.result()
    return connect(tracking)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` tracking URI; None for any other store (and
    for an in-memory SQLite database)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextmanager
def store_lock(database: Path) -> Iterator[None]:
    """Hold `<database>.lock` (an exclusive flock) while the block runs: one process at a
    time creates or upgrades the SQLite store. Without a writable folder there is no lock
    (nor a store to create there)."""
    try:
        fd = os.open(database.with_name(database.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def ensure_run(client: Tracker, run: RunInfo, tracking: Tracking) -> tuple[str, bool]:
    """The id of the MLflow run mirroring `run`, created (with params and tags) if there is
    none yet; and whether it was created now. A retried `open` finds the run it made before.

    A trial of a sweep (`run.sweep`) is created as a child of the sweep's parent run, found
    or created with it under the workspace's sweep lock (`expkit_mlflow.sweeps`); a trial
    whose run exists already (the sink of a dead driver, closed by `expkit.sinkrecovery`)
    gets that parent's tag if it lacks it."""
    existing = run.tags().get(RUN_TAG)
    if existing:
        if run.sweep is not None:
            _nest(client, run, existing, tracking)
        return existing, False
    common = _source_tags(run)
    tags = {
        "expkit.run_id": run.run_id,
        "expkit.experiment": run.experiment,
        "expkit.workspace": workspace_name(run),
        "expkit.snapshot_hash": run.snapshot_hash,
        "expkit.environment_hash": run.environment_hash,
        **common,
        **run.job.tags,
    }
    experiment = experiment_id(client, run.experiment, tracking)
    if run.sweep is None:
        created = client.create_run(
            experiment,
            start_time=int(run.created * 1000),
            tags=clean_tags(tags),
            run_name=run.run_id,
        )
    else:
        from expkit_mlflow.sweeps import parent_run, sweep_lock, trial_name, trial_tags

        # The parent, and this trial's run under it, in one hold of the lock: a trial that
        # ends meanwhile sees this one running and leaves the parent RUNNING.
        with sweep_lock(run.workspace_dir):
            parent = parent_run(client, run, experiment, workspace_name(run), common)
            created = client.create_run(
                experiment,
                start_time=int(run.created * 1000),
                tags=clean_tags({**tags, **trial_tags(run, parent)}),
                run_name=trial_name(run),
            )
    mlflow_run_id = created.run_id
    log_params(client, mlflow_run_id, run.params())
    run.set_tags({RUN_TAG: mlflow_run_id})
    return mlflow_run_id, True


def _nest(client: Tracker, run: RunInfo, mlflow_run_id: str, tracking: Tracking) -> None:
    """Make the existing MLflow run of trial `run` a child of its sweep's parent, if it is
    not one already (the parent found or created as for a new trial)."""
    from expkit_mlflow.sweeps import PARENT_TAG, parent_run, sweep_lock, trial_tags

    if PARENT_TAG in client.get_run(mlflow_run_id).tags:
        return
    experiment = experiment_id(client, run.experiment, tracking)
    with sweep_lock(run.workspace_dir):
        parent = parent_run(client, run, experiment, workspace_name(run), _source_tags(run))
        log_tags(client, mlflow_run_id, trial_tags(run, parent))


def _source_tags(run: RunInfo) -> dict[str, str]:
    """MLflow's own tags for who ran what: a run's, and its sweep's parent's."""
    return {
        "mlflow.source.name": run.job.entry_script,
        "mlflow.source.type": "LOCAL",
        "mlflow.user": _user(),
    }


def workspace_name(run: RunInfo) -> str:
    """The workspace as the runs' tag `expkit.workspace` names it: "host:/its/path"."""
    return f"{socket.gethostname()}:{run.workspace_dir}"


def experiment_id(client: Tracker, name: str, tracking: Tracking) -> str:
    """The MLflow experiment named like the expkit one, created if needed, as a model-training
    experiment (`KIND_TAG`), so that MLflow 3's UI opens it on its runs and models rather than
    in its GenAI view; an existing one without that tag gets it."""
    found = client.get_experiment_by_name(name)
    if found is None:
        root = tracking.artifact_root
        location = f"{root.rstrip('/')}/{name}" if root else None
        try:
            return client.create_experiment(name, location, {KIND_TAG: MODEL_TRAINING})
        except AlreadyExists:  # another run created it meanwhile
            found = client.get_experiment_by_name(name)
            if found is None:  # created and deleted for good meanwhile: the error says it
                raise
    if found.lifecycle_stage != "deleted" and KIND_TAG not in found.tags:
        # Made by an earlier expkit, or by hand: a training experiment all the same (a kind
        # chosen in the UI or by the user is a tag already, and stays).
        client.set_experiment_tag(found.experiment_id, KIND_TAG, MODEL_TRAINING)
    if found.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {name!r} is deleted in {tracking.uri}; restore it "
            f"(`mlflow experiments restore --experiment-id {found.experiment_id}`) or remove it "
            "for good (`mlflow gc`)"
        )
    return found.experiment_id


def log_params(client: Tracker, mlflow_run_id: str, params: dict[str, str]) -> None:
    """Log `params` as the run's MLflow params (keys and values as MLflow takes them), 100 a
    call. A param the run already holds must have the same value (MLflow refuses to change
    one: see `MlflowWriter.log_params`)."""
    items = list(clean_params(params).items())
    for i in range(0, len(items), TAGS_PER_CALL):
        client.log_batch(mlflow_run_id, params=dict(items[i : i + TAGS_PER_CALL]))


def clean_params(params: dict[str, str]) -> dict[str, str]:
    """Params as MLflow takes them: valid keys, values within its length limit."""
    return {mlflow_key(k): str(v)[:PARAM_LENGTH] for k, v in params.items()}


def log_tags(client: Tracker, mlflow_run_id: str, tags: dict[str, Any]) -> None:
    """Set `tags` on the run (keys and values as MLflow takes them), 100 a call."""
    items = list(clean_tags(tags).items())
    for i in range(0, len(items), TAGS_PER_CALL):
        client.log_batch(mlflow_run_id, tags=dict(items[i : i + TAGS_PER_CALL]))


def clean_tags(tags: dict[str, Any]) -> dict[str, str]:
    """Tags as MLflow takes them: valid keys, string values within its length limit."""
    return {mlflow_key(k): str(v)[:TAG_LENGTH] for k, v in tags.items() if v is not None}


_NOT_ALLOWED = re.compile(r"[^\w./\- :]")


@lru_cache(maxsize=4096)
def mlflow_key(name: str) -> str:
    """`name` as a valid MLflow metric, param or tag key: characters MLflow refuses become
    `_`, and a key that would not name one file (`a//b`, `../x`, `/x`) loses its slashes."""
    key = _NOT_ALLOWED.sub("_", name)[:KEY_LENGTH]
    if posixpath.normpath(key) != key or key.startswith(("/", "..")) or key == ".":
        key = "_" + key.replace("/", "_")[: KEY_LENGTH - 1]
    return key


def outputs_logged(client: Tracker, mlflow_run_id: str) -> bool:
    return bool(client.list_artifacts(mlflow_run_id, "outputs"))


def log_outputs(client: Tracker, mlflow_run_id: str, run: RunInfo) -> bool:
    """Log the run's sealed outputs as the artifacts `outputs/...`: the files of the run's
    manifest, exactly (never a link the script left, never a file that is not recorded).
    Returns whether there was anything to log."""
    names = list(run.outputs())
    return _log_files(client, mlflow_run_id, run.run_dir, "outputs", names)


def log_logs(client: Tracker, mlflow_run_id: str, run: RunInfo) -> bool:
    """Log the run's logs/ as artifacts: its regular files only (a link is never followed)."""
    folder = run.run_dir / "logs"
    names = []
    if folder.is_dir() and not folder.is_symlink():
        for root, dirs, files in os.walk(folder, followlinks=False):
            dirs.sort()
            for name in files:
                path = Path(root) / name
                if stat.S_ISREG(os.lstat(path).st_mode):
                    names.append(path.relative_to(folder).as_posix())
    return _log_files(client, mlflow_run_id, run.run_dir, "logs", sorted(names))


def _log_files(
    client: Tracker, mlflow_run_id: str, run_dir: Path, folder: str, names: list[str]
) -> bool:
    """Log `names` (relative to run_dir/folder) as the artifacts `folder/...`.

    A local artifact store (file:// or a path) gets them by `place` (hard links: no second
    copy of the bytes on disk); any other store, in one `log_artifacts` call, from hard links
    gathered in a private folder first, so that what MLflow walks holds those files and
    nothing else."""
    files = _regular_files(run_dir / folder, names)
    if not files:
        return False
    local = local_path(client.get_run(mlflow_run_id).artifact_uri)
    if local is not None:
        place(files, local / folder)
        return True
    with tempfile.TemporaryDirectory(prefix=f".mlflow-{folder}-", dir=run_dir) as staging:
        for name, source in files.items():
            target = Path(staging) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        client.log_artifacts(mlflow_run_id, staging, folder)
    return True


def _regular_files(folder: Path, names: list[str]) -> dict[str, Path]:
    """name -> path of each of `names` under `folder` that is a regular file there (never a
    link, never a name that leaves the folder)."""
    found = {}
    for name in names:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            continue
        source = folder / name
        try:
            if not stat.S_ISREG(os.lstat(source).st_mode):
                continue
        except OSError:
            continue
        found[name] = source
    return found


def local_path(artifact_uri: str) -> Path | None:
    """The folder of a local artifact location (`file:///...` or a plain path); None for
    any other store (a server's `mlflow-artifacts:`, s3://, ...), which gets uploads."""
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" and artifact_uri.startswith("/"):
        return Path(artifact_uri)
    return None


def place(files: dict[str, Path], dest: Path) -> None:
    """Put `files` (name -> path) under `dest` in a local artifact store, without a second
    copy of their bytes: a read-only file (a sealed output or a model version's file: a
    blob of the workspace's store) is hard-linked, so nothing can be written through the
    new name that would change the run's file; a file that is not read-only (a log), or one
    on another file system, is copied. A name already there as the same file is left; any
    other is replaced whole (a retried close)."""
    for name, source in files.items():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            if os.path.samefile(source, target):
                continue
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        if stat.S_IMODE(os.lstat(source).st_mode) & WRITABLE:
            shutil.copyfile(source, partial)
        else:
            try:
                os.link(source, partial)
            except OSError:  # another file system, too many links: the bytes, once more
                shutil.copyfile(source, partial)
        os.replace(partial, target)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
