"""The search space on Optuna: the sampler, a trial's values, and the job a trial runs.

CONTRACT SKELETON: signatures the driver is written against; to be written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from expkit.job import JobSpec
    from expkit.sweeps.spec import SweepSpec


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for `spec.sampling`: RandomSampler(seed), QMCSampler (sobol),
    GridSampler (every combination of the choices), TPESampler (bayesian)."""
    raise NotImplementedError


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict[str, Any]:
    """The values trial `trial` runs with, {argument: value} (a paired choice expanded into
    its arguments), drawn through `trial` so that the study records them."""
    raise NotImplementedError


def trial_job(spec: SweepSpec, values: dict[str, Any]) -> JobSpec:
    """The job spec one trial runs: `spec.job` with `values` overriding its `args` (a dict's
    keys replaced or added; a list's `--name value` replaced or appended) and
    `limits.trial_timeout` as its `timeout` when that is shorter."""
    raise NotImplementedError


def grid_size(spec: SweepSpec) -> int | None:
    """How many trials a grid sweep has (the product of the choices), None for the others."""
    raise NotImplementedError


def preview(spec: SweepSpec, count: int) -> list[dict[str, Any]]:
    """The values of the first `count` trials the sweep would start (`--dry-run`), drawn
    from an in-memory study with the same sampler (the same ones when it is seeded)."""
    raise NotImplementedError
