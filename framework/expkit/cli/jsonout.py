"""JSON as expkit prints it (`runs show --json`): strict JSON that every parser accepts.

Python's json writes NaN and the infinities as the bare words NaN, Infinity and -Infinity,
which strict parsers (JavaScript's JSON.parse, jq, Go, Python with `parse_constant` raising)
refuse. expkit writes them as the strings "NaN", "Infinity" and "-Infinity", as protobuf's
JSON mapping does; every other number stays a number. Anything json cannot write (a
datetime, a path) is written as its text.
"""

from __future__ import annotations

import json
import math
from typing import Any

NAN, INFINITY, MINUS_INFINITY = "NaN", "Infinity", "-Infinity"


def strict(value: Any) -> Any:
    """`value` with every non-finite float replaced by its string ("NaN", "Infinity",
    "-Infinity"), through dicts, lists and tuples."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return NAN if value != value else INFINITY if value > 0 else MINUS_INFINITY
    if isinstance(value, dict):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict(item) for item in value]
    return value


def dumps(value: Any, indent: int | None = 2) -> str:
    """`value` as strict JSON text (see the module); never NaN or Infinity as bare words."""
    return json.dumps(strict(value), indent=indent, default=str, allow_nan=False)
