"""Environment builders for the prepare stage.

`pip` builds a virtual environment that sees this interpreter's packages plus the listed ones,
cached in the workspace by a hash of its inputs: the second run with the same packages finds
it in milliseconds and says so.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

from expkit.plugin import (
    ENV_COMPLETE,
    Environment,
    EnvironmentBuilder,
    EnvironmentSpec,
    Option,
    RunContext,
    UserError,
    declare_options,
    die_with_parent,
    runner,
)

COMPLETE = ENV_COMPLETE  # the next open removes a folder without it (see ENV_COMPLETE)


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class InheritBuilder(EnvironmentBuilder):
    name = "inherit"
    description = "the interpreter expkit runs in, as it is"
    takes = declare_options()

    def build(self, spec: EnvironmentSpec, ctx: RunContext) -> Environment:
        if spec.packages:
            raise UserError("environment: `inherit` takes no packages; use `pip: [...]`")
        digest = _key({"python": sys.executable, "version": sys.version})
        return Environment(
            python=sys.executable,
            hash=f"inherit-{digest}",
            cache_hit=True,
            reason=f"environment: this interpreter (Python {sys.version.split()[0]}, inherit)",
        )


class PipBuilder(EnvironmentBuilder):
    name = "pip"
    description = "a virtual environment over this interpreter's packages, plus pip packages"
    takes = declare_options(
        index_url=Option(
            str,
            pattern=r"\S+",
            text="a package index URL, e.g. https://pypi.org/simple",
            help="the package index pip installs from (default: pip's own, PyPI or pip.conf)",
        )
    )

    def build(self, spec: EnvironmentSpec, ctx: RunContext) -> Environment:
        inputs = {
            "builder": "pip",
            "python": sys.executable,
            "version": sys.version,
            "packages": sorted(spec.packages),
            "options": spec.options,
        }
        key = f"pip-{_key(inputs)}"
        folder = ctx.cache_dir / key
        folder.parent.mkdir(parents=True, exist_ok=True)
        python = folder / "bin" / "python"
        env = {
            "VIRTUAL_ENV": str(folder),
            "PATH": f"{folder / 'bin'}{os.pathsep}{os.environ['PATH']}",
        }
        if (folder / COMPLETE).exists():
            return Environment(str(python), key, True, f"environment cache hit ({key})", env)
        with open(folder.parent / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building the same one
            if (folder / COMPLETE).exists():
                return Environment(str(python), key, True, f"environment cache hit ({key})", env)
            why = "a previous build did not finish" if folder.exists() else "no environment yet"
            packages = ", ".join(spec.packages) or "no packages"
            ctx.say(f"environment cache miss ({key}): {why} for {packages}")
            shutil.rmtree(folder, ignore_errors=True)
            self._create(folder, spec, ctx)
            (folder / COMPLETE).write_text(json.dumps(inputs, indent=2))
        # The lifecycle adds how long the build took, as every duration is shown.
        return Environment(str(python), key, False, f"environment built ({key})", env)

    def _create(self, folder: Path, spec: EnvironmentSpec, ctx: RunContext) -> None:
        _run(
            [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(folder)],
            ctx,
            "create the virtual environment",
        )
        # Let the new environment see this one's packages (the base of a venv is not enough
        # when expkit itself runs in a venv); its own packages still come first.
        purelib = subprocess.check_output(
            [
                str(folder / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            text=True,
            env=_marked(ctx),
            preexec_fn=die_with_parent,
        ).strip()
        lines = [f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages()]
        Path(purelib, "_expkit_parent.pth").write_text("".join(lines))
        if spec.packages:
            index = spec.options.get("index_url")
            extra = ["--index-url", index] if index else []
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "--python",
                    str(folder / "bin" / "python"),
                    "install",
                    "--disable-pip-version-check",
                    "--progress-bar",
                    "off",
                    *extra,
                    *spec.packages,
                ],
                ctx,
                f"install {', '.join(spec.packages)}",
            )


def _marked(ctx: RunContext) -> dict[str, str]:
    """This environment plus the run's marker, so that the run's clean-up finds the process
    (and what it starts) wherever it went."""
    return {**os.environ, **runner.run_markers(ctx)}


def _run(argv: list[str], ctx: RunContext, what: str) -> None:
    # Under the guard: pip's own children (`pip --python` runs pip again in the new
    # environment) die with the driver too, not only pip.
    proc = subprocess.Popen(
        runner.guarded(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=_marked(ctx),
        preexec_fn=die_with_parent,  # a kill -9 of the driver stops pip too
    )
    last: list[str] = []
    assert proc.stdout is not None  # stdout=PIPE
    ctx.log(f"$ {' '.join(argv)}")
    for line in proc.stdout:
        line = line.rstrip()
        if not line or "is ignored: it is neither a file nor a directory" in line:
            continue
        last = [*last[-4:], line]
        ctx.log(line)  # pip's index lines, temporary paths: in the run's log only
        if line.startswith("Successfully installed"):  # what the environment gained
            ctx.say(line)
    if proc.wait() != 0:
        reason = next((x for x in reversed(last) if "ERROR" in x), last[-1] if last else "")
        raise UserError(
            f"environment: could not {what}: {reason} (pip's output: the run's logs/prepare.log)"
        )
