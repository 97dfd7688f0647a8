"""The table of a sweep's trials: `expkit sweeps show` and the sweep driver's live table.

Read from the run history only (no Optuna): the trials are the runs that name the sweep
(`runs.sweep`), their sampled values are their parameters, and their primary metric is what
they logged. `trial_rows` asks one query per kind (runs, parameters, the primary metric's
values), whatever the number of trials, since the live table is drawn again every half second.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from expkit.history.metric_groups import finite

if TYPE_CHECKING:
    from expkit.history import RunRecord, SweepRecord
    from expkit.workspace import Workspace

# A trial canceled with a reason that starts so was stopped by the sweep's early termination
# policy (see expkit.sweeps.policies): Optuna's PRUNED, Azure ML's "early terminated".
EARLY_TERMINATION = "early termination"
EARLY_TERMINATED = "early-terminated"
# The order of trial states in a count ("12 (8 completed, 3 early-terminated, 1 failed)").
STATE_ORDER = (
    "completed",
    EARLY_TERMINATED,
    "failed",
    "canceled",
    "running",
    "post-processing",
    "registering",
    "preparing",
    "scaling",
    "queued",
)


@dataclass(frozen=True)
class TrialRow:
    """One trial of a sweep as the tables show it.

    `state`: the run's state, `early-terminated` for a run the policy canceled; `params`:
    the sampled values (the run's parameters named in the search space, as text); `latest`:
    the last value it logged of the primary metric; `best`: the best of them by the goal (the
    trial's value, what the driver tells Optuna: Azure ML's HyperDrive ranks child runs by
    their best primary metric); `steps`: how many it logged (the driver's
    report steps); `error`: why it failed or was stopped; `seconds`: from its creation to its
    end (or now)."""

    trial: int | None
    run_id: str
    run_number: int
    state: str
    params: dict[str, str] = field(default_factory=dict)
    latest: float | None = None
    best: float | None = None
    steps: int = 0
    error: str | None = None
    seconds: float | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("completed", EARLY_TERMINATED, "failed", "canceled")

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON-able values (`expkit sweeps show --json`)."""
        return {
            "trial": self.trial,
            "run_id": self.run_id,
            "run_number": self.run_number,
            "state": self.state,
            "params": dict(self.params),
            "value": self.best,
            "latest": self.latest,
            "steps": self.steps,
            "error": self.error,
            "seconds": self.seconds,
        }


def objective_of(spec: dict[str, Any]) -> tuple[str, str]:
    """(primary metric, goal) of a sweep spec as its record keeps it (`SweepSpec.to_dict`)."""
    objective = spec.get("objective") or {}
    return str(objective.get("primary_metric", "")), str(objective.get("goal", "maximize"))


def space_names(spec: dict[str, Any]) -> list[str]:
    """The arguments a sweep spec's search space sets, in its order: each parameter's name,
    or for a paired choice (values that are mappings) the keys of its mappings. Takes the
    search space as a mapping {name: parameter} or as a list of parameters with a `name`."""
    space = spec.get("search_space") or {}
    items: list[tuple[str, Any]]
    if isinstance(space, dict):
        items = list(space.items())
    else:
        items = [(str(p.get("name", "")), p) for p in space if isinstance(p, dict)]
    names: list[str] = []
    for name, parameter in items:
        values = parameter.get("values") if isinstance(parameter, dict) else None
        paired = [v for v in values or () if isinstance(v, dict)]
        for key in [str(k) for v in paired for k in v] if paired else [name]:
            if key not in names:
                names.append(key)
    return names


def trial_state(record: RunRecord) -> str:
    """The trial's state: the run's, `early-terminated` when the policy canceled it."""
    if record.state == "canceled" and (record.cancel_reason or "").startswith(EARLY_TERMINATION):
        return EARLY_TERMINATED
    return record.state


def trial_rows(workspace: Workspace, sweep: SweepRecord) -> list[TrialRow]:
    """The trials of `sweep`, by trial number: four queries in all, whatever the number of
    trials (the trials, their parameters, two for their primary metric's values). A run that
    completed without logging a finite value of the primary metric is a `failed` trial, as
    the driver tells Optuna (error "completed without logging METRIC" unless it has one)."""
    history = workspace.history
    records = history.runs.of_sweep(sweep.id)
    if not records:
        return []
    metric, goal = objective_of(sweep.spec)
    names = space_names(sweep.spec)
    params = history.params.of_runs([r.id for r in records])
    values = _metric_values(workspace, sweep.id, metric)
    now = time.time()
    rows = []
    for record in records:
        logged = values.get(record.id)
        best = None if logged is None else logged.high if goal == "maximize" else logged.low
        state, error = trial_state(record), record.error
        if state == "completed" and best is None:  # as the driver tells Optuna: FAIL
            state, error = "failed", error or f"completed without logging {metric}"
        rows.append(
            TrialRow(
                trial=record.trial,
                run_id=record.id,
                run_number=record.number,
                state=state,
                params=_sampled(names, params.get(record.id, {}), record.job),
                latest=None if logged is None else logged.last,
                best=best,
                steps=_steps(workspace, record, metric, logged),
                error=error,
                seconds=(record.ended or now) - record.created,
            )
        )
    return rows


def _steps(workspace: Workspace, record: Any, metric: str, logged: _Logged | None) -> int:
    """How many steps the trial logged of `metric`: its values, less those a later attempt
    of its run logged again after resuming from an earlier checkpoint (the current curve,
    as the driver reports intervals to the policy); read value by value only for a trial
    whose run made more than one attempt."""
    if logged is None:
        return 0
    if record.attempt <= 1:
        return logged.steps
    rows = workspace.history.metrics.current(record.id, metric)
    return sum(1 for row in rows if _finite(row["value"]))


def _finite(value: Any) -> bool:
    """True for a number stored as a finite double (as `_FINITE` selects in SQL)."""
    return isinstance(value, int | float) and math.isfinite(value) and abs(value) <= _MAX


@dataclass(frozen=True)
class _Logged:
    """What a trial logged of the primary metric: how many numeric values, the smallest,
    the largest, and the last."""

    steps: int
    low: float
    high: float
    last: float


# A finite number: NaN is stored as NULL by SQLite, and +-inf lie outside the doubles' range.
# Non-finite values are left out everywhere (as the driver leaves them out of the trial's
# value), so an inf is never a trial's best and `--json` has numbers or null only.
_FINITE = "value BETWEEN -1.7976931348623157e308 AND 1.7976931348623157e308"
_MAX = 1.7976931348623157e308


def _metric_values(workspace: Workspace, sweep_id: str, metric: str) -> dict[str, _Logged]:
    """What each trial logged of `metric` (finite numbers only), by run id: two queries over
    the metrics' (run_id, name, id) index, whatever the number of values: the aggregates of
    the values stored one a row, with the rows of each group (`expkit.history.metric_groups`:
    their values unpacked and filtered in C), and the last of the single values (a redraw
    reads a row per trial and per group, not every value)."""
    if not metric:
        return {}
    db = workspace.history.db
    trials = "SELECT id FROM runs WHERE sweep = ?"
    found: dict[str, list[Any]] = {}  # run id -> [count, low, high, last id, last value]
    groups = []
    for run_id, count, low, high, last_id, packed in db.execute(
        "SELECT run_id, COUNT(value), MIN(value), MAX(value), MAX(id), NULL FROM metrics"
        f" WHERE name = ?1 AND n = 1 AND {_FINITE} AND run_id IN ({trials.replace('?', '?2')})"
        " GROUP BY run_id UNION ALL SELECT run_id, n, NULL, NULL, id, packed_values"
        f" FROM metrics WHERE name = ?1 AND n > 1 AND run_id IN ({trials.replace('?', '?2')})",
        (metric, sweep_id),
    ).fetchall():
        if packed is None:
            found[run_id] = [count, float(low), float(high), last_id, None]
        else:
            groups.append((run_id, last_id, packed))
    for run_id, value in db.execute(
        "SELECT run_id, value FROM metrics WHERE id IN"
        f" (SELECT MAX(id) FROM metrics WHERE name = ? AND n = 1 AND {_FINITE}"
        f" AND run_id IN ({trials}) GROUP BY run_id)",
        (metric, sweep_id),
    ).fetchall():
        if run_id in found:
            found[run_id][4] = float(value)
    for run_id, last_id, packed in groups:
        values = finite(packed)
        if not values:
            continue
        logged = found.setdefault(run_id, [0, math.inf, -math.inf, 0, None])
        logged[0] += len(values)
        logged[1], logged[2] = min(logged[1], min(values)), max(logged[2], max(values))
        if last_id > logged[3]:  # a group's ids and a single row's never interleave
            logged[3], logged[4] = last_id, values[-1]
    return {
        run_id: _Logged(count, low, high, last)
        for run_id, (count, low, high, _, last) in found.items()
        if last is not None
    }


def _sampled(names: list[str], params: dict[str, str], job: dict[str, Any]) -> dict[str, str]:
    """The trial's values of the search space's `names`: its recorded parameters, else (a
    trial not yet prepared, or a job whose `args` is a list) read from its job's `args`."""
    args = job.get("args") or {}
    found: dict[str, str] = {}
    for name in names:
        if name in params:
            found[name] = params[name]
            continue
        value = _arg(args, name)
        if value is not None:
            found[name] = value
    return found


def _arg(args: dict[str, Any] | list[Any], name: str) -> str | None:
    """The value of argument `name` in a job's `args`: a mapping's key `name` (or `--name`),
    a list's item after `--name` (or `--name=value`)."""
    if isinstance(args, dict):
        for key in (name, f"--{name}", f"-{name}"):
            if key in args:
                return _text(args[key])
        return None
    items = [str(a) for a in args]
    for i, item in enumerate(items):
        if item in (f"--{name}", f"-{name}") and i + 1 < len(items):
            return items[i + 1]
        if item.startswith(f"--{name}="):
            return item.split("=", 1)[1]
    return None


def _text(value: Any) -> str:
    if value is True or value is False or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, list):
        return " ".join(map(_text, value))
    return str(value)


def sort_key(goal: str) -> Any:
    """The key that orders rows by the objective: the best value first (by `goal`), trials
    without a value last, ties by trial number."""

    def key(row: TrialRow) -> tuple[int, float, int]:
        value = row.best
        if value is None or math.isnan(value):
            return (1, 0.0, _number(row))
        return (0, -value if goal == "maximize" else value, _number(row))

    return key


def _number(row: TrialRow) -> int:
    return row.trial if row.trial is not None else row.run_number


def sorted_rows(rows: list[TrialRow], goal: str) -> list[TrialRow]:
    """`rows` sorted by the objective (see `sort_key`)."""
    return sorted(rows, key=sort_key(goal))


def best_row(rows: list[TrialRow], goal: str) -> TrialRow | None:
    """The best completed trial: the best value of the primary metric by `goal` among the
    completed trials that logged one; ties: the lower trial number."""
    done = [r for r in rows if r.state == "completed" and r.best is not None]
    done = [r for r in done if not math.isnan(r.best or 0.0)]
    return sorted_rows(done, goal)[0] if done else None


def count_states(rows: list[TrialRow]) -> str:
    """How many trials, by state: "12 (8 completed, 3 early-terminated, 1 failed)"."""
    if not rows:
        return "0"
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    order = {state: i for i, state in enumerate(STATE_ORDER)}
    parts = [
        f"{n} {state}" for state, n in sorted(counts.items(), key=lambda i: order.get(i[0], 99))
    ]
    return f"{len(rows)} ({', '.join(parts)})"


def render(
    rows: list[TrialRow],
    objective: tuple[str, str],
    names: list[str] | None = None,
    best: TrialRow | None = None,
    width: int | None = None,
) -> list[str]:
    """The trials as aligned text lines, a header first, sorted by the objective (best
    first, trials without a value last). `objective`: (primary metric, goal); `names`: the
    parameter columns (default: every parameter the rows have, in order); `best`: the row
    marked with `*` (default: `best_row`); `width`: cut lines to it (a terminal)."""
    from expkit.console import human_seconds
    from expkit.outputs import escaped

    metric, goal = objective
    if names is None:
        names = []
        for row in rows:
            names += [n for n in row.params if n not in names]
    if best is None:
        best = best_row(rows, goal)
    headers = ["TRIAL", "RUN", "STATE", *names, metric or "VALUE", "BEST", "STEPS", "DURATION"]
    ordered = sorted_rows(rows, goal)
    table = []
    for row in ordered:
        mark = "*" if best is not None and row.run_id == best.run_id else " "
        table.append(
            [
                f"{mark}{'-' if row.trial is None else row.trial}",
                row.run_id,
                row.state,
                *(_param_cell(row.params.get(n, "")) for n in names),
                _value(row.latest),
                _value(row.best),
                str(row.steps),
                human_seconds(row.seconds),
            ]
        )
    headers[0] = " " + headers[0]
    if any(row.error for row in rows):
        headers.append("ERROR")
        for cells, row in zip(table, ordered, strict=True):
            cells.append(escaped(row.error or ""))
    widths = [max(len(c) for c in column) for column in zip(headers, *table, strict=True)]
    lines = []
    for cells in [headers, *table]:
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        lines.append(line if width is None or len(line) <= width else line[: width - 1] + "…")
    return lines


def _param_cell(text: str) -> str:
    """A sampled value in a cell: a float to 4 significant digits (0.04950375722519532 is
    0.0495; `--json` keeps it whole), anything else as recorded, escaped to one line."""
    from expkit.outputs import escaped

    if "." in text or "e" in text.lower():
        try:
            return f"{float(text):.4g}"
        except ValueError:
            pass
    return escaped(text)


def _value(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"
