"""`expkit models ACTION`: the registered models with each version's key metrics and aliases,
a version's files, lineage and registrations, aliases, and copying a version's files out.

A version is named by a reference: `NAME` (the latest version), `NAME:VERSION` or `NAME@ALIAS`
(expkit.modelrefs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from expkit.cli.common import described, open_workspace, print_table, when

REF_HELP = "NAME (the latest version), NAME:VERSION or NAME@ALIAS"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `models` and its actions (list, show, alias, download)."""
    models = commands.add_parser(
        "models",
        help="registered models",
        **described(
            "The workspace's registered models: each version's key metrics and aliases, a "
            "version's files and lineage, aliases, and copying a version out. A version is "
            f"named by {REF_HELP}.",
            "expkit models list pt-dnn",
            "expkit models show pt-dnn@champion",
            "expkit models alias pt-dnn:3 champion",
            "expkit models download pt-dnn:3 ./model",
        ),
    ).add_subparsers(dest="models_command", metavar="ACTION", required=True)
    mlist = models.add_parser(
        "list",
        help="every model's versions, with key metrics and aliases",
        **described(
            "Each version of each model (or of NAME): the run that made it, when, its key "
            "metrics (the job's `model.metrics`; default: every final numeric metric of its "
            "versions) and its aliases, so that a worse version shows at a glance.",
            "expkit models list",
            "expkit models list pt-dnn",
        ),
    )
    mlist.add_argument("name", metavar="NAME", nargs="?", help="one model's versions only")
    mlist.set_defaults(handler=cmd_models_list)
    mshow = models.add_parser(
        "show",
        help="a model version's files, lineage, aliases and registrations",
        **described(
            "A model version: when it was registered and by which run, its aliases, files, "
            "lineage (run, hashes, final metrics), exports, tags, and where else it is "
            "registered (the job's model.registries, e.g. MLflow).",
            "expkit models show pt-dnn",
            "expkit models show pt-dnn:2",
            "expkit models show pt-dnn@champion",
        ),
    )
    mshow.add_argument("ref", metavar="REF", help=REF_HELP)
    mshow.set_defaults(handler=cmd_models_show)
    malias = models.add_parser(
        "alias",
        help="point an alias (e.g. champion) at a model version, or remove it",
        **described(
            "Point ALIAS of the model at the version REF names (an alias names one version; "
            "setting it again moves it), in this workspace and in each registry that "
            "registered that version (MLflow: registered model aliases). With --delete, REF "
            "is the model's NAME and ALIAS is removed. Aliases follow MLflow's rule: letters, "
            "digits, '_' and '-', not `latest` nor v<digits>. A registry that refuses is a "
            "warning: the workspace's alias is set anyway.",
            "expkit models alias pt-dnn:3 champion",
            "expkit models alias pt-dnn@champion previous",
            "expkit models alias pt-dnn champion --delete",
        ),
    )
    malias.add_argument("ref", metavar="REF", help=REF_HELP + "; with --delete: NAME")
    malias.add_argument("alias", metavar="ALIAS", help="the alias, e.g. champion")
    malias.add_argument("--delete", action="store_true", help="remove ALIAS of model NAME")
    malias.set_defaults(handler=cmd_models_alias)
    mdown = models.add_parser(
        "download",
        help="copy a model version's files",
        **described(
            "Copy the files of the version REF names into the folder DEST, each checked "
            "against its recorded sha256.",
            "expkit models download pt-dnn@champion ./model",
        ),
    )
    mdown.add_argument("ref", metavar="REF", help=REF_HELP)
    mdown.add_argument("dest", metavar="DEST", help="folder to write into (created if needed)")
    mdown.add_argument("--force", action="store_true", help="replace files already there")
    mdown.set_defaults(handler=cmd_models_download)


def cmd_models_list(args: argparse.Namespace) -> int:
    """Every registered version (of NAME, or of every model), one table per model: the run
    it came from, when, its key metrics and its aliases."""
    from expkit.registry import ModelStore

    workspace = open_workspace(args)
    history = workspace.history
    if args.name:
        ModelStore(workspace).get(args.name)  # an unknown model is an error, not an empty list
    rows = history.models.versions(args.name)
    if not rows:
        print("no models yet; a job with `model: {name: ...}` registers one")
        return 0
    by_model: dict[str, list[Any]] = {}
    for row in rows:
        by_model.setdefault(row["name"], []).append(row)
    for i, (name, versions) in enumerate(by_model.items()):
        if i:
            print()
        _print_versions(workspace, name, versions)
    return 0


def _print_versions(workspace: Any, name: str, versions: list[Any]) -> None:
    """The table of model `name`'s versions (rows of the history's `models`)."""
    import json

    from expkit.cli.common import metric_cell

    aliases: dict[int, list[str]] = {}
    for alias, version in workspace.history.aliases.of_model(name).items():
        aliases.setdefault(version, []).append(f"@{alias}")
    metrics = [json.loads(row["lineage"]).get("metrics", {}) for row in versions]
    keys = _key_metrics(workspace, versions[-1], metrics)
    table = [
        [
            name,
            str(row["version"]),
            row["run_id"] or "-",
            when(row["created"]),
            *(metric_cell(values[k]) if k in values else "-" for k in keys),
            " ".join(aliases.get(row["version"], [])),
        ]
        for row, values in zip(versions, metrics, strict=True)
    ]
    print_table(["MODEL", "VERSION", "RUN", "REGISTERED", *keys, "ALIASES"], table)


def _key_metrics(workspace: Any, latest: Any, metrics: list[dict[str, Any]]) -> list[str]:
    """The metrics shown for a model's versions: `model.metrics` of the job that made its
    latest version; without one, every numeric metric its versions hold, in the order met."""
    record = workspace.history.runs.get(latest["run_id"]) if latest["run_id"] else None
    named = ((record.job if record else {}).get("model") or {}).get("metrics")
    if named:
        return list(named)
    keys: dict[str, None] = {}
    for values in metrics:
        keys.update({k: None for k, v in values.items() if isinstance(v, int | float)})
    return list(keys)


def cmd_models_show(args: argparse.Namespace) -> int:
    """A model version's registration time, aliases, files, lineage, exports, tags and
    registrations elsewhere; UserError for an unknown one."""
    from expkit.console import format_value, short_hash
    from expkit.exports import name_files
    from expkit.registry import ModelStore

    workspace = open_workspace(args)
    history = workspace.history
    model = ModelStore(workspace).resolve(args.ref)
    row = history.models.find(model.name, model.version)
    aliases = [
        f"@{a}" for a, v in history.aliases.of_model(model.name).items() if v == model.version
    ]
    run = f" by run {row['run_id']}" if row is not None and row["run_id"] else ""
    print(f"{'model':<12}{model.name}")
    print(f"{'version':<12}{model.version}")
    print(f"{'registered':<12}{when(row['created'] if row is not None else None)}{run}")
    print(f"{'aliases':<12}{' '.join(aliases) or '-'}")
    print(f"{'path':<12}{model.path}")
    from expkit.console import count_files, human_size

    sized = history.models.files(model.name, model.version)  # path -> (bytes, sha256)
    print(f"files ({count_files(len(sized), sum(size for size, _ in sized.values()))})")
    for rel, digest in model.files.items():  # as `runs show` lists outputs
        size = human_size(sized[rel][0]) if rel in sized else "-"
        print(f"  {rel:<40} {size:>10}  {short_hash(f'sha256:{digest}')}")
    print("lineage")
    for key, value in model.lineage.items():
        if key == "exports":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {format_value(v)}" for k, v in value.items()) or "-"
        elif key in ("snapshot_hash", "environment_hash") and isinstance(value, str):
            value = short_hash(value)  # as every command shows a hash
        print(f"  {key:<17} {value}")
    found = history.exports.of(model=model.name, version=model.version)
    exported = model.lineage.get("exports", {})
    if exported or found:
        print("exports")
    for name, entry in exported.items():
        figures = ", ".join(
            f"{k} {entry['checks'][k]:.2g}"
            for k in ("max_abs_error", "max_rel_error")
            if isinstance(entry.get("checks", {}).get(k), int | float)
        )
        files = name_files(entry.get("files", []))  # each file is listed above
        print(f"  {name:<17} {files}  ({figures or 'checked'})")
    for export in found:
        if not export.ok:
            print(f"  {export.format:<17} failed, not added: {export.message}")
    if model.tags:
        print("tags")
        for key, value in model.tags.items():
            print(f"  {key:<17} {value}")
    registrations = history.registrations.of(model.name, model.version)
    if registrations:
        print("registered in")
        for record in registrations:
            print(f"  {record.registry:<17} {record.reference}  ({when(record.created)})")
    return 0


def cmd_models_alias(args: argparse.Namespace) -> int:
    """Point ALIAS at the version REF names (or remove it, --delete), in the workspace and
    the registries that have the version; one line each, a registry's refusal a warning."""
    from expkit.errors import UserError
    from expkit.modelrefs import parse_model_ref
    from expkit.registry import ModelStore, delete_alias, set_alias

    workspace = open_workspace(args)
    if args.delete:
        ref = parse_model_ref(args.ref)
        if ref.version is not None or ref.alias is not None:
            raise UserError(
                f"{args.ref!r}: with --delete give the model's name only, e.g. "
                f"`expkit models alias {ref.name} {args.alias} --delete`"
            )
        said, warnings = delete_alias(workspace, ref.name, args.alias)
    else:
        model = ModelStore(workspace).resolve(args.ref)
        said, warnings = set_alias(workspace, model, args.alias)
    for line in said:
        print(line)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    return 0


def cmd_models_download(args: argparse.Namespace) -> int:
    """Copy a model version's files into DEST (verified against their sha256); print
    each file written."""
    from expkit.api import Model

    workspace = open_workspace(args)
    for path in Model(workspace, args.ref).download(Path(args.dest), args.force):
        print(path)
    return 0
