"""The remembered scan of installed entry points (`expkit.entrycache`): the same plugins as a
fresh scan finds, whatever was installed, uninstalled or edited since the scan was stored.

Distributions are installed for real into a folder on the path (conftest's `site`); the
cache lives in the test's own folder (EXPKIT_CACHE_DIR). Timestamps of files installed just
now are racy (see the module), so a test that wants the scan stored ages them first, as time
would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib.metadata import entry_points as fresh_scan
from pathlib import Path

import pytest

from conftest import FakeSite
from expkit import entrycache
from expkit import plugins as plugin_manager

PLUGIN = """
import expkit

@expkit.hookimpl
def expkit_compute_targets():
    return []
"""


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(entrycache.CACHE_ENV, str(folder))
    return folder


def age(site: FakeSite, seconds: float = 60) -> None:
    """Set back the mtime of every file of the site's distributions, as if installed long ago
    (the folders themselves are left alone: importlib.metadata keys its own cache on them)."""
    past = time.time() - seconds
    for path in site.path.glob("*.dist-info/*"):
        os.utime(path, (past, past))


def found(group: str = "expkit") -> list[tuple[str, str, str]]:
    """(name, value, distribution folder) of each entry point of `group`, through the cache
    (its entry points, or importlib.metadata's when it scanned)."""
    return [
        (ep.name, ep.value, entrycache._dist_path(ep) or ep.dist.path)
        for ep in entrycache.entry_points(group)
    ]


def scanned(group: str = "expkit") -> list[tuple[str, str, str]]:
    """The same, from importlib.metadata's own scan."""
    return [(ep.name, ep.value, str(ep.dist._path)) for ep in fresh_scan(group=group)]


def stored(cache_dir: Path) -> list[dict]:
    files = list(cache_dir.glob("entry-points-*.json"))
    return json.loads(files[0].read_text())["records"] if files else []


def test_a_stored_scan_is_used_and_finds_what_a_fresh_scan_finds(site, cache_dir):
    site.install("cached-plugin", {"cached": PLUGIN})
    age(site)

    first = entrycache.entry_points("expkit")  # the scan, then stored
    assert len(stored(cache_dir)) == 1
    second = entrycache.entry_points("expkit")

    assert type(second[0]) is entrycache.EntryPoint  # from the cache
    assert [(e.name, e.value) for e in first] == [(e.name, e.value) for e in second]
    assert found() == scanned()
    cached = next(e for e in second if e.name == "cached")
    assert cached.dist.metadata["Name"] == "cached-plugin"
    assert cached.load().expkit_compute_targets() == []


def test_a_plugin_installed_after_the_scan_was_stored_is_found(site, cache_dir):
    site.install("first-plugin", {"first": PLUGIN})
    age(site)
    entrycache.entry_points("expkit")
    assert stored(cache_dir)

    site.install("second-plugin", {"second": PLUGIN})

    names = [name for name, _, _ in found()]
    assert "first" in names and "second" in names
    assert found() == scanned()


def test_an_uninstalled_plugin_is_gone(site, cache_dir):
    site.install("gone-plugin", {"gone": PLUGIN})
    age(site)
    assert "gone" in [name for name, _, _ in found()]
    assert stored(cache_dir)

    for path in sorted(site.path.glob("gone_plugin-1.0.dist-info/*")):
        path.unlink()
    (site.path / "gone_plugin-1.0.dist-info").rmdir()

    assert "gone" not in [name for name, _, _ in found()]
    assert found() == scanned()


def test_an_entry_point_edited_in_place_is_read_again(site, cache_dir):
    """An editable reinstall rewrites entry_points.txt: here to the same size, and aged
    again, so that only its inode or mtime tells."""
    site.install("edited-plugin", {"one": PLUGIN})
    (site.path / "edited_plugin_two.py").write_text(PLUGIN)
    age(site)
    assert ("one", "edited_plugin_one") in [(n, v) for n, v, _ in found()]

    points = site.path / "edited_plugin-1.0.dist-info" / "entry_points.txt"
    points.write_text(
        points.read_text().replace("one = edited_plugin_one", "two = edited_plugin_two")
    )
    age(site, seconds=30)

    pairs = [(n, v) for n, v, _ in found()]
    assert ("two", "edited_plugin_two") in pairs and ("one", "edited_plugin_one") not in pairs
    assert found() == scanned()


def test_a_just_installed_plugin_is_not_stored_until_its_files_age(site, cache_dir):
    """Racy timestamps (git's racy-git rule): a scan that saw files written within the last
    seconds is not stored, so that a change within the same timestamp tick is not missed."""
    site.install("fresh-plugin", {"fresh": PLUGIN})

    assert "fresh" in [name for name, _, _ in found()]
    assert stored(cache_dir) == []
    age(site)
    found()
    assert len(stored(cache_dir)) == 1


@pytest.mark.parametrize("content", ["", "{not json", '{"version": 2, "records": [{"key": 1}]}'])
def test_a_corrupt_cache_only_costs_the_scan(site, cache_dir, content):
    site.install("sturdy-plugin", {"sturdy": PLUGIN})
    age(site)
    found()
    [file] = cache_dir.glob("entry-points-*.json")
    file.write_text(content)

    assert "sturdy" in [name for name, _, _ in found()]
    assert found() == scanned()


def test_load_reports_a_broken_cached_entry_point_as_a_fresh_scan_does(site, cache_dir):
    site.install("broken-plugin", {"broken": "raise RuntimeError('no luck')\n"})
    age(site)
    entrycache.entry_points("expkit")  # stored

    plugins = plugin_manager.load()

    assert plugins.infos["broken"].error == "RuntimeError: no luck"
    assert plugins.infos["broken"].distribution == "broken-plugin"
    assert plugins.infos["local"].error is None


CHILD = """
import json, sys
from expkit import plugins
loaded = plugins.load()
print(json.dumps({"names": sorted(loaded.infos), "metadata": "importlib.metadata" in sys.modules}))
"""


def test_a_command_with_a_stored_scan_reads_no_distribution(tmp_path: Path, cache_dir):
    """The point of the cache: a second command neither imports importlib.metadata nor reads
    the ~200 distributions' files, and loads the same plugins."""
    env = {**os.environ, entrycache.CACHE_ENV: str(cache_dir)}

    def child() -> dict:
        done = subprocess.run(
            [sys.executable, "-c", CHILD], env=env, cwd=tmp_path, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    first, second = child(), child()

    assert first["names"] == second["names"] and "local" in first["names"]
    assert first["metadata"] is True  # the scan, stored
    assert second["metadata"] is False
