"""`python -m expkit.driver WORKSPACE RUN_ID`: drive a submitted run in the background.

`Experiment.submit()` starts this in its own session, so the run goes on if the submitting
Python process ends; its stage lines go to the run's `driver.log`.
"""

from __future__ import annotations

import sys

from expkit.console import Console
from expkit.lifecycle import drive
from expkit.workspace import Workspace


def main(argv: list[str]) -> int:
    workspace_path, run_id = argv
    console = Console(sys.stdout, ranks="none")
    record = drive(Workspace(workspace_path), run_id, console, own_process=True)
    return 0 if record.state == "completed" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
