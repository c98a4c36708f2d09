"""The inner loops of ``finetune``: one training epoch (gradient accumulation, DDP's
``no_sync`` between micro-batches, autocast and gradient scaling), validation on this rank's
share of the images with the counts summed over the ranks, and the curves figure."""
from __future__ import annotations

import contextlib
import io
import math
import pathlib
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .._files import write_file
from ._distributed import World
from ._finetune_data import DataError, EpochSampler, Splits
from ._finetuned import TrainingDiverged

if TYPE_CHECKING:
    from .finetune import Recipe  # (finetune imports this module)


@dataclass
class Training:
    """What a run's epochs work with, built once (``_finetune_setup.prepare``), and how far the
    run is: the epochs done (``history``), the best so far, and the files reported unreadable."""

    recipe: Recipe
    world: World
    splits: Splits
    preprocessing: dict[str, Any]
    net: nn.Module  # what trains: the model, in DDP over several processes
    module: nn.Module  # the model itself
    source: str  # where its weights come from, for the run's first lines
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    dtype: str | None  # autocast's (None: none)
    autocast: torch.autocast
    micro: int  # images per micro-batch on each rank
    steps: int  # optimizer steps per epoch
    sampler: EpochSampler
    train_loader: DataLoader
    shard: list[tuple[str, int]]  # this rank's validation images: (path, class index)
    val_loader: DataLoader
    val_targets: torch.Tensor
    history: list[dict] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "val_top1": -1.0, "val_loss": math.inf})
    start: int = 0  # the epochs done before this command
    reported: set[str] = field(default_factory=set)  # unreadable files, each said once per run

    @property
    def out(self) -> pathlib.Path:
        return pathlib.Path(self.recipe.out)


def set_train(net: nn.Module, freeze: bool) -> None:
    net.train()
    if freeze:  # a linear probe: the backbone's BatchNorm statistics stay as they were
        for name, module in net.named_children():
            if name != "classifier":
                module.eval()


def plot_curves(records: list[dict], path: pathlib.Path) -> bool:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    loss, acc = fig.subplots(1, 2)
    loss.plot(epochs, [r["train_loss"] for r in records], "o-", label="train (label-smoothed)")
    loss.plot(epochs, [r["val_loss"] for r in records], "o-", label="val")
    acc.plot(epochs, [r["train_top1"] for r in records], "o-", label="train (augmented)")
    acc.plot(epochs, [r["val_top1"] for r in records], "o-", label="val")
    for ax, title in ((loss, "cross-entropy loss"), (acc, "top-1 accuracy (%)")):
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    write_file(path, image.getbuffer())  # as the checkpoints: room checked, no partial file left
    return True

def report_unreadable(errors, items, reported: set[str], world) -> None:
    """Each unreadable file once per run, not once per epoch."""
    for index, error in errors:
        path = items[index][0]
        if path not in reported:
            reported.add(path)
            print(f"rank {world.rank}: skipped {path}: {error}", file=sys.stderr)


def train_epoch(run: Training, epoch: int) -> dict:
    """Epoch ``epoch``'s optimizer steps; the loss and top-1 over all ranks, and the images used."""
    recipe, world, net, scaler = run.recipe, run.world, run.net, run.scaler
    set_train(run.module, recipe.freeze_backbone)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    accum, device = recipe.accum_steps, world.device
    sums = torch.zeros(5, dtype=torch.float64)  # loss x images, correct, images, skipped, lone images left out
    batches = iter(run.train_loader)
    bar = tqdm(total=run.steps, desc=f"epoch {epoch}/{recipe.epochs}", unit="step", file=sys.stderr, leave=False,
               disable=not (recipe.progress and world.main))
    for step in range(1, run.steps + 1):
        finite = True
        for micro in range(accum):
            _, images, targets, errors = next(batches)
            report_unreadable(errors, run.splits.train, run.reported, world)
            sums[3] += len(errors)
            if images is not None and len(images) == 1 and errors and not recipe.freeze_backbone:
                sums[4] += 1  # BatchNorm cannot train on a batch of one (it raises): left out
                images = None
            if images is None:
                if world.size > 1:
                    raise DataError(f"rank {world.rank}: every image of a batch was unreadable (or one was left); "
                                    "remove the broken files (listed above) and run again")
                continue
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            last = micro == accum - 1
            sync = net.no_sync() if isinstance(net, DistributedDataParallel) and not last else contextlib.nullcontext()
            with sync:
                with run.autocast:
                    logits = net(images)
                loss = criterion(logits.float(), targets)
                scaler.scale(loss / accum).backward()
            finite = finite and math.isfinite(loss.item())
            sums += torch.tensor([loss.item() * len(targets), (logits.argmax(1) == targets).sum().item(),
                                  len(targets), 0, 0], dtype=torch.float64)
        # A non-finite loss would make the weights NaN: stop before the step (all ranks agree). Under
        # float16 autocast the gradient scaler skips such a step itself and lowers its scale.
        if not scaler.is_enabled() and world.all_sum(torch.tensor([float(not finite)]))[0] > 0:
            raise TrainingDiverged(f"epoch {epoch}, step {step}: the training loss is not finite (NaN or infinity); "
                                   f"the run stopped before that step changed the weights. Lower --lr (now "
                                   f"{recipe.lr:g}) or lengthen --warmup-epochs")
        scaler.step(run.optimizer)
        scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        bar.set_postfix(loss=f"{sums[0] / max(sums[2], 1):.4f}", refresh=False)
        bar.update()
    bar.close()
    loss_sum, correct, images, skipped, alone = world.all_sum(sums).tolist()
    return {"train_loss": loss_sum / max(images, 1), "train_top1": 100.0 * correct / max(images, 1),
            "train_images": int(images), "train_skipped": int(skipped), "train_left_out": int(alone)}


def check_epoch(record: dict, limit: float) -> str:
    """After an epoch: stop the run if more than ``limit`` of its train or val images could not
    be read, or if its validation loss is not finite; else what the epoch's line should add."""
    notes = []
    for split, kind in (("train", "training"), ("val", "validation")):
        skipped, used = record.get(f"{split}_skipped", 0), record.get(f"{split}_images", 0)
        total = skipped + used + record.get(f"{split}_left_out", 0)
        share = skipped / max(total, 1)
        if share > limit:
            raise DataError(f"epoch {record['epoch']}: {skipped} of {total} {kind} images ({100 * share:.1f} %) could "
                            f"not be read (listed above), more than --max-skipped {limit:g}: fix or remove them, or "
                            "allow more with --max-skipped")
        if skipped:
            notes.append(f"skipped {skipped} of {total} {kind} images ({100 * share:.1f} %)")
    if record.get("train_left_out"):
        notes.append(f"{record['train_left_out']} lone image left out (a batch of one)")
    if not math.isfinite(record["val_loss"]):
        raise TrainingDiverged(f"epoch {record['epoch']}: the validation loss is not finite ({record['val_loss']}): "
                               "the model diverged, and is not written. Lower --lr or lengthen --warmup-epochs")
    return "".join(f"  {note}" for note in notes)


def validate(run: Training) -> dict:
    """The model (not its DDP wrapper) on this rank's validation images; loss and top-1 over all ranks."""
    net, world, targets = run.module, run.world, run.val_targets
    net.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss x images, correct, images, skipped
    with torch.inference_mode(), run.autocast:
        for indices, images, errors in run.val_loader:
            report_unreadable(errors, run.shard, run.reported, world)
            sums[3] += len(errors)
            if images is None:
                continue
            logits = net(images.to(world.device, non_blocking=True)).float().cpu()
            truth = targets[indices]
            loss = nn.functional.cross_entropy(logits, truth, reduction="sum")
            sums += torch.tensor([loss.item(), (logits.argmax(1) == truth).sum().item(), len(indices), 0],
                                 dtype=torch.float64)
    loss_sum, correct, images, skipped = world.all_sum(sums).tolist()
    if images == 0:
        raise DataError("no readable validation image")
    return {"val_loss": loss_sum / images, "val_top1": 100.0 * correct / images, "val_images": int(images),
            "val_skipped": int(skipped)}
