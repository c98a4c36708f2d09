"""TinyNet A-E (Han et al., "Model Rubik's Cube: Twisting Resolution, Depth and Width for
TinyNets", NeurIPS 2020): EfficientNet-B0 shrunk by a resolution, width and depth factor.

Module and parameter names follow the authors' released checkpoints, so they load with
``strict=True`` and no renaming.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._base import FeatureInfo, ImageClassifier, Variant, check_positive_float
from .layers import SqueezeExcite, drop_path, drop_path_rates, init_weights, make_divisible

__all__ = ["VARIANTS", "TinyNet"]

# EfficientNet-B0 stages: (depthwise-separable?, repeats, kernel, stride, expansion, out channels)
_STAGES = (
    (True, 1, 3, 1, 1, 16),
    (False, 2, 3, 2, 6, 24),
    (False, 2, 5, 2, 6, 40),
    (False, 3, 3, 2, 6, 80),
    (False, 3, 5, 1, 6, 112),
    (False, 4, 5, 2, 6, 192),
    (False, 1, 3, 1, 6, 320),
)
_SE_RATIO = 0.25
_STEM_CHANNELS = 32  # not width-scaled
_HEAD_CHANNELS = 1280  # not width-scaled
_DIVISOR = 8


def _act() -> nn.Module:
    return nn.SiLU(inplace=True)


class DepthwiseSeparable(nn.Module):
    """Depthwise conv -> BN -> SiLU -> SE -> pointwise conv -> BN (-> drop path, + identity)."""

    _FUSE = (("conv_dw", "bn1"), ("conv_pw", "bn2"))  # see fuse.py

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, drop_path_rate: float = 0.0):
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_dw = nn.Conv2d(in_chs, in_chs, kernel, stride, kernel // 2, groups=in_chs, bias=False)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = _act()
        self.se = SqueezeExcite(in_chs, round(in_chs * _SE_RATIO), _act, nn.Sigmoid)
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.drop_path = drop_path(drop_path_rate if self.has_skip else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(self.act1(self.bn1(self.conv_dw(x))))
        out = self.bn2(self.conv_pw(out))
        return self.drop_path(out) + x if self.has_skip else out


class InvertedResidual(nn.Module):
    """1x1 expand -> BN -> SiLU -> depthwise -> BN -> SiLU -> SE -> 1x1 project -> BN (-> drop path, + identity)."""

    _FUSE = (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, expansion: int,
                 drop_path_rate: float = 0.0):
        super().__init__()
        mid_chs = in_chs * expansion
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.act1 = _act()
        self.conv_dw = nn.Conv2d(mid_chs, mid_chs, kernel, stride, kernel // 2, groups=mid_chs, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.act2 = _act()
        # The SE bottleneck is sized from the block's input, not its expanded width.
        self.se = SqueezeExcite(mid_chs, round(in_chs * _SE_RATIO), _act, nn.Sigmoid)
        self.conv_pwl = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.drop_path = drop_path(drop_path_rate if self.has_skip else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv_pw(x)))
        out = self.se(self.act2(self.bn2(self.conv_dw(out))))
        out = self.bn3(self.conv_pwl(out))
        return self.drop_path(out) + x if self.has_skip else out


class TinyNet(ImageClassifier):
    """EfficientNet-B0 scaled by TinyNet's (resolution, width, depth) factors.

    Args:
        resolution: input size factor; ``default_input_size`` is ``int(224 * resolution)``.
            The network itself takes any input size.
        width: channel multiplier; stage channels are ``make_divisible(c * width, 8)``,
            the 32-channel stem and 1280-channel head stay as they are.
        depth: block-count multiplier; each stage keeps ``max(1, round(repeats * depth))``.
        num_classes: classifier outputs; 0 removes the classifier and the model returns the
            pooled 1280-d features.
        in_chans: input channels (1 for grayscale, 4 for RGBA, ...).
        drop_rate: dropout before the classifier (0.2 in the paper).
        drop_path_rate: stochastic depth of the residual blocks, rising linearly from 0 at the
            first block to this at the last, as EfficientNet's (0: none, as at inference).
        features_only: return a list of feature maps (strides 2, 4, 8, 16, 32) instead of
            logits: the output of the last stage at each stride, as timm taps them.
            ``feature_info`` describes them.
        out_indices: which of the five taps to return with ``features_only``.
    """

    _TAIL_NAMES = ("conv_head", "bn2", "act2")
    _FUSE = (("conv_stem", "bn1"), ("conv_head", "bn2"))

    def __init__(
        self,
        resolution: float = 1.0,
        width: float = 1.0,
        depth: float = 1.0,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.0,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3, 4),
    ):
        super().__init__(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                         drop_path_rate=drop_path_rate)
        self.resolution = check_positive_float("resolution", resolution)
        self.width = check_positive_float("width", width)
        self.depth = check_positive_float("depth", depth)
        size = int(224 * self.resolution)
        self.default_input_size = (size, size)

        self.conv_stem = nn.Conv2d(self.in_chans, _STEM_CHANNELS, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHANNELS)
        self.act1 = _act()

        stages: list[nn.Module] = []
        in_chs, reduction = _STEM_CHANNELS, 2
        taps: dict[int, dict] = {}
        counts = [max(1, round(stage[1] * self.depth)) for stage in _STAGES]
        rates = iter(drop_path_rates(self.drop_path_rate, sum(counts)))
        for stage_index, (separable, _, kernel, stride, expansion, out) in enumerate(_STAGES):
            out_chs = make_divisible(out * self.width, _DIVISOR)
            layers = []
            for i in range(counts[stage_index]):
                block_stride = stride if i == 0 else 1
                if separable:
                    layers.append(DepthwiseSeparable(in_chs, out_chs, kernel, block_stride, next(rates)))
                else:
                    layers.append(InvertedResidual(in_chs, out_chs, kernel, block_stride, expansion, next(rates)))
                in_chs = out_chs
            stages.append(nn.Sequential(*layers))
            reduction *= stride
            # The last stage at each stride is that stride's tap.
            taps[reduction] = dict(num_chs=out_chs, reduction=reduction, module=f"blocks.{stage_index}")
        self.blocks = nn.Sequential(*stages)
        self.feature_info = FeatureInfo(taps.values())

        self.conv_head = nn.Conv2d(in_chs, _HEAD_CHANNELS, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(_HEAD_CHANNELS)
        self.act2 = _act()
        self.num_features = self.head_hidden_size = _HEAD_CHANNELS

        init_weights(self)
        self._finish_init(features_only, out_indices)

    def _forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.bn2(self.conv_head(x)))

    def _pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._flatten(self._pool(x))


# The published models: the paper's (resolution, width, depth) factors, and their size at
# int(224 * resolution). One row per model, as in every family table; see CONTRIBUTING.md.
VARIANTS = {
    "tinynet_a": Variant(TinyNet, {"resolution": 0.86, "width": 1.0, "depth": 1.2},
                         "TinyNet-A (Han et al., NeurIPS 2020): EfficientNet-B0 scaled by r=0.86, w=1.0, d=1.2",
                         "tinynet_a", num_params=6_187_972, macs=336_867_712, input_size=192),
    "tinynet_b": Variant(TinyNet, {"resolution": 0.84, "width": 0.75, "depth": 1.1},
                         "TinyNet-B (Han et al., NeurIPS 2020): EfficientNet-B0 scaled by r=0.84, w=0.75, d=1.1",
                         "tinynet_b", num_params=3_730_562, macs=200_709_360, input_size=188),
    "tinynet_c": Variant(TinyNet, {"resolution": 0.825, "width": 0.54, "depth": 0.85},
                         "TinyNet-C (Han et al., NeurIPS 2020): EfficientNet-B0 scaled by r=0.825, w=0.54, d=0.85",
                         "tinynet_c", num_params=2_457_234, macs=99_536_432, input_size=184),
    "tinynet_d": Variant(TinyNet, {"resolution": 0.68, "width": 0.54, "depth": 0.695},
                         "TinyNet-D (Han et al., NeurIPS 2020): EfficientNet-B0 scaled by r=0.68, w=0.54, d=0.695",
                         "tinynet_d", num_params=2_338_446, macs=51_580_656, input_size=152),
    "tinynet_e": Variant(TinyNet, {"resolution": 0.475, "width": 0.51, "depth": 0.6},
                         "TinyNet-E (Han et al., NeurIPS 2020): EfficientNet-B0 scaled by r=0.475, w=0.51, d=0.6",
                         "tinynet_e", num_params=2_042_972, macs=24_356_848, input_size=106),
}
