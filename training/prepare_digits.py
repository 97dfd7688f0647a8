"""Build a small ImageFolder data set from scikit-learn's bundled digits (no download).

    python prepare_digits.py --out DEST [--size 32] [--seed 0]

writes DEST/train/<class>/<n>.png and DEST/val/<class>/<n>.png for the classes 0..9: per class up
to 120 training images and the rest, up to 60, for validation (the seed's chickens-and-turkeys
data has 120 + 100 per class). The tree is built in a temporary sibling folder and renamed into
place, so DEST is either absent or complete; a complete DEST is left as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

TRAIN_PER_CLASS = 120
VAL_PER_CLASS = 60
MANIFEST = "digits.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to create")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    return parser.parse_args(argv)


def to_image(pixels: np.ndarray, size: int) -> Image.Image:
    """An 8x8 digit (values 0..16) as an RGB image of size x size, white strokes on black."""
    gray = Image.fromarray((pixels.reshape(8, 8) * (255 / 16)).astype(np.uint8), mode="L")
    return gray.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")


def build(root: Path, size: int, seed: int) -> dict[str, int]:
    """Write the train and val trees under `root`; returns the image count of each split."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        splits = {
            "train": indices[:TRAIN_PER_CLASS],
            "val": indices[TRAIN_PER_CLASS : TRAIN_PER_CLASS + VAL_PER_CLASS],
        }
        for split, chosen in splits.items():
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for n, index in enumerate(chosen):
                to_image(digits.data[index], size).save(folder / f"{n}.png")
            counts[split] += len(chosen)
    return counts


def main(argv: list[str] | None = None) -> None:
    """Build DEST unless a complete copy is already there."""
    args = parse_args(argv)
    dest: Path = args.out.resolve()
    wanted = {"size": args.size, "seed": args.seed}
    if (dest / MANIFEST).is_file():
        found = json.loads((dest / MANIFEST).read_text())
        if {key: found.get(key) for key in wanted} != wanted:
            sys.exit(f"error: {dest} holds digits built with other options: {found}")
        print(f"digits: {dest} already complete (train={found['train']}, val={found['val']})")
        return
    if dest.exists():
        sys.exit(f"error: {dest} exists and is not a complete digits folder; remove it first")

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        counts = build(tmp, args.size, args.seed)
        (tmp / MANIFEST).write_text(json.dumps({**wanted, **counts}) + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / MANIFEST).is_file():
                raise
            print(f"digits: {dest} was completed by another process meanwhile")
            return
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"digits: wrote {dest} (train={counts['train']}, val={counts['val']}, size={args.size})")


if __name__ == "__main__":
    main()
