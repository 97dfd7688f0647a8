"""`python -m expkit.guard COMMAND [ARG ...]`: run COMMAND so that everything it starts dies
with the process that started the guard.

The kernel's "die with the parent" signal (PR_SET_PDEATHSIG) reaches one process only: a
data-prepare command that starts workers (multiprocessing, a shell running a pipeline)
would leave them running after a kill -9 of the driver. The guard gets that signal itself,
is the child subreaper of what the command starts (so daemons stay below it), and stops the
whole tree before it exits: when the driver dies, when it is asked to stop (SIGTERM, SIGINT,
SIGHUP), and when the command ends. Its exit code is the command's (128 + N for signal N).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from expkit.procs import become_subreaper, die_with_parent, stop_descendants

STOP_GRACE_SECONDS = 2.0


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def main(argv: list[str]) -> int:
    """Run `argv` under the guard; returns its exit code (see the module's docstring)."""
    if not argv:
        print("usage: python -m expkit.guard COMMAND [ARG ...]", file=sys.stderr)
        return 2
    parent = os.getppid()

    def stop(signum: int, frame: Any) -> None:
        raise _Stop(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was armed
        return 128 + signal.SIGTERM
    become_subreaper()
    code = 0
    try:
        try:
            child = subprocess.Popen(argv)
        except OSError as error:
            print(f"{argv[0]}: {error.strerror}", file=sys.stderr)
            return 127
        returncode = child.wait()
        code = 128 - returncode if returncode < 0 else returncode
    except _Stop as stopped:
        code = 128 + stopped.signum
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the tree is stopped whatever comes now
        stop_descendants(grace=STOP_GRACE_SECONDS)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
