"""The sweep's Optuna study, stored in its folder as a journal file (no server needed).

Optuna's JournalStorage over a JournalFileBackend appends each change to one file under a
lock, so the study survives a killed driver and `expkit sweeps resume` loads it as it was
(trial numbers intact). See https://optuna.readthedocs.io (optuna.storages.JournalStorage).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

    from expkit.sweeps.spec import SweepSpec
    from expkit.workspace import Workspace

JOURNAL = "study.journal"


def open_study(workspace: Workspace, sweep_id: str, spec: SweepSpec) -> optuna.Study:
    """The study of sweep `sweep_id` (created on first use), with the spec's direction,
    sampler and pruner. Optuna is imported here, not at start-up."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.study import StudyDirection

    from expkit.sweeps.policies import make_pruner
    from expkit.sweeps.space import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = workspace.sweep_dir(sweep_id)
    folder.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(folder / JOURNAL)))
    return optuna.create_study(
        storage=storage,
        study_name=sweep_id,
        direction=StudyDirection.MAXIMIZE
        if spec.objective.goal == "maximize"
        else StudyDirection.MINIMIZE,
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
