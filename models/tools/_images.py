"""Reading images, for every command that reads them (predict, evaluate, finetune, label, export's
calibration): files, directories and URLs, opened safely and turned into RGB the way the camera
held them, and a Dataset that reports an unreadable image instead of stopping on it."""
from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Sequence

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .._files import open_regular
from ..download import fetch_bytes, is_url

_PACKAGE = pathlib.Path(__file__).resolve().parents[1]
# Bundled in an installed package (setup.py), else in the clone's examples/.
SAMPLE_IMAGE = next((p for p in (_PACKAGE / "data" / "chelsea.jpg", _PACKAGE.parent / "examples" / "chelsea.jpg")
                     if p.is_file()), _PACKAGE.parent / "examples" / "chelsea.jpg")
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
    """A URL's or a regular file's image; anything else (a FIFO would block forever, a device
    never end) is refused unread."""
    if is_url(source):
        image = Image.open(io.BytesIO(fetch_bytes(source)))
        image.load()  # decode now: a truncated file fails here, inside the try of the caller
        return to_rgb(image)
    fd, _ = open_regular(source)
    with os.fdopen(fd, "rb") as f:
        image = Image.open(f)
        image.load()
    return to_rgb(image)


def expand_sources(sources: Sequence[str]) -> list[str]:
    """Files, URLs, and what is named like an image under each directory (recursively,
    sorted): what is not a regular file among them is reported by the reader, not left out."""
    expanded = []
    for source in sources:
        path = pathlib.Path(source)
        if not is_url(source) and path.is_dir():
            expanded += sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        else:
            expanded.append(source)
    return expanded


class ImageFiles(Dataset):
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


def collate_images(batch):
    """Batch the readable images of an ``ImageFiles`` batch: (indices, tensor or None, errors)."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    errors = [(i, e) for i, x, e in batch if x is None]
    tensor = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], tensor, errors
