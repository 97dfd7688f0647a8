"""Shared test helpers. The main fixtures (expkit_workspace, run_job, register_plugin,
expkit_cli) come from expkit's own pytest plugin, `expkit.testing`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def write_job(tmp_path: Path):
    """`write_job(spec, script=..., files=...)` -> path of a job.yaml next to a source folder."""
    counter = iter(range(1000))

    def write(spec: dict, script: str | None = None, files: dict[str, str] | None = None) -> Path:
        folder = tmp_path / f"project-{next(counter)}"
        source = folder / "src"
        source.mkdir(parents=True)
        spec = {"experiment": "test", "source_directory": "src", "entry_script": "train.py", **spec}
        if script is not None:
            (source / spec["entry_script"]).write_text(textwrap.dedent(script))
        for name, text in (files or {}).items():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_text(textwrap.dedent(text))
        job = folder / "job.yaml"
        job.write_text(yaml.safe_dump(spec, sort_keys=False))
        return job

    return write
