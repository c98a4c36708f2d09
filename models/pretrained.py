"""torchvision's weights API over the published weights: one enum per model with released
weights (``TinyNet_A_Weights.IMAGENET1K_V1``, alias ``DEFAULT``), ``get_model_weights``,
``get_weight``, and what ``weights=`` accepts.

An enum member names a release; the files and checksums it fetches are looked up when they are
needed, in the manifest in use then ($GHOSTNET_HUB_MANIFEST, else the repository's), as
``pretrained=True`` always did. ``member.resolve(manifest)`` gives the ``Weights`` handle of
another manifest (the CLI's ``--manifest``); ``weights=`` takes that handle as well.
"""
from __future__ import annotations

import difflib
import enum
import hashlib
import math
import os
import pathlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._presets import classification_preset, imagenet_categories
from .manifest import DEFAULT_MANIFEST, MANIFEST_ENV, Manifest, load_manifest
from .weights import Weights, get_weights

__all__ = [
    "GhostNet_1X_Weights",
    "GhostNetV2_1X_Weights",
    "GhostNetV2_1_3X_Weights",
    "GhostNetV2_1_6X_Weights",
    "GhostNetV3_1X_Weights",
    "TinyNet_A_Weights",
    "TinyNet_B_Weights",
    "TinyNet_C_Weights",
    "TinyNet_D_Weights",
    "TinyNet_E_Weights",
    "WeightsEnum",
    "get_model_weights",
    "get_weight",
]


@dataclass(frozen=True)
class _Release:
    model: str
    tag: str = "IMAGENET1K_V1"


class WeightsEnum(enum.Enum):
    """The published weights of one model, in torchvision's shape: each member carries
    ``url``, ``transforms()``, ``meta`` and ``get_state_dict()``; ``DEFAULT`` is the best
    release. Members are hashable and compare by identity."""

    @property
    def model_name(self) -> str:
        return self.value.model

    def resolve(self, manifest: Manifest | str | os.PathLike[str] | None = None) -> Weights:
        """The ``Weights`` handle of this release in ``manifest`` (default: the one in use)."""
        return get_weights(self.value.model, _manifest_in_use() if manifest is None else manifest)

    @property
    def url(self) -> str:
        return self.resolve().url

    @property
    def meta(self) -> dict[str, Any]:
        return self.resolve().meta

    def transforms(self, *, crop_size: int | None = None, resize_size: int | None = None,
                   mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                   interpolation: Any = None, antialias: bool | None = True) -> nn.Module:
        """torchvision's ``ImageClassification`` preset of this release; each argument (as
        torchvision's presets take them) replaces the published recipe's value."""
        return self.resolve().transforms(crop_size=crop_size, resize_size=resize_size, mean=mean, std=std,
                                         interpolation=interpolation, antialias=antialias)

    def get_state_dict(self, progress: bool = True, map_location: torch.device | str = "cpu",
                       **fetch_options: Any) -> dict[str, torch.Tensor]:
        return self.resolve().get_state_dict(progress=progress, map_location=map_location, **fetch_options)

    @classmethod
    def verify(cls, obj: Any) -> WeightsEnum | None:
        """torchvision's ``verify``: ``None``, a member, its name, or "Enum.NAME" -> a member."""
        if obj is None or isinstance(obj, cls):
            return obj
        if isinstance(obj, str):
            name = obj.removeprefix(cls.__name__ + ".")
            if name in cls.__members__:
                return cls[name]
            raise ValueError(f"{obj!r} is not a member of {cls.__name__}; members: {', '.join(cls.__members__)}")
        raise TypeError(f"expected a {cls.__name__} member or its name, got {type(obj).__name__} {obj!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


# One per model with released weights, in registry order, each also named in __all__ above:
# static classes, so that type checkers and `from models import TinyNet_A_Weights` see them.
# The names follow torchvision's rule: the family, then the model's suffix upper-cased.
# tests/test_weights_enums.py checks them against the manifest and prints the class a
# released model lacks.
class GhostNet_1X_Weights(WeightsEnum):
    IMAGENET1K_V1 = _Release("ghostnet_1x")
    DEFAULT = IMAGENET1K_V1


class GhostNetV2_1X_Weights(WeightsEnum):
    IMAGENET1K_V1 = _Release("ghostnetv2_1x")
    DEFAULT = IMAGENET1K_V1


class GhostNetV2_1_3X_Weights(WeightsEnum):
    IMAGENET1K_V1 = _Release("ghostnetv2_1_3x")
    DEFAULT = IMAGENET1K_V1


class GhostNetV2_1_6X_Weights(WeightsEnum):
    IMAGENET1K_V1 = _Release("ghostnetv2_1_6x")
    DEFAULT = IMAGENET1K_V1


class GhostNetV3_1X_Weights(WeightsEnum):
    IMAGENET1K_V1 = _Release("ghostnetv3_1x")
    DEFAULT = IMAGENET1K_V1


class TinyNet_A_Weights(WeightsEnum):
    IMAGENET1K_V1 = _Release("tinynet_a")
    DEFAULT = IMAGENET1K_V1


class TinyNet_B_Weights(WeightsEnum):
    IMAGENET1K_V1 = _Release("tinynet_b")
    DEFAULT = IMAGENET1K_V1


class TinyNet_C_Weights(WeightsEnum):
    IMAGENET1K_V1 = _Release("tinynet_c")
    DEFAULT = IMAGENET1K_V1


class TinyNet_D_Weights(WeightsEnum):
    IMAGENET1K_V1 = _Release("tinynet_d")
    DEFAULT = IMAGENET1K_V1


class TinyNet_E_Weights(WeightsEnum):
    IMAGENET1K_V1 = _Release("tinynet_e")
    DEFAULT = IMAGENET1K_V1


# The manifest in use, parsed and validated once per content of its file: enum attributes are
# read often (url, meta, transforms), and $GHOSTNET_HUB_MANIFEST or the file may change between
# two reads. Keyed by the bytes' digest, not the mtime: a rewrite within one clock tick counts too.
_MANIFESTS: dict[tuple[str, bytes], Manifest] = {}


def _manifest_in_use() -> Manifest:
    path = pathlib.Path(os.environ.get(MANIFEST_ENV) or DEFAULT_MANIFEST)
    try:
        key = (str(path.resolve()), hashlib.sha256(path.read_bytes()).digest())
    except OSError:
        return load_manifest(path)  # its error names the file
    manifest = _MANIFESTS.get(key)
    if manifest is None:
        manifest = load_manifest(path)
        _MANIFESTS.clear()  # only the newest is worth keeping
        _MANIFESTS[key] = manifest
    return manifest


# Every enum class above, in the order they are defined: nothing to list twice.
_ENUMS: dict[str, type[WeightsEnum]] = {
    cls.DEFAULT.model_name: cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, WeightsEnum) and cls is not WeightsEnum
}
_BY_CLASS_NAME = {cls.__name__: cls for cls in _ENUMS.values()}
_VERSIONS = tuple(TinyNet_A_Weights.__members__)  # every model's: IMAGENET1K_V1 and its alias DEFAULT


def get_model_weights(name: str | Callable) -> type[WeightsEnum]:
    """torchvision's ``get_model_weights``: the weights enum of model ``name`` (or of its builder)."""
    name = getattr(name, "__name__", name)
    if name not in _ENUMS:
        raise ValueError(f"{name!r} has no released weights; models with weights: {', '.join(_ENUMS)}")
    return _ENUMS[name]


def get_weight(name: str) -> WeightsEnum:
    """torchvision's ``get_weight``: "TinyNet_A_Weights.IMAGENET1K_V1" -> that enum member."""
    if not isinstance(name, str):
        raise TypeError(f"get_weight takes a name such as 'TinyNet_A_Weights.IMAGENET1K_V1', got {name!r}")
    enum_name, _, member = name.partition(".")
    if enum_name not in _BY_CLASS_NAME or not member:
        raise ValueError(f"{name!r} names no weights; weights are named like 'TinyNet_A_Weights.IMAGENET1K_V1' "
                         f"(enums: {', '.join(_BY_CLASS_NAME)})")
    return _BY_CLASS_NAME[enum_name].verify(member)


def _checkpoint_hint(value: Any) -> str:
    return (f"weights= names published weights, as in torchvision ('DEFAULT', 'IMAGENET1K_V1', "
            f"TinyNet_A_Weights.DEFAULT or 'TinyNet_A_Weights.IMAGENET1K_V1'); for your own checkpoint file or URL "
            f"pass checkpoint={os.fspath(value)!r} instead")


def _version_like(text: str) -> bool:
    """Whether ``weights=text`` means a release (IMAGENET1K_V2, default, Keras' "imagenet"),
    not a file: one word, no such file, upper-case or close to a version's name."""
    return (re.fullmatch(r"\w+", text) is not None and not os.path.exists(text)
            and (text.isupper() or bool(difflib.get_close_matches(text.upper(), _VERSIONS, n=1))))


def resolve_weights(model: str, weights: Any) -> Weights | None:
    """What ``weights=`` names for ``model``, as a ``Weights`` handle (None for None).

    Never a file: a path or URL is an error that names ``checkpoint=``, whether or not such a
    file exists, so that one argument never means two things."""
    if weights is None:
        return None
    if isinstance(weights, Weights):
        handle = weights
    elif isinstance(weights, enum.Enum) and type(weights).__name__ in _BY_CLASS_NAME:
        # (also a member of another copy of this package: models, ghostnet_hub, torch.hub's)
        weights = _BY_CLASS_NAME[type(weights).__name__][weights.name]
        if weights.model_name != model:
            raise ValueError(f"{weights!r} are the weights of {weights.model_name}, not of {model}")
        handle = weights.resolve()
    elif isinstance(weights, os.PathLike):
        raise ValueError(f"weights={os.fspath(weights)!r} is a path: {_checkpoint_hint(weights)}")
    elif not isinstance(weights, str):
        raise TypeError(f"weights must be None, a weights enum member (e.g. TinyNet_A_Weights.DEFAULT), its name "
                        f"or a Weights handle, got {type(weights).__name__} {weights!r}")
    elif weights.partition(".")[0] in _BY_CLASS_NAME and "/" not in weights:
        return resolve_weights(model, get_weight(weights))
    elif weights in _VERSIONS:
        # The environment's manifest decides which models have weights, as for pretrained=True.
        handle = get_weights(model, _manifest_in_use())
    elif _version_like(weights):
        get_weights(model, _manifest_in_use())  # (a model without weights: that error)
        close = difflib.get_close_matches(weights.upper(), _VERSIONS, n=1)
        raise ValueError(f"weights={weights!r} is not the name of published weights of {model}"
                         + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; its versions: {', '.join(_VERSIONS)} (DEFAULT is the best, as in torchvision)")
    else:
        raise ValueError(f"weights={weights!r} is not the name of published weights of {model}: "
                         f"{_checkpoint_hint(weights)}")
    if handle.name != model:
        raise ValueError(f"the weights of {handle.name} cannot be loaded into {model}")
    return handle


def transforms_for(model: nn.Module) -> nn.Module:
    """The evaluation preprocessing of ``model``: its published weights' ``transforms()``,
    else the same preset built from its ``pretrained_cfg`` (e.g. a GhostNet 1.3x or a
    checkpoint of your own)."""
    weights = getattr(model, "pretrained_weights", None)
    if weights is not None:
        return weights.transforms()
    cfg = model.pretrained_cfg
    size = cfg["input_size"][-1]
    return classification_preset(crop_size=size, resize_size=math.floor(size / cfg["crop_pct"]),
                                 interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"])


def released_models() -> list[str]:
    """The models with published weights (those with an enum), in registry order."""
    return list(_ENUMS)


def categories_for(model: nn.Module) -> list[str]:
    """Class names of ``model``'s outputs: its published weights', the ImageNet-1k names for
    any 1000-class model, else "class 0", "class 1", ..."""
    weights = getattr(model, "pretrained_weights", None)
    if weights is not None:
        return weights.meta["categories"]
    if model.num_classes == 1000:
        return imagenet_categories()
    return [f"class {i}" for i in range(model.num_classes)]
