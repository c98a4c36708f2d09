"""Images that exports are checked and calibrated on: the bundled photo, variations of it,
generated images (deterministic, no data needed), or a user's folder."""
from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from ..pretrained import transforms_for
from ._images import SAMPLE_IMAGE, ImageFiles, expand_sources

SAMPLE_ID = "sample-v1"  # the default calibration set; change it when the set below changes


def default_transforms(model: torch.nn.Module):
    """The preprocessing ``model`` carries (its published weights', its checkpoint's), else its
    family's recipe: ``pretrained.transforms_for``, the one rule the other tools use too."""
    return transforms_for(model)


def generated_images(count: int, seed: int = 0) -> list[Image.Image]:
    """``count`` varied synthetic RGB images: smooth colour fields, gradients, checkerboards,
    shapes, stripes, textures; the same for the same seed."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        w, h = (int(v) for v in rng.integers(160, 360, size=2))
        kind = i % 6
        if kind == 0:  # smooth colour field
            image = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        elif kind == 1:  # linear gradient between two colours at an angle
            angle = rng.uniform(0, np.pi)
            yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
            t = np.clip((np.cos(angle) * xx + np.sin(angle) * yy)[..., None], 0, 1)
            a, b = rng.random(3) * 255, rng.random(3) * 255
            image = Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))
        elif kind == 2:  # checkerboard
            cell = int(rng.integers(8, 48))
            yy, xx = np.mgrid[0:h, 0:w]
            mask = ((yy // cell + xx // cell) % 2).astype(bool)[..., None]
            image = Image.fromarray(np.where(mask, rng.random(3) * 255, rng.random(3) * 255).astype(np.uint8))
        elif kind == 3:  # shapes on a background
            image = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
            draw = ImageDraw.Draw(image)
            for _ in range(int(rng.integers(3, 9))):
                x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
                box = (x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2)))
                fill = tuple(int(c) for c in rng.integers(0, 256, 3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        elif kind == 4:  # stripes
            angle, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
            yy, xx = np.mgrid[0:h, 0:w]
            wave = (np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period) + 1)[..., None] / 2
            image = Image.fromarray((wave * rng.random(3) * 255 + (1 - wave) * rng.random(3) * 255).astype(np.uint8))
        else:  # blurred noise texture
            noise = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            image = noise.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 3))))
        images.append(image)
    return images


def photo_variations(count: int, seed: int = 1) -> list[Image.Image]:
    """The bundled photo, then crops, flips, rotations and colour changes of it."""
    photo = Image.open(SAMPLE_IMAGE).convert("RGB")
    rng = np.random.default_rng(seed)
    images = [photo]
    while len(images) < count:
        w, h = photo.size
        scale = rng.uniform(0.5, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = photo.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        image = image.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR, expand=False)
        factors = rng.uniform(0.7, 1.3, 3)
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) * factors, 0, 255).astype(np.uint8))
        images.append(image)
    return images


def check_images(transforms) -> torch.Tensor:
    """What every export is checked on: the bundled photo and 7 generated images."""
    return torch.stack([transforms(image) for image in [Image.open(SAMPLE_IMAGE).convert("RGB"),
                                                        *generated_images(7)]])


def _calibration_files(source: str | os.PathLike, limit: int) -> list[str]:
    files = expand_sources([os.fspath(source)])
    if not pathlib.Path(source).is_dir():
        raise ValueError(f"calibration folder {source} does not exist")
    if not files:
        raise ValueError(f"no images in the calibration folder {source}")
    step = max(1, len(files) // limit)  # spread over the folder (class folders are sorted)
    return files[::step][:limit]


def calibration_id(source: str | os.PathLike | None, limit: int = 256) -> str:
    """Names the calibration set, for the export cache: the files, their sizes and times."""
    if source is None:
        return SAMPLE_ID
    digest = hashlib.sha256()
    for path in _calibration_files(source, limit):
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def calibration_batches(transforms, source: str | os.PathLike | None = None, *, limit: int = 256,
                        batch_size: int = 16) -> list[torch.Tensor]:
    """Preprocessed calibration batches: up to ``limit`` images of the folder ``source``
    (unreadable ones skipped), or by default 16 variations of the bundled photo and 16
    generated images."""
    if source is None:
        tensors = [transforms(image) for image in photo_variations(16) + generated_images(16, seed=2)]
    else:
        dataset = ImageFiles(_calibration_files(source, limit), transforms)
        tensors = [x for _, x, _ in (dataset[i] for i in range(len(dataset))) if x is not None]
        if not tensors:
            raise ValueError(f"none of the images in {source} could be read")
    return [torch.stack(tensors[i:i + batch_size]) for i in range(0, len(tensors), batch_size)]


def settle_batchnorm(model: torch.nn.Module, batches: Iterable[torch.Tensor] | None = None) -> torch.nn.Module:
    """``model`` (random weights) with BatchNorm statistics measured on ``batches``, drawn one at
    a time (default: the calibration images, preprocessed for it), in place, returned in eval
    mode: its activations and logits at a trained model's scale. With a fresh model's statistics
    (mean 0, variance 1), GhostNetV2's activations grew to 1e6 and V3's to 1e22, where float32
    rounding alone moved the logits by a third (batch of 8 against one at a time, fused against
    unfused): no export of it could be checked."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for batch in calibration_batches(default_transforms(model)) if batches is None else batches:
            model(batch)
    return model.eval()
