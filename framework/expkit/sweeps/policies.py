"""Early termination: Azure ML's policies and Optuna's halving pruners, each saying why.

The driver reports each value a trial logs of the primary metric as an intermediate value,
step 1, 2, 3... (Azure ML's "intervals": "each time the training script logs the primary metric
counts as one interval"), then asks the policy about that trial (`Policy.reason`). Unlike Azure
ML, the comparison is with every other trial's values at that step, running or finished
(COMPLETE or PRUNED; failed trials are left out), so trials are terminated in the first
concurrent batch too, as soon as another trial has a value at that step. A trial alone at a
step is never stopped.

When Azure ML's policies look (`evaluation_interval`, `delay_evaluation`): "the policy applies
every multiple of evaluation_interval that is greater than or equal to delay_evaluation"
(azureml.train.hyperdrive.BanditPolicy, MedianStoppingPolicy, TruncationSelectionPolicy,
https://learn.microsoft.com/python/api/azureml-train-core/azureml.train.hyperdrive.banditpolicy).
So the evaluation points are the steps s >= max(1, delay_evaluation) with s % interval == 0:
interval 1 and delay 5 look at steps 5, 6, 7...; interval 100 and delay 200 first look at
step 200; delay 0 looks from step 1 on. An interval below 1 (Azure ML v2's default 0) counts as 1.

Several steps may arrive between two questions (the driver reads the run history in polls):
`reason` evaluates every evaluation point the trial has reached that was not evaluated yet, in
order, each with what is known then (the other trials' values at that step), and stops at the
first that fails. A point is evaluated once: a later trial reaching it does not re-open it.
Which step was evaluated last, and the reason once given, are kept in the trial's system
attributes (keys `expkit:policy_step`, `expkit:policy_reason`) so a resumed driver neither
evaluates a point twice nor forgets a verdict; a trial once given a reason keeps it.

NaN values are ignored as if never logged: a trial is not evaluated at a step whose value is
NaN, its NaN values count in no best, average or rank, and another trial whose value at the step
is NaN takes no part in the comparison there. (Optuna's own pruners prune on NaN; ours do not:
the halving pruners are shown the trial without its NaN values.)
"""

from __future__ import annotations

import copy
import math
import statistics
from typing import TYPE_CHECKING

import optuna
from optuna.pruners import HyperbandPruner, NopPruner, SuccessiveHalvingPruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    from expkit.sweeps.spec import EarlyTermination, SweepSpec

STEP_KEY = "expkit:policy_step"
REASON_KEY = "expkit:policy_reason"
# The trials another trial is compared with: running ones and those that finished normally or
# were stopped; failed trials (crashed, canceled by the user or a limit) are left out.
COMPARED = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)


def make_pruner(spec: SweepSpec) -> Policy:
    """The pruner for `spec.early_termination`: a `Policy` (an Optuna pruner whose
    `reason(study, trial)` says why a trial stops, None while it goes on). No early
    termination gives a pruner that never stops a trial. Raises ValueError for a policy whose
    required field is missing (the spec's validation should have said so first)."""
    return make_policy(spec.early_termination)


def make_policy(policy: EarlyTermination | None) -> Policy:
    """The `Policy` for one `early_termination` section (None: never stops)."""
    if policy is None:
        return Never()
    kind = policy.type
    if kind == "bandit":
        if policy.slack_factor is None and policy.slack_amount is None:
            raise ValueError("bandit needs slack_factor or slack_amount")
        return Bandit(
            policy.evaluation_interval,
            policy.delay_evaluation,
            slack_factor=policy.slack_factor,
            slack_amount=policy.slack_amount,
        )
    if kind == "median_stopping":
        return MedianStopping(policy.evaluation_interval, policy.delay_evaluation)
    if kind == "truncation_selection":
        if policy.truncation_percentage is None:
            raise ValueError("truncation_selection needs truncation_percentage")
        return TruncationSelection(
            policy.evaluation_interval, policy.delay_evaluation, policy.truncation_percentage
        )
    if kind == "successive_halving":
        return SuccessiveHalving(
            min_resource=policy.min_resource if policy.min_resource is not None else "auto",
            reduction_factor=policy.reduction_factor,
        )
    if kind == "hyperband":
        return Hyperband(
            min_resource=policy.min_resource if policy.min_resource is not None else 1,
            max_resource=policy.max_resource if policy.max_resource is not None else "auto",
            reduction_factor=policy.reduction_factor,
        )
    raise ValueError(f"unknown early termination policy {kind!r}")


def fmt(value: float) -> str:
    """A metric value in a reason: 4 significant digits, no trailing zeros (0.8, 0.7273)."""
    return f"{value:.4g}"


class Policy(optuna.pruners.BasePruner):
    """An Optuna pruner that says why: `reason(study, trial)` is None while the trial goes on,
    else the text the trial's run is canceled with ("early termination: bandit, step 3: ...");
    `prune` is `reason(...) is not None`, so Optuna's `Trial.should_prune` agrees with it.

    The verdict is remembered per trial (in memory and in the trial's system attributes), so
    asking twice, or from a resumed driver, gives the same answer and never evaluates a step
    twice."""

    name = "policy"

    def __init__(self) -> None:
        self._seen: dict[tuple[int, int, int], tuple[int, str | None]] = {}

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        """Optuna's question: whether `trial` stops now (see `reason`)."""
        return self.reason(study, trial) is not None

    def reason(self, study: optuna.Study, trial: FrozenTrial) -> str | None:
        """Why `trial` is terminated, or None while it goes on; evaluates the steps it reported
        since the last question (see the module docstring)."""
        trial = _fresh(study, trial)
        key = (id(study._storage), study._study_id, trial._trial_id)
        last, said = self._seen.get(key, (0, None))
        stored_step = trial.system_attrs.get(STEP_KEY)
        if isinstance(stored_step, int) and stored_step > last:
            last = stored_step
        stored_reason = trial.system_attrs.get(REASON_KEY)
        if said is None and isinstance(stored_reason, str):
            said = stored_reason
        if said is not None:
            return said
        latest = trial.last_step
        if latest is None or latest <= last:
            return None
        said = self._judge(study, trial, last)
        self._remember(study, trial, key, latest, said)
        return said

    def _judge(self, study: optuna.Study, trial: FrozenTrial, after: int) -> str | None:
        """The reason for the steps of `trial` after step `after`, or None."""
        raise NotImplementedError

    def _remember(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        key: tuple[int, int, int],
        step: int,
        said: str | None,
    ) -> None:
        self._seen[key] = (step, said)
        if trial.state != TrialState.RUNNING:
            return  # a finished trial's attributes can no longer be written
        study._storage.set_trial_system_attr(trial._trial_id, STEP_KEY, step)
        if said is not None:
            study._storage.set_trial_system_attr(trial._trial_id, REASON_KEY, said)


class Never(Policy, NopPruner):
    """No early termination (Optuna's NopPruner): every trial runs to its end."""

    name = "none"

    def _judge(self, study: optuna.Study, trial: FrozenTrial, after: int) -> str | None:
        return None


class _AzurePolicy(Policy):
    """What Azure ML's three policies share: the evaluation points, the comparison at a step
    with every other trial that has a value there, the study's direction."""

    def __init__(self, evaluation_interval: int = 1, delay_evaluation: int = 0) -> None:
        super().__init__()
        self.evaluation_interval = max(1, evaluation_interval)
        self.delay_evaluation = max(0, delay_evaluation)

    def is_evaluation_point(self, step: int) -> bool:
        """Whether the policy looks at `step` (1-based): a multiple of evaluation_interval
        that is >= delay_evaluation (Azure ML's rule), and >= 1."""
        return step >= max(1, self.delay_evaluation) and step % self.evaluation_interval == 0

    def _judge(self, study: optuna.Study, trial: FrozenTrial, after: int) -> str | None:
        maximize = study.direction == StudyDirection.MAXIMIZE
        others = [
            t.intermediate_values
            for t in study.get_trials(deepcopy=False, states=COMPARED)
            if t.number != trial.number
        ]
        own = trial.intermediate_values
        for step in sorted(own):
            if step <= after or not self.is_evaluation_point(step) or math.isnan(own[step]):
                continue
            there = [values for values in others if _finite_at(values, step)]
            if not there:
                continue  # alone at this step: nothing to compare with
            why = self._at(step, own, there, maximize)
            if why is not None:
                return f"early termination: {self.name}, step {step}: {why}"
        return None

    def _at(
        self, step: int, own: dict[int, float], others: list[dict[int, float]], maximize: bool
    ) -> str | None:
        """Why the trial with values `own` stops at `step` given the other trials' values
        (each with a finite value at `step`), or None."""
        raise NotImplementedError


class Bandit(_AzurePolicy):
    """Azure ML's BanditPolicy: "Any run that doesn't fall within the slack factor or slack
    amount of the evaluation metric with respect to the best performing run will be
    terminated." With slack_factor 0.2 and the best run at 0.8, a run whose best so far is Y is
    canceled if Y + Y * 0.2 < 0.8, i.e. Y < 0.8 / 1.2; with slack_amount 0.2, if Y < 0.8 - 0.2
    (azureml.train.hyperdrive.BanditPolicy, remarks;
    https://learn.microsoft.com/python/api/azureml-train-core/azureml.train.hyperdrive.banditpolicy).

    Here, at step s: Y is the trial's best value up to s; the best is the best, over the other
    trials with a value at s, of their best up to s. Maximize: stop if Y < best / (1 +
    slack_factor), or Y < best - slack_amount; minimize: stop if Y > best * (1 + slack_factor),
    or Y > best + slack_amount. For a negative best the factor applies to its magnitude
    (best - |best| * f / (1 + f), best + |best| * f), so the slack is always on the worse side
    (Azure's formula is the same for a positive best, the usual accuracy or loss)."""

    name = "bandit"

    def __init__(
        self,
        evaluation_interval: int = 1,
        delay_evaluation: int = 0,
        *,
        slack_factor: float | None = None,
        slack_amount: float | None = None,
    ) -> None:
        super().__init__(evaluation_interval, delay_evaluation)
        if (slack_factor is None) == (slack_amount is None):
            raise ValueError("bandit takes one of slack_factor and slack_amount")
        self.slack_factor = slack_factor
        self.slack_amount = slack_amount

    def bound(self, best: float, maximize: bool) -> float:
        """The worst best-so-far a trial may have and go on, given the best trial's."""
        if self.slack_factor is not None:
            f = self.slack_factor
            return best - abs(best) * f / (1 + f) if maximize else best + abs(best) * f
        assert self.slack_amount is not None
        return best - self.slack_amount if maximize else best + self.slack_amount

    def _at(
        self, step: int, own: dict[int, float], others: list[dict[int, float]], maximize: bool
    ) -> str | None:
        pick = max if maximize else min
        mine = pick(_finite_upto(own, step))
        best = pick(pick(_finite_upto(values, step)) for values in others)
        bound = self.bound(best, maximize)
        if (mine < bound) if maximize else (mine > bound):
            side = "below" if maximize else "above"
            return f"{fmt(mine)} outside slack of best {fmt(best)} ({side} {fmt(bound)})"
        return None


class MedianStopping(_AzurePolicy):
    """Azure ML's MedianStoppingPolicy: "a run will be canceled at interval N if its best
    primary metric reported up to interval N is worse than the median of the running averages
    for intervals 1:N across all runs" (azureml.train.hyperdrive.MedianStoppingPolicy; inspired
    by Google Vizier's median stopping rule;
    https://azure.github.io/azureml-sdk-for-r/reference/median_stopping_policy.html).

    Here the median is over the other trials with a value at step N (as Vizier's rule compares
    with other trials), each one's running average being the mean of its values at steps 1..N;
    "worse" is strict (below the median when maximizing, above when minimizing)."""

    name = "median_stopping"

    def _at(
        self, step: int, own: dict[int, float], others: list[dict[int, float]], maximize: bool
    ) -> str | None:
        mine = (max if maximize else min)(_finite_upto(own, step))
        median = statistics.median(statistics.fmean(_finite_upto(v, step)) for v in others)
        if (mine < median) if maximize else (mine > median):
            return (
                f"{fmt(mine)} worse than median {fmt(median)} of {len(others)} other trials' "
                "running averages"
            )
        return None


class TruncationSelection(_AzurePolicy):
    """Azure ML's TruncationSelectionPolicy: "cancels a given percentage of lowest performing
    runs at each evaluation interval ... when evaluating a run at a interval N, its performance
    is only compared with the performance of other runs up to interval N even if they reported
    metrics for intervals greater than N" (azureml.train.hyperdrive.TruncationSelectionPolicy;
    https://learn.microsoft.com/python/api/azureml-train-core/azureml.train.hyperdrive.truncationselectionpolicy).

    Here, at step N, the trial's value at N is ranked among the n trials with a value at N
    (itself included; finished trials too: Azure ML's TruncationSelectionPolicy classes, v1
    and v2, have no parameter to leave them out). It is in the lowest X % when the k trials as
    bad as or worse than it, itself included, are at most X % of n (k * 100 <= X * n): with 5
    trials and 20 %, the worst one; with 4 trials and 20 %, none (the worst is at 25 %); tied
    trials count against each other, so ties never stop more than X %."""

    name = "truncation_selection"

    def __init__(
        self, evaluation_interval: int = 1, delay_evaluation: int = 0, percentage: float = 0
    ) -> None:
        super().__init__(evaluation_interval, delay_evaluation)
        if not 0 < percentage < 100:
            raise ValueError("truncation_percentage must be between 0 and 100")
        self.percentage = percentage

    def _at(
        self, step: int, own: dict[int, float], others: list[dict[int, float]], maximize: bool
    ) -> str | None:
        mine = own[step]
        values = [v[step] for v in others] + [mine]
        as_bad = sum(1 for v in values if (v <= mine if maximize else v >= mine))
        if as_bad * 100 <= self.percentage * len(values):
            return f"{fmt(mine)} in the lowest {fmt(self.percentage)}% of {len(values)} trials"
        return None


class _Halving(Policy):
    """What the two Optuna halving pruners share: Optuna decides (the trial's latest value
    against the values other trials had at each rung it reached), this class says why."""

    def _decide(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        raise NotImplementedError

    def _judge(self, study: optuna.Study, trial: FrozenTrial, after: int) -> str | None:
        shown = _without_nan(trial)
        if shown.last_step is None or shown.last_step <= after:
            return None  # only NaN since the last question
        if not self._decide(study, shown):
            return None
        return self._why(study, shown)

    def _rung_of(self, study: optuna.Study, trial: FrozenTrial) -> int:
        attrs = study._storage.get_trial(trial._trial_id).system_attrs
        rung = 0
        while f"completed_rung_{rung + 1}" in attrs:
            rung += 1
        return rung

    def _competing(
        self, study: optuna.Study, trial: FrozenTrial, rung: int
    ) -> tuple[list[float], int, int]:
        """The values at `rung` (the trial's own included), the reduction factor, and the step
        at which the rung is reached."""
        raise NotImplementedError

    def _why(self, study: optuna.Study, trial: FrozenTrial) -> str:
        rung = self._rung_of(study, trial)
        values, factor, step = self._competing(study, trial, rung)
        value = trial.intermediate_values[trial.last_step or 0]
        maximize = study.direction == StudyDirection.MAXIMIZE
        keep = max(1, len(values) // factor)
        cut = sorted(values, reverse=maximize)[keep - 1]
        return (
            f"early termination: {self.name}, step {trial.last_step}: {fmt(value)} not in the "
            f"top 1/{factor} of rung {rung} (step {step}, {len(values)} trials, "
            f"{'at least' if maximize else 'at most'} {fmt(cut)})"
        )


class SuccessiveHalving(_Halving, SuccessiveHalvingPruner):
    """Optuna's SuccessiveHalvingPruner (asynchronous successive halving, as Ray Tune's ASHA):
    rung r is reached at step min_resource * reduction_factor ** r; a trial reaching a rung
    goes on only if its value is in the top 1 / reduction_factor of the values all trials had
    there, the best one always (the first reduction_factor - 1 trials: only the best); see
    https://optuna.readthedocs.io (optuna.pruners.SuccessiveHalvingPruner). evaluation_interval
    and delay_evaluation do not apply: the rungs say when it looks."""

    name = "successive_halving"

    def __init__(self, min_resource: str | int = "auto", reduction_factor: int = 3) -> None:
        Policy.__init__(self)
        SuccessiveHalvingPruner.__init__(
            self, min_resource=min_resource, reduction_factor=reduction_factor
        )

    def _decide(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return SuccessiveHalvingPruner.prune(self, study, trial)

    def _competing(
        self, study: optuna.Study, trial: FrozenTrial, rung: int
    ) -> tuple[list[float], int, int]:
        key = f"completed_rung_{rung}"
        values = [
            float(t.system_attrs[key])
            for t in study.get_trials(deepcopy=False)
            if key in t.system_attrs
        ]
        step = int(self._min_resource or 1) * self._reduction_factor ** (
            self._min_early_stopping_rate + rung
        )
        return values, self._reduction_factor, step


class Hyperband(_Halving, HyperbandPruner):
    """Optuna's HyperbandPruner: several successive-halving brackets (from min_resource to
    max_resource steps, each trial in one bracket by its number), a trial compared only with
    the trials of its bracket; see https://optuna.readthedocs.io (optuna.pruners.HyperbandPruner).
    With max_resource "auto" it waits for a completed trial to size its brackets, so give the
    number of steps a trial logs. evaluation_interval and delay_evaluation do not apply."""

    name = "hyperband"

    def __init__(
        self,
        min_resource: int = 1,
        max_resource: str | int = "auto",
        reduction_factor: int = 3,
    ) -> None:
        Policy.__init__(self)
        HyperbandPruner.__init__(
            self,
            min_resource=min_resource,
            max_resource=max_resource,
            reduction_factor=reduction_factor,
        )

    def _decide(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return HyperbandPruner.prune(self, study, trial)

    def bracket(self, study: optuna.Study, trial: FrozenTrial) -> int:
        """The bracket `trial` is in (0: the most aggressive)."""
        return self._get_bracket_id(study, trial)

    def _competing(
        self, study: optuna.Study, trial: FrozenTrial, rung: int
    ) -> tuple[list[float], int, int]:
        bracket = self.bracket(study, trial)
        key = f"completed_rung_{rung}"
        values = [
            float(t.system_attrs[key])
            for t in study.get_trials(deepcopy=False)
            if key in t.system_attrs and self._get_bracket_id(study, t) == bracket
        ]
        step = self._min_resource * self._reduction_factor ** (bracket + rung)
        return values, self._reduction_factor, step

    def _why(self, study: optuna.Study, trial: FrozenTrial) -> str:
        return f"{super()._why(study, trial)} of bracket {self.bracket(study, trial)}"


def _fresh(study: optuna.Study, trial: FrozenTrial) -> FrozenTrial:
    """The trial as stored now (the caller's copy may predate its latest reports)."""
    try:
        return study._storage.get_trial(trial._trial_id)
    except KeyError:
        return trial


def _finite_at(values: dict[int, float], step: int) -> bool:
    return step in values and not math.isnan(values[step])


def _finite_upto(values: dict[int, float], step: int) -> list[float]:
    return [v for s, v in values.items() if s <= step and not math.isnan(v)]


def _without_nan(trial: FrozenTrial) -> FrozenTrial:
    """A copy of `trial` without its NaN intermediate values (same id, same attributes)."""
    if not any(math.isnan(v) for v in trial.intermediate_values.values()):
        return trial
    shown = copy.copy(trial)
    shown.intermediate_values = {
        s: v for s, v in trial.intermediate_values.items() if not math.isnan(v)
    }
    return shown
