"""Code that runs in a run's Python processes right after they import a given module.

This is how other trackers' in-script APIs record into the expkit run without a change to the
script: a plugin names, through the `expkit_import_hooks` hook, a function to call when a
module is imported (`{"azureml.core.run": "expkit_azureml.inscript:install"}`), and that
function adapts the module (Azure ML's `Run.get_context()` then returns a run that records
into expkit).

The driver puts `bootstrap/` first on the script's PYTHONPATH and the hooks in
EXPKIT_IMPORT_HOOKS. Python imports `sitecustomize` at start-up (the `site` module's
documented hook); expkit's, in `bootstrap/`, calls `install()`, which adds one finder to
`sys.meta_path`, then imports the `sitecustomize` it hides, if any (Debian's python has one):
the way OpenTelemetry's `opentelemetry-instrument` and ddtrace's `ddtrace-run` instrument a
program they start. Every Python process of the run does this, the ranks a launcher starts
and the processes a script forks or spawns included, and it costs a few microseconds: the
finder answers None at once for every module but the hooked ones, and imports nothing.

Standard library only; a hook that cannot be loaded or raises is one notice on stderr, never
an exception in the script.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys

# typing.TYPE_CHECKING without importing typing (nor pathlib): every Python process of a run
# imports this module at start-up, where typing, pathlib and what they import cost ~8 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any

HOOKS_ENV = "EXPKIT_IMPORT_HOOKS"
BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.realpath(__file__)), "bootstrap")


def encode(hooks: dict[str, list[str]]) -> str:
    """EXPKIT_IMPORT_HOOKS's value for `hooks` (module -> ["package.module:function", ...]):
    `module=target` pairs separated by ";"."""
    return ";".join(f"{module}={target}" for module, targets in hooks.items() for target in targets)


def decode(text: str) -> dict[str, list[str]]:
    """The hooks that `encode` wrote; pairs without `=` or `:` are ignored."""
    hooks: dict[str, list[str]] = {}
    for pair in text.split(";"):
        module, _, target = (part.strip() for part in pair.partition("="))
        if module and ":" in target:
            hooks.setdefault(module, []).append(target)
    return hooks


def script_env(hooks: dict[str, list[str]], base: dict[str, str]) -> dict[str, str]:
    """The variables that make a script's processes run `hooks`: PYTHONPATH with bootstrap/
    first (the rest of `base`'s PYTHONPATH kept after it) and EXPKIT_IMPORT_HOOKS. Empty when
    there are no hooks."""
    if not hooks:
        return {}
    bootstrap = str(BOOTSTRAP_DIR)
    rest = [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p and p != bootstrap]
    return {"PYTHONPATH": os.pathsep.join([bootstrap, *rest]), HOOKS_ENV: encode(hooks)}


# The finder and the loader implement the protocols of `sys.meta_path` (PEP 451) without
# subclassing importlib.abc: every Python process of a run imports this module at start-up, and
# importlib.abc imports importlib.resources, tempfile, shutil and the compression modules.
class _Loader:
    """The real loader of a hooked module, then its hooks."""

    def __init__(self, loader: Any, hooks: list[str]) -> None:
        self._loader, self._hooks = loader, hooks

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader  # what the module sees is its own loader
        self._loader.exec_module(module)
        run_hooks(module, self._hooks)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _Finder:
    """Finds the hooked modules with the other finders and wraps their loaders."""

    def __init__(self, hooks: dict[str, list[str]]) -> None:
        self.hooks = hooks

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        hooks = self.hooks.get(fullname)
        if hooks is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, hooks)  # type: ignore[assignment]
                return spec
        return None


def run_hooks(module: ModuleType, targets: list[str]) -> None:
    """Call each `package.module:function` in `targets` with `module`; one that cannot be
    loaded or raises is one notice on stderr."""
    for target in targets:
        name, _, attribute = target.partition(":")
        try:
            function: Any = importlib.import_module(name)
            for part in attribute.split("."):
                function = getattr(function, part)
            function(module)
        except Exception as error:
            _notice(
                f"the import hook {target} for {module.__name__} failed "
                f"({type(error).__name__}: {error}); the script goes on without it"
            )


def install(text: str | None = None) -> None:
    """Add the finder for the hooks in `text` (EXPKIT_IMPORT_HOOKS's format; default: the
    variable), once per process. Modules already imported get their hooks now."""
    hooks = decode(os.environ.get(HOOKS_ENV, "") if text is None else text)
    if not hooks or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder(hooks))
    for module_name, targets in hooks.items():
        module = sys.modules.get(module_name)
        if module is not None:
            run_hooks(module, targets)


def _notice(text: str) -> None:
    try:
        sys.stderr.write(f"expkit: {text}\n")
        sys.stderr.flush()
    except Exception:
        pass
