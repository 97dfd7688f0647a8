"""Early termination: Azure ML's policies and Optuna's halving pruners, each saying why.

The driver reports each value a trial logs of the primary metric as an intermediate value,
step 1, 2, 3... (Azure ML's "intervals"), then asks the policy about that trial
(`Policy.reason`). Unlike Azure ML, the comparison is with every other trial's values at that
step, running or finished, so trials are terminated in the first concurrent batch too.

CONTRACT SKELETON: signatures the driver is written against; to be written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

    from expkit.sweeps.spec import SweepSpec


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    """The pruner for `spec.early_termination` (Optuna's NopPruner when there is none). Every
    pruner it returns also has `reason(study, trial: FrozenTrial) -> str | None`: None while
    the trial goes on, else why it stops, e.g. "early termination: bandit, step 3: 0.61
    outside slack of best 0.80"."""
    raise NotImplementedError
