"""A small learnable image set for the fine-tuning tests and the README figure: four classes of
striped images, horizontal or vertical stripes in warm or cool colours, each image with its own
stripe period, phase, tilt, colours and noise. Train and val are drawn from different seeds.

Every class survives the training augmentation (a horizontal flip keeps stripes horizontal;
colours are not jittered), so a model that learns orientation and colour reaches 100 %.

    python tests/stripes.py DIR [--train N] [--val N]   # writes DIR/train/CLASS/*.png, DIR/val/...
"""
import argparse
import colorsys
import math
import pathlib

import numpy as np
from PIL import Image

CLASSES = ("horizontal_cool", "horizontal_warm", "vertical_cool", "vertical_warm")


def stripes(rng: np.random.Generator, horizontal: bool, warm: bool, size: int = 64) -> Image.Image:
    period = rng.uniform(6.0, 14.0)
    phase = rng.uniform(0.0, period)
    angle = math.radians(rng.uniform(-12.0, 12.0)) + (0.0 if horizontal else math.pi / 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    coord = yy * math.cos(angle) - xx * math.sin(angle)
    wave = (np.sin(2 * math.pi * (coord + phase) / period) > 0).astype(np.float64)[..., None]
    hue = (rng.uniform(-0.06, 0.12) if warm else rng.uniform(0.45, 0.65)) % 1.0
    fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)))
    bg = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(-0.05, 0.05)) % 1.0, rng.uniform(0.2, 0.5),
                                      rng.uniform(0.1, 0.4)))
    image = wave * fg + (1.0 - wave) * bg + rng.normal(0.0, 0.06, (size, size, 3))
    return Image.fromarray((np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8))


def write_split(root: pathlib.Path, per_class: int, seed: int, size: int = 64) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            stripes(rng, name.startswith("horizontal"), name.endswith("warm"), size).save(folder / f"{i:03d}.png")
    return root


def write_dataset(root, train: int = 32, val: int = 12, seed: int = 0, size: int = 64) -> pathlib.Path:
    """``root/train`` and ``root/val`` in ImageFolder layout, ``train``/``val`` images per class,
    drawn apart (different seeds)."""
    root = pathlib.Path(root)
    write_split(root / "train", train, seed, size)
    write_split(root / "val", val, seed + 1000, size)
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--val", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_dataset(args.root, args.train, args.val, args.seed))
