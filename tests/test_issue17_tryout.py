"""Defects found by trying the snapshot index and the metric pump as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _without_root_powers() -> list[str]:
    """A command prefix under which file permissions apply: root without the capabilities
    that let it read any file (setpriv), anyone else as they are."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root needs setpriv to be refused a file")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_a_source_file_that_cannot_be_read_is_left_out_with_a_warning(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.py").write_text("print('train')\n")
    secret = source / "secret.env"
    secret.write_text("TOKEN=1\n")
    secret.chmod(0)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from expkit import snapshot\n"
        "from expkit.blobs import BlobStore\n"
        "ws = Path(sys.argv[2])\n"
        "snap = snapshot.take(Path(sys.argv[1]), ws / 'snap', BlobStore(ws / 'blobs'),"
        " ws / 'index')\n"
        "print(sorted(snap.files))\n"
        "print('\\n'.join(snap.warnings))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'framework'}:{ROOT / 'plugins'}"}
    result = subprocess.run(
        [*_without_root_powers(), sys.executable, "-c", code, str(source), str(tmp_path / "ws")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    listed, warning = result.stdout.splitlines()[:2]
    assert listed == "['train.py']"
    assert "secret.env cannot be read (Permission denied): not in the snapshot" in warning
    assert os.stat(secret).st_mode & 0o777 == 0  # the user's file as it was
