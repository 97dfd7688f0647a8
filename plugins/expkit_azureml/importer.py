"""An Azure ML job as an expkit job spec: an `azureml.train.dnn.PyTorch` estimator (or another
azureml.train Estimator) or a `ScriptRunConfig`; a `HyperDriveConfig` of one of those as a sweep
spec with its trial's job spec (hyperdrive.py has that mapping).

    expkit import azureml train_azure.py:estimator -o job.yaml      # the command
    expkit import azureml hyperdrive.py -o sweep.yaml               # + sweep-job.yaml, the trial
    from expkit_azureml import job_from_azureml                     # Python, on a built object
    job = job_from_azureml(estimator)                                # -> expkit JobSpec

`FILE.py` is executed as a module (named `__expkit_import__`, so `if __name__ == "__main__":`
blocks do not run), in its own folder, with its folder on sys.path; what it prints goes to
stderr. The calls of azureml that would reach Azure are replaced while it runs, so that the
seed's own code runs unchanged and offline:

    Workspace.from_config(), Workspace.get(...),   an offline workspace: no credentials, no
    Workspace(...)                                  network (config.json is read for names only;
                                                    ws.name, subscription_id, resource_group
                                                    from it, else "offline"; ws.location
                                                    "offline"; get_details() those;
                                                    compute_targets: the clusters it created)
    ComputeTarget(ws, name), AmlCompute(ws, name)  "not found" (ComputeTargetException), so the
                                                    seed's get-or-create goes on to create it
    ComputeTarget.create(ws, name, config)         an offline AmlCompute; its provisioning
                                                    configuration becomes compute.options
    cluster.wait_for_completion(...)               returns at once
    cluster.get_status()                           an idle cluster as created (0 nodes, Steady);
                                                    .serialize() as azureml's
    Experiment(ws, name)                            offline; its name is the job's experiment
    experiment.submit(config)                      stops the module: `config` is the job (or
                                                    the HyperDriveConfig) when REF names none
                                                    (FILE.py alone); in a module that builds a
                                                    HyperDriveConfig, a submit of a single run
                                                    before it is left out, and so are the
                                                    lines that use that run (the notebook's
                                                    first training run)
    Environment.get(ws, name)                       a curated environment, by name

Everything else is the real azureml-core and azureml-train-core, and the estimator is built
by them, offline. The job spec carries what the job does, not the estimator's framework pins:

    estimator / ScriptRunConfig           expkit job spec
    source_directory, entry_script|script source_directory (absolute), entry_script
    script_params | arguments             args ({num_epochs: 30} for --num_epochs 30 pairs)
    pip_packages (the user's)             environment: {pip: [...]} (or inherit)
    conda_packages, custom image          compute.options.conda_packages, base_image
    curated environment                   compute.options.curated_environment
    compute_target (name)                 compute: azureml, options.cluster (+ provisioning)
    compute_target='local'                compute: local
    node_count, MpiConfiguration          resources.nodes, processes_per_node; distributed:
    PyTorchConfiguration                  horovod (MPI) or torchrun (PyTorchConfiguration)
    use_gpu / a GPU image                 resources.gpus_per_node: one per process
    max_run_duration_seconds              timeout

Not carried: framework_version and the estimator's own packages (torch 1.x, horovod 0.18 and
Python 3.6 for PyTorch 1.4: on Azure expkit installs this interpreter's torch), Python
versions (expkit uses this interpreter's: a conda specification's own pin, python_version= or
`python=3.x` in a conda yaml, that excludes it is a UserError up front, not a pip resolution
error in prepare; the SDK's default pins are not the user's), data inputs and datasets (a
UserError: give them as `data:` by hand). Note that the estimator ignores
`process_count_per_node` when `distributed_training=MpiConfiguration()` is given (the
MpiConfiguration's own count, 1 by default, is what Azure ML runs): the job spec says what
Azure ML would have run.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import re
import sys
import traceback
import types
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expkit.plugin import NAME, NAME_RULE, JobImporter, JobSpec, Option, UserError, declare_options

MODULE_NAME = "__expkit_import__"
OFFLINE = "offline"  # what the offline workspace says for what only Azure knows (ws.location)
SCRIPT_RUN_CONFIG_DEFAULT_DURATION = 2592000  # ScriptRunConfig's default: 30 days
DEFAULT_VARIABLES = {"EXAMPLE_ENV_VAR", "NCCL_TREE_THRESHOLD"}  # the SDK's and the estimator's
MPI_COMMUNICATORS = ("IntelMpi", "OpenMpi", "Mpi")
WHAT = (
    "an azureml.train.dnn.PyTorch estimator (or another azureml.train Estimator), "
    "a ScriptRunConfig or a HyperDriveConfig"
)
JOB_CLASSES = ("ScriptRunConfig", "MMLBaseEstimator", "HyperDriveConfig")
SWEEP_CLASSES = ("HyperDriveConfig", "HyperDriveRunConfig")


@dataclass
class Captured:
    """What the offline stand-ins saw while FILE.py ran."""

    experiments: list[str] = field(default_factory=list)
    clusters: dict[str, dict[str, Any]] = field(default_factory=dict)
    curated: set[str] = field(default_factory=set)
    submitted: Any = None
    left_out: list[int] = field(default_factory=list)  # lines of a submit before the sweep's


class _Submitted(Exception):
    """experiment.submit(config) during an import: the module stops there."""

    def __init__(self, config: Any) -> None:
        super().__init__("submitted")
        self.config = config


class AzureMLImporter(JobImporter):
    name = "azureml"
    description = f"{WHAT}, named FILE.py:NAME"
    takes = declare_options(
        experiment=Option(
            str,
            pattern=NAME.pattern,
            text=f"an experiment name ({NAME_RULE})",
            help="the job's experiment (default: the experiment it is submitted to, else "
            "the file's name)",
        )
    )

    def import_job(self, ref: str, options: dict[str, Any]) -> dict[str, Any]:
        """The job spec of the estimator or ScriptRunConfig `ref` names, or, for a
        HyperDriveConfig, the sweep spec with its trial's job spec inline (hyperdrive.py)."""
        from expkit_azureml.hyperdrive import is_hyperdrive_config, sweep_dict, trial_object

        path, name = parse_ref(ref)
        namespace, captured = load(path)
        if captured.left_out:
            lines = ", ".join(map(str, captured.left_out))
            print(
                f"{path.name}: left out line{'s' * (len(captured.left_out) > 1)} {lines}: a "
                "run submitted before the sweep, and what uses it",
                file=sys.stderr,
            )
        obj = pick(namespace, captured, name, path, ref)
        experiment = options.get("experiment")
        if not is_hyperdrive_config(obj):
            return job_dict(obj, captured, path.parent, experiment, default=path.stem)
        job = job_dict(trial_object(obj), captured, path.parent, experiment, default=path.stem)
        return sweep_dict(obj, job, namespace)


def job_from_azureml(config: Any, experiment: str | None = None) -> JobSpec:
    """The expkit job spec of an estimator or ScriptRunConfig built in this process (paths
    relative to the current folder)."""
    from expkit_azureml.hyperdrive import is_hyperdrive_config

    if is_hyperdrive_config(config):
        raise UserError(
            "job_from_azureml: a HyperDriveConfig is a sweep, not a job; give its estimator "
            "or run_config, or convert the file with `expkit import azureml FILE.py -o sweep.yaml`"
        )
    if not is_job_object(config):
        raise UserError(f"job_from_azureml: {type(config).__name__} is not {WHAT}")
    raw = job_dict(config, Captured(), Path.cwd(), experiment, default="imported")
    return JobSpec.from_dict(raw, source=f"<{type(config).__name__}>", base_dir=Path.cwd())


# -- finding the object ---------------------------------------------------------------------
def parse_ref(ref: str) -> tuple[Path, str | None]:
    file, sep, name = ref.rpartition(":")
    if not sep or not file.endswith(".py") or not name.isidentifier():
        file, name = ref, ""
    if not file.endswith(".py"):
        raise UserError(f"{ref}: expected FILE.py:NAME, e.g. train_azure.py:estimator")
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"{ref}: no such file {path}")
    return path, name or None


def load(path: Path) -> tuple[dict[str, Any], Captured]:
    """Run FILE.py offline (see the module's docstring); its globals and what it captured."""
    try:
        source = path.read_bytes()
        tree = ast.parse(source, str(path))
        code = compile(tree, str(path), "exec")
    except SyntaxError as error:
        raise UserError(f"{path}, line {error.lineno}: {error.msg}") from None
    module = types.ModuleType(MODULE_NAME)
    module.__file__ = str(path)
    captured = Captured()
    previous_cwd, previous_module = os.getcwd(), sys.modules.get(MODULE_NAME)
    sys.modules[MODULE_NAME] = module
    sys.path.insert(0, str(path.parent))
    os.chdir(path.parent)
    try:
        with quiet(), offline_azureml(captured):
            if sweep_lines(tree):
                run_to_the_sweep(tree, path, module.__dict__, captured)
            else:
                exec(code, module.__dict__)
    except _Submitted as stop:
        captured.submitted = stop.config
    except SystemExit as stop:
        raise UserError(f"{path}: exited (code {stop.code}) while it was imported") from None
    except Exception as error:
        raise UserError(failure(path, error)) from None
    finally:
        os.chdir(previous_cwd)
        with contextlib.suppress(ValueError):
            sys.path.remove(str(path.parent))
        if previous_module is None:
            sys.modules.pop(MODULE_NAME, None)
        else:
            sys.modules[MODULE_NAME] = previous_module
    return module.__dict__, captured


def sweep_lines(tree: ast.Module) -> list[int]:
    """The lines where the module builds a HyperDriveConfig (a sweep), by its source."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and _called(node.func) in SWEEP_CLASSES
    ]


def _called(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")


def run_to_the_sweep(
    tree: ast.Module, path: Path, namespace: dict[str, Any], captured: Captured
) -> None:
    """Run a module that builds a HyperDriveConfig up to its submit, one top-level statement
    at a time: as the seed's notebook does, it may first submit a single run of the estimator
    (`run = experiment.submit(estimator)`). Such a submit before the sweep is built is left
    out, and so is every later statement that uses what it bound (`run.wait_for_completion()`,
    `model = run.register_model(...)`): a NameError of one of those names. Anything else is as
    when the module runs whole: the sweep's submit stops it (_Submitted)."""
    import __future__

    from expkit_azureml.hyperdrive import is_hyperdrive_config

    flags = 0
    left_out: set[str] = set()
    sweeps = sweep_lines(tree)
    for statement in tree.body:
        if isinstance(statement, ast.ImportFrom) and statement.module == "__future__":
            for alias in statement.names:
                flags |= getattr(__future__, alias.name).compiler_flag
        code = compile(ast.Module([statement], type_ignores=[]), str(path), "exec", flags, True)
        try:
            exec(code, namespace)
        except _Submitted as stop:
            end = statement.end_lineno or statement.lineno
            if is_hyperdrive_config(stop.config) or not any(line > end for line in sweeps):
                raise
            captured.left_out.append(statement.lineno)
            left_out |= bound_names(statement)
        except NameError as error:
            if error.name not in left_out:
                raise
            captured.left_out.append(statement.lineno)
            left_out |= bound_names(statement)


def bound_names(statement: ast.stmt) -> set[str]:
    """The names a statement binds (assigned, imported, defined), for what uses them next."""
    names = {
        n.id
        for n in ast.walk(statement)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store | ast.Del)
    }
    for node in ast.walk(statement):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def failure(path: Path, error: Exception) -> str:
    """`FILE.py, line N: Error: message` for an exception raised while FILE.py ran."""
    from expkit_azureml.workspace import first_line

    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == str(path)]
    where = f"{path}, line {frames[-1].lineno}" if frames else str(path)
    message = first_line(error)
    if type(error).__name__ == "ComputeTargetException" and "NotFound" in message:
        if _looked_up_here(error, path):  # ComputeTarget(ws, name) in the file itself
            return (
                f"{where}: a compute target is not looked up in Azure during an import; create "
                "it in `except ComputeTargetException:` as the article does, or pass its name "
                "as a string (compute_target='gpu-cluster')"
            )
        return (
            f"{where}: this call looks a compute target up in Azure, which an import does not "
            f'do ({message}); remove it, or put it under `if __name__ == "__main__":`'
        )
    return f"{where}: {type(error).__name__}: {message} (while importing it)"


def _looked_up_here(error: Exception, path: Path) -> bool:
    """Whether `error` came from constructing a ComputeTarget (the lookup) right in FILE.py,
    not from deeper in a method of one."""
    frames = traceback.extract_tb(error.__traceback__)
    mine = [i for i, frame in enumerate(frames) if frame.filename == str(path)]
    return bool(mine) and mine[-1] + 1 < len(frames) and frames[mine[-1] + 1].name == "__new__"


def is_job_object(obj: Any) -> bool:
    """Whether `obj` is what the importer converts: an estimator, a ScriptRunConfig, or a
    HyperDriveConfig (a sweep of one of those)."""
    names = {(c.__module__.split(".")[0], c.__name__) for c in type(obj).__mro__}
    return bool(names & {("azureml", n) for n in JOB_CLASSES})


def pick(
    namespace: dict[str, Any], captured: Captured, name: str | None, path: Path, ref: str
) -> Any:
    found = sorted(k for k, v in namespace.items() if not k.startswith("_") and is_job_object(v))
    if name is None:
        if captured.submitted is not None:
            return captured.submitted
        if len(found) == 1:
            return namespace[found[0]]
        listed = f"it defines {', '.join(found)}" if found else f"it defines no {WHAT}"
        raise UserError(f"{ref}: name the object to import as {path.name}:NAME ({listed})")
    if name not in namespace:
        listed = f"; it defines {', '.join(found)}" if found else ""
        hint = " (the module stopped at experiment.submit)" if captured.submitted else ""
        raise UserError(f"{ref}: {path.name} defines no {name!r}{hint}{listed}")
    obj = namespace[name]
    if not is_job_object(obj):
        raise UserError(f"{ref}: {name} is a {type(obj).__name__}, not {WHAT}")
    return obj


# -- running the user's module offline ------------------------------------------------------
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The module's prints on stderr (stdout may be the job spec), the SDK's warnings off."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


_MISSING = object()


@contextlib.contextmanager
def offline_azureml(captured: Captured) -> Iterator[None]:
    """azureml's Azure-facing calls replaced by offline stand-ins, for the `with` block."""
    from azureml.core import Environment, Experiment, Workspace
    from azureml.core.compute import AmlCompute, ComputeTarget
    from azureml.core.compute.amlcompute import AmlComputeStatus, ScaleSettings

    def offline_workspace(
        subscription_id: str = "", resource_group: str = "", workspace_name: str = ""
    ) -> Any:
        workspace = Workspace.__new__(Workspace)
        workspace._subscription_id = subscription_id or OFFLINE
        workspace._resource_group = resource_group or OFFLINE
        workspace._workspace_name = workspace_name or OFFLINE
        workspace._auth = None
        workspace._location = OFFLINE  # ws.location without asking Azure
        workspace._workspace_autorest_object = None
        return workspace

    def from_config(path: Any = None, auth: Any = None, _logger: Any = None, **_: Any) -> Any:
        from expkit_azureml.workspace import find_config

        found = find_config([Path(path or ".").resolve()])
        if found is None:
            return offline_workspace()
        import json

        with contextlib.suppress(OSError, ValueError):
            data = json.loads(found.read_text(encoding="utf-8"))
            return offline_workspace(
                data.get("subscription_id", ""),
                data.get("resource_group", ""),
                data.get("workspace_name") or data.get("workspace", ""),
            )
        return offline_workspace()

    def workspace_init(self: Any, subscription_id: str = "", resource_group: str = "",
                       workspace_name: str = "", *args: Any, **kwargs: Any) -> None:  # fmt: skip
        self.__dict__.update(
            vars(offline_workspace(subscription_id, resource_group, workspace_name))
        )

    def workspace_get(name: str, *args: Any, subscription_id: str = "",
                      resource_group: str = "", **kwargs: Any) -> Any:  # fmt: skip
        return offline_workspace(subscription_id, resource_group, name)

    def create(workspace: Any, name: str, provisioning_configuration: Any) -> Any:
        from expkit_azureml.submission import provisioning_settings

        settings = provisioning_settings(provisioning_configuration)
        captured.clusters[name] = settings
        cluster = object.__new__(AmlCompute)
        cluster.__dict__.update(
            name=name, workspace=workspace, location=None, cluster_location=None,
            vm_size=settings["vm_size"], vm_priority=settings["vm_priority"],
            provisioning_state="Succeeded", provisioning_errors=None,
            scale_settings=ScaleSettings(settings["min_nodes"], settings["max_nodes"],
                                         settings["idle_seconds_before_scaledown"]),
        )  # fmt: skip
        cluster.status = AmlComputeStatus(  # what get_status() answers: an idle new cluster
            "Steady", None, None, 0, None, None, None, "Succeeded", None,
            cluster.scale_settings, 0, settings["vm_priority"], settings["vm_size"],
        )  # fmt: skip
        created[name] = cluster
        return cluster

    def details(self: Any) -> dict[str, Any]:
        return {
            "name": self.name,
            "location": OFFLINE,
            "subscriptionId": self.subscription_id,
            "resourceGroup": self.resource_group,
        }

    def experiment_init(self: Any, workspace: Any, name: str, *args: Any, **kwargs: Any) -> None:
        self._workspace, self._name, self._id = workspace, name, None
        captured.experiments.append(name)

    def submit(self: Any, config: Any, tags: Any = None, **kwargs: Any) -> Any:
        raise _Submitted(config)

    def environment_get(workspace: Any, name: str, version: Any = None, label: Any = None) -> Any:
        captured.curated.add(name)
        return Environment(name=name)

    def wait(self: Any, *args: Any, **kwargs: Any) -> None:
        return None

    created: dict[str, Any] = {}  # the clusters made by ComputeTarget.create, by name
    replacements = [
        (Workspace, "get_details", details),
        (Workspace, "compute_targets", property(lambda self: dict(created))),
        (Workspace, "from_config", staticmethod(from_config)),
        (Workspace, "get", staticmethod(workspace_get)),
        (Workspace, "__init__", workspace_init),
        (ComputeTarget, "_get", staticmethod(lambda workspace, name: None)),  # -> "not found"
        (ComputeTarget, "create", staticmethod(create)),
        (AmlCompute, "wait_for_completion", wait),
        (AmlCompute, "refresh_state", wait),  # get_status(): the state it was created with
        (Experiment, "__init__", experiment_init),
        (Experiment, "submit", submit),
        (Environment, "get", staticmethod(environment_get)),
    ]
    saved = [(owner, name, owner.__dict__.get(name, _MISSING)) for owner, name, _ in replacements]
    try:
        for owner, name, value in replacements:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


# -- the conversion ---------------------------------------------------------------------------
@dataclass
class Software:
    pip: list[str] = field(default_factory=list)
    conda: list[str] = field(default_factory=list)
    base_image: str | None = None
    curated: str | None = None
    gpu: bool = False
    variables: dict[str, str] = field(default_factory=dict)
    python: str | None = None  # the user's conda pin of Python ("=3.6", ">=3.8,<3.12")


def job_dict(
    obj: Any, captured: Captured, base: Path, experiment: str | None, default: str
) -> dict[str, Any]:
    """The job spec (as a job.yaml's dict) of an estimator or ScriptRunConfig."""
    from azureml.core.script_run_config import get_run_config_from_script_run

    with quiet():
        estimator = "MMLBaseEstimator" in {c.__name__ for c in type(obj).__mro__}
        config = obj._get_script_run_config() if estimator else obj
        rc = get_run_config_from_script_run(config)
        software = estimator_software(obj, rc) if estimator else config_software(rc, captured)
    if not rc.script:
        raise UserError(f"{type(obj).__name__}: a `command` job is not supported; give a script")
    check_python(type(obj).__name__, software.python)
    if rc.data or rc.data_references or any(not _scalar(a) for a in rc.arguments or []):
        raise UserError(
            f"{type(obj).__name__}: Azure ML data inputs (inputs, datasets, data references) "
            "are not converted; add them to the job as `data:` entries by hand"
        )
    name = experiment or (captured.experiments[-1] if captured.experiments else default)
    raw: dict[str, Any] = {
        "experiment": re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "imported",
        "source_directory": str((base / (config.source_directory or ".")).resolve()),
        "entry_script": rc.script,
        "args": arguments(rc.arguments or []),
    }
    raw["environment"] = {"pip": software.pip} if software.pip else "inherit"
    raw["compute"] = compute(rc, software, captured)
    resources, backend = distribution(rc, software.gpu)
    raw["resources"] = resources
    raw["distributed"] = backend
    duration = rc.max_run_duration_seconds
    if duration and duration != SCRIPT_RUN_CONFIG_DEFAULT_DURATION:
        raw["timeout"] = duration
    return raw


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def arguments(values: list[Any]) -> dict[str, Any] | list[Any]:
    """`--flag value` pairs as a mapping ({num_epochs: 30}); anything else as a list."""
    pairs: dict[str, Any] = {}
    if len(values) % 2 == 0:
        for flag, value in zip(values[::2], values[1::2], strict=True):
            if (
                not isinstance(flag, str)
                or not flag.startswith("--")
                or isinstance(value, bool)
                or (isinstance(value, str) and value.startswith("--"))
            ):
                return list(values)
            pairs[flag[2:]] = value
        return pairs
    return list(values)


def estimator_software(estimator: Any, rc: Any) -> Software:
    """The user's part of an estimator's environment: what it installs minus its framework's
    own packages (the scenario file of its framework version) and the SDK's defaults."""
    env = rc.environment
    gpu = getattr(estimator, "_framework_processor", "cpu") == "gpu"
    framework_image, framework = None, None
    with contextlib.suppress(Exception):
        framework_image, framework = estimator._load_from_scenario_file()
    own_pip = set(framework.pip_packages) if framework is not None else set()
    own_conda = set(framework.conda_packages) if framework is not None else set()
    software = Software(gpu=gpu)
    if not env.python.user_managed_dependencies:
        deps = env.python.conda_dependencies
        own_pip.add("azureml-defaults")
        software.pip = [p for p in deps.pip_packages if p not in own_pip]
        software.conda = [
            p for p in deps.conda_packages if p not in own_conda and package(p) != "python"
        ]
        software.python = python_pin(p for p in deps.conda_packages if p not in own_conda)
    image = env.docker.base_image
    if image and image != framework_image and not getattr(estimator, "_use_framework_image", 0):
        software.base_image = image
    software.variables = _variables(env, rc)
    return software


def config_software(rc: Any, captured: Captured) -> Software:
    """The environment of a ScriptRunConfig: curated (by name), or its packages and image."""
    from azureml.core.environment import DEFAULT_CPU_IMAGE, DEFAULT_GPU_IMAGE

    env = rc.environment
    software = Software(variables=_variables(env, rc))
    if env.name in captured.curated or str(env.name).startswith("AzureML-"):
        software.curated = env.name
        software.gpu = bool(re.search(r"gpu|cuda", env.name, re.I))
        return software
    image = env.docker.base_image or ""
    software.gpu = bool(re.search(r"gpu|cuda", image, re.I))
    if image not in (DEFAULT_CPU_IMAGE, DEFAULT_GPU_IMAGE, ""):
        software.base_image = image
    if not env.python.user_managed_dependencies:
        deps = env.python.conda_dependencies
        software.pip = [p for p in deps.pip_packages if package(p) != "azureml-defaults"]
        software.conda = [p for p in deps.conda_packages if package(p) not in ("python", "pip")]
        software.python = python_pin(deps.conda_packages)
    return software


def python_pin(conda_packages: Iterable[str]) -> str | None:
    """The version spec of the `python` entry among `conda_packages` ("=3.6", ">=3.8"); None
    when there is none, or when it is one of the SDK's defaults (CondaDependencies puts one in
    every specification: not the user's pin)."""
    from azureml.core.conda_dependencies import PYTHON_DEFAULT_VERSION, CondaDependencies

    defaults = {PYTHON_DEFAULT_VERSION, CondaDependencies().get_python_version()}
    for entry in conda_packages:
        found = re.fullmatch(r"\s*python\s*([=<>!~]*\s*[\d.*][^\s]*)?\s*", str(entry))
        if found and found.group(1):
            spec = found.group(1).replace(" ", "")
            spec = f"={spec}" if spec[0].isdigit() else spec
            if spec.lstrip("=") not in defaults:
                return spec
    return None


def check_python(what: str, spec: str | None) -> None:
    """A UserError, up front, when the conda pin `spec` excludes this interpreter's Python:
    expkit installs the job's packages for it (here and on Azure), so a pin for another
    Python would end as a pip resolution error in prepare. Specs it cannot read pass."""
    if spec is None:
        return
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import Version

    parts = []
    for part in spec.split(","):
        found = re.fullmatch(r"(==|=|>=|<=|>|<|!=|~=)?(\d+(?:\.\d+)*)(\.\*)?", part)
        if found is None:
            return
        operator, version, star = found.groups()
        if operator in (None, "=", "=="):  # the same Python is major.minor: any micro fits
            operator, version = "==", ".".join(version.split(".")[:2]) + ".*"
        parts.append(
            f"{operator}{version}" if operator == "==" else f"{operator}{version}{star or ''}"
        )
    here = sys.version_info
    try:
        fits = Version(f"{here.major}.{here.minor}.{here.micro}") in SpecifierSet(",".join(parts))
    except InvalidSpecifier:
        return
    if not fits:
        raise UserError(
            f"{what}: its conda specification pins python{spec}, but expkit runs the job with "
            f"this interpreter, Python {here.major}.{here.minor}, and installs the job's "
            f"packages for it; import with a Python that fits python{spec}, or remove the pin "
            f"(python_version=, python=...) if the packages work on {here.major}.{here.minor}"
        )


def package(requirement: str) -> str:
    from expkit_azureml.submission import package_name

    return package_name(requirement.split("=")[0])


def _variables(env: Any, rc: Any) -> dict[str, str]:
    found = {**(env.environment_variables or {}), **(rc.environment_variables or {})}
    return {k: str(v) for k, v in found.items() if k not in DEFAULT_VARIABLES}


def compute(rc: Any, software: Software, captured: Captured) -> Any:
    target = rc.target if isinstance(rc.target, str) else getattr(rc.target, "name", "local")
    if target == "local":
        return "local"  # Azure ML's local run: this machine
    options: dict[str, Any] = {}
    if target != "amlcompute":  # a named cluster; "amlcompute" is a run-based one
        options["cluster"] = target
    settings = captured.clusters.get(target) or {"vm_size": rc.amlcompute.vm_size}
    defaults = {"vm_priority": "dedicated", "min_nodes": 0, "idle_seconds_before_scaledown": 1800}
    for key, value in settings.items():
        if value not in (None, "") and defaults.get(key, object()) != value:
            options[key] = value
    if software.curated:
        options["curated_environment"] = software.curated
    if software.base_image:
        options["base_image"] = software.base_image
    if software.conda:
        options["conda_packages"] = software.conda
    if software.variables:
        options["environment_variables"] = software.variables
    return {"target": "azureml", "options": options} if options else "azureml"


def distribution(rc: Any, gpu: bool) -> tuple[dict[str, int], str]:
    """resources and the distributed backend, from what Azure ML would run."""
    nodes = rc.node_count or 1
    communicator = str(rc.communicator or "None")
    if communicator in MPI_COMMUNICATORS:
        backend, per_node = "horovod", rc.mpi.process_count_per_node or 1
    elif rc.framework == "PyTorch":
        total = rc.pytorch.process_count or nodes
        if total % nodes:
            raise UserError(
                f"PyTorchConfiguration: process_count {total} is not a multiple of node_count "
                f"{nodes}; expkit runs the same number of processes on every node"
            )
        backend, per_node = "torchrun", total // nodes
    elif communicator == "None":
        backend, per_node = "none", 1
    else:
        raise UserError(
            f"distributed training with {communicator} is not converted; expkit runs horovod "
            "(MpiConfiguration) and torchrun (PyTorchConfiguration)"
        )
    resources = {
        "nodes": nodes,
        "processes_per_node": per_node,
        "gpus_per_node": per_node if gpu else 0,
    }
    return resources, backend
