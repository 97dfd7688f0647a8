"""An Azure ML HyperDriveConfig (SDK v1) as an expkit sweep spec, in Azure ML v2's names.

    expkit import azureml hyperdrive.py -o sweep.yaml    # sweep.yaml + sweep-job.yaml (the trial)

The HyperDriveConfig is the real azureml-train-core object, built by the user's file (run offline
by the importer, see importer.py); what it holds is read from the JSON it would send to Azure
(`HyperParameterSampling.to_json()`, `EarlyTerminationPolicy.to_json()`), so any way of building
it converts the same. The mapping (Azure ML's "Hyperparameter tuning a model (v1)" and the v2
sweep job YAML schema, https://learn.microsoft.com/azure/machine-learning/reference-yaml-job-sweep):

    HyperDriveConfig                         sweep spec
    estimator= / run_config=                 job: the trial's job spec (importer.job_dict)
    {'--learning_rate': uniform(a, b)}       search_space: {learning_rate: {type: uniform,
                                               min_value: a, max_value: b}} (the argument's name
                                               without dashes, as the job's `args` name it)
    choice(...), randint(upper),             {type: choice, values}, {type: randint, upper},
    (q)uniform, (q)loguniform (exponents),   {min_value, max_value[, q]},
    (q)normal, (q)lognormal                  {mu, sigma[, q]}
    RandomParameterSampling(properties=)     sampling_algorithm: {type: random[, seed, rule]}
    GridParameterSampling                    {type: grid}
    BayesianParameterSampling                {type: bayesian}
    BanditPolicy(evaluation_interval,        early_termination: {type: bandit, slack_factor or
      slack_factor | slack_amount,             slack_amount, evaluation_interval,
      delay_evaluation)                        delay_evaluation}
    MedianStoppingPolicy                     {type: median_stopping, evaluation_interval, ...}
    TruncationSelectionPolicy                {type: truncation_selection, truncation_percentage,
                                               evaluation_interval, delay_evaluation}
    NoTerminationPolicy, policy=None         (no early_termination)
    primary_metric_name, primary_metric_goal objective: {primary_metric, goal: maximize|minimize}
    max_total_runs, max_concurrent_runs      limits: {max_total_trials, max_concurrent_trials}
    max_duration_minutes                     limits.timeout (seconds; the SDK's default of 10080
                                               minutes, its service limit, is not carried)

Not converted (a UserError naming it): a pipeline= HyperDriveConfig, warm starts (resume_from,
resume_child_runs), a sampling, policy or expression azureml-train-core does not define.
"""

from __future__ import annotations

from typing import Any

from expkit.plugin import UserError

WHAT = "HyperDriveConfig"
DEFAULT_MAX_DURATION_MINUTES = 10080  # azureml.train.hyperdrive.runconfig.MAX_DURATION_MINUTES

# HyperDrive's expression -> the v2 fields of its arguments, in order.
EXPRESSIONS: dict[str, tuple[str, ...]] = {
    "choice": ("values",),
    "randint": ("upper",),
    "uniform": ("min_value", "max_value"),
    "quniform": ("min_value", "max_value", "q"),
    "loguniform": ("min_value", "max_value"),
    "qloguniform": ("min_value", "max_value", "q"),
    "normal": ("mu", "sigma"),
    "qnormal": ("mu", "sigma", "q"),
    "lognormal": ("mu", "sigma"),
    "qlognormal": ("mu", "sigma", "q"),
}
# The sampling's and the policy's `name` in their to_json() -> the v2 type.
SAMPLINGS = {"RANDOM": "random", "GRID": "grid", "BAYESIANOPTIMIZATION": "bayesian"}
SAMPLING_CLASSES = {
    "random": "RandomParameterSampling",
    "grid": "GridParameterSampling",
    "bayesian": "BayesianParameterSampling",
}
RANDOM_PROPERTIES = ("seed", "rule")  # RandomParameterSampling(properties={...}): v2's own
POLICIES = {
    "BANDIT": "bandit",
    "MEDIANSTOPPING": "median_stopping",
    "TRUNCATIONSELECTION": "truncation_selection",
    "DEFAULT": None,  # NoTerminationPolicy
}
POLICY_FIELDS = {
    "bandit": ("slack_factor", "slack_amount", "evaluation_interval", "delay_evaluation"),
    "median_stopping": ("evaluation_interval", "delay_evaluation"),
    "truncation_selection": ("truncation_percentage", "evaluation_interval", "delay_evaluation"),
}
KNOWN_POLICIES = (
    "BanditPolicy, MedianStoppingPolicy, TruncationSelectionPolicy, NoTerminationPolicy"
)


def is_hyperdrive_config(obj: Any) -> bool:
    """Whether `obj` is azureml-train-core's HyperDriveConfig (or its old HyperDriveRunConfig)."""
    names = {(c.__module__.split(".")[0], c.__name__) for c in type(obj).__mro__}
    return ("azureml", "HyperDriveConfig") in names


def trial_object(config: Any) -> Any:
    """The estimator or ScriptRunConfig each trial of `config` runs; UserError for a pipeline."""
    if getattr(config, "_pipeline", None) is not None:
        raise UserError(
            f"{WHAT}: a pipeline= sweep is not converted; give it an estimator= or a "
            "run_config=ScriptRunConfig(...)"
        )
    trial = config._estimator if config._estimator is not None else config._run_config
    if trial is None:  # HyperDriveConfig itself refuses this; a hand-made object may not
        raise UserError(f"{WHAT}: it has neither an estimator nor a run_config to run as trials")
    return trial


def sweep_dict(config: Any, job: dict[str, Any], namespace: dict[str, Any]) -> dict[str, Any]:
    """The sweep spec (as a sweep.yaml's dict, `job` inline) of HyperDriveConfig `config`, whose
    trial's job spec is `job`. `namespace` (the user's module) only names the class of a policy
    or sampling that is not converted. Raises UserError for what is not converted."""
    if getattr(config, "_resume_from", None) or getattr(config, "_resume_child_runs", None):
        raise UserError(
            f"{WHAT}: warm starts (resume_from, resume_child_runs) are not converted; remove "
            "them, or continue an expkit sweep with `expkit sweeps resume SWEEP`"
        )
    generator = config._generator_config
    raw: dict[str, Any] = {"job": job}
    raw["search_space"] = search_space(generator["parameter_space"])
    raw["sampling_algorithm"] = sampling(generator, namespace)
    raw["objective"] = {
        "primary_metric": config._primary_metric_config["name"],
        "goal": str(config._primary_metric_config["goal"]).lower(),
    }
    policy = early_termination(config._policy_config, namespace)
    if policy is not None:
        raw["early_termination"] = policy
    raw["limits"] = limits(config)
    return raw


def search_space(parameter_space: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """HyperDrive's parameter space ({'--learning_rate': ['uniform', [a, b]]}) in v2's form,
    keyed by the argument's name without its dashes."""
    space: dict[str, dict[str, Any]] = {}
    for given, expression in parameter_space.items():
        name = str(given).lstrip("-")
        if not name:
            raise UserError(f"{WHAT}: parameter {given!r}: not an argument's name")
        if name in space:
            raise UserError(
                f"{WHAT}: parameters {given!r} and another name the same argument --{name}; "
                "keep one"
            )
        space[name] = parameter(given, expression)
    return space


def parameter(given: str, expression: Any) -> dict[str, Any]:
    """One expression (what `choice(...)`, `uniform(...)`, ... return: [kind, [arguments]])."""
    kind, arguments = _split(expression)
    fields = EXPRESSIONS.get(str(kind))
    if fields is None or len(arguments) != len(fields):
        shown = kind if fields is None else f"{kind} with {len(arguments)} arguments"
        raise UserError(
            f"{WHAT}: parameter {given!r}: the expression {shown!r} is not converted; use one "
            f"of azureml.train.hyperdrive's {', '.join(EXPRESSIONS)}"
        )
    result: dict[str, Any] = {"type": kind}
    for field, value in zip(fields, arguments, strict=True):
        result[field] = list(value) if field == "values" else value
    return result


def _split(expression: Any) -> tuple[Any, list[Any]]:
    if (
        isinstance(expression, list | tuple)
        and len(expression) == 2
        and isinstance(expression[1], list | tuple)
    ):
        return expression[0], list(expression[1])
    return type(expression).__name__, []


def sampling(generator: dict[str, Any], namespace: dict[str, Any]) -> dict[str, Any]:
    """`sampling_algorithm` of the sampling's JSON ({'name': 'RANDOM', 'properties': ...})."""
    name = str(generator.get("name", ""))
    kind = SAMPLINGS.get(name.upper())
    if kind is None:
        what = _class_named(namespace, "HyperParameterSampling", generator) or name
        raise UserError(
            f"{WHAT}: the sampling {what!r} is not converted; use RandomParameterSampling, "
            "GridParameterSampling or BayesianParameterSampling"
        )
    result: dict[str, Any] = {"type": kind}
    properties = dict(generator.get("properties") or {})
    if kind == "random":
        for key in RANDOM_PROPERTIES:
            if key in properties:
                result[key] = properties.pop(key)
    if properties:
        known = f" (it takes {', '.join(RANDOM_PROPERTIES)})" if kind == "random" else ""
        raise UserError(
            f"{WHAT}: {SAMPLING_CLASSES[kind]}'s properties {', '.join(map(str, properties))} "
            f"are not converted{known}; remove them"
        )
    return result


def early_termination(policy: dict[str, Any], namespace: dict[str, Any]) -> dict[str, Any] | None:
    """`early_termination` of the policy's JSON ({'name': 'Bandit', 'properties': {...}}), None
    for NoTerminationPolicy."""
    name = str(policy.get("name", ""))
    if name.upper() not in POLICIES:
        what = _class_named(namespace, "EarlyTerminationPolicy", policy) or name
        raise UserError(
            f"{WHAT}: the early termination policy {what!r} is not converted; use one of "
            f"{KNOWN_POLICIES}"
        )
    kind = POLICIES[name.upper()]
    if kind is None:
        return None
    properties = dict(policy.get("properties") or {})
    if properties.pop("exclude_finished_jobs", False):
        raise UserError(
            f"{WHAT}: TruncationSelectionPolicy's exclude_finished_jobs is not converted; the "
            "lowest trials are ranked among all that reported at that interval"
        )
    result: dict[str, Any] = {"type": kind}
    for key in POLICY_FIELDS[kind]:
        if properties.get(key) is not None:
            result[key] = properties.pop(key)
        else:
            properties.pop(key, None)
    if properties:
        raise UserError(
            f"{WHAT}: the {kind} policy's {', '.join(map(str, properties))} is not converted"
        )
    return result


def limits(config: Any) -> dict[str, Any]:
    """`limits` of the run counts and max_duration_minutes (as seconds)."""
    result: dict[str, Any] = {"max_total_trials": config._max_total_runs}
    result["max_concurrent_trials"] = config._max_concurrent_runs or config._max_total_runs
    minutes = config._max_duration_minutes
    if minutes and minutes < DEFAULT_MAX_DURATION_MINUTES:  # over it, Azure ML caps it there
        result["timeout"] = int(minutes * 60) if float(minutes).is_integer() else minutes * 60
    return result


def _class_named(namespace: dict[str, Any], base: str, json: dict[str, Any]) -> str | None:
    """The class name of the object in the user's module whose to_json() is `json` (a policy or
    sampling of the user's own), None if none is."""
    for value in namespace.values():
        if base not in {c.__name__ for c in type(value).__mro__}:
            continue
        try:
            if value.to_json() == json:
                return type(value).__name__
        except Exception:  # a user's class may not serialize; it is not ours
            continue
    return None
