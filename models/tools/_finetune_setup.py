"""What a ``finetune`` run trains with, built once before its first epoch: the batch arithmetic
checked, the model (the published weights, a checkpoint, or random; frozen, synchronised, in
DDP), the optimizer and its schedule, autocast, the loaders, and, resumed, the state of
``last.pth`` loaded into them. The order of the work is the order of the random draws, which a
resumed run repeats to equal an uninterrupted one."""
from __future__ import annotations

import math
import os
import pathlib
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .. import api
from ..description import ModelDescription, preprocessing_for
from ..weights import get_weights
from . import _finetune_dist
from ._args import amp_dtype
from ._distributed import World
from ._finetune_data import (
    DataError,
    EpochSampler,
    Splits,
    TrainImages,
    check_readable,
    collate_train,
    find_splits,
    train_transform,
)
from ._finetune_loop import Training
from ._finetuned import checkpoint_room
from ._images import ImageFiles, collate_images

if TYPE_CHECKING:
    from .finetune import Recipe


def _published(name: str, num_classes: int, manifest, **kwargs):
    """The one place that builds the published backbone with a new head."""
    if manifest is not None:
        return api.get_model(name, weights=get_weights(name, manifest), num_classes=num_classes, **kwargs)
    return api.get_model(name, pretrained=True, num_classes=num_classes, **kwargs)


def _start_model(recipe: Recipe, classes: list[str], world: World) -> tuple[nn.Module, str]:
    """The model to train and a sentence saying where its weights come from."""
    name, n = recipe.model, len(classes)
    options = {"device": world.device, "progress": recipe.progress and world.main}
    if recipe.drop_rate is not None:
        options["drop_rate"] = recipe.drop_rate
    if recipe.drop_path_rate:
        if "drop_path_rate" not in api.get_variant(name).options:
            raise ValueError(f"--drop-path-rate: {name} has no stochastic depth (drop_path_rate) in this version "
                             "of the models; leave it at 0")
        options["drop_path_rate"] = recipe.drop_path_rate
    torch.manual_seed(recipe.seed)  # the same initial weights on every rank
    if recipe.checkpoint:
        path = recipe.checkpoint
        net = api.from_checkpoint(path, model=name, **options)  # read once; a best.pth names its classes
        file_classes = net.pretrained_weights.classes
        same = file_classes == tuple(classes) or (net.num_classes == n and file_classes == _numbered(n))
        if not same:
            net.reset_classifier(n)
        return net, f"your checkpoint {path}" + ("" if same else f", new {n}-class head")
    if recipe.pretrained:
        if recipe.manifest is None and name not in api.list_models(pretrained=True):
            raise ValueError(f"{name} has no published weights to start from: train it from scratch with "
                             "--no-pretrained, or start from your own with --checkpoint FILE")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*classifier for num_classes=.* is new")
            net = _published(name, n, recipe.manifest, **options)
        return net, f"the published {name} weights, new {n}-class head"
    return api.get_model(name, num_classes=n, **options), "random initialisation (--no-pretrained)"


def _numbered(n: int) -> tuple[str, ...]:
    """The class names of a checkpoint that names none."""
    return tuple(f"class {i}" for i in range(n))


def _optimizer(net: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim > 1]
    no_decay = [p for n, p in trainable if p.ndim <= 1]  # biases and norm weights, as timm
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if recipe.opt == "sgd":  # torchvision's reference recipe: SGD with Nesterov momentum
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0)
    return torch.optim.AdamW(groups, lr=recipe.lr)  # (Recipe checked that opt is one of the two)


def _schedule(recipe: Recipe, steps_per_epoch: int):
    total = recipe.epochs * steps_per_epoch
    warmup = min(total, round(recipe.warmup_epochs * steps_per_epoch))
    floor = min(1.0, recipe.min_lr / recipe.lr)

    def factor(step: int) -> float:  # the learning rate of optimizer step ``step``, over lr
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _batches(recipe: Recipe, images: int, size: int) -> tuple[int, int]:
    """(images per micro-batch on each rank, optimizer steps per epoch) of ``images`` training
    images over ``size`` processes, or the error saying why the batch does not divide."""
    batch, accum = recipe.batch_size, recipe.accum_steps
    if batch % (size * accum):
        raise ValueError(f"--batch-size {batch} is the global batch: it must divide by the number of "
                         f"processes times --accum-steps ({size} x {accum})")
    micro = batch // (size * accum)
    if micro < 2 and not recipe.freeze_backbone:  # BatchNorm cannot train on one image
        raise ValueError(f"--batch-size {batch} over {size} process(es) x {accum} accumulation step(s) "
                         "is 1 image per micro-batch: BatchNorm needs at least 2 images per micro-batch (or train "
                         "only the head with --freeze-backbone)")
    steps = images // size // micro // accum
    if steps == 0:
        raise ValueError(f"{images} training images do not fill one batch of {batch}: lower --batch-size")
    return micro, steps


def _model(recipe: Recipe, classes: list[str], world: World) -> tuple[nn.Module, nn.Module, str]:
    """(what trains: the model, wrapped in DDP over several processes; the model; where its
    weights come from)."""
    net, source = _start_model(recipe, classes, world)
    if recipe.freeze_backbone:
        for name, param in net.named_parameters():
            param.requires_grad = name.startswith("classifier.")
    if recipe.sync_bn and world.size > 1:
        net = _finetune_dist.convert_sync_batchnorm(net, world.device)
    module = net
    if world.size > 1:
        net = DistributedDataParallel(net, device_ids=[world.device] if world.device.type == "cuda" else None)
    return net, module, source


def _loaders(recipe: Recipe, splits: Splits, pre: dict, world: World, micro: int) -> dict[str, Any]:
    """The sampler, the training loader, and this rank's validation images, loader and targets."""
    workers = recipe.workers if recipe.workers is not None else min(4, (os.cpu_count() or 1) // 2)
    sampler = EpochSampler(DistributedSampler(range(len(splits.train)), num_replicas=world.size, rank=world.rank,
                                              shuffle=True, seed=recipe.seed, drop_last=True))
    train_set = TrainImages(splits.train, train_transform(pre["input_size"], pre["mean"], pre["std"],
                                                          pre["interpolation"], recipe.min_scale, recipe.hflip),
                            recipe.seed)
    # Their own generator: starting an epoch's loader must not draw from the global RNG (dropout's),
    # which it would do once per epoch without persistent workers and once per run with them.
    loader_options = {"num_workers": workers, "persistent_workers": workers > 0,
                      "pin_memory": world.device.type == "cuda", "generator": torch.Generator().manual_seed(0)}
    train_loader = DataLoader(train_set, batch_size=micro, sampler=sampler, drop_last=True,
                              collate_fn=collate_train, **loader_options)
    shard = splits.val[world.rank::world.size]  # each validation image on exactly one rank
    eval_transform = ModelDescription(recipe.model, len(splits.classes), splits.classes, pre).transforms()
    val_loader = DataLoader(ImageFiles([p for p, _ in shard], eval_transform), batch_size=2 * micro,
                            collate_fn=collate_images, **loader_options)
    return {"sampler": sampler, "train_loader": train_loader, "shard": shard, "val_loader": val_loader,
            "val_targets": torch.tensor([t for _, t in shard])}


def prepare(recipe: Recipe, state: dict | None, world: World) -> Training:
    """Everything a run trains with, checked and built in the order that makes every random draw
    the same in a resumed run as in an uninterrupted one; resumed, the state of ``last.pth``."""
    out = pathlib.Path(recipe.out)
    splits = find_splits(recipe.data, recipe.val_split, recipe.seed)
    if state is not None and splits.classes != state["classes"]:
        raise DataError(f"the classes in {recipe.data} ({', '.join(splits.classes)}) are not those of the run "
                        f"being resumed ({', '.join(state['classes'])})")
    micro, steps = _batches(recipe, len(splits.train), world.size)
    check_readable(splits)
    pre = preprocessing_for(recipe.model, recipe.input_size)
    net, module, source = _model(recipe, splits.classes, world)
    optimizer = _optimizer(module, recipe)
    # (rank 0 writes, and all ranks stop if it cannot: one rank stopping alone would leave the others waiting)
    moments = 2 if recipe.opt == "adamw" else int(recipe.momentum > 0)
    world.from_main(lambda: checkpoint_room(out, module, moments, state is not None))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(recipe, steps))
    dtype = amp_dtype(recipe.amp, recipe.amp_dtype, world.device.type)
    autocast = torch.autocast(world.device.type, dtype=getattr(torch, dtype or "bfloat16"), enabled=dtype is not None)
    scaler = torch.amp.GradScaler(world.device.type, enabled=dtype == "float16")
    progress = {}
    if state is not None:
        module.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["resume"]["optimizer"])
        scheduler.load_state_dict(state["resume"]["scheduler"])
        scaler.load_state_dict(state["resume"]["scaler"])
        start = int(state["epoch"])
        progress = {"history": list(state["resume"]["history"]), "best": dict(state["resume"]["best"]),
                    "start": start}
        source = f"{out / 'last.pth'}, resuming after epoch {start} ({state['why']})"
    return Training(recipe, world, splits, pre, net, module, source, optimizer, scheduler, scaler, dtype, autocast,
                    micro, steps, **_loaders(recipe, splits, pre, world, micro), **progress)
