"""The sweep's driver: asks Optuna for trials, runs each as an expkit run, reports its primary
metric and stops the trials the early termination policy names; `python -m
expkit.sweeps.driver WORKSPACE SWEEP_ID` drives a sweep in the background.

Each trial is an ordinary run (`lifecycle.submit`) with a background driver of its own
(`expkit.driver.start_driver`), so a killed sweep driver leaves its trials running and
`expkit sweeps resume` (`drive` again) re-attaches to them. The loop polls the run history
(one indexed query per running trial for its state and one for its new primary metric values,
every POLL_SECONDS); what it learns goes to the study (`expkit.sweeps.study`), whose journal
holds the trial numbers, and to a `Reporter` (the live table of `expkit sweep`, or plain
lines in the sweep's driver.log).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from expkit.history import RunRecord, SweepRecord
    from expkit.sweeps.spec import SweepSpec
    from expkit.workspace import Workspace

DRIVER_LOG = "driver.log"
POLL_SECONDS = 0.25  # how often the loop looks at the history
LIVENESS_SECONDS = 2.0  # how often it checks that each trial's driver still runs
CANCEL_WAIT_SECONDS = 60.0  # how long a canceled sweep waits for its trials' drivers to stop
# Trial user attributes (kept in the study's journal).
RUN_ID = "run_id"  # the run the trial is
VALUES = "values"  # the arguments the trial's run got ({name: value}; set by space.suggest)
TERMINATION = "termination"  # why the early termination policy stopped it
NEVER_STARTED = "never_started"  # its driver died before its run was recorded: re-asked
REASKED = "reasked"  # its run died with the sweep's driver (reaped): re-asked
REASK_OF = "reask_of"  # on an enqueued trial: the number of the trial it asks again
REAPED = "the driver process (pid"  # how a reaped run's error begins (history.runs)


@dataclass
class TrialView:
    """What the live table and the log show of one trial: its number, run, arguments, state
    (the run's while it goes on: queued, scaling, running; then completed, pruned, failed,
    canceled), its latest value of the primary metric, its value (told to Optuna) and why it
    ended when it did not complete."""

    number: int
    run_id: str | None
    values: dict[str, Any]
    state: str = "queued"
    latest: float | None = None
    value: float | None = None
    note: str | None = None
    run_number: int | None = None
    reattached: bool = False  # watched again by a resumed driver


class Reporter:
    """Told what happens in a sweep, as it happens; this one says nothing. `best`: the best
    trial so far (the driver keeps it up to date)."""

    best: TrialView | None = None

    def started(self, view: TrialView) -> None:
        """Trial `view` was asked for and its run submitted (or re-attached to on resume)."""

    def changed(self, view: TrialView) -> None:
        """Its run's state or its latest primary metric value changed."""

    def ended(self, view: TrialView, best: TrialView | None) -> None:
        """Trial `view` ended (completed, pruned, failed, canceled); `best` is the best so far."""

    def note(self, text: str) -> None:
        """Something about the sweep itself (canceling, a warning)."""


class LineReporter(Reporter):
    """One line per change of a trial's state, for a log or a pipe."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self.said: dict[int, str] = {}  # the state last printed of each trial

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def started(self, view: TrialView) -> None:
        """Says "queued" when its run was submitted (it may wait for a slot), "re-attached" on
        resume; then `changed` says "running" when it runs."""
        said = "re-attached" if view.reattached else "queued"
        self.said[view.number] = "running" if view.state == "running" else view.state
        self._print(f"trial {view.number} ({_run_name(view)}) {said}: {format_values(view.values)}")

    def changed(self, view: TrialView) -> None:
        if view.state == "running" and self.said.get(view.number) != "running":
            self.said[view.number] = "running"
            self._print(f"trial {view.number} ({_run_name(view)}) running")

    def ended(self, view: TrialView, best: TrialView | None) -> None:
        if view.state == "completed":
            text = f"value {format_number(view.value)}"
            if best is view:
                text += " (best so far)"
        else:
            text = view.note or ""
        shown = shown_state(view.state)
        self._print(f"trial {view.number} ({_run_name(view)}) {shown}: {text}".rstrip(": "))

    def note(self, text: str) -> None:
        self._print(text)


def shown_state(state: str) -> str:
    """A trial's state as every table and log says it: Optuna's PRUNED is Azure ML's
    "early-terminated" (as `expkit sweeps show` says)."""
    return "early-terminated" if state == "pruned" else state


def _run_name(view: TrialView) -> str:
    return f"run {view.run_id}" if view.run_id else "no run"


def format_values(values: dict[str, Any]) -> str:
    """A trial's arguments as `name=value` pairs, numbers to 4 significant digits."""
    return " ".join(f"{k}={format_number(v)}" for k, v in values.items())


def format_number(value: Any) -> str:
    """A number to 4 significant digits (integers as they are); anything else as str."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


@dataclass
class _Watched:
    """A trial this driver watches: its Optuna trial, its run, and how far its primary metric
    was read (metric row id) and reported (steps)."""

    trial: optuna.Trial
    run_id: str
    view: TrialView
    last_id: int = 0
    skip: int = 0  # values of the metric already reported by an earlier driver (resume)
    step: int = 0
    value: float | None = None  # the best value logged so far, by the goal: the trial's value
    attempt: int = 1  # the attempt of the run whose values were read last
    top: int | None = None  # the highest step of the metric read so far
    covered: int | None = None  # the highest step earlier attempts logged (a retry repeats them)
    reason: str | None = None  # why the policy stopped it (the run was asked to cancel)
    checked: float = field(default_factory=time.monotonic)  # when its driver was last seen


def start(workspace: Workspace, spec: SweepSpec) -> SweepRecord:
    """Record a new sweep of `spec` (state running, this process its driver) and make its
    folder (the study's journal, the driver's log)."""
    record = workspace.history.sweeps.create(spec.experiment, spec.to_dict())
    workspace.sweep_dir(record.id).mkdir(parents=True, exist_ok=True)
    return record


def start_background(workspace: Workspace, sweep_id: str) -> int:
    """Drive sweep `sweep_id` in a background process of its own session (`python -m
    expkit.sweeps.driver`), which goes on when this command or its terminal ends, its output
    appended to the sweep's driver.log; record it as the sweep's driver; returns its pid."""
    folder = workspace.sweep_dir(sweep_id)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / DRIVER_LOG, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "expkit.sweeps.driver", str(workspace.path), sweep_id],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    workspace.history.sweeps.claim(sweep_id, process.pid)
    return process.pid


def take_over(workspace: Workspace, sweep_id: str, pid: int | None = None) -> bool:
    """Make `pid` (default: this process) the driver of sweep `sweep_id` if it is unfinished
    and its driver is gone; False when it is finished or its driver runs (or another
    `expkit sweeps resume` got there first)."""
    sweeps = workspace.history.sweeps
    with sweeps.transaction() as db:
        row = db.execute(
            "SELECT state, driver_pid, driver_start FROM sweeps WHERE id = ?", (sweep_id,)
        ).fetchone()
        from expkit.history.runs import driver_alive
        from expkit.procs import process_start

        if row is None or row[0] != "running" or driver_alive(row[1], row[2]):
            return False

        pid = pid or os.getpid()
        db.execute(
            "UPDATE sweeps SET driver_pid = ?, driver_start = ? WHERE id = ?",
            (pid, process_start(pid), sweep_id),
        )
    return True


def drive(
    workspace: Workspace,
    sweep_id: str,
    reporter: Reporter | None = None,
    handle_signals: bool = True,
) -> SweepRecord:
    """Drive sweep `sweep_id` to its end in this process (its recorded driver) and return its
    final record: start trials up to the limits, report their primary metric to the study,
    stop those the policy names, tell the study how each ended, keep the best, register its
    model (`register_best`). Also resumes a sweep whose driver died: the trials it left are
    re-attached to, told, or re-asked (see `SweepDriver.take_stock`). With `handle_signals`
    (main thread only), SIGINT, SIGTERM and SIGHUP cancel the sweep; a second one stops
    waiting for the trials' drivers to finish canceling."""
    driver = SweepDriver(workspace, sweep_id, reporter or Reporter())
    if not handle_signals or threading.current_thread() is not threading.main_thread():
        return driver.drive()
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.getsignal(sig) for sig in handled}
    for sig in handled:
        if previous[sig] != signal.SIG_IGN:
            signal.signal(sig, driver.on_signal)
    try:
        return driver.drive()
    finally:
        for sig in handled:
            if previous[sig] != signal.SIG_IGN:
                signal.signal(sig, previous[sig])


class SweepDriver:
    """The loop of one sweep (see `drive`)."""

    def __init__(self, workspace: Workspace, sweep_id: str, reporter: Reporter) -> None:
        from expkit.sweeps.spec import SweepSpec

        self.ws = workspace
        self.history = workspace.history
        self.id = sweep_id
        self.reporter = reporter
        record = self.history.sweeps.get(sweep_id)
        self.created = record.created
        self.spec = SweepSpec.from_dict(record.spec, source=f"sweep {sweep_id}")
        self.metric = self.spec.objective.primary_metric
        self.maximize = self.spec.objective.goal == "maximize"
        self.watched: dict[int, _Watched] = {}
        self.views: dict[int, TrialView] = {}
        self.best: TrialView | None = None
        self.signals: list[str] = []
        self.stopping: str | None = None  # why the sweep stops early (canceled, timeout)
        self.timed_out = False  # stopped by limits.timeout: it ends completed
        self.cause = ""  # the sweep's error: "canceled by Ctrl-C", "... `expkit sweeps cancel`"
        self.canceling_since: float | None = None
        self.study: Any = None
        self.reasked: dict[int, str] = {}  # trial re-asked on resume -> what to say of it

    # -- the loop -----------------------------------------------------------------------------
    def drive(self) -> SweepRecord:
        from expkit.sweeps.study import open_study

        try:
            self.study = open_study(self.ws, self.id, self.spec)
            self.take_stock()
            while True:
                self.check_stop()
                self.poll()
                if self.stopping is None:
                    self.fill()
                if not self.watched and (self.stopping is not None or not self.may_ask()):
                    break
                if self.gave_up_waiting():
                    break
                time.sleep(POLL_SECONDS)
        except Exception as failure:
            error = str(failure) or type(failure).__name__
            self.reporter.note(f"sweep {self.id} failed: {error}")
            self.cancel_trials(f"sweep {self.id} failed")
            if self.study is not None:
                with contextlib.suppress(Exception):  # the study may be what failed
                    self.abandon()
            self.history.sweeps.finish(self.id, "failed", error)
            return self.history.sweeps.get(self.id)
        if self.watched:  # a second signal: their drivers finish canceling them
            self.abandon()
        if self.stopping is not None and not self.timed_out:
            self.history.sweeps.finish(self.id, "canceled", self.cause or self.stopping)
        else:
            self.finish_completed()
        return self.history.sweeps.get(self.id)

    def on_signal(self, signum: int, frame: Any) -> None:
        """SIGINT (Ctrl-C), SIGTERM, SIGHUP: cancel the sweep (noted here, acted on by the loop)."""
        self.signals.append(signal.Signals(signum).name)
        if len(self.signals) > 1:
            with contextlib.suppress(OSError):  # the terminal may be gone
                os.write(2, b"expkit: not waiting for the trials to finish canceling\n")

    def check_stop(self) -> None:
        """Start stopping the sweep when it was canceled (a signal, `expkit sweeps cancel`) or
        its `limits.timeout` (seconds since it was created, across resumes) has passed: as
        Azure ML's timeout, that ends the sweep completed (its best so far), its running
        trials canceled with reason "sweep timeout (N s)"."""
        if self.stopping is not None:
            return
        timeout = self.spec.limits.timeout
        if self.signals or self.history.sweeps.cancel_requested(self.id):
            reason = f"sweep {self.id} canceled"
            by = {"SIGINT": "Ctrl-C"}.get(self.signals[0], self.signals[0]) if self.signals else ""
            self.cause = f"canceled by {by or '`expkit sweeps cancel`'}"
        elif timeout is not None and time.time() - self.created >= timeout:
            reason = f"sweep timeout ({timeout:g} s)"
            self.timed_out = True
            self.reporter.note(f"stopped at limits.timeout ({timeout:g} s)")
        else:
            return
        self.stopping = reason
        if self.watched:
            self.reporter.note(f"{reason}: canceling its running trials (their outputs are kept)")
        self.cancel_trials(reason)

    def cancel_trials(self, reason: str) -> None:
        """Ask every watched trial's run to stop, `reason` becoming its error."""
        self.canceling_since = time.monotonic()
        for watched in self.watched.values():
            self.history.runs.request_cancel(watched.run_id, reason)

    def gave_up_waiting(self) -> bool:
        """A second signal, or the trials' drivers took too long to stop: leave them be."""
        if self.canceling_since is None:
            return False
        late = time.monotonic() - self.canceling_since > CANCEL_WAIT_SECONDS
        return len(self.signals) > 1 or late

    def abandon(self) -> None:
        """Tell FAIL for the trials still watched (their runs were asked to stop)."""
        from optuna.trial import TrialState

        for number, watched in list(self.watched.items()):
            self.study.tell(number, state=TrialState.FAIL)
            watched.view.state, watched.view.note = "failed", self.stopping or "sweep ended"
            del self.watched[number]

    # -- limits -------------------------------------------------------------------------------
    def counted(self) -> int:
        """The trials the limits count: every one in the study (failed ones and those from
        before a resume too) but for those asked again on resume (never started, or their
        run died with the sweep's driver): the trial that asks again replaces it in the count,
        so `max_total_trials` and a grid's size count each set of parameters once."""
        return sum(
            1
            for t in self.study.get_trials(deepcopy=False)
            if NEVER_STARTED not in t.user_attrs and REASKED not in t.user_attrs
        )

    def may_ask(self) -> bool:
        """Whether another trial may start: under `max_total_trials` and, for a grid, not
        past its last combination."""
        from expkit.sweeps.space import grid_size

        limits = [self.spec.limits.max_total_trials, grid_size(self.spec)]
        cap = min((n for n in limits if n is not None), default=None)
        return cap is None or self.counted() < cap

    def fill(self) -> None:
        """Start trials while fewer than `max_concurrent_trials` are unfinished."""
        while len(self.watched) < self.spec.limits.max_concurrent_trials and self.may_ask():
            self.start_trial()

    def start_trial(self) -> None:
        """Ask the study for a trial and start it as a run with its own background driver."""
        from optuna.trial import TrialState

        from expkit import lifecycle
        from expkit.driver import start_driver
        from expkit.sweeps.space import suggest, trial_job

        trial = self.study.ask()
        try:
            values = suggest(trial, self.spec)
            record = lifecycle.submit(
                self.ws, trial_job(self.spec, values), sweep=self.id, trial=trial.number
            )
        except BaseException:
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        trial.set_user_attr(RUN_ID, record.id)
        start_driver(self.ws, record.id)
        view = TrialView(trial.number, record.id, values, run_number=record.number)
        self.views[trial.number] = view
        self.watched[trial.number] = _Watched(trial, record.id, view)
        asks_again = self.reasked.pop(trial.user_attrs.get(REASK_OF, -1), None)
        if asks_again:
            self.reporter.note(f"{asks_again} as trial {trial.number}")
        self.reporter.started(view)

    # -- resuming -----------------------------------------------------------------------------
    def take_stock(self) -> None:
        """What an earlier driver left (resume): each RUNNING trial whose run goes on is
        watched again (steps it reported are not reported again); one whose run ended is told
        how; one whose run was never recorded or never started (the driver died between ask
        and start) is told FAIL and its parameters asked for again. Finished trials are shown
        as they ended."""
        from optuna.trial import TrialState

        from expkit.recovery import recover

        recover(self.ws, self.history)  # runs whose driver died with ours end failed now
        runs: dict[int, RunRecord] = {}
        for trial_run in self.history.runs.of_sweep(self.id):
            if trial_run.trial is not None:
                runs[trial_run.trial] = trial_run  # a trial's latest run
        for frozen in self.study.get_trials(deepcopy=False):
            run = runs.get(frozen.number)
            values = frozen.user_attrs.get(VALUES) or dict(frozen.params)
            view = TrialView(
                frozen.number,
                run.id if run else None,
                values,
                run_number=run.number if run else None,
            )
            self.views[frozen.number] = view
            if frozen.state == TrialState.WAITING:
                del self.views[frozen.number]  # enqueued: asked for by the loop
                continue
            if frozen.state != TrialState.RUNNING:
                view.state = _FINISHED_VIEW.get(frozen.state.name, "failed")
                view.value = frozen.value
                view.latest = frozen.value
                if run is not None and view.state != "completed":
                    view.note = run.error
                continue
            if run is not None and run.state == "failed" and (run.error or "").startswith(REAPED):
                self.reask(frozen, view, run)
                continue
            if run is None or (run.state == "failed" and not self.history.stages.of(run.id)):
                self.reask(frozen, view)
                continue
            import optuna

            trial = optuna.trial.Trial(self.study, frozen._trial_id)
            if RUN_ID not in frozen.user_attrs:
                trial.set_user_attr(RUN_ID, run.id)
            watched = _Watched(trial, run.id, view, skip=len(frozen.intermediate_values))
            watched.step = watched.skip
            watched.reason = frozen.user_attrs.get(TERMINATION)
            self.watched[frozen.number] = watched
            view.reattached = True
            self.reporter.started(view)
        self.update_best()

    def reask(
        self, frozen: optuna.trial.FrozenTrial, view: TrialView, died: RunRecord | None = None
    ) -> None:
        """Trial `frozen` never got going, or its run `died` with the sweep's driver (reaped,
        as a kill -9 of the sweep leaves it): FAIL, and the same parameters enqueued anew
        (for a grid too: Optuna's GridSampler counts a failed combination as visited, so the
        point is run again as the enqueued trial). The trial asking again replaces it in
        the limits' count (`counted`)."""
        from optuna.trial import TrialState

        attr = REASKED if died else NEVER_STARTED
        self.study._storage.set_trial_user_attr(frozen._trial_id, attr, True)
        self.study.tell(frozen.number, state=TrialState.FAIL)
        self.study.enqueue_trial(dict(frozen.params), user_attrs={REASK_OF: frozen.number})
        if died is not None:
            view.state, view.note = "failed", "its run died with the sweep's driver; asked again"
            text = f"trial {frozen.number} (run {died.id}): its run died with the sweep's driver"
        else:
            view.state, view.note = "failed", "its driver died before it started; asked again"
            text = f"trial {frozen.number}: never started"
        self.reporter.note(f"{text}; its parameters asked again")
        self.reasked[frozen.number] = f"trial {frozen.number}: asked again"

    # -- watching -----------------------------------------------------------------------------
    def poll(self) -> None:
        """Look at each watched trial once: its new primary metric values, its run's state."""
        from expkit.history.runs import driver_alive

        for number, watched in list(self.watched.items()):
            run = self.history.runs.get(watched.run_id)
            new = self.read_values(watched)
            if new:
                self.report(watched, new, run)
            if run.state != watched.view.state and not run.finished:
                watched.view.state = run.state
                self.reporter.changed(watched.view)
            elif new:
                self.reporter.changed(watched.view)
            if run.finished:
                self.end(number, watched, run)
            elif time.monotonic() - watched.checked > LIVENESS_SECONDS:
                watched.checked = time.monotonic()
                if not driver_alive(run.driver_pid, run.driver_start):
                    from expkit.recovery import recover

                    recover(self.ws, self.history)  # it ends failed: told at the next poll

    def read_values(self, watched: _Watched) -> list[float]:
        """The trial's primary metric values logged since the last look (numbers only).

        A value a later attempt of the trial's run logged at a step an earlier attempt had
        reached (it resumed from a checkpoint, see the job's `retry:`) is no new interval:
        it counts towards the trial's value, and is not reported to the policy again."""
        from expkit.history.metrics import metric_value

        values = []
        for row in self.history.metrics.of(watched.run_id, self.metric, after_id=watched.last_id):
            watched.last_id = row["id"]
            value = metric_value(row)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if row["attempt"] > watched.attempt:  # the run's next attempt: what it repeats
                watched.attempt, watched.covered = row["attempt"], watched.top
            step = row["step"]
            if step is not None:
                watched.top = step if watched.top is None else max(watched.top, step)
                if watched.covered is not None and step <= watched.covered:
                    self.keep_best(watched, float(value))
                    continue
            if watched.skip:
                watched.skip -= 1
                self.keep_best(watched, float(value))
                continue
            values.append(float(value))
        return values

    def report(self, watched: _Watched, values: list[float], run: RunRecord) -> None:
        """Report `values` at the next steps, then ask the policy about the trial (not when
        it ended or is being stopped already); a reason cancels its run with that reason."""
        for value in values:
            watched.step += 1
            if math.isfinite(value):
                watched.trial.report(value, watched.step)
        for value in values:
            self.keep_best(watched, value)
        watched.view.latest = values[-1]
        if run.finished or watched.reason is not None or self.stopping is not None:
            return
        frozen = self.study._storage.get_trial(watched.trial._trial_id)
        reason = getattr(self.study.pruner, "reason", lambda s, t: None)(self.study, frozen)
        if reason:
            watched.reason = reason
            watched.trial.set_user_attr(TERMINATION, reason)
            self.history.runs.request_cancel(watched.run_id, reason)

    def keep_best(self, watched: _Watched, value: float) -> None:
        """Keep `value` as the trial's value if it is finite and better, by the goal, than the
        best it logged before."""
        if not math.isfinite(value):
            return
        best = watched.value
        if best is None or (value > best if self.maximize else value < best):
            watched.value = value

    def end(self, number: int, watched: _Watched, run: RunRecord) -> None:
        """Tell the study how trial `number` ended: its run completed -> COMPLETE with the best
        value it logged of the primary metric, by the goal, as Azure ML's HyperDrive ranks child
        runs by their best primary metric (FAIL, with a warning, when it logged none); canceled
        by the policy -> PRUNED; anything else -> FAIL."""
        from optuna.trial import TrialState

        view = watched.view
        if run.state == "completed" and watched.value is not None:
            self.study.tell(number, watched.value)
            view.state, view.value = "completed", watched.value
        elif run.state == "completed":
            self.study.tell(number, state=TrialState.FAIL)
            view.state = "failed"
            view.note = f"completed without logging {self.metric}: told failed"
            self.reporter.note(
                f"warning: trial {number} (run {run.id}) {view.note}; log the primary "
                "metric with run.log(...)"
            )
        elif run.state == "canceled" and watched.reason and run.error == watched.reason:
            self.study.tell(number, state=TrialState.PRUNED)
            view.state, view.note = "pruned", run.error
        else:
            self.study.tell(number, state=TrialState.FAIL)
            view.state, view.note = run.state, run.error
            limit = self.spec.limits.trial_timeout
            if limit is not None and (run.error or "").startswith("run: timed out after"):
                view.note = f"past limits.trial_timeout ({limit:g} s): {run.error}"
        del self.watched[number]
        self.update_best()
        self.reporter.ended(view, self.best)

    def update_best(self) -> None:
        """The best completed trial by the goal (ties: the lower number), kept in the record."""
        done = [v for v in self.views.values() if v.state == "completed" and v.value is not None]
        if not done:
            return
        sign = -1.0 if self.maximize else 1.0
        best = min(done, key=lambda v: (sign * float(v.value or 0.0), v.number))
        if best is not self.best:
            self.best = self.reporter.best = best
            self.history.sweeps.update(self.id, best_run=best.run_id)

    # -- the end ------------------------------------------------------------------------------
    def finish_completed(self) -> None:
        """End the sweep completed, registering the best trial's model if the spec asks; a
        sweep whose every trial failed ends failed, with the first one's error."""
        views = [self.views[n] for n in sorted(self.views)]
        if views and all(v.state == "failed" for v in views):
            first = views[0]
            error = f"every trial failed (trial {first.number}: {first.note or 'failed'})"
            self.reporter.note(error)
            self.history.sweeps.finish(self.id, "failed", error)
            return
        if self.spec.register_best and self.best is not None:
            from expkit.sweeps.best import NotRegistered

            try:
                model = self.register_best()
            except NotRegistered as refused:  # the job's model.register_if: no failure
                self.reporter.note(f"the best trial's model is {refused}")
                self.history.sweeps.finish(self.id, "completed")
                return
            except Exception as failure:
                error = f"registering the best trial's model failed: {failure}"
                self.reporter.note(error)
                self.history.sweeps.finish(self.id, "failed", error)
                return
            name, _, version = model.partition(":")
            aliases = " ".join(  # as a run's register stage says them
                f"@{a}" for a, v in self.history.aliases.of_model(name).items() if str(v) == version
            )
            self.reporter.note(
                f"registered the best trial's model as {model}" + (f", {aliases}" * bool(aliases))
            )
        elif self.spec.register_best:
            self.reporter.note("no trial completed: no model registered")
        self.history.sweeps.finish(self.id, "completed")

    def register_best(self) -> str:
        """Register the best trial's model (`expkit.sweeps.best.register_best`, which also
        records it on the sweep): its "name:version"."""
        from expkit.sweeps.best import register_best

        model = register_best(self.ws, self.id, self.reporter.note)
        return f"{model.name}:{model.version}"


_FINISHED_VIEW = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed"}


def main(argv: list[str]) -> int:
    """`python -m expkit.sweeps.driver WORKSPACE SWEEP_ID`: drive the sweep, one line per
    change to stdout (the sweep's driver.log); exit 0 completed, 1 failed, 130 canceled."""
    from expkit.workspace import Workspace

    workspace_path, sweep_id = argv
    workspace = Workspace(workspace_path)
    workspace.history.sweeps.claim(sweep_id)
    record = drive(workspace, sweep_id, LineReporter())
    print(f"sweep {sweep_id} {record.state}" + (f": {record.error}" if record.error else ""))
    return {"completed": 0, "canceled": 130}.get(record.state, 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
