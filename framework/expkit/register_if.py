"""`model.register_if`: the condition a run's final metrics must meet for its register stage
to make a version, so that a run that trained badly does not become the newest version.

Forms (the job spec; a list of them must all hold):
- `"best_val_acc > 0.9"`: a final metric (its last logged value), one of > >= < <= == !=, a
  number;
- `{better: best_val_acc, than: champion, goal: maximize}`: the run's final `best_val_acc`
  beats that of the version alias `than` points at (default: the model's latest version),
  higher is better with goal maximize (the default), lower with minimize; met when there is
  nothing to compare with (no such version, or it has no value of that metric).

Stdlib only: the job spec parses conditions with `parse` while it is checked.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from expkit.modelrefs import alias_problem

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_THRESHOLD = re.compile(r"\s*([^\s<>=!]+)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*")
_EXAMPLE = "e.g. `best_val_acc > 0.9` or {better: best_val_acc, than: champion}"


class BadCondition(ValueError):
    """A `register_if` entry that is not a condition; `field` is where, inside the entry
    (`goal`), or empty."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


@dataclass(frozen=True)
class Threshold:
    """`metric OP value`: the run's final `metric` compared with a number."""

    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


@dataclass(frozen=True)
class BetterThan:
    """The run's final `metric` beats the one of the version alias `than` points at (None:
    the model's latest version), by `goal`."""

    metric: str
    than: str | None = None
    goal: str = "maximize"

    def __str__(self) -> str:
        than = f"@{self.than}" if self.than else "the latest version"
        return f"{self.metric} better than {than} ({self.goal})"


Condition = Threshold | BetterThan


@dataclass(frozen=True)
class Verdict:
    """One condition checked: whether it holds, and why in a few words
    (`best_val_acc 0.84 is not > 0.9`)."""

    ok: bool
    text: str


def parse(raw: Any) -> list[Condition]:
    """The conditions of `register_if` as the job spec has it (a string, a mapping, a list of
    those, or None: none). Raises BadCondition naming what is wrong."""
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    found: list[Condition] = []
    for i, item in enumerate(items):
        try:
            found.append(_one(item))
        except BadCondition as bad:
            if isinstance(raw, list):
                bad.field = f"{i}.{bad.field}" if bad.field else str(i)
            raise
    return found


def _one(item: Any) -> Condition:
    if isinstance(item, str):
        match = _THRESHOLD.fullmatch(item)
        number = _number(match.group(3)) if match else None
        if match is None or number is None:
            raise BadCondition(
                "",
                f"{item!r} is not a condition; write METRIC OP NUMBER with OP one of "
                "> >= < <= == !=, " + _EXAMPLE,
            )
        return Threshold(match.group(1), match.group(2), number)
    if not isinstance(item, dict):
        raise BadCondition("", f"must be a condition (text or a mapping), {_EXAMPLE}")
    unknown = sorted(set(item) - {"better", "than", "goal"})
    if unknown:
        raise BadCondition(str(unknown[0]), "unknown field; allowed: better, than, goal")
    metric, than, goal = item.get("better"), item.get("than"), item.get("goal", "maximize")
    if not isinstance(metric, str) or not metric.strip():
        raise BadCondition("better", f"name the metric to compare, {_EXAMPLE}")
    if than is not None:
        problem = alias_problem(than)
        if problem:
            raise BadCondition("than", problem)
    if goal not in ("maximize", "minimize"):
        raise BadCondition("goal", f"must be 'maximize' or 'minimize', not {goal!r}")
    return BetterThan(metric, than, goal)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def check(
    conditions: list[Condition],
    metrics: dict[str, Any],
    compared: Callable[[BetterThan], tuple[str, float] | str],
) -> list[Verdict]:
    """Each condition checked against the run's final `metrics` (name -> last value).
    `compared(condition)` says what a BetterThan compares with: (what, value), e.g.
    ("pt-dnn@champion, version 3", 0.91), or a text saying why there is nothing to compare
    with (the condition then holds). A final value that is NaN (a diverged run) meets no
    condition."""
    verdicts = []
    for condition in conditions:
        value = metrics.get(condition.metric)
        if condition.metric not in metrics:
            verdicts.append(Verdict(False, f"the run logged no metric {condition.metric!r}"))
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            verdicts.append(Verdict(False, f"{condition.metric} is {value!r}, not a number"))
            continue
        if math.isnan(value):  # NaN != 0.9 is true: a diverged run would pass `!=`
            verdicts.append(Verdict(False, f"{condition.metric} is NaN"))
            continue
        if isinstance(condition, Threshold):
            holds = OPERATORS[condition.op](value, condition.value)
            shown = f"{condition.metric} {value:g}"
            verb = "" if holds else "is not "
            verdicts.append(Verdict(holds, f"{shown} {verb}{condition.op} {condition.value:g}"))
            continue
        other = compared(condition)
        if isinstance(other, str):
            verdicts.append(Verdict(True, f"{condition.metric} {value:g}: {other}"))
            continue
        what, best = other
        holds = value > best if condition.goal == "maximize" else value < best
        verb = "is better than" if holds else "is not better than"
        verdicts.append(
            Verdict(
                holds,
                f"{condition.metric} {value:g} {verb} {best:g} ({what}; goal {condition.goal})",
            )
        )
    return verdicts
