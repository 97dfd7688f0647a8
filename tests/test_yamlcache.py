"""Job specs' YAML remembered (`expkit.yamlcache`): the same data and the same text as PyYAML
gives, whatever was remembered before, and nothing remembered that JSON cannot give back as it
was (aliases, dates).

The cache lives in the test's own folder (EXPKIT_CACHE_DIR). `expkit run` of a job read before
importing no PyYAML at all is checked in test_startup.py.
"""

from __future__ import annotations

import datetime
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from expkit import bounded_yaml, entrycache, yamlcache
from expkit.job import JobSpec, JobSpecError

JOB = "experiment: demo\nentry_script: train.py\nargs: {lr: 0.1, epochs: 3, fast: true}\n"


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(entrycache.CACHE_ENV, str(folder))
    return folder


def test_a_document_read_twice_gives_the_same_data_the_second_time_from_the_cache(cache_dir):
    first = yamlcache.load(JOB)

    assert first == bounded_yaml.load(JOB)
    assert yamlcache.recall("load", JOB) == first  # remembered
    second = yamlcache.load(JOB)
    assert second == first
    assert type(second["args"]["lr"]) is float and type(second["args"]["epochs"]) is int
    assert second["args"]["fast"] is True
    second["args"]["lr"] = 9  # a caller's edit does not reach what is remembered
    assert yamlcache.load(JOB)["args"]["lr"] == 0.1


def test_an_edited_document_gives_its_new_data(cache_dir):
    yamlcache.load(JOB)

    edited = JOB.replace("lr: 0.1", "lr: 0.2")

    assert yamlcache.load(edited)["args"]["lr"] == 0.2
    assert yamlcache.load(JOB)["args"]["lr"] == 0.1


def test_what_json_cannot_give_back_as_it_was_is_read_by_pyyaml_every_time(cache_dir):
    shared = "a: &x [1, 2]\nb: *x\n"
    dated = "day: 2024-05-01\n"

    for _ in range(2):
        data = yamlcache.load(shared)
        assert data["a"] is data["b"]  # one list, as PyYAML gives it
        assert yamlcache.load(dated) == {"day": datetime.date(2024, 5, 1)}
    assert yamlcache.recall("load", shared) is yamlcache.MISSING
    assert yamlcache.recall("load", dated) is yamlcache.MISSING


def test_the_text_written_is_pyyamls(cache_dir):
    data = JobSpec.from_dict(yaml.safe_load(JOB)).to_dict()
    expected = yaml.safe_dump(data, sort_keys=False)

    assert yamlcache.dump(data) == expected
    assert yamlcache.dump(data) == expected  # the second time from the cache
    assert any(r["value"] == expected for r in yamlcache._records(yamlcache._file() or ""))
    dated = {"day": datetime.date(2024, 5, 1)}
    assert yamlcache.dump(dated) == yaml.safe_dump(dated, sort_keys=False)


def test_a_large_document_is_not_kept(cache_dir):
    """The file stays small to read: a document over MAX_SOURCE_CHARS is read by PyYAML."""
    large = JOB + "".join(f"# comment line {i}\n" for i in range(1000))
    assert len(large) > yamlcache.MAX_SOURCE_CHARS

    assert yamlcache.load(large) == bounded_yaml.load(JOB)
    assert yamlcache.recall("load", large) is yamlcache.MISSING


def test_a_corrupt_cache_file_costs_the_import_only(cache_dir):
    yamlcache.load(JOB)
    file = Path(yamlcache._file() or "")
    file.write_text('{"version": 1, "records": [{"key": ')

    assert yamlcache.load(JOB) == bounded_yaml.load(JOB)
    assert yamlcache.recall("load", JOB) == bounded_yaml.load(JOB)  # stored again


def test_without_a_cache_folder_nothing_is_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(entrycache.CACHE_ENV, "relative-cache")

    assert yamlcache.load(JOB) == bounded_yaml.load(JOB)
    assert yamlcache.recall("load", JOB) is yamlcache.MISSING
    assert list(tmp_path.iterdir()) == []


def test_a_new_loader_makes_new_keys_and_a_young_one_stores_nothing(
    cache_dir, tmp_path, monkeypatch
):
    """The key holds the stat data of the code that reads YAML: an edit of the loader (as an
    upgrade of PyYAML) is never answered from the cache, and a file changed within
    RACY_SECONDS of now is not trusted yet (git's racy-git rule)."""
    loader = tmp_path / "bounded_yaml.py"
    shutil.copy(bounded_yaml.__file__, loader)
    monkeypatch.setattr(yamlcache, "BOUNDED_YAML", str(loader))
    long_ago = time.time() - 60
    os.utime(loader, (long_ago, long_ago))
    yamlcache.load(JOB)
    assert yamlcache.recall("load", JOB) == bounded_yaml.load(JOB)

    loader.write_text(loader.read_text() + "\n# edited\n")  # now: young, and another stamp

    assert yamlcache.recall("load", JOB) is yamlcache.MISSING
    assert yamlcache.load(JOB) == bounded_yaml.load(JOB)
    assert yamlcache.recall("load", JOB) is yamlcache.MISSING  # young: not stored


def test_bad_yaml_is_still_an_error_at_its_line(cache_dir, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("experiment: demo\nentry_script: [train.py\n")

    for _ in range(2):  # an error is never remembered
        with pytest.raises(JobSpecError, match="line 3"):
            JobSpec.from_yaml(job)
