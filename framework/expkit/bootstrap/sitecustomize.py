"""expkit's start-up hook for a run's Python processes (see expkit.importhooks).

On PYTHONPATH only inside a run: installs the import hooks named by EXPKIT_IMPORT_HOOKS,
then imports the `sitecustomize` this one hides, if there is one further on sys.path.
"""

import importlib.machinery
import os
import sys

try:  # importlib.util's own function (it re-exports it), without what importlib.util imports
    from importlib._bootstrap import module_from_spec  # (contextlib, collections: ~3 ms)
except ImportError:  # pragma: no cover - a Python whose frozen bootstrap moved it
    from importlib.util import module_from_spec


def _install() -> None:
    try:
        from expkit.importhooks import install
    except Exception:  # expkit is not importable in this interpreter: nothing to hook
        return
    install()


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


try:
    _install()
finally:
    _chain()
