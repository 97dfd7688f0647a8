"""The sample script's checkpoints (training/checkpointing.py), without expkit: what makes a
preempted run resumable.

What a user relies on: a checkpoint is never seen half-written, whenever the writer is killed;
the newest complete one is what a restart finds; training resumed from it goes on exactly as
if it had not stopped; and the stop signal ends the script at the next batch with the last
epoch's checkpoint in place and exit code 75, after which the script resumes and says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import eventually

torch = pytest.importorskip("torch")

TRAINING = Path(__file__).resolve().parents[1] / "training"
sys.path.insert(0, str(TRAINING))
import checkpointing  # noqa: E402
import pytorch_train  # noqa: E402

sys.path.remove(str(TRAINING))


def tiny_training(seed: int):
    """A small model, optimizer with momentum, step scheduler and shuffled loader, on data
    that is the same whatever `seed` (which only sets the initial weights)."""
    data = torch.utils.data.TensorDataset(
        torch.randn(24, 6, generator=torch.Generator().manual_seed(0)),
        torch.arange(24) % 3,
    )
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.1)
    loader = torch.utils.data.DataLoader(
        data, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    return net, optimizer, scheduler, loader


def train(net, optimizer, scheduler, loader, epochs: int) -> None:
    for _ in range(epochs):
        pytorch_train.train_one_epoch(
            net, loader, torch.nn.CrossEntropyLoss(), optimizer, torch.device("cpu")
        )
        scheduler.step()


def test_training_resumed_from_a_checkpoint_goes_on_exactly_as_without_the_stop(tmp_path):
    net, optimizer, scheduler, loader = tiny_training(seed=1)
    train(net, optimizer, scheduler, loader, epochs=4)
    uninterrupted = [p.detach().clone() for p in net.parameters()]

    net, optimizer, scheduler, loader = tiny_training(seed=1)
    train(net, optimizer, scheduler, loader, epochs=2)
    best = {k: v.clone() for k, v in net.state_dict().items()}
    state = pytorch_train.checkpoint_state(net, optimizer, scheduler, 0.75, best, loader.generator)
    checkpointing.save(tmp_path, 2, state)
    torch.randn(100)  # what happens after the checkpoint does not matter

    # a new process, in effect: other initial weights and random states, then the checkpoint
    net, optimizer, scheduler, loader = tiny_training(seed=2)
    loaded = checkpointing.load_latest(tmp_path)
    epoch, best_acc, best_state = pytorch_train.resume(
        loaded, net, optimizer, scheduler, loader.generator
    )
    assert (epoch, best_acc) == (2, 0.75)
    assert all(torch.equal(best_state[k], best[k]) for k in best)
    assert scheduler.last_epoch == 2 and optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    train(net, optimizer, scheduler, loader, epochs=2)
    resumed = list(net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed, strict=True))


def test_the_best_weights_are_the_models_own_when_the_checkpoint_epoch_was_the_best(tmp_path):
    net, optimizer, scheduler, _ = tiny_training(seed=1)
    state = pytorch_train.checkpoint_state(net, optimizer, scheduler, 0.9, None, None)
    checkpointing.save(tmp_path, 1, state)
    other = tiny_training(seed=3)
    _, _, best_state = pytorch_train.resume(checkpointing.load_latest(tmp_path), *other[:3], None)
    assert all(torch.equal(best_state[k], v) for k, v in net.state_dict().items())


def test_only_the_newest_checkpoint_is_kept_and_a_failed_save_leaves_it_alone(tmp_path):
    folder = tmp_path / "checkpoints"
    assert checkpointing.latest(folder) is None and checkpointing.load_latest(folder) is None
    checkpointing.save(folder, 1, {"w": torch.ones(3)})
    checkpointing.save(folder, 2, {"w": torch.full((3,), 2.0)})
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-0002.pt"]
    assert checkpointing.latest(folder) == (2, folder / "epoch-0002.pt")

    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        checkpointing.save(folder, 3, {"w": lambda: None})
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-0002.pt"]  # no temp file left
    state = checkpointing.load_latest(folder)
    assert state["epoch"] == 2 and torch.equal(state["w"], torch.full((3,), 2.0))


# Saves checkpoints of 100 MB one after another, saying which epoch each completed.
SAVER = """
    import sys
    from pathlib import Path

    import torch

    import checkpointing

    weights = torch.zeros(25_000_000)
    for epoch in range(1, 1000):
        weights.fill_(epoch)
        checkpointing.save(Path(sys.argv[1]), epoch, {"weights": weights})
        print(epoch, flush=True)
"""


def test_a_writer_killed_while_writing_leaves_the_previous_checkpoint_whole(tmp_path):
    folder = tmp_path / "checkpoints"
    script = tmp_path / "saver.py"
    script.write_text(textwrap.dedent(SAVER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TRAINING), *sys.path])}
    saver = subprocess.Popen(
        [sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert saver.stdout.readline() == "1\n"
        eventually(
            lambda: any(p.name.endswith(".tmp") for p in folder.iterdir()),
            timeout=60,
            what="a checkpoint being written",
        )
        saver.send_signal(signal.SIGKILL)  # in the middle of writing epoch 2 or later
        saver.wait(timeout=30)
    finally:
        saver.kill()
    said = [1] + [int(line) for line in saver.stdout.read().split()]
    # (a writer this fast can finish a checkpoint between the look and the kill: then there
    # is no temporary file, and the newest checkpoint is the one it had not yet announced)
    epoch, _ = checkpointing.latest(folder)
    assert epoch in (said[-1], said[-1] + 1)  # the newest that was complete
    state = checkpointing.load_latest(folder)
    assert state["epoch"] == epoch and bool((state["weights"] == epoch).all())

    checkpointing.save(folder, epoch + 1, {"weights": torch.zeros(1)})  # the next attempt's
    assert sorted(p.name for p in folder.iterdir()) == [f"epoch-{epoch + 1:04d}.pt"]


def test_the_stop_signal_is_named_by_the_environment(monkeypatch):
    monkeypatch.setenv(checkpointing.STOP_SIGNAL_ENV, "SIGUSR2")
    before = signal.getsignal(signal.SIGUSR2)
    try:
        stop = checkpointing.StopSignal.install()
        assert stop.name == "SIGUSR2" and not stop.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        eventually(lambda: stop.requested, timeout=5, what="the handler")
    finally:
        signal.signal(signal.SIGUSR2, before)
    monkeypatch.setenv(checkpointing.STOP_SIGNAL_ENV, "SIGNOPE")
    with pytest.raises(ValueError, match="EXPKIT_STOP_SIGNAL=SIGNOPE: not a signal name"):
        checkpointing.StopSignal.install()


# -- the script itself: stopped by the signal, then resumed ---------------------------------
@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory) -> Path:
    """An ImageFolder tree of 2 classes, 4 training and 2 validation images each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 4), ("val", 2)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 255, (8, 8, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / label / f"{i}.png")
    return root


def start_script(data: Path, tmp_path: Path, epochs: int) -> subprocess.Popen:
    """pytorch_train.py on the tiny images, with EXPKIT_CHECKPOINT_DIR as expkit sets it."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "EXPKIT_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
    }
    env.pop("EXPKIT_STOP_SIGNAL", None)
    argv = [
        sys.executable, "-u", str(TRAINING / "pytorch_train.py"),
        "--data_dir", str(data), "--num_epochs", str(epochs), "--batch_size", "2",
        "--threads", "1", "--output_dir", str(tmp_path / "outputs"),
    ]  # fmt: skip
    return subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow  # two starts of torch and torchvision: ~30 s on a busy machine
def test_the_script_stops_on_sigusr1_with_a_checkpoint_and_resumes_from_it(tiny_images, tmp_path):
    script = start_script(tiny_images, tmp_path, epochs=40)
    try:
        lines = []
        while not any(line.startswith("epoch 1/40") for line in lines):
            line = script.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        script.send_signal(signal.SIGUSR1)
        rest = script.communicate(timeout=120)[0]
    finally:
        script.kill()
    output = "".join(lines) + rest
    assert script.returncode == checkpointing.STOPPED == 75, output
    completed = max(int(line.split()[1].split("/")[0]) for line in output.splitlines()
                    if line.startswith("epoch "))  # fmt: skip
    assert completed < 40
    assert f"stop signal: checkpoint saved at epoch {completed} of 40; exiting" in output
    assert checkpointing.latest(tmp_path / "checkpoints")[0] == completed
    assert not (tmp_path / "outputs").exists()  # a stopped run writes no model

    resumed = start_script(tiny_images, tmp_path, epochs=completed + 1)
    output = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, output
    assert f"resuming from checkpoint: epoch {completed} of {completed + 1}" in output
    epochs = [line.split()[1] for line in output.splitlines() if line.startswith("epoch ")]
    assert epochs == [f"{completed + 1}/{completed + 1}"]  # only the epoch left
    assert (tmp_path / "outputs" / "model.pt").is_file()
    assert checkpointing.latest(tmp_path / "checkpoints")[0] == completed + 1
