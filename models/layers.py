"""Building blocks shared by GhostNet and TinyNet."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def make_divisible(value: float, divisor: int) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``).

    If rounding down lost more than 10% of ``value``, one more ``divisor`` is added: this is
    the rule both papers' reference code uses, and the released checkpoints' channel counts
    depend on it bit for bit.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class DropPath(nn.Module):
    """Stochastic depth: in training, the residual branch of a random ``p`` of the samples is
    dropped and the rest scaled by ``1 / (1 - p)``; in eval mode, the identity."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


def drop_path(p: float) -> nn.Module:
    """``DropPath(p)``, or the identity when ``p`` is 0 (nothing to drop, nothing to run)."""
    return DropPath(p) if p > 0.0 else nn.Identity()


def drop_path_rates(rate: float, count: int) -> list[float]:
    """Per-block stochastic depth rising linearly from 0 (first block) towards ``rate``, as
    in EfficientNet and timm: block ``i`` of ``count`` drops with ``rate * i / count``."""
    return [rate * i / count for i in range(count)]


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: a per-channel gate computed from the globally pooled input."""

    _POOLED_1X1 = ("conv_reduce", "conv_expand")  # see fuse.py

    def __init__(
        self,
        channels: int,
        reduced_channels: int,
        act_layer: Callable[[], nn.Module],
        gate_layer: Callable[[], nn.Module],
    ):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced_channels, 1, bias=True)
        self.act1 = act_layer()
        self.conv_expand = nn.Conv2d(reduced_channels, channels, 1, bias=True)
        self.gate = gate_layer()
        # XNNPACK averages a whole map in one float32 sum, which on the large early maps is ~1e-5
        # off; exports for it set this to average each row first, then the row means
        # (tools/_executorch.py). Two average pools, not two means: XNNPACK takes pools into its
        # delegate, and a mean over one dimension it does not, which cut an ExecuTorch program in
        # two at every block (12 pieces for tinynet_e; 2.5x the lowering time, 1.2x the run time).
        # An instance attribute, so that TorchScript sees it.
        self.mean_by_rows = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean_by_rows:
            scale = F.avg_pool2d(F.avg_pool2d(x, (1, x.shape[3])), (x.shape[2], 1))
        else:
            scale = x.mean((2, 3), keepdim=True)
        scale = self.conv_expand(self.act1(self.conv_reduce(scale)))
        return x * self.gate(scale)


def init_weights(model: nn.Module) -> None:
    """Initialise for training from scratch, as the EfficientNet family is trained.

    Convolutions get He-normal init over their real fan-out (``k*k*out/groups``: a depthwise
    conv has a fan-out of ``k*k``, not ``k*k*channels``, so plain ``kaiming_normal_`` would
    start it near zero). BatchNorm starts as identity; linear layers get a small uniform
    init scaled by their fan-out, biases zero.

    A model on the meta device (built to receive pretrained weights) is left alone: its
    tensors hold no values, and init there is slow Python decompositions for nothing.
    """
    if any(p.is_meta for p in model.parameters()):
        return
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            fan_out = kh * kw * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            bound = 1.0 / math.sqrt(module.out_features)
            nn.init.uniform_(module.weight, -bound, bound)
            nn.init.zeros_(module.bias)
