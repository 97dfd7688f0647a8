"""`expkit models ACTION`: the registered models, a version's files and lineage, and copying
them out."""

from __future__ import annotations

import argparse
from pathlib import Path

from expkit.cli.common import open_workspace, print_table, when


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `models` and its actions (list, show, download)."""
    models = commands.add_parser("models", help="registered models").add_subparsers(
        dest="models_command", metavar="ACTION", required=True
    )
    models.add_parser("list", help="every model and its versions").set_defaults(
        handler=cmd_models_list
    )
    mshow = models.add_parser("show", help="a model version's files and lineage")
    mshow.add_argument("ref", metavar="NAME[:VERSION]", help="latest version unless given")
    mshow.set_defaults(handler=cmd_models_show)
    mdown = models.add_parser("download", help="copy a model version's files")
    mdown.add_argument("ref", metavar="NAME[:VERSION]")
    mdown.add_argument("dest", metavar="DEST", help="folder to write into (created if needed)")
    mdown.add_argument("--force", action="store_true", help="replace files already there")
    mdown.set_defaults(handler=cmd_models_download)


def cmd_models_list(args: argparse.Namespace) -> int:
    """Every registered model version, with the run it came from."""
    workspace = open_workspace(args)
    rows = workspace.history.models.versions()
    if not rows:
        print("no models yet; a job with `model: {name: ...}` registers one")
        return 0
    table = [[r["name"], str(r["version"]), r["run_id"] or "-", when(r["created"])] for r in rows]
    print_table(["MODEL", "VERSION", "RUN", "REGISTERED"], table)
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    """A model version's files, lineage, exports and tags; UserError for an unknown one."""
    from expkit.console import format_value, short_hash
    from expkit.registry import ModelStore, parse_model_ref

    workspace = open_workspace(args)
    model = ModelStore(workspace).get(*parse_model_ref(args.ref))
    print(f"model    {model.name}")
    print(f"version  {model.version}")
    print(f"path     {model.path}")
    print("files")
    for rel, digest in model.files.items():
        print(f"  {rel:<40} {short_hash(f'sha256:{digest}')}")
    print("lineage")
    for key, value in model.lineage.items():
        if key == "exports":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {format_value(v)}" for k, v in value.items()) or "-"
        elif key in ("snapshot_hash", "environment_hash") and isinstance(value, str):
            value = short_hash(value)  # as every command shows a hash
        print(f"  {key:<17} {value}")
    found = workspace.history.exports.of(model=model.name, version=model.version)
    exported = model.lineage.get("exports", {})
    if exported or found:
        print("exports")
    for name, entry in exported.items():
        figures = ", ".join(
            f"{k} {entry['checks'][k]:.2g}"
            for k in ("max_abs_error", "max_rel_error")
            if isinstance(entry.get("checks", {}).get(k), int | float)
        )
        print(f"  {name:<17} {', '.join(entry.get('files', []))}  ({figures or 'checked'})")
    for export in found:
        if not export.ok:
            print(f"  {export.format:<17} failed, not added: {export.message}")
    if model.tags:
        print("tags")
        for key, value in model.tags.items():
            print(f"  {key:<17} {value}")
    return 0


def cmd_models_download(args: argparse.Namespace) -> int:
    """Copy a model version's files into DEST (verified against their sha256); print
    each file written."""
    from expkit.api import Model
    from expkit.registry import parse_model_ref

    workspace = open_workspace(args)
    name, version = parse_model_ref(args.ref)
    for path in Model(workspace, name, version).download(Path(args.dest), args.force):
        print(path)
    return 0
