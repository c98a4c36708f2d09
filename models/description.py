"""What a model IS, as one object that travels with every file the project writes.

A ``ModelDescription`` names the architecture and its options, the class names, the evaluation
preprocessing, the weights it was loaded from, the precision of an export and the package
version. ``describe(model)`` makes one from a built model; ``finetune`` writes it into its
checkpoints, ``export`` into every file (ONNX ``metadata_props``, the ExecuTorch program's
constant method, the pt2 archive's extra file), and every entry point reads it back: whoever
holds the file needs no flag to say what the model is, and a flag that contradicts the file is
an error naming both.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ._base import IMAGENET_MEAN, IMAGENET_STD
from ._presets import classification_preset, imagenet_categories
from ._registry import get_variant
from ._version import __version__
from .manifest import default_manifest

__all__ = ["DESCRIPTION_KEY", "DescriptionError", "ModelDescription", "describe", "description_in_checkpoint",
           "preprocessing_for"]

FORMAT = "ghostnet_hub.description/1"
# The name under which files carry it: ONNX metadata key, pt2 extra file, ExecuTorch method.
DESCRIPTION_KEY = "ghostnet_hub_description"
PRECISIONS = ("fp32", "bf16", "int8", "int8-float-depthwise")
# Build options a description records beside num_classes (the builders' model options that
# change what the weights mean or how the model trains; features_only models are not described).
_OPTIONS = ("in_chans", "drop_rate", "drop_path_rate")
_PREPROCESSING_KEYS = ("input_size", "resize_size", "interpolation", "mean", "std")


class DescriptionError(ValueError):
    """A description that is malformed, or that contradicts what the caller said."""


def preprocessing_for(name: str, input_size: int | None = None) -> dict[str, Any]:
    """The evaluation preprocessing of model ``name``: its published recipe (the repository's
    manifest), else its family's (the class's interpolation, crop ratio 0.875, ImageNet
    statistics); scaled to ``input_size`` if given. The one place this is decided."""
    manifest = default_manifest()
    if name in manifest.models:
        e = manifest[name]
        crop, resize, interpolation, mean, std = e.input_size, e.resize_size, e.interpolation, e.mean, e.std
    else:
        with torch.device("meta"):  # no memory, no init: only the class attributes are wanted
            model = get_variant(name).build()
        crop = model.default_input_size[0]
        resize, interpolation, mean, std = math.floor(crop / 0.875), model._INTERPOLATION, IMAGENET_MEAN, IMAGENET_STD
    if input_size is not None and input_size != crop:
        resize, crop = round(input_size * resize / crop), input_size
    return {"input_size": int(crop), "resize_size": int(resize), "interpolation": str(interpolation),
            "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


@dataclass(frozen=True)
class ModelDescription:
    """What a model is: enough to rebuild it, feed it and name its outputs.

    It offers what published weights offer (``transforms()``, ``meta["categories"]``), so a
    model loaded from a described file carries it as ``model.pretrained_weights``."""

    architecture: str
    num_classes: int
    classes: tuple[str, ...]
    preprocessing: Mapping[str, Any]
    options: Mapping[str, Any] = field(default_factory=dict)
    weights: str = ""  # what the parameters were loaded from, in words (weights name, file)
    weights_sha256: str | None = None  # that file's SHA-256, where known
    precision: str = "fp32"  # of an exported file: fp32, bf16 (OpenVINO), int8, int8-float-depthwise
    version: str = ""

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))
        if len(self.classes) != self.num_classes:
            raise DescriptionError(f"a description of {self.num_classes} classes lists {len(self.classes)} names")
        if self.precision not in PRECISIONS:
            raise DescriptionError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")

    # -- as published weights -------------------------------------------------------------
    def transforms(self, antialias: bool = True) -> nn.Module:
        """torchvision's ``ImageClassification`` preset with this model's preprocessing."""
        p = self.preprocessing
        return classification_preset(crop_size=p["input_size"], resize_size=p["resize_size"],
                                     interpolation=p["interpolation"], mean=tuple(p["mean"]), std=tuple(p["std"]))

    @property
    def meta(self) -> dict[str, Any]:
        size = self.preprocessing["input_size"]
        return {"categories": list(self.classes), "input_size": (size, size), "weights": self.weights,
                "weights_sha256": self.weights_sha256, "precision": self.precision}

    @property
    def precision_text(self) -> str:
        return {"fp32": "fp32", "bf16": "bfloat16", "int8": "INT8",
                "int8-float-depthwise": "INT8, depthwise convolutions in float"}[self.precision]

    def summary(self) -> str:
        shown = ", ".join(self.classes[:5]) + (", ..." if self.num_classes > 5 else "")
        return f"{self.architecture}, {self.num_classes} classes ({shown})"

    # -- checks ---------------------------------------------------------------------------
    def check(self, source: str, *, model: str | None = None, num_classes: int | None = None) -> None:
        """Raise if what the caller says (``model``, ``num_classes``) contradicts this
        description of ``source``, naming both."""
        if model is not None and model != self.architecture:
            raise DescriptionError(f"{source} holds a {self.architecture}, not a {model}: drop the model name "
                                   f"(the file names its own) or make it {self.architecture}")
        if num_classes is not None and num_classes != self.num_classes:
            raise DescriptionError(f"{source} holds a {self.num_classes}-class {self.architecture} "
                                   f"({', '.join(self.classes[:5])}{', ...' if self.num_classes > 5 else ''}), "
                                   f"not {num_classes} classes: drop the class count (the file names its own)")

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(classes=list(self.classes), preprocessing=dict(self.preprocessing), options=dict(self.options))
        return {"format": FORMAT, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

    @property
    def digest(self) -> str:
        """A short stable id of this description (SHA-256 of its JSON, 16 hex digits)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def with_(self, **changes: Any) -> ModelDescription:
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Any, source: str = "the description") -> ModelDescription:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise DescriptionError(f"{source}: not a model description of this package ({FORMAT}), found {found!r}")
        try:
            pre = {k: data["preprocessing"][k] for k in _PREPROCESSING_KEYS}
            return cls(architecture=str(data["architecture"]), num_classes=int(data["num_classes"]),
                       classes=tuple(str(c) for c in data["classes"]), preprocessing=pre,
                       options=dict(data.get("options") or {}), weights=str(data.get("weights") or ""),
                       weights_sha256=data.get("weights_sha256"), precision=str(data.get("precision", "fp32")),
                       version=str(data.get("version", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise DescriptionError(f"{source}: malformed model description ({type(exc).__name__}: {exc})") from None

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "the description") -> ModelDescription:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DescriptionError(f"{source}: model description is not JSON ({exc})") from None
        return cls.from_dict(data, source)


def _generic_classes(n: int) -> tuple[str, ...]:
    return tuple(f"class {i}" for i in range(n))


def describe(model: nn.Module, *, classes: Sequence[str] | None = None, precision: str = "fp32") -> ModelDescription:
    """The description of a model built by this package (a builder, ``get_model``, a
    checkpoint): what it was built as, its class names (``classes`` overrides them, e.g.
    after ``reset_classifier``), its preprocessing and the weights it came from."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise DescriptionError(f"this {type(model).__name__} was not built by a builder of this package "
                               "(models.get_model, models.tinynet_a, ...): it has no architecture name to record")
    if getattr(model, "features_only", False):
        raise DescriptionError("a features_only model returns feature maps, not classes: nothing to describe")
    n = int(model.num_classes)
    source = getattr(model, "pretrained_weights", None)
    weights, sha256, known = "", None, None
    if isinstance(source, ModelDescription):
        weights, sha256, known, pre = source.weights, source.weights_sha256, source.classes, source.preprocessing
    else:
        pre = preprocessing_for(name)
        if hasattr(source, "provenance"):  # published weights (``weights.Weights``, which reads descriptions)
            weights, sha256 = source.provenance()
            known = tuple(imagenet_categories())
    if classes is not None:
        known = tuple(str(c) for c in classes)
        if len(known) != n:
            raise DescriptionError(f"{len(known)} class names given for a {n}-class model")
    if known is None or len(known) != n:
        known = tuple(imagenet_categories()) if n == 1000 else _generic_classes(n)
    options = {k: getattr(model, k) for k in _OPTIONS if hasattr(model, k)}
    return ModelDescription(architecture=name, num_classes=n, classes=known, preprocessing=dict(pre),
                            options=options, weights=weights, weights_sha256=sha256, precision=precision,
                            version=__version__)


# The checkpoints ``finetune`` wrote before descriptions existed: the same facts, other keys.
_LEGACY_FINETUNE = "models.finetune/1"


def description_in_checkpoint(obj: Any, source: str) -> ModelDescription | None:
    """The description a checkpoint carries (``obj["description"]``, or the facts of an older
    ``finetune`` checkpoint), else None (a plain state dict, or a training script's own)."""
    if not isinstance(obj, Mapping):
        return None
    if "description" in obj and isinstance(obj["description"], Mapping) and "format" in obj["description"]:
        return ModelDescription.from_dict(obj["description"], source)
    if obj.get("format") == _LEGACY_FINETUNE:
        try:
            arch, classes = dict(obj["architecture"]), [str(c) for c in obj["classes"]]
            options = {k: arch[k] for k in _OPTIONS if k in arch}
            return ModelDescription(architecture=str(arch["name"]), num_classes=len(classes), classes=tuple(classes),
                                    preprocessing={k: obj["preprocessing"][k] for k in _PREPROCESSING_KEYS},
                                    options=options)
        except (KeyError, TypeError, ValueError) as exc:
            raise DescriptionError(f"{source}: malformed finetune checkpoint ({type(exc).__name__}: {exc})") from None
    return None
