"""The job spec: one YAML file (or the same dataclasses in Python) that says what to run and how.

Field names follow what a reader understands without Azure ML's SDK; the estimator's names are
in the comments. Short forms keep simple jobs short: `compute: local` is `compute: {target:
local}`, `environment: {pip: [pillow]}` is `environment: {builder: pip, packages: [pillow]}`.

Validation is a small typed walk over these dataclasses (see `_convert`): it names the file,
the field path and the reason, refuses unknown fields, and costs nothing at import time.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import math
import os
import re
import shlex
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from expkit.errors import JobSpecError, printable, quoted

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_RULE = "use letters, digits, '.', '_' and '-' (starting with a letter or digit)"
_DATA_REF = re.compile(r"\$\{data\.([A-Za-z0-9_-]+)\}")
MAX_ARG_CHARS = 128 * 1024  # bytes of one argument Linux passes to a program (MAX_ARG_STRLEN)
MAX_COMMAND_BYTES = 1024 * 1024  # the script's whole command line (Linux allows about 2 MiB
# for arguments and environment together)
MAX_JOB_BYTES = 1024 * 1024  # a job spec file


class _Invalid(Exception):
    """One problem at one field path (collected into a JobSpecError)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.path, self.reason = path, reason


class _Spec:
    """Base of the spec dataclasses: short forms and per-class checks."""

    short_form: ClassVar[str | None] = None  # the field a bare string sets: `compute: local`
    __dataclass_fields__: ClassVar[dict[str, Any]]  # every subclass is a dataclass

    @classmethod
    def _short_forms(cls, value: Any) -> Any:
        if cls.short_form and isinstance(value, str):
            return {cls.short_form: value}
        return value

    def _check(self) -> None:
        """Raise ValueError for a problem of the whole entry, _Invalid for one field."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)


def _limits(**rules: Any) -> dict[str, Any]:
    return {"rules": rules}


@dataclass
class EnvironmentSpec(_Spec):
    """`inherit` (this interpreter) or a package list built into a cached environment."""

    builder: str = "inherit"
    packages: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _short_forms(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"builder": value}
        if isinstance(value, dict) and "builder" not in value and len(value) == 1:
            ((key, packages),) = value.items()
            if key not in ("packages", "options"):  # {pip: [...]} means builder pip
                return {"builder": key, "packages": packages}
        return value

    def _check(self) -> None:
        for i, package in enumerate(self.packages):
            if not package.strip():
                raise _Invalid(f"packages.{i}", "is empty; name a package, e.g. `pillow`")


@dataclass
class ComputeSpec(_Spec):
    """Where the job runs (`compute_target`), with the target's own options."""

    short_form = "target"
    target: str = "local"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Resources(_Spec):
    """What the scale stage acquires (`node_count`, `process_count_per_node`, `use_gpu`)."""

    nodes: int = field(default=1, metadata=_limits(ge=1))
    processes_per_node: int = field(default=1, metadata=_limits(ge=1))
    gpus_per_node: int = field(default=0, metadata=_limits(ge=0))

    @property
    def processes(self) -> int:
        return self.nodes * self.processes_per_node


@dataclass
class DistributedSpec(_Spec):
    """How the ranks are launched (`distributed_training`): none, horovod, torchrun."""

    short_form = "backend"
    backend: str = "none"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataInput(_Spec):
    """A data input, linked or copied into the run as `data/<name>`; `${data.<name>}` in args.

    `source` is an existing folder or file; `prepare` is a command run in the source folder
    that writes the data into `{dest}`, cached in the workspace by the command and the files
    it names.
    """

    source: str | None = None
    prepare: str | None = None
    mode: Literal["link", "copy"] = "link"

    def _check(self) -> None:
        if not self.source and not self.prepare:
            raise ValueError("give `source` (a path) or `prepare` (a command writing {dest})")
        if self.prepare and "{dest}" not in self.prepare:
            raise ValueError("`prepare` must write into {dest}, e.g. `python make.py --out {dest}`")


@dataclass
class SinkSpec(_Spec):
    """A metric sink; `required: true` fails the run when the sink fails."""

    short_form = "name"
    name: str
    required: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RegistrySpec(_Spec):
    """A model registry each registered version also goes to (`registries: [mlflow]`), with
    the registry's own options (`{name: azureml, options: {workspace: config.json}}`)."""

    short_form = "name"
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelLoad(_Spec):
    """How exporters rebuild the trained model from its files.

    `file` (inside the model's path) holds a whole module saved with `torch.save(model)` or
    `torch.jit.save`; with `factory` (`module:function`, importable from the source directory)
    it holds a state dict, loaded into `function(**args)`.
    """

    short_form = "file"
    file: str = "model.pt"
    factory: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    def _check(self) -> None:
        if self.factory is not None and not re.fullmatch(r"[\w.]+:[\w.]+", self.factory):
            raise _Invalid("factory", "must be `module:function`, e.g. `train:build_model`")
        if Path(self.file).is_absolute() or ".." in Path(self.file).parts:
            raise _Invalid("file", "must be a path inside the model's path, e.g. `model.pt`")


@dataclass
class ModelInput(_Spec):
    """What the model takes: one tensor of `shape` (batch first); `dynamic_axes` may vary.

    `examples` is a .npy file inside the model's path holding real inputs (e.g. validation
    images as the model sees them), checked besides random ones.
    """

    shape: list[int] = field(default_factory=list)
    dtype: Literal["float32", "float64", "float16", "int64", "int32"] = "float32"
    dynamic_axes: list[int] = field(default_factory=lambda: [0])
    examples: str | None = None

    def _check(self) -> None:
        if not self.shape or any(size < 1 for size in self.shape):
            raise _Invalid("shape", "give the input's shape, e.g. [1, 3, 32, 32]")
        for axis in self.dynamic_axes:
            if not 0 <= axis < len(self.shape):
                raise _Invalid("dynamic_axes", f"axis {axis} is not an axis of {self.shape}")


@dataclass
class ModelSpec(_Spec):
    """The model to register after a successful run (`register_model(model_name, model_path)`)."""

    name: str = field(metadata=_limits(pattern=NAME))
    path: str = "outputs/"
    tags: dict[str, str] = field(default_factory=dict)
    registries: list[RegistrySpec] = field(default_factory=list)
    load: ModelLoad | None = None  # for exports
    input: ModelInput | None = None  # for exports
    # The key metrics `expkit models list` shows for each version (default: every final
    # numeric metric a version has).
    metrics: list[str] = field(default_factory=list)
    # What must hold for the register stage to make a version: see expkit.register_if
    # (`best_val_acc > 0.9`, {better: best_val_acc, than: champion}, or a list of those).
    register_if: Any = None
    # Aliases the new version takes (MLflow's: `champion`), as `expkit models alias` sets them.
    aliases: list[str] = field(default_factory=list)

    def _check(self) -> None:
        from expkit import register_if
        from expkit.modelrefs import alias_problem

        names = [registry.name for registry in self.registries]
        if len(set(names)) < len(names):
            raise _Invalid("registries", "each registry may be listed once")
        for i, metric in enumerate(self.metrics):
            if not metric.strip():
                raise _Invalid(f"metrics.{i}", "is empty; name a metric, e.g. best_val_acc")
        try:
            register_if.parse(self.register_if)
        except register_if.BadCondition as bad:
            where = "register_if" + (f".{bad.field}" if bad.field else "")
            raise _Invalid(where, str(bad)) from None
        for i, alias in enumerate(self.aliases):
            problem = alias_problem(alias)
            if problem:
                raise _Invalid(f"aliases.{i}", problem)
        if len(set(self.aliases)) < len(self.aliases):
            raise _Invalid("aliases", "each alias may be listed once")
        parts = Path(self.path).parts
        if not parts or parts[0] != "outputs" or ".." in parts:
            raise _Invalid("path", "must be inside outputs/, e.g. `outputs/` or `outputs/model.pt`")


@dataclass
class ExportSpec(_Spec):
    """An export format run in post-process; its files join the model version when it passes.

    A failed export (or parity check) is recorded and not registered; `required: true` fails
    the run instead.
    """

    short_form = "format"
    format: str
    options: dict[str, Any] = field(default_factory=dict)
    atol: float = field(default=1e-4, metadata=_limits(ge=0))
    rtol: float = field(default=1e-3, metadata=_limits(ge=0))
    required: bool = False
    timeout: float = field(default=600.0, metadata=_limits(gt=0))  # seconds, export and check


# What `retry.on` may name: how an attempt that did not complete ended (AttemptOutcome's
# words), besides `{exit_codes: [...]}`. Preempted: the service took the machine back (Slurm's
# PREEMPTED, a requeue, `expkit runs cancel --requeue`); node_failure: a node died (NODE_FAIL,
# BOOT_FAIL); time_limit: the attempt reached its time limit (the job's `timeout`, Slurm's).
RETRYABLE = ("preempted", "node_failure", "time_limit")
SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP")
# Where the checkpoint folder may not be: folders expkit itself fills or seals in the working
# copy (outputs are sealed and registered, logs collected, data placed).
_NOT_CHECKPOINTS = ("outputs", "logs", "data")


@dataclass
class RetrySpec(_Spec):
    """How often a run's script is started again, and after what (`retry:`).

    `max_attempts` counts every attempt, the first included (1: no retry); `on` lists what
    makes an attempt that did not complete retryable: `preempted`, `node_failure`,
    `time_limit`, and `{exit_codes: [75, 143]}` (the script's own exit codes; a signal N is
    128 + N, as a shell says it); a failure not listed fails the run at once. Each retry
    waits `backoff_seconds` first. `in_place`: restarts of every rank within one attempt by
    the distributed launcher itself (torchrun's `--max-restarts`), without a new attempt.
    The names follow TorchX (`max_retries`), SageMaker (`MaximumRetryAttempts`) and Slurm
    (preempted, node failure, time limit)."""

    max_attempts: int = field(default=1, metadata=_limits(ge=1))

    on: list[str | dict[str, Any]] = field(  # a mapping's keys and codes: checked in _check
        default_factory=lambda: ["preempted", "node_failure"]
    )
    backoff_seconds: float = field(default=0.0, metadata=_limits(ge=0))
    in_place: int = field(default=0, metadata=_limits(ge=0))

    @classmethod
    def _short_forms(cls, value: Any) -> Any:
        # YAML 1.1 readers (PyYAML's safe_load, which a job built in Python often went
        # through) read the key `on` as the boolean true: no other field could have made one.
        if isinstance(value, dict) and True in value and "on" not in value:
            value = {("on" if key is True else key): item for key, item in value.items()}
        return value

    def _check(self) -> None:
        if self.max_attempts > 100:
            raise _Invalid("max_attempts", f"must be at most 100, not {self.max_attempts}")
        if not self.on and self.max_attempts > 1:
            raise _Invalid(
                "on",
                f"lists nothing to retry, so max_attempts {self.max_attempts} would never be "
                "used; name preempted, node_failure, time_limit or {exit_codes: [75]}",
            )
        for i, item in enumerate(self.on):
            if isinstance(item, str):
                if item not in RETRYABLE:
                    import difflib

                    hint = difflib.get_close_matches(item, RETRYABLE, n=1)
                    more = f" (did you mean {hint[0]!r}?)" if hint else ""
                    raise _Invalid(
                        f"on.{i}",
                        f"{quoted(item)} is not a failure expkit retries{more}; use "
                        f"{', '.join(RETRYABLE)} or {{exit_codes: [75]}}",
                    )
            else:
                self._check_exit_codes(f"on.{i}", item)

    @staticmethod
    def _check_exit_codes(where: str, item: dict[str, Any]) -> None:
        """`{exit_codes: [75, 143]}`: that one key, a list of codes 1 to 255 (0 is success)."""
        for key in item:
            if key != "exit_codes":
                name = printable(str(key), 60)
                raise _Invalid(
                    f"{where}.{name}", "unknown field; a mapping here is {exit_codes: [75]}"
                )
        if "exit_codes" not in item:
            raise _Invalid(where, "a mapping here is {exit_codes: [75, 143]}")
        codes = item["exit_codes"]
        if not isinstance(codes, list):
            raise _Invalid(f"{where}.exit_codes", f"must be a list, not {_kind(codes)}")
        for j, code in enumerate(codes):
            if not isinstance(code, int) or isinstance(code, bool):
                raise _Invalid(
                    f"{where}.exit_codes.{j}", f"must be a whole number, not {quoted(code)}"
                )
            if not 1 <= code <= 255:
                raise _Invalid(
                    f"{where}.exit_codes.{j}",
                    f"must be an exit code from 1 to 255 (0 is success; a signal N is 128 + N), "
                    f"not {code}",
                )

    def retryable(self, outcome: str, exit_code: int | None = None) -> bool:
        """Whether an attempt that ended with `outcome` (an AttemptOutcome value) and
        `exit_code` (the script's; negative -N for a signal N, matched as 128 + N) may be
        retried, by `on` alone (the attempts left are the caller's to count)."""
        if outcome in self.on:
            return True
        if outcome != "failed" or exit_code is None:
            return False
        code = 128 - exit_code if exit_code < 0 else exit_code
        return any(isinstance(i, dict) and code in i["exit_codes"] for i in self.on)


@dataclass
class CheckpointSpec(_Spec):
    """The script's checkpoint folder, kept from one attempt to the next (`checkpoints:`).

    `path` is relative to the working folder (`./checkpoints`); the script finds it as
    `Run.get_context().checkpoint_dir` (or EXPKIT_CHECKPOINT_DIR) and resumes from what it
    holds. What the folder holds when an attempt ends, also one that failed or was stopped,
    is there when the next attempt starts (and for `expkit runs resume`). Before a planned
    stop (a time limit, a preemption, `expkit runs cancel --requeue`, a cancel) each rank gets
    `signal` (SIGUSR1 by default, as PyTorch Lightning and submitit use) and `grace_seconds`
    to write a checkpoint and exit, before SIGTERM and then SIGKILL."""

    short_form = "path"
    path: str = "checkpoints"
    signal: str = "SIGUSR1"
    grace_seconds: float = field(default=30.0, metadata=_limits(gt=0))

    def _check(self) -> None:
        parts = Path(self.path).parts
        if Path(self.path).is_absolute() or ".." in parts or not parts or parts == (".",):
            raise _Invalid(
                "path", "must be a folder inside the working folder, e.g. `./checkpoints`"
            )
        first = next(p for p in parts if p != ".")
        if first in _NOT_CHECKPOINTS:
            raise _Invalid(
                "path",
                f"{self.path} is inside {first}/, which expkit fills itself; "
                "use a folder of its own, e.g. `./checkpoints`",
            )
        if self.signal not in SIGNALS:
            raise _Invalid(
                "signal", f"must be one of {', '.join(SIGNALS)}, not {quoted(self.signal)}"
            )

    @property
    def folder(self) -> str:
        """`path` without a leading `./` (`checkpoints`)."""
        return str(Path(self.path))


@dataclass
class JobSpec(_Spec):
    """Everything one run needs; `expkit run job.yaml` and `Experiment.submit(job)` take it."""

    experiment: str = field(metadata=_limits(pattern=NAME))
    entry_script: str
    source_directory: str = "."  # relative to the job file
    args: dict[str, Any] | list[Any] = field(default_factory=dict)  # script_params
    environment: EnvironmentSpec = field(default_factory=EnvironmentSpec)
    compute: ComputeSpec = field(default_factory=ComputeSpec)
    resources: Resources = field(default_factory=Resources)
    distributed: DistributedSpec = field(default_factory=DistributedSpec)
    data: dict[str, DataInput] = field(default_factory=dict)
    metrics: list[SinkSpec] = field(default_factory=list)
    model: ModelSpec | None = None
    exports: list[ExportSpec] = field(default_factory=list)
    timeout: float | None = field(default=None, metadata=_limits(gt=0))  # seconds of an attempt
    tags: dict[str, str] = field(default_factory=dict)
    retry: RetrySpec = field(default_factory=RetrySpec)
    checkpoints: CheckpointSpec | None = None

    def _check(self) -> None:
        _check_args_values(self.args)
        total = 0
        for arg in self.arguments():
            text = str(arg)
            total += len(text) + 1
            if "\0" in text:
                raise _Invalid("args", f"{quoted(arg)} contains a NUL byte (a command line cannot)")
            if len(text) > MAX_ARG_CHARS // 4 and len(text.encode()) > MAX_ARG_CHARS:
                raise _Invalid(
                    "args",
                    f"{quoted(arg)} is longer than one argument of a command line may be "
                    f"({MAX_ARG_CHARS // 1024} KiB); pass the path of a file that holds it",
                )
        if total > MAX_COMMAND_BYTES // 4:  # characters; count bytes only when it may matter
            size = sum(len(str(arg).encode()) + 1 for arg in self.arguments())
            if size > MAX_COMMAND_BYTES:
                raise _Invalid(
                    "args",
                    f"the script's command line would be {size // 1024} KiB, more than "
                    f"{MAX_COMMAND_BYTES // 1024} KiB; pass the path of a file that holds "
                    "the values",
                )
        for name in self.data:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ValueError(f"data name {name!r} may use letters, digits, _ and - only")
        if self.exports:
            missing = [f for f in ("load", "input") if not self.model or not getattr(self.model, f)]
            if missing:
                raise _Invalid(
                    "exports",
                    f"exports need `model.{missing[0]}` (how to rebuild the model and what it "
                    "takes), e.g. model: {load: {file: model.pt, factory: train:build_model}, "
                    "input: {shape: [1, 3, 32, 32]}}",
                )
            formats = [e.format for e in self.exports]
            if len(set(formats)) < len(formats):
                raise _Invalid("exports", "each format may be listed once")

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: typing.Sequence[str] = ()) -> JobSpec:
        """Load, apply `--set key=value` overrides, validate and resolve paths.

        Raises JobSpecError (one line per problem, naming the file and the field) for a file
        that cannot be read, is not UTF-8 YAML, nests deeper than MAX_DEPTH or expands
        (through aliases) to more than MAX_VALUES values, and for any invalid field."""
        path = Path(path)
        source = printable(str(path))
        raw = read_spec_file(path, "a job spec")
        if "search_space" in raw:  # not a line per sweep field `expkit run` does not know
            raise JobSpecError(
                source,
                "",
                f"is a sweep spec (it has search_space); run it with `expkit sweep {source}`",
            )
        for item in overrides:
            apply_override(raw, item)
        try:
            return cls.from_dict(raw, source=source, base_dir=path.parent)
        except JobSpecError as error:
            if not overrides:
                raise
            error.args = (blame_overrides(str(error), source, overrides),)
            raise

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], source: str = "<job>", base_dir: Path | None = None
    ) -> JobSpec:
        """Validate a plain dict; errors name `source` and the field path. With `base_dir`,
        also resolve the paths against it and check them on disk (see `resolved`)."""
        problems: list[_Invalid] = []
        job = _convert(raw, JobSpec, "", problems)
        if problems:
            lines = [f"{source}: {p.path}: {p.reason}" if p.path else f"{source}: {p.reason}"
                     for p in problems]  # fmt: skip
            error = JobSpecError(source, "", "")
            error.args = ("\n".join(lines),)
            raise error
        return job.resolved(base_dir, source) if base_dir is not None else job

    def resolved(self, base_dir: Path | str = ".", source: str = "<job>") -> JobSpec:
        """A copy with absolute paths, checked against the files on disk; a path the file
        system refuses (too long, a NUL byte, a loop of links) is a JobSpecError naming it."""
        base = Path(base_dir)
        with _path_field(source, "source_directory"):
            folder = (base / self.source_directory).resolve()
            if not folder.is_dir():
                raise JobSpecError(source, "source_directory", f"folder {folder} does not exist")
        with _path_field(source, "entry_script"):
            script = os.path.normpath(self.entry_script)
            if os.path.isabs(script) or script == ".." or script.startswith("../"):
                raise JobSpecError(
                    source,
                    "entry_script",
                    f"{self.entry_script!r} must be a path inside source_directory ({folder}), "
                    "relative to it, e.g. `train.py`: only that folder is in the run's snapshot",
                )
            if not (folder / self.entry_script).is_file():
                raise JobSpecError(
                    source, "entry_script", f"{self.entry_script!r} is not a file in {folder}"
                )
        data = {}
        for name, item in self.data.items():
            if item.source:
                with _path_field(source, f"data.{name}.source"):
                    origin = (base / item.source).resolve()
                    if not origin.exists() and not item.prepare:
                        raise JobSpecError(
                            source, f"data.{name}.source", f"{origin} does not exist"
                        )
                item = item.replace(source=str(origin))
            data[name] = item
        for name in self.referenced_data():
            if name not in data:
                raise JobSpecError(source, "args", f"${{data.{name}}} names no entry of `data`")
        return self.replace(source_directory=str(folder), data=data)

    def referenced_data(self) -> list[str]:
        values = self.args.values() if isinstance(self.args, dict) else self.args
        return [m for v in values for m in _DATA_REF.findall(str(v))]

    # -- use ----------------------------------------------------------------------------------
    def arguments(self) -> list[Any]:
        """The script's arguments as given, values keeping their types: `key: value` is
        `--key value`, `flag: true` the bare flag, false or null leaves it out."""
        if isinstance(self.args, list):
            return list(self.args)
        argv: list[Any] = []
        for key, value in self.args.items():
            flag = key if key.startswith("-") else f"--{key}"
            if value is True:
                argv.append(flag)
            elif value is False or value is None:
                continue
            elif isinstance(value, list):
                argv += [flag, *value]
            else:
                argv += [flag, value]
        return argv

    def command_args(self, data_paths: dict[str, str]) -> list[str]:
        """The script's command line, as text, `${data.x}` replaced by the data's path."""

        def path(match: re.Match[str]) -> str:
            return data_paths[match.group(1)]

        return [_DATA_REF.sub(path, str(value)) for value in self.arguments()]

    def params(self, data_paths: dict[str, str]) -> dict[str, str]:
        """The run's parameters from `args`, as text, `${data.x}` replaced by the data's path:
        `key: value` is the parameter `key` (leading dashes dropped), a list's items joined
        by spaces, true/false/null as written in YAML; a list of arguments is one parameter,
        `args`, the command line exactly as the script gets it (`command_args`)."""

        def text(value: Any) -> str:
            if value is True or value is False or value is None:
                return {True: "true", False: "false", None: "null"}[value]
            return _DATA_REF.sub(lambda m: data_paths[m.group(1)], str(value))

        if isinstance(self.args, list):
            return {"args": shlex.join(self.command_args(data_paths))} if self.args else {}
        return {
            key.lstrip("-") or key: " ".join(map(text, value))
            if isinstance(value, list)
            else text(value)
            for key, value in self.args.items()
        }

    def to_yaml(self) -> str:
        """The spec as YAML text (`yaml.safe_dump`, keys in the fields' order), as the run's
        `job.yaml` holds it; remembered for a spec written before (`expkit.yamlcache`)."""
        from expkit import yamlcache

        return yamlcache.dump(self.to_dict())


_SCALARS = (str, int, float, bool, type(None), datetime.date)


def _check_args_values(args: dict[str, Any] | list[Any]) -> None:
    """Each value of `args` is a scalar or a list of scalars: anything else (a mapping, a
    list of lists, `!!binary` bytes) would reach the script as a Python repr."""
    items = args.items() if isinstance(args, dict) else enumerate(args)
    for key, value in items:
        where = f"args.{printable(str(key), 60)}"
        values = value if isinstance(value, list) and isinstance(args, dict) else [value]
        for item in values:
            if not isinstance(item, _SCALARS):
                kind = _kind(item) if isinstance(item, dict | list) else type(item).__name__
                raise _Invalid(
                    where,
                    f"must be a string, a number, true/false or a list of those, not {kind}"
                    " (the script gets text: quote it, or pass a file's path)",
                )


# -- reading ---------------------------------------------------------------------------------
def read_spec_file(path: Path, what: str) -> dict[str, Any]:
    """The YAML mapping in spec file `path` (a job spec, a sweep spec: `what`, for the
    message), read within MAX_JOB_BYTES. Raises JobSpecError naming the file: it cannot be
    read, is a folder, is not UTF-8, is not YAML (or too deep, too big), or not a mapping."""
    source = printable(str(path))
    try:
        data = _read_job_file(path, source, what)
    except FileNotFoundError:
        raise JobSpecError(source, "", "no such file") from None
    except OSError as error:
        raise JobSpecError(source, "", error.strerror or str(error)) from None
    except ValueError:  # a NUL byte in the path
        raise JobSpecError(source, "", "a path cannot contain a NUL byte") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        byte = data[error.start : error.start + 1].hex()
        line = data.count(b"\n", 0, error.start) + 1
        raise JobSpecError(
            source, f"line {line}", f"not UTF-8 text (byte 0x{byte}); save it as UTF-8"
        ) from None
    raw = load_yaml(text, source)
    if not isinstance(raw, dict):
        raise JobSpecError(source, "", f"{what} is a YAML mapping (key: value lines)")
    return raw


def _read_job_file(path: Path, source: str, what: str = "a job spec") -> bytes:
    """The bytes of a spec file (`what`: a job spec, a sweep spec): a regular file of at most
    MAX_JOB_BYTES, checked before it is opened (a FIFO would block, /dev/zero never ends); a
    JobSpecError otherwise."""
    import stat

    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        if stat.S_ISFIFO(info.st_mode):
            kind = "a FIFO"
        elif stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
            kind = "a device"
        raise JobSpecError(source, "", f"is {kind}; {what} is a YAML file")
    limit = f"{what} may be at most {MAX_JOB_BYTES // 1024} KiB"
    if info.st_size > MAX_JOB_BYTES:
        raise JobSpecError(source, "", f"is {info.st_size} bytes; {limit}")
    with open(path, "rb") as f:
        data = f.read(MAX_JOB_BYTES + 1)
    if len(data) > MAX_JOB_BYTES:
        raise JobSpecError(source, "", f"grew past the limit while read; {limit}")
    return data


def load_yaml(text: str, source: str) -> Any:
    """The data of a job spec's YAML text; a JobSpecError naming `source` and the line when
    it is not YAML or passes the bounds of `expkit.bounded_yaml` (depth, aliases, size)."""
    from expkit import yamlcache

    try:
        return yamlcache.load(text)  # PyYAML is imported for a text not read before only
    except Exception as error:
        import yaml

        if not isinstance(error, yaml.YAMLError):
            raise
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise JobSpecError(source, where, f"not valid YAML: {printable(problem)}") from None


@contextmanager
def _path_field(source: str, field: str) -> Iterator[None]:
    """Errors from looking a path up on disk, as a JobSpecError naming the field."""
    try:
        yield
    except ValueError:  # "embedded null byte"
        raise JobSpecError(source, field, "a path cannot contain a NUL byte") from None
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno == errno.ENAMETOOLONG:
            reason += " (the file system allows 255 bytes per name)"
        raise JobSpecError(source, field, reason) from None


# -- validation ------------------------------------------------------------------------------
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _convert(value: Any, annotation: Any, path: str, problems: list[_Invalid]) -> Any:
    """`value` checked and converted to `annotation`; problems are collected, not raised."""
    try:
        return _convert_one(value, annotation, path, problems)
    except _Invalid as problem:
        problems.append(problem)
        return None


def _convert_one(value: Any, annotation: Any, path: str, problems: list[_Invalid]) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert_one(value, options[0], path, problems)
        for option in options:  # dict | list: pick by the value's shape
            if isinstance(value, typing.get_origin(option) or option):
                return _convert_one(value, option, path, problems)
        raise _Invalid(path, f"must be {' or '.join(_describe(o) for o in options)}")
    if origin is Literal:
        if not isinstance(value, str | int | float | bool | None) or value not in args:
            raise _Invalid(
                path, f"must be one of {', '.join(map(repr, args))}, not {quoted(value)}"
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _Invalid(path, f"must be a list, not {_kind(value)}{_as_list(value)}")
        return [_convert(v, args[0], f"{path}.{i}", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Invalid(path, f"must be a mapping, not {_kind(value)}")
        return {
            str(k): _convert(v, args[1], f"{path}.{printable(str(k), 60)}", problems)
            for k, v in value.items()
        }
    if isinstance(annotation, type) and issubclass(annotation, _Spec):
        return _convert_spec(value, annotation, path, problems)
    return _scalar(value, annotation, path)


def _convert_spec(value: Any, cls: type[_Spec], path: str, problems: list[_Invalid]) -> Any:
    value = cls._short_forms(value)
    if not isinstance(value, dict):
        # A class with a short form takes its main field as text too (`checkpoints: ./ck`).
        text = f"its {cls.short_form} as text or " if cls.short_form else ""
        raise _Invalid(path, f"must be {text}a mapping, not {_kind(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    before = len(problems)  # an unknown field, too, skips the checks that would follow from it
    for key in value:
        if key not in fields:
            name = printable(str(key), 60)
            import difflib

            hint = difflib.get_close_matches(name, fields, n=1)
            reason = "unknown field" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            problems.append(_Invalid(f"{prefix}{name}", f"{reason}; allowed: {', '.join(fields)}"))
    converted = {}
    for name, spec in fields.items():
        where = f"{prefix}{name}"
        if name not in value:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                problems.append(_Invalid(where, "required field is missing"))
            continue
        item = _convert(value[name], _hints(cls)[name], where, problems)
        rules = spec.metadata.get("rules", {})
        if item is not None and rules:
            _apply_rules(item, rules, where, problems)
        converted[name] = item
    if len(problems) > before:
        return None
    result = cls(**converted)
    try:
        result._check()
    except _Invalid as problem:  # a check about one field names it
        problems.append(_Invalid(f"{prefix}{problem.path}", problem.reason))
    except ValueError as error:
        problems.append(_Invalid(path, str(error)))
    return result


def _apply_rules(value: Any, rules: dict[str, Any], path: str, problems: list[_Invalid]) -> None:
    if "ge" in rules and value < rules["ge"]:
        problems.append(_Invalid(path, f"must be at least {rules['ge']}, not {value}"))
    if "gt" in rules and value <= rules["gt"]:
        problems.append(_Invalid(path, f"must be more than {rules['gt']}, not {value}"))
    if "pattern" in rules and not rules["pattern"].fullmatch(value):
        problems.append(_Invalid(path, f"{value!r}: {NAME_RULE}"))


def _scalar(value: Any, annotation: Any, path: str) -> Any:
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid(path, f"must be true or false, not {quoted(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Invalid(path, f"must be a whole number, not {quoted(value)}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise _Invalid(path, f"{quoted(value)} is too large") from None
            if not math.isfinite(number):
                raise _Invalid(path, f"must be a finite number, not {value}")
            return number
        raise _Invalid(path, f"must be a number, not {quoted(value)}")
    if annotation is str:
        if isinstance(value, str):
            if "\0" in value:
                raise _Invalid(path, f"{quoted(value)} contains a NUL byte")
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # `experiment: 2024`, `tags: {version: 2}`
        raise _Invalid(path, f"must be a string, not {_kind(value)}")
    raise TypeError(f"job spec field type {annotation!r} is not supported")


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", type(None): "empty"}
    return names.get(type(value)) or quoted(value)


def _describe(annotation: Any) -> str:
    return {dict: "a mapping", list: "a list"}.get(typing.get_origin(annotation), str(annotation))


# -- overrides ---------------------------------------------------------------------------------
_SHORT_FIELDS = {"compute": "target", "distributed": "backend", "environment": "builder"}


def blame_overrides(message: str, source: str, overrides: typing.Sequence[str]) -> str:
    """`message` (lines `<source>: <field>: <reason>`) with each line about a field that a
    `--set KEY=VALUE` gave (KEY, or a field inside it) naming that flag after the file:
    `job.yaml (--set timeout=abc): timeout: must be a number, not 'abc'`. A list field given
    one value by --set is shown the --set that makes it a list (`--set metrics=[mlflow]`)."""
    lines = []
    for line in message.splitlines():
        head = f"{source}: "
        if line.startswith(head):
            field = line[len(head) :].split(":", 1)[0]
            for item in reversed(overrides):  # the last --set of a key is the one that holds
                key, _, text = item.partition("=")
                if field == key or field.startswith(f"{key}."):
                    reason = line[len(head) :]
                    if field == key and reason.endswith(_as_list(text)):
                        reason = reason[: -len(_as_list(text))] + _as_list(text, key)
                    line = f"{source} (--set {printable(item, 80)}): {reason}"
                    break
        lines.append(line)
    return "\n".join(lines)


def _as_list(value: Any, key: str | None = None) -> str:
    """What a list field given one value (a string, a number) should have been: `; write it
    as a list: [mlflow]`, or with `key` (a --set) `; write --set metrics=[mlflow]`; "" for
    a value that is not one scalar."""
    if isinstance(value, bool | dict | list) or value is None:
        return ""
    text = printable(str(value), 60)
    return f"; write --set {key}=[{text}]" if key else f"; write it as a list: [{text}]"


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `key.path=value` to the raw spec; the value is read as YAML (`2` is a number)."""
    import yaml

    from expkit import bounded_yaml

    key, sep, text = item.partition("=")
    shown = printable(key, 60)
    if not sep or not key:
        raise JobSpecError(
            "--set", printable(item, 60), "expected KEY=VALUE, e.g. --set args.num_epochs=2"
        )
    parts = key.split(".")
    if not all(parts):
        raise JobSpecError("--set", shown, "a field name is empty (KEY is name.name...)")
    try:
        value = bounded_yaml.load(text) if text else ""
    except yaml.YAMLError as error:
        if isinstance(error, bounded_yaml.BoundError):
            raise JobSpecError("--set", shown, f"{error.problem}") from None
        value = text
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and part in _SHORT_FIELDS:
            child = node[part] = {_SHORT_FIELDS[part]: child}
        if not isinstance(child, dict):
            raise JobSpecError("--set", printable(".".join(parts[: i + 1]), 60), "is not a mapping")
        node = child
    last = parts[-1]
    if parts[0] == "args" and len(parts) == 2:  # args.x also matches an existing `--x` key
        for existing in (f"--{last}", f"-{last}"):
            if existing in node:
                last = existing
    node[last] = value
