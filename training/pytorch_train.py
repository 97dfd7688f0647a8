"""Transfer learning with a ResNet-18, after the PyTorch transfer-learning tutorial.

The seed job trains on chickens and turkeys (120 training and 100 validation images per class),
downloaded and extracted to fowl_data/ when --data_dir is not given. Offline, train on the
digits built by prepare_digits.py:

    python prepare_digits.py --out data/digits
    python pytorch_train.py --data_dir data/digits

The same script runs data-parallel under torchrun or horovodrun (distributed.py finds the
launcher): each rank trains on its share of the data with gradients averaged, and rank 0 logs
the metrics (averaged over all ranks) and writes the outputs.

Metrics go through expkit's in-script API (a no-op outside expkit), best_val_acc (the best
validation accuracy so far) each epoch as the seed's script logs it, so that a sweep's early
termination policy compares trials epoch by epoch (training/sweep.yaml); the best epoch's weights
are saved to OUTPUT_DIR/model.pt (a state dict of `build_model(num_classes)`) with the class
names in OUTPUT_DIR/classes.json and 16 validation images as the model takes them in
OUTPUT_DIR/example_inputs.npy (the real inputs an ONNX export is checked on).

With a checkpoint folder (the job's `checkpoints:` under expkit, or --checkpoint_dir) the script
survives being stopped (checkpointing.py): rank 0 saves a checkpoint after every epoch (epoch,
model, optimizer, scheduler, best weights and accuracy, random states), every rank resumes from
the newest one on start ("resuming from checkpoint: epoch 2 of 5"), and the stop signal
(the job's `checkpoints.signal`, SIGUSR1 by default) ends the run at the next batch with the last
completed epoch's checkpoint in place and exit code 75, which the job's `retry.on` retries.
What the stopped epoch had done is trained again; a resumed epoch logs its metrics at the same
step (the epoch), so its values replace the stopped attempt's in expkit's current curve.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, models, transforms

import checkpointing
import distributed
from expkit import Run

FOWL_URL = "https://msdocsdatasets.blob.core.windows.net/pytorchfowl/fowl_data.zip"
FOWL_DIR = "fowl_data"
# Images at least this large take the tutorial's augmentations (RandomResizedCrop and flips);
# smaller ones (the digits) are only resized, and must not be flipped.
CROP_MIN_SIZE = 128
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults train the digits to >0.9 accuracy in ~1 CPU minute."""
    parser = argparse.ArgumentParser(description="Train a ResNet-18 on an ImageFolder data set.")
    parser.add_argument(
        "--data_dir",
        type=str,
        default=None,
        help="folder with train/ and val/ ImageFolder trees "
        "(default: download the chickens-and-turkeys data)",
    )
    parser.add_argument("--num_epochs", type=int, default=5, help="number of epochs to train")
    parser.add_argument(
        "--output_dir",
        type=str,
        default="./outputs",
        help="where model.pt and classes.json are written",
    )
    parser.add_argument("--learning_rate", type=float, default=0.01, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--batch_size", type=int, default=32, help="images per batch")
    parser.add_argument(
        "--image_size",
        type=int,
        default=32,
        help=f"input side in pixels; from {CROP_MIN_SIZE} on, random crops and "
        "flips as in the tutorial (use 224 for the original data)",
    )
    parser.add_argument("--num_workers", type=int, default=0, help="data loader worker processes")
    parser.add_argument("--seed", type=int, default=0, help="seed for torch, random and numpy")
    parser.add_argument(
        "--weights",
        type=str,
        default=None,
        help="state dict file of pretrained ResNet-18 weights (fc is replaced)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--checkpoint_dir",
        type=str,
        default=None,
        help="folder to checkpoint every epoch into and resume from (default: the job's "
        "`checkpoints:` under expkit; neither: no checkpoints)",
    )
    return parser.parse_args(argv)


def seed_everything(seed: int) -> None:
    """Seed every random number generator the job uses."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def download_data(url: str = FOWL_URL, target: str = FOWL_DIR) -> str:
    """Download and extract the chickens-and-turkeys data unless already there; its folder."""
    if os.path.isdir(os.path.join(target, "train")):
        return target
    print(f"downloading {url} ...", flush=True)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        archive = os.path.join(tmp, "fowl_data.zip")
        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        with zipfile.ZipFile(archive) as zipped:
            print("extracting files...", flush=True)
            zipped.extractall(tmp)
            top = zipped.namelist()[0].split("/")[0]
        os.replace(os.path.join(tmp, top), target)
    print(f"data directory is: {target}", flush=True)
    return target


def build_transforms(image_size: int) -> dict[str, transforms.Compose]:
    """The train and val transforms: the tutorial's for large images, a plain resize for small."""
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if image_size >= CROP_MIN_SIZE:
        return {
            "train": transforms.Compose(
                [
                    transforms.RandomResizedCrop(image_size),
                    transforms.RandomHorizontalFlip(),
                    transforms.ToTensor(),
                    normalize,
                ]
            ),
            "val": transforms.Compose(
                [
                    transforms.Resize(image_size * 256 // 224),
                    transforms.CenterCrop(image_size),
                    transforms.ToTensor(),
                    normalize,
                ]
            ),
        }
    plain = transforms.Compose(
        [
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            normalize,
        ]
    )
    return {"train": plain, "val": plain}


def fetch_default_data(dist: distributed.SingleProcess) -> str:
    """The chickens-and-turkeys data, downloaded by rank 0 while the other ranks wait."""
    if dist.is_main:
        try:
            download_data()
        except (OSError, zipfile.BadZipFile) as error:
            print(
                f"error: could not download the chickens-and-turkeys data ({error}); "
                "pass --data_dir, e.g. a folder built by prepare_digits.py (the digits job)",
                file=sys.stderr,
            )
            sys.exit(2)
    dist.barrier()
    return FOWL_DIR


def load_data(
    data_dir: str,
    image_size: int,
    batch_size: int,
    num_workers: int,
    seed: int,
    dist: distributed.SingleProcess,
) -> tuple[dict[str, DataLoader], list[str]]:
    """Data loaders for this rank's share of the train and val splits, and the class names."""
    tfms = build_transforms(image_size)
    images = {
        split: datasets.ImageFolder(os.path.join(data_dir, split), tfms[split])
        for split in ("train", "val")
    }
    loaders = {}
    for split, data in images.items():
        sampler = dist.sampler(data, shuffle=split == "train", seed=seed)  # None: all of it
        loaders[split] = DataLoader(
            data,
            batch_size=batch_size,
            shuffle=split == "train" and sampler is None,
            sampler=sampler,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed),
        )
    return loaders, images["train"].classes


def build_model(num_classes: int, weights: str | None = None) -> nn.Module:
    """A ResNet-18 whose fc has `num_classes` outputs, optionally from a local state dict.

    The fc of `weights` is dropped when its shape differs (an ImageNet state dict has 1000).
    """
    model = models.resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        own = model.state_dict()
        dropped = [
            key
            for key in state
            if key.startswith("fc.") and (key not in own or state[key].shape != own[key].shape)
        ]
        for key in dropped:
            del state[key]
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [key for key in missing if not key.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(
                f"{weights} is not a ResNet-18 state dict: {len(missing)} keys "
                f"missing ({missing[:3]}...), {len(unexpected)} unexpected "
                f"({unexpected[:3]}...)"
            )
        print(f"loaded weights from {weights}" + (" (new fc)" if dropped else ""), flush=True)
    return model


def build_scheduler(
    optimizer: torch.optim.Optimizer, num_epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A StepLR that divides the learning rate by 10 for the last third of the epochs."""
    step_size = max(1, (2 * num_epochs + 2) // 3)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=0.1)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    stop: Callable[[], bool] = lambda: False,
) -> tuple[float, int, int] | None:
    """One pass over this rank's training data: the summed loss, the correct and seen counts
    (sums, so that the ranks' results add up); None when `stop()` said so before a batch."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, labels in loader:
        if stop():
            return None
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * inputs.size(0)
        correct += (outputs.argmax(1) == labels).sum().item()
        seen += inputs.size(0)
    return total_loss, correct, seen


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device
) -> tuple[float, int, int]:
    """The summed loss, the correct and seen counts on `loader`."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device)
        outputs = model(inputs)
        total_loss += criterion(outputs, labels).item() * inputs.size(0)
        correct += (outputs.argmax(1) == labels).sum().item()
        seen += inputs.size(0)
    return total_loss, correct, seen


def mean_over_ranks(
    dist: distributed.SingleProcess, sums: tuple[float, int, int]
) -> tuple[float, float, int]:
    """The mean loss and the accuracy over every rank's images, and how many there were.

    DistributedSampler pads the last ranks' shares with repeated images when the data does
    not divide evenly: those few are counted twice.
    """
    total_loss, correct, seen = dist.allreduce_sum(list(sums))
    return total_loss / seen, correct / seen, int(seen)


def save_examples(data: datasets.ImageFolder, path: Path, count: int = 16) -> None:
    """The first `count` validation images as the model sees them (a float32 batch), so that
    an export is checked on real inputs too (job spec `model.input.examples`)."""
    batch = torch.stack([data[i][0] for i in range(min(count, len(data)))])
    np.save(path, batch.numpy().astype(np.float32))


def checkpoint_state(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    best_acc: float,
    best_state: dict[str, torch.Tensor] | None,
    generator: torch.Generator | None,
) -> dict[str, Any]:
    """What a checkpoint holds (besides the epoch `checkpointing.save` adds): all that the
    next epoch depends on, so that a resumed run trains as an uninterrupted one would.
    `best_state` None: the best weights are the model's own (a third less to write)."""
    return {
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "best_acc": best_acc,
        "best_model": best_state,
        "rng": checkpointing.capture_rng(generator),
    }


def resume(
    state: dict[str, Any],
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator | None,
) -> tuple[int, float, dict[str, torch.Tensor]]:
    """Load a checkpoint's state into the training objects (in place); the epochs it had
    completed, the best accuracy and the best weights."""
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    checkpointing.restore_rng(state["rng"], generator)
    best_state = state["best_model"]
    if best_state is None:  # the best epoch was the checkpoint's own
        best_state = copy.deepcopy(net.state_dict())
    return state["epoch"], state["best_acc"], best_state


def stop_requested(stop: checkpointing.StopSignal | None, dist: distributed.SingleProcess) -> bool:
    """Whether a rank got the stop signal; every rank gets the same answer, so that all stop
    at the same batch (DDP ranks that stopped apart would wait for each other for ever)."""
    if stop is None:
        return False
    if dist.size == 1:
        return stop.requested
    return dist.allreduce_sum([float(stop.requested)])[0] > 0


def main(argv: list[str] | None = None) -> None:
    """Train, log the metrics of every epoch, and save the best epoch's model (rank 0);
    checkpoint and resume when there is a checkpoint folder, and exit with
    checkpointing.STOPPED (75) on the stop signal."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    folder = checkpointing.checkpoint_folder(args.checkpoint_dir)
    stop = checkpointing.StopSignal.install() if folder is not None else None
    dist = distributed.setup()
    run = Run.get_context()

    data_dir = args.data_dir or fetch_default_data(dist)
    device = dist.device()
    loaders, classes = load_data(
        data_dir, args.image_size, args.batch_size, args.num_workers, args.seed, dist
    )
    if dist.is_main:
        run.set_tags({"model": "resnet18", "classes": len(classes), "world_size": dist.size})
    net = build_model(len(classes), args.weights).to(device)
    model = dist.wrap_model(net)  # rank 0's parameters everywhere; gradients averaged
    optimizer = torch.optim.SGD(net.parameters(), lr=args.learning_rate, momentum=args.momentum)
    optimizer = dist.wrap_optimizer(optimizer, net)
    scheduler = build_scheduler(optimizer, args.num_epochs)
    criterion = nn.CrossEntropyLoss()
    rank = f"rank {dist.rank} of {dist.size} ({dist.launcher}), " if dist.size > 1 else ""
    print(
        f"{rank}training on {device}: {len(loaders['train'].sampler)} of "
        f"{len(loaders['train'].dataset)} train and {len(loaders['val'].sampler)} of "
        f"{len(loaders['val'].dataset)} val images, {len(classes)} classes",
        flush=True,
    )

    best_acc, best_state = -1.0, copy.deepcopy(net.state_dict())
    first_epoch, generator = 0, loaders["train"].generator
    state = checkpointing.load_latest(folder)  # every rank loads it; rank 0 alone writes
    if state is not None:
        first_epoch, best_acc, best_state = resume(state, net, optimizer, scheduler, generator)
        print(
            f"{rank}resuming from checkpoint: epoch {first_epoch} of {args.num_epochs}", flush=True
        )

    completed, stopped = first_epoch, False  # the epochs done, and whether a stop came
    for epoch in range(first_epoch, args.num_epochs):
        start = time.perf_counter()
        sampler = loaders["train"].sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        sums = train_one_epoch(
            model,
            loaders["train"],
            criterion,
            optimizer,
            device,
            lambda: stop_requested(stop, dist),
        )
        if sums is None:  # stopped: this epoch's batches so far are trained again on resume
            stopped = True
            break
        train_seconds = time.perf_counter() - start
        train_loss, train_acc, images = mean_over_ranks(dist, sums)
        scheduler.step()
        sums = evaluate(model, loaders["val"], criterion, device)
        val_loss, val_acc, _ = mean_over_ranks(dist, sums)  # every rank gets the same values
        improved = val_acc > best_acc
        if improved:
            best_acc, best_state = val_acc, copy.deepcopy(net.state_dict())
        completed = epoch + 1
        if dist.is_main:
            for name, value in (
                ("train_loss", train_loss),
                ("train_acc", train_acc),
                ("val_loss", val_loss),
                ("val_acc", val_acc),
                ("images_per_sec", images / train_seconds),
                ("best_val_acc", best_acc),  # each epoch, as the seed's: a sweep's primary metric
            ):
                run.log(name, value, step=epoch)  # a resumed epoch logs at the same step
            if folder is not None:
                run.flush()  # the epoch's values written before its checkpoint: a kill loses none
                best = None if improved else best_state  # None: this epoch's model is the best
                state = checkpoint_state(net, optimizer, scheduler, best_acc, best, generator)
                checkpointing.save(folder, completed, state)
            print(
                f"epoch {epoch + 1}/{args.num_epochs}  train loss {train_loss:.4f} "
                f"acc {train_acc:.4f}  val loss {val_loss:.4f} acc {val_acc:.4f}  "
                f"{time.perf_counter() - start:.1f}s ({images / train_seconds:.0f} images/s)",
                flush=True,
            )
        if stop_requested(stop, dist):
            stopped = completed < args.num_epochs  # after the last epoch: finish instead
            break

    if stopped:
        saved = f"checkpoint saved at epoch {completed}" if completed else "no epoch completed"
        print(f"{rank}stop signal: {saved} of {args.num_epochs}; exiting", flush=True)
        dist.shutdown()
        sys.exit(checkpointing.STOPPED)

    if dist.is_main:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        torch.save(best_state, output_dir / "model.pt")
        (output_dir / "classes.json").write_text(json.dumps(classes) + "\n")
        save_examples(loaders["val"].dataset, output_dir / "example_inputs.npy")
        print(f"best val acc {best_acc:.4f}; saved {output_dir / 'model.pt'}", flush=True)
    dist.shutdown()


if __name__ == "__main__":
    main()
