"""The workspace's model registry: numbered, immutable versions stored once as hard links."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest

from conftest import read_only
from expkit import Model
from expkit.blobs import BlobStore, hash_file
from expkit.errors import UserError
from expkit.registry import ModelStore

TRAIN = """
import os, sys
from expkit import Run
run = Run.get_context()
quality = float(sys.argv[1])
run.log("acc", quality)
os.makedirs("outputs/tokenizer", exist_ok=True)
with open("outputs/model.pt", "w") as f:
    f.write(f"weights with quality {quality}")
with open("outputs/tokenizer/vocab.txt", "w") as f:
    f.write("a b c")
"""


def train(run_job, quality: str, **spec):
    result = run_job({"args": [quality], **spec}, script=TRAIN)
    assert result.state == "completed", result.output
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- versions and the command line -----------------------------------------------------------------
@pytest.fixture
def three_versions(run_job):
    """`digits` versions 1, 2 and 3 from three runs of one job."""
    spec = {
        "tags": {"team": "vision"},
        "model": {"name": "digits", "tags": {"stage": "dev"}},
    }
    return [train(run_job, q, **spec) for q in ("0.1", "0.2", "0.3")]


def test_each_run_registers_the_next_version(three_versions, expkit_cli):
    listing = expkit_cli("models", "list")

    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "RUN", "REGISTERED", "acc", "ALIASES"]
    rows = [line.split()[:3] for line in lines[1:]]
    assert rows == [["digits", str(v), r.record.id] for v, r in enumerate(three_versions, 1)]


def test_models_show_gives_lineage_and_tags(three_versions, expkit_cli):
    second = three_versions[1].record

    shown = expkit_cli("models", "show", "digits:2")

    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "version     2" in out
    assert "model.pt" in out and "tokenizer/vocab.txt" in out
    lines = [line.split(None, 1) for line in out.splitlines() if line.startswith("  ")]
    fields = {key: value for key, *rest in lines for value in rest}
    assert fields["run_id"] == second.id
    assert fields["snapshot_hash"] == second.snapshot_hash[:16]  # as every command shows it
    assert fields["environment_hash"] == second.environment_hash
    assert fields["metrics"] == "acc 0.2"
    assert fields["team"] == "vision"
    assert fields["stage"] == "dev"

    latest = expkit_cli("models", "show", "digits")
    assert "version     3" in latest.stdout


def test_models_download_copies_a_versions_files(three_versions, expkit_cli, tmp_path):
    dest = tmp_path / "downloaded"

    done = expkit_cli("models", "download", "digits:1", str(dest))

    assert done.returncode == 0, done.stderr
    assert (dest / "model.pt").read_text() == "weights with quality 0.1"
    assert (dest / "tokenizer" / "vocab.txt").read_text() == "a b c"
    # A download is the user's own copy: writable, and not the stored file.
    assert not read_only(dest / "model.pt")
    stored = three_versions[0].workspace.models_dir / "digits" / "1" / "model.pt"
    assert os.stat(dest / "model.pt").st_ino != os.stat(stored).st_ino


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("nope", "no model 'nope' in this workspace (models: digits)"),
        ("nope:1", "no model 'nope:1' in this workspace (models: digits)"),
        *(
            (
                f"digits:{version}",
                f"model 'digits' has no version {version} (its latest is digits:3; "
                "`expkit models list digits` lists them)",
            )
            for version in ("9", "0", "99999999999999999999999")
        ),
        *(
            (
                f"digits:{version}",
                f"'digits:{version}': a version is a number, e.g. digits:2 (an alias goes "
                "after @, e.g. digits@champion)",
            )
            for version in ("two", "\u0661", "-1")
        ),
    ],
    ids=[
        "unknown-model",
        "unknown-model-version",
        "unknown-version",
        "version-0",
        "version-past-sqlite",
        "bad-version",
        "arabic-indic-digit",
        "negative",
    ],
)
def test_unknown_model_or_version_is_a_clear_error(three_versions, expkit_cli, ref, message):
    for command in (("models", "show", ref), ("models", "download", ref, "somewhere")):
        done = expkit_cli(*command)

        assert done.returncode == 2
        assert done.stderr.strip() == f"expkit: error: {message}"
        assert "Traceback" not in done.stderr


def test_models_in_an_empty_workspace(expkit_cli):
    listing = expkit_cli("models", "list")
    shown = expkit_cli("models", "show", "anything")

    assert listing.returncode == 0
    assert "no models yet" in listing.stdout
    assert shown.returncode == 2
    assert "no model 'anything' in this workspace (no models registered yet)" in shown.stderr


# -- stored once, as hard links --------------------------------------------------------------------
def test_registered_file_sealed_output_and_blob_are_one_file(run_job):
    result = train(run_job, "0.5", model={"name": "m", "path": "outputs/model.pt"})
    ws = result.workspace
    registered = ws.models_dir / "m" / "1" / "model.pt"
    sealed = result.run_dir / "outputs" / "model.pt"
    blob = BlobStore(ws.blobs_dir).path(hash_file(sealed))

    inodes = {os.stat(p).st_ino for p in (registered, sealed, blob)}
    assert len(inodes) == 1
    assert os.stat(registered).st_nlink >= 3
    assert all(read_only(p) for p in (registered, sealed, blob))
    assert registered.read_text() == "weights with quality 0.5"


def test_same_content_registered_twice_is_stored_once(run_job):
    first = train(run_job, "0.5", model={"name": "m"})
    second = train(run_job, "0.5", model={"name": "m"})
    ws = first.workspace
    files = [
        ws.models_dir / "m" / "1" / "model.pt",
        ws.models_dir / "m" / "2" / "model.pt",
        first.run_dir / "outputs" / "model.pt",
        second.run_dir / "outputs" / "model.pt",
    ]

    assert len({os.stat(p).st_ino for p in files}) == 1
    # Two runs' outputs, two versions and the blob: five names, one file.
    assert os.stat(files[0]).st_nlink == 5
    blob_names = [p.name for p in ws.blobs_dir.rglob("*") if p.is_file()]
    assert blob_names.count(hash_file(files[0])) == 1


def test_a_large_output_is_registered_without_a_second_copy(run_job):
    size = 50 * 1024 * 1024
    result = run_job(
        {"model": {"name": "big", "path": "outputs/weights.bin"}},
        script=f"""
import os
os.makedirs("outputs", exist_ok=True)
with open("outputs/weights.bin", "wb") as f:
    for _ in range({size // (1024 * 1024)}):
        f.write(os.urandom(1024 * 1024))
""",
    )

    assert result.state == "completed", result.output
    ws = result.workspace
    seen: set[int] = set()
    stored = 0
    for path in ws.path.rglob("*"):
        info = path.lstat()
        if stat.S_ISREG(info.st_mode) and info.st_ino not in seen:
            seen.add(info.st_ino)
            stored += info.st_blocks * 512
    # The whole workspace (run outputs, blobs, model versions) holds the 50 MB once.
    assert size <= stored < size * 1.2
    assert os.stat(ws.models_dir / "big" / "1" / "weights.bin").st_nlink >= 3


# -- immutability ----------------------------------------------------------------------------------
def test_versions_are_read_only_and_later_runs_do_not_change_them(run_job, expkit_cli):
    first = train(run_job, "0.1", model={"name": "m"})
    ws = first.workspace
    v1 = ws.models_dir / "m" / "1"
    before = {p: sha256(p) for p in v1.rglob("*") if p.is_file()}
    recorded = ws.history.models.files("m", 1)

    train(run_job, "0.9", model={"name": "m"})
    train(run_job, "0.7", model={"name": "m"})

    assert all(read_only(p) for p in before)
    assert {p: sha256(p) for p in v1.rglob("*") if p.is_file()} == before
    assert ws.history.models.files("m", 1) == recorded
    assert (v1 / "model.pt").read_text() == "weights with quality 0.1"
    assert (ws.models_dir / "m" / "3" / "model.pt").read_text() == "weights with quality 0.7"
    assert Model(ws, "m", 1).lineage["metrics"] == {"acc": 0.1}


# -- the Python API --------------------------------------------------------------------------------
def test_register_model_after_the_run_from_its_outputs(run_job, tmp_path):
    result = train(run_job, "0.4")  # no `model:` in the job: nothing registered yet
    run, ws = result.run, result.workspace
    assert ws.history.models.versions() == []

    one_file = run.register_model("api-model", "outputs/model.pt", tags={"by": "api"})
    folder = run.register_model(model_name="api-model", model_path="outputs/")

    assert (one_file.version, folder.version) == (1, 2)
    assert set(one_file.files) == {"model.pt"}
    assert set(folder.files) == {"model.pt", "tokenizer/vocab.txt"}
    assert one_file.tags == {"by": "api"}
    assert folder.lineage["run_id"] == run.id
    assert folder.lineage["snapshot_hash"] == result.record.snapshot_hash
    assert folder.lineage["metrics"] == {"acc": 0.4}
    sealed = result.run_dir / "outputs" / "model.pt"
    assert os.stat(folder.path / "model.pt").st_ino == os.stat(sealed).st_ino

    latest = Model(ws, "api-model")
    assert latest.version == 2
    written = Model(ws, "api-model", 1).download(tmp_path / "dl")
    assert written == [tmp_path / "dl" / "model.pt"]
    assert written[0].read_text() == "weights with quality 0.4"


@pytest.mark.parametrize("path", ["snapshot/train.py", "outputs/../snapshot", "logs/"])
def test_register_model_rejects_a_path_outside_outputs(run_job, path):
    result = train(run_job, "0.4")

    with pytest.raises(UserError, match="must be inside outputs/"):
        result.run.register_model("m", path)
    assert result.workspace.history.models.versions() == []


def test_unknown_model_from_python(expkit_workspace):
    with pytest.raises(UserError, match="no model 'ghost'"):
        Model(expkit_workspace, "ghost")


# -- the store itself ------------------------------------------------------------------------------
def test_a_version_whose_folder_was_lost_is_laid_out_again(expkit_workspace, tmp_path):
    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "weights.bin").write_bytes(b"\x00\x01" * 1000)
    (source / "sub" / "config.json").write_text('{"layers": 2}')
    store = ModelStore(expkit_workspace)
    registered = store.register_path("m", source)
    folder = expkit_workspace.models_dir / "m" / "1"
    assert registered.path == folder

    # A crash after the version's row was committed but before its folder was complete.
    shutil.rmtree(folder)
    (folder.parent / ".1.tmp").mkdir()
    (folder.parent / ".1.tmp" / "half-written").write_text("junk")

    again = ModelStore(expkit_workspace).get("m", 1)

    assert again.path == folder
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "sub/config.json",
        "weights.bin",
    ]
    assert (folder / "weights.bin").read_bytes() == b"\x00\x01" * 1000
    blob = BlobStore(expkit_workspace.blobs_dir).path(again.files["weights.bin"])
    assert os.stat(folder / "weights.bin").st_ino == os.stat(blob).st_ino
    assert not (folder.parent / ".1.tmp").exists()


def test_a_version_committed_before_its_folder_existed_is_laid_out_on_get(expkit_workspace):
    blobs = BlobStore(expkit_workspace.blobs_dir)
    content = expkit_workspace.path.parent / "weights.bin"
    content.write_bytes(b"trained")
    digest = hash_file(content)
    blobs.add_copy(content, digest)
    # The registry's database insert, with the process dying before `_lay_out`.
    version = expkit_workspace.history.models.add_version(
        "m", None, {}, {}, {"weights.bin": (7, digest)}
    )

    model = ModelStore(expkit_workspace).get("m", version)

    assert (model.path / "weights.bin").read_bytes() == b"trained"
    assert read_only(model.path / "weights.bin")
