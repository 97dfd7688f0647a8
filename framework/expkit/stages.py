"""The names of a run's lifecycle: its stages, how a stage ends, and the run's states.

They are string enums: each member equals the text the run history stores and the event
hooks pass ("post-process", "skipped"), so a plugin comparing with strings keeps working.
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    """A stage of the lifecycle, in the order they run."""

    PREPARE = "prepare"  # snapshot, environment, data
    SCALE = "scale"  # the compute target acquires the resources
    RUN = "run"  # the processes run; metrics flow
    POST_PROCESS = "post-process"  # outputs sealed, exports made
    REGISTER = "register"  # the model version registered

    @property
    def state(self) -> RunState:
        """The run's state while this stage runs ("preparing", ..., "registering")."""
        return _STATE_IN[self]


class Outcome(StrEnum):
    """How a stage ended (`expkit_stage_finished`'s `outcome`)."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    # Not run, for a reason the record gives: post-process when the script never started,
    # register when the run did not complete or the job names no model.
    SKIPPED = "skipped"


class RunState(StrEnum):
    """The state of a run in the history (`expkit runs list`); the last three are final."""

    QUEUED = "queued"
    PREPARING = "preparing"
    SCALING = "scaling"
    RUNNING = "running"
    POST_PROCESSING = "post-processing"
    REGISTERING = "registering"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        """Whether the run has ended (completed, failed or canceled)."""
        return self in FINAL_STATES


class AttemptOutcome(StrEnum):
    """How one attempt of a run ended (`expkit runs show` lists them; `retry.on` names the
    ones that may be retried, see expkit.job.RetrySpec)."""

    COMPLETED = "completed"  # the script exited 0
    FAILED = "failed"  # the script exited non-zero (the attempt's exit_code says how)
    PREEMPTED = "preempted"  # the service took the resources back, or a requeue was asked
    NODE_FAILURE = "node_failure"  # a node of the attempt died (Slurm's NODE_FAIL, BOOT_FAIL)
    TIME_LIMIT = "time_limit"  # the attempt reached its time limit (`timeout`, Slurm's)
    CANCELED = "canceled"  # the user stopped the run
    LOST = "lost"  # the driver died during the attempt (kill -9): found by a later command


FINAL_STATES = (RunState.COMPLETED, RunState.FAILED, RunState.CANCELED)
_STATE_IN = {
    Stage.PREPARE: RunState.PREPARING,
    Stage.SCALE: RunState.SCALING,
    Stage.RUN: RunState.RUNNING,
    Stage.POST_PROCESS: RunState.POST_PROCESSING,
    Stage.REGISTER: RunState.REGISTERING,
}
