"""Nothing outside the run is touched, and nothing served differs from what was recorded.

Links: a script that points ./outputs, ./logs or a file in outputs at something outside the
run never gets that thing moved, hard-linked, chmod-ed or served; a link inside outputs is
sealed as the content it names. The store: private (0700), blobs no more readable than their
source, every served file checked against its sha256, and downloads that never overwrite,
write through a link, or turn a folder into a file.

Each test drives the real command (`python -m expkit ...`) or the Python API on a small
script that makes the link, and looks at the files on disk afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from conftest import error_line
from expkit.api import Model, Run
from expkit.blobs import BlobStore
from expkit.cli import main as cli_main
from expkit.errors import UserError
from expkit.registry import ModelStore
from test_exports import SCRIPT as EXPORT_SCRIPT
from test_exports import CopyPlugin


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def ok(result) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A user's folder outside any run: two files, one of them private (0600)."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's notes")
    (folder / "notes.txt").chmod(0o644)
    (folder / "secret.key").write_text("s3cr3t")
    (folder / "secret.key").chmod(0o600)
    return folder


def snapshot_of(folder: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """name -> (mode, inode, link count, content) of each file in `folder`."""
    found = {}
    for path in sorted(folder.rglob("*")):
        info = os.lstat(path)
        content = path.read_bytes() if stat.S_ISREG(info.st_mode) else b""
        found[path.relative_to(folder).as_posix()] = (
            stat.S_IMODE(info.st_mode),
            info.st_ino,
            info.st_nlink,
            content,
        )
    return found


def run_script(expkit_cli, write_job, script: str, **spec) -> str:
    """`expkit run` a job with `script`; returns what it printed (stdout and stderr)."""
    result = expkit_cli("run", str(write_job(spec, script=script)))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


# -- 1. links: the run never reaches outside itself ----------------------------------------------
def test_outputs_linked_to_a_folder_elsewhere_leaves_that_folder_as_it_was(
    expkit_cli, write_job, expkit_workspace, outside
):
    before = snapshot_of(outside)
    out = run_script(expkit_cli, write_job, f"import os\nos.symlink({str(outside)!r}, 'outputs')\n")

    assert snapshot_of(outside) == before  # same files, modes, inodes, link counts, content
    assert "outputs/ is a link to" in out and "not followed" in out
    files = ok(expkit_cli("runs", "files", "test_1")).splitlines()
    assert not [f for f in files if f.startswith("outputs/")]
    assert f"outputs -> {outside}  (a link out of the run: recorded, not stored)" in files
    shown = json.loads(ok(expkit_cli("runs", "show", "test_1", "--json")))
    assert shown["outputs"] == {} and shown["output_links"] == {".": str(outside)}
    sealed = expkit_workspace.run_dir("test_1") / "outputs"
    assert sealed.is_dir() and not sealed.is_symlink() and not any(sealed.iterdir())
    blobs = [p.read_bytes() for p in expkit_workspace.blobs_dir.rglob("*") if p.is_file()]
    assert b"s3cr3t" not in blobs and b"the user's notes" not in blobs


def test_logs_linked_to_a_folder_elsewhere_is_not_moved_out_of_it(
    expkit_cli, write_job, expkit_workspace, outside
):
    before = snapshot_of(outside)
    out = run_script(expkit_cli, write_job, f"import os\nos.symlink({str(outside)!r}, 'logs')\n")

    assert snapshot_of(outside) == before
    assert "logs/ is a link to" in out and "not collected" in out
    logs = expkit_workspace.run_dir("test_1") / "logs"
    assert not [p for p in logs.rglob("*") if p.name in ("notes.txt", "secret.key")]


def test_a_hard_link_in_outputs_to_a_file_elsewhere_is_copied_never_chmodded(
    expkit_cli, write_job, expkit_workspace, outside, tmp_path
):
    shared = outside / "notes.txt"
    script = f"import os\nos.makedirs('outputs')\nos.link({str(shared)!r}, 'outputs/notes.txt')\n"
    run_script(expkit_cli, write_job, script)

    assert mode(shared) == 0o644  # not made read-only
    assert os.stat(shared).st_nlink == 1  # the run holds its own copy, not another name
    sealed = expkit_workspace.run_dir("test_1") / "outputs" / "notes.txt"
    assert os.stat(sealed).st_ino != os.stat(shared).st_ino
    # A later edit of the user's file does not change what the run recorded.
    shared.write_text("edited later")
    dest = tmp_path / "got.txt"
    ok(expkit_cli("runs", "download", "test_1", "outputs/notes.txt", str(dest)))
    assert dest.read_text() == "the user's notes"


def test_a_link_out_of_outputs_is_recorded_and_never_listed_or_served(
    expkit_cli, write_job, expkit_workspace, outside, tmp_path
):
    secret = outside / "secret.key"
    before = snapshot_of(outside)
    script = f"""
        import os
        os.makedirs("outputs")
        open("outputs/model.pt", "wb").write(b"weights")
        os.symlink({str(secret)!r}, "outputs/passwd")
        os.symlink("/nonexistent/target", "outputs/dangling")
        os.symlink(".", "outputs/loop")
        os.symlink({str(outside)!r}, "outputs/elsewhere")
    """
    out = run_script(expkit_cli, write_job, script)

    assert snapshot_of(outside) == before
    assert f"passwd -> {secret}" in out and "recorded as links, not followed" in out
    files = ok(expkit_cli("runs", "files", "test_1")).splitlines()
    listed = [f for f in files if " -> " not in f]
    assert listed == ["outputs/model.pt"]
    assert f"outputs/passwd -> {secret}  (a link out of the run: recorded, not stored)" in files
    record = expkit_workspace.history
    assert list(record.outputs.of("test_1")) == ["model.pt"]
    assert record.outputs.links("test_1") == {
        "dangling": "/nonexistent/target",
        "elsewhere": str(outside),
        "loop": ".",
        "passwd": str(secret),
    }
    sealed = expkit_workspace.run_dir("test_1") / "outputs"
    assert sorted(p.name for p in sealed.iterdir()) == ["model.pt"]  # no link left to follow

    dest = tmp_path / "stolen"
    refused = expkit_cli("runs", "download", "test_1", "outputs/passwd", str(dest))
    assert refused.returncode == 2
    assert "is a link to" in error_line(refused) and "never served" in refused.stderr
    assert not dest.exists()
    refused = expkit_cli("runs", "download", "test_1", "outputs/elsewhere/notes.txt", str(dest))
    assert refused.returncode == 2 and not dest.exists()
    with pytest.raises(UserError, match="never served"):
        Run(expkit_workspace, "test_1").download_file("outputs/passwd", dest)


def test_a_link_inside_outputs_is_sealed_as_its_content_and_registers(
    expkit_cli, write_job, expkit_workspace, tmp_path
):
    script = """
        import os
        os.makedirs("outputs/checkpoints")
        for epoch in (1, 2, 3):
            with open(f"outputs/checkpoints/epoch_{epoch}.pt", "wb") as f:
                f.write(b"weights of epoch %d" % epoch)
        os.symlink("checkpoints/epoch_3.pt", "outputs/best.pt")
        os.symlink(os.path.abspath("outputs/checkpoints/epoch_2.pt"), "outputs/second.pt")
        os.symlink("checkpoints", "outputs/latest")
    """
    run_script(expkit_cli, write_job, script, model={"name": "net", "path": "outputs/best.pt"})

    outputs = expkit_workspace.history.outputs.of("test_1")
    epoch = {n: sha256(b"weights of epoch %d" % n) for n in (1, 2, 3)}
    assert {p: d for p, (_, d) in outputs.items()} == {
        "best.pt": epoch[3],
        "checkpoints/epoch_1.pt": epoch[1],
        "checkpoints/epoch_2.pt": epoch[2],
        "checkpoints/epoch_3.pt": epoch[3],
        "latest/epoch_1.pt": epoch[1],
        "latest/epoch_2.pt": epoch[2],
        "latest/epoch_3.pt": epoch[3],
        "second.pt": epoch[2],
    }
    assert expkit_workspace.history.outputs.links("test_1") == {}
    sealed = expkit_workspace.run_dir("test_1") / "outputs"
    assert not [p for p in sealed.rglob("*") if p.is_symlink()]
    # Stored once: the link's name is another name of the same blob.
    assert os.stat(sealed / "best.pt").st_ino == os.stat(sealed / "checkpoints/epoch_3.pt").st_ino
    model = Model(expkit_workspace, "net", 1)
    assert model.files == {"best.pt": epoch[3]}
    assert (model.path / "best.pt").read_bytes() == b"weights of epoch 3"
    files = ok(expkit_cli("runs", "files", "test_1")).splitlines()
    assert "outputs/best.pt" in files and "outputs/latest/epoch_3.pt" in files
    dest = tmp_path / "dl" / "best.pt"
    ok(expkit_cli("runs", "download", "test_1", "outputs/best.pt", str(dest)))
    assert dest.read_bytes() == b"weights of epoch 3"


def test_a_model_path_naming_a_link_out_says_so(expkit_cli, write_job, outside):
    target = str(outside / "notes.txt")
    script = f"import os\nos.makedirs('outputs')\nos.symlink({target!r}, 'outputs/m.pt')\n"
    result = expkit_cli(
        "run", str(write_job({"model": {"name": "m", "path": "outputs/m.pt"}}, script=script))
    )

    assert result.returncode == 1
    assert "is a link to" in result.stdout + result.stderr
    assert (outside / "notes.txt").read_text() == "the user's notes"
    assert mode(outside / "notes.txt") == 0o644


def test_links_in_the_source_folder_are_named_not_dropped_silently(
    expkit_cli, write_job, expkit_workspace, outside
):
    job = write_job({}, script="import os\nprint(sorted(os.listdir('.')))\n")
    source = job.parent / "src"
    (source / "conf").mkdir()
    (source / "conf" / "base.yaml").write_text("lr: 0.1\n")
    (source / "config.yaml").symlink_to("conf/base.yaml")  # inside: its content is taken
    (source / "dataset").symlink_to(outside)  # a folder elsewhere
    (source / "key").symlink_to(outside / "secret.key")  # a file elsewhere
    (source / "conf_link").symlink_to("conf")  # a folder inside

    result = expkit_cli("run", str(job))

    out = ok(result) + result.stderr
    assert "dataset/ is a link to the folder" in out and "`data:` input" in out
    assert "data: {dataset: {source: " in out
    assert "key is a link to" in out and "outside the source folder" in out
    assert "conf_link/ is a link to conf" in out
    snapshot = expkit_workspace.run_dir("test_1") / "snapshot"
    assert (snapshot / "config.yaml").read_text() == "lr: 0.1\n"
    assert not (snapshot / "key").exists() and not (snapshot / "dataset").exists()
    blobs = [p.read_bytes() for p in expkit_workspace.blobs_dir.rglob("*") if p.is_file()]
    assert b"s3cr3t" not in blobs


def test_mlflow_artifacts_are_the_manifest(run_job, outside, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    script = f"""
        import os
        os.makedirs("outputs/ckpt")
        open("outputs/ckpt/epoch_3.pt", "wb").write(b"three")
        os.symlink("ckpt/epoch_3.pt", "outputs/best.pt")
        os.symlink({str(outside / "secret.key")!r}, "outputs/passwd")
        os.symlink({str(outside)!r}, "outputs/user_folder")
    """
    result = run_job(
        {
            "metrics": ["mlflow"],
            "model": {"name": "net", "path": "outputs/best.pt", "registries": ["mlflow"]},
        },
        script=script,
    )

    assert result.state == "completed", result.output
    client = MlflowClient(tracking_uri=f"sqlite:///{result.workspace.path / 'mlflow.db'}")
    mlflow_run_id = result.run.get_tags()["mlflow.run_id"]

    def walk(path: str) -> list[str]:
        found = []
        for item in client.list_artifacts(mlflow_run_id, path):
            found += walk(item.path) if item.is_dir else [item.path]
        return found

    manifest = [f"outputs/{p}" for p in result.workspace.history.outputs.of(result.record.id)]
    assert sorted(walk("outputs")) == manifest == ["outputs/best.pt", "outputs/ckpt/epoch_3.pt"]
    assert result.run.get_links() == {
        "outputs/passwd": str(outside / "secret.key"),
        "outputs/user_folder": str(outside),
    }
    assert mode(outside / "secret.key") == 0o600


# -- 2. a private and verified store ---------------------------------------------------------------
def test_the_workspace_is_private_and_blobs_never_more_readable_than_their_source(
    expkit_cli, write_job, tmp_path
):
    where = tmp_path / "fresh"
    ok(expkit_cli("init", str(where)))
    workspace = where / ".expkit"
    assert mode(workspace) == 0o700

    script = """
        import os, stat
        os.makedirs("outputs")
        fd = os.open("outputs/private.bin", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"private weights")
        os.close(fd)
        open("outputs/public.bin", "w").write("public")
        os.chmod("outputs/public.bin", 0o644)
        print("working copy mode", oct(stat.S_IMODE(os.stat("secret.txt").st_mode)))
    """
    job = write_job({}, script=script, files={"secret.txt": "token"})
    (job.parent / "src" / "secret.txt").chmod(0o600)
    result = expkit_cli("--workspace", str(workspace), "run", str(job))

    assert "working copy mode 0o600" in ok(result)
    run_dir = workspace / "runs" / "test_1"
    blobs = BlobStore(workspace / "blobs")
    for path in (run_dir / "snapshot" / "secret.txt", run_dir / "outputs" / "private.bin"):
        assert mode(path) == 0o400, path
        assert mode(blobs.path(sha256(path.read_bytes()))) == 0o400
    assert mode(run_dir / "outputs" / "public.bin") == 0o444
    dest = tmp_path / "private-copy.bin"
    ok(
        expkit_cli(
            "--workspace",
            str(workspace),
            "runs",
            "download",
            "test_1",
            "outputs/private.bin",
            str(dest),
        )
    )
    assert mode(dest) == 0o600


@pytest.fixture
def trained(expkit_cli, write_job, expkit_workspace):
    """Run test_1: outputs model.pt and sub/notes.txt, registered as model net:1."""
    script = """
        import os
        os.makedirs("outputs/sub")
        open("outputs/model.pt", "wb").write(b"good weights")
        open("outputs/sub/notes.txt", "w").write("notes")
    """
    run_script(expkit_cli, write_job, script, model={"name": "net", "path": "outputs/"})
    return expkit_workspace


def corrupt_in_place(path: Path, data: bytes = b"evil weights") -> None:
    """Change a stored file's content where it is (every hard link to it sees the change)."""
    path.chmod(0o644)
    path.write_bytes(data)


def replace_name(path: Path, data: bytes = b"evil weights") -> None:
    """Put different content under a stored file's name (its other names keep the original)."""
    path.unlink()
    path.write_bytes(data)


def test_a_damaged_stored_file_is_never_served(
    trained, expkit_cli, register_plugin, tmp_path, capsys
):
    sealed = trained.run_dir("test_1") / "outputs" / "model.pt"
    corrupt_in_place(sealed)  # the blob, the run's outputs and the model version: one inode
    good, bad = sha256(b"good weights"), sha256(b"evil weights")

    dest = tmp_path / "got.pt"
    result = expkit_cli("runs", "download", "test_1", "outputs/model.pt", str(dest))
    assert result.returncode == 1
    line = error_line(result)
    assert "outputs/model.pt" in line and good in line and bad in line
    assert not dest.exists() and not list(tmp_path.glob(".got.pt*"))

    result = expkit_cli("models", "download", "net:1", str(tmp_path / "model"))
    assert result.returncode == 1
    line = error_line(result)
    assert "model.pt" in line and good in line and bad in line
    assert not (tmp_path / "model" / "model.pt").exists()

    plugin = CopyPlugin()  # an exporter that reads the model file
    register_plugin(plugin, "copy-plugin")
    load, shape = "model.load.file=model.pt", "model.input.shape=[1]"
    code = cli_main(["export", "net:1", "--format", "copy", "--set", load, "--set", shape])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("expkit: error: model net:1 model.pt") and good in err and bad in err
    assert plugin.exporter.requests == []  # it never ran on the damaged file


def test_a_download_is_rebuilt_from_a_surviving_copy(trained, expkit_cli, tmp_path):
    run_dir = trained.run_dir("test_1")
    replace_name(run_dir / "outputs" / "model.pt")  # the blob still holds the recorded content

    dest = tmp_path / "got.pt"
    result = expkit_cli("runs", "download", "test_1", "outputs/model.pt", str(dest))
    assert result.returncode == 0, result.stderr
    assert dest.read_bytes() == b"good weights"
    assert "does not match its record" in result.stderr and "intact copy" in result.stderr

    replace_name(trained.models_dir / "net" / "1" / "model.pt")
    result = expkit_cli("models", "download", "net:1", str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "model" / "model.pt").read_bytes() == b"good weights"


def test_a_model_download_uses_any_intact_copy(expkit_workspace, tmp_path, expkit_cli):
    source = tmp_path / "weights"
    source.mkdir()
    (source / "model.pt").write_bytes(b"good weights")
    store = ModelStore(expkit_workspace)
    store.register_path("a", source)
    store.register_path("b", source)  # the same content: the same blob, two names
    replace_name(expkit_workspace.models_dir / "a" / "1" / "model.pt")

    dest = tmp_path / "dl"
    result = expkit_cli("models", "download", "a:1", str(dest))
    assert result.returncode == 0, result.stderr
    assert (dest / "model.pt").read_bytes() == b"good weights"

    # Now the blob (and model b, its other name) is damaged too, and a's own copy was: none left.
    corrupt_in_place(BlobStore(expkit_workspace.blobs_dir).path(sha256(b"good weights")))
    result = expkit_cli("models", "download", "a:1", str(tmp_path / "dl2"))
    assert result.returncode == 1
    assert sha256(b"good weights") in error_line(result)


def test_an_export_reads_only_intact_model_files(run_job, register_plugin, capsys):
    plugin = CopyPlugin()
    register_plugin(plugin, "copy-plugin")
    model = {"name": "net", "load": "model.pt", "input": {"shape": [2]}}
    result = run_job({"model": model}, script=EXPORT_SCRIPT)
    version_file = result.workspace.models_dir / "net" / "1" / "model.pt"
    replace_name(version_file)  # the blob and the run's outputs keep the recorded content

    assert cli_main(["export", "net:1", "--format", "copy"]) == 0
    captured = capsys.readouterr()
    assert "does not match" not in captured.out
    assert "replaced by the intact copy" in captured.err
    assert version_file.read_bytes() == b"weights" * 100  # the version's file is whole again
    assert (version_file.parent / "model.copy").read_bytes() == b"weights" * 100


# -- downloads at the destination ----------------------------------------------------------------
def test_a_folder_destination_keeps_each_files_name(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = Run(trained, "test_1")
    outputs = [name for name in run.get_file_names() if name.startswith("outputs/")]

    written = [run.download_file(name, output_file_path="./model/") for name in outputs]

    assert written == [Path("model/model.pt"), Path("model/notes.txt")]
    assert (tmp_path / "model" / "model.pt").read_bytes() == b"good weights"
    assert (tmp_path / "model" / "notes.txt").read_text() == "notes"


def test_no_download_overwrites_a_file_without_force(trained, expkit_cli, tmp_path):
    dest = tmp_path / "mine.pt"
    dest.write_text("my own file")
    refused = expkit_cli("runs", "download", "test_1", "outputs/model.pt", str(dest))
    assert refused.returncode == 2
    assert "--force" in error_line(refused)
    assert dest.read_text() == "my own file"
    ok(expkit_cli("runs", "download", "test_1", "outputs/model.pt", str(dest), "--force"))
    assert dest.read_bytes() == b"good weights"

    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "notes.txt").write_text("my notes")
    refused = expkit_cli("models", "download", "net:1", str(folder))
    assert refused.returncode == 2 and "--force" in error_line(refused)
    assert not (folder / "model.pt").exists()  # nothing written unless everything can be
    assert (folder / "sub" / "notes.txt").read_text() == "my notes"
    ok(expkit_cli("models", "download", "net:1", str(folder), "--force"))
    assert (folder / "sub" / "notes.txt").read_text() == "notes"

    run = Run(trained, "test_1")
    with pytest.raises(UserError, match="exists"):
        run.download_file("outputs/model.pt", dest)
    assert run.download_file("outputs/model.pt", dest, overwrite=True) == dest
    with pytest.raises(UserError, match="exists"):
        Model(trained, "net", 1).download(folder)
    assert len(Model(trained, "net", 1).download(folder, overwrite=True)) == 2


def test_no_download_writes_through_a_link(trained, expkit_cli, outside, tmp_path):
    victim = outside / "notes.txt"
    before = snapshot_of(outside)
    dest = tmp_path / "model.pt"
    dest.symlink_to(victim)

    refused = expkit_cli("runs", "download", "test_1", "outputs/model.pt", str(dest))
    assert refused.returncode == 2 and "--force" in error_line(refused)
    ok(expkit_cli("runs", "download", "test_1", "outputs/model.pt", str(dest), "--force"))
    assert not dest.is_symlink() and dest.read_bytes() == b"good weights"  # the link went

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "sub").symlink_to(outside)
    for extra in ([], ["--force"]):
        refused = expkit_cli("models", "download", "net:1", str(folder), *extra)
        assert refused.returncode == 2 and "link" in error_line(refused)
    assert snapshot_of(outside) == before


def test_a_download_never_turns_a_folder_into_a_file(trained, expkit_cli, tmp_path):
    folder = tmp_path / "target"
    (folder / "model.pt").mkdir(parents=True)  # DEST is a folder: the file would go in it
    (folder / "model.pt" / "keep.txt").write_text("keep")

    for extra in ([], ["--force"]):
        refused = expkit_cli("runs", "download", "test_1", "outputs/model.pt", str(folder), *extra)
        assert refused.returncode == 2 and "folder" in error_line(refused)
    assert (folder / "model.pt" / "keep.txt").read_text() == "keep"

    made = tmp_path / "new" / "folder"
    ok(expkit_cli("runs", "download", "test_1", "outputs/sub/notes.txt", f"{made}/"))
    assert (made / "notes.txt").read_text() == "notes"


# -- 2. model names from Python -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../x", "a/b", "", ".hidden", "x" * 101, "/abs"])
def test_register_model_applies_the_job_specs_name_rules(trained, name, tmp_path):
    run = Run(trained, "test_1")

    with pytest.raises(UserError, match="model_name"):
        run.register_model(model_name=name, model_path="outputs/")

    assert [r["name"] for r in trained.history.models.versions()] == ["net"]
    assert not (trained.path.parent / "x").exists() and not (tmp_path / "x").exists()
    assert sorted(p.name for p in trained.models_dir.iterdir()) == ["net"]


def test_outputs_linked_to_a_folder_inside_the_working_copy_is_sealed(
    expkit_cli, write_job, expkit_workspace
):
    script = """
        import os
        os.makedirs("results")
        open("results/model.pt", "wb").write(b"weights")
        os.symlink("../train.py", "results/code.py")  # in the run, but not in outputs
        os.symlink("results", "outputs")
    """
    run_script(expkit_cli, write_job, script, model={"name": "m", "path": "outputs/model.pt"})

    history = expkit_workspace.history
    assert list(history.outputs.of("test_1")) == ["model.pt"]
    assert history.outputs.links("test_1") == {"code.py": "../train.py"}
    assert (Model(expkit_workspace, "m", 1).path / "model.pt").read_bytes() == b"weights"


# -- the run's own folders, replaced by the script -----------------------------------------------
def test_a_script_that_turns_its_working_folder_into_a_link_moves_nothing(
    expkit_cli, write_job, expkit_workspace, tmp_path
):
    victim = tmp_path / "victim"
    (victim / "outputs").mkdir(parents=True)
    (victim / "outputs" / "precious.txt").write_text("precious")
    (victim / "logs").mkdir()
    (victim / "logs" / "mine.log").write_text("the user's log")
    before = snapshot_of(victim)
    script = f"""
        import os
        here = os.getcwd()
        os.makedirs("outputs")
        open("outputs/mine.txt", "w").write("mine")
        os.rename(here, here + ".moved")
        os.symlink({str(victim)!r}, here)
    """
    out = run_script(expkit_cli, write_job, script)

    assert snapshot_of(victim) == before
    assert "work/ was replaced by a link" in out
    run_dir = expkit_workspace.run_dir("test_1")
    assert not (run_dir / "work").is_symlink()
    assert expkit_workspace.history.outputs.of("test_1") == {}
    assert not list((run_dir / "logs").rglob("mine.log"))


def test_a_script_that_swaps_the_runs_logs_for_a_link_writes_nothing_there(
    expkit_cli, write_job, expkit_workspace, tmp_path
):
    victim = tmp_path / "victim2"
    victim.mkdir()
    (victim / "rank-0.log").write_text("the user's rank log\n")
    before = snapshot_of(victim)
    script = f"""
        import os
        print("before swap", flush=True)
        os.rename("../logs", "../logs.old")
        os.symlink({str(victim)!r}, "../logs")
        os.makedirs("logs")
        open("logs/extra.log", "w").write("extra")
        print("after swap", flush=True)
    """
    out = run_script(expkit_cli, write_job, script)

    assert snapshot_of(victim) == before
    assert "logs/ was replaced by a link" in out
    assert not (expkit_workspace.run_dir("test_1") / "logs").is_symlink()
    shown = expkit_cli("runs", "logs", "test_1")
    assert "the user's rank log" not in shown.stdout


# -- downloads: special destinations, long names, damaged copies, failing destinations ----------
def test_force_never_replaces_a_fifo_or_a_socket(trained, expkit_cli, tmp_path):
    import socket

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    sock = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    try:
        for dest in (fifo, sock):
            refused = expkit_cli(
                "runs", "download", "test_1", "outputs/model.pt", str(dest), "--force"
            )
            assert refused.returncode == 2, refused.stderr
            assert str(dest) in error_line(refused)
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_ISSOCK(os.lstat(sock).st_mode)
    finally:
        server.close()
    assert not list(tmp_path.glob(".*download*"))


def test_long_file_names_seal_and_download(expkit_cli, write_job, expkit_workspace, tmp_path):
    name = "m" * 250 + ".pt"  # 253 bytes: legal, but no room for a longer temporary name
    other = "n" * 251 + ".pt"
    script = f"""
        import os
        os.makedirs("outputs")
        open("outputs/{name}", "wb").write(b"weights")
        os.link("outputs/{name}", "outputs/{other}")  # two names: sealed by linking
    """
    run_script(expkit_cli, write_job, script, model={"name": "long", "path": "outputs/"})

    assert set(expkit_workspace.history.outputs.of("test_1")) == {name, other}
    ok(expkit_cli("runs", "download", "test_1", f"outputs/{name}", f"{tmp_path}/got/"))
    assert (tmp_path / "got" / name).read_bytes() == b"weights"
    ok(expkit_cli("models", "download", "long:1", str(tmp_path / "model")))
    assert (tmp_path / "model" / other).read_bytes() == b"weights"


def test_a_stored_copy_replaced_by_a_fifo_is_skipped_not_waited_on(trained, expkit_cli, tmp_path):
    sealed = trained.run_dir("test_1") / "outputs" / "model.pt"
    sealed.unlink()
    os.mkfifo(sealed)  # nobody ever writes to it: opening it for reading would block

    dest = tmp_path / "got.pt"
    result = expkit_cli("runs", "download", "test_1", "outputs/model.pt", str(dest), timeout=60)
    assert result.returncode == 0, result.stderr
    assert dest.read_bytes() == b"good weights"
    version = trained.models_dir / "net" / "1" / "model.pt"
    version.unlink()
    os.mkfifo(version)
    result = expkit_cli("models", "download", "net:1", str(tmp_path / "model"), timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "model" / "model.pt").read_bytes() == b"good weights"
    assert not list(tmp_path.rglob("*.download"))


def test_a_dangling_link_as_model_folder_is_one_line(trained, expkit_cli, tmp_path):
    dest = tmp_path / "dangling"
    dest.symlink_to(tmp_path / "nowhere")

    refused = expkit_cli("models", "download", "net:1", str(dest))
    assert refused.returncode == 2 and str(dest) in error_line(refused)
    with pytest.raises(UserError, match="does not exist"):
        Model(trained, "net", 1).download(dest)
    assert dest.is_symlink() and not (tmp_path / "nowhere").exists()
    too_long = tmp_path / ("x" * 300)
    refused = expkit_cli("runs", "download", "test_1", "outputs/model.pt", str(too_long))
    assert refused.returncode == 2 and "File name too long" in error_line(refused)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only) and the same, mounted read-only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    import subprocess

    full, ro = tmp_path / "small", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], check=True)
    yield full, ro
    subprocess.run(["umount", str(full)])
    subprocess.run(["umount", str(ro)])


def test_a_full_or_read_only_destination_is_one_line_and_leaves_nothing(
    expkit_cli, write_job, expkit_workspace, small_disk
):
    full, ro = small_disk
    script = """
        import os
        os.makedirs("outputs")
        open("outputs/big.bin", "wb").write(os.urandom(3 * 1024 * 1024))
    """
    run_script(expkit_cli, write_job, script, model={"name": "big", "path": "outputs/"})

    result = expkit_cli("runs", "download", "test_1", "outputs/big.bin", f"{full}/")
    assert result.returncode == 1 and str(full) in error_line(result)
    assert "No space left" in error_line(result)
    result = expkit_cli("models", "download", "big:1", str(full / "model"))
    assert result.returncode == 1 and "No space left" in error_line(result)
    assert not [p for p in full.rglob("*") if p.is_file()]
    for args in (("runs", "download", "test_1", "outputs/big.bin", f"{ro}/x/"),
                 ("models", "download", "big:1", str(ro / "model"))):  # fmt: skip
        result = expkit_cli(*args)
        assert result.returncode == 2 and str(ro) in error_line(result)


def test_a_full_disk_never_leaves_a_partial_copy_in_the_store(small_disk, tmp_path):
    full, _ = small_disk
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    store = BlobStore(full / "blobs")

    with pytest.raises(OSError, match="No space left"):
        store.add_copy(big, sha256(big.read_bytes()))
    assert not [p for p in full.rglob("*") if p.is_file()]  # the disk is as free as before


def test_the_next_open_removes_copies_into_the_store_whose_process_died(
    expkit_workspace, expkit_cli
):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    digest = "80" + "0" * 62
    folder = expkit_workspace.blobs_dir / "80"
    folder.mkdir(parents=True, exist_ok=True)
    stale = folder / f".{digest}.{dead.stdout.strip()}.tmp"
    stale.write_bytes(b"x" * 1024)
    os.utime(stale, (0, 0))  # written long ago
    mine = folder / f".{digest}.{os.getpid()}.tmp"  # a copy in progress: kept
    mine.write_bytes(b"y")

    ok(expkit_cli("runs", "list"))
    assert not stale.exists() and mine.exists()


def test_sigterm_during_a_download_leaves_no_temporary_file(expkit_cli, write_job, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    script = """
        import os
        os.makedirs("outputs")
        with open("outputs/big.bin", "wb") as f:
            for _ in range(64):
                f.write(os.urandom(8 * 1024 * 1024))
    """
    run_script(expkit_cli, write_job, script)
    dest = tmp_path / "dest"
    dest.mkdir()
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen(
            [sys.executable, "-m", "expkit", "runs", "download", "test_1", "outputs/big.bin",
             f"{dest}/", "--force"],
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not list(dest.glob(".*.download")) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert not list(dest.glob(".*download*")), sig


# -- names that are not UTF-8, ./outputs as a file ------------------------------------------------
def test_an_output_whose_name_is_not_utf8_is_named_and_kept(
    expkit_cli, write_job, expkit_workspace
):
    script = """
        import os
        os.makedirs("outputs")
        open(b"outputs/bad\\xff\\xfename.txt", "wb").write(b"kept")
        open("outputs/good.txt", "w").write("good")
    """
    out = run_script(expkit_cli, write_job, script)

    assert list(expkit_workspace.history.outputs.of("test_1")) == ["good.txt"]
    assert "bad\\xff\\xfename.txt" in out and "not UTF-8" in out
    sealed = expkit_workspace.run_dir("test_1") / "outputs"
    assert (os.fsencode(sealed) + b"/bad\xff\xfename.txt") in [
        os.fsencode(p) for p in sealed.iterdir()
    ]
    assert not (expkit_workspace.run_dir("test_1") / "work").exists()


def test_a_source_file_whose_name_is_not_utf8_is_named_not_an_internal_error(expkit_cli, write_job):
    job = write_job({}, script="print('ok')\n")
    source = job.parent / "src"
    with open(os.fsencode(source) + b"/bad\xff.txt", "wb") as f:
        f.write(b"x")

    result = expkit_cli("run", str(job))
    out = result.stdout + result.stderr
    assert "internal error" not in out
    assert "bad\\xff.txt" in out


def test_outputs_written_as_a_file_is_sealed_not_lost(expkit_cli, write_job, expkit_workspace):
    out = run_script(expkit_cli, write_job, "open('outputs', 'w').write('the result')\n")

    assert "./outputs was a file" in out
    assert list(expkit_workspace.history.outputs.of("test_1")) == ["outputs"]
    sealed = expkit_workspace.run_dir("test_1") / "outputs" / "outputs"
    assert sealed.read_text() == "the result"


def test_runs_files_shows_each_name_on_one_line_and_links_unambiguously(
    expkit_cli, write_job, tmp_path
):
    fifo_job = write_job({}, script="""
        import os
        os.makedirs("outputs")
        open("outputs/two\\nlines.txt", "w").write("x")
        open("outputs/a -> b", "w").write("x")
        os.symlink("/etc/passwd", "outputs/c")
    """)  # fmt: skip
    os.mkfifo(fifo_job.parent / "src" / "pipe")
    result = expkit_cli("run", str(fifo_job))
    assert result.returncode == 0, result.stderr
    assert "pipe is not a regular file" in result.stdout + result.stderr

    lines = ok(expkit_cli("runs", "files", "test_1")).splitlines()
    assert "outputs/two\\nlines.txt" in lines
    assert "'outputs/a -> b'" in lines
    links = [line for line in lines if " -> " in line and not line.startswith("'")]
    assert links == ["outputs/c -> /etc/passwd  (a link out of the run: recorded, not stored)"]


def test_a_failed_runs_reason_never_quotes_a_file_reached_through_a_link(
    expkit_cli, write_job, expkit_workspace, tmp_path
):
    victim = tmp_path / "victim3"
    victim.mkdir()
    (victim / "rank-0.log").write_text("the user's secret line\n")
    script = f"""
        import os, sys
        os.rename("../logs", "../logs.old")
        os.symlink({str(victim)!r}, "../logs")
        sys.exit(3)
    """
    result = expkit_cli("run", str(write_job({}, script=script)))
    assert result.returncode != 0
    record = expkit_workspace.history.runs.get("test_1")
    assert record.state == "failed" and "secret" not in (record.error or "")
    assert "secret" not in result.stdout + result.stderr
