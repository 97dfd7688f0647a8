"""The `azureml` compute target: each stage of the lifecycle mapped onto Azure ML (SDK v1).

    prepare       the workspace (config.json or compute.options.workspace) and the job's Azure
                  ML Environment; the snapshot is taken by the lifecycle as for any target
    scale         the AmlCompute cluster, got or created, until it can take the run
    run           a ScriptRunConfig (MpiConfiguration for horovod, PyTorchConfiguration for
                  torchrun) submitted with Experiment.submit from the run's working copy;
                  states, logs and metrics followed live; a cancel cancels the Azure ML run
    post-process  (at the end of run) outputs/ and logs downloaded into the working copy, which
                  the lifecycle then seals and collects as for a local run
    register      the core registers locally; `model.registries: [azureml]` also in Azure ML

The processes the distributed backend builds for a local launch are not used: Azure ML starts
the ranks itself. Everything that reaches Azure is an azureml-core call made here, in
cluster.py or in monitor.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import expkit.context
from expkit.plugin import (
    Allocation,
    Canceled,
    ComputeTarget,
    Environment,
    JobSpec,
    Process,
    RunContext,
    StageFailed,
    UserError,
)
from expkit_azureml.options import TAKES, AzureOptions

# The stages' helpers (cluster.py, monitor.py, submission.py, workspace.py, forward.py) are
# imported by the methods that use them: expkit collects every compute target for every run,
# and a run elsewhere should not pay for importing them.
if TYPE_CHECKING:
    from expkit_azureml.workspace import WorkspaceRef

RECORD_FILE = "azureml.json"  # in the run's folder: the Azure ML run it became
# Uploaded with the snapshot: expkit's package (its in-script API), and of this plugin only
# forward.py, the forwarder that the run's EXPKIT_FORWARDER names (see add_in_script_api).
EXPKIT_PACKAGE = Path(expkit.context.__file__).parent  # the in-script API's package
FORWARDER_PACKAGE = "expkit_azureml"
BACKENDS = ("none", "horovod", "torchrun")
# An .amlignore that ignores nothing: the upload is the expkit snapshot, which already honoured
# .expkitignore; without it Azure ML would apply the source folder's .gitignore on top.
AMLIGNORE = (
    "# written by expkit: the upload is the run's snapshot, .expkitignore already honoured\n"
)


@dataclass
class Session:
    """What one run holds between the stages."""

    options: AzureOptions
    ref: WorkspaceRef
    auth: str
    workspace: Any
    environment: Any = None
    cluster: Any = None
    run: Any = None  # the submitted azureml run
    finished: bool = False  # nothing to cancel any more
    last_nodes: str | None = None  # the cluster's node counts, as last said


class AzureMLTarget(ComputeTarget):
    name = "azureml"
    description = "Azure ML: an AmlCompute cluster, a ScriptRunConfig, Experiment.submit"
    launches_ranks = True  # MpiConfiguration / PyTorchConfiguration start the ranks there
    takes = TAKES
    poll_seconds = 5.0  # monitor.POLL_SECONDS
    cluster_poll_seconds = 10.0  # cluster.POLL_SECONDS

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    # -- before anything runs (offline) ---------------------------------------------------
    def check(self, job: JobSpec) -> None:
        """Everything that can be checked without Azure: the options together, backend,
        environment, data (each option alone was checked by the core against `takes`)."""
        from expkit_azureml.submission import _data_problems, package_name

        options = AzureOptions.from_job(job)
        options.check(job.resources.nodes)
        if job.data:
            raise UserError(_data_problems(job)[0])
        backend = job.distributed.backend
        if backend not in BACKENDS:
            raise UserError(f"distributed: azureml runs {', '.join(BACKENDS)}, not {backend!r}")
        env = job.environment
        if env.builder not in ("inherit", "pip"):
            raise UserError(
                f"environment: azureml builds its environment from pip packages (`inherit` or "
                f"`pip`), not with builder {env.builder!r}"
            )
        if env.builder == "inherit" and env.packages:
            raise UserError("environment: `inherit` takes no packages; use `pip: [...]`")
        has_horovod = "horovod" in {package_name(p) for p in env.packages}
        if backend == "horovod" and not (
            has_horovod or options.base_image or options.curated_environment
        ):
            raise UserError(
                "distributed: horovod on Azure ML needs horovod in the image: list it in "
                "environment.pip (horovod 0.28.1 does not build against torch >= 2.1 as "
                "published; see the README), or set compute.options.base_image or "
                "curated_environment to an image that has it"
            )

    def preflight(self, job: JobSpec) -> Any:
        """Before a run is created (not for --dry-run): config.json, credentials, the
        workspace and the cluster, each problem one UserError. Returns the workspace."""
        from expkit_azureml.workspace import credentials, workspace_ref

        options = AzureOptions.from_job(job)
        ref = workspace_ref(options, job.source_directory)
        workspace = self.open_workspace(ref, credentials(options))
        if not options.create:
            from azureml.core.compute import ComputeTarget
            from azureml.core.compute_target import ComputeTargetException

            try:
                ComputeTarget(workspace=workspace, name=options.cluster)
            except ComputeTargetException:
                raise UserError(
                    f"compute.options.cluster: workspace {ref.workspace_name!r} has no compute "
                    f"target {options.cluster!r} and compute.options.create is false; create it "
                    "in Azure ML studio, name an existing one, or set create: true"
                ) from None
        return workspace

    # -- prepare ----------------------------------------------------------------------------
    def prepare(self, ctx: RunContext) -> Environment:
        from expkit_azureml.submission import build_environment, environment_hash, pip_packages
        from expkit_azureml.workspace import credentials, workspace_ref

        job = ctx.job
        options = AzureOptions.from_job(job)
        ref = workspace_ref(options, job.source_directory)
        auth = credentials(options)
        workspace = self.open_workspace(ref, auth)
        ctx.say(f"Azure ML workspace {ref.workspace_name} ({ref.source}; {auth} credentials)")
        session = self._sessions[ctx.run_id] = Session(options, ref, auth, workspace)
        session.environment = build_environment(job, options, workspace)
        digest = environment_hash(session.environment)
        for note in _ignored_options(job):
            ctx.say(note)
        if options.curated_environment:
            what = f"curated environment {options.curated_environment}"
            if job.environment.packages:
                what += f" + pip {', '.join(job.environment.packages)}"
        else:
            what = f"pip {', '.join(pip_packages(job, options))}"
        return Environment(
            python=sys.executable,  # for what runs here (exports); the script runs on Azure
            hash=digest,
            cache_hit=False,
            reason=(
                f"azureml environment {session.environment.name} ({digest}): {what}; its image "
                "is built, or found in the workspace's registry, when the run starts"
            ),
        )

    # -- scale ------------------------------------------------------------------------------
    def acquire(self, ctx: RunContext) -> Allocation:
        from expkit_azureml.cluster import wait_until_ready

        session = self._session(ctx)
        session.cluster = self.find_cluster(session.workspace, session.options, ctx.say)
        text = wait_until_ready(session.cluster, ctx, session.options, self.cluster_poll_seconds)
        return Allocation(hosts=[session.options.cluster], slots=[], description=text)

    # -- run --------------------------------------------------------------------------------
    def execute(self, ctx: RunContext, processes: list[Process], allocation: Allocation) -> int:
        """Submit the job as a ScriptRunConfig and follow it to its end (`processes`, the local
        launch the backend built, are not used: Azure ML starts the ranks)."""
        from expkit_azureml import monitor
        from expkit_azureml.submission import build_script_run_config
        from expkit_azureml.workspace import first_line

        session = self._session(ctx)
        job = ctx.job
        config = build_script_run_config(
            job, stage_source(ctx), session.environment, session.options
        )
        tags = {"expkit.run_id": ctx.run_id, **job.tags}
        try:
            run = self.submit(session.workspace, job.experiment, config, tags)
        except Exception as error:
            raise StageFailed(f"Azure ML did not take the run: {first_line(error)}") from error
        session.run = run
        self._record(ctx, session, run)
        follower = monitor.Follower(run, ctx, poll_seconds=self.poll_seconds)
        follower.waiting = lambda: self._report_nodes(ctx, session)
        try:
            status = follower.follow()
        except StageFailed:  # contact lost: the run may go on; it is not canceled
            session.finished = True
            raise
        finally:
            session.finished = session.finished or follower.cancel_sent
        session.finished = True
        ctx.say(f"Azure ML run {run.id}: {status}")
        collect(run, ctx)
        if status == "Completed":
            return 0
        if status == "Canceled":
            raise Canceled(f"Azure ML run {run.id} was canceled")
        raise StageFailed(f"Azure ML run {run.id} failed: {follower.error()}")

    # -- the calls that reach Azure, one method each -------------------------------------------
    def open_workspace(self, ref: WorkspaceRef, auth: str) -> Any:
        from expkit_azureml.workspace import connect

        return connect(ref, auth)

    def find_cluster(self, workspace: Any, options: AzureOptions, say: Any) -> Any:
        from expkit_azureml.cluster import get_or_create

        return get_or_create(workspace, options, say)

    def submit(self, workspace: Any, experiment: str, config: Any, tags: dict[str, str]) -> Any:
        from azureml.core import Experiment

        return Experiment(workspace, experiment).submit(config, tags=tags)

    def _record(self, ctx: RunContext, session: Session, run: Any) -> None:
        """Which Azure ML run this is: tags of the expkit run, and azureml.json in its folder
        (what the `azureml` model registry reads)."""
        try:
            url = run.get_portal_url()
        except Exception:
            url = ""
        record = {
            "workspace": session.ref.to_dict(),
            "auth": session.auth,
            "experiment": ctx.job.experiment,
            "run_id": run.id,
            "portal_url": url,
        }
        (ctx.run_dir / RECORD_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        ctx.set_tags({"azureml.run_id": run.id, "azureml.experiment": ctx.job.experiment})
        ctx.say(f"submitted Azure ML run {run.id} to {session.options.cluster}: {url}".rstrip(": "))

    def _report_nodes(self, ctx: RunContext, session: Session) -> None:
        """While the run waits for nodes: the cluster's node counts, when they change."""
        from expkit_azureml.cluster import node_counts

        cluster = session.cluster
        if cluster is None or not hasattr(cluster, "refresh_state"):
            return
        cluster.refresh_state()
        text = node_counts(cluster)
        if text != session.last_nodes:
            session.last_nodes = text
            ctx.say(text)

    def release(self, ctx: RunContext, allocation: Allocation) -> None:
        """Nodes go back by themselves (idle scale-down); a run still going is canceled."""
        from expkit_azureml.workspace import first_line

        session = self._sessions.pop(ctx.run_id, None)
        if session is not None and session.run is not None and not session.finished:
            try:
                session.run.cancel()
            except Exception as error:
                ctx.say(f"could not cancel Azure ML run {session.run.id}: {first_line(error)}")

    def _session(self, ctx: RunContext) -> Session:
        session = self._sessions.get(ctx.run_id)
        if session is None:  # a stage called without prepare: a bug in the caller
            raise RuntimeError(f"run {ctx.run_id}: the azureml target was not prepared")
        return session

    # -- expkit run JOB --dry-run -----------------------------------------------------------
    def dry_run(self, job: JobSpec) -> str:
        """The submission as YAML: workspace, cluster, upload, run configuration (with the
        environment); built with azureml-core, nothing contacted."""
        import yaml

        from expkit_azureml.submission import (
            build_environment,
            build_script_run_config,
            provisioning_configuration,
            provisioning_settings,
            serialized_run_configuration,
        )
        from expkit_azureml.workspace import credentials, workspace_ref

        self.check(job)
        options = AzureOptions.from_job(job)
        try:
            ref = workspace_ref(options, job.source_directory)
            workspace: Any = {**ref.to_dict(), "from": ref.source}
        except UserError as problem:
            workspace = f"not found here: {problem}"
        try:
            auth = credentials(options)
        except UserError as problem:
            auth = f"none found here: {problem}"
        curated = options.curated_environment
        if curated:
            from azureml.core import Environment as AzureEnvironment

            environment = AzureEnvironment(name=curated)
        else:
            environment = build_environment(job, options)
        config = build_script_run_config(job, job.source_directory, environment, options)
        run_configuration = serialized_run_configuration(config)
        if curated:
            run_configuration["environment"] = {
                "name": curated,
                "curated": "read from the workspace at submit",
                "added_pip_packages": list(job.environment.packages),
            }
        document = {
            "workspace": workspace,
            "credentials": auth,
            "experiment": job.experiment,
            "compute_target": {
                "name": options.cluster,
                "when_missing": "created" if options.create else "an error (create: false)",
                "provisioning_configuration": provisioning_settings(
                    provisioning_configuration(options)
                ),
                "provisioning_timeout_seconds": options.provisioning_timeout,
            },
            "source_directory": {
                "path": job.source_directory,
                "uploaded": (
                    "the run's snapshot of it (.expkitignore honoured), with expkit's in-script "
                    f"API as expkit/ ({sum(1 for _ in _package_files(EXPKIT_PACKAGE))} files), "
                    f"its forwarder to the Azure ML run as {FORWARDER_PACKAGE}/ (2 files: an "
                    "empty __init__.py and forward.py) and an .amlignore that ignores nothing "
                    "more"
                ),
            },
            "run_configuration": run_configuration,
        }
        notes = _ignored_options(job)
        if notes:
            document["notes"] = notes
        header = "# the Azure ML submission, built with azureml-core; nothing was contacted\n"
        return header + yaml.safe_dump(document, sort_keys=False, width=100)


def _ignored_options(job: JobSpec) -> list[str]:
    """Backend options that only apply to launchers expkit starts itself."""
    return [
        f"distributed.options.{name} is not used on Azure ML, which starts the ranks itself "
        f"({'MPI' if job.distributed.backend == 'horovod' else 'PyTorchConfiguration'})"
        for name in job.distributed.options
    ]


def _package_files(package: Path) -> Any:
    return (
        p
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def stage_source(ctx: RunContext) -> Path:
    """The folder uploaded as the ScriptRunConfig's source directory: the run's working copy
    of its snapshot, plus what the script imports from expkit on Azure (`add_in_script_api`)."""
    source = ctx.work_dir
    source.mkdir(parents=True, exist_ok=True)
    for folder in add_in_script_api(source):
        what = "expkit's in-script API" if folder == "expkit" else "the Azure ML forwarder"
        ctx.say(f"the snapshot has its own {folder}/: {what} is not added to it")
    if not (source / ".amlignore").exists():
        (source / ".amlignore").write_text(AMLIGNORE, encoding="utf-8")
    return source


def add_in_script_api(source: Path) -> list[str]:
    """Add to `source` expkit's package as expkit/, so that `from expkit import Run` works on
    Azure (its in-script API is standard library only), and the forwarder that the run's
    EXPKIT_FORWARDER names, as expkit_azureml/ with an empty __init__.py and forward.py (not
    this plugin, whose __init__ needs expkit's plugin machinery and azureml-train-core). A
    folder the snapshot has already is left as it is: returns their names."""
    from expkit_azureml import forward

    kept = []
    if (source / "expkit").exists():
        kept.append("expkit")
    else:
        shutil.copytree(
            EXPKIT_PACKAGE,
            source / "expkit",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    folder = source / FORWARDER_PACKAGE
    if folder.exists():
        kept.append(FORWARDER_PACKAGE)
    else:
        folder.mkdir()
        (folder / "__init__.py").write_text("", encoding="utf-8")
        shutil.copyfile(forward.__file__, folder / "forward.py")
    return kept


# What is downloaded after the run, and where it goes in the working copy: the lifecycle then
# seals work/outputs and moves work/logs into the run's logs.
DOWNLOADS = (
    ("outputs/", "."),
    ("logs/", "."),  # the script's ./logs, including expkit's metric channel
    ("azureml-logs/", "logs/azureml"),
    ("user_logs/", "logs/azureml"),
    ("system_logs/", "logs/azureml"),
)


def collect(run: Any, ctx: RunContext) -> None:
    """Download the run's outputs and logs into the working copy; the script's metric channel
    joins the run's (for the metrics it wrote after the last live read)."""
    from expkit_azureml import monitor
    from expkit_azureml.workspace import first_line

    problems = []
    for prefix, folder in DOWNLOADS:
        target = ctx.work_dir / folder
        target.mkdir(parents=True, exist_ok=True)
        try:
            run.download_files(prefix=prefix, output_directory=str(target), append_prefix=True)
        except Exception as error:
            problems.append(f"{prefix}: {first_line(error)}")
    channel = ctx.work_dir / "logs" / "expkit-metrics"
    if channel.is_dir():
        monitor.merge_metric_files(channel, ctx.run_dir / "metrics")
        shutil.rmtree(channel, ignore_errors=True)
    for problem in problems:
        ctx.say(f"could not download {problem}")
    if problems and problems[0].startswith("outputs/"):
        raise StageFailed(
            f"the outputs of Azure ML run {run.id} were not downloaded: {problems[0]}"
        )
