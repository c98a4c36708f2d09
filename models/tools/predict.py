"""Classify images: any file PIL reads, directories of thousands, URLs."""
from __future__ import annotations

import io
import os
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .download import fetch_bytes, is_url

SAMPLE_IMAGE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "chelsea.jpg"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image as the camera held it, from whatever PIL opened.

    EXIF orientation is applied; transparent pixels are put on white (not on whatever colour
    the file stores under them); 16-bit and float grayscale are scaled, not clipped.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        else:
            top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0.0) > 255 else 255.0
        image = Image.fromarray((np.clip(values / top, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(source: str) -> Image.Image:
    if is_url(source):
        image = Image.open(io.BytesIO(fetch_bytes(source)))
    else:
        image = Image.open(source)
    image.load()  # decode now: a truncated file fails here, inside the try of the caller
    return to_rgb(image)


def expand_sources(sources: Sequence[str]) -> list[str]:
    """Files, URLs, and the image files under each directory (recursively, sorted)."""
    expanded = []
    for source in sources:
        path = pathlib.Path(source)
        if not is_url(source) and path.is_dir():
            expanded += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            expanded.append(source)
    return expanded


class _Images(Dataset):
    """(index, tensor or None, error or "") per source; errors are returned, not raised, so
    one bad file does not stop a directory of thousands."""

    def __init__(self, sources: Sequence[str], transform):
        self.sources = list(sources)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(open_image(self.sources[index])), ""
        except Exception as exc:  # noqa: BLE001 - reported per image by the caller
            return index, None, f"{type(exc).__name__}: {exc}"


def _collate(batch):
    good = [(i, x) for i, x, _ in batch if x is not None]
    errors = [(i, e) for i, x, e in batch if x is None]
    tensor = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], tensor, errors


@dataclass
class Prediction:
    source: str
    top: list[tuple[str, int, float]] = field(default_factory=list)  # (label, class index, probability)
    error: str = ""


def predict(model: torch.nn.Module, sources: Sequence[str], *, topk: int = 5, batch_size: int = 32,
            workers: int | None = None, progress: bool = True) -> Iterator[Prediction]:
    """Top-``topk`` classes of each image, in the order of ``sources``; unreadable images
    come back with ``error`` set."""
    weights = model.pretrained_weights
    categories = weights.meta["categories"]
    device = next(model.parameters()).device
    if workers is None:
        workers = 0 if len(sources) <= batch_size else min(4, os.cpu_count() or 1)
    loader = DataLoader(_Images(sources, weights.transforms()), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    bar = tqdm(total=len(sources), unit="img", file=sys.stderr, disable=not progress or len(sources) < 2)
    model.eval()
    try:
        for indices, batch, errors in loader:
            results: dict[int, Prediction] = {i: Prediction(sources[i], error=e) for i, e in errors}
            if batch is not None:
                with torch.inference_mode():
                    probs = model(batch.to(device, non_blocking=True)).softmax(dim=-1)
                values, classes = probs.topk(min(topk, probs.shape[-1]), dim=-1)
                for row, i in enumerate(indices):
                    results[i] = Prediction(sources[i], [
                        (categories[c], int(c), float(p)) for p, c in zip(values[row].tolist(), classes[row].tolist())
                    ])
            bar.update(len(results))
            yield from (results[i] for i in sorted(results))
    finally:
        bar.close()
