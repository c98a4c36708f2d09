"""The inner loops of ``finetune``: one training epoch (gradient accumulation, DDP's
``no_sync`` between micro-batches, autocast and gradient scaling), validation on this rank's
share of the images with the counts summed over the ranks, and the curves figure."""
from __future__ import annotations

import contextlib
import io
import math
import pathlib
import sys

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .._files import write_file
from ._finetune_data import DataError
from ._finetuned import TrainingDiverged


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


def train_epoch(net, loader, optimizer, scheduler, scaler, autocast, cfg, world, epoch, steps, items,
                 reported) -> dict:
    set_train(net.module if isinstance(net, DistributedDataParallel) else net, cfg["freeze_backbone"])
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])
    accum, device = cfg["accum_steps"], world.device
    sums = torch.zeros(5, dtype=torch.float64)  # loss x images, correct, images, skipped, lone images left out
    batches = iter(loader)
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg['epochs']}", unit="step", file=sys.stderr, leave=False,
               disable=not (cfg["progress"] and world.main))
    for step in range(1, steps + 1):
        finite = True
        for micro in range(accum):
            _, images, targets, errors = next(batches)
            report_unreadable(errors, items, reported, world)
            sums[3] += len(errors)
            if images is not None and len(images) == 1 and errors and not cfg["freeze_backbone"]:
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
                with autocast:
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
                                   f"{cfg['lr']:g}) or lengthen --warmup-epochs")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
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


def validate(net, loader, targets, autocast, world, shard, reported) -> dict:
    net.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss x images, correct, images, skipped
    with torch.inference_mode(), autocast:
        for indices, images, errors in loader:
            report_unreadable(errors, shard, reported, world)
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
