"""Finding plugins, collecting what they supply, and calling them safely.

Plugins are found through the entry-point group `expkit` (built-ins too; the scan of the
installed distributions is remembered while none changes, see `expkit.entrycache`). A plugin
that fails to import, implements a hook expkit does not have (a misspelt name) or takes
arguments its hook does not pass is not loaded, with a one-line reason;
`EXPKIT_DISABLE_PLUGINS=a,b` blocks plugins by name. Every call of a capability's method goes
through `call`, which names the plugin, the capability and the method when it raises.
`EXPKIT_TRACE=1` (or `--debug`) prints every hook call and every capability method call to
stderr.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import pluggy

from expkit import hookspecs
from expkit.capabilities import KINDS, Capability
from expkit.console import human_seconds
from expkit.errors import Canceled, PluginError, StageFailed, UserError, quoted

ENTRY_POINT_GROUP = "expkit"
DISABLE_ENV = "EXPKIT_DISABLE_PLUGINS"
TRACE_ENV = "EXPKIT_TRACE"

C = TypeVar("C", bound=Capability)


@dataclass
class PluginInfo:
    """One plugin as `expkit plugins` shows it.

    `source` is the installed distribution its entry point came from (an
    `importlib.metadata.Distribution`, or `expkit.entrycache.Distribution` when the entry
    points came from the cache; None for one registered in-process): its name and
    version are read from it on first use, since parsing a distribution's METADATA costs
    milliseconds per plugin and only `expkit plugins` and a conflict's message show them.
    """

    name: str
    source: Any = field(default=None, repr=False, compare=False)
    hooks: list[str] = field(default_factory=list)
    error: str | None = None  # why it could not load; None when loaded
    blocked: bool = False

    @property
    def distribution(self) -> str:
        """The name of the distribution that installed the plugin; "" when none did."""
        return _metadata(self.source)[0]

    @property
    def version(self) -> str:
        """That distribution's version; "" when none installed the plugin."""
        return _metadata(self.source)[1]


@functools.lru_cache(maxsize=256)
def _metadata(distribution: Any) -> tuple[str, str]:
    """(name, version) of a distribution (anything with `metadata`), its METADATA parsed once
    (the built-in plugins share one distribution); ("", "") for None."""
    if distribution is None:
        return "", ""
    metadata = distribution.metadata
    return metadata["Name"] or "", metadata["Version"] or ""


class Plugins:
    """The loaded plugins and the capabilities they supply, looked up by kind and name."""

    def __init__(self, pm: pluggy.PluginManager, infos: dict[str, PluginInfo]) -> None:
        self.pm = pm
        self.infos = infos
        self._table: dict[str, dict[str, Capability]] = {}  # by kind, as collected
        self._failures: dict[str, list[str]] = {}  # by kind: why a plugin supplied none
        self._conflicts: dict[str, list[str]] = {}  # by kind: names two plugins supply

    # -- registering ------------------------------------------------------------------------
    def register(self, plugin: object, name: str) -> None:
        """Register a plugin object by hand (tests, embedding applications).

        Raises UserError, and registers nothing, for a plugin that implements a hook expkit
        does not have or asks a hook for an argument it does not pass."""
        problem = _register(self.pm, plugin, name)
        if problem:
            raise UserError(f"plugin {name}: {problem}")
        self.infos[name] = PluginInfo(name, hooks=self._hooks_of(plugin))
        self._forget()

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.infos.pop(name, None)
        self._forget()

    def _forget(self) -> None:
        """Drop what the capability hooks supplied: the plugins changed."""
        self._table, self._failures, self._conflicts = {}, {}, {}

    def _hooks_of(self, plugin: object) -> list[str]:
        return sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])

    # -- capabilities -----------------------------------------------------------------------
    def _collect(self, kind: str) -> dict[str, Capability]:
        """The capabilities of `kind` by name, from calling every plugin's hook of that kind
        once, on first use: a command calls the hooks of the kinds it uses only, so that a
        run imports no module of a kind it does not use (an exporter's, a registry's with
        MLflow's client) beyond each plugin's own package."""
        found = self._table.get(kind)
        if found is not None:
            return found
        base = KINDS[kind]
        table: dict[str, Capability] = {}
        impls = list(reversed(getattr(self.pm.hook, f"expkit_{kind}").get_hookimpls()))
        self._trace(f"expkit_{kind}", impls, {})
        for impl in impls:  # registration order
            try:
                supplied = impl.function() or []
            except Exception as error:  # a broken plugin must not break the command
                self._fail(kind, impl.plugin_name, f"expkit_{kind} raised: {_first_line(error)}")
                continue
            if not isinstance(supplied, list | tuple):  # e.g. one object, not a list
                self._fail(
                    kind,
                    impl.plugin_name,
                    f"expkit_{kind} returned {supplied!r}, not a list of {base.__name__}",
                )
                continue
            for obj in supplied:
                if not isinstance(obj, base) or not obj.name:
                    self._fail(
                        kind,
                        impl.plugin_name,
                        f"expkit_{kind} returned {obj!r}, not a named {base.__name__}",
                    )
                    continue
                obj.plugin = impl.plugin_name
                other = table.get(obj.name)
                if other is not None:
                    self._conflicts.setdefault(kind, []).append(
                        f"{base.kind} {obj.name!r} is supplied by two plugins: "
                        f"{self._describe(other.plugin)} and {self._describe(obj.plugin)}; "
                        f"uninstall one or block it with {DISABLE_ENV}={obj.plugin}"
                    )
                    continue
                table[obj.name] = obj
        self._table[kind] = table
        return table

    @property
    def conflicts(self) -> list[str]:
        """Every name two plugins claim, one message each, in the order of the capability
        kinds (collecting every kind: `expkit plugins` shows them all)."""
        for kind in KINDS:
            self._collect(kind)
        return [message for kind in KINDS for message in self._conflicts.get(kind, [])]

    def _fail(self, kind: str, plugin: str, reason: str) -> None:
        """A plugin's capability hook of `kind` raised or returned something unusable."""
        info = self.infos.setdefault(plugin, PluginInfo(plugin))
        info.error = reason
        self._failures.setdefault(kind, []).append(f"plugin {plugin}: {reason}")

    def _describe(self, plugin: str) -> str:
        info = self.infos.get(plugin)
        if info and info.distribution:
            return f"{plugin} ({info.distribution} {info.version})"
        return plugin

    def all(self, kind: str) -> dict[str, Capability]:
        """Every capability of `kind` ("compute_targets", ...) by name."""
        return dict(self._collect(kind))

    def check_conflicts(self, kind: str | None = None) -> None:
        """Raise UserError when two plugins claim one name of `kind` (None: of any kind):
        the user must choose, by uninstalling or blocking one."""
        if kind is None:
            conflicts = self.conflicts
        else:
            self._collect(kind)
            conflicts = self._conflicts.get(kind, [])
        if conflicts:
            raise UserError(conflicts[0])

    def get(self, kind: str, name: str, field_path: str = "") -> Any:
        """The capability `name` of `kind`, or a UserError that lists what is available;
        also a UserError when two plugins claim a name of `kind` (`check_conflicts`)."""
        self.check_conflicts(kind)
        found = self._collect(kind).get(name)
        if found is not None:
            return found
        base = KINDS[kind]
        available = ", ".join(sorted(self._collect(kind))) or "none"
        where = f"{field_path}: " if field_path else ""
        info = self.infos.get(name)  # a plugin named like what is asked for, that did not load
        if info is not None and info.error and not info.hooks:
            why = f"plugin {name} did not load: {info.error}"
        elif self._failures.get(kind):  # it may be the one a failing hook would have supplied
            why = "; ".join(self._failures[kind])
        else:
            why = "is its plugin installed? `expkit plugins` lists what loaded and why not"
        raise UserError(f"{where}no {base.kind} named {name!r} (available: {available}); {why}")

    def _trace(self, hook: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
        """Print a hook call to stderr when tracing (EXPKIT_TRACE=1, --debug); else nothing.

        Hooks are called one implementation at a time (to isolate each plugin), bypassing
        pluggy's own tracing, so the call is written to pluggy's tracer here.
        """
        called = ", ".join(impl.plugin_name for impl in impls) or "no plugin"
        shown = {  # a RunInfo as its id, a Stage or an Outcome as its text
            k: getattr(v, "run_id", str(v) if isinstance(v, StrEnum) else v)
            for k, v in kwargs.items()
        }
        self.pm.trace.root.get("hook")(f"{hook} -> {called}", shown)

    def import_hooks(self) -> dict[str, list[str]]:
        """What every loaded plugin's `expkit_import_hooks` names: module -> targets
        ("package.module:function"). A hook that raises or returns something else than a
        mapping of strings is left out (its plugin shows the error in `expkit plugins`)."""
        hooks: dict[str, list[str]] = {}
        impls = list(reversed(self.pm.hook.expkit_import_hooks.get_hookimpls()))
        self._trace("expkit_import_hooks", impls, {})
        for impl in impls:
            try:
                named = impl.function() or {}
                if not isinstance(named, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) and ":" in v for k, v in named.items()
                ):
                    raise TypeError(
                        f"returned {named!r}, not {{module: 'package.module:function'}}"
                    )
            except Exception as error:
                self._fail(
                    "import_hooks", impl.plugin_name, f"expkit_import_hooks: {_first_line(error)}"
                )
                continue
            for module, target in named.items():
                hooks.setdefault(module, []).append(target)
        return hooks

    # -- events -----------------------------------------------------------------------------
    def notify(self, hook: str, **kwargs: Any) -> list[PluginError]:
        """Call every implementation of an event hook; one that raises is isolated."""
        errors = []
        impls = list(reversed(getattr(self.pm.hook, hook).get_hookimpls()))
        self._trace(hook, impls, kwargs)
        for impl in impls:
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except Exception as error:
                errors.append(PluginError(impl.plugin_name, hook, error))
        return errors


def load(disabled: str | None = None) -> Plugins:
    """Build the plugin manager from the installed entry points.

    A plugin is loaded only when it imports, every hook it implements is one of
    `expkit.hookspecs` and each asks only for arguments its hook passes; otherwise its
    `PluginInfo.error` says why, in one line, and `expkit plugins` shows it as not loaded.
    """
    from expkit.entrycache import entry_points

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = {n.strip() for n in (disabled or os.environ.get(DISABLE_ENV) or "").split(",")}
    blocked.discard("")
    infos: dict[str, PluginInfo] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        info = infos[ep.name] = PluginInfo(ep.name, ep.dist)
        if ep.name in blocked:
            info.blocked, info.error = True, f"blocked by {DISABLE_ENV}"
            pm.set_blocked(ep.name)
            continue
        if pm.has_plugin(ep.name):
            info.error = "another entry point already registered this name"
            continue
        try:
            plugin = ep.load()
            info.error = _register(pm, plugin, ep.name)
        except Exception as error:  # ImportError, PluginUnavailable, a bug in the plugin
            info.error = _one_line(error)
            continue
        if info.error is None:
            info.hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
    if tracing():
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return Plugins(pm, infos)


def _register(pm: pluggy.PluginManager, plugin: object, name: str) -> str | None:
    """Register `plugin` as pluggy's `check_pending` would have it: None when it is, else why
    not in one line (and it is left unregistered)."""
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as error:  # nothing was registered
        return _invalid(pm, error)
    known = sorted(n for n, caller in vars(pm.hook).items() if _has_spec(caller))
    unknown = []
    for caller in pm.get_hookcallers(plugin) or []:
        mine = [impl for impl in caller.get_hookimpls() if impl.plugin is plugin]
        if caller.has_spec() or all(impl.optionalhook for impl in mine):
            continue
        import difflib

        close = difflib.get_close_matches(caller.name, known, n=1)
        unknown.append(caller.name + (f" (did you mean {close[0]}?)" if close else ""))
    if not unknown:
        return None
    pm.unregister(plugin)
    hooks = "hook" if len(unknown) == 1 else "hooks"
    return f"implements unknown {hooks} {', '.join(unknown)}"


def _has_spec(caller: Any) -> bool:
    return isinstance(caller, pluggy.HookCaller) and caller.has_spec()


def _invalid(pm: pluggy.PluginManager, error: pluggy.PluginValidationError) -> str:
    """pluggy's several-line PluginValidationError as one complete line: the hook, how the
    plugin defines it and what is wrong (the arguments the hook does not pass)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    found = re.fullmatch(r"Plugin '.*' for hook '(\w+)'", lines[0]) if lines else None
    if found is None:
        return "; ".join(lines) or "PluginValidationError"
    hook, rest = found.group(1), lines[1:]
    definition = rest[0].removeprefix("hookimpl definition: ") if rest else hook
    extra = re.fullmatch(r"Argument\(s\) \{(.*)\} are declared in the hookimpl .*", rest[-1])
    if extra is None:
        return f"hook {hook}: " + "; ".join(rest)
    names = ", ".join(sorted(re.findall(r"'(\w+)'", extra.group(1))))
    spec = getattr(pm.hook, hook).spec
    passed = ", ".join(spec.argnames) if spec and spec.argnames else "nothing"
    return f"{definition} asks for {names}, which hook {hook} does not pass (it passes {passed})"


def _one_line(error: BaseException) -> str:
    message = _first_line(error, named=False)
    if type(error).__name__ in ("PluginUnavailable",):
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _first_line(error: BaseException, named: bool = True) -> str:
    """The first line of an exception's message; its type's name when it has none."""
    text = str(error).strip().splitlines()
    return text[0] if text else (type(error).__name__ if named else "")


# -- calling a capability's methods ---------------------------------------------------------------
def tracing() -> bool:
    """True when hook and capability calls are traced to stderr (EXPKIT_TRACE=1, --debug)."""
    return os.environ.get(TRACE_ENV, "") not in ("", "0")


def call(capability: Capability, method: str, *args: Any, on: object | None = None) -> Any:
    """Call `capability.method(*args)` (or `on.method(*args)`: an object the capability
    made, such as a sink's MetricWriter) and return what it returns.

    The one way the core calls a plugin: an exception from it comes back as a PluginError
    "plugin X, <kind> 'name' method: message"; UserError, StageFailed, Canceled and
    KeyboardInterrupt pass as they are (the plugin chose them). With tracing on, the call and
    its outcome are each one line on stderr.
    """
    function = getattr(capability if on is None else on, method)
    label = f"{capability.kind} {capability.name!r}"
    traced = tracing()
    if traced:
        shown = ", ".join(_shown(arg) for arg in args)
        _trace_line(f"call {label} (plugin {capability.plugin or '?'}).{method}({shown})")
    started = time.monotonic()
    try:
        result = function(*args)
    except BaseException as error:
        if traced:
            seconds = time.monotonic() - started
            _trace_line(f"{label}.{method} raised {_one_line(error)} ({human_seconds(seconds)})")
        if isinstance(error, UserError | StageFailed | Canceled) or not isinstance(
            error, Exception
        ):
            raise
        raise PluginError(capability.plugin or "?", f"{label} {method}", error) from error
    if traced:
        seconds = time.monotonic() - started
        _trace_line(f"{label}.{method} returned {_shown(result)} ({human_seconds(seconds)})")
    return result


def _shown(value: Any) -> str:
    """An argument or result as a trace line shows it: a run by its id, else a short repr."""
    run_id = getattr(value, "run_id", None)
    if isinstance(run_id, str):
        return f"run {run_id}"
    if isinstance(value, str | int | float | bool | type(None)):
        return quoted(value, 60)
    if isinstance(value, list | tuple):  # "[1 x Process]", "[5000 x Metric]"
        return f"[{len(value)} x {type(value[0]).__name__}]" if value else "[]"
    if isinstance(value, dict):
        return f"{{{len(value)} keys}}"
    return f"<{type(value).__name__}>"


def _trace_line(text: str) -> None:
    """One trace line on stderr, written at once (sink threads trace too)."""
    try:
        sys.stderr.write(f"expkit: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # the terminal has gone, or stderr was closed
        pass


_loaded: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin set, loaded once on first use."""
    global _loaded
    if _loaded is None:
        _loaded = load()
    return _loaded


def reset() -> None:
    """Forget the loaded plugins (tests, or after installing a plugin in-process)."""
    global _loaded
    _loaded = None
