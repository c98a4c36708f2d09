"""``python -m models predict``: classify images, any file PIL reads, directories of
thousands, URLs."""
from __future__ import annotations

import io
import json
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import api
from .._files import open_regular
from ..download import fetch_bytes, is_url
from ..pretrained import categories_for, released_models, transforms_for
from . import backends
from ._args import add_command, int_at_least, model_from_args, model_source_arguments

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


@dataclass
class Prediction:
    source: str
    top: list[tuple[str, int, float]] = field(default_factory=list)  # (label, class index, probability)
    error: str = ""


def predict(model: torch.nn.Module, sources: Sequence[str], *, topk: int = 5, batch_size: int = 32,
            workers: int | None = None, progress: bool = True) -> Iterator[Prediction]:
    """Top-``topk`` classes of each image, in the order of ``sources``; unreadable images
    come back with ``error`` set. The preprocessing is the model's (its published weights',
    else the recipe in its ``pretrained_cfg``); ``model`` may be a runtime backend's runner."""
    categories = categories_for(model)
    device = backends.device_of(model)  # (a runtime backend takes CPU tensors)
    if workers is None:
        workers = 0 if len(sources) <= batch_size else min(4, os.cpu_count() or 1)
    loader = DataLoader(ImageFiles(sources, transforms_for(model)), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_images, pin_memory=device.type == "cuda")
    bar = tqdm(total=len(sources), unit="img", file=sys.stderr, disable=not progress or len(sources) < 2)
    model.eval()
    try:
        for indices, batch, errors in loader:
            results: dict[int, Prediction] = {i: Prediction(sources[i], error=e) for i, e in errors}
            if batch is not None:
                with torch.inference_mode():
                    probs = model(batch.to(device, non_blocking=True)).softmax(dim=-1)
                if probs.shape[-1] != len(categories):
                    raise ValueError(f"the model returns {probs.shape[-1]} classes where its description names "
                                     f"{len(categories)}: the file and what was said of it disagree")
                values, classes = probs.topk(min(topk, probs.shape[-1]), dim=-1)
                for row, i in enumerate(indices):
                    top = zip(values[row].tolist(), classes[row].tolist(), strict=True)
                    results[i] = Prediction(sources[i], [(categories[c], int(c), float(p)) for p, c in top])
            bar.update(len(results))
            yield from (results[i] for i in sorted(results))
    finally:
        bar.close()


def _run(args) -> int:
    sources = expand_sources(args.images or [str(SAMPLE_IMAGE)])
    if not sources:
        raise SystemExit("error: no images found in " + ", ".join(args.images))
    if not args.checkpoint and not args.model_file:
        args.model = args.model or "ghostnet_1x"
    model = model_from_args(args, device=args.device, progress=not args.quiet)
    failed = 0
    for result in predict(model, sources, topk=args.topk, batch_size=args.batch_size, workers=args.workers,
                          progress=not args.quiet and not args.json):
        failed += bool(result.error)
        if result.error:  # tqdm.write: above the progress bar, not inside it
            tqdm.write(f"{result.source}: skipped, {result.error}", file=sys.stderr)
        if args.json:
            record = {"image": result.source, "model": args.model}
            if result.error:
                record["error"] = result.error
            else:
                record["top"] = [{"label": label, "index": index, "probability": round(p, 6)}
                                 for label, index, p in result.top]
            print(json.dumps(record), flush=True)
        elif not result.error:
            lines = [result.source] + [f"  {rank}. {label:<32} {p * 100:6.2f}%"
                                       for rank, (label, _, p) in enumerate(result.top, 1)]
            tqdm.write("\n".join(lines), file=sys.stdout)
    if failed:
        print(f"{failed} of {len(sources)} image(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


def register(commands) -> None:
    sub = add_command(commands, "predict", _run,
                      "classify images with a pretrained model (default: the bundled sample)")
    sub.add_argument("images", nargs="*", metavar="IMAGE|DIR|URL",
                     help="image files, directories (searched recursively) or http(s) URLs")
    released = released_models()
    sub.add_argument("--model", default=None, metavar="{" + ",".join(released) + "}",
                     help="a model with published weights (default: ghostnet_1x); with --checkpoint, any of "
                          + ", ".join(api.list_models()) + " (a checkpoint written by finetune, and a --model-file "
                          "written by export, name their own)")
    model_source_arguments(sub)
    sub.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps")
    sub.add_argument("--topk", type=int_at_least(1), default=5, help="classes to show per image (default: 5)")
    sub.add_argument("--batch-size", type=int_at_least(1), default=32, help="images per forward pass (default: 32)")
    sub.add_argument("--workers", type=int_at_least(0), default=None,
                     help="DataLoader worker processes (default: 0 for a few images, up to 4 for many)")
    sub.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")
    backends.add_arguments(sub)
