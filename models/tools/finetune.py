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
import math
import os
import pathlib
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .. import api
from .._files import probe_writable, write_file
from ..description import ModelDescription, describe, preprocessing_for
from ..weights import get_weights
from . import _distributed, _finetune_dist, _finetune_loop, _finetune_resume
from ._args import add_command, amp_arguments, amp_dtype, check_numbers, int_at_least, real_in
from ._finetune_data import (
    DataError,
    EpochSampler,
    TrainImages,
    check_readable,
    collate_train,
    find_splits,
    sample_seed,
    train_transform,
)
from ._finetuned import checkpoint_room, save_checkpoint
from ._images import ImageFiles, collate_images

# Every option, with its default: the one table the Python API and the command line share.
DEFAULTS: dict[str, Any] = {
    "epochs": 10, "batch_size": 32, "opt": "adamw", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0.05,
    "warmup_epochs": 1.0, "min_lr": 1e-6, "label_smoothing": 0.1, "input_size": None, "min_scale": 0.08, "hflip": 0.5,
    "amp": False, "amp_dtype": None, "accum_steps": 1, "drop_rate": None, "drop_path_rate": 0.0, "seed": 0,
    "val_split": None, "pretrained": True, "checkpoint": None, "freeze_backbone": False, "sync_bn": False,
    "workers": None, "device": None, "progress": True, "manifest": None, "max_skipped": 0.1,
}
# Each real option's range, checked when parsed and by finetune(): no NaN, infinity, lr 0, momentum 1.
_NUMBERS = {
    "lr": real_in(0, low_open=True), "momentum": real_in(0, 1, high_open=True), "weight_decay": real_in(0),
    "warmup_epochs": real_in(0), "min_lr": real_in(0), "label_smoothing": real_in(0, 1, high_open=True),
    "min_scale": real_in(0, 1, low_open=True), "hflip": real_in(0, 1), "drop_rate": real_in(0, 1, high_open=True),
    "drop_path_rate": real_in(0, 1, high_open=True), "val_split": real_in(0, 1, low_open=True, high_open=True),
    "max_skipped": real_in(0, 1),
}


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


def _configure(model, data, out, resume, why, options) -> tuple[dict, dict | None]:
    """The run's settings and the state it resumes from (None: a new run); on rank 0 alone."""
    given = {k: v for k, v in {"model": model, "data": data, **options}.items() if v is not None}
    if resume is None and (model is None or data is None or out is None):
        raise ValueError("finetune needs model, data and out (or resume=OUT to continue a run)")
    config, state = _finetune_resume.settle(DEFAULTS, given, out, resume, why)
    if config["model"] not in api.list_models():
        raise ValueError(f"unknown model {config['model']!r}; models: {', '.join(api.list_models())}")
    if config["checkpoint"] and not config["pretrained"]:
        raise ValueError("--checkpoint and --no-pretrained contradict each other: pass one")
    check_numbers(config, _NUMBERS)
    amp_dtype(config["amp"], config["amp_dtype"], "cpu")  # (checks the pair: the device is chosen later)
    probe_writable(config["out"], "Choose another --out")  # before training, not after an epoch
    config["data"] = str(config["data"])
    return _finetune_resume.as_saved(config), state


def _published(name: str, num_classes: int, manifest, **kwargs):
    """The one place that builds the published backbone with a new head."""
    if manifest is not None:
        return api.get_model(name, weights=get_weights(name, manifest), num_classes=num_classes, **kwargs)
    return api.get_model(name, pretrained=True, num_classes=num_classes, **kwargs)


def _start_model(cfg: dict, classes: list[str], world) -> tuple[nn.Module, str]:
    """The model to train and a sentence saying where its weights come from."""
    name, n = cfg["model"], len(classes)
    options = {"device": world.device, "progress": cfg["progress"] and world.main}
    if cfg["drop_rate"] is not None:
        options["drop_rate"] = cfg["drop_rate"]
    if cfg["drop_path_rate"]:
        if "drop_path_rate" not in api.get_variant(name).options:
            raise ValueError(f"--drop-path-rate: {name} has no stochastic depth (drop_path_rate) in this version "
                             "of the models; leave it at 0")
        options["drop_path_rate"] = cfg["drop_path_rate"]
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    if cfg["checkpoint"]:
        path = cfg["checkpoint"]
        net = api.from_checkpoint(path, model=name, **options)  # read once; a best.pth names its classes
        file_classes = net.pretrained_weights.classes
        same = file_classes == tuple(classes) or (net.num_classes == n and file_classes == _numbered(n))
        if not same:
            net.reset_classifier(n)
        return net, f"your checkpoint {path}" + ("" if same else f", new {n}-class head")
    if cfg["pretrained"]:
        if cfg["manifest"] is None and name not in api.list_models(pretrained=True):
            raise ValueError(f"{name} has no published weights to start from: train it from scratch with "
                             "--no-pretrained, or start from your own with --checkpoint FILE")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*classifier for num_classes=.* is new")
            net = _published(name, n, cfg["manifest"], **options)
        return net, f"the published {name} weights, new {n}-class head"
    return api.get_model(name, num_classes=n, **options), "random initialisation (--no-pretrained)"


def _numbered(n: int) -> tuple[str, ...]:
    """The class names of a checkpoint that names none."""
    return tuple(f"class {i}" for i in range(n))


def _optimizer(net: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim > 1]
    no_decay = [p for n, p in trainable if p.ndim <= 1]  # biases and norm weights, as timm
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg["opt"] == "sgd":  # torchvision's reference recipe: SGD with Nesterov momentum
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["momentum"] > 0)
    if cfg["opt"] != "adamw":
        raise ValueError(f"--opt must be adamw or sgd, got {cfg['opt']!r}")
    return torch.optim.AdamW(groups, lr=cfg["lr"])


def _schedule(cfg: dict, steps_per_epoch: int):
    total = cfg["epochs"] * steps_per_epoch
    warmup = min(total, round(cfg["warmup_epochs"] * steps_per_epoch))
    floor = min(1.0, cfg["min_lr"] / cfg["lr"])

    def factor(step: int) -> float:  # the learning rate of optimizer step ``step``, over lr
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _plain(state: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def finetune(model: str | None = None, data: str | pathlib.Path | None = None, out: str | pathlib.Path | None = None,
             *, resume: str | pathlib.Path | None = None, auto_resume: bool = False, **options: Any) -> FinetuneResult:
    """Fine-tune ``model`` on the ImageFolder tree ``data`` (``train/`` and ``val/``, or one
    folder with ``val_split=0.1``), writing into ``out``; ``resume=OUT`` continues a run, and
    ``auto_resume=True`` continues ``out``'s run if it holds this command's (as under
    ``torchrun --max-restarts``). ``options`` are ``DEFAULTS``' keys (``python -m models
    finetune --help`` explains each)."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"finetune() got unexpected option(s) {', '.join(unknown)}; options: {', '.join(DEFAULTS)}")
    if resume is not None and auto_resume:
        raise ValueError("resume=OUT and auto_resume contradict each other: pass one")
    world = _distributed.setup(options.get("device"))
    try:
        why = _finetune_resume.why_continue(auto_resume, world)
        # Rank 0 alone reads OUT: the other ranks' nodes need not have it.
        cfg, state = world.from_main(lambda: _configure(model, data, out, resume, why, options))
        return _run(cfg, state, world)
    finally:
        world.close()


def _say(world, *parts) -> None:
    if world.main:
        print(*parts, flush=True)


def _run(cfg: dict, state: dict | None, world) -> FinetuneResult:
    out = pathlib.Path(cfg["out"])
    splits = find_splits(cfg["data"], cfg["val_split"], cfg["seed"])
    if state is not None and splits.classes != state["classes"]:
        raise DataError(f"the classes in {cfg['data']} ({', '.join(splits.classes)}) are not those of the run being "
                        f"resumed ({', '.join(state['classes'])})")
    accum, size = cfg["accum_steps"], world.size
    if cfg["batch_size"] % (size * accum):
        raise ValueError(f"--batch-size {cfg['batch_size']} is the global batch: it must divide by the number of "
                         f"processes times --accum-steps ({size} x {accum})")
    micro = cfg["batch_size"] // (size * accum)
    if micro < 2 and not cfg["freeze_backbone"]:  # BatchNorm cannot train on one image
        raise ValueError(f"--batch-size {cfg['batch_size']} over {size} process(es) x {accum} accumulation step(s) "
                         "is 1 image per micro-batch: BatchNorm needs at least 2 images per micro-batch (or train "
                         "only the head with --freeze-backbone)")
    steps_per_epoch = len(splits.train) // size // micro // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(splits.train)} training images do not fill one batch of {cfg['batch_size']}: "
                         "lower --batch-size")
    check_readable(splits)
    pre = preprocessing_for(cfg["model"], cfg["input_size"])
    net, source = _start_model(cfg, splits.classes, world)
    if cfg["freeze_backbone"]:
        for name, param in net.named_parameters():
            param.requires_grad = name.startswith("classifier.")
    if cfg["sync_bn"] and size > 1:
        net = _finetune_dist.convert_sync_batchnorm(net, world.device)
    module = net
    if size > 1:
        net = DistributedDataParallel(net, device_ids=[world.device] if world.device.type == "cuda" else None)
    optimizer = _optimizer(module, cfg)
    # (rank 0 writes, and all ranks stop if it cannot: one rank stopping alone would leave the others waiting)
    world.from_main(lambda: checkpoint_room(out, module, 2 if cfg["opt"] == "adamw" else int(cfg["momentum"] > 0),
                                            state is not None))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, steps_per_epoch))
    dtype = amp_dtype(cfg["amp"], cfg["amp_dtype"], world.device.type)
    autocast = torch.autocast(world.device.type, dtype=getattr(torch, dtype or "bfloat16"), enabled=dtype is not None)
    scaler = torch.amp.GradScaler(world.device.type, enabled=dtype == "float16")
    history, best, start = [], {"epoch": 0, "val_top1": -1.0, "val_loss": math.inf}, 0
    if state is not None:
        module.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["resume"]["optimizer"])
        scheduler.load_state_dict(state["resume"]["scheduler"])
        scaler.load_state_dict(state["resume"]["scaler"])
        history, best, start = list(state["resume"]["history"]), dict(state["resume"]["best"]), int(state["epoch"])
        source = f"{out / 'last.pth'}, resuming after epoch {start} ({state['why']})"

    workers = cfg["workers"] if cfg["workers"] is not None else min(4, (os.cpu_count() or 1) // 2)
    sampler = EpochSampler(DistributedSampler(range(len(splits.train)), num_replicas=size, rank=world.rank,
                                              shuffle=True, seed=cfg["seed"], drop_last=True))
    train_set = TrainImages(splits.train, train_transform(pre["input_size"], pre["mean"], pre["std"],
                                                          pre["interpolation"], cfg["min_scale"], cfg["hflip"]),
                            cfg["seed"])
    # Their own generator: starting an epoch's loader must not draw from the global RNG (dropout's),
    # which it would do once per epoch without persistent workers and once per run with them.
    loader_options = {"num_workers": workers, "persistent_workers": workers > 0,
                      "pin_memory": world.device.type == "cuda", "generator": torch.Generator().manual_seed(0)}
    train_loader = DataLoader(train_set, batch_size=micro, sampler=sampler, drop_last=True,
                              collate_fn=collate_train, **loader_options)
    shard = splits.val[world.rank::size]  # each validation image on exactly one rank
    eval_transform = ModelDescription(cfg["model"], len(splits.classes), splits.classes, pre).transforms()
    val_loader = DataLoader(ImageFiles([p for p, _ in shard], eval_transform), batch_size=2 * micro,
                            collate_fn=collate_images, **loader_options)
    val_targets = torch.tensor([t for _, t in shard])

    if world.main:  # the others never touch OUT
        out.mkdir(parents=True, exist_ok=True)
    _say(world, f"finetune {cfg['model']}: {len(splits.classes)} classes ({', '.join(splits.classes[:8])}"
                f"{', ...' if len(splits.classes) > 8 else ''}), {len(splits.train)} train / {len(splits.val)} val "
                f"images from {splits.description}")
    _say(world, f"  from {source}; {size} process(es) on {world.device.type}, global batch {cfg['batch_size']} "
                f"({micro} per process x {accum} accumulation step(s)), {steps_per_epoch} steps per epoch"
                f"{', synchronised BatchNorm' if cfg['sync_bn'] and size > 1 else ''}"
                f"{', ' + dtype + ' autocast' if cfg['amp'] else ''}")
    architecture = {"name": cfg["model"], "num_classes": len(splits.classes)}
    architecture.update({k: cfg[k] for k in ("drop_rate", "drop_path_rate") if cfg[k]})
    reported: set[str] = set()
    for epoch in range(start + 1, cfg["epochs"] + 1):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        torch.manual_seed(sample_seed(cfg["seed"], epoch, -1 - world.rank))  # dropout: per epoch and rank
        train = _finetune_loop.train_epoch(net, train_loader, optimizer, scheduler, scaler, autocast, cfg, world,
                                           epoch, steps_per_epoch, splits.train, reported)
        val = _finetune_loop.validate(module, val_loader, val_targets, autocast, world, shard, reported)
        seconds = time.perf_counter() - started
        record = {"epoch": epoch, **train, **val, "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
                  "images_per_s": round(train["train_images"] / seconds, 2)}
        notes = _finetune_loop.check_epoch(record, cfg["max_skipped"])
        history.append(record)
        improved = (val["val_top1"], -val["val_loss"]) > (best["val_top1"], -best["val_loss"])
        if improved:
            best = {"epoch": epoch, "val_top1": val["val_top1"], "val_loss": val["val_loss"]}
        if world.main:
            described = describe(module, classes=splits.classes).with_(preprocessing=pre, weights="",
                                                                        weights_sha256=None)
            payload = {"state_dict": _plain(module.state_dict()), "description": described.to_dict(),
                       "classes": splits.classes, "preprocessing": pre, "architecture": architecture,
                       "args": cfg, "epoch": epoch, "val_top1": val["val_top1"], "metrics": record}
            if improved:
                save_checkpoint(out / "best.pth", payload)
            metrics = {"model": cfg["model"], "classes": splits.classes, "best_epoch": best["epoch"],
                       "best_val_top1": best["val_top1"], "epochs": history}
            write_file(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
            _finetune_loop.plot_curves(history, out / "curves.png")
            save_checkpoint(out / "last.pth", {**payload, "resume": {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "history": history, "best": best}})
        _say(world, f"epoch {epoch}/{cfg['epochs']}  train loss {train['train_loss']:.4f} top-1 "
                    f"{train['train_top1']:.2f} %  val loss {val['val_loss']:.4f} top-1 {val['val_top1']:.2f} %  "
                    f"lr {record['lr']:.2e}  {seconds:.1f} s ({record['images_per_s']:.0f} img/s)"
                    f"{'  * best' if improved else ''}{notes}")
        world.barrier()
    if world.main and not _finetune_loop.plot_curves(history, out / "curves.png"):
        print("curves.png not drawn: install matplotlib for it", file=sys.stderr)
    _say(world, f"best: epoch {best['epoch']}, val top-1 {best['val_top1']:.2f} % -> {out / 'best.pth'}")
    return FinetuneResult(out, splits.classes, best["epoch"], best["val_top1"], history)


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
