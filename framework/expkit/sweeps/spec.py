"""The sweep spec: what `expkit sweep sweep.yaml` and `Experiment.submit(SweepSpec)` take.

Names are Azure ML v2's sweep job YAML (`search_space`, `sampling_algorithm`, `objective`,
`early_termination`, `limits`); HyperDrive's (v1) function forms are accepted too
(`learning_rate: loguniform(-9.2, -2.3)`, `choice(16, 32, 64)`).

Rules (Azure ML's, with the departures named):
- `loguniform(min, max)` is exp(uniform(min, max)): the bounds are exponents, as in Azure ML.
- The q-forms give round(x / q) * q; `randint(upper)` an integer in [0, upper).
- A `choice` whose values are mappings is a paired parameter: the drawn mapping sets each of
  its keys as an argument (`opt: choice({optimizer: sgd, lr: 0.1}, {optimizer: adam, lr:
  0.001})` gives `--optimizer sgd --lr 0.1`); the parameter's own name (`opt`) is not an
  argument, only the trial's parameter in the study.
- `grid` takes `choice` parameters only (as Azure ML); its trials are every combination once,
  and `limits.max_total_trials` defaults to (and is capped at) their number.
- `bayesian` (Optuna's TPE) takes the expressions Optuna itself draws: choice, randint,
  uniform, quniform, loguniform and qloguniform (Azure ML: choice, uniform and quniform); the
  normal family is drawn outside Optuna, so TPE could not model it: an error. Unlike Azure ML
  (whose Bayesian sampling allows no early termination policy) an `early_termination` policy
  may go with it: TPE learns from pruned trials too.
- `limits.max_total_trials` defaults to 1000 (Azure ML's default), `max_concurrent_trials`
  to 1 (Azure ML: as many as max_total_trials; trials still wait for the target's slots).
- `objective.goal` is required (maximize or minimize; HyperDrive's MAXIMIZE too).
- Each problem is one line `FILE: FIELD: what is wrong; what to do` of a JobSpecError.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from expkit.errors import JobSpecError, printable, quoted
from expkit.job import JobSpec, apply_override, blame_overrides

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

    @property
    def paired(self) -> bool:
        """Whether this is a choice of mappings, each setting several arguments at once."""
        return self.type == "choice" and any(isinstance(v, dict) for v in self.values)

    @property
    def arguments(self) -> list[str]:
        """The job arguments this parameter sets: its name, or a paired choice's keys."""
        if not self.paired:
            return [self.name]
        return list(dict.fromkeys(key for value in self.values for key in value))


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

        `overrides` are `--set KEY=VALUE` items, applied as `expkit run --set` applies them
        to a job spec (`limits.max_total_trials=4`); `job.FIELD=VALUE` overrides a field of
        the trial's job, also when `job:` names a file. Raises JobSpecError (exit 2, one line
        per problem naming the file and the field)."""
        from expkit.job import read_spec_file

        path = Path(path)
        source = printable(str(path))
        raw = read_spec_file(path, "a sweep spec")
        if "search_space" not in raw and "entry_script" in raw:
            raise JobSpecError(
                source,
                "",
                f"is a job spec, not a sweep spec; run it with `expkit run {source}`, or write "
                f"a sweep spec with job: {source} (see README: Sweeps)",
            )
        overrides = list(overrides or [])
        job_overrides: list[str] = []
        for key in ("sampling_algorithm", "early_termination"):  # `--set x.seed=1` on `x: random`
            if isinstance(raw.get(key), str) and any(o.startswith(f"{key}.") for o in overrides):
                raw[key] = {"type": raw[key]}
        for item in overrides:
            if item.startswith("job.") and isinstance(raw.get("job"), str):
                job_overrides.append(item[len("job.") :])  # applied to the job's own file
            else:
                apply_override(raw, item)
        try:
            return cls.from_dict(raw, source, path.parent, job_overrides)
        except JobSpecError as error:
            if not overrides:
                raise
            error.args = (blame_overrides(str(error), source, overrides),)
            raise

    @classmethod
    def from_dict(
        cls,
        raw: dict[str, Any],
        source: str = "SweepSpec",
        base_dir: Path | None = None,
        job_overrides: list[str] | None = None,
    ) -> SweepSpec:
        """Validate a plain dict (what `to_dict` gives, or a parsed YAML file); `job` may be a
        path (relative to `base_dir`, else to the current folder, read with `job_overrides`),
        a mapping (its paths resolved against `base_dir` when given) or a JobSpec. Raises
        JobSpecError with one line per problem."""
        return _Parser(source, base_dir, job_overrides or []).spec(raw)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict, the job inline, that `from_dict` turns back into this spec: what
        the sweep's record keeps (`expkit sweeps resume` reads it)."""
        early = None
        if self.early_termination is not None:
            policy = self.early_termination
            names = (*POLICY_COMMON, *POLICY_FIELDS[policy.type])
            early = _without_none({name: getattr(policy, name) for name in names})
        sampling = _without_none(dataclasses.asdict(self.sampling))
        if self.sampling.type != "random":
            del sampling["rule"]
        return {
            "job": self.job.to_dict(),
            "search_space": {p.name: parameter_dict(p) for p in self.search_space},
            "sampling_algorithm": sampling,
            "objective": dataclasses.asdict(self.objective),
            "early_termination": early,
            "limits": _without_none(dataclasses.asdict(self.limits)),
            "register_best": self.register_best,
        }

    @property
    def arguments(self) -> list[str]:
        """The names of the job arguments the search space sets (a paired choice's keys in
        place of its name), in the order of the space."""
        names: list[str] = []
        for parameter in self.search_space:
            names += parameter.arguments
        return names


# -- Python forms of HyperDrive's functions ---------------------------------------------------
def choice(*values: Any) -> dict[str, Any]:
    """HyperDrive's `choice(16, 32, 64)` (or `choice([16, 32, 64])`) as a search space entry."""
    items = (
        list(values[0])
        if len(values) == 1 and isinstance(values[0], list | tuple | range)
        else list(values)
    )
    return {"type": "choice", "values": items}


def randint(upper: int) -> dict[str, Any]:
    """`randint(upper)`: an integer in [0, upper)."""
    return {"type": "randint", "upper": upper}


def uniform(min_value: float, max_value: float) -> dict[str, Any]:
    """`uniform(min_value, max_value)`."""
    return {"type": "uniform", "min_value": min_value, "max_value": max_value}


def quniform(min_value: float, max_value: float, q: float) -> dict[str, Any]:
    """`quniform(min_value, max_value, q)`: round(uniform(min, max) / q) * q."""
    return {"type": "quniform", "min_value": min_value, "max_value": max_value, "q": q}


def loguniform(min_value: float, max_value: float) -> dict[str, Any]:
    """`loguniform(min_value, max_value)`: exp(uniform(min, max)); the bounds are exponents."""
    return {"type": "loguniform", "min_value": min_value, "max_value": max_value}


def qloguniform(min_value: float, max_value: float, q: float) -> dict[str, Any]:
    """`qloguniform(min_value, max_value, q)`: round(exp(uniform(min, max)) / q) * q."""
    return {"type": "qloguniform", "min_value": min_value, "max_value": max_value, "q": q}


def normal(mu: float, sigma: float) -> dict[str, Any]:
    """`normal(mu, sigma)`."""
    return {"type": "normal", "mu": mu, "sigma": sigma}


def lognormal(mu: float, sigma: float) -> dict[str, Any]:
    """`lognormal(mu, sigma)`: exp(normal(mu, sigma))."""
    return {"type": "lognormal", "mu": mu, "sigma": sigma}


def qnormal(mu: float, sigma: float, q: float) -> dict[str, Any]:
    """`qnormal(mu, sigma, q)`: round(normal(mu, sigma) / q) * q."""
    return {"type": "qnormal", "mu": mu, "sigma": sigma, "q": q}


def qlognormal(mu: float, sigma: float, q: float) -> dict[str, Any]:
    """`qlognormal(mu, sigma, q)`: round(exp(normal(mu, sigma)) / q) * q."""
    return {"type": "qlognormal", "mu": mu, "sigma": sigma, "q": q}


# -- the rules ----------------------------------------------------------------------------------
# The fields of each expression, in the order HyperDrive's functions take them.
FIELDS: dict[str, tuple[str, ...]] = {
    "choice": ("values",),
    "randint": ("upper",),
    "uniform": ("min_value", "max_value"),
    "quniform": ("min_value", "max_value", "q"),
    "loguniform": ("min_value", "max_value"),
    "qloguniform": ("min_value", "max_value", "q"),
    "normal": ("mu", "sigma"),
    "lognormal": ("mu", "sigma"),
    "qnormal": ("mu", "sigma", "q"),
    "qlognormal": ("mu", "sigma", "q"),
}
GRID_EXPRESSIONS = ("choice",)  # Azure ML: grid sampling supports choice only
# What TPE can model: the expressions Optuna draws itself (Azure ML: choice, uniform, quniform).
BAYESIAN_EXPRESSIONS = ("choice", "randint", "uniform", "quniform", "loguniform", "qloguniform")
POLICY_FIELDS: dict[str, tuple[str, ...]] = {
    "bandit": ("slack_factor", "slack_amount"),
    "median_stopping": (),
    "truncation_selection": ("truncation_percentage",),
    "successive_halving": ("min_resource", "reduction_factor"),
    "hyperband": ("min_resource", "max_resource", "reduction_factor"),
}
POLICY_COMMON = ("type", "evaluation_interval", "delay_evaluation")
MAX_EXPONENT = 709.0  # exp(709.8) is the largest a float holds
DEFAULT_MAX_TOTAL_TRIALS = 1000  # Azure ML v2's default
TOP_LEVEL = (
    "job",
    "search_space",
    "sampling_algorithm",
    "objective",
    "early_termination",
    "limits",
    "register_best",
)
# Names users bring from HyperDrive or Azure ML's sweep job YAML, and expkit's for them.
_RENAMED = {
    "trial": "job (the trial's job spec: a path or a mapping)",
    "max_total_runs": "max_total_trials",
    "max_concurrent_runs": "max_concurrent_trials",
    "max_duration_minutes": "timeout (seconds)",
    "primary_metric_name": "objective.primary_metric",
    "primary_metric_goal": "objective.goal",
    "policy": "early_termination",
    "hyperparameter_sampling": "sampling_algorithm",
}
_SCALARS = (str, int, float, bool, type(None))


@dataclass
class _Parser:
    """One validation pass over a raw sweep spec, collecting every problem it finds."""

    source: str
    base_dir: Path | None
    job_overrides: list[str]
    lines: list[str] = field(default_factory=list)

    def problem(self, path: str, reason: str) -> None:
        self.lines.append(
            f"{self.source}: {path}: {reason}" if path else f"{self.source}: {reason}"
        )

    def fail(self) -> JobSpecError:
        error = JobSpecError(self.source, "", "")
        error.args = ("\n".join(dict.fromkeys(self.lines)),)
        return error

    # -- the whole spec ------------------------------------------------------------------------
    def spec(self, raw: Any) -> SweepSpec:
        if not isinstance(raw, dict):
            self.problem("", "a sweep spec is a mapping (key: value lines)")
            raise self.fail()
        extra = frozenset({"$schema"} | ({"type"} if raw.get("type") == "sweep" else set()))
        self.unknown(raw, TOP_LEVEL, "", ignore=extra)
        for name in ("job", "search_space", "objective"):
            renamed = any(_RENAMED.get(key, "").startswith(name) for key in raw if key != name)
            if raw.get(name) is None and not renamed:  # `trial:` has its own line
                example = {
                    "job": "training/job.yaml (the trial's job spec) or the job inline",
                    "search_space": "{lr: {type: uniform, min_value: 0.01, max_value: 0.1}}",
                    "objective": "{primary_metric: best_val_acc, goal: maximize}",
                }[name]
                self.problem(name, f"required field is missing; e.g. {name}: {example}")
        job = self.job(raw["job"]) if raw.get("job") is not None else None
        space = self.space(raw["search_space"]) if raw.get("search_space") is not None else ()
        objective = self.objective(raw["objective"]) if raw.get("objective") is not None else None
        sampling = self.sampling(raw.get("sampling_algorithm"))
        early = self.early_termination(raw.get("early_termination"))
        limits = self.limits(raw.get("limits"))
        register_best = raw.get("register_best", False)
        if not isinstance(register_best, bool):
            self.problem("register_best", f"must be true or false, not {quoted(register_best)}")
        if sampling is not None and space:
            self.sampler_supports(sampling, space)
        if job is not None:
            self.job_fits(job, space, register_best)
        if self.lines:
            raise self.fail()
        assert job is not None and objective is not None and sampling is not None
        assert limits is not None
        size = math.prod(len(p.values) for p in space) if sampling.type == "grid" else None
        total = limits.max_total_trials
        if total is None:
            total = size if size is not None else DEFAULT_MAX_TOTAL_TRIALS
        elif size is not None:
            total = min(total, size)  # a grid sweep ends when every combination ran
        return SweepSpec(
            job=job,
            search_space=space,
            objective=objective,
            sampling=sampling,
            early_termination=early,
            limits=dataclasses.replace(limits, max_total_trials=total),
            register_best=register_best,
            source=self.source,
        )

    def unknown(
        self,
        raw: dict[str, Any],
        allowed: tuple[str, ...],
        path: str,
        ignore: frozenset[str] = frozenset(),
    ) -> None:
        prefix = f"{path}." if path else ""
        for key in raw:
            if key in allowed or key in ignore:
                continue
            name = printable(str(key), 60)
            if key in _RENAMED:
                hint = f" (expkit's name is {_RENAMED[key]})"
            else:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.problem(f"{prefix}{name}", f"unknown field{hint}; allowed: {', '.join(allowed)}")

    def mapping(self, value: Any, path: str, example: str) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.problem(path, f"must be a mapping, not {_kind(value)}; e.g. {path}: {example}")
        return None

    # -- job -------------------------------------------------------------------------------------
    def job(self, raw: Any) -> JobSpec | None:
        try:
            if isinstance(raw, JobSpec):
                return raw
            if isinstance(raw, str):
                path = Path(raw)
                if self.base_dir is not None and not path.is_absolute():
                    path = self.base_dir / path
                if not path.exists():
                    folder = "the sweep file's folder" if self.base_dir else "the current folder"
                    self.problem(
                        "job",
                        f"{printable(raw)}: no such file; `job:` is the path of the trial's job "
                        f"spec, relative to {folder} ({printable(str(path.parent.absolute()))}), "
                        "or the job spec inline",
                    )
                    return None
                return JobSpec.from_yaml(path, self.job_overrides)
            if isinstance(raw, dict):
                for item in self.job_overrides:
                    apply_override(raw, item)
                inner = f"{self.source}: job"
                try:
                    return JobSpec.from_dict(raw, source=inner, base_dir=self.base_dir)
                except JobSpecError as error:  # `FILE: job: FIELD: why` -> `FILE: job.FIELD: why`
                    lines = str(error).splitlines()
                    head = f"{inner}: "
                    fixed = []
                    for line in lines:
                        rest = line[len(head) :] if line.startswith(head) else None
                        field_name = rest.split(": ", 1)[0] if rest else ""
                        if rest and ": " in rest and " " not in field_name:
                            line = f"{self.source}: job.{rest}"
                        fixed.append(line)
                    error.args = ("\n".join(fixed),)
                    raise
        except JobSpecError as error:
            self.lines += str(error).splitlines()
            return None
        self.problem("job", f"must be the path of a job spec or a mapping, not {_kind(raw)}")
        return None

    def job_fits(self, job: JobSpec, space: tuple[Parameter, ...], register_best: Any) -> None:
        """What the trial's job must have for the rest of the spec: a model to register the
        best trial's, list args whose swept values can be told from positional ones."""
        if register_best is True and job.model is None:
            self.problem(
                "register_best",
                "is true but the trial's job has no job.model to register; add model: "
                "{name: ..., path: ...} to the job, or drop register_best",
            )
        if isinstance(job.args, list):
            from expkit.sweeps.space import list_arg_problem

            for parameter in space:
                for argument in parameter.arguments:
                    values = list(parameter.values or ())
                    if parameter.paired:
                        values = [v[argument] for v in values if argument in v]
                    reason = list_arg_problem(list(job.args), argument, values)
                    if reason:
                        self.problem(f"search_space.{parameter.name}", reason)

    # -- search space ------------------------------------------------------------------------------
    def space(self, raw: Any) -> tuple[Parameter, ...]:
        example = "{learning_rate: {type: loguniform, min_value: -9.2, max_value: -2.3}}"
        if isinstance(raw, list | tuple) and raw and all(isinstance(p, Parameter) for p in raw):
            raw = {p.name: p for p in raw}  # SweepSpec's own shape, from Python
        space = self.mapping(raw, "search_space", example)
        if space is None:
            return ()
        if not space:
            self.problem("search_space", f"is empty; name the arguments to sweep, e.g. {example}")
        parameters = []
        split = self.flow_split(space)
        for name, entry in space.items():
            path = f"search_space.{printable(str(name), 60)}"
            if name in split:
                continue
            if not isinstance(name, str) or not name.strip("-") or any(c.isspace() for c in name):
                self.problem(
                    path, "a parameter's name is the argument it sets, e.g. `learning_rate`"
                )
                continue
            parameter = self.parameter(name, entry, path)
            if parameter is not None:
                parameters.append(parameter)
        seen: dict[str, str] = {}
        for parameter in parameters:
            for argument in parameter.arguments:
                key = argument.lstrip("-")
                if key in seen and seen[key] != parameter.name:
                    self.problem(
                        f"search_space.{parameter.name}",
                        f"sets argument {argument!r}, which search_space.{seen[key]} sets too; "
                        "each argument may come from one parameter",
                    )
                seen.setdefault(key, parameter.name)
        return tuple(parameters)

    def flow_split(self, space: dict[Any, Any]) -> set[Any]:
        """The keys of function forms YAML split at their commas in a flow mapping
        (`{lr: uniform(0, 1)}` reads as `{lr: 'uniform(0', '1)': null}`), each form said
        once on its own line; the parameter and its pieces are then skipped."""
        split: set[Any] = set()
        items = list(space.items())
        for i, (name, entry) in enumerate(items):
            if not isinstance(entry, str) or entry.count("(") <= entry.count(")"):
                continue
            if name in split:
                continue
            pieces = []
            for key, value in items[i + 1 :]:
                if value is not None:
                    break
                pieces.append(key)
                if str(key).count(")") > str(key).count("("):
                    break
            if not pieces:
                continue
            text = ", ".join([entry, *map(str, pieces)])
            split.update([name, *pieces])
            self.problem(
                f"search_space.{printable(str(name), 60)}",
                f"`{printable(text, 80)}` in a flow mapping {{...}} is split at its comma by "
                f"YAML; quote it ({printable(str(name), 60)}: '{printable(text, 80)}') or use "
                "block style",
            )
        return split

    def parameter(self, name: str, raw: Any, path: str) -> Parameter | None:
        if isinstance(raw, Parameter):
            raw = parameter_dict(raw)
        if isinstance(raw, str):
            raw = self.function_form(raw, path)
            if raw is None:
                return None
        if not isinstance(raw, dict):
            self.problem(
                path,
                f"must be an expression, not {_kind(raw)}; e.g. {{type: choice, values: [16, 32]}}"
                " or `choice(16, 32)`",
            )
            return None
        kind = raw.get("type")
        if kind is None:
            self.problem(
                f"{path}.type", f"required field is missing; one of {', '.join(EXPRESSIONS)}"
            )
            return None
        if not isinstance(kind, str) or kind.lower() not in FIELDS:
            self.problem(f"{path}.type", _unknown_name(kind, EXPRESSIONS, "expression"))
            return None
        kind = kind.lower()
        before = len(self.lines)
        self.unknown(raw, ("type", *FIELDS[kind]), path)
        for name_ in FIELDS[kind]:
            if name_ not in raw:
                self.problem(
                    f"{path}.{name_}",
                    f"required field is missing ({kind} takes {', '.join(FIELDS[kind])})",
                )
        if len(self.lines) > before:
            return None
        values: dict[str, Any] = {}
        if kind == "choice":
            values["values"] = self.choice_values(raw["values"], f"{path}.values")
        elif kind == "randint":
            upper = raw["upper"]
            if not isinstance(upper, int) or isinstance(upper, bool):
                self.problem(f"{path}.upper", f"must be a whole number, not {quoted(upper)}")
            elif upper < 1:
                self.problem(
                    f"{path}.upper",
                    f"must be at least 1, not {upper} (randint draws from [0, upper))",
                )
            values["upper"] = upper
        else:
            for name_ in FIELDS[kind]:
                values[name_] = self.number(raw[name_], f"{path}.{name_}")
        if len(self.lines) > before:
            return None
        low, high = values.get("min_value"), values.get("max_value")
        if low is not None and high is not None and low >= high:
            self.problem(f"{path}.max_value", f"must be greater than min_value ({_num(low)})")
        if kind in ("loguniform", "qloguniform"):
            for bound in ("min_value", "max_value"):
                if abs(values[bound]) > MAX_EXPONENT:
                    self.problem(
                        f"{path}.{bound}",
                        f"{_num(values[bound])}: {kind}'s bounds are exponents (the values are "
                        f"exp(min_value)..exp(max_value)); give the log of the bound, at most "
                        f"{MAX_EXPONENT:g} either way",
                    )
        if values.get("q") is not None and values["q"] <= 0:
            self.problem(f"{path}.q", f"must be greater than 0, not {_num(values['q'])}")
        if values.get("sigma") is not None and values["sigma"] <= 0:
            self.problem(f"{path}.sigma", f"must be greater than 0, not {_num(values['sigma'])}")
        if len(self.lines) > before:
            return None
        if "values" in values:
            values["values"] = tuple(values["values"])
        return Parameter(name=name, type=kind, **values)

    def function_form(self, text: str, path: str) -> dict[str, Any] | None:
        """HyperDrive's `uniform(0.8, 0.99)` as its mapping; the arguments are read with
        ast.literal_eval (literals only: nothing is evaluated)."""
        example = (
            "e.g. `uniform(0.8, 0.99)`, `choice(16, 32, 64)` or {type: choice, values: [16, 32]}"
        )
        shown = quoted(text)
        try:
            call = ast.parse(text.strip(), mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            call = None
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
            self.problem(path, f"{shown} is not an expression; {example}")
            return None
        kind = call.func.id.lower()
        if kind not in FIELDS:
            self.problem(path, _unknown_name(call.func.id, EXPRESSIONS, "expression"))
            return None
        try:
            args = [_literal(node) for node in call.args]
            keywords = {k.arg: _literal(k.value) for k in call.keywords if k.arg is not None}
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            self.problem(path, f"{shown}: the arguments must be literals (numbers, strings, lists)")
            return None
        if len(keywords) < len(call.keywords):
            self.problem(path, f"{shown}: `**` arguments are not supported")
            return None
        raw: dict[str, Any] = {"type": kind}
        if kind == "choice":
            if args:
                single = len(args) == 1 and isinstance(args[0], list | tuple)
                raw["values"] = list(args[0]) if single else args
        else:
            fields = FIELDS[kind]
            if len(args) > len(fields):
                self.problem(
                    path, f"{shown}: {kind} takes {len(fields)} arguments ({', '.join(fields)})"
                )
                return None
            raw.update(zip(fields, args, strict=False))
        for key, value in keywords.items():
            if key in raw:
                self.problem(path, f"{shown}: {key} is given twice")
                return None
            raw[key] = value
        return raw

    def choice_values(self, raw: Any, path: str) -> list[Any]:
        if isinstance(raw, tuple | range):
            raw = list(raw)
        if not isinstance(raw, list):
            self.problem(path, f"must be a list of values, not {_kind(raw)}; e.g. [16, 32, 64]")
            return []
        if not raw:
            self.problem(path, "is empty; list the values to choose from, e.g. [16, 32, 64]")
            return []
        paired = [isinstance(v, dict) for v in raw]
        if any(paired) and not all(paired):
            self.problem(
                path,
                "mixes mappings and single values; a paired parameter's values are all mappings "
                "({optimizer: sgd, lr: 0.1}), a plain one's all values",
            )
            return []
        seen: list[str] = []
        for i, value in enumerate(raw):
            where = f"{path}.{i}"
            if isinstance(value, dict):
                if not value:
                    self.problem(where, "is an empty mapping; name the arguments it sets")
                for key, item in value.items():
                    if not isinstance(key, str) or not key.strip("-"):
                        self.problem(where, f"{quoted(key)} is not an argument's name")
                    elif not _arg_value(item):
                        self.problem(f"{where}.{key}", _ARG_VALUE)
            elif not _arg_value(value):
                self.problem(where, _ARG_VALUE)
            key_ = repr(_canonical(value))
            if key_ in seen:
                self.problem(where, f"{quoted(value)} is listed twice; list each value once")
            seen.append(key_)
        return raw

    def number(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(path, f"must be a number, not {quoted(value)}")
            return 0.0
        try:
            number = float(value)
        except OverflowError:
            self.problem(path, f"{quoted(value)} is too large")
            return 0.0
        if not math.isfinite(number):
            self.problem(path, f"must be a finite number, not {value}")
        return number

    def integer(
        self, raw: dict[str, Any], name: str, path: str, low: int, high: int | None = None
    ) -> int | None:
        if name not in raw or raw[name] is None:
            return None
        value = raw[name]
        where = f"{path}.{name}"
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(where, f"must be a whole number, not {quoted(value)}")
            return None
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"at least {low}"
            self.problem(where, f"must be {span}, not {value}")
            return None
        return value

    def positive(self, raw: dict[str, Any], name: str, path: str) -> float | None:
        if name not in raw or raw[name] is None:
            return None
        value = self.number(raw[name], f"{path}.{name}")
        if (
            value <= 0
            and math.isfinite(value)
            and not isinstance(raw[name], bool)
            and isinstance(raw[name], int | float)
        ):
            self.problem(f"{path}.{name}", f"must be greater than 0, not {_num(value)}")
        return value

    # -- the other sections ------------------------------------------------------------------------
    def sampling(self, raw: Any) -> Sampling | None:
        path = "sampling_algorithm"
        if raw is None:
            return Sampling()
        if isinstance(raw, str):
            raw = {"type": raw}
        value = self.mapping(raw, path, "{type: random, seed: 42}")
        if value is None:
            return None
        before = len(self.lines)
        self.unknown(value, ("type", "seed", "rule"), path)
        kind = value.get("type", "random")
        if not isinstance(kind, str) or kind.lower() not in SAMPLING:
            self.problem(f"{path}.type", _unknown_name(kind, SAMPLING, "sampling algorithm"))
            return None
        kind = kind.lower()
        seed = self.integer(value, "seed", path, 0, 2**32 - 1)
        rule = value.get("rule", "random")
        if not isinstance(rule, str) or rule.lower() not in ("random", "sobol"):
            self.problem(f"{path}.rule", f"must be random or sobol, not {quoted(rule)}")
        elif kind != "random" and "rule" in value:
            self.problem(f"{path}.rule", f"is random sampling's (random or sobol), not {kind}'s")
        if len(self.lines) > before:
            return None
        return Sampling(type=kind, seed=seed, rule=str(rule).lower())

    def sampler_supports(self, sampling: Sampling, space: tuple[Parameter, ...]) -> None:
        for parameter in space:
            path = f"search_space.{parameter.name}"
            if sampling.type == "grid" and parameter.type not in GRID_EXPRESSIONS:
                self.problem(
                    path,
                    f"grid sampling takes choice only, not {parameter.type}; list the values "
                    "({type: choice, values: [...]}) or use sampling_algorithm: random",
                )
            if sampling.type == "bayesian" and parameter.type not in BAYESIAN_EXPRESSIONS:
                self.problem(
                    path,
                    f"bayesian sampling takes {', '.join(BAYESIAN_EXPRESSIONS)}, not "
                    f"{parameter.type}; use sampling_algorithm: random",
                )

    def objective(self, raw: Any) -> Objective | None:
        path = "objective"
        value = self.mapping(raw, path, "{primary_metric: best_val_acc, goal: maximize}")
        if value is None:
            return None
        before = len(self.lines)
        self.unknown(value, ("primary_metric", "goal"), path)
        metric = value.get("primary_metric")
        if metric is None:
            self.problem(
                f"{path}.primary_metric",
                "required field is missing; name the metric the trials log, e.g. best_val_acc",
            )
        elif not isinstance(metric, str) or not metric.strip():
            self.problem(f"{path}.primary_metric", f"must be a metric's name, not {quoted(metric)}")
        goal = value.get("goal")
        if goal is None:
            self.problem(f"{path}.goal", "required field is missing; give maximize or minimize")
        elif not isinstance(goal, str) or goal.lower() not in GOALS:
            self.problem(f"{path}.goal", f"must be maximize or minimize, not {quoted(goal)}")
        if len(self.lines) > before:
            return None
        return Objective(primary_metric=str(metric), goal=str(goal).lower())

    def early_termination(self, raw: Any) -> EarlyTermination | None:
        path = "early_termination"
        if raw is None:
            return None
        if isinstance(raw, str):
            raw = {"type": raw}
        value = self.mapping(raw, path, "{type: bandit, slack_factor: 0.1}")
        if value is None:
            return None
        kind = value.get("type")
        if kind is None:
            self.problem(f"{path}.type", f"required field is missing; one of {', '.join(POLICIES)}")
            return None
        if isinstance(kind, str) and kind.lower() == "none":
            self.unknown(value, ("type",), path)
            return None
        if not isinstance(kind, str) or kind.lower() not in POLICY_FIELDS:
            self.problem(f"{path}.type", _unknown_name(kind, POLICIES, "policy"))
            return None
        kind = kind.lower()
        before = len(self.lines)
        self.unknown(value, (*POLICY_COMMON, *POLICY_FIELDS[kind]), path)
        fields: dict[str, Any] = {"type": kind}
        interval = self.integer(value, "evaluation_interval", path, 1)
        delay = self.integer(value, "delay_evaluation", path, 0)
        if interval is not None:
            fields["evaluation_interval"] = interval
        if delay is not None:
            fields["delay_evaluation"] = delay
        if kind == "bandit":
            given = [k for k in ("slack_factor", "slack_amount") if value.get(k) is not None]
            if len(given) != 1:
                self.problem(
                    path,
                    "bandit takes exactly one of slack_factor (a ratio of the best) and "
                    "slack_amount (a distance from the best), e.g. slack_factor: 0.1",
                )
            for name in given:
                fields[name] = self.positive(value, name, path)
        elif kind == "truncation_selection":
            if value.get("truncation_percentage") is None:
                self.problem(
                    f"{path}.truncation_percentage",
                    "required field is missing; the percentage of trials to cancel at each "
                    "interval, 1 to 99",
                )
            fields["truncation_percentage"] = self.integer(
                value, "truncation_percentage", path, 1, 99
            )
        elif kind in ("successive_halving", "hyperband"):
            fields["min_resource"] = self.integer(value, "min_resource", path, 1)
            reduction = self.integer(value, "reduction_factor", path, 2)
            if reduction is not None:
                fields["reduction_factor"] = reduction
            if kind == "hyperband":
                fields["max_resource"] = self.integer(value, "max_resource", path, 1)
                low, high = fields["min_resource"], fields["max_resource"]
                if low is not None and high is not None and high <= low:
                    self.problem(
                        f"{path}.max_resource", f"must be greater than min_resource ({low})"
                    )
        if len(self.lines) > before:
            return None
        return EarlyTermination(**fields)

    def limits(self, raw: Any) -> Limits | None:
        path = "limits"
        if raw is None:
            return Limits()
        value = self.mapping(raw, path, "{max_total_trials: 20, max_concurrent_trials: 2}")
        if value is None:
            return None
        before = len(self.lines)
        fields = tuple(f.name for f in dataclasses.fields(Limits))
        self.unknown(value, fields, path)
        total = self.integer(value, "max_total_trials", path, 1)
        concurrent = self.integer(value, "max_concurrent_trials", path, 1)
        timeout = self.positive(value, "timeout", path)
        trial_timeout = self.positive(value, "trial_timeout", path)
        if len(self.lines) > before:
            return None
        return Limits(
            max_total_trials=total,
            max_concurrent_trials=concurrent if concurrent is not None else 1,
            timeout=timeout,
            trial_timeout=trial_timeout,
        )


# -- small helpers --------------------------------------------------------------------------------
_ARG_VALUE = (
    "must be a string, a number, true/false, null or a list of those (the script gets text)"
)


def _arg_value(value: Any) -> bool:
    """Whether `value` can be a job argument's value (as JobSpec's `args` allow)."""
    if isinstance(value, list):
        return all(isinstance(v, _SCALARS) for v in value)
    return isinstance(value, _SCALARS)


def _canonical(value: Any) -> Any:
    """A comparable form of a choice's value that tells 1, 1.0 and true apart."""
    if isinstance(value, dict):
        return sorted((str(k), _canonical(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return (type(value).__name__, value)


def _literal(node: ast.AST) -> Any:
    """A literal argument of a function form; `range(...)` of whole numbers is a list, as
    HyperDrive's `choice(range(1, 5))`."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "range"
        and not node.keywords
    ):
        args = [ast.literal_eval(a) for a in node.args]
        if (
            not all(isinstance(a, int) and not isinstance(a, bool) for a in args)
            or not 1 <= len(args) <= 3
        ):
            raise ValueError("range takes whole numbers")
        span = range(*args)
        if len(span) > 100_000:
            raise ValueError("range too long")
        return list(span)
    value = ast.literal_eval(node)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, set | frozenset | bytes | complex):
        raise ValueError("not a YAML value")
    return value


def _unknown_name(value: Any, names: tuple[str, ...], what: str) -> str:
    shown = printable(str(value), 60) if isinstance(value, str) else quoted(value)
    close = difflib.get_close_matches(shown.lower(), names, n=1) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {shown!r}{hint}; one of {', '.join(names)}"


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", type(None): "empty"}
    return names.get(type(value)) or quoted(value)


def _num(value: float) -> str:
    """A bound as the user wrote it: -2.3, 10 (not 10.0)."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def parameter_dict(parameter: Parameter) -> dict[str, Any]:
    """The mapping form of a search space entry (`{type: choice, values: [...]}`), as
    `to_dict` writes it and the YAML takes it."""
    values: dict[str, Any] = {"type": parameter.type}
    for name in FIELDS[parameter.type]:
        value = getattr(parameter, name)
        values[name] = list(value) if name == "values" else value
    return values


def clean_multiple(k: int, q: float) -> float | int:
    """k * q as the nearest float to the exact product (0.3, not 0.30000000000000004); an
    integer when q is a whole number (a script's `type=int` refuses `48.0`)."""
    if float(q).is_integer():
        return k * int(q)
    return float(Decimal(k) * Decimal(repr(float(q))))
