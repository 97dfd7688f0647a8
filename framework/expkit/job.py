"""The job spec: one YAML file (or the same model in Python) that says what to run and how.

Field names follow what a reader understands without Azure ML's SDK; the estimator's names are
in the comments. Short forms keep simple jobs short: `compute: local` is `compute: {target:
local}`, `environment: {pip: [pillow]}` is `environment: {builder: pip, packages: [pillow]}`.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from expkit.errors import JobSpecError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
_DATA_REF = re.compile(r"\$\{data\.([A-Za-z0-9_-]+)\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    short_form: ClassVar[str | None] = None  # the field a bare string sets: `compute: local`

    @model_validator(mode="before")
    @classmethod
    def _accept_short_form(cls, value: Any) -> Any:
        if cls.short_form and isinstance(value, str):
            return {cls.short_form: value}
        return value


class EnvironmentSpec(_Strict):
    """`inherit` (this interpreter) or a package list built into a cached environment."""

    builder: str = "inherit"
    packages: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"builder": value}
        if isinstance(value, dict) and "builder" not in value and len(value) == 1:
            ((key, packages),) = value.items()
            if key not in ("packages", "options"):  # {pip: [...]} means builder pip
                return {"builder": key, "packages": packages}
        return value


class ComputeSpec(_Strict):
    """Where the job runs (`compute_target`), with the target's own options."""

    target: str = "local"
    options: dict[str, Any] = Field(default_factory=dict)
    short_form = "target"


class Resources(_Strict):
    """What the scale stage acquires (`node_count`, `process_count_per_node`, `use_gpu`)."""

    nodes: int = Field(1, ge=1)
    processes_per_node: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)

    @property
    def processes(self) -> int:
        return self.nodes * self.processes_per_node


class DistributedSpec(_Strict):
    """How the ranks are launched (`distributed_training`): none, horovod, torchrun."""

    backend: str = "none"
    options: dict[str, Any] = Field(default_factory=dict)
    short_form = "backend"


class DataInput(_Strict):
    """A data input, linked or copied into the run as `data/<name>`; `${data.<name>}` in args.

    `source` is an existing folder or file; `prepare` is a command run in the source folder
    that writes the data into `{dest}`, cached in the workspace by the command and the files
    it names.
    """

    source: str | None = None
    prepare: str | None = None
    mode: Literal["link", "copy"] = "link"

    @model_validator(mode="after")
    def _one_origin(self) -> DataInput:
        if not self.source and not self.prepare:
            raise ValueError("give `source` (a path) or `prepare` (a command writing {dest})")
        if self.prepare and "{dest}" not in self.prepare:
            raise ValueError("`prepare` must write into {dest}, e.g. `python make.py --out {dest}`")
        return self


class SinkSpec(_Strict):
    """A metric sink; `required: true` fails the run when the sink fails."""

    name: str
    required: bool = False
    options: dict[str, Any] = Field(default_factory=dict)
    short_form = "name"


class ModelSpec(_Strict):
    """The model to register after a successful run (`register_model(model_name, model_path)`)."""

    name: str = Field(pattern=_NAME)
    path: str = "outputs/"
    tags: dict[str, str] = Field(default_factory=dict)
    registries: list[str] = Field(default_factory=list)

    @field_validator("path")
    @classmethod
    def _inside_outputs(cls, value: str) -> str:
        parts = Path(value).parts
        if not parts or parts[0] != "outputs" or ".." in parts:
            raise ValueError("must be inside outputs/, e.g. `outputs/` or `outputs/model.pt`")
        return value


class JobSpec(_Strict):
    """Everything one run needs; `expkit run job.yaml` and `Experiment.submit(job)` take it."""

    experiment: str = Field(pattern=_NAME)
    source_directory: str = "."  # relative to the job file
    entry_script: str
    args: dict[str, Any] | list[Any] = Field(default_factory=dict)  # script_params
    environment: EnvironmentSpec = Field(default_factory=EnvironmentSpec)
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    resources: Resources = Field(default_factory=Resources)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    data: dict[str, DataInput] = Field(default_factory=dict)
    metrics: list[SinkSpec] = Field(default_factory=list)
    model: ModelSpec | None = None
    timeout: float | None = Field(None, gt=0, description="seconds the run stage may take")
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("data")
    @classmethod
    def _data_names(cls, value: dict[str, DataInput]) -> dict[str, DataInput]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ValueError(f"data name {name!r} may use letters, digits, _ and - only")
        return value

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] = ()) -> JobSpec:
        """Load, apply `--set key=value` overrides, validate and resolve paths."""
        import yaml

        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise JobSpecError(source, "", "no such file") from None
        except OSError as error:
            raise JobSpecError(source, "", error.strerror or str(error)) from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error)
            raise JobSpecError(source, where, f"not valid YAML: {problem}") from None
        if not isinstance(raw, dict):
            raise JobSpecError(source, "", "a job spec is a YAML mapping (key: value lines)")
        for item in overrides:
            apply_override(raw, item, source)
        return cls.from_dict(raw, source=source, base_dir=path.parent)

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], source: str = "<job>", base_dir: Path = Path()
    ) -> JobSpec:
        """Validate a plain dict; errors name `source` and the field path."""
        try:
            job = cls.model_validate(raw)
        except ValidationError as error:
            raise _spec_error(source, error) from None
        return job.resolved(base_dir, source)

    def resolved(self, base_dir: Path = Path(), source: str = "<job>") -> JobSpec:
        """A copy with absolute paths, checked against the files on disk."""
        folder = (Path(base_dir) / self.source_directory).resolve()
        if not folder.is_dir():
            raise JobSpecError(source, "source_directory", f"folder {folder} does not exist")
        script = folder / self.entry_script
        if not script.is_file():
            raise JobSpecError(
                source, "entry_script", f"{self.entry_script!r} is not a file in {folder}"
            )
        data = {}
        for name, item in self.data.items():
            if item.source:
                src = (Path(base_dir) / item.source).resolve()
                if not src.exists() and not item.prepare:
                    raise JobSpecError(source, f"data.{name}.source", f"{src} does not exist")
                item = item.model_copy(update={"source": str(src)})
            data[name] = item
        for name in self.referenced_data():
            if name not in data:
                raise JobSpecError(source, "args", f"${{data.{name}}} names no entry of `data`")
        return self.model_copy(update={"source_directory": str(folder), "data": data})

    def referenced_data(self) -> list[str]:
        values = self.args.values() if isinstance(self.args, dict) else self.args
        return [m for v in values for m in _DATA_REF.findall(str(v))]

    # -- use ----------------------------------------------------------------------------------
    def command_args(self, data_paths: dict[str, str]) -> list[str]:
        """The script's command-line arguments, `${data.x}` replaced by the data's path."""

        def text(value: Any) -> str:
            return _DATA_REF.sub(lambda m: data_paths[m.group(1)], str(value))

        if isinstance(self.args, list):
            return [text(v) for v in self.args]
        argv: list[str] = []
        for key, value in self.args.items():
            flag = key if key.startswith("-") else f"--{key}"
            if value is True:
                argv.append(flag)
            elif value is False or value is None:
                continue
            elif isinstance(value, list):
                argv += [flag, *map(text, value)]
            else:
                argv += [flag, text(value)]
        return argv

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def apply_override(raw: dict[str, Any], item: str, source: str = "--set") -> None:
    """Apply one `key.path=value` to the raw spec; the value is read as YAML (`2` is a number)."""
    import yaml

    key, sep, text = item.partition("=")
    if not sep or not key:
        raise JobSpecError("--set", item, "expected key=value, e.g. --set args.num_epochs=2")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and part in _SHORT_FIELDS:
            child = node[part] = {_SHORT_FIELDS[part]: child}
        if not isinstance(child, dict):
            raise JobSpecError("--set", ".".join(parts[: i + 1]), "is not a mapping")
        node = child
    last = parts[-1]
    if parts[0] == "args" and len(parts) == 2:  # args.x also matches an existing `--x` key
        for existing in (f"--{last}", f"-{last}"):
            if existing in node:
                last = existing
    node[last] = value


_SHORT_FIELDS = {"compute": "target", "distributed": "backend", "environment": "builder"}


def _spec_error(source: str, error: ValidationError) -> JobSpecError:
    lines = []
    for problem in error.errors():
        loc = [str(p) for p in problem["loc"]]
        field = ".".join(loc)
        if problem["type"] == "extra_forbidden":
            known = _known_fields(loc[:-1])
            hint = difflib.get_close_matches(loc[-1], known, n=1)
            reason = "unknown field" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            if known:
                reason += f"; allowed: {', '.join(known)}"
        elif problem["type"] == "missing":
            reason = "required field is missing"
        else:
            reason = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {field}: {reason}" if field else f"{source}: {reason}")
    first, *rest = lines
    err = JobSpecError(source, "", "")
    err.args = ("\n".join([first, *rest]),)
    return err


def _known_fields(loc: list[str]) -> list[str]:
    """The fields allowed where an unknown field was found, for the error message."""
    model: Any = JobSpec
    i = 0
    while i < len(loc):
        field = model.model_fields.get(loc[i])
        inner = _model_in(field.annotation) if field else None
        if inner is None:
            return []
        if get_origin(field.annotation) in (dict, list):
            i += 1  # skip the key or index: data.<name>, metrics.<n>
        model, i = inner, i + 1
    return list(model.model_fields)


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as `ModelSpec | None` or `dict[str, X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
