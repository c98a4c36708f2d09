"""``python -m models evaluate``: top-1/top-k on an ImageFolder tree, on one process or many.

Under ``torchrun`` each rank takes every WORLD_SIZE-th image (so each is evaluated exactly
once: no padding duplicates, unlike DistributedSampler), the counts are summed with
``all_reduce``, and only rank 0 prints and writes.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import api
from ..download import is_url
from ..manifest import Manifest
from ..pretrained import categories_for, transforms_for
from . import _distributed, backends
from ._args import (
    add_command,
    amp_arguments,
    amp_dtype,
    int_at_least,
    json_argument,
    model_source_arguments,
    published_weights,
    write_json,
)
from ._finetune_data import image_files, named_folders
from ._images import ImageFiles, collate_images

_SYNSETS = pathlib.Path(__file__).resolve().parents[1] / "data" / "imagenet_synsets.txt"
_WNID = re.compile(r"n\d{8}")


class EvaluationError(ValueError):
    """The data or the options cannot give a meaningful evaluation."""


@dataclass
class Report:
    """What an evaluation measured, and what produced the numbers: the model (its classes),
    the backend, the precision, and the file that ran with its SHA-256. ``top_k`` is
    min(5, classes); ``to_json`` names the keys by their k (``top3`` for a 3-class model)."""

    model: str
    num_classes: int
    images: int
    skipped: int
    top1: float
    topk: float  # top-``top_k``
    correct1: int
    correctk: int
    top_k: int
    images_per_s: float
    seconds: float
    world_size: int
    published_top1: float | None
    published_top5: float | None
    backend: str = "eager"
    precision: str = "fp32"
    file: str | None = None
    file_sha256: str | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        k = self.top_k
        data[f"top{k}"], data[f"correct{k}"] = data.pop("topk"), data.pop("correctk")
        return data

    def header(self) -> str:
        ran = f"{self.backend}, {self.precision}"
        if self.file:
            ran += f", {self.file}" + (f" (sha256 {self.file_sha256[:16]}...)" if self.file_sha256 else "")
        return f"{self.model} ({self.num_classes} classes) on {ran}"


def _sha256(path: str | os.PathLike) -> str:
    from .._hashing import sha256_file

    return sha256_file(pathlib.Path(path))


def class_indices(data: pathlib.Path, classes: Sequence[str], class_map: str | os.PathLike | None) -> dict[str, int]:
    """Class folder name -> model output index: ``class_map``, else ImageNet WordNet ids for a
    1000-class model, else the model's class names (a fine-tuned model's), else sorted
    folders one-to-one with the classes (ImageFolder's convention)."""
    if not data.is_dir():
        raise EvaluationError(f"data directory {data} does not exist")
    num_classes = len(classes)
    folders = list(named_folders(data))  # (names in Unicode NFC, as finetune reads them)
    if not folders:
        raise EvaluationError(f"{data} has no class folders (expected the ImageFolder layout: one folder per class)")
    named = list(classes) != [f"class {i}" for i in range(num_classes)]
    if class_map:
        mapping = json.loads(pathlib.Path(class_map).read_text())
        if not isinstance(mapping, dict) or not all(
                isinstance(v, int) and 0 <= v < num_classes for v in mapping.values()):
            raise EvaluationError(
                f"--class-map {class_map} must be a JSON object of folder name -> index in [0, {num_classes})")
    elif all(_WNID.fullmatch(f) for f in folders) and num_classes == 1000:
        synsets = _SYNSETS.read_text().split()
        mapping = {wnid: i for i, wnid in enumerate(synsets)}
    elif named and num_classes != 1000 and set(folders) <= set(classes):
        mapping = {c: i for i, c in enumerate(classes)}  # the names the model was trained on
    elif named and num_classes != 1000:
        unknown = [f for f in folders if f not in classes]
        raise EvaluationError(f"class folder(s) of {data} unknown to the model: {', '.join(unknown[:10])}; it was "
                              f"trained on: {', '.join(classes[:10])}{', ...' if num_classes > 10 else ''} "
                              "(rename the folders, or map them with --class-map FILE)")
    elif len(folders) == num_classes:
        mapping = {f: i for i, f in enumerate(folders)}  # ImageFolder's convention: sorted names
    else:
        raise EvaluationError(
            f"the class folders of {data} ({len(folders)}: {', '.join(folders[:5])}"
            f"{', ...' if len(folders) > 5 else ''}) "
            f"do not match the model's {num_classes} classes: name them by ImageNet WordNet id (n01440764, ...), "
            "or give one folder per class, or pass --class-map FILE (JSON: folder name -> class index)"
        )
    unknown = [f for f in folders if f not in mapping]
    if unknown:
        raise EvaluationError(f"class folder(s) unknown to the model: {', '.join(unknown[:10])}; "
                              "fix the folder names or map them with --class-map")
    return {f: mapping[f] for f in folders}


def samples(data: pathlib.Path, classes: dict[str, int], limit: int | None) -> list[tuple[str, int]]:
    folders = named_folders(data)
    items = [(str(p), index) for name, index in classes.items() for p in image_files(folders[name])]
    if not items:
        raise EvaluationError(f"no image files under {data}")
    return items[:limit] if limit else items


def _what_ran(net, amp: str | None, checkpoint) -> tuple[str, str | None]:
    """(precision, file) of what evaluate runs."""
    if isinstance(net, backends.Runner):
        described = net.description
        precision = described.precision_text if described is not None else "precision unknown (no description)"
        if described is not None and described.precision == "bf16" and net.inference_precision != "bf16":
            precision += f" (run in {net.inference_precision}: this CPU has no native bfloat16)"
        return precision, str(net.path)
    precision = getattr(net, "precision_text", "fp32") + (f", {amp} autocast" if amp else "")
    return precision, (str(checkpoint) if checkpoint and not is_url(str(checkpoint)) else None)


@dataclass(frozen=True, kw_only=True)
class EvaluateOptions:
    """How ``evaluate`` runs: the keywords of ``evaluate(model, data, **options)``, the command's
    flags (``batch_size`` is ``--batch-size``). The options from ``backend`` on run the model in
    a runtime (see ``backends.wrap``)."""

    checkpoint: str | os.PathLike | None = None
    """Your checkpoint file or URL instead of the published weights (any model)."""
    checkpoint_sha256: str | None = None
    """The SHA-256 the checkpoint file must have."""
    num_classes: int | None = None
    """The classes of a checkpoint that does not name them (default: 1000)."""
    class_map: str | os.PathLike | None = None
    """A JSON file: class folder name -> class index."""
    batch_size: int = 64
    workers: int = 0
    """DataLoader worker processes per rank."""
    device: str | torch.device | None = None
    """Default: the CPU; under torchrun, this rank's GPU if there is one."""
    limit: int | None = None
    """Only the first ``limit`` images (sorted)."""
    fused: bool = False
    """Fold BatchNorm first (same accuracy, faster)."""
    channels_last: bool = False
    amp: bool | str | None = None
    """Autocast: ``"bfloat16"`` or ``"float16"`` (``True``: bfloat16); None or False: none."""
    progress: bool = True
    """A progress bar on rank 0."""
    manifest: Manifest | str | os.PathLike | None = None
    """The weights manifest (default: $GHOSTNET_HUB_MANIFEST or the bundled one)."""
    backend: str | None = None
    """eager, compile, onnxruntime, executorch or openvino (default: eager, or ``model_file``'s)."""
    model_file: str | os.PathLike | None = None
    """A file written by ``export`` (.onnx, .pte, .pt2, .xml), which names its model."""
    int8: bool = False
    """An INT8 export, or compile's x86 PT2E INT8."""
    float_depthwise: bool = False
    """With ``int8``: depthwise convolutions kept in float."""
    calibration: str | os.PathLike | None = None
    """With ``int8``: the calibration images (default: the bundled sample and generated images)."""
    precision: str = "fp32"
    """``"bf16"``: an OpenVINO export in bfloat16, or compile under bfloat16 autocast."""

    def __post_init__(self) -> None:
        if self.amp is True or not self.amp:  # (True: bfloat16, as before dtypes could be named)
            object.__setattr__(self, "amp", "bfloat16" if self.amp is True else None)

    @classmethod
    def of(cls, options: dict[str, Any]) -> EvaluateOptions:
        """The options of ``evaluate``'s keywords; an unknown keyword is a TypeError naming it."""
        if "weights" in options:
            raise TypeError("evaluate(weights=...) is now evaluate(checkpoint=...)")
        unknown = [k for k in options if k not in _OPTION_NAMES]
        if unknown:
            raise TypeError(f"evaluate() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
        return cls(**options)

    def model_args(self, model: str | None) -> argparse.Namespace:
        """What ``backends.model_from_args`` reads: the model, its weights and how it runs."""
        return argparse.Namespace(model=model, quiet=not self.progress, **{k: getattr(self, k) for k in _MODEL_SOURCE})


_OPTION_NAMES = [f.name for f in fields(EvaluateOptions)]
_MODEL_SOURCE = ("checkpoint", "checkpoint_sha256", "num_classes", "manifest", "backend", "model_file", "int8",
                 "float_depthwise", "calibration", "precision")


def evaluate(model: str | None, data: str | os.PathLike, **options: Any) -> Report:
    """Top-1/top-k of ``model`` (the published weights, or your ``checkpoint``, for any model)
    on the ImageFolder tree ``data``; under torchrun, this rank's share, with the counts summed
    over all ranks. k is min(5, classes). A checkpoint written by ``finetune``, or a
    ``model_file`` written by ``export``, names its model, classes and preprocessing itself
    (``model`` may be None). ``options`` are ``EvaluateOptions``' fields, e.g. ``batch_size=2``;
    ``backend`` and the options after it run the model in a runtime (see ``backends.wrap``), e.g.
    ``backend="onnxruntime", int8=True``. The report says what ran: backend, precision, file."""
    how = EvaluateOptions.of(options)
    # Alone, evaluate runs on the CPU unless told; under torchrun, on this rank's GPU if there is one.
    joined = _distributed.setup(how.device, gpu_by_default=int(os.environ.get("WORLD_SIZE", "1")) > 1)
    rank, world, device = joined.rank, joined.size, joined.device
    data = pathlib.Path(data)
    args = how.model_args(model)
    if how.model_file is None and how.checkpoint is None:
        published_weights(args)  # a model without weights: the error, before any work
    # Every rank asks; the cache lock makes one download that all of them then verify and share.
    net = backends.model_from_args(args, device=device, progress=how.progress and rank == 0, fuse=how.fused,
                                   channels_last=how.channels_last)
    classes = categories_for(net)
    indices = class_indices(data, classes, how.class_map)
    top_k = min(5, len(classes))
    items = samples(data, indices, how.limit)
    shard = items[rank::world]  # disjoint, covering: each image exactly once
    targets = torch.tensor([t for _, t in shard])
    preprocess, published = transforms_for(net), getattr(net.pretrained_weights, "entry", None)
    loader = DataLoader(ImageFiles([p for p, _ in shard], preprocess), batch_size=how.batch_size,
                        num_workers=how.workers, collate_fn=collate_images)
    dev = backends.device_of(net)
    autocast = torch.autocast(dev.type, dtype=getattr(torch, how.amp or "bfloat16"), enabled=bool(how.amp))
    counts = torch.zeros(4, dtype=torch.float64)  # images, top-1 correct, top-k correct, skipped
    bar = tqdm(total=len(items), unit="img", file=sys.stderr, disable=rank != 0 or not how.progress)
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        for batch_indices, batch, errors in loader:
            for i, error in errors:  # tqdm.write: above the progress bar, not inside it
                tqdm.write(f"rank {rank}: skipped {shard[i][0]}: {error}", file=sys.stderr)
            counts[3] += len(errors)
            if batch is not None:
                logits = net(batch.to(dev, non_blocking=True)).float()
                if logits.shape[-1] != len(classes):
                    raise EvaluationError(f"the model returns {logits.shape[-1]} classes where its description "
                                          f"names {len(classes)}")
                topk = logits.topk(top_k, dim=1).indices.cpu()
                truth = targets[batch_indices].unsqueeze(1)
                counts[0] += len(batch_indices)
                counts[1] += (topk[:, :1] == truth).sum()
                counts[2] += (topk == truth).any(dim=1).sum()
            bar.update((len(batch_indices) + len(errors)) * world)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    bar.close()
    if world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    images, correct1, correctk, skipped = (int(c) for c in counts.tolist())
    seconds = float(elapsed)
    # Published numbers are for the published weights only (a finetune checkpoint has none).
    top1, top5 = (published.top1, published.top5) if published is not None else (None, None)
    precision, file = _what_ran(net, how.amp, how.checkpoint)
    return Report(args.model, len(classes), images, skipped, 100.0 * correct1 / max(images, 1),
                  100.0 * correctk / max(images, 1), correct1, correctk, top_k,
                  images / seconds if seconds else 0.0, seconds, world, top1, top5,
                  backend=getattr(net, "backend", backends.options_from_args(args)["backend"]), precision=precision,
                  file=file, file_sha256=_sha256(file) if file and rank == 0 else None)


def _device_type(device: str | None) -> str:
    """Where evaluate runs, for --amp's default dtype: a GPU under torchrun or when asked for."""
    if device is None:
        return "cuda" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _run(args) -> int:
    given = {name: getattr(args, name) for name in _OPTION_NAMES if hasattr(args, name)}  # the flags of the same name
    given.update(amp=amp_dtype(args.amp, args.amp_dtype, _device_type(args.device)), progress=not args.quiet,
                 **backends.options_from_args(args))  # (which checks them, and reads the backend of --model-file)
    report = evaluate(args.model, args.data, **given)
    if not dist.is_initialized() or dist.get_rank() == 0:
        if args.json:
            write_json(args.json, report.to_json())
        if args.json != "-":  # (with -, the JSON is the output)
            published = lambda value: f"   published {value}" if value is not None else ""  # noqa: E731
            print(report.header())
            print(f"  {report.images} images ({report.skipped} skipped) on {report.world_size} process(es), "
                  f"{report.images_per_s:.1f} images/s")
            print(f"  top-1 {report.top1:.3f} %  ({report.correct1}){published(report.published_top1)}")
            print(f"  top-{report.top_k} {report.topk:.3f} %  ({report.correctk})"
                  f"{published(report.published_top5) if report.top_k == 5 else ''}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if report.skipped:
        print(f"{report.skipped} unreadable image(s) were skipped", file=sys.stderr)
    return 1 if report.skipped else 0


def register(commands) -> None:
    sub = add_command(commands, "evaluate", _run, "top-1/top-5 on an ImageFolder tree (one folder per class); "
                      "under torchrun, spread over processes")
    sub.add_argument("--model", choices=api.list_models(), metavar="MODEL",
                     help="the model (not needed with a --checkpoint written by finetune)")
    sub.add_argument("--data", required=True, metavar="DIR", help="ImageFolder root: class folders of images")
    model_source_arguments(sub)
    sub.add_argument("--class-map", metavar="FILE", help="JSON object: class folder name -> class index")
    sub.add_argument("--batch-size", type=int_at_least(1), default=64, help="default: 64")
    sub.add_argument("--workers", type=int_at_least(0), default=min(4, os.cpu_count() or 1),
                     help="DataLoader worker processes per rank (default: up to 4)")
    sub.add_argument("--device", default=None, help="cpu (default), cuda (under torchrun: one GPU per rank), mps")
    sub.add_argument("--limit", type=int_at_least(1), default=None, help="only the first N images (sorted)")
    sub.add_argument("--fused", action="store_true", help="fold BatchNorm first (same accuracy, faster)")
    sub.add_argument("--channels-last", action="store_true", help="channels_last memory layout")
    amp_arguments(sub)
    json_argument(sub, "the report (rank 0)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")
    backends.add_arguments(sub)
