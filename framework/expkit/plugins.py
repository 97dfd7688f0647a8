"""Finding plugins, collecting what they supply, and calling their hooks safely.

Plugins are found through the entry-point group `expkit` (built-ins too). A plugin that fails
to import is skipped with a one-line reason; `EXPKIT_DISABLE_PLUGINS=a,b` blocks plugins by
name; `EXPKIT_TRACE=1` prints every hook call to stderr.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pluggy

from expkit import hookspecs
from expkit.capabilities import KINDS, Capability
from expkit.errors import PluginError, UserError

ENTRY_POINT_GROUP = "expkit"
DISABLE_ENV = "EXPKIT_DISABLE_PLUGINS"
TRACE_ENV = "EXPKIT_TRACE"

C = TypeVar("C", bound=Capability)


@dataclass
class PluginInfo:
    """One plugin as `expkit plugins` shows it."""

    name: str
    distribution: str = ""
    version: str = ""
    hooks: list[str] = field(default_factory=list)
    error: str | None = None  # why it could not load; None when loaded
    blocked: bool = False


class Plugins:
    """The loaded plugins and the capabilities they supply, looked up by kind and name."""

    def __init__(self, pm: pluggy.PluginManager, infos: dict[str, PluginInfo]) -> None:
        self.pm = pm
        self.infos = infos
        self._table: dict[str, dict[str, Capability]] | None = None
        self.conflicts: list[str] = []

    # -- registering ------------------------------------------------------------------------
    def register(self, plugin: object, name: str) -> None:
        """Register a plugin object by hand (tests, embedding applications)."""
        self.pm.register(plugin, name=name)
        self.infos[name] = PluginInfo(name, hooks=self._hooks_of(plugin))
        self._table = None

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.infos.pop(name, None)
        self._table = None

    def _hooks_of(self, plugin: object) -> list[str]:
        return sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])

    # -- capabilities -----------------------------------------------------------------------
    def _collect(self) -> dict[str, dict[str, Capability]]:
        if self._table is not None:
            return self._table
        table: dict[str, dict[str, Capability]] = {kind: {} for kind in KINDS}
        conflicts = []
        for kind, base in KINDS.items():
            impls = list(reversed(getattr(self.pm.hook, f"expkit_{kind}").get_hookimpls()))
            self._trace(f"expkit_{kind}", impls, {})
            for impl in impls:  # registration order
                try:
                    supplied = impl.function() or []
                except Exception as error:  # a broken plugin must not break the command
                    self._fail(impl.plugin_name, f"expkit_{kind} raised: {error}")
                    continue
                if not isinstance(supplied, list | tuple):  # e.g. one object, not a list
                    self._fail(
                        impl.plugin_name,
                        f"expkit_{kind} returned {supplied!r}, not a list of {base.__name__}",
                    )
                    continue
                for obj in supplied:
                    if not isinstance(obj, base) or not obj.name:
                        self._fail(
                            impl.plugin_name,
                            f"expkit_{kind} returned {obj!r}, not a named {base.__name__}",
                        )
                        continue
                    obj.plugin = impl.plugin_name
                    other = table[kind].get(obj.name)
                    if other is not None:
                        conflicts.append(
                            f"{base.kind} {obj.name!r} is supplied by two plugins: "
                            f"{self._describe(other.plugin)} and {self._describe(obj.plugin)}; "
                            f"uninstall one or block it with {DISABLE_ENV}={obj.plugin}"
                        )
                        continue
                    table[kind][obj.name] = obj
        self._table, self.conflicts = table, conflicts
        return table

    def _fail(self, plugin: str, reason: str) -> None:
        info = self.infos.setdefault(plugin, PluginInfo(plugin))
        info.error = reason

    def _describe(self, plugin: str) -> str:
        info = self.infos.get(plugin)
        if info and info.distribution:
            return f"{plugin} ({info.distribution} {info.version})"
        return plugin

    def all(self, kind: str) -> dict[str, Capability]:
        """Every capability of `kind` ("compute_targets", ...) by name."""
        return dict(self._collect()[kind])

    def check_conflicts(self) -> None:
        """Raise when two plugins claim one name (the user must choose)."""
        self._collect()
        if self.conflicts:
            raise UserError(self.conflicts[0])

    def get(self, kind: str, name: str, field_path: str = "") -> Any:
        """The capability `name` of `kind`, or a UserError that lists what is available."""
        self.check_conflicts()
        found = self._collect()[kind].get(name)
        if found is not None:
            return found
        base = KINDS[kind]
        available = ", ".join(sorted(self._collect()[kind])) or "none"
        where = f"{field_path}: " if field_path else ""
        info = self.infos.get(name)  # a plugin named like what is asked for, that did not load
        if info is not None and info.error and not info.hooks:
            why = f"plugin {name} did not load: {info.error}"
        else:
            why = "is its plugin installed? `expkit plugins` lists what loaded and why not"
        raise UserError(f"{where}no {base.kind} named {name!r} (available: {available}); {why}")

    def _trace(self, hook: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
        """Print a hook call to stderr when tracing (EXPKIT_TRACE=1, --debug); else nothing.

        Hooks are called one implementation at a time (to isolate each plugin), bypassing
        pluggy's own tracing, so the call is written to pluggy's tracer here.
        """
        called = ", ".join(impl.plugin_name for impl in impls) or "no plugin"
        shown = {k: getattr(v, "run_id", v) for k, v in kwargs.items()}  # a RunInfo as its id
        self.pm.trace.root.get("hook")(f"{hook} -> {called}", shown)

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


def load(disabled: str | None = None, trace: bool | None = None) -> Plugins:
    """Build the plugin manager from the installed entry points."""
    from importlib.metadata import entry_points

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = {n.strip() for n in (disabled or os.environ.get(DISABLE_ENV, "")).split(",")}
    blocked.discard("")
    infos: dict[str, PluginInfo] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else ""
        version = ep.dist.version if ep.dist else ""
        info = infos[ep.name] = PluginInfo(ep.name, dist, version)
        if ep.name in blocked:
            info.blocked, info.error = True, f"blocked by {DISABLE_ENV}"
            pm.set_blocked(ep.name)
            continue
        if pm.has_plugin(ep.name):
            info.error = "another entry point already registered this name"
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as error:  # ImportError, PluginUnavailable, a bug in the plugin
            info.error = _one_line(error)
            continue
        info.hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
    if trace if trace is not None else os.environ.get(TRACE_ENV):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return Plugins(pm, infos)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    message = text[0] if text else ""
    if type(error).__name__ in ("PluginUnavailable",):
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


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
