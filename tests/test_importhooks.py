"""Import hooks: a plugin's function runs in every Python process of a run right after the
process imports the module it names (how Azure ML's and MLflow's in-script APIs are made to
record into the run), and nothing else about the script's interpreter changes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from expkit import importhooks

FRAMEWORK = Path(importhooks.__file__).resolve().parents[1]


def _python(
    tmp_path: Path, script: str, hooks: str, pythonpath: list[Path]
) -> subprocess.CompletedProcess:
    (tmp_path / "script.py").write_text(textwrap.dedent(script))
    base = {"PYTHONPATH": os.pathsep.join(map(str, [*pythonpath, FRAMEWORK]))}
    env = {**os.environ, **importhooks.script_env(importhooks.decode(hooks), base)}
    return subprocess.run(
        [sys.executable, "script.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _modules(tmp_path: Path) -> Path:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "target_mod.py").write_text("VALUE = 1\n")
    (lib / "hooks.py").write_text(
        "def install(module):\n    module.VALUE = 2\n\n"
        "def broken(module):\n    raise RuntimeError('no luck')\n"
    )
    return lib


def test_a_hook_runs_right_after_its_module_is_imported(tmp_path):
    lib = _modules(tmp_path)
    script = """
        import sys
        assert "target_mod" not in sys.modules   # nothing imported ahead of the script
        import target_mod
        print("value", target_mod.VALUE, type(target_mod.__loader__).__name__)
    """
    result = _python(tmp_path, script, "target_mod=hooks:install", [lib])
    assert result.returncode == 0, result.stderr
    assert "value 2 SourceFileLoader" in result.stdout
    assert result.stderr == ""


def test_a_hook_that_fails_is_one_notice_and_the_script_goes_on(tmp_path):
    lib = _modules(tmp_path)
    script = "import target_mod\nprint('value', target_mod.VALUE)\n"
    result = _python(tmp_path, script, "target_mod=hooks:broken;target_mod=hooks:missing", [lib])
    assert result.returncode == 0, result.stderr
    assert "value 1" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert "hooks:broken for target_mod failed (RuntimeError: no luck)" in lines[0]
    assert "hooks:missing" in lines[1]


def test_the_sitecustomize_it_hides_still_runs(tmp_path):
    """Debian's python, and many sites, have a sitecustomize of their own: expkit's runs
    first, then imports that one, as OpenTelemetry's and ddtrace's bootstraps do."""
    lib = _modules(tmp_path)
    (lib / "sitecustomize.py").write_text("import builtins\nbuiltins.SITE_RAN = True\n")
    script = """
        import builtins, target_mod
        print(getattr(builtins, "SITE_RAN", False), target_mod.VALUE)
    """
    result = _python(tmp_path, script, "target_mod=hooks:install", [lib])
    assert result.returncode == 0, result.stderr
    assert "True 2" in result.stdout


def test_processes_the_script_starts_get_the_hooks_too(tmp_path):
    lib = _modules(tmp_path)
    script = """
        import multiprocessing as mp, subprocess, sys

        def child(q):
            import target_mod
            q.put(target_mod.VALUE)

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=child, args=(q,))
            p.start(); print("spawned", q.get()); p.join()
            code = "import target_mod; print(target_mod.VALUE)"
            out = subprocess.check_output([sys.executable, "-c", code])
            print("subprocess", out.decode().strip())
    """
    result = _python(tmp_path, script, "target_mod=hooks:install", [lib])
    assert result.returncode == 0, result.stderr
    assert "spawned 2" in result.stdout and "subprocess 2" in result.stdout


def test_no_hooks_no_change_to_the_environment():
    assert importhooks.script_env({}, {"PYTHONPATH": "/x"}) == {}
    env = importhooks.script_env({"a": ["b:c"]}, {"PYTHONPATH": "/x"})
    assert env["PYTHONPATH"] == os.pathsep.join([str(importhooks.BOOTSTRAP_DIR), "/x"])
    assert importhooks.decode(env[importhooks.HOOKS_ENV]) == {"a": ["b:c"]}


def test_a_plugins_import_hook_reaches_the_script_of_a_run(
    run_job, register_plugin, tmp_path, monkeypatch
):
    from expkit.plugin import hookimpl

    lib = _modules(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(lib))  # where the script finds target_mod and hooks

    class Plugin:
        @hookimpl
        def expkit_import_hooks(self):
            return {"target_mod": "hooks:install"}

    register_plugin(Plugin(), "hooker")
    script = """
        import target_mod
        from expkit import Run
        Run.get_context().log("value", target_mod.VALUE)
    """
    result = run_job({}, script=script)
    assert result.state == "completed", result.record.error
    assert result.run.get_metrics()["value"] == 2
