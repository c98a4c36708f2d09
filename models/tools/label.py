"""``python -m models label``: label a collection of images (a photo archive, a data set to
filter) into one JSON-lines file, in input order: on one process, or under ``torchrun`` on
several processes and nodes; killed at any moment, the same command finishes the run.

The inputs are listed once, when the run starts, into ``OUT.parts/`` (see ``_label_parts``); the
work is cut into batches of fixed inputs, and each rank appends the batches it labels to its own
part. A rerun labels only the batches no part holds whole, spread over however many processes it
has; at the end rank 0 merges the parts into ``OUT`` in input order and removes them.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import filelock
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import api
from .._hashing import sha256_file
from ..description import ModelDescription, describe
from ..download import is_url
from ..pretrained import categories_for, released_models, transforms_for
from . import _distributed, backends
from ._args import add_command, int_at_least, model_source_arguments
from ._images import ImageFiles, collate_images, expand_sources
from ._label_parts import LabelError, RunFolder, shard


@dataclass
class Summary:
    """What a ``label`` run left in ``out``, and what this run did of it."""

    out: pathlib.Path
    images: int  # lines in ``out``, one per input
    unreadable: int  # of them, error lines
    labelled: int  # by this run, over all its processes
    before: int  # by the earlier runs it resumed
    seconds: float
    world_size: int
    model: str
    digest: str  # of the model's description, on every line

    @property
    def images_per_s(self) -> float:
        return self.labelled / self.seconds if self.seconds else 0.0


def description_of(model) -> ModelDescription:
    """What ``model`` is: the description of the exported file a runner runs, else of the
    eager model (a compiled one: of the model it was compiled from)."""
    described = getattr(model, "description", None)
    return described if isinstance(described, ModelDescription) else describe(model)


def asked(sources: Sequence[str], from_list: str | os.PathLike | None, topk: int, batch_size: int,
          backend_options: dict | None, checkpoint_sha256: str | None) -> dict:
    """What a run is asked, as its record keeps it, save the model's own facts (``label`` adds
    those): all a resume must repeat. The backend, INT8 and precision are in it because the
    numbers of another runtime differ in the last digits; the checkpoint's SHA-256 because two
    fine-tunings of one model are described alike."""
    options = backend_options or {}
    return {"sources": [str(s) for s in sources], "from_list": str(from_list) if from_list else None,
            "cwd": os.getcwd(), "topk": topk, "batch_size": batch_size, "backend": options.get("backend", "eager"),
            "int8": bool(options.get("int8")), "precision": options.get("precision", "fp32"),
            "checkpoint_sha256": checkpoint_sha256}


def _model_facts(model) -> dict:
    described = description_of(model)
    facts = {"model": described.architecture, "model_digest": described.digest, "model_files_sha256": None}
    if isinstance(model, backends.Runner):  # (OpenVINO's weights are in the .bin beside the .xml)
        files = [model.path, model.path.with_suffix(".bin")] if model.path.suffix == ".xml" else [model.path]
        facts["model_files_sha256"] = [sha256_file(f) for f in files if f.is_file()]
    return facts


def _list_inputs(sources: Sequence[str], from_list: str | os.PathLike | None) -> list[str]:
    """The sources, then the lines of ``from_list`` (blank lines skipped), directories expanded."""
    listed = list(sources)
    if from_list is not None:
        with open(from_list, encoding="utf-8", errors="surrogateescape") as f:
            listed += [line.rstrip("\r\n") for line in f if line.strip()]
    return expand_sources(listed)


def _default_workers(total: int, batch_size: int) -> int:
    if total <= batch_size:
        return 0
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this node share its cores
    return min(4, max(1, (os.cpu_count() or 1) // per_node))


def _lock(path: pathlib.Path) -> filelock.FileLock:
    lock = filelock.FileLock(str(path) + ".lock", timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise LabelError(f"another label run is writing {path}: wait for it to end, or choose another --out") from None
    return lock


def _records(model, batches, inputs: list[str], digest: str, topk: int, rank: int):
    """(lines of one batch in input order, as bytes; images; unreadable) per batch."""
    categories = categories_for(model)
    device = backends.device_of(model)
    for indices, batch, errors in batches:
        records = {}
        for i, error in errors:  # tqdm.write: above the progress bar, not inside it
            tqdm.write(f"rank {rank}: {inputs[i]}: unreadable, {error}", file=sys.stderr)
            records[i] = {"index": i, "image": inputs[i], "error": error, "model_digest": digest}
        if batch is not None:
            with torch.inference_mode():
                probs = model(batch.to(device, non_blocking=True)).float().softmax(dim=-1)
            if probs.shape[-1] != len(categories):
                raise ValueError(f"the model returns {probs.shape[-1]} classes where its description names "
                                 f"{len(categories)}: the file and what was said of it disagree")
            values, classes = probs.topk(min(topk, probs.shape[-1]), dim=-1)
            for row, i in enumerate(indices):
                # Rounded as predict --json does: the same line whatever runs it again.
                top = [{"label": categories[c], "index": c, "probability": round(p, 6)}
                       for p, c in zip(values[row].tolist(), classes[row].tolist(), strict=True)]
                records[i] = {"index": i, "image": inputs[i], "top": top, "model_digest": digest}
        yield "".join(json.dumps(records[i]) + "\n" for i in sorted(records)).encode(), len(records), len(errors)


def label(model, sources: Sequence[str], out: str | os.PathLike, *, from_list: str | os.PathLike | None = None,
          topk: int = 5, batch_size: int = 32, workers: int | None = None, progress: bool = True,
          backend_options: dict | None = None, checkpoint_sha256: str | None = None) -> Summary:
    """Label the images of ``sources`` (files, directories searched recursively, URLs) and of
    the lines of ``from_list`` with ``model`` (built by this package, or a backend's runner):
    one JSON line per image in ``out``, in input order (``index``, ``image``, the top-``topk``
    ``label``/``index``/``probability``, or ``error`` for an unreadable image, and the
    ``model_digest``). Under torchrun, every rank calls it and labels its share; ``out`` must then
    be on a filesystem all nodes see. If ``OUT.parts/`` holds an unfinished run of the same
    request, it is finished (on any number of processes); one of another request is refused.
    ``backend_options`` (``backends.options_from_args``) and ``checkpoint_sha256`` are recorded
    and compared too (see ``asked``)."""
    world = _distributed.setup(backends.device_of(model), gpu_by_default=False)
    folder = RunFolder(out)
    description = description_of(model)
    request = {**asked(sources, from_list, topk, batch_size, backend_options, checkpoint_sha256),
               **_model_facts(model)}
    if world.main:
        folder.start(request, lambda: _list_inputs(sources, from_list))
    else:
        folder.wait_for([folder.run_file], "rank 0 to list the inputs")
    inputs = folder.inputs(folder.check(request))  # (every rank: a node that sees another folder stops here)
    total, count = len(inputs), (len(inputs) + batch_size - 1) // batch_size
    part, finished = folder.part(world.rank), folder.finished(world.rank)
    lock = _lock(part)  # (two runs on one --out would each label what the other has not written yet)
    try:
        done, ends = folder.done(batch_size, total)
        finished.unlink(missing_ok=True)  # (an earlier run's)
        world.barrier()  # every rank has read the parts before any rank writes to one
        with open(part, "ab") as f:
            f.truncate(ends.get(part, 0))  # a batch whose write a kill cut: labelled again, below
        mine = shard(count, done, world.rank, world.size)
        before = sum(min(batch_size, total - b * batch_size) for b in done)
        loader = DataLoader(ImageFiles(inputs, transforms_for(model)),
                            batch_sampler=[range(b * batch_size, min(total, (b + 1) * batch_size)) for b in mine],
                            num_workers=_default_workers(total, batch_size) if workers is None else workers,
                            collate_fn=collate_images, pin_memory=backends.device_of(model).type == "cuda")
        model.eval()
        bar = tqdm(total=total, initial=before, unit="img", file=sys.stderr, disable=not progress or not world.main)
        start = time.perf_counter()
        counts = torch.zeros(2, dtype=torch.float64)  # images labelled, of them unreadable
        with open(part, "ab") as f:
            for data, images, errors in _records(model, loader, inputs, description.digest, topk, world.rank):
                f.write(data)  # one write per batch, flushed: a kill leaves whole batches and at most one cut
                f.flush()
                counts += torch.tensor([images, errors], dtype=torch.float64)
                bar.update(min(images * world.size, total - bar.n))  # (rank 0's pace, for all ranks)
        finished.touch()
    finally:
        lock.release()
    folder.wait_for([folder.finished(r) for r in range(world.size)], "the other ranks to label their shares")
    labelled, unreadable = (int(c) for c in world.all_sum(counts).tolist())
    unreadable += sum(b.errors for b in done.values())
    seconds = time.perf_counter() - start
    bar.update(total - bar.n)
    bar.close()
    if world.main:  # (the others need not wait for it: nothing follows)
        folder.merge(batch_size, total)
    world.close()
    return Summary(folder.out, total, unreadable, labelled, before, seconds, world.size, description.architecture,
                   description.digest)


def _checkpoint_sha256(checkpoint: str | None) -> str | None:
    """The SHA-256 of a local --checkpoint (a URL's file is pinned by its URL and --checkpoint-sha256)."""
    return sha256_file(pathlib.Path(checkpoint)) if checkpoint and not is_url(checkpoint) else None


def _run(args) -> int:
    if not args.images and not args.from_list:
        raise SystemExit("error: label needs images, directories or URLs, or --from-list FILE")
    if not args.checkpoint and not args.model_file:
        args.model = args.model or "ghostnet_1x"
    options = backends.options_from_args(args)
    checkpoint_sha256 = _checkpoint_sha256(args.checkpoint)
    # A resume with other settings, or a finished --out, is refused before the model is loaded (or exported).
    RunFolder(args.out).precheck(asked(args.images, args.from_list, args.topk, args.batch_size, options,
                                       checkpoint_sha256))
    # Alone, on the CPU unless told; under torchrun, on this rank's GPU if there is one (a runtime: CPU).
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    world = _distributed.setup(args.device, gpu_by_default=several and options["backend"] in ("eager", "compile"))
    try:
        model = backends.model_from_args(args, device=world.device, progress=not args.quiet and world.main)
        summary = label(model, args.images, args.out, from_list=args.from_list, topk=args.topk,
                        batch_size=args.batch_size, workers=args.workers, progress=not args.quiet,
                        backend_options=options, checkpoint_sha256=checkpoint_sha256)
    finally:
        world.close()
    if world.main:
        print(f"{summary.out}: {summary.images} images, {summary.unreadable} unreadable (error lines), "
              f"{summary.model} {summary.digest}")
        print(f"{summary.labelled} labelled now on {summary.world_size} process(es) in {summary.seconds:.1f} s, "
              f"{summary.images_per_s:.1f} images/s" + (f"; {summary.before} done before" if summary.before else ""))
    # As predict and evaluate: the file is complete, the status says that some lines are errors.
    return 1 if summary.unreadable else 0


def register(commands) -> None:
    sub = add_command(commands, "label", _run,
                      "label a collection of images into one JSON-lines file, in input order; under torchrun, "
                      "spread over processes and nodes; killed, the same command finishes the run")
    sub.add_argument("images", nargs="*", metavar="IMAGE|DIR|URL",
                     help="image files, directories (searched recursively, sorted) or http(s) URLs")
    sub.add_argument("--from-list", metavar="FILE", help="a text file of image paths or URLs, one per line")
    sub.add_argument("--out", required=True, metavar="FILE.jsonl",
                     help="the results, one JSON line per image; its unfinished run is kept in FILE.jsonl.parts/")
    released = released_models()
    sub.add_argument("--model", default=None, metavar="{" + ",".join(released) + "}",
                     help="a model with published weights (default: ghostnet_1x); with --checkpoint, any of "
                          + ", ".join(api.list_models()))
    model_source_arguments(sub)
    sub.add_argument("--device", default=None, help="cpu (default), cuda (under torchrun: one GPU per rank), mps")
    sub.add_argument("--topk", type=int_at_least(1), default=5, help="classes per image (default: 5)")
    sub.add_argument("--batch-size", type=int_at_least(1), default=32,
                     help="images per forward pass, and per write of results (default: 32)")
    sub.add_argument("--workers", type=int_at_least(0), default=None,
                     help="DataLoader worker processes per rank (default: up to 4, the node's cores shared)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")
    backends.add_arguments(sub)
