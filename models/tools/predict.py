"""``python -m models predict``: classify images, any file PIL reads, directories of
thousands, URLs."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import api
from ..pretrained import categories_for, released_models, transforms_for
from . import backends
from ._args import add_command, int_at_least, json_argument, model_source_arguments
from ._images import SAMPLE_IMAGE, ImageFiles, collate_images, expand_sources


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
    model = backends.model_from_args(args, device=args.device, progress=not args.quiet)
    failed = 0
    to_stdout = args.json == "-"  # JSON lines in place of the text
    with contextlib.ExitStack() as stack:
        sink = sys.stdout if to_stdout else stack.enter_context(open(args.json, "w")) if args.json else None
        for result in predict(model, sources, topk=args.topk, batch_size=args.batch_size, workers=args.workers,
                              progress=not args.quiet and not to_stdout):
            failed += bool(result.error)
            if result.error:  # tqdm.write: above the progress bar, not inside it
                tqdm.write(f"{result.source}: skipped, {result.error}", file=sys.stderr)
            if sink is not None:
                record = {"image": result.source, "model": args.model}
                if result.error:
                    record["error"] = result.error
                else:
                    record["top"] = [{"label": label, "index": index, "probability": round(p, 6)}
                                     for label, index, p in result.top]
                sink.write(json.dumps(record) + "\n")
                sink.flush()
            if not to_stdout and not result.error:
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
    json_argument(sub, "one object per image (JSON lines)")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")
    backends.add_arguments(sub)
