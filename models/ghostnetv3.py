"""GhostNetV3 (Liu et al., "GhostNetV3: Exploring the Training Strategies for Compact Models",
2024): GhostNetV2 trained with re-parameterisable branches.

In training form every convolution of a ghost module, and the stride-2 depthwise convolution,
is a sum of branches (three k x k conv+BN, a 1x1 conv+BN "scale" branch, a BN "skip" branch
where shapes allow), each with its own BatchNorm. ``GhostNetV3.reparameterize()`` folds each
sum into one biased convolution (the authors' deploy form: GhostNetV2's blocks, and its
cost); ``fuse()`` does that, then folds the remaining BatchNorms as for every model.

Module and parameter names follow the authors' code (``ghostnetv3_pytorch/ghostnetv3.py``
in huawei-noah/Efficient-AI-Backbones) and hence their released checkpoint: a branch is
``<name>.conv`` and ``<name>.bn``. timm's re-save names the branch BatchNorms ``bn1``; such
files are renamed when they are read (see ``weights.released_state_dict``).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ._base import Variant
from .fuse import bn_affine
from .ghostnet import GhostBottleneck, GhostModule, shortcut, squeeze_excite
from .ghostnetv2 import _FIRST_ATTENTION_BLOCK, DfcGhostModule, GhostNetV2, dfc_attention, dfc_gate, half
from .layers import drop_path

__all__ = ["VARIANTS", "GhostNetV3", "RepGhostBottleneck", "RepGhostModule"]

_BRANCHES = 3  # k x k conv+BN branches per re-parameterisable convolution, as the authors train them


def _conv_bn(in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, groups=groups, bias=False),
        bn=nn.BatchNorm2d(out_chs),
    ))


def _folded(branches: nn.ModuleList, scale: nn.Module | None, skip: nn.BatchNorm2d | None,
            template: nn.Conv2d) -> nn.Conv2d:
    """One biased convolution shaped like ``template`` computing the sum of the branches
    (each conv+BN folded, the 1x1 scale branch padded to k x k, the skip BN as an identity
    kernel), accumulated in float64."""
    k = template.kernel_size[0]
    weight = torch.zeros(template.weight.shape, dtype=torch.float64, device=template.weight.device)
    bias = torch.zeros(template.out_channels, dtype=torch.float64, device=template.weight.device)
    parts = [(b.conv.weight.double(), b.bn) for b in branches]
    if scale is not None:
        pad = k // 2
        parts.append((F.pad(scale.conv.weight.double(), [pad, pad, pad, pad]), scale.bn))
    if skip is not None:
        identity = torch.zeros_like(weight)
        per_group = weight.shape[1]
        for i in range(weight.shape[0]):
            identity[i, i % per_group, k // 2, k // 2] = 1.0
        parts.append((identity, skip))
    for kernel, bn in parts:
        factor, shift = bn_affine(bn)
        weight += kernel * factor.view(-1, 1, 1, 1)
        bias += shift
    conv = nn.Conv2d(template.in_channels, template.out_channels, template.kernel_size, template.stride,
                     template.padding, groups=template.groups, bias=True,
                     device=template.weight.device, dtype=template.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv.requires_grad_(template.weight.requires_grad)


class RepGhostModule(nn.Module):
    """A ghost module in training form: the primary 1x1 convolution as three conv+BN branches,
    the cheap depthwise 3x3 as three conv+BN branches plus a 1x1 scale branch and a BN skip;
    with ``attention``, GhostNetV2's DFC gate (``short_conv``, registered first as the authors
    do). ``deploy()`` returns the equivalent GhostModule (or DfcGhostModule)."""

    def __init__(self, in_chs: int, out_chs: int, relu: bool, attention: bool):
        super().__init__()
        self.in_chs, self.out_chs, self.relu = in_chs, out_chs, relu
        half = math.ceil(out_chs / 2)
        self.short_conv = dfc_attention(in_chs, out_chs) if attention else None
        # The authors' rule; with the published widths a 1x1 never maps n channels to n.
        self.primary_rpr_skip = nn.BatchNorm2d(in_chs) if in_chs == half else None
        self.primary_rpr_conv = nn.ModuleList(_conv_bn(in_chs, half, 1) for _ in range(_BRANCHES))
        self.primary_activation = nn.ReLU(inplace=True) if relu else nn.Identity()
        self.cheap_rpr_skip = nn.BatchNorm2d(half)
        self.cheap_rpr_conv = nn.ModuleList(_conv_bn(half, half, 3, groups=half) for _ in range(_BRANCHES))
        self.cheap_rpr_scale = _conv_bn(half, half, 1, groups=half)
        self.cheap_activation = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The branches are summed in the authors' order (skip/scale first), as timm does.
        primary: torch.Tensor | None = None
        if self.primary_rpr_skip is not None:
            primary = self.primary_rpr_skip(x)
        for branch in self.primary_rpr_conv:
            y = branch(x)
            primary = y if primary is None else primary + y
        assert primary is not None
        primary = self.primary_activation(primary)
        cheap = self.cheap_rpr_scale(primary) + self.cheap_rpr_skip(primary)
        for branch in self.cheap_rpr_conv:
            cheap = cheap + branch(primary)
        out = torch.cat([primary, self.cheap_activation(cheap)], dim=1)
        out = out if out.shape[1] == self.out_chs else out[:, : self.out_chs]
        if self.short_conv is not None:
            return dfc_gate(self.short_conv(half(x)), out)
        return out

    def deploy(self) -> nn.Module:
        with torch.device("meta"):  # only the structure: every tensor is replaced below
            plain = (DfcGhostModule(self.in_chs, self.out_chs) if self.short_conv is not None
                     else GhostModule(self.in_chs, self.out_chs, relu=self.relu))
        plain.primary_conv[0] = _folded(self.primary_rpr_conv, None, self.primary_rpr_skip,
                                        self.primary_rpr_conv[0].conv)
        plain.cheap_operation[0] = _folded(self.cheap_rpr_conv, self.cheap_rpr_scale, self.cheap_rpr_skip,
                                           self.cheap_rpr_conv[0].conv)
        plain.primary_conv[1] = nn.Identity()
        plain.cheap_operation[1] = nn.Identity()
        if self.short_conv is not None:
            plain.short_conv = self.short_conv
        return plain


class RepGhostBottleneck(nn.Module):
    """GhostNetV3's bottleneck in training form: ghost1 (gated from block 2 on) -> [stride-2
    depthwise as three conv+BN branches and a 1x1 scale branch] -> [SE] -> ghost2, plus
    GhostNet's shortcut. ``deploy()`` returns the equivalent GhostBottleneck."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, kernel: int, stride: int, se_ratio: float,
                 drop_path_rate: float, attention: bool):
        super().__init__()
        self._shape = (in_chs, mid_chs, out_chs, kernel, stride, se_ratio, drop_path_rate)
        self.ghost1 = RepGhostModule(in_chs, mid_chs, relu=True, attention=attention)
        if stride > 1:
            self.dw_rpr_conv = nn.ModuleList(_conv_bn(mid_chs, mid_chs, kernel, stride, groups=mid_chs)
                                             for _ in range(_BRANCHES))
            self.dw_rpr_scale = _conv_bn(mid_chs, mid_chs, 1, stride, groups=mid_chs)
        else:
            self.dw_rpr_conv = None
            self.dw_rpr_scale = None
        self.se = squeeze_excite(mid_chs, se_ratio)
        self.ghost2 = RepGhostModule(mid_chs, out_chs, relu=False, attention=False)
        self.shortcut = shortcut(in_chs, out_chs, kernel, stride)
        self.drop_path = drop_path(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ghost1(x)
        if self.dw_rpr_conv is not None and self.dw_rpr_scale is not None:
            strided = self.dw_rpr_scale(out)
            for branch in self.dw_rpr_conv:
                strided = strided + branch(out)
            out = strided
        if self.se is not None:
            out = self.se(out)
        return self.drop_path(self.ghost2(out)) + self.shortcut(x)

    def deploy(self) -> GhostBottleneck:
        ghost1 = self.ghost1.deploy()
        with torch.device("meta"):
            block = GhostBottleneck(*self._shape, ghost1=ghost1)
        block.ghost2 = self.ghost2.deploy()
        if self.dw_rpr_conv is not None:
            block.conv_dw = _folded(self.dw_rpr_conv, self.dw_rpr_scale, None, self.dw_rpr_conv[0].conv)
            block.bn_dw = nn.Identity()
        block.se = self.se
        block.shortcut = self.shortcut
        block.drop_path = self.drop_path
        return block


class GhostNetV3(GhostNetV2):
    """GhostNetV3 at any width multiplier, built in training form (the form of the released
    checkpoint); ``reparameterize()`` turns it into the deploy form and ``fuse()`` goes on from
    there. Arguments as ``GhostNet``'s (0.5, 1.0, 1.3 and 1.6 are the published widths)."""

    def _bottleneck(self, index: int, in_chs: int, mid_chs: int, out_chs: int, kernel: int, stride: int,
                    se_ratio: float, drop_path_rate: float) -> nn.Module:
        return RepGhostBottleneck(in_chs, mid_chs, out_chs, kernel, stride, se_ratio, drop_path_rate,
                                  attention=index >= _FIRST_ATTENTION_BLOCK)

    def reparameterize(self) -> GhostNetV3:
        """The authors' deploy form, in place: each block's branches folded into single biased
        convolutions (computed in float64), leaving GhostNetV2's blocks and cost. The model
        computes the same function (to float rounding). A second call changes nothing."""
        if not hasattr(self, "blocks"):  # a features_only model tapping only the stem
            return self
        for stage in self.blocks:
            for i, block in enumerate(stage):
                if isinstance(block, RepGhostBottleneck):
                    stage[i] = block.deploy().train(block.training)
        return self

    def fuse(self, channels_last: bool = False) -> GhostNetV3:
        """``reparameterize()``, then BatchNorm folded as for every model (see ImageClassifier.fuse)."""
        self.reparameterize()
        return super().fuse(channels_last=channels_last)


# The published widths; only 1.0x has released weights (see weights_manifest.json). Parameters and
# MACs are the deploy form's (reparameterize()), as the authors count them; the training form has more.
VARIANTS = {
    "ghostnetv3_0_5x": Variant(GhostNetV3, {"width": 0.5}, "GhostNetV3 0.5x (Liu et al., 2024)", "ghostnetv3_050",
                               num_params=2_853_176, macs=49_640_656, input_size=224),
    "ghostnetv3_1x": Variant(GhostNetV3, {"width": 1.0}, "GhostNetV3 1.0x (Liu et al., 2024)", "ghostnetv3_100",
                             num_params=6_147_588, macs=167_048_288, input_size=224),
    "ghostnetv3_1_3x": Variant(GhostNetV3, {"width": 1.3}, "GhostNetV3 1.3x (Liu et al., 2024)", "ghostnetv3_130",
                               num_params=8_948_296, macs=269_322_976, input_size=224),
    "ghostnetv3_1_6x": Variant(GhostNetV3, {"width": 1.6}, "GhostNetV3 1.6x (Liu et al., 2024)", "ghostnetv3_160",
                               num_params=12_377_778, macs=398_607_224, input_size=224),
}
