"""The sweep spec: what `expkit sweep sweep.yaml` and `Experiment.submit(SweepSpec)` take.

Names are Azure ML v2's sweep job YAML (`search_space`, `sampling_algorithm`, `objective`,
`early_termination`, `limits`); HyperDrive's (v1) function forms are accepted too
(`learning_rate: loguniform(-9.2, -2.3)`, `choice(16, 32, 64)`).

CONTRACT SKELETON: the shapes below are the contract the driver, the policies, the CLI and the
importer are written against; parsing (`from_dict`, `from_yaml`) is to be written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expkit.job import JobSpec

# The search-space expressions (same names in HyperDrive and Azure ML v2).
EXPRESSIONS = (
    "choice",
    "randint",
    "uniform",
    "quniform",
    "loguniform",
    "qloguniform",
    "normal",
    "lognormal",
    "qnormal",
    "qlognormal",
)
SAMPLING = ("random", "grid", "bayesian")
POLICIES = ("bandit", "median_stopping", "truncation_selection", "successive_halving", "hyperband")
GOALS = ("maximize", "minimize")


@dataclass(frozen=True)
class Parameter:
    """One entry of the search space: the argument `name` gets a value drawn by `type`.

    `choice`: `values` (a value that is a mapping sets several arguments at once: paired
    parameters); `randint`: `upper` (an integer in [0, upper)); `uniform`, `loguniform`
    (bounds are exponents: exp(uniform(min, max))): `min_value`, `max_value`; the q-forms
    add `q` (round(x / q) * q); `normal`, `lognormal` and their q-forms: `mu`, `sigma`.
    """

    name: str
    type: str
    values: tuple[Any, ...] = ()
    upper: int | None = None
    min_value: float | None = None
    max_value: float | None = None
    q: float | None = None
    mu: float | None = None
    sigma: float | None = None


@dataclass(frozen=True)
class Sampling:
    """`sampling_algorithm`: random (`seed`; `rule` random or sobol), grid, bayesian (TPE)."""

    type: str = "random"
    seed: int | None = None
    rule: str = "random"


@dataclass(frozen=True)
class Objective:
    """`objective`: the metric the trials log (`primary_metric`) and whether more is better."""

    primary_metric: str
    goal: str = "maximize"


@dataclass(frozen=True)
class EarlyTermination:
    """`early_termination`: which policy stops trials early, and from when and how often it
    looks (`evaluation_interval`, `delay_evaluation`, in reports of the primary metric, as
    Azure ML defines them). Bandit: `slack_factor` or `slack_amount`; truncation selection:
    `truncation_percentage`; successive halving and Hyperband (Optuna's): `min_resource`,
    `max_resource`, `reduction_factor`."""

    type: str
    evaluation_interval: int = 1
    delay_evaluation: int = 0
    slack_factor: float | None = None
    slack_amount: float | None = None
    truncation_percentage: int | None = None
    min_resource: int | None = None
    max_resource: int | None = None
    reduction_factor: int = 3


@dataclass(frozen=True)
class Limits:
    """`limits`: trials in all and at once; the sweep's and each trial's time (seconds)."""

    max_total_trials: int | None = None
    max_concurrent_trials: int = 1
    timeout: float | None = None
    trial_timeout: float | None = None


@dataclass(frozen=True)
class SweepSpec:
    """A whole sweep: the trial's job, the space, how to sample, what to optimize, when to stop
    trials early, the limits, and whether to register the best trial's model. `source` names
    the file (or "SweepSpec") in error messages."""

    job: JobSpec
    search_space: tuple[Parameter, ...]
    objective: Objective
    sampling: Sampling = field(default_factory=Sampling)
    early_termination: EarlyTermination | None = None
    limits: Limits = field(default_factory=Limits)
    register_best: bool = False
    source: str = "SweepSpec"

    @property
    def experiment(self) -> str:
        return self.job.experiment

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
        """Load and validate a sweep spec file; `job:` is a path relative to it, or inline.
        Raises JobSpecError (exit 2, one line per problem naming the file and field)."""
        raise NotImplementedError

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], source: str = "SweepSpec", base_dir: Path | None = None
    ) -> SweepSpec:
        """Validate a plain dict (what `to_dict` gives, or a parsed YAML file)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict, the job inline, that `from_dict` turns back into this spec: what
        the sweep's record keeps (`expkit sweeps resume` reads it)."""
        raise NotImplementedError
