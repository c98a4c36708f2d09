"""GhostNetV2 (Tang et al., "GhostNetV2: Enhance Cheap Operation with Long-Range Attention",
NeurIPS 2022): GhostNet with DFC attention gating the expanding ghost module of every block
but the first two.

Module and parameter names follow the authors' code (``ghostnetv2_pytorch/model/ghostnetv2_torch.py``
in huawei-noah/Efficient-AI-Backbones) and hence their released checkpoints; timm's re-saves
use the same names. Everything else (stem, stages, SE, shortcut, head) is GhostNet's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import Variant
from .ghostnet import GhostBottleneck, GhostModule, GhostNet

__all__ = ["VARIANTS", "DfcGhostModule", "GhostNetV2", "dfc_attention", "dfc_gate", "half"]

# The first block whose ghost1 is gated (the authors' ``layer_id > 1``).
_FIRST_ATTENTION_BLOCK = 2


def dfc_attention(in_chs: int, out_chs: int) -> nn.Sequential:
    """The "decoupled fully connected" attention branch (``short_conv``): a 1x1 convolution,
    then a horizontal 1x5 and a vertical 5x1 depthwise convolution, each with BatchNorm. It
    runs on the input pooled to half resolution (``half``); ``dfc_gate`` turns its output into the gate."""
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, 1, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.Conv2d(out_chs, out_chs, (1, 5), padding=(0, 2), groups=out_chs, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.Conv2d(out_chs, out_chs, (5, 1), padding=(2, 0), groups=out_chs, bias=False),
        nn.BatchNorm2d(out_chs),
    )


def half(x: torch.Tensor) -> torch.Tensor:
    """The module's input pooled to half resolution (2x2 means): what the attention branch sees.
    A map one pixel high or wide (at 1/32 of an image under 33 pixels) has nothing to pool in
    that direction and is taken as it is; the authors' code fails there."""
    kh, kw = min(2, x.shape[-2]), min(2, x.shape[-1])
    return F.avg_pool2d(x, kernel_size=[kh, kw], stride=[kh, kw])


def dfc_gate(attention: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` scaled by the sigmoid of the attention branch's output (on ``half(x)``), brought
    back to ``out``'s size by nearest-neighbour upsampling, as the authors compute it."""
    gate = torch.sigmoid(attention)
    return out * F.interpolate(gate, size=(out.shape[-2], out.shape[-1]), mode="nearest")


class DfcGhostModule(GhostModule):
    """A ghost module (ReLU) whose output is gated by DFC attention on its input."""

    _FUSE = GhostModule._FUSE + (("short_conv.0", "short_conv.1"), ("short_conv.2", "short_conv.3"),
                                 ("short_conv.4", "short_conv.5"))

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__(in_chs, out_chs, relu=True)
        self.short_conv = dfc_attention(in_chs, out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dfc_gate(self.short_conv(half(x)), self._halves(x))


class GhostNetV2(GhostNet):
    """GhostNetV2 at any width multiplier: GhostNet's stages, with DFC attention in the first
    ghost module of blocks 2..15. Arguments as ``GhostNet``'s (1.0, 1.3 and 1.6 are the
    published widths); evaluated with bicubic resizing (256, crop 224), as the authors' and
    timm's numbers were measured."""

    _INTERPOLATION = "bicubic"
    _PADDABLE = False

    def _bottleneck(self, index: int, in_chs: int, mid_chs: int, out_chs: int, kernel: int, stride: int,
                    se_ratio: float, drop_path_rate: float) -> nn.Module:
        ghost1 = DfcGhostModule(in_chs, mid_chs) if index >= _FIRST_ATTENTION_BLOCK else None
        return GhostBottleneck(in_chs, mid_chs, out_chs, kernel, stride, se_ratio, drop_path_rate, ghost1=ghost1)


# The published widths, each with released weights (see weights_manifest.json).
VARIANTS = {
    "ghostnetv2_1x": Variant(GhostNetV2, {"width": 1.0}, "GhostNetV2 1.0x (Tang et al., NeurIPS 2022)",
                             "ghostnetv2_100", num_params=6_156_908, macs=167_048_288, input_size=224),
    "ghostnetv2_1_3x": Variant(GhostNetV2, {"width": 1.3}, "GhostNetV2 1.3x (Tang et al., NeurIPS 2022)",
                               "ghostnetv2_130", num_params=8_960_404, macs=269_322_976, input_size=224),
    "ghostnetv2_1_6x": Variant(GhostNetV2, {"width": 1.6}, "GhostNetV2 1.6x (Tang et al., NeurIPS 2022)",
                               "ghostnetv2_160", num_params=12_392_698, macs=398_607_224, input_size=224),
}
