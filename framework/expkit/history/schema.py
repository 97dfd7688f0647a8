"""The history's schema, as a list of numbered steps that only ever grows.

A database records how many steps it has taken in its header (`PRAGMA user_version`): a new
workspace takes them all, an older one the steps it lacks, when it is next opened, in the same
write transaction (`expkit.history.store.History`). A database whose version is past the last
step was made by a newer expkit and is refused before anything is written to it.

Version 0 is a workspace made before the history had a version; step 1 is the schema it has,
written so that it creates nothing there (CREATE ... IF NOT EXISTS).

Adding a step (a column for Slurm job ids, a table for sweeps):

1. Append it to MIGRATIONS; never edit, reorder or remove a step that has been released: a
   workspace that took it will not take it again. Its number is its place in the list.
2. A step is SQL statements separated by ";" (no triggers: the text is split on ";"), or a
   function `step(db)` for what SQL alone cannot do (a data rewrite). It runs inside the
   upgrade's transaction: no COMMIT, no executescript (that commits), no VACUUM.
3. A new column needs a default (`ALTER TABLE runs ADD COLUMN slurm_job TEXT` is NULL for the
   old rows; `... retries INTEGER NOT NULL DEFAULT 0`), so that every INSERT, which names its
   columns, still works. `RunRecord` reads the columns it declares: add the field with it.
4. Make a fixture of the previous version with tests/fixtures/make_workspace.py (run from the
   commit before yours, see its docstring) and extend tests/test_history_upgrade.py to open it.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable

Step = str | Callable[[sqlite3.Connection], None]

# Step 1: the history as expkit wrote it before it had a version (user_version 0).
V1 = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    number INTEGER NOT NULL UNIQUE,
    experiment TEXT NOT NULL,
    state TEXT NOT NULL,
    status TEXT,
    job TEXT NOT NULL,
    created REAL NOT NULL,
    ended REAL,
    exit_code INTEGER,
    error TEXT,
    snapshot_hash TEXT,
    environment_hash TEXT,
    driver_pid INTEGER,
    driver_start TEXT,
    driver_host TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_experiment ON runs (experiment, number);
CREATE TABLE IF NOT EXISTS stages (
    run_id TEXT NOT NULL, stage TEXT NOT NULL, state TEXT NOT NULL,
    started REAL, ended REAL, message TEXT,
    PRIMARY KEY (run_id, stage)
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL, ts REAL NOT NULL, stage TEXT, kind TEXT NOT NULL, message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, ts);
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL, name TEXT NOT NULL, step INTEGER,
    value REAL, payload TEXT, ts REAL NOT NULL, rank INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS metrics_by_run ON metrics (run_id, name, id);
CREATE TABLE IF NOT EXISTS tags (
    run_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (run_id, key)
);
CREATE TABLE IF NOT EXISTS outputs (
    run_id TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (run_id, path)
);
CREATE TABLE IF NOT EXISTS slots (
    kind TEXT NOT NULL, slot INTEGER NOT NULL, run_id TEXT NOT NULL, PRIMARY KEY (kind, slot)
);
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL, version INTEGER NOT NULL, run_id TEXT, created REAL NOT NULL,
    lineage TEXT NOT NULL, tags TEXT NOT NULL, PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS model_files (
    name TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL,
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (name, version, path)
);
CREATE TABLE IF NOT EXISTS exports (
    id INTEGER PRIMARY KEY, run_id TEXT, model TEXT, version INTEGER, format TEXT NOT NULL,
    ok INTEGER NOT NULL, message TEXT NOT NULL, checks TEXT NOT NULL, files TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS exports_by_run ON exports (run_id);
CREATE TABLE IF NOT EXISTS output_links (
    run_id TEXT NOT NULL, path TEXT NOT NULL, target TEXT NOT NULL, PRIMARY KEY (run_id, path)
);
"""

# Step 2: runs whose job lives outside the driver (a Slurm job) and can be re-attached to.
# `remote_job` is what the compute target recorded ("slurm:1234"); `channel_offsets` is how
# far the metric channel's files were read into `metrics`, written in the same transaction
# as the rows, so that a driver that re-attaches reads on without a value twice or lost.
V2 = """
ALTER TABLE runs ADD COLUMN remote_job TEXT;
CREATE TABLE channel_offsets (
    run_id TEXT NOT NULL, file TEXT NOT NULL, offset INTEGER NOT NULL,
    PRIMARY KEY (run_id, file)
)
"""

# Step 3: parameters, and how far each metric sink got.
# `params`: what the run was given (the job's `args`, data placeholders resolved to paths;
# source "job") and what its script logged as parameters (mlflow.log_param, ...; source
# "script"), one value per key, the latest kept; `id` grows with every write, so that a sink
# sends only what is new. `sink_cursors`: the last metric row id (and param id) each sink of a
# run delivered, written by the sink's worker, so that a run recovered after its driver died
# sends a sink the rest, nothing twice.
V3 = """
CREATE TABLE params (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, source TEXT NOT NULL,
    UNIQUE (run_id, key)
);
CREATE TABLE sink_cursors (
    run_id TEXT NOT NULL, sink TEXT NOT NULL, metric_id INTEGER NOT NULL DEFAULT 0,
    param_id INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (run_id, sink)
)
"""

# Step 4: sweeps. A sweep is a record of its own (its spec, state, best trial, driver); each
# of its trials is an ordinary run that names the sweep and its trial number (Optuna's).
# `cancel_reason`: why a run was asked to stop (an early-termination policy's rule), recorded
# as the canceled run's error instead of "canceled by the user".
V4 = """
CREATE TABLE sweeps (
    id TEXT PRIMARY KEY,
    number INTEGER NOT NULL UNIQUE,
    experiment TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    created REAL NOT NULL,
    ended REAL,
    error TEXT,
    best_run TEXT,
    model TEXT,
    driver_pid INTEGER,
    driver_start TEXT,
    driver_host TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
ALTER TABLE runs ADD COLUMN sweep TEXT;
ALTER TABLE runs ADD COLUMN trial INTEGER;
ALTER TABLE runs ADD COLUMN cancel_reason TEXT;
CREATE INDEX runs_by_sweep ON runs (sweep, trial)
"""

# Step 5: attempts. A run may execute its script more than once (the job's `retry:`, a Slurm
# requeue, `expkit runs resume`): each execution is an attempt, recorded with its start, end,
# outcome (expkit.stages.AttemptOutcome) and reason; `runs.attempt` is the current one.
# `runs.requeue_requested`: `expkit runs cancel --requeue` asked the driver to stop the current
# attempt (the script gets the stop signal first) and start the next. `metrics.attempt`: the
# attempt that logged the value, so that a step logged again by a later attempt supersedes it.
V5 = """
CREATE TABLE attempts (
    run_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    outcome TEXT,
    reason TEXT,
    exit_code INTEGER,
    remote_job TEXT,
    PRIMARY KEY (run_id, attempt)
);
ALTER TABLE runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
ALTER TABLE runs ADD COLUMN requeue_requested INTEGER NOT NULL DEFAULT 0;
ALTER TABLE metrics ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1
"""

# Step 6: model aliases and registrations.
# `model_aliases`: each change of an alias (MLflow's: a name such as `champion` that points at
# one version of a model), appended: `version` NULL removes it. The alias points where its
# latest row whose version is still kept says (see expkit.history.models.Aliases), so that a
# version withdrawn with its failed run gives the alias back to the version it had before.
# `registrations`: where a model registry (`model.registries`) put a version: its reference
# (shown) and locator (how the registry finds that version again: `ModelRegistry.set_alias`).
V6 = """
CREATE TABLE model_aliases (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER, created REAL NOT NULL,
    run_id TEXT
);
CREATE INDEX model_aliases_by_name ON model_aliases (name, alias, id);
CREATE TABLE registrations (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL, version INTEGER NOT NULL, registry TEXT NOT NULL,
    reference TEXT NOT NULL, locator TEXT NOT NULL, created REAL NOT NULL
);
CREATE INDEX registrations_by_version ON registrations (name, version)
"""

# Step 7: metric row groups (expkit.history.metric_groups). A row holds `n` values: 1 is one
# value as before (every older row), more is a group of one series' numbers, packed in
# little-endian BLOBs (`packed_values` float64, `packed_times` float64 seconds,
# `packed_steps` int64 or NULL when none has a step); its `id` is its last value's id, its
# values have ids id-n+1..id, so ids still count values (sink cursors, pages, sweeps).
V7 = """
ALTER TABLE metrics ADD COLUMN n INTEGER NOT NULL DEFAULT 1;
ALTER TABLE metrics ADD COLUMN packed_steps BLOB;
ALTER TABLE metrics ADD COLUMN packed_values BLOB;
ALTER TABLE metrics ADD COLUMN packed_times BLOB
"""

# Append only (see above): a database at version N has taken MIGRATIONS[:N].
MIGRATIONS: list[Step] = [V1, V2, V3, V4, V5, V6, V7]

# The tables and indexes a history without expkit's application_id may hold: one written
# before that mark, which is expkit's (version 0, so step 1's names), an empty database, or
# one whose mark was lost after later steps made theirs (every step's names count).
UNMARKED_NAMES = frozenset(
    name
    for step in MIGRATIONS
    if isinstance(step, str)
    for name in re.findall(r"CREATE (?:TABLE|INDEX) (?:IF NOT EXISTS )?(\w+)", step)
)


def latest() -> int:
    """The version this expkit writes and reads: the number of steps it knows."""
    return len(MIGRATIONS)


def upgrade(db: sqlite3.Connection, version: int) -> None:
    """Take the steps after `version` on `db`, inside the caller's write transaction, and
    record the new version. The caller holds the write lock (BEGIN IMMEDIATE)."""
    for step in MIGRATIONS[version:]:
        if callable(step):
            step(db)
            continue
        for statement in step.split(";"):
            if statement.strip():
                db.execute(statement)
    db.execute(f"PRAGMA user_version={latest()}")
