"""Transfer learning with a ResNet-18, after the PyTorch transfer-learning tutorial.

The seed job trains on chickens and turkeys (120 training and 100 validation images per class),
downloaded and extracted to fowl_data/ when --data_dir is not given. Offline, train on the
digits built by prepare_digits.py:

    python prepare_digits.py --out data/digits
    python pytorch_train.py --data_dir data/digits

Metrics go through expkit's in-script API (a no-op outside expkit); the best epoch's weights
are saved to OUTPUT_DIR/model.pt with the class names in OUTPUT_DIR/classes.json.
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
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, models, transforms

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


def load_data(
    data_dir: str, image_size: int, batch_size: int, num_workers: int, seed: int
) -> tuple[dict[str, DataLoader], list[str]]:
    """Data loaders for the train and val splits of `data_dir`, and the class names."""
    tfms = build_transforms(image_size)
    images = {
        split: datasets.ImageFolder(os.path.join(data_dir, split), tfms[split])
        for split in ("train", "val")
    }
    loaders = {
        split: DataLoader(
            images[split],
            batch_size=batch_size,
            shuffle=split == "train",
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed),
        )
        for split in ("train", "val")
    }
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


def build_optimizer(
    model: nn.Module, learning_rate: float, momentum: float, num_epochs: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD with momentum, and a StepLR that divides the rate by 10 for the last third."""
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    step_size = max(1, (2 * num_epochs + 2) // 3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=0.1)
    return optimizer, scheduler


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> tuple[float, float]:
    """One pass over the training data; the mean loss and the accuracy."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * inputs.size(0)
        correct += (outputs.argmax(1) == labels).sum().item()
        seen += inputs.size(0)
    return total_loss / seen, correct / seen


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device
) -> tuple[float, float]:
    """The mean loss and the accuracy on `loader`."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, labels in loader:
        inputs, labels = inputs.to(device), labels.to(device)
        outputs = model(inputs)
        total_loss += criterion(outputs, labels).item() * inputs.size(0)
        correct += (outputs.argmax(1) == labels).sum().item()
        seen += inputs.size(0)
    return total_loss / seen, correct / seen


def main(argv: list[str] | None = None) -> None:
    """Train, log the metrics of every epoch, and save the best epoch's model."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    run = Run.get_context()

    data_dir = args.data_dir
    if data_dir is None:
        try:
            data_dir = download_data()
        except (OSError, zipfile.BadZipFile) as error:
            print(
                f"error: could not download the chickens-and-turkeys data ({error}); "
                "pass --data_dir, e.g. a folder built by prepare_digits.py (the digits job)",
                file=sys.stderr,
            )
            sys.exit(2)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaders, classes = load_data(
        data_dir, args.image_size, args.batch_size, args.num_workers, args.seed
    )
    run.set_tags({"model": "resnet18", "classes": len(classes)})
    model = build_model(len(classes), args.weights).to(device)
    optimizer, scheduler = build_optimizer(
        model, args.learning_rate, args.momentum, args.num_epochs
    )
    criterion = nn.CrossEntropyLoss()
    print(
        f"training on {device}: {len(loaders['train'].dataset)} train and "
        f"{len(loaders['val'].dataset)} val images, {len(classes)} classes",
        flush=True,
    )

    best_acc, best_state = -1.0, copy.deepcopy(model.state_dict())
    for epoch in range(args.num_epochs):
        start = time.perf_counter()
        train_loss, train_acc = train_one_epoch(
            model, loaders["train"], criterion, optimizer, device
        )
        scheduler.step()
        val_loss, val_acc = evaluate(model, loaders["val"], criterion, device)
        for name, value in (
            ("train_loss", train_loss),
            ("train_acc", train_acc),
            ("val_loss", val_loss),
            ("val_acc", val_acc),
        ):
            run.log(name, value, step=epoch)
        if val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
        print(
            f"epoch {epoch + 1}/{args.num_epochs}  train loss {train_loss:.4f} "
            f"acc {train_acc:.4f}  val loss {val_loss:.4f} acc {val_acc:.4f}  "
            f"{time.perf_counter() - start:.1f}s",
            flush=True,
        )

    run.log("best_val_acc", best_acc)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.save(best_state, output_dir / "model.pt")
    (output_dir / "classes.json").write_text(json.dumps(classes) + "\n")
    print(f"best val acc {best_acc:.4f}; saved {output_dir / 'model.pt'}", flush=True)


if __name__ == "__main__":
    main()
