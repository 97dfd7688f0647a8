"""Checking a plugin's options against what it declares (`Capability.takes`).

The core checks every option a job gives, for every kind of capability (compute target,
distributed backend, environment builder, metric sinks, model registries, exporters), in one
pass before a run is created (`lifecycle.choose`, for `expkit run` and `--dry-run` alike):
every wrong one is a line of one UserError naming its field
(`metrics.0.options.trackin_uri: unknown option of metric sink 'mlflow' (did you mean
'tracking_uri'?); ...`), each of which the command line prefixes with the job file. A
plugin then gets its options checked and with the declared defaults filled in,
`{**defaults, **given}`: an option whose default is None is left out when not given, and the
plugin decides (the local target: this machine's CPU count).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from expkit.errors import UserError, printable

if TYPE_CHECKING:
    from expkit.capabilities import Capability, Option


def check(
    capability: Capability, values: Mapping[str, Any], field: str, source: str = ""
) -> dict[str, Any]:
    """`values` (the options given at `field`, e.g. `compute.options` or `--option`) checked
    against `capability.takes`, with its defaults filled in. Raises UserError with one line
    per bad option, `[source: ]field.name: reason`."""
    found = problems(capability, values, field)
    if found:
        prefix = f"{source}: " if source else ""
        raise UserError("\n".join(f"{prefix}{where}: {reason}" for where, reason in found))
    return with_defaults(capability.takes, values)


def problems(
    capability: Capability, values: Mapping[str, Any], field: str
) -> list[tuple[str, str]]:
    """Every problem of `values` as (field path, reason): options `takes` does not name
    (with the closest declared name), then values of the wrong kind or out of range."""
    takes = capability.takes
    found = []
    for name in values:
        if name in takes:
            continue
        shown = printable(str(name), 60)
        import difflib

        hint = difflib.get_close_matches(shown, list(takes), n=1)
        reason = f"unknown option of {capability.kind} {capability.name!r}"
        reason += f" (did you mean {hint[0]!r}?)" if hint else ""
        reason += f"; it takes {', '.join(takes)}" if takes else "; it takes no options"
        found.append((f"{field}.{shown}", reason))
    for name, value in values.items():
        option = takes.get(name)
        problem = option.problem(value) if option is not None else None
        if problem is not None:
            found.append((f"{field}.{printable(str(name), 60)}", problem))
    return found


def with_defaults(takes: Mapping[str, Option], values: Mapping[str, Any]) -> dict[str, Any]:
    """`{**defaults, **values}`: the declared defaults (those that are not None, each a copy)
    under the options given."""
    defaults = {n: copy.deepcopy(o.default) for n, o in takes.items() if o.default is not None}
    return {**defaults, **values}
