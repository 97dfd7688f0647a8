"""Handlers of `expkit sweeps list` and `expkit sweeps show` (reading the records).

CONTRACT SKELETON: to be written.
"""

from __future__ import annotations

import argparse


def cmd_sweeps_list(args: argparse.Namespace) -> int:
    """The latest sweeps: id, state, trials (by state), best trial and its primary metric."""
    raise NotImplementedError


def cmd_sweeps_show(args: argparse.Namespace) -> int:
    """One sweep: its spec in brief, state, best trial, the trials sorted by the objective;
    --json; --plot FILE.png."""
    raise NotImplementedError
