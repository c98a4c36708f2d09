"""What ``finetune`` writes: a checkpoint that is a state dict plus the model's description
(``models.description``: architecture, class names, preprocessing), its training arguments and,
in ``last.pth``, the state to resume from; in plain types only, so ``torch.load(weights_only=True)``
reads it and the library's ``get_model(name, checkpoint=FILE)`` / ``from_checkpoint(FILE)`` load it
with its class names (``model.pretrained_weights.meta["categories"]``) and preprocessing. Written
as the weights cache writes (free space first, no partial file left), never with weights that are
not finite; read back for ``--resume`` with one clear error for a damaged file."""
from __future__ import annotations

import io
import pathlib
import unicodedata
from typing import Any

import torch

from .. import _commands
from .._files import check_room, write_file
from ..description import description_in_checkpoint
from ..weights import CheckpointError, read_state_dict

FORMAT = "models.finetune/1"


def class_name(folder: str) -> str:
    """A class folder's name as its class name: in Unicode NFC, so that ``café`` written by
    macOS (NFD) and by Linux or Windows (NFC) is one class."""
    return unicodedata.normalize("NFC", folder)


class TrainingDiverged(ValueError):
    """The loss or the weights stopped being finite numbers: the run cannot go on."""


def save_checkpoint(path: pathlib.Path, payload: dict[str, Any]) -> None:
    """Serialized in memory, then written as the weights cache writes (``_files.write_file``):
    free space checked first, written beside and renamed, so a run killed while saving leaves
    the previous file whole, and a full disk or read-only folder is one error naming the
    folder, the bytes needed and free, with no partial file left. Weights that are not finite
    are never written."""
    broken = [k for k, v in payload["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise TrainingDiverged(f"the model's weights are not finite ({len(broken)} tensor(s), e.g. {broken[0]}); "
                               f"{path} was not written. Lower --lr, or lengthen --warmup-epochs")
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    last = path.parent / "last.pth"
    hint = (f"The previous {path.name} is whole: free space there and continue with --resume {path.parent}"
            if last.is_file() else "Free space there, or choose another --out, and run again")
    write_file(path, buffer.getbuffer(), hint)


def checkpoint_room(out: pathlib.Path, model: torch.nn.Module, moments: int, resumed: bool) -> None:
    """Before training: refuse a folder without room for the checkpoints an epoch writes, at
    least (the weights, and in last.pth ``moments`` optimizer tensors per trainable one)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    last = weights + moments * trainable
    needed, name = (last, "last.pth") if resumed else (weights + last, "best.pth and last.pth")
    check_room(out / "last.pth", needed, "Checked before training: free space there, or choose another --out",
               at_least=True, name=name)


def resume_state(last: pathlib.Path) -> dict:
    """What ``last`` holds to continue its run, read safely (no code runs, nothing is written);
    a damaged or foreign file is one error saying what is wrong and how to go on."""
    try:
        state = read_state_dict(last)
        wrong = None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            wrong = f"it was not written by finetune (it has no {FORMAT!r} format mark)"
        elif not (isinstance(state.get("args"), dict) and isinstance(state.get("resume"), dict)
                  and {"optimizer", "scheduler", "scaler", "history", "best"} <= set(state["resume"])
                  and isinstance(state.get("state_dict"), dict) and isinstance(state.get("epoch"), int)):
            wrong = "it lacks the training state a resume needs (args, optimizer, scheduler, history)"
    except (CheckpointError, OSError) as exc:
        wrong = str(exc)
    if wrong is None:
        return state
    raise ValueError(f"cannot resume from {last}: {wrong}. {_fallback(last.parent)}")


def _fallback(out: pathlib.Path) -> str:
    """How to go on when last.pth cannot continue a run: from best.pth if it is intact."""
    best = out / "best.pth"
    try:
        state = read_state_dict(best) if best.is_file() else None
        described = description_in_checkpoint(state, str(best)) if isinstance(state, dict) else None
    except (CheckpointError, OSError, ValueError, KeyError, TypeError):
        state, described = None, None
    if described is None:
        return f"There is no intact checkpoint in {out} to go on from: start a new run with another --out."
    score = f", val top-1 {state['val_top1']:.2f} %" if isinstance(state.get("val_top1"), float) else ""
    return (f"{best} (epoch {state.get('epoch')}{score}) is intact: it holds no optimizer state to continue this "
            f"run exactly, but a new run can start from its weights: {_commands.command('finetune')} --checkpoint "
            f"{best} --data DATA --out NEW_OUT (and the run's other options)")
