"""The Python API, shaped after Azure ML's SDK v1.

    ws = Workspace.from_config()
    experiment = Experiment(ws, "pytorch-birds")
    run = experiment.submit(JobSpec.from_yaml("training/job.yaml"))
    run.wait_for_completion(show_output=True)
    model = run.register_model(model_name="pt-dnn", model_path="outputs/")

Module-level imports are stdlib only: training scripts import `Run` from here.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expkit.context import ScriptRun, get_context
from expkit.errors import UserError
from expkit.workspace import Workspace

if TYPE_CHECKING:
    from expkit.capabilities import ModelVersion
    from expkit.job import JobSpec
    from expkit.sweeps.spec import SweepSpec

__all__ = ["Experiment", "Model", "Run", "RunFailed", "SweepRun", "Workspace"]


class RunFailed(Exception):
    """`wait_for_completion(raise_on_error=True)` on a run that failed or was canceled."""


class Experiment:
    """A named group of runs in a workspace."""

    def __init__(self, workspace: Workspace, name: str) -> None:
        self.workspace, self.name = workspace, name

    def submit(self, job: JobSpec | SweepSpec | str | Path, overrides: Sequence[str] = ()) -> Any:
        """Start `job` in a background driver process and return its `Run` at once; a sweep
        (a SweepSpec, or a YAML file with a `search_space`) starts a sweep driver in the
        background instead and returns its `SweepRun` (Azure ML's HyperDriveRun)."""
        from expkit import lifecycle
        from expkit.driver import start_driver
        from expkit.job import JobSpec

        if not isinstance(job, JobSpec) and (
            not isinstance(job, str | Path) or _is_sweep_file(Path(job))
        ):
            return self._submit_sweep(job, overrides)
        if not isinstance(job, JobSpec):
            job = JobSpec.from_yaml(job, list(overrides))
        elif overrides:
            raise UserError("overrides apply to a job spec file; change the JobSpec instead")
        # Validated again with the experiment's name: it becomes the run id and a folder name.
        job = JobSpec.from_dict(
            {**job.to_dict(), "experiment": self.name}, source="JobSpec", base_dir=Path()
        )
        record = lifecycle.submit(self.workspace, job)
        start_driver(self.workspace, record.id)
        return Run(self.workspace, record.id)

    def _submit_sweep(self, sweep: Any, overrides: Sequence[str]) -> SweepRun:
        """Record the sweep (its trials' experiment is this one) and start its driver."""
        import dataclasses

        from expkit.job import JobSpec
        from expkit.sweeps import driver
        from expkit.sweeps.spec import SweepSpec

        if not isinstance(sweep, SweepSpec):
            sweep = SweepSpec.from_yaml(sweep, list(overrides))
        elif overrides:
            raise UserError("overrides apply to a sweep spec file; change the SweepSpec instead")
        job = JobSpec.from_dict(
            {**sweep.job.to_dict(), "experiment": self.name}, source="JobSpec", base_dir=Path()
        )
        sweep = dataclasses.replace(sweep, job=job)
        record = driver.start(self.workspace, sweep)
        driver.start_background(self.workspace, record.id)
        return SweepRun(self.workspace, record.id)

    def get_runs(self) -> list[Run]:
        """This experiment's runs, newest first."""
        records = self.workspace.history.runs.recent(self.name, limit=10_000)
        return [Run(self.workspace, r.id) for r in records]


class Run:
    """A recorded run; `Run.get_context()` inside a training script gives the script's run."""

    def __init__(self, workspace: Workspace, run_id: str) -> None:
        self.workspace, self.id = workspace, run_id

    @staticmethod
    def get_context() -> ScriptRun:
        """The run this training script belongs to (does nothing harmful outside expkit)."""
        return get_context()

    def __repr__(self) -> str:
        return f"Run({self.id!r}, status={self.get_status()!r})"

    @property
    def _record(self) -> Any:
        return self.workspace.history.runs.get(self.id)

    @property
    def experiment(self) -> str:
        return self._record.experiment

    @property
    def run_dir(self) -> Path:
        return self.workspace.run_dir(self.id)

    def get_status(self) -> str:
        return self._record.state

    def get_details(self) -> dict[str, Any]:
        """The run's record as a dict: state, error, hashes, stages, tags, parameters, and
        its attempts ("attempt": the current one, from 1; "attempts": each one's number,
        start and end in seconds since the epoch, outcome, reason and exit code, first
        first; empty for a run whose script never started)."""
        record = self._record
        history = self.workspace.history
        return {
            "id": record.id,
            "experiment": record.experiment,
            "state": record.state,
            "error": record.error,
            "exit_code": record.exit_code,
            "snapshot_hash": record.snapshot_hash,
            "environment_hash": record.environment_hash,
            "sweep": record.sweep,
            "trial": record.trial,
            "stages": {
                s.stage: {"state": s.state, "seconds": s.seconds}
                for s in history.stages.of(self.id)
            },
            "tags": history.tags.of(self.id),
            "params": history.params.of(self.id),
            "param_sources": history.params.sources(self.id),
            "attempt": record.attempt,
            "attempts": [
                {
                    "attempt": a.attempt,
                    "started": a.started,
                    "ended": a.ended,
                    "outcome": a.outcome,
                    "reason": a.reason,
                    "exit_code": a.exit_code,
                }
                for a in history.attempts.of(self.id)
            ],
        }

    def get_metrics(self, name: str | None = None) -> dict[str, Any]:
        """{name: value} for a metric logged once, {name: [values]} for one logged repeatedly;
        a table logged with `log_row` comes back as {name: {column: [values]}}. The values
        are the run's current curve: a step a later attempt logged again has the later
        value only (`expkit metrics RUN --all-attempts` lists both)."""
        from expkit.history import metric_value

        grouped: dict[str, list[Any]] = {}
        for row in self.workspace.history.metrics.current(self.id, name):
            grouped.setdefault(row["name"], []).append(metric_value(row))
        result: dict[str, Any] = {}
        for key, values in grouped.items():
            if all(isinstance(v, dict) for v in values):
                columns: dict[str, list[Any]] = {}
                for value in values:
                    for column, cell in value.items():
                        columns.setdefault(column, []).append(cell)
                result[key] = columns
            else:
                result[key] = values[0] if len(values) == 1 else values
        return result

    def get_params(self) -> dict[str, str]:
        """The run's parameters, name -> value (text): the job's `args` (`lr: 0.01` is
        {"lr": "0.01"}, `${data.x}` the data's path in the run, a list of arguments the one
        parameter "args", the command line) and what the script logged as parameters
        (`Run.get_context().log_params`, `mlflow.log_param`); a name both give has the
        script's value. {} before the run's prepare stage placed its data, and for runs
        recorded before expkit kept parameters. `get_details()["param_sources"]` says which
        came from where ("job" or "script").

        Named as MLflow names them (`mlflow.get_run(id).data.params`, a dict of text, which
        is how Azure ML v2 reads a run's parameters): Azure ML's SDK v1 has no such call
        (a run's script arguments are in `get_details()["runDefinition"]["arguments"]`, a
        HyperDrive run's children's in `HyperDriveRun.get_hyperparameters()`).
        """
        return self.workspace.history.params.of(self.id)

    def get_tags(self) -> dict[str, str]:
        return self.workspace.history.tags.of(self.id)

    def get_file_names(self) -> list[str]:
        """The run's files: `outputs/...` as recorded when they were sealed, and `logs/...`.

        Links in outputs that point out of the run are recorded, not stored: they are not
        listed here (see `get_links`)."""
        names = [f"outputs/{path}" for path in self.workspace.history.outputs.of(self.id)]
        logs = self.run_dir / "logs"
        if logs.is_dir() and not logs.is_symlink():
            for folder, dirs, files in os.walk(logs, followlinks=False):
                dirs.sort()
                names += [
                    (Path(folder) / f).relative_to(self.run_dir).as_posix()
                    for f in files
                    if stat.S_ISREG(os.lstat(Path(folder) / f).st_mode)
                ]
        return sorted(names)

    def get_links(self) -> dict[str, str]:
        """Links the script left in outputs/ that point out of it (or to nothing): name ->
        target. They were recorded, never followed, and are never served as content."""
        links = self.workspace.history.outputs.links(self.id)
        return {("outputs" if p == "." else f"outputs/{p}"): t for p, t in links.items()}

    def download_file(
        self,
        name: str,
        output_file_path: str | Path | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Copy one of the run's files (a name from `get_file_names()`) to `output_file_path`
        and return where it went.

        A path ending in "/" (or an existing folder) is a folder, created if needed: the file
        keeps its name there. An output is checked against its recorded sha256 (another
        stored copy is used if it does not match). Raises UserError when the destination
        exists (unless `overwrite`), is a folder, or the name is not a file of the run;
        `downloads.Damaged` when no intact copy is left.
        """
        from expkit import downloads

        links = self.get_links()
        if name.rstrip("/") in links:
            raise UserError(
                f"run {self.id}: {name} is a link to {links[name.rstrip('/')]}, out of the run; "
                "it was recorded, not stored, and is never served"
            )
        names = self.get_file_names()
        if name not in names:
            # `runs files` names outputs/model.pt: `model.pt` alone is that file, most likely.
            meant = [n for n in (f"outputs/{name}", f"logs/{name}") if n in names]
            hint = f" (did you mean {meant[0]}?)" if meant else ""
            raise UserError(
                f"run {self.id} has no file {name!r}{hint}; see `expkit runs files {self.id}`"
            )
        target = downloads.destination(output_file_path, name)
        path = downloads.inside_folder(self.run_dir, name)
        if name.startswith("outputs/"):
            _, digest = self.workspace.history.outputs.of(self.id)[name.removeprefix("outputs/")]
            wanted = downloads.Wanted(
                name, target, digest, lambda: downloads.candidates(self.workspace, digest, [path])
            )
        else:  # a log: not recorded, served as it is (never through a link)
            wanted = downloads.Wanted(name, target, None, lambda: [path])
        (written,) = downloads.fetch([wanted], overwrite)
        return written

    def register_model(
        self, model_name: str, model_path: str = "outputs/", tags: dict[str, str] | None = None
    ) -> Model:
        """Register a file or folder of this run's recorded outputs as the next version of a
        model. `model_name` follows the job spec's rules for `model.name`; `model_path` must
        be inside outputs/. Raises UserError otherwise, or when it names no recorded file."""
        from expkit.registry import ModelStore, check_model_name, select_model_files

        check_model_name(model_name, "model_name")
        parts = Path(model_path).parts
        if not parts or parts[0] != "outputs" or ".." in parts:
            raise UserError(f"model_path {model_path!r} must be inside outputs/")
        history = self.workspace.history
        files, base = select_model_files(history.outputs.of(self.id), Path(model_path).as_posix())
        if not files:
            links = self.get_links()
            named = Path(model_path).as_posix()
            if named in links:
                raise UserError(
                    f"model_path {model_path!r} is a link to {links[named]}, out of the run: "
                    "recorded, not stored; it cannot be registered"
                )
            raise UserError(
                f"model_path {model_path!r} matched no file in the run's outputs; "
                f"see `expkit runs files {self.id}`"
            )
        record = self._record
        lineage = {
            "run_id": self.id,
            "experiment": record.experiment,
            "snapshot_hash": record.snapshot_hash,
            "environment_hash": record.environment_hash,
            "metrics": {
                k: v
                for k, v in history.metrics.latest(self.id).items()
                if isinstance(v, int | float)
            },
        }
        version = ModelStore(self.workspace).register(
            model_name,
            files,
            self.run_dir / "outputs" / base,
            run_id=self.id,
            lineage=lineage,
            tags=tags or {},
        )
        return Model._from_version(self.workspace, version)

    def wait_for_completion(
        self, show_output: bool = False, timeout: float | None = None, raise_on_error: bool = True
    ) -> dict[str, Any]:
        """Block until the run ends; with `show_output`, print its stages and output live."""
        from expkit.console import Console
        from expkit.follow import current_record, follow

        deadline = time.monotonic() + timeout if timeout else None
        if show_output:
            follow(self.workspace, self.id, Console(), timeout=timeout)
        while not current_record(self.workspace, self.id).finished:
            if deadline and time.monotonic() > deadline:
                raise TimeoutError(f"run {self.id} still {self.get_status()} after {timeout}s")
            time.sleep(0.2)
        details = self.get_details()
        if raise_on_error and details["state"] != "completed":
            raise RunFailed(f"run {self.id} {details['state']}: {details['error']}")
        return details

    def cancel(self) -> None:
        """Ask the run's driver to stop it (the run ends as canceled)."""
        self.workspace.history.runs.request_cancel(self.id)

    def resume(self) -> Run:
        """Start the next attempt of this failed or canceled run from its last checkpoint, as
        `expkit runs resume` does, driven in the background; returns this run (wait for it
        with `wait_for_completion`). Raises UserError saying why when it cannot be resumed
        (it completed, its snapshot is gone, ...: see `lifecycle.reopen`)."""
        from expkit import lifecycle
        from expkit.driver import start_driver

        lifecycle.reopen(self.workspace, self.id)
        start_driver(self.workspace, self.id, resume=True)
        return self


class SweepRun:
    """A sweep, as Azure ML's HyperDriveRun: its trials are runs (`get_children`), the best
    one by the primary metric (`get_best_run_by_primary_metric`); `expkit sweeps show ID`
    shows the same."""

    def __init__(self, workspace: Workspace, sweep_id: str) -> None:
        self.workspace, self.id = workspace, sweep_id

    def __repr__(self) -> str:
        return f"SweepRun({self.id!r}, status={self.get_status()!r})"

    @property
    def _record(self) -> Any:
        return self.workspace.history.sweeps.get(self.id)

    def get_status(self) -> str:
        """running, completed, failed or canceled."""
        return self._record.state

    def get_details(self) -> dict[str, Any]:
        """The sweep's record: state, error, spec, the best trial's run and the registered
        model ("name:version"), and how many trials are in each state."""
        from expkit.sweeps.report import trial_rows

        record = self._record
        counts: dict[str, int] = {}
        for row in trial_rows(self.workspace, record):
            counts[row.state] = counts.get(row.state, 0) + 1
        return {
            "id": record.id,
            "experiment": record.experiment,
            "state": record.state,
            "error": record.error,
            "created": record.created,
            "ended": record.ended,
            "spec": record.spec,
            "best_run": record.best_run,
            "model": record.model,
            "trials": counts,
        }

    def get_children(self) -> list[Run]:
        """The trials, each an ordinary run, by trial number."""
        return [Run(self.workspace, r.id) for r in self.workspace.history.runs.of_sweep(self.id)]

    def get_best_run_by_primary_metric(self) -> Run | None:
        """The completed trial with the best last value of the primary metric by the goal
        (ties: the lower trial number), None while none completed with a value."""
        from expkit.sweeps.best import best_trial

        best = best_trial(self.workspace, self.id)
        return None if best is None else Run(self.workspace, best.id)

    def get_metrics(self) -> dict[str, dict[str, Any]]:
        """Each trial's metrics, {run id: Run.get_metrics()} (as HyperDriveRun's)."""
        return {run.id: run.get_metrics() for run in self.get_children()}

    def register_best_model(self) -> Model:
        """Register the best trial's model (as `register_best: true` does; see
        `expkit.sweeps.best.register_best`): the version already registered if it was."""
        from expkit.sweeps.best import register_best

        return Model._from_version(self.workspace, register_best(self.workspace, self.id))

    def wait_for_completion(
        self, show_output: bool = False, timeout: float | None = None, raise_on_error: bool = True
    ) -> dict[str, Any]:
        """Block until the sweep ends; with `show_output`, print each trial as its state
        changes, then the trials' table. Raises RunFailed (with `raise_on_error`) when it
        failed or was canceled, or when its driver is gone before its end (`expkit sweeps
        resume ID` goes on with it), TimeoutError after `timeout` seconds."""
        from expkit.history import driver_alive
        from expkit.sweeps.report import objective_of, render, space_names, trial_rows

        deadline = time.monotonic() + timeout if timeout else None
        seen: dict[str, str] = {}
        while True:
            record = self._record
            if show_output:
                for row in trial_rows(self.workspace, record):
                    if seen.get(row.run_id) != row.state:
                        seen[row.run_id] = row.state
                        print(f"trial {row.trial} ({row.run_id}): {row.state}", flush=True)
            if record.finished:
                break
            if not driver_alive(record.driver_pid, record.driver_start):
                time.sleep(0.5)  # a driver taking over has recorded itself by now
                record = self._record
                if not record.finished and not driver_alive(record.driver_pid, record.driver_start):
                    raise RunFailed(
                        f"sweep {self.id}: its driver process (pid {record.driver_pid}) is "
                        f"gone; `expkit sweeps resume {self.id}` goes on with it"
                    )
                continue
            if deadline and time.monotonic() > deadline:
                raise TimeoutError(f"sweep {self.id} still {record.state} after {timeout}s")
            time.sleep(0.2)
        if show_output:
            rows = trial_rows(self.workspace, record)
            for line in render(rows, objective_of(record.spec), space_names(record.spec)):
                print(line)
        details = self.get_details()
        if raise_on_error and details["state"] != "completed":
            raise RunFailed(f"sweep {self.id} {details['state']}: {details['error']}")
        return details

    def cancel(self) -> None:
        """Ask the sweep's driver to stop it: its running trials are canceled (their
        outputs kept) and it ends canceled."""
        self.workspace.history.sweeps.request_cancel(self.id)


def _is_sweep_file(path: Path) -> bool:
    """Whether the YAML file `path` is a sweep spec (it has a `search_space`) rather than a
    job spec; a file that cannot be read is left to the job spec's errors."""
    from expkit.job import load_yaml

    try:
        raw = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, ValueError, UserError):
        return False
    return isinstance(raw, dict) and "search_space" in raw


class Model:
    """A registered model version: `Model(ws, "pt-dnn")` (the latest), `Model(ws, "pt-dnn",
    2)`, or a reference `Model(ws, "pt-dnn:2")`, `Model(ws, "pt-dnn@champion")`."""

    def __init__(self, workspace: Workspace, name: str, version: int | None = None) -> None:
        """Raises UserError for an unknown model, version or alias, or a malformed reference."""
        from expkit.registry import ModelStore

        store = ModelStore(workspace)
        found = store.get(name, version) if version is not None else store.resolve(name)
        self._set(workspace, found)

    @classmethod
    def _from_version(cls, workspace: Workspace, version: ModelVersion) -> Model:
        model = cls.__new__(cls)
        model._set(workspace, version)
        return model

    def _set(self, workspace: Workspace, version: ModelVersion) -> None:
        self.workspace = workspace
        self.name, self.version, self.path = version.name, version.version, version.path
        self.files, self.lineage, self.tags = version.files, version.lineage, version.tags

    def __repr__(self) -> str:
        return f"Model({self.name!r}, version={self.version})"

    @property
    def aliases(self) -> list[str]:
        """This version's aliases (`champion`), as the workspace has them now."""
        found = self.workspace.history.aliases.of_model(self.name)
        return [alias for alias, version in found.items() if version == self.version]

    def download(self, target_dir: str | Path = ".", overwrite: bool = False) -> list[Path]:
        """Copy this version's files into the folder `target_dir` (created if needed), each
        checked against its recorded sha256. Raises UserError when a file is already there
        (unless `overwrite`), `target_dir` is a link to nothing or cannot be written,
        `downloads.Damaged` when a file has no intact stored copy."""
        from expkit import downloads
        from expkit.registry import ModelStore

        folder = Path(target_dir)
        downloads.check_folder(folder)
        try:
            return ModelStore(self.workspace).download(self.name, self.version, folder, overwrite)
        except OSError as error:  # making the folder (read-only, full): one line, no traceback
            raise downloads.destination_error(error, folder) from None
