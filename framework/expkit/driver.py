"""`python -m expkit.driver WORKSPACE RUN_ID [--reattach | --resume]`: drive a run in the
background.

`Experiment.submit()` and `expkit run --detach` start one for a new run; an expkit command
that finds a run whose job outlives its driver (a Slurm job, see `RunContext.set_remote_job`)
with that driver gone starts one with `--reattach`, which takes the run over and follows the
job to its end; `expkit runs resume --detach` one with `--resume`, for the run's next
attempt. Each runs in its own session, so the run goes on when the command that started it
ends or its terminal closes; its stage lines go to the run's `driver.log`.
"""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from expkit.workspace import Workspace

DRIVER_LOG = "driver.log"


def start_driver(
    workspace: Workspace, run_id: str, reattach: bool = False, resume: bool = False
) -> int:
    """Start a background driver for run `run_id` and record it as the run's driver; returns
    its pid. The caller must be the run's driver or hold the run (`Runs.take_over`), so that
    no other process starts one too. `reattach`, `resume`: as `expkit.lifecycle.drive`'s
    (`resume`: a run `lifecycle.reopen` made queued again)."""
    flags = [*(["--reattach"] if reattach else []), *(["--resume"] if resume else [])]
    argv = ["expkit.driver", str(workspace.path), run_id, *flags]
    pid = start_background(workspace, run_id, argv)
    workspace.history.runs.claim(run_id, pid)
    return pid


def start_background(
    workspace: Workspace, run_id: str, module_args: list[str], env: dict[str, str] | None = None
) -> int:
    """Start `python -m MODULE ARGS...` (`module_args`) for run `run_id` in a session of its
    own, so that it goes on when the command that started it or its terminal ends, its output
    appended to the run's driver.log; returns its pid. `env`: its environment (default: this
    process's)."""
    run_dir = workspace.run_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / DRIVER_LOG, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", *module_args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return process.pid


def main(argv: list[str]) -> int:
    from expkit.console import Console
    from expkit.lifecycle import drive
    from expkit.workspace import Workspace

    reattach, resume = "--reattach" in argv, "--resume" in argv
    workspace_path, run_id = [a for a in argv if a not in ("--reattach", "--resume")]
    console = Console(sys.stdout, ranks="none")
    record = drive(
        Workspace(workspace_path),
        run_id,
        console,
        own_process=True,
        reattach=reattach,
        resume=resume,
    )
    return 0 if record.state == "completed" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
