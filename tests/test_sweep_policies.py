"""Early termination policies on real Optuna studies, with report sequences computed by hand.

Each test drives a study as the sweep driver does: a trial per `study.ask()`, each value the
trial logs reported at step 1, 2, 3... (`trial.report`), then `policy.reason(study, trial)`;
a trial given a reason is told PRUNED (its values stay in the study, as a canceled run's do).
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from expkit.job import JobSpec
from expkit.sweeps.policies import (
    Bandit,
    Hyperband,
    MedianStopping,
    Never,
    Policy,
    SuccessiveHalving,
    TruncationSelection,
    make_policy,
    make_pruner,
)
from expkit.sweeps.spec import EarlyTermination, Objective, SweepSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)
NAN = float("nan")


def new_study(
    policy: optuna.pruners.BasePruner, direction: str = "maximize", storage: object = None
) -> optuna.Study:
    return optuna.create_study(
        storage=storage,  # type: ignore[arg-type]
        study_name="s",
        direction=direction,
        pruner=policy,
    )


def lockstep(
    policy: Policy,
    curves: list[list[float]],
    direction: str = "maximize",
    storage: object = None,
) -> dict[int, str]:
    """All trials running at once (the first concurrent batch): each round every trial still
    running reports its next value, then each is asked in turn. Returns {trial: reason}."""
    study = new_study(policy, direction, storage)
    trials = [study.ask() for _ in curves]
    stopped: dict[int, str] = {}
    for step in range(1, max(len(c) for c in curves) + 1):
        for i, curve in enumerate(curves):
            if i not in stopped and step <= len(curve):
                trials[i].report(curve[step - 1], step)
        for i, curve in enumerate(curves):
            if i in stopped or step > len(curve):
                continue
            why = policy.reason(study, study.trials[trials[i].number])
            if why is not None:
                stopped[i] = why
                study.tell(trials[i], state=TrialState.PRUNED)
    for i, curve in enumerate(curves):
        if i not in stopped:
            study.tell(trials[i], curve[-1])
    return stopped


def one_by_one(
    policy: Policy,
    curves: list[list[float]],
    direction: str = "maximize",
    storage: object = None,
    rounds: tuple[int, ...] = (),
) -> dict[int, str]:
    """Each trial in turn reports its steps up to each bound in `rounds` (all its steps at
    once when empty), asked after each batch: the order successive halving depends on."""
    study = new_study(policy, direction, storage)
    trials = [study.ask() for _ in curves]
    stopped: dict[int, str] = {}
    done = [0] * len(curves)
    for bound in rounds or (max(len(c) for c in curves),):
        for i, curve in enumerate(curves):
            if i in stopped:
                continue
            for step in range(done[i] + 1, min(bound, len(curve)) + 1):
                trials[i].report(curve[step - 1], step)
            done[i] = min(bound, len(curve))
            why = policy.reason(study, study.trials[trials[i].number])
            if why is not None:
                stopped[i] = why
                study.tell(trials[i], state=TrialState.PRUNED)
    return stopped


def flip(curves: list[list[float]]) -> list[list[float]]:
    """The same race for a metric to minimize (1 - value)."""
    return [[round(1 - v, 10) for v in curve] for curve in curves]


# --- Bandit ---------------------------------------------------------------------------------


def test_bandit_slack_factor_maximize_stops_outside_best_over_one_plus_factor() -> None:
    # step 1: best of the others for C is 0.6, 0.6 / 1.2 = 0.5, C's 0.4 is below: stopped;
    # A's 0.5 is not below 0.5 (B's 0.6 / 1.2): goes on. step 2: B's best 0.62 < 0.8 / 1.2.
    stopped = lockstep(
        Bandit(slack_factor=0.2), [[0.5, 0.8, 0.85], [0.6, 0.62, 0.7], [0.4, 0.5, 0.9]]
    )
    assert stopped == {
        2: "early termination: bandit, step 1: 0.4 outside slack of best 0.6 (below 0.5)",
        1: "early termination: bandit, step 2: 0.62 outside slack of best 0.8 (below 0.6667)",
    }


def test_bandit_slack_factor_minimize_stops_above_best_times_one_plus_factor() -> None:
    # step 1: C's 1.3 > 1.0 * 1.2; step 2: B's best 1.0 > A's 0.8 * 1.2 = 0.96.
    stopped = lockstep(
        Bandit(slack_factor=0.2), [[1.0, 0.8], [1.1, 1.0], [1.3, 1.25]], direction="minimize"
    )
    assert stopped == {
        2: "early termination: bandit, step 1: 1.3 outside slack of best 1 (above 1.2)",
        1: "early termination: bandit, step 2: 1 outside slack of best 0.8 (above 0.96)",
    }


def test_bandit_slack_amount_both_directions() -> None:
    up = lockstep(Bandit(slack_amount=0.1), [[0.7, 0.9], [0.65, 0.75], [0.55, 0.6]])
    assert up == {
        2: "early termination: bandit, step 1: 0.55 outside slack of best 0.7 (below 0.6)",
        1: "early termination: bandit, step 2: 0.75 outside slack of best 0.9 (below 0.8)",
    }
    down = lockstep(
        Bandit(slack_amount=0.1), [[0.5, 0.3], [0.55, 0.45], [0.7, 0.6]], direction="minimize"
    )
    assert down == {
        2: "early termination: bandit, step 1: 0.7 outside slack of best 0.5 (above 0.6)",
        1: "early termination: bandit, step 2: 0.45 outside slack of best 0.3 (above 0.4)",
    }


def test_bandit_compares_best_so_far_not_the_latest_value() -> None:
    # A drops to 0.5 at step 2 but its best so far (0.9) is the best: nobody is stopped.
    assert lockstep(Bandit(slack_factor=0.1), [[0.9, 0.5], [0.85, 0.86]]) == {}


def test_bandit_slack_of_a_negative_best_is_on_the_worse_side() -> None:
    # Maximizing a negative metric: best -1.0, factor 0.25: bound -1 - 1 * 0.25 / 1.25 = -1.2.
    assert lockstep(Bandit(slack_factor=0.25), [[-1.0], [-1.1]]) == {}
    stopped = lockstep(Bandit(slack_factor=0.25), [[-1.0], [-1.3]])
    assert stopped == {
        1: "early termination: bandit, step 1: -1.3 outside slack of best -1 (below -1.2)"
    }


@pytest.mark.parametrize(
    ("interval", "delay", "first"),
    [(1, 0, 1), (1, 5, 5), (3, 0, 3), (2, 3, 4), (2, 4, 4), (4, 2, 4), (3, 4, 6)],
)
def test_evaluation_interval_and_delay_evaluation_as_azure_defines_them(
    interval: int, delay: int, first: int
) -> None:
    # "the policy applies every multiple of evaluation_interval that is greater than or equal
    # to delay_evaluation": B is hopeless from step 1 and is stopped at the first such step.
    stopped = lockstep(Bandit(interval, delay, slack_factor=0.2), [[0.9] * 8, [0.1] * 8])
    assert list(stopped) == [1]
    assert stopped[1].startswith(f"early termination: bandit, step {first}: 0.1 outside")


def test_a_trial_that_recovers_before_the_first_evaluation_goes_on() -> None:
    curves = [[0.9] * 4, [0.1, 0.1, 0.1, 0.85]]
    assert lockstep(Bandit(2, 3, slack_factor=0.2), curves) == {}  # first looks at step 4
    assert list(lockstep(Bandit(2, 0, slack_factor=0.2), curves)) == [1]  # looks at step 2


def test_several_new_steps_each_evaluation_point_evaluated_once() -> None:
    policy = Bandit(evaluation_interval=2, slack_factor=0.2)
    study = new_study(policy)
    a, b = study.ask(), study.ask()
    for step, value in enumerate([0.9, 0.9, 0.9, 0.9], 1):
        a.report(value, step)
    assert policy.reason(study, study.trials[0]) is None  # alone at steps 2 and 4
    # B's steps 1-3 arrive at once: step 3 is no evaluation point, step 2 is and fails.
    for step, value in enumerate([0.1, 0.1, 0.9], 1):
        b.report(value, step)
    why = policy.reason(study, study.trials[1])
    assert why == "early termination: bandit, step 2: 0.1 outside slack of best 0.9 (below 0.75)"
    assert policy.reason(study, study.trials[1]) == why  # asked again: the same verdict
    assert b.should_prune()  # Optuna's own question agrees


def test_an_evaluation_point_passed_alone_is_not_reopened() -> None:
    policy = Bandit(evaluation_interval=2, slack_factor=0.2)
    study = new_study(policy)
    a, b = study.ask(), study.ask()
    a.report(0.5, 1)
    a.report(0.5, 2)
    assert policy.reason(study, study.trials[0]) is None  # step 2, alone
    b.report(0.9, 1)
    b.report(0.9, 2)
    assert policy.reason(study, study.trials[1]) is None
    a.report(0.5, 3)  # no evaluation point: step 2 is not looked at again
    assert policy.reason(study, study.trials[0]) is None
    a.report(0.5, 4)  # B has no step 4 yet
    assert policy.reason(study, study.trials[0]) is None
    b.report(0.9, 3)
    b.report(0.9, 4)
    assert policy.reason(study, study.trials[1]) is None
    a.report(0.5, 5)
    a.report(0.5, 6)
    b.report(0.9, 5)
    b.report(0.9, 6)
    assert policy.reason(study, study.trials[0]) == (
        "early termination: bandit, step 6: 0.5 outside slack of best 0.9 (below 0.75)"
    )


def test_finished_trials_count_failed_ones_do_not() -> None:
    for state, expected in ((TrialState.COMPLETE, True), (TrialState.FAIL, False)):
        policy = Bandit(slack_factor=0.2)
        study = new_study(policy)
        done = study.ask()
        done.report(0.9, 1)
        done.report(0.9, 2)
        study.tell(done, 0.9 if state == TrialState.COMPLETE else None, state=state)
        trial = study.ask()
        trial.report(0.5, 1)
        why = policy.reason(study, study.trials[1])
        assert (why is not None) == expected, state
        if expected:
            assert why == (
                "early termination: bandit, step 1: 0.5 outside slack of best 0.9 (below 0.75)"
            )


def test_the_first_batch_all_running_is_terminated_as_soon_as_a_comparison_exists() -> None:
    policy = Bandit(slack_factor=0.1)
    study = new_study(policy)
    a, b = study.ask(), study.ask()
    a.report(0.3, 1)
    assert policy.reason(study, study.trials[0]) is None  # alone at step 1
    b.report(0.9, 1)
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.RUNNING]
    assert policy.reason(study, study.trials[1]) is None
    a.report(0.3, 2)
    b.report(0.9, 2)
    assert policy.reason(study, study.trials[0]) == (
        "early termination: bandit, step 2: 0.3 outside slack of best 0.9 (below 0.8182)"
    )


ALL = {
    "bandit": lambda: Bandit(slack_factor=0.01),
    "median_stopping": MedianStopping,
    "truncation_selection": lambda: TruncationSelection(percentage=99),
    "successive_halving": lambda: SuccessiveHalving(min_resource=1),
    "hyperband": lambda: Hyperband(min_resource=1, max_resource=9),
}


@pytest.mark.parametrize("name", list(ALL))
def test_a_trial_alone_is_never_stopped(name: str) -> None:
    curve = [0.0, 0.01, 0.0, 0.02, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert one_by_one(ALL[name](), [curve]) == {}
    assert one_by_one(ALL[name](), [[5.0, 9.0, 1.0]], "minimize", rounds=(1, 2, 3)) == {}


def test_nan_values_are_ignored() -> None:
    # Step 1: A's NaN is no value: B has nobody to compare with, A is not evaluated there.
    stopped = lockstep(Bandit(slack_factor=0.2), [[NAN, 0.9], [0.1, 0.1]])
    assert stopped == {
        1: "early termination: bandit, step 2: 0.1 outside slack of best 0.9 (below 0.75)"
    }
    # A NaN best-so-far never wins: A's values up to step 2 are NaN and 0.5.
    assert lockstep(Bandit(slack_factor=0.2), [[NAN, 0.5], [0.45, 0.45]]) == {}
    # Optuna's halving pruners would prune a NaN; ours skip it.
    assert one_by_one(SuccessiveHalving(min_resource=1), [[0.8], [0.9], [NAN]]) == {}


# --- median stopping ------------------------------------------------------------------------

MEDIAN_RACE = [[0.2, 0.4, 0.6], [0.3, 0.5, 0.7], [0.1, 0.2, 0.3], [0.5, 0.6, 0.65]]


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_median_stopping_stops_a_best_worse_than_the_median_of_running_averages(
    direction: str,
) -> None:
    # delay 2: at step 2 the running averages are A 0.3, B 0.4, C 0.15, D 0.55.
    # A: best 0.4 vs median(0.4, 0.15, 0.55) = 0.4: not worse, goes on.
    # C: best 0.2 vs median(0.3, 0.4, 0.55) = 0.4: stopped. B, D: above their medians.
    # step 3 (A, B, D): averages 0.4, 0.5, 0.5833; bests 0.6, 0.7, 0.65: all above.
    curves = MEDIAN_RACE if direction == "maximize" else flip(MEDIAN_RACE)
    stopped = lockstep(MedianStopping(delay_evaluation=2), curves, direction)
    median, best = ("0.4", "0.2") if direction == "maximize" else ("0.6", "0.8")
    assert stopped == {
        2: f"early termination: median_stopping, step 2: {best} worse than median {median} "
        "of 3 other trials' running averages"
    }


def test_median_stopping_uses_running_averages_not_latest_values() -> None:
    # At step 3 P and Q average 0.4 (latest 0.9): R's best 0.5 beats the median 0.4.
    race = [[0.1, 0.2, 0.9], [0.1, 0.2, 0.9], [0.5, 0.5, 0.5]]
    assert lockstep(MedianStopping(delay_evaluation=3), race) == {}
    # Without the delay, R is fine at step 1 (0.5 vs 0.1) and step 2 (0.5 vs 0.15) too, while
    # at step 1 P and Q (0.1) are each worse than the median of (0.1, 0.5) = 0.3.
    assert sorted(lockstep(MedianStopping(), race)) == [0, 1]


# --- truncation selection -------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_truncation_selection_stops_the_lowest_percentage_at_each_interval(
    direction: str,
) -> None:
    # step 1, 5 trials, 20 %: the worst (0.5) only. step 2, 4 trials: 20 % of 4 is under one
    # trial, so nobody, though 0.6 is the lowest.
    race = [[0.5, 0.99], [0.6, 0.65], [0.7, 0.6], [0.8, 0.9], [0.9, 0.95]]
    curves = race if direction == "maximize" else flip(race)
    stopped = lockstep(TruncationSelection(percentage=20), curves, direction)
    value = "0.5"
    assert stopped == {
        0: f"early termination: truncation_selection, step 1: {value} in the lowest 20% of 5 trials"
    }


@pytest.mark.parametrize(
    ("percentage", "values", "expected"),
    [
        (25, [0.1, 0.2, 0.3, 0.4], [0]),
        (24, [0.1, 0.2, 0.3, 0.4], []),
        (50, [0.1, 0.2, 0.3, 0.4], [0, 1]),
        (75, [0.1, 0.2, 0.3, 0.4], [0, 1, 2]),
        (99, [0.1, 0.2, 0.3, 0.4], [0, 1, 2]),
        (25, [0.1, 0.1, 0.3, 0.4], []),  # a tie counts against both: neither is in 25 %
        (50, [0.1, 0.1, 0.3, 0.4], [0, 1]),
        (50, [0.4, 0.3], [1]),
        (49, [0.4, 0.3], []),
    ],
)
@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_truncation_percentages(
    percentage: int, values: list[float], expected: list[int], direction: str
) -> None:
    curves = [[v] for v in values]
    curves = curves if direction == "maximize" else flip(curves)
    stopped = lockstep(TruncationSelection(percentage=percentage), curves, direction)
    assert sorted(stopped) == expected


def test_truncation_compares_values_at_the_same_step_only() -> None:
    # A finished with 0.9 at step 3; B at step 1 (0.5) is compared with A's step 1 (0.4).
    policy = TruncationSelection(percentage=50)
    study = new_study(policy)
    a = study.ask()
    for step, value in enumerate([0.4, 0.7, 0.9], 1):
        a.report(value, step)
    study.tell(a, 0.9)
    b = study.ask()
    b.report(0.5, 1)
    assert policy.reason(study, study.trials[1]) is None
    b.report(0.6, 2)
    assert policy.reason(study, study.trials[1]) == (
        "early termination: truncation_selection, step 2: 0.6 in the lowest 50% of 2 trials"
    )


# --- successive halving and Hyperband -------------------------------------------------------

# Rung 0 at step 1, rung 1 at step 3 (min_resource 1, reduction factor 3). In order, at rung 0:
# T0 0.5 and T1 0.6 (fewer than 3 values: only the best goes on), T2 0.4 < 0.6: stopped; T3
# 0.7 best; T4 0.65 (5 values, the top 1: 0.7): stopped; T5 0.8 (6 values, top 2: >= 0.7)
# goes on; T6 0.68 (top 2 of 7: >= 0.7): stopped. At rung 1 (step 3): T0 0.6 alone goes on;
# T1 0.5 < 0.6: stopped; T3 0.75 and T5 0.9 are the best so far.
HALVING = [
    [0.5, 0.55, 0.6],
    [0.6, 0.62, 0.5],
    [0.4],
    [0.7, 0.7, 0.75],
    [0.65],
    [0.8, 0.85, 0.9],
    [0.68],
]


def halving_expected(name: str, minimize: bool, bracket: str = "") -> dict[int, str]:
    def v(x: float) -> str:
        return f"{round(1 - x, 10):.4g}" if minimize else f"{x:.4g}"

    edge = "at most" if minimize else "at least"
    return {
        2: f"early termination: {name}, step 1: {v(0.4)} not in the top 1/3 of rung 0 "
        f"(step 1, 3 trials, {edge} {v(0.6)}){bracket}",
        4: f"early termination: {name}, step 1: {v(0.65)} not in the top 1/3 of rung 0 "
        f"(step 1, 5 trials, {edge} {v(0.7)}){bracket}",
        6: f"early termination: {name}, step 1: {v(0.68)} not in the top 1/3 of rung 0 "
        f"(step 1, 7 trials, {edge} {v(0.7)}){bracket}",
        1: f"early termination: {name}, step 3: {v(0.5)} not in the top 1/3 of rung 1 "
        f"(step 3, 2 trials, {edge} {v(0.6)}){bracket}",
    }


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_successive_halving_stops_the_bottom_of_each_rung(direction: str) -> None:
    minimize = direction == "minimize"
    curves = flip(HALVING) if minimize else HALVING
    stopped = one_by_one(SuccessiveHalving(min_resource=1), curves, direction, rounds=(1, 3))
    assert stopped == halving_expected("successive_halving", minimize)


def test_hyperband_with_one_bracket_is_successive_halving() -> None:
    # max_resource 2 < 3: one bracket (floor(log3(2 / 1)) + 1), whose rungs are 1, 3, 9.
    stopped = one_by_one(Hyperband(min_resource=1, max_resource=2), HALVING, rounds=(1, 3))
    assert stopped == halving_expected("hyperband", False, " of bracket 0")


@pytest.mark.parametrize("name", ["successive_halving", "hyperband"])
def test_halving_decisions_are_optunas(name: str) -> None:
    """Many trials through several brackets and rungs: the same trials stop as with Optuna's
    own pruner (asked through Trial.should_prune)."""
    curves = [[((7 * i) % 11) / 10 + s / 100 for s in range(1, 9)] for i in range(24)]
    ours: Policy
    plain: optuna.pruners.BasePruner
    if name == "successive_halving":
        ours = SuccessiveHalving(min_resource=1, reduction_factor=2)
        plain = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    else:
        ours = Hyperband(min_resource=1, max_resource=8, reduction_factor=2)
        plain = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=8, reduction_factor=2)
    mine = one_by_one(ours, curves, rounds=(1, 2, 4, 8))
    study = new_study(plain)
    trials = [study.ask() for _ in curves]
    theirs_stopped: set[int] = set()
    done = [0] * len(curves)
    for bound in (1, 2, 4, 8):
        for i, curve in enumerate(curves):
            if i in theirs_stopped:
                continue
            for step in range(done[i] + 1, bound + 1):
                trials[i].report(curve[step - 1], step)
            done[i] = bound
            if trials[i].should_prune():
                theirs_stopped.add(i)
                study.tell(trials[i], state=TrialState.PRUNED)
    assert set(mine) == theirs_stopped
    assert 0 < len(mine) < len(curves)
    for why in mine.values():
        assert why.startswith(f"early termination: {ours.name}, step ")
        assert "not in the top 1/2 of rung" in why


# --- make_pruner, storage, resume -----------------------------------------------------------


def sweep(policy: EarlyTermination | None) -> SweepSpec:
    return SweepSpec(
        job=JobSpec(experiment="e", entry_script="train.py"),
        search_space=(),
        objective=Objective(primary_metric="best_val_acc"),
        early_termination=policy,
    )


@pytest.mark.parametrize(
    ("section", "kind"),
    [
        (None, Never),
        (EarlyTermination(type="bandit", slack_factor=0.1), Bandit),
        (EarlyTermination(type="bandit", slack_amount=0.1), Bandit),
        (EarlyTermination(type="median_stopping"), MedianStopping),
        (
            EarlyTermination(type="truncation_selection", truncation_percentage=20),
            TruncationSelection,
        ),
        (EarlyTermination(type="successive_halving", min_resource=1), SuccessiveHalving),
        (EarlyTermination(type="hyperband", min_resource=1, max_resource=9), Hyperband),
    ],
)
def test_make_pruner_gives_an_optuna_pruner_with_a_reason(
    section: EarlyTermination | None, kind: type
) -> None:
    pruner = make_pruner(sweep(section))
    assert isinstance(pruner, kind)
    assert isinstance(pruner, optuna.pruners.BasePruner)
    study = new_study(pruner)
    trial = study.ask()
    trial.report(0.5, 1)
    assert pruner.reason(study, study.trials[0]) is None
    assert pruner.prune(study, study.trials[0]) is False


def test_make_pruner_passes_the_spec_fields() -> None:
    bandit = make_policy(
        EarlyTermination(type="bandit", slack_factor=0.1, evaluation_interval=2, delay_evaluation=5)
    )
    assert isinstance(bandit, Bandit)
    assert (bandit.evaluation_interval, bandit.delay_evaluation) == (2, 5)
    assert [s for s in range(1, 11) if bandit.is_evaluation_point(s)] == [6, 8, 10]
    assert isinstance(make_pruner(sweep(None)), optuna.pruners.NopPruner)
    with pytest.raises(ValueError, match="slack_factor or slack_amount"):
        make_policy(EarlyTermination(type="bandit"))
    with pytest.raises(ValueError, match="truncation_percentage"):
        make_policy(EarlyTermination(type="truncation_selection"))


def test_journal_storage_gives_the_same_decisions(tmp_path: Path) -> None:
    """The driver's storage (a journal file): same verdicts as in memory."""
    races = [
        (lambda: Bandit(slack_factor=0.2), [[0.5, 0.8, 0.85], [0.6, 0.62, 0.7], [0.4, 0.5, 0.9]]),
        (lambda: MedianStopping(delay_evaluation=2), MEDIAN_RACE),
        (lambda: TruncationSelection(percentage=20), [[0.5], [0.6], [0.7], [0.8], [0.9]]),
    ]
    for n, (make, curves) in enumerate(races):
        storage = JournalStorage(JournalFileBackend(str(tmp_path / f"j{n}")))
        assert lockstep(make(), curves, storage=storage) == lockstep(make(), curves)
        assert lockstep(make(), curves)  # each race stops someone
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "halving")))
    assert one_by_one(
        SuccessiveHalving(min_resource=1), HALVING, storage=storage, rounds=(1, 3)
    ) == halving_expected("successive_halving", False)


def test_a_resumed_driver_keeps_verdicts_and_evaluated_steps(tmp_path: Path) -> None:
    """A new policy over the same journal (what `expkit sweeps resume` does) neither forgets a
    reason given nor evaluates a step twice."""
    path = str(tmp_path / "study.journal")
    first = Bandit(evaluation_interval=2, slack_factor=0.2)
    study = new_study(first, storage=JournalStorage(JournalFileBackend(path)))
    a, b = study.ask(), study.ask()
    for step in (1, 2):
        a.report(0.5, step)
    assert first.reason(study, study.trials[0]) is None  # step 2, alone
    for step in (1, 2):
        b.report(0.1, step)
    why = first.reason(study, study.trials[1])
    assert why is not None and "step 2: 0.1" in why

    again = Bandit(evaluation_interval=2, slack_factor=0.2)
    study = optuna.load_study(
        study_name="s", storage=JournalStorage(JournalFileBackend(path)), pruner=again
    )
    assert again.reason(study, study.trials[1]) == why
    c = study.ask()
    for step in (1, 2):
        c.report(0.9, step)
    assert again.reason(study, study.trials[2]) is None
    a.report(0.5, 3)  # a's step 2 passed before C existed: not evaluated again
    assert again.reason(study, study.trials[0]) is None
    assert math.isclose(study.trials[0].intermediate_values[3], 0.5)
