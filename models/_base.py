"""The interface both model families share: argument checks, head, classifier, feature taps."""
from __future__ import annotations

import inspect
import itertools
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._timm_hooks import TimmHooks
from .layers import init_weights


class FeatureInfo(list):
    """One dict per feature tap: ``num_chs``, ``reduction`` (stride), ``module``, ``index``.

    The helpers return what a detection neck (e.g. torchvision's FPN) asks for.
    """

    def channels(self) -> list[int]:
        return [info["num_chs"] for info in self]

    def reduction(self) -> list[int]:
        return [info["reduction"] for info in self]

    def module_name(self) -> list[str]:
        return [info["module"] for info in self]


def check_int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass; num_classes=True is a mistake, not 1 class.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _check_rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


# ImageNet's mean and standard deviation, per RGB channel: what both families were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# "": no pooling (timm's), only without a classifier: forward_head returns the feature map.
_GLOBAL_POOLS = ("avg", "max", "")


def _shape_error(name: str, in_chans: int, shape: list[int]) -> str:
    # Plain string building: TorchScript compiles this too.
    hint = ""
    if len(shape) == 4:
        hint = "; build the model with in_chans=" + str(shape[1]) + " for such input"
    return (name + " expects a batch of images shaped (N, " + str(in_chans) + ", H, W), got ("
            + ", ".join([str(d) for d in shape]) + ")" + hint)


class ImageClassifier(TimmHooks, nn.Module):
    """Base of GhostNet and TinyNet: stem, ``blocks`` stages, a pooled head, a classifier.

    Subclasses build ``conv_stem``/``bn1``/``act1``, ``blocks`` (an ``nn.Sequential`` of
    stages), any modules named in ``_TAIL_NAMES`` (the end of ``forward_features``, run by
    ``_forward_tail``), and ``_pre_logits`` (pooling and head convolution, giving
    ``head_hidden_size`` values); then they call ``_finish_init``.

    ``forward`` compiles with ``torch.jit.script`` (unfused and fused): the flags it branches
    on are TorchScript constants, read when the model is scripted. timm's other hooks
    (``forward_intermediates``, ``group_matcher``, ...) come from ``TimmHooks``.
    """

    __constants__ = ["features_only", "channels_last", "global_pool"]
    __jit_unused_properties__ = ["default_cfg"]
    _STEM_NAMES = ("conv_stem", "bn1", "act1")
    _TAIL_NAMES: tuple[str, ...] = ()
    # Modules only the classification head uses, dropped in features_only mode.
    _HEAD_NAMES: tuple[str, ...] = ()
    # How images are resized for evaluation, for the recipe in ``pretrained_cfg``.
    _INTERPOLATION = "bicubic"

    def __init__(self, *, num_classes: int, in_chans: int, drop_rate: float, drop_path_rate: float):
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, 0)
        self.in_chans = check_int("in_chans", in_chans, 1)
        self.drop_rate = _check_rate("drop_rate", drop_rate)
        self.drop_path_rate = _check_rate("drop_path_rate", drop_path_rate)
        self.features_only = False
        self.fused = False  # set by fuse(): BatchNorm folded, eval-only
        self.channels_last = False
        self.grad_checkpointing = False
        self.global_pool = "avg"
        self.feature_info = FeatureInfo()
        self.num_features = 0
        self.head_hidden_size = 0
        self._type_name = type(self).__name__
        self._stem_tap = False
        self._tap_mask: list[bool] = []

    def _finish_init(self, features_only: bool, out_indices: Sequence[int]) -> None:
        if not isinstance(features_only, bool):
            raise TypeError(f"features_only must be True or False, got {features_only!r}")
        self.reset_classifier(self.num_classes)
        # timm's description of the input the model expects (timm.data.resolve_data_config reads
        # it); the builders put the published recipe of the named model here.
        self.pretrained_cfg = {
            "input_size": (self.in_chans, *self.default_input_size),
            "interpolation": self._INTERPOLATION,
            "crop_pct": 0.875,
            "crop_mode": "center",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "num_classes": self.num_classes,
            "first_conv": "conv_stem",
            "classifier": "classifier",
        }
        if features_only:
            self._keep_only_features(out_indices)
        elif tuple(out_indices) != tuple(range(len(self.feature_info))):
            raise ValueError("out_indices only applies with features_only=True")

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of ``pretrained_cfg``."""
        return self.pretrained_cfg

    # -- classification ---------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh one for ``num_classes`` (0: no classifier), as
        timm's ``reset_classifier``; ``global_pool`` ("avg", "max", or "" for no pooling, only
        with ``num_classes=0``: the head then returns the feature map) changes the pooling too.

        A new head (``num_classes`` > 0) is untrained, so the model goes to train mode, as the
        builders do for ``num_classes=N`` with weights: fine-tuning it right away updates
        BatchNorm too (call ``.eval()`` for inference). ``num_classes=0`` keeps the mode. The
        new layer takes ``head_hidden_size`` inputs (the pooled head width, 1280), on the
        device and dtype of the model. A fused model cannot train and refuses a new head.
        """
        if self.features_only:
            raise RuntimeError("a features_only model has no classifier to reset")
        num_classes = check_int("num_classes", num_classes, 0)
        if global_pool is not None and global_pool not in _GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {', '.join(map(repr, _GLOBAL_POOLS))}, got {global_pool!r}")
        if (self.global_pool if global_pool is None else global_pool) == "" and num_classes:
            raise ValueError("global_pool='' (no pooling) needs num_classes=0: a classifier takes pooled features")
        if num_classes and self.fused:
            raise RuntimeError(f"this {type(self).__name__} is fused for inference and cannot train a new head; "
                               "reset the classifier before fusing")
        if global_pool is not None:
            self.global_pool = global_pool
        if num_classes == 0:
            classifier: nn.Module = nn.Identity()
        else:
            ref = self.conv_stem.weight
            classifier = nn.Linear(self.head_hidden_size, num_classes, device=ref.device, dtype=ref.dtype)
            init_weights(classifier)
        self.classifier = classifier.train(self.training)
        self.num_classes = num_classes
        if num_classes:
            self.train()

    # -- training ---------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations in the backward pass instead of keeping them
        (non-reentrant ``torch.utils.checkpoint``), as timm's ``set_grad_checkpointing``: less
        memory for some more compute, the same gradients. (BatchNorm's running statistics
        see each batch twice while it is on: once more in the recomputation.)"""
        if not isinstance(enable, bool):
            raise TypeError(f"enable must be True or False, got {enable!r}")
        self.grad_checkpointing = enable

    # -- inference form ---------------------------------------------------------------
    def fuse(self, channels_last: bool = False) -> ImageClassifier:
        """Fold BatchNorm into the convolutions and use cheaper exact ops (see fuse.py), in
        place; optionally channels_last. The model is eval-only afterwards."""
        from .fuse import optimize_for_inference

        return optimize_for_inference(self, channels_last=channels_last)

    def train(self, mode: bool = True) -> ImageClassifier:
        if mode and self.fused:
            raise RuntimeError(
                f"this {type(self).__name__} is fused for inference (BatchNorm folded into the "
                "convolutions) and cannot be trained; build it again without fuse to train"
            )
        return super().train(mode)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """torch's ``load_state_dict``; a fused model first checks that the state dict fits
        (names, shapes, and fused: no BatchNorm statistics) and refuses it untouched if not."""
        if self.fused and isinstance(state_dict, Mapping):
            from .fuse import fused_state_dict_problem

            problem = fused_state_dict_problem(self, state_dict, strict)
            if problem:
                raise RuntimeError(problem)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- forward ----------------------------------------------------------------------
    def _stages(self) -> list[tuple[str, nn.Module]]:
        """The modules of ``forward_features`` in order, with their state-dict names."""
        names = [n for n in self._STEM_NAMES if n in self._modules]
        stages = [(n, self._modules[n]) for n in names]
        if "blocks" in self._modules:
            stages += [(f"blocks.{i}", stage) for i, stage in enumerate(self.blocks)]
        stages += [(n, self._modules[n]) for n in self._TAIL_NAMES if n in self._modules]
        return stages

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.size(1) != self.in_chans:
            raise ValueError(_shape_error(self._type_name, self.in_chans, x.size()))
        # Weights in channels_last want their input in that layout too.
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            for stage in self.blocks:
                x = checkpoint(stage, x, use_reentrant=False)
            return x
        return self.blocks(x)

    def _forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> last feature map (N, ``num_features``, H/32, W/32)."""
        if self.features_only:
            raise RuntimeError("a features_only model returns its feature maps from model(x)")
        x = self._prepare_input(x)
        x = self.act1(self.bn1(self.conv_stem(x)))
        return self._forward_tail(self._forward_blocks(x))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "max":
            return F.adaptive_max_pool2d(x, 1)
        if self.global_pool == "avg":
            return F.adaptive_avg_pool2d(x, 1)
        return x

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        # Without pooling the head returns the map as it is (timm's global_pool="").
        return x.flatten(1) if self.global_pool != "" else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits, or the pooled (N, ``head_hidden_size``) features."""
        x = self._pre_logits(x)
        if pre_logits:
            return x
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.classifier(x)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self._forward_taps(x)
        return self.forward_head(self.forward_features(x))

    # -- multi-scale features ---------------------------------------------------------
    def _keep_only_features(self, out_indices: Sequence[int]) -> None:
        """Turn the model into a backbone returning the maps at ``out_indices``.

        Modules after the last tap and the head are removed, so the state dict holds only
        what the features use (a subset of the classifier's keys, same names).
        """
        count = len(self.feature_info)
        if isinstance(out_indices, (str, bytes)) or not isinstance(out_indices, Iterable):
            raise TypeError(f"out_indices must be a sequence of ints, got {out_indices!r}")
        indices = []
        for i in out_indices:
            check_int("each of out_indices", i, -count)
            if i >= count:
                raise ValueError(f"out_indices {tuple(out_indices)}: {i} is out of range; taps are 0..{count - 1}")
            indices.append(i % count)
        if not indices or any(b <= a for a, b in itertools.pairwise(indices)):
            raise ValueError(f"out_indices must be non-empty and strictly increasing, got {tuple(out_indices)}")

        selected = FeatureInfo(dict(self.feature_info[i], index=i) for i in indices)
        names = [name for name, _ in self._stages()]
        last = names.index(selected[-1]["module"])
        for name in names[last + 1:] + list(self._HEAD_NAMES) + ["classifier"]:
            if name.startswith("blocks."):
                continue
            delattr(self, name)
        kept_blocks = [n for n in names[: last + 1] if n.startswith("blocks.")]
        if kept_blocks:
            self.blocks = self.blocks[: len(kept_blocks)]
        else:
            del self.blocks
        self.feature_info = selected
        self._tap_names = frozenset(selected.module_name())
        # The same taps as forward (and TorchScript) reads them: the stem, and a flag per stage.
        self._stem_tap = "conv_stem" in self._tap_names
        self._tap_mask = [f"blocks.{i}" in self._tap_names for i in range(len(kept_blocks))]
        self.features_only = True
        self.num_classes = 0

    def _forward_taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self._prepare_input(x)
        maps: list[torch.Tensor] = []
        x = self.conv_stem(x)
        if self._stem_tap:
            maps.append(x)
        # The modules after the last tap are gone (hasattr is resolved when scripting).
        if hasattr(self, "bn1"):
            x = self.bn1(x)
        if hasattr(self, "act1"):
            x = self.act1(x)
        if hasattr(self, "blocks"):
            for i, stage in enumerate(self.blocks):
                x = stage(x)
                if self._tap_mask[i]:
                    maps.append(x)
        return maps


@dataclass(frozen=True)
class Variant:
    """One named model of a family: its class and architecture arguments, and what the
    registry, the help text, the CLI, the benchmark and the README say about it. Each family
    module keeps one ``VARIANTS`` table of these; everything else derives from it.

    ``num_params`` and ``macs`` (multiply-accumulates for one image) are the model's published
    size, counted at ``input_size`` (its default input, square); GhostNetV3's are its deploy
    form's. A model with released weights records the same three in the weights manifest; tests
    check both against the code. ``timm_name`` is timm's name for the same architecture, or None
    where timm has none (the benchmark then measures no timm reference for it).
    """

    cls: type[ImageClassifier]
    args: Mapping[str, float]
    title: str
    timm_name: str | None = None
    _: KW_ONLY
    num_params: int
    macs: int
    input_size: int
    options: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        for name in ("num_params", "macs", "input_size"):
            check_int(name, getattr(self, name), 1)
        # The options a user may pass are the class's keyword-only parameters: one list,
        # read from the signature, so a new option cannot be forgotten in a second place.
        params = inspect.signature(self.cls).parameters.values()
        object.__setattr__(self, "options", tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY))

    def build(self, **options: Any) -> ImageClassifier:
        return self.cls(**self.args, **options)
