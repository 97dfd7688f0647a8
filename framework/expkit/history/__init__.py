"""The run history: one SQLite database (WAL) that is the source of truth for every run.

Modules: `store` (History: opening, upgrading, the connection and the write transaction),
`connection` (the SQLite layer: checks, damaged files, locks, a full disk), `schema` (the
versioned schema and its steps), and one per aggregate: `runs` (runs, stages, events, tags,
outputs), `attempts`, `metrics`, `params`, `models` (model versions, their files, aliases,
registrations, exports), `sweeps`.
"""

from expkit.history.attempts import AttemptRecord, Attempts
from expkit.history.connection import DamagedHistory, connect, no_room, patiently
from expkit.history.metrics import Metrics, metric_value
from expkit.history.models import (
    Aliases,
    ExportRecord,
    Exports,
    Models,
    RegistrationRecord,
    Registrations,
)
from expkit.history.params import Params, SinkCursors
from expkit.history.runs import (
    FINAL_STATES,
    STAGES,
    Events,
    Outputs,
    RunRecord,
    Runs,
    StageRecord,
    Stages,
    Tags,
    driver_alive,
)
from expkit.history.store import History
from expkit.history.sweeps import FINAL_SWEEP_STATES, SweepRecord, Sweeps

__all__ = [
    "FINAL_STATES",
    "FINAL_SWEEP_STATES",
    "STAGES",
    "Aliases",
    "AttemptRecord",
    "Attempts",
    "DamagedHistory",
    "Events",
    "ExportRecord",
    "Exports",
    "History",
    "Metrics",
    "Models",
    "Outputs",
    "Params",
    "RegistrationRecord",
    "Registrations",
    "RunRecord",
    "Runs",
    "SinkCursors",
    "StageRecord",
    "Stages",
    "SweepRecord",
    "Sweeps",
    "Tags",
    "connect",
    "driver_alive",
    "metric_value",
    "no_room",
    "patiently",
]
