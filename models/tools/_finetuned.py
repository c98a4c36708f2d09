"""What ``finetune`` writes and what ``predict`` and ``evaluate`` read back: a checkpoint that is
a state dict plus the class names, the preprocessing, the architecture and the arguments, in
plain types only, so ``torch.load(weights_only=True)`` reads it and the library's
``get_model(name, checkpoint=FILE, num_classes=n)`` loads it (it unwraps ``state_dict``).

A model loaded from it carries a ``Finetuned`` as ``model.pretrained_weights``: the same
``transforms()`` and ``meta["categories"]`` that the published weights offer, so whatever
works with a pretrained model works with a fine-tuned one."""
from __future__ import annotations

import io
import os
import pathlib
import unicodedata
from dataclasses import dataclass
from typing import Any

import torch

from .. import api
from .._files import check_room, write_file
from ..download import is_url
from ..manifest import DEFAULT_MANIFEST, load_manifest
from ..weights import CheckpointError, read_state_dict

FORMAT = "models.finetune/1"
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def model_from_checkpoint(name: str, path: str | os.PathLike, num_classes: int, **kwargs: Any):
    """The one place that builds a model from a user's checkpoint file."""
    return api.get_model(name, checkpoint=path, num_classes=num_classes, **kwargs)


def preprocessing(name: str, input_size: int | None = None) -> dict[str, Any]:
    """The model's own evaluation preprocessing (resize, center crop, normalise), from the
    repository's manifest, scaled to ``input_size`` if given; for a model without released
    weights, the usual crop ratio 0.875, bilinear, ImageNet statistics."""
    manifest = load_manifest(DEFAULT_MANIFEST)
    if name in manifest.models:
        e = manifest[name]
        crop, resize, interpolation, mean, std = e.input_size, e.resize_size, e.interpolation, e.mean, e.std
    else:
        with torch.device("meta"):  # no memory, no init: only the attribute is wanted
            crop = api.get_variant(name).build().default_input_size[0]
        resize, interpolation, mean, std = round(crop / 0.875), "bilinear", _IMAGENET_MEAN, _IMAGENET_STD
    if input_size is not None and input_size != crop:
        resize, crop = round(input_size * resize / crop), input_size
    return {"input_size": int(crop), "resize_size": int(resize), "interpolation": interpolation,
            "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def eval_transform(pre: dict[str, Any]):
    """torchvision's ``ImageClassification`` preset for a ``preprocessing`` dict."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    return ImageClassification(crop_size=pre["input_size"], resize_size=pre["resize_size"], mean=pre["mean"],
                               std=pre["std"], interpolation=InterpolationMode(pre["interpolation"]))


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


@dataclass(frozen=True)
class Finetuned:
    """A checkpoint written by ``finetune``, shaped like ``Weights`` for the tools."""

    path: str
    name: str
    classes: list[str]
    preprocessing: dict[str, Any]
    architecture: dict[str, Any]
    epoch: int
    val_top1: float | None
    sha256: str | None = None  # what the file was checked against when read

    def transforms(self):
        return eval_transform(self.preprocessing)

    @property
    def meta(self) -> dict[str, Any]:
        size = self.preprocessing["input_size"]
        return {"categories": list(self.classes), "input_size": (size, size), "epoch": self.epoch,
                "metrics": {"val": {"acc@1": self.val_top1}}, "checkpoint": self.path}

    def check_model(self, model: str | None) -> str:
        if model is not None and model != self.name:
            raise ValueError(f"{self.path} holds a fine-tuned {self.name}, not a {model}: drop --model or make it "
                             f"{self.name}")
        return self.name

    def load(self, **kwargs: Any):
        """The model with these weights, in eval mode; ``kwargs`` go to ``get_model``
        (``device``, ``fuse``, ``channels_last``, ``progress``)."""
        options = {k: v for k, v in self.architecture.items() if k not in ("name", "num_classes")}
        model = model_from_checkpoint(self.name, self.path, len(self.classes), checkpoint_sha256=self.sha256,
                                      **options, **kwargs)
        model.pretrained_weights = self
        return model.eval()

    def class_indices(self, data: pathlib.Path) -> dict[str, int]:
        """Class folder -> output index, by the class names the model was trained on (both read
        as Unicode NFC: a folder spelled in NFD is the same class)."""
        folders = sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
        names = [class_name(c) for c in self.classes]
        unknown = [f for f in folders if class_name(f) not in names]
        if unknown or not folders:
            raise ValueError(f"class folder(s) of {data} unknown to {self.path}: {', '.join(unknown[:10]) or 'none'}; "
                             f"it was trained on: {', '.join(self.classes[:10])}")
        return {f: names.index(class_name(f)) for f in folders}


def read_finetuned(path: str | os.PathLike, sha256: str | None = None) -> Finetuned | None:
    """The ``Finetuned`` in ``path`` if ``finetune`` wrote it, else None (a plain state dict).
    With ``sha256`` the file must have it (checked before it is read, and again when loaded)."""
    source = os.fspath(path)
    if is_url(source) or not pathlib.Path(source).expanduser().is_file():
        return None
    obj = read_state_dict(pathlib.Path(source).expanduser(), sha256=sha256)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        return None
    return Finetuned(source, obj["architecture"]["name"], list(obj["classes"]), dict(obj["preprocessing"]),
                     dict(obj["architecture"]), int(obj["epoch"]), obj.get("val_top1"), sha256)


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
        ours = read_finetuned(best) if best.is_file() else None
    except (CheckpointError, OSError, ValueError, KeyError, TypeError):
        ours = None
    if ours is None:
        return f"There is no intact checkpoint in {out} to go on from: start a new run with another --out."
    score = f", val top-1 {ours.val_top1:.2f} %" if ours.val_top1 is not None else ""
    return (f"{best} (epoch {ours.epoch}{score}) is intact: it holds no optimizer state to continue this run "
            f"exactly, but a new run can start from its weights: python -m models finetune --model {ours.name} "
            f"--checkpoint {best} --data DATA --out NEW_OUT (and the run's other options)")
