"""``python -m models finetune`` and ``finetune()``: fine-tune a model on an ImageFolder tree, in
one process or many (``torchrun ... -m models finetune``: DDP, ``--batch-size`` is the global
batch), resumable, writing ``best.pth``, ``last.pth``, ``metrics.json`` and ``curves.png``.

The recipe is timm's and torchvision's references scaled to small datasets: AdamW (no weight
decay on biases and norms), linear warmup then cosine per step, label smoothing,
RandomResizedCrop + flip at the model's input size, the model's own eval preprocessing for
validation, optional autocast, gradient accumulation and synchronised BatchNorm.

Every random draw is a function of ``--seed``, the epoch and the rank (the sampler's
permutation, each image's augmentation, dropout), so resuming at an epoch restores the random
state exactly, and a run's augmentation does not depend on the number of processes or workers.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch

from .. import api
from .._files import probe_writable, write_file
from ..description import describe
from . import _distributed, _finetune_loop, _finetune_resume, _finetune_setup
from ._args import add_command, amp_arguments, amp_dtype, check_numbers, int_at_least, real_in
from ._distributed import World
from ._finetune_data import sample_seed
from ._finetune_loop import Training
from ._finetuned import save_checkpoint


def _option(default: Any, check: Callable[[Any], float]) -> Any:
    """A real option's default and its range (a parser the command line uses too)."""
    return field(default=default, metadata={"range": check})


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A fine-tuning run's settings: ``finetune()``'s keyword options (``batch_size`` is the
    command's ``--batch-size``; ``python -m models finetune --help`` explains each), then the
    model, the data and the run's folder (the order ``last.pth`` has always kept them in). Each
    real option is checked against its range when a recipe is made: no NaN, infinity, lr 0 or
    momentum 1 reaches a run. ``last.pth`` keeps a recipe as a plain dict under ``"args"``
    (``saved()``), so that runs written before it was a class resume as they did."""

    epochs: int = 10
    batch_size: int = 32  # the global batch per optimizer step: over all processes and accumulation steps
    opt: str = "adamw"  # or "sgd" (Nesterov momentum)
    lr: float = _option(1e-3, real_in(0, low_open=True))
    momentum: float = _option(0.9, real_in(0, 1, high_open=True))
    weight_decay: float = _option(0.05, real_in(0))  # not on biases and norms
    warmup_epochs: float = _option(1.0, real_in(0))
    min_lr: float = _option(1e-6, real_in(0))
    label_smoothing: float = _option(0.1, real_in(0, 1, high_open=True))
    input_size: int | None = None  # None: the model's own
    min_scale: float = _option(0.08, real_in(0, 1, low_open=True))
    hflip: float = _option(0.5, real_in(0, 1))
    amp: bool = False
    amp_dtype: str | None = None  # None: the device's half precision
    accum_steps: int = 1
    drop_rate: float | None = _option(None, real_in(0, 1, high_open=True))  # None: the model's
    drop_path_rate: float = _option(0.0, real_in(0, 1, high_open=True))
    seed: int = 0
    val_split: float | None = _option(None, real_in(0, 1, low_open=True, high_open=True))
    pretrained: bool = True
    checkpoint: str | None = None
    freeze_backbone: bool = False
    sync_bn: bool = False
    workers: int | None = None  # None: half the CPUs, at most 4
    device: str | None = None
    progress: bool = True
    manifest: str | None = None
    max_skipped: float = _option(0.1, real_in(0, 1))
    model: str
    data: str
    out: str  # the run's folder

    def __post_init__(self) -> None:
        if self.model not in api.list_models():
            raise ValueError(f"unknown model {self.model!r}; models: {', '.join(api.list_models())}")
        if self.checkpoint and not self.pretrained:
            raise ValueError("--checkpoint and --no-pretrained contradict each other: pass one")
        numbers = {name: getattr(self, name) for name in _NUMBERS}
        check_numbers(numbers, _NUMBERS)
        for name, value in numbers.items():  # (a frozen dataclass: as its __init__ sets them)
            object.__setattr__(self, name, value)
        if self.opt not in ("adamw", "sgd"):
            raise ValueError(f"--opt must be adamw or sgd, got {self.opt!r}")
        amp_dtype(self.amp, self.amp_dtype, "cpu")  # (checks the pair: the device is chosen later)

    @classmethod
    def from_saved(cls, settings: dict[str, Any]) -> Recipe:
        """The recipe of settings as ``last.pth`` keeps them (a key no option has any more is left out)."""
        return cls(**{k: v for k, v in _finetune_resume.as_saved(settings).items() if k in _FIELDS})

    def saved(self) -> dict[str, Any]:
        """The settings as ``last.pth`` keeps them: a plain dict."""
        return asdict(self)


_FIELDS = [f.name for f in fields(Recipe)]
# Every option with its default (the fields before model, data and out), and each real option's range.
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Recipe) if f.default is not MISSING}
_NUMBERS: dict[str, Callable[[Any], float]] = {f.name: f.metadata["range"] for f in fields(Recipe)
                                               if "range" in f.metadata}


@dataclass
class FinetuneResult:
    out: pathlib.Path
    classes: list[str]
    best_epoch: int
    best_val_top1: float
    epochs: list[dict] = field(repr=False)

    @property
    def best(self) -> pathlib.Path:
        return self.out / "best.pth"

    @property
    def last(self) -> pathlib.Path:
        return self.out / "last.pth"


def _configure(model, data, out, resume, why, options) -> tuple[Recipe, dict | None]:
    """The run's recipe and the state it resumes from (None: a new run); on rank 0 alone."""
    given = {k: v for k, v in {"model": model, "data": data, **options}.items() if v is not None}
    if resume is None and (model is None or data is None or out is None):
        raise ValueError("finetune needs model, data and out (or resume=OUT to continue a run)")
    config, state = _finetune_resume.settle(DEFAULTS, given, out, resume, why)
    recipe = Recipe.from_saved(config)  # (checks the options)
    probe_writable(recipe.out, "Choose another --out")  # before training, not after an epoch
    return recipe, state


def _plain(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def finetune(model: str | None = None, data: str | pathlib.Path | None = None, out: str | pathlib.Path | None = None,
             *, resume: str | pathlib.Path | None = None, auto_resume: bool = False, **options: Any) -> FinetuneResult:
    """Fine-tune ``model`` on the ImageFolder tree ``data`` (``train/`` and ``val/``, or one
    folder with ``val_split=0.1``), writing into ``out``; ``resume=OUT`` continues a run, and
    ``auto_resume=True`` continues ``out``'s run if it holds this command's (as under
    ``torchrun --max-restarts``). ``options`` are ``Recipe``'s fields but model, data and out (``DEFAULTS``'
    keys; ``python -m models finetune --help`` explains each)."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"finetune() got unexpected option(s) {', '.join(unknown)}; options: {', '.join(DEFAULTS)}")
    if resume is not None and auto_resume:
        raise ValueError("resume=OUT and auto_resume contradict each other: pass one")
    world = _distributed.setup(options.get("device"))
    try:
        why = _finetune_resume.why_continue(auto_resume, world)
        # Rank 0 alone reads OUT: the other ranks' nodes need not have it.
        recipe, state = world.from_main(lambda: _configure(model, data, out, resume, why, options))
        return _run(recipe, state, world)
    finally:
        world.close()


def _say(world, *parts) -> None:
    if world.main:
        print(*parts, flush=True)


def _write_epoch(run: Training, record: dict, improved: bool) -> None:
    """On rank 0: best.pth (when the epoch improved on it), metrics.json, curves.png, last.pth."""
    recipe, module, classes, pre = run.recipe, run.module, run.splits.classes, run.preprocessing
    architecture = {"name": recipe.model, "num_classes": len(classes)}
    architecture.update({k: getattr(recipe, k) for k in ("drop_rate", "drop_path_rate") if getattr(recipe, k)})
    described = describe(module, classes=classes).with_(preprocessing=pre, weights="", weights_sha256=None)
    payload = {"state_dict": _plain(module.state_dict()), "description": described.to_dict(), "classes": classes,
               "preprocessing": pre, "architecture": architecture, "args": recipe.saved(), "epoch": record["epoch"],
               "val_top1": record["val_top1"], "metrics": record}
    if improved:
        save_checkpoint(run.out / "best.pth", payload)
    metrics = {"model": recipe.model, "classes": classes, "best_epoch": run.best["epoch"],
               "best_val_top1": run.best["val_top1"], "epochs": run.history}
    write_file(run.out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    _finetune_loop.plot_curves(run.history, run.out / "curves.png")
    save_checkpoint(run.out / "last.pth", {**payload, "resume": {
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(), "history": run.history, "best": run.best}})


def _epoch(run: Training, epoch: int) -> None:
    """Train and validate epoch ``epoch``, write its files and say its line."""
    recipe, world = run.recipe, run.world
    started = time.perf_counter()
    run.sampler.set_epoch(epoch)
    torch.manual_seed(sample_seed(recipe.seed, epoch, -1 - world.rank))  # dropout: per epoch and rank
    train = _finetune_loop.train_epoch(run, epoch)
    val = _finetune_loop.validate(run)
    seconds = time.perf_counter() - started
    record = {"epoch": epoch, **train, **val, "lr": run.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
              "images_per_s": round(train["train_images"] / seconds, 2)}
    notes = _finetune_loop.check_epoch(record, recipe.max_skipped)
    run.history.append(record)
    improved = (val["val_top1"], -val["val_loss"]) > (run.best["val_top1"], -run.best["val_loss"])
    if improved:
        run.best = {"epoch": epoch, "val_top1": val["val_top1"], "val_loss": val["val_loss"]}
    if world.main:
        _write_epoch(run, record, improved)
    _say(world, f"epoch {epoch}/{recipe.epochs}  train loss {train['train_loss']:.4f} top-1 "
                f"{train['train_top1']:.2f} %  val loss {val['val_loss']:.4f} top-1 {val['val_top1']:.2f} %  "
                f"lr {record['lr']:.2e}  {seconds:.1f} s ({record['images_per_s']:.0f} img/s)"
                f"{'  * best' if improved else ''}{notes}")
    world.barrier()


def _run(recipe: Recipe, state: dict | None, world: World) -> FinetuneResult:
    run = _finetune_setup.prepare(recipe, state, world)
    splits, size, out = run.splits, world.size, run.out
    if world.main:  # the others never touch OUT
        out.mkdir(parents=True, exist_ok=True)
    _say(world, f"finetune {recipe.model}: {len(splits.classes)} classes ({', '.join(splits.classes[:8])}"
                f"{', ...' if len(splits.classes) > 8 else ''}), {len(splits.train)} train / {len(splits.val)} val "
                f"images from {splits.description}")
    _say(world, f"  from {run.source}; {size} process(es) on {world.device.type}, global batch {recipe.batch_size} "
                f"({run.micro} per process x {recipe.accum_steps} accumulation step(s)), {run.steps} steps per epoch"
                f"{', synchronised BatchNorm' if recipe.sync_bn and size > 1 else ''}"
                f"{', ' + run.dtype + ' autocast' if recipe.amp else ''}")
    for epoch in range(run.start + 1, recipe.epochs + 1):
        _epoch(run, epoch)
    if world.main and not _finetune_loop.plot_curves(run.history, out / "curves.png"):
        print("curves.png not drawn: install matplotlib for it", file=sys.stderr)
    best = run.best
    _say(world, f"best: epoch {best['epoch']}, val top-1 {best['val_top1']:.2f} % -> {out / 'best.pth'}")
    return FinetuneResult(out, splits.classes, best["epoch"], best["val_top1"], run.history)


def _command(args) -> int:
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    if given.pop("quiet", False):
        given["progress"] = False
    try:
        result = finetune(**given)
    except (FileNotFoundError, TypeError) as exc:
        raise SystemExit(f"error: {exc}") from None
    last = result.epochs[-1] if result.epochs else {}
    skipped = last.get("train_skipped", 0) + last.get("val_skipped", 0)
    if skipped:
        print(f"{skipped} unreadable image(s) were skipped (listed above)", file=sys.stderr)
    return 0


def register(commands) -> None:
    sub = add_command(commands, "finetune", _command,
                      "fine-tune a model on your images (ImageFolder: DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg); "
                      "under torchrun, DDP over the processes")
    sub.argument_default = argparse.SUPPRESS  # only what is given reaches finetune(), whose DEFAULTS apply
    d, n = DEFAULTS, _NUMBERS
    add = sub.add_argument
    add("--model", metavar="MODEL", choices=api.list_models(), help="the model to fine-tune, e.g. tinynet_e")
    add("--data", metavar="DIR", help="DIR/train and DIR/val, one folder per class (or one such folder with "
                                      "--val-split)")
    add("--out", metavar="OUT", help="where best.pth, last.pth, metrics.json and curves.png go")
    again = sub.add_mutually_exclusive_group().add_argument
    again("--resume", metavar="OUT", help="continue the run in OUT exactly where its last epoch ended")
    again("--auto-resume", action="store_true", help="if --out holds this command's run, continue it (else start "
          "it): for a scheduler that relaunches the command; automatic under torchrun --max-restarts")
    add("--epochs", type=int_at_least(1), help=f"default: {d['epochs']}")
    add("--batch-size", type=int_at_least(1), help=f"global batch per optimizer step, over all processes and "
                                                    f"accumulation steps (default: {d['batch_size']})")
    add("--opt", choices=("adamw", "sgd"), help=f"optimizer (default: {d['opt']}; sgd has Nesterov momentum)")
    add("--lr", type=n["lr"], help=f"peak learning rate (default: {d['lr']})")
    add("--momentum", type=n["momentum"], help=f"SGD momentum (default: {d['momentum']})")
    add("--weight-decay", type=n["weight_decay"], help=f"weight decay, not on biases and norms (default: "
                                                        f"{d['weight_decay']})")
    add("--warmup-epochs", type=n["warmup_epochs"], help=f"linear warmup, then cosine decay per step "
                                                          f"(default: {d['warmup_epochs']})")
    add("--min-lr", type=n["min_lr"], help=f"learning rate at the end of the cosine (default: {d['min_lr']})")
    add("--label-smoothing", type=n["label_smoothing"], help=f"default: {d['label_smoothing']}")
    add("--input-size", type=int_at_least(32), help="training and eval crop (default: the model's own)")
    add("--min-scale", type=n["min_scale"], help=f"RandomResizedCrop's smallest area fraction (default: "
                                                  f"{d['min_scale']})")
    add("--hflip", type=n["hflip"], help=f"horizontal flip probability (default: {d['hflip']})")
    amp_arguments(sub)  # (float16 trains with gradient scaling)
    add("--accum-steps", type=int_at_least(1), help="micro-batches accumulated per optimizer step (default: 1)")
    add("--drop-rate", type=n["drop_rate"], help="dropout before the classifier (default: the model's, 0.2)")
    add("--drop-path-rate", type=n["drop_path_rate"], help="stochastic depth, for models that have it (default: 0)")
    add("--seed", type=int, help=f"seeds the initialisation, the sampler, every augmentation and dropout "
                                 f"(default: {d['seed']})")
    add("--val-split", type=n["val_split"], metavar="FRACTION",
        help="hold out this fraction of each class of DIR (seeded, stratified) when DIR has no train/ and val/")
    add("--no-pretrained", dest="pretrained", action="store_false", help="train from scratch (default: start "
                                                                          "from the published weights)")
    add("--checkpoint", metavar="FILE", help="start from your own checkpoint (a state dict, or a best.pth)")
    add("--freeze-backbone", action="store_true", help="train only the new head (a linear probe)")
    add("--sync-bn", action="store_true", help="under torchrun: BatchNorm statistics over the global batch")
    add("--workers", type=int_at_least(0), help="DataLoader worker processes per rank (default: half the CPUs, "
                                                     "at most 4)")
    add("--device", help="cpu, cuda, cuda:1, mps (default: this rank's GPU if there is one, else cpu)")
    add("--max-skipped", type=n["max_skipped"], metavar="FRACTION", help="stop when more than this share of an "
        f"epoch's train or val images cannot be read (default: {d['max_skipped']})")
    add("--quiet", action="store_true", help="no progress bars")
