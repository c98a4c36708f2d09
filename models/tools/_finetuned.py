"""What ``finetune`` writes: a checkpoint that is a state dict plus the model's description
(``models.description``: architecture, class names, preprocessing), its training arguments and,
in ``last.pth``, the state to resume from; in plain types only, so ``torch.load(weights_only=True)``
reads it and the library's ``get_model(name, checkpoint=FILE)`` / ``from_checkpoint(FILE)`` load it
with its class names (``model.pretrained_weights.meta["categories"]``) and preprocessing."""
from __future__ import annotations

import os
import pathlib
from typing import Any

import torch

FORMAT = "models.finetune/1"


def save_checkpoint(path: pathlib.Path, payload: dict[str, Any]) -> None:
    """Written beside, then renamed: a run killed while saving leaves the previous file whole."""
    partial = path.with_name(path.name + ".partial")
    torch.save({"format": FORMAT, **payload}, partial)
    os.replace(partial, path)
