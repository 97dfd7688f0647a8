"""SIGTERM and SIGHUP stop a command as Ctrl-C does, and a second signal never kills it.

A `kill`, a service manager or a closed terminal must leave what Ctrl-C leaves: the command's
own cleanup ran (workers stopped, temporary files removed, nothing half-written recorded)
and the exit code is 130. Used by commands that start workers outside a run (`expkit
export`); a run's driver has its own handler (`expkit.lifecycle`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def like_ctrl_c() -> Iterator[list[str]]:
    """Within: the first SIGINT, SIGTERM or SIGHUP raises KeyboardInterrupt (the CLI's exit
    130); every later one is only noted on stderr, so that the cleanup the first started is
    never cut short. Yields the names of the signals received, first first.

    After a signal the three stay ignored when the block ends: the process is on its way
    out, and Python puts back their default action (death) while it exits. A signal the
    process was started ignoring (`nohup`) stays ignored throughout. Outside the main
    thread this does nothing."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        received.append(name)
        if len(received) > 1:
            with contextlib.suppress(OSError):  # no lock, no exception: the terminal may be gone
                os.write(
                    2, f"expkit: {name}: stopping and cleaning up; it takes a moment\n".encode()
                )
            return
        raise KeyboardInterrupt

    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        if previous[sig] != signal.SIG_IGN:
            signal.signal(sig, handler)
    try:
        yield received
    finally:
        for sig in SIGNALS:
            if previous[sig] != signal.SIG_IGN:
                signal.signal(sig, signal.SIG_IGN if received else previous[sig])
