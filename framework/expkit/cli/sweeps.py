"""`expkit sweep FILE` and `expkit sweeps ACTION`: start, watch, list, show, resume, cancel.

The parsers live here; the handlers in `sweep_run` (starting, resuming and cancelling: the
driver's side) and `sweep_show` (reading the records: list, show, plots).
"""

from __future__ import annotations

import argparse

from expkit.cli import sweep_run, sweep_show
from expkit.cli.common import described, examples_epilog, how_many

SWEEP_HELP = "sweep id, sweep number, or `latest`"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `sweep` and `sweeps` (list, show, resume, cancel)."""
    sweep = commands.add_parser(
        "sweep",
        help="run a hyperparameter sweep (Azure ML's HyperDrive / sweep job, on Optuna)",
        description="Start the sweep FILE describes: trials of its job, each an expkit run "
        "whose args get the sampled values, at most limits.max_concurrent_trials at once, "
        "those the early_termination policy names canceled early; a live table of trials, "
        "then the best trial (and its registered model, with register_best: true). Ctrl-C "
        "cancels the sweep and its running trials; `expkit sweeps resume` goes on with one "
        "whose driver was killed. FILE is a YAML mapping (Azure ML v2's sweep job names): "
        "job (the trial's job spec: a path, or inline), search_space (argument: expression, "
        "e.g. lr: {type: uniform, min_value: 0.01, max_value: 0.1} or 'uniform(0.01, 0.1)'), "
        "sampling_algorithm (random, grid, bayesian), objective (primary_metric, goal: "
        "maximize|minimize), early_termination (bandit, median_stopping, "
        "truncation_selection, successive_halving, hyperband), limits (max_total_trials, "
        "max_concurrent_trials, timeout, trial_timeout), register_best (true: register the "
        "best trial's model). See README: Sweeps.",
        epilog=examples_epilog(
            "expkit sweep training/sweep.yaml",
            "expkit sweep training/sweep.yaml --set limits.max_total_trials=4 --dry-run",
        ),
    )
    sweep.add_argument("file", metavar="FILE", help="the sweep spec (YAML)")
    sweep.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the sweep spec, e.g. limits.max_total_trials=4 (repeatable)",
    )
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="check the spec and print the first trials it would start; start nothing",
    )
    sweep.add_argument(
        "--detach",
        action="store_true",
        help="drive the sweep in the background and return at once (`expkit sweeps show`)",
    )
    sweep.set_defaults(handler=sweep_run.cmd_sweep)

    sweeps = commands.add_parser(
        "sweeps",
        help="list and inspect sweeps",
        **described(
            "List the workspace's sweeps, and show, resume or cancel one. ACTION is one of "
            "the commands below; each takes --help. A sweep is named by its id "
            "(pytorch-digits_sweep_1), its number (1) or `latest`.",
            "expkit sweeps list",
            "expkit sweeps show latest",
        ),
    ).add_subparsers(dest="sweeps_command", metavar="ACTION", required=True)
    listing = sweeps.add_parser(
        "list",
        help="the latest sweeps, newest first",
        **described(
            "The latest sweeps, newest first, with their state and trials.",
            "expkit sweeps list",
            "expkit sweeps list --experiment pytorch-digits --limit 5",
        ),
    )
    listing.add_argument("--experiment", help="only this experiment's sweeps")
    listing.add_argument("--limit", type=how_many, default=20, help="how many (default 20)")
    listing.set_defaults(handler=sweep_show.cmd_sweeps_list)
    show = sweeps.add_parser(
        "show",
        help="a sweep's spec, state and trials, the best first (sorted by the objective)",
        **described(
            "Show SWEEP (a sweep id, number or `latest`): its spec, state and trials sorted "
            "by the objective, the best first.",
            "expkit sweeps show latest",
            "expkit sweeps show 1 --plot sweep.png",
        ),
    )
    show.add_argument("sweep_id", metavar="SWEEP", help=SWEEP_HELP)
    show.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    show.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw the optimization history and the parameters' importances into FILE",
    )
    show.set_defaults(handler=sweep_show.cmd_sweeps_show)
    resume = sweeps.add_parser(
        "resume",
        help="go on with a sweep whose driver was killed (trial numbers and limits kept)",
        **described(
            "Go on with SWEEP (a sweep id, number or `latest`) whose driver was killed: "
            "its trial numbers and limits are kept.",
            "expkit sweeps resume latest",
            "expkit sweeps resume 1 --detach",
        ),
    )
    resume.add_argument("sweep_id", metavar="SWEEP", help=SWEEP_HELP)
    resume.add_argument("--detach", action="store_true", help="drive it in the background")
    resume.set_defaults(handler=sweep_run.cmd_sweeps_resume)
    cancel = sweeps.add_parser(
        "cancel",
        help="stop a sweep and its running trials (their outputs are kept)",
        **described(
            "Stop SWEEP (a sweep id, number or `latest`) and its running trials; their "
            "outputs are kept.",
            "expkit sweeps cancel latest",
        ),
    )
    cancel.add_argument("sweep_id", metavar="SWEEP", help=SWEEP_HELP)
    cancel.set_defaults(handler=sweep_run.cmd_sweeps_cancel)
