"""Naming a model version: `NAME` (the latest), `NAME:VERSION`, `NAME@ALIAS`; and the rule an
alias name follows. The one parser of a model reference, used wherever a model is named (`expkit
models show/download/alias`, `expkit export`, the Python API's `Model`, the job's
`model.aliases` and `register_if`). Stdlib only: the job spec checks aliases with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from expkit.errors import UserError

# MLflow's rule for a registered model alias (mlflow/utils/validation.py,
# `_validate_model_alias_name` and `_validate_model_alias_name_reserved`): word characters
# and '-', at most 255, not `latest` (any case), not `v` followed by digits (any case), which
# MLflow reads as a version. expkit keeps to ASCII letters, so every alias it accepts MLflow
# accepts too.
ALIAS = re.compile(r"[A-Za-z0-9_-]{1,255}")
RESERVED_VERSION = re.compile(r"[vV][0-9]+")
ALIAS_RULE = (
    "an alias uses letters, digits, '_' and '-' (at most 255), and is not `latest` nor "
    "v<digits>, which MLflow reserves; e.g. champion"
)


def alias_problem(alias: object) -> str | None:
    """Why `alias` cannot be an alias name (MLflow's rule, see ALIAS), or None when it can."""
    if isinstance(alias, str) and alias.startswith("@") and ALIAS.fullmatch(alias[1:]):
        return f"alias {alias!r}: write it without the '@' ({alias[1:]})"  # as `than:` takes
    if not isinstance(alias, str) or not ALIAS.fullmatch(alias):
        return f"alias {alias!r}: {ALIAS_RULE}"
    if alias.lower() == "latest":
        return (
            f"alias {alias!r} is reserved by MLflow (the latest version); choose another, "
            "e.g. champion"
        )
    if RESERVED_VERSION.fullmatch(alias):
        return f"alias {alias!r} is reserved by MLflow (a version); choose another, e.g. champion"
    return None


def check_alias(alias: str) -> str:
    """`alias`, when it is a valid alias name; UserError saying the rule otherwise."""
    problem = alias_problem(alias)
    if problem:
        raise UserError(problem)
    return alias


@dataclass(frozen=True)
class ModelRef:
    """A reference to a model version: the latest version of `name`, `version`, or the
    version `alias` points at (at most one of those two)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return f"{self.name}:{self.version}" if self.version is not None else self.name


def parse_model_ref(ref: str) -> ModelRef:
    """`NAME`, `NAME:VERSION` or `NAME@ALIAS` -> ModelRef. Raises UserError for a version that
    is not a number, an alias that breaks MLflow's rule, or a missing name."""
    if "@" in ref:
        name, _, alias = ref.partition("@")
        if ":" in alias or ":" in name:
            raise UserError(
                f"{ref!r}: give a version or an alias, not both (e.g. {name.split(':')[0]}:2 "
                f"or {name.split(':')[0]}@champion)"
            )
        problem = alias_problem(alias)
        if problem:
            raise UserError(f"{ref!r}: {problem}")
        ref_ = ModelRef(name, alias=alias)
    else:
        name, _, version = ref.partition(":")
        # ASCII digits only: str.isdigit also takes '١' or '²', which are no version number.
        if not (version.isascii() and version.isdigit()) and (version or ref.endswith(":")):
            raise UserError(
                f"{ref!r}: a version is a number, e.g. {name}:2 (an alias goes after @, "
                f"e.g. {name}@champion)"
            )
        ref_ = ModelRef(name, int(version) if version else None)
    if not name:
        raise UserError(f"{ref!r}: name the model first, e.g. pt-dnn{ref}")
    return ref_
