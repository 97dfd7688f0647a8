"""Handlers of `expkit sweep FILE`, `expkit sweeps resume` and `expkit sweeps cancel`.

CONTRACT SKELETON: to be written (the driver's side of the CLI).
"""

from __future__ import annotations

import argparse


def cmd_sweep(args: argparse.Namespace) -> int:
    """Start (or with --dry-run, preview) the sweep `args.file`; drive it here (live table)
    or with --detach in the background."""
    raise NotImplementedError


def cmd_sweeps_resume(args: argparse.Namespace) -> int:
    """Take over sweep `args.sweep_id`, whose driver is gone, and drive it to its end."""
    raise NotImplementedError


def cmd_sweeps_cancel(args: argparse.Namespace) -> int:
    """Ask sweep `args.sweep_id`'s driver to stop it (and its running trials)."""
    raise NotImplementedError
