"""The search space on Optuna: the sampler, a trial's values, and the job a trial runs.

How each expression is drawn (the study records what Optuna draws as the trial's params;
the values the trial's job gets are also kept as the trial's user attr `values`):
- `choice`: `suggest_categorical` over the values; over their indices (0, 1, ...) when a value
  is not a plain scalar (a paired choice's mappings, a list), the index then expanded.
- `randint(upper)`: `suggest_int(0, upper - 1)`.
- `uniform`: `suggest_float(min, max)`; `loguniform`: `suggest_float(exp(min), exp(max),
  log=True)` (Azure ML's bounds are exponents).
- `quniform`: `suggest_float` with `step=q` between the multiples of q nearest the bounds, so
  every value is round(x / q) * q as Azure ML defines it, written as the nearest float to
  that multiple (0.3, not 0.30000000000000004); a whole-number q gives whole numbers as
  integers (`--batch 48`, not `48.0`, which `type=int` refuses), in every q-form.
- `qloguniform`: drawn as `loguniform`, then rounded to a multiple of q (the study's param
  is the draw before rounding).
- `normal`, `lognormal`, `qnormal`, `qlognormal`: Optuna has no such distribution: drawn here
  from a generator seeded by (the sweep's seed, the trial's number, the parameter's name), so
  that a resumed sweep and `--dry-run` draw the same values; recorded as a one-value
  `FloatDistribution(v, v)` param (Optuna keeps such a value as given), so it shows in the
  trial's params and plots.

Samplers: `random` and `random` with `rule: sobol` are expkit's own `PointSampler`, which
draws trial n's point from the seed and n alone (a seeded RandomState, or the n-th point of a
scrambled Sobol' sequence): the same trial number always gets the same values, whatever the
order trials are asked or resumed in, and `preview` shows exactly what the sweep runs.
`grid` is Optuna's GridSampler (trial n gets combination n of a seeded shuffle; `tell`
never stops the study); `bayesian`
is Optuna's TPESampler, its startup trials drawn by the same per-trial random sampler. A
sweep without a seed draws one once and keeps it in the study (`study.user_attrs["seed"]`).

Optuna is imported inside the functions: the CLI imports this module only to run a sweep.
"""

from __future__ import annotations

import math
import random
import zlib
from typing import TYPE_CHECKING, Any

from expkit.sweeps.spec import Parameter, clean_multiple

if TYPE_CHECKING:
    import optuna

    from expkit.job import JobSpec
    from expkit.sweeps.spec import SweepSpec

SEED_ATTR = "seed"  # the study's user attr holding the seed of a sweep that names none
VALUES_ATTR = "values"  # the trial's user attr holding the values its job got
_ADAPTER = ("normal", "lognormal", "qnormal", "qlognormal")


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for `spec.sampling`: per-trial seeded random or Sobol' points
    (`PointSampler`), GridSampler (every combination of the choices, each once), TPESampler
    (bayesian; its random startup trials drawn per trial too)."""
    import optuna

    sampling = spec.sampling
    if sampling.type == "grid":
        grid = {p.name: _categories(p) for p in spec.search_space}
        return _grid_sampler_class()(grid, seed=sampling.seed)
    points = _point_sampler_class()(spec)
    if sampling.type == "bayesian":
        tpe = optuna.samplers.TPESampler(seed=sampling.seed)
        if hasattr(tpe, "_random_sampler"):  # startup trials: the same per trial number
            tpe._random_sampler = points
        return tpe
    return points


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict[str, Any]:
    """The values trial `trial` runs with, {argument: value} (a paired choice expanded into
    its arguments), drawn through `trial` so that the study records them; also kept as the
    trial's user attr `values`. Call it right after `study.ask()`."""
    values: dict[str, Any] = {}
    for parameter in spec.search_space:
        value = _draw(trial, parameter, spec)
        if parameter.paired:
            values.update(value)
        else:
            values[parameter.name] = value
    trial.set_user_attr(VALUES_ATTR, values)
    return values


def trial_job(spec: SweepSpec, values: dict[str, Any]) -> JobSpec:
    """The job spec one trial runs: `spec.job` with `values` overriding its `args` (a dict's
    keys replaced or added, `lr` also matching an existing `--lr`; a list's `--name value`
    replaced or appended) and `limits.trial_timeout` as its `timeout` when that is shorter
    (or the job has none). Values keep their types, so the script gets `repr` of a float
    (`0.003`), `--flag` alone for true, nothing for false or null, as the job's own args."""
    job = spec.job
    args: dict[str, Any] | list[Any]
    if isinstance(job.args, dict):
        args = dict(job.args)
        for name, value in values.items():
            key = name
            if name not in args and not name.startswith("-"):
                key = next((k for k in (f"--{name}", f"-{name}") if k in args), name)
            args[key] = list(value) if isinstance(value, list) else value
    else:
        args = list(job.args)
        for name, value in values.items():
            args = _set_list_arg(args, name, value)
    timeout = job.timeout
    limit = spec.limits.trial_timeout
    if limit is not None and (timeout is None or limit < timeout):
        timeout = limit
    return job.replace(args=args, timeout=timeout)


def grid_size(spec: SweepSpec) -> int | None:
    """How many trials a grid sweep has (the product of the choices), None for the others."""
    if spec.sampling.type != "grid":
        return None
    return math.prod(len(p.values) for p in spec.search_space)


def preview(spec: SweepSpec, count: int) -> list[dict[str, Any]]:
    """The values of the first `count` trials the sweep would start (`--dry-run`), drawn
    from an in-memory study with the same sampler (the same ones when it is seeded, or for
    grid sampling; a bayesian sweep's later trials depend on the results). A grid gives at
    most its size."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    size = grid_size(spec)
    if size is not None:
        count = min(count, size)
    study = optuna.create_study(
        direction="maximize" if spec.objective.goal == "maximize" else "minimize",
        sampler=make_sampler(spec),
    )
    return [suggest(study.ask(), spec) for _ in range(count)]


# -- drawing one parameter ------------------------------------------------------------------------
def _categories(parameter: Parameter) -> list[Any]:
    """A choice's categories for Optuna: the values, or their indices when a value is not a
    scalar Optuna can store (a mapping, a list)."""
    if all(v is None or isinstance(v, bool | int | float | str) for v in parameter.values):
        return list(parameter.values)
    return list(range(len(parameter.values)))


def _draw(trial: optuna.Trial, parameter: Parameter, spec: SweepSpec) -> Any:
    name, kind = parameter.name, parameter.type
    if kind == "choice":
        categories = _categories(parameter)
        drawn = trial.suggest_categorical(name, categories)
        if categories == list(parameter.values):
            return drawn
        value = parameter.values[int(drawn)]
        return dict(value) if isinstance(value, dict) else list(value)
    if kind == "randint":
        assert parameter.upper is not None
        return trial.suggest_int(name, 0, parameter.upper - 1)
    if kind in _ADAPTER:
        value = _adapter_value(trial, parameter, spec)
        trial.suggest_float(name, value, value)  # one value: Optuna records it as given
        return value
    low, high = parameter.min_value, parameter.max_value
    assert low is not None and high is not None
    if kind == "uniform":
        return trial.suggest_float(name, low, high)
    if kind == "loguniform":
        return trial.suggest_float(name, math.exp(low), math.exp(high), log=True)
    q = parameter.q
    assert q is not None
    if kind == "quniform":
        first, last = round(low / q), round(high / q)
        if first == last:
            return clean_multiple(first, q)
        drawn = trial.suggest_float(
            name, clean_multiple(first, q), clean_multiple(last, q), step=float(repr(q))
        )
        return clean_multiple(round(drawn / q), q)
    # qloguniform
    drawn = trial.suggest_float(name, math.exp(low), math.exp(high), log=True)
    return clean_multiple(round(drawn / q), q)


def _adapter_value(trial: optuna.Trial, parameter: Parameter, spec: SweepSpec) -> float:
    """A normal-family value drawn here, seeded by (seed, trial number, parameter name)."""
    assert parameter.mu is not None and parameter.sigma is not None
    rng = random.Random(_trial_seed(sweep_seed(trial.study, spec), trial.number, parameter.name))
    value = rng.gauss(parameter.mu, parameter.sigma)
    if parameter.type in ("lognormal", "qlognormal"):
        value = math.exp(min(value, 709.0))
    if parameter.q is not None:
        value = clean_multiple(round(value / parameter.q), parameter.q)
    return value


def sweep_seed(study: optuna.Study, spec: SweepSpec) -> int:
    """The sweep's seed: the spec's, else one drawn on first use and kept in the study (so a
    resumed sweep goes on drawing from the same one)."""
    if spec.sampling.seed is not None:
        return spec.sampling.seed
    seed = study.user_attrs.get(SEED_ATTR)
    if not isinstance(seed, int):
        seed = random.SystemRandom().randrange(2**32)
        study.set_user_attr(SEED_ATTR, seed)
    return seed


def _trial_seed(seed: int, number: int, name: str) -> int:
    """One 64-bit seed from the sweep's seed, a trial number and a parameter's name."""
    return (seed * 1_000_003 + number) * 4_294_967_311 + zlib.crc32(name.encode())


# -- list args ------------------------------------------------------------------------------------
def _set_list_arg(args: list[Any], name: str, value: Any) -> list[Any]:
    """`args` (a command line as a list) with `--name` set to `value`, never dropping another
    token. The rule, as a list cannot say which tokens are a flag's:
    - `--name=old` is rewritten in place (true: bare `--name`; false or null: removed);
    - `--name` followed by a token that is not a flag: that ONE token is its value and is
      replaced (a list value by its items); a list value over several old tokens replaces
      the whole run up to the next flag (the spec refuses such args at load: see
      `list_arg_problem`);
    - a switch (true, false, null) keeps or adds the bare `--name` (true) or removes the
      `--name` token alone (false, null), leaving the token after it (`--amp data.csv`: a
      positional argument) in place, unless that token is a boolean word (`--amp false`),
      which is then the flag's value and is replaced by `True`/`False` (null removes both);
    - no `--name`: `--name value` appended (true: `--name`; false or null: nothing)."""
    flag = name if name.startswith("-") else f"--{name}"
    items = list(value) if isinstance(value, list) else [value]
    switch = value is True or value is False or value is None
    for i, token in enumerate(args):
        text = str(token)
        if text.startswith(f"{flag}="):
            if switch and not _is_bool_word(text[len(flag) + 1 :]):
                return args[:i] + ([flag] if value is True else []) + args[i + 1 :]
            if value is None:
                return args[:i] + args[i + 1 :]
            return [*args[:i], f"{flag}={' '.join(map(str, items))}", *args[i + 1 :]]
        if text != flag:
            continue
        end = i + 1
        while end < len(args) and not _is_flag(args[end]):
            end += 1
        if switch:
            if end > i + 1 and _is_bool_word(args[i + 1]):  # `--amp false`: its value
                if value is None:
                    return args[:i] + args[i + 2 :]
                return [*args[: i + 1], value, *args[i + 2 :]]
            return args if value is True else args[:i] + args[i + 1 :]
        if isinstance(value, list) and end > i + 2:
            return [*args[: i + 1], *items, *args[end:]]
        return [*args[: i + 1], *items, *args[min(i + 2, end) :]]
    if value is False or value is None:
        return args
    return [*args, flag] if value is True else [*args, flag, *items]


def list_arg_problem(args: list[Any], name: str, values: list[Any]) -> str | None:
    """Why `trial_job` cannot tell which of list `args`' tokens are `--name`'s old value
    when a list value is drawn (several tokens after `--name`: its value, or positional
    arguments?), or None."""
    if not any(isinstance(v, list) for v in values):
        return None
    flag = name if name.startswith("-") else f"--{name}"
    for i, token in enumerate(args):
        if str(token) != flag:
            continue
        end = i + 1
        while end < len(args) and not _is_flag(args[end]):
            end += 1
        if end > i + 2:
            shown = " ".join(str(t) for t in args[i + 1 : end])
            return (
                f"job.args has several tokens after {flag} ({shown}) and a list value is drawn "
                f"for it: expkit cannot tell its value from positional arguments; give {flag} "
                "one token in the job's args, or write args as a mapping"
            )
    return None


def _is_bool_word(token: Any) -> bool:
    """Whether a token is a boolean written out (`true`, `False`, `yes`, `no`, or a bool)."""
    return isinstance(token, bool) or str(token).lower() in ("true", "false", "yes", "no")


def _is_flag(token: Any) -> bool:
    """Whether a command-line token is an option (`--x`, `-x`), not a value (`-1`, `-.5`)."""
    text = str(token)
    if not text.startswith("-") or text == "-":
        return False
    try:
        float(text)
    except ValueError:
        return True
    return False


def _grid_sampler_class() -> type:
    """Optuna's GridSampler without its `study.stop()` once every combination started: that
    works inside `study.optimize` only (with ask and tell it raises from `tell`); the
    driver stops at `limits.max_total_trials`, the grid's size at most."""
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            return None

    return GridSampler


def _point_sampler_class() -> type:
    """PointSampler, defined on first use (it subclasses Optuna's BaseSampler)."""
    global _POINT_SAMPLER
    if _POINT_SAMPLER is None:
        _POINT_SAMPLER = _define_point_sampler()
    return _POINT_SAMPLER


_POINT_SAMPLER: type | None = None


def _define_point_sampler() -> type:
    import numpy as np
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    class PointSampler(optuna.samplers.BaseSampler):
        """Trial n's values from a point in [0, 1)^d that depends on the seed and n only: a
        RandomState seeded by (seed, n), or (`rule: sobol`) the n-th point of the Sobol'
        sequence scrambled by the seed. One dimension per parameter of the spec, mapped onto
        the parameter's distribution (categorical: equal slices of [0, 1))."""

        def __init__(self, spec: SweepSpec) -> None:
            self.spec = spec
            self.names = [p.name for p in spec.search_space]
            self._points: dict[tuple[int, int], Any] = {}

        def infer_relative_search_space(
            self, study: optuna.Study, trial: optuna.trial.FrozenTrial
        ) -> dict[str, Any]:
            return {}

        def sample_relative(
            self, study: optuna.Study, trial: optuna.trial.FrozenTrial, search_space: Any
        ) -> dict[str, Any]:
            return {}

        def sample_independent(
            self,
            study: optuna.Study,
            trial: optuna.trial.FrozenTrial,
            param_name: str,
            param_distribution: Any,
        ) -> Any:
            seed = sweep_seed(study, self.spec)
            if param_name in self.names:
                u = float(self._point(seed, trial.number)[self.names.index(param_name)])
            else:
                u = random.Random(_trial_seed(seed, trial.number, param_name)).random()
            return _from_unit(u, param_distribution)

        def _point(self, seed: int, number: int) -> Any:
            key = (seed, number)
            if key not in self._points:
                if len(self._points) > 1000:
                    self._points.clear()
                self._points[key] = self._make_point(seed, number)
            return self._points[key]

        def _make_point(self, seed: int, number: int) -> Any:
            d = max(1, len(self.names))
            if self.spec.sampling.rule == "sobol":
                import warnings

                from scipy.stats import qmc  # type: ignore[import-untyped, unused-ignore]

                engine = qmc.Sobol(d, scramble=True, seed=seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # balance warnings: one point at a time
                    if number:
                        engine.fast_forward(number)
                    return engine.random(1)[0]
            return np.random.RandomState(_trial_seed(seed, number, "") % 2**32).random_sample(d)

    def _from_unit(u: float, distribution: Any) -> Any:
        u = min(max(u, 0.0), math.nextafter(1.0, 0.0))
        if isinstance(distribution, CategoricalDistribution):
            choices = distribution.choices
            return choices[min(int(u * len(choices)), len(choices) - 1)]
        if isinstance(distribution, IntDistribution):
            first, last, step = distribution.low, distribution.high, distribution.step
            steps = (last - first) // step + 1
            return first + min(int(u * steps), steps - 1) * step
        if isinstance(distribution, FloatDistribution):
            low, high = distribution.low, distribution.high
            if distribution.single():
                return low
            if distribution.log:
                return min(high, math.exp(math.log(low) + u * (math.log(high) - math.log(low))))
            if distribution.step is not None:
                count = round((high - low) / distribution.step) + 1
                return min(high, low + min(int(u * count), count - 1) * distribution.step)
            return min(high, low + u * (high - low))
        raise TypeError(f"no draw for {distribution!r}")

    return PointSampler
