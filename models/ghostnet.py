"""GhostNet (Han et al., "GhostNet: More Features from Cheap Operations", CVPR 2020).

Module and parameter names follow the authors' released checkpoint, so it loads with
``strict=True`` and no renaming.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ._base import FeatureInfo, ImageClassifier, Variant, check_positive_float
from .layers import SqueezeExcite, drop_path, drop_path_rates, init_weights, make_divisible

__all__ = ["VARIANTS", "GhostNet", "pad_ghost_halves"]

# One list per stage of (kernel, expansion channels, out channels, SE ratio, stride),
# for width 1.0; from the paper's Table 1 as the released code lays it out in stages.
_STAGES = (
    ((3, 16, 16, 0.0, 1),),
    ((3, 48, 24, 0.0, 2),),
    ((3, 72, 24, 0.0, 1),),
    ((5, 72, 40, 0.25, 2),),
    ((5, 120, 40, 0.25, 1),),
    ((3, 240, 80, 0.0, 2),),
    ((3, 200, 80, 0.0, 1), (3, 184, 80, 0.0, 1), (3, 184, 80, 0.0, 1), (3, 480, 112, 0.25, 1), (3, 672, 112, 0.25, 1)),
    ((5, 672, 160, 0.25, 2),),
    ((5, 960, 160, 0.0, 1), (5, 960, 160, 0.25, 1), (5, 960, 160, 0.0, 1), (5, 960, 160, 0.25, 1)),
)
_STEM_CHANNELS = 16
_LAST_CHANNELS = 960
_HEAD_CHANNELS = 1280  # not width-scaled
_DIVISOR = 4


def _conv_bn(in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_chs),
    ]


def squeeze_excite(channels: int, se_ratio: float) -> SqueezeExcite | None:
    """The bottleneck's SE on its expanded channels (None for ratio 0): ReLU, hard-sigmoid gate."""
    if se_ratio <= 0:
        return None
    reduced = make_divisible(channels * se_ratio, _DIVISOR)
    return SqueezeExcite(channels, reduced, lambda: nn.ReLU(inplace=True), nn.Hardsigmoid)


def shortcut(in_chs: int, out_chs: int, kernel: int, stride: int) -> nn.Sequential:
    """The bottleneck's residual path: identity, or depthwise k x k + BN, 1x1 + BN where the shape changes."""
    if in_chs == out_chs and stride == 1:
        return nn.Sequential()
    return nn.Sequential(*_conv_bn(in_chs, in_chs, kernel, stride, groups=in_chs), *_conv_bn(in_chs, out_chs, 1))


class GhostModule(nn.Module):
    """Half the output from a 1x1 conv, the other half from a cheap depthwise 3x3 on it."""

    _FUSE = (("primary_conv.0", "primary_conv.1"), ("cheap_operation.0", "cheap_operation.1"))  # see fuse.py

    def __init__(self, in_chs: int, out_chs: int, relu: bool):
        super().__init__()
        self.out_chs = out_chs
        primary_chs = math.ceil(out_chs / 2)
        act = [nn.ReLU(inplace=True)] if relu else []
        self.primary_conv = nn.Sequential(*_conv_bn(in_chs, primary_chs, 1), *act)
        self.cheap_operation = nn.Sequential(*_conv_bn(primary_chs, primary_chs, 3, groups=primary_chs), *act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._halves(x)

    def _halves(self, x: torch.Tensor) -> torch.Tensor:
        # (a method of its own: GhostNetV2's gated module calls it; TorchScript has no super())
        primary = self.primary_conv(x)
        out = torch.cat([primary, self.cheap_operation(primary)], dim=1)
        # An odd out_chs makes the two halves one channel too many.
        return out if out.shape[1] == self.out_chs else out[:, : self.out_chs]


class GhostBottleneck(nn.Module):
    """ghost1 (expand) -> [stride-2 depthwise] -> [SE] -> ghost2 (project) -> [drop path], plus shortcut."""

    _FUSE = (("conv_dw", "bn_dw"), ("shortcut.0", "shortcut.1"), ("shortcut.2", "shortcut.3"))

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, kernel: int, stride: int, se_ratio: float,
                 drop_path_rate: float = 0.0, ghost1: nn.Module | None = None):
        super().__init__()
        # GhostNetV2 passes its attention-gated ghost module here (ghostnetv2.py).
        self.ghost1 = GhostModule(in_chs, mid_chs, relu=True) if ghost1 is None else ghost1
        if stride > 1:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, kernel, stride, kernel // 2, groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        else:
            self.conv_dw = None
            self.bn_dw = None
        self.se = squeeze_excite(mid_chs, se_ratio)
        self.ghost2 = GhostModule(mid_chs, out_chs, relu=False)
        self.shortcut = shortcut(in_chs, out_chs, kernel, stride)
        self.drop_path = drop_path(drop_path_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ghost1(x)
        if self.conv_dw is not None:
            out = self.bn_dw(self.conv_dw(out))
        if self.se is not None:
            out = self.se(out)
        return self.drop_path(self.ghost2(out)) + self.shortcut(x)


class ConvBnAct(nn.Module):
    _FUSE = (("conv", "bn1"),)

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv(x)))


class GhostNet(ImageClassifier):
    """GhostNet v1 at any width multiplier.

    Args:
        width: channel multiplier (0.5, 1.0 and 1.3 are the published ones); every channel
            count is ``make_divisible(c * width, 4)``, except the 1280-wide head.
        num_classes: classifier outputs; 0 removes the classifier and the model returns the
            pooled 1280-d features.
        in_chans: input channels (1 for grayscale, 4 for RGBA, ...).
        drop_rate: dropout before the classifier (0.2 in the paper).
        drop_path_rate: stochastic depth of the bottlenecks' residual branches, rising
            linearly from 0 at the first block to this at the last (0: none, as at inference).
        features_only: return a list of feature maps (strides 2, 4, 8, 16, 32) instead of
            logits. The taps are timm's: the stem convolution (before its BN) and the output
            of each stride-2 stage. ``feature_info`` describes them.
        out_indices: which of the five taps to return with ``features_only``.
    """

    _HEAD_NAMES = ("conv_head", "act2")
    _FUSE = (("conv_stem", "bn1"),)
    _POOLED_1X1 = ("conv_head",)
    _INTERPOLATION = "bilinear"  # the authors' evaluation: resize 256 bilinear, crop 224
    _PADDABLE = True  # see pad_ghost_halves

    def __init__(
        self,
        width: float = 1.0,
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
        self.width = check_positive_float("width", width)
        self.default_input_size = (224, 224)

        stem_chs = make_divisible(_STEM_CHANNELS * width, _DIVISOR)
        self.conv_stem = nn.Conv2d(self.in_chans, stem_chs, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = FeatureInfo([dict(num_chs=stem_chs, reduction=2, module="conv_stem")])

        stages: list[nn.Module] = []
        in_chs, reduction, block_index = stem_chs, 2, 0
        rates = iter(drop_path_rates(self.drop_path_rate, sum(map(len, _STAGES))))
        for stage_index, rows in enumerate(_STAGES):
            layers = []
            for kernel, expansion, out, se_ratio, stride in rows:
                out_chs = make_divisible(out * width, _DIVISOR)
                mid_chs = make_divisible(expansion * width, _DIVISOR)
                layers.append(self._bottleneck(block_index, in_chs, mid_chs, out_chs, kernel, stride, se_ratio,
                                               next(rates)))
                block_index += 1
                in_chs = out_chs
            stages.append(nn.Sequential(*layers))
            if rows[0][4] > 1:
                reduction *= 2
                self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"blocks.{stage_index}"))
        last_chs = make_divisible(_LAST_CHANNELS * width, _DIVISOR)
        stages.append(nn.Sequential(ConvBnAct(in_chs, last_chs)))
        self.blocks = nn.Sequential(*stages)
        self.num_features = last_chs

        # The authors pool before conv_head: the 1280-wide layer runs on a 1x1 map.
        self.head_hidden_size = _HEAD_CHANNELS
        self.conv_head = nn.Conv2d(last_chs, _HEAD_CHANNELS, 1, bias=True)
        self.act2 = nn.ReLU(inplace=True)

        init_weights(self)
        self._finish_init(features_only, out_indices)

    def _bottleneck(self, index: int, in_chs: int, mid_chs: int, out_chs: int, kernel: int, stride: int,
                    se_ratio: float, drop_path_rate: float) -> nn.Module:
        """Block ``index`` (0..15) of the stages; GhostNetV2 and V3 build theirs here."""
        return GhostBottleneck(in_chs, mid_chs, out_chs, kernel, stride, se_ratio, drop_path_rate)

    def _pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._flatten(self.act2(self.conv_head(self._pool(x))))


# Where each real channel of a map sits, and the map's padded width.
_Layout = tuple[torch.Tensor, int]


def _plain(channels: int) -> _Layout:
    return torch.arange(channels), channels


def _ghost_layout(out_chs: int, multiple: int) -> _Layout:
    """A ghost module's output with both halves padded to ``multiple``: [0, h) and [p, p + h)."""
    half = math.ceil(out_chs / 2)
    padded = math.ceil(half / multiple) * multiple
    return torch.cat([torch.arange(half), padded + torch.arange(half)])[:out_chs], 2 * padded


def _scatter(values: torch.Tensor, rows: _Layout, cols: _Layout | None = None) -> torch.Tensor:
    """``values`` (out[, in, ...]) placed into zeros at the rows (and columns) of the layouts."""
    shape = (rows[1],) + ((cols[1],) if cols else ()) + tuple(values.shape[1 + bool(cols):])
    out = values.new_zeros(shape)
    if cols:
        out[rows[0][:, None], cols[0][None, :]] = values
    else:
        out[rows[0]] = values
    return out


def _padded_conv(conv: nn.Conv2d, rows: _Layout | None = None, cols: _Layout | None = None) -> nn.Conv2d:
    """``conv`` with its outputs at ``rows`` and (unless depthwise) inputs at ``cols``; zero elsewhere."""
    depthwise = conv.groups > 1
    rows = rows or _plain(conv.out_channels)
    weight = _scatter(conv.weight, rows) if depthwise else _scatter(conv.weight, rows, cols or _plain(conv.in_channels))
    bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
    new = nn.Conv2d(rows[1] if depthwise else weight.shape[1], rows[1], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, rows[1] if depthwise else 1, bias=True, device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    new.bias.data.copy_(_scatter(bias.detach(), rows))
    return new.requires_grad_(conv.weight.requires_grad)


def _pad_ghost(ghost: GhostModule, inputs: _Layout, multiple: int) -> _Layout:
    primary, cheap = ghost.primary_conv[0], ghost.cheap_operation[0]
    half = primary.out_channels
    layout = _ghost_layout(ghost.out_chs, multiple)
    own = (torch.arange(half), layout[1] // 2)
    if 2 * half > ghost.out_chs:  # forward cut the cheap half's last channel; it now stays: make it zero
        cheap.weight.data[-1] = 0
        cheap.bias.data[-1] = 0
    ghost.primary_conv[0] = _padded_conv(primary, own, inputs)
    ghost.cheap_operation[0] = _padded_conv(cheap, own)
    ghost.out_chs = layout[1]
    return layout


def _pad_pooled(linear: nn.Module, rows: _Layout | None, cols: _Layout | None) -> None:
    """The same for a squeeze-excitation matrix product (fuse.PooledLinear: weight (out, in), bias)."""
    rows = rows or _plain(linear.weight.shape[0])
    linear.weight.data = _scatter(linear.weight.data, rows, cols or _plain(linear.weight.shape[1]))
    linear.bias.data = _scatter(linear.bias.data, rows)


def pad_ghost_halves(model: GhostNet, multiple: int = 16) -> GhostNet:
    """Pad every ghost half of a fused GhostNet to a multiple of ``multiple`` channels, in place.

    GhostNetV2 and V3 come back unchanged (their attention branches are not padded).
    The outputs are the same: padded channels get zero filters and every consumer (the next
    convolutions, squeeze-excitation, shortcuts, the residual stream, the last 1x1 conv) zero
    weights for them, so they stay exactly zero. What changes is the layout a runtime sees:
    ONNX Runtime's CPU provider runs convolutions in blocks of 16 channels (8 with AVX2) and
    keeps a Concat in that layout only when every input is a multiple of the block. GhostNet's
    halves (8, 12, 20, 36, 60, ...) mostly are not, so each of its 32 ghost concatenations was
    reordered out of the blocked layout and back: a quarter of the model's time there. Eager
    PyTorch and XNNPACK (channels-last, no blocks) only pay for the extra zeros, so export.py
    pads the fp32 ONNX export alone.
    """
    if not model._PADDABLE:
        # GhostNetV2/V3: the DFC attention reads each block's input beside ghost1, in the unpadded layout.
        return model
    if model.features_only:
        raise ValueError("pad_ghost_halves takes a classifier, not a features_only model")
    if not getattr(model, "fused", False) or not isinstance(model.bn1, nn.Identity):
        raise ValueError("pad_ghost_halves takes a fused GhostNet (model.fuse() first)")
    blocks = [m for m in model.blocks.modules() if isinstance(m, GhostBottleneck)]
    # The stem feeds the first block's identity shortcut, so it writes that block's output layout.
    first = blocks[0]
    stream = _ghost_layout(first.ghost2.out_chs, multiple) if len(first.shortcut) == 0 else _plain(
        model.conv_stem.out_channels)
    model.conv_stem = _padded_conv(model.conv_stem, stream)
    for block in blocks:
        mid = _pad_ghost(block.ghost1, stream, multiple)
        if block.conv_dw is not None:
            block.conv_dw = _padded_conv(block.conv_dw, mid)
        if block.se is not None:
            _pad_pooled(block.se.conv_reduce, None, mid)
            _pad_pooled(block.se.conv_expand, mid, None)
        out = _pad_ghost(block.ghost2, mid, multiple)
        if len(block.shortcut) == 0:  # identity: the input already has the output's layout
            if stream[1] != out[1] or not torch.equal(stream[0], out[0]):
                raise RuntimeError("identity shortcut between different layouts")
        else:
            block.shortcut[0] = _padded_conv(block.shortcut[0], stream)
            block.shortcut[2] = _padded_conv(block.shortcut[2], out, stream)
        stream = out
    last = model.blocks[-1][0]
    last.conv = _padded_conv(last.conv, None, stream)
    return model


# The published widths; only 1.0x has released weights (see weights_manifest.json). One row per
# model; see CONTRIBUTING.md.
VARIANTS = {
    "ghostnet_0_5x": Variant(GhostNet, {"width": 0.5}, "GhostNet 0.5x (Han et al., CVPR 2020)", "ghostnet_050",
                             num_params=2_587_292, macs=42_328_152, input_size=224),
    "ghostnet_1x": Variant(GhostNet, {"width": 1.0}, "GhostNet 1.0x (Han et al., CVPR 2020)", "ghostnet_100",
                           num_params=5_182_508, macs=141_150_512, input_size=224),
    "ghostnet_1_3x": Variant(GhostNet, {"width": 1.3}, "GhostNet 1.3x (Han et al., CVPR 2020)", "ghostnet_130",
                             num_params=7_358_820, macs=227_003_256, input_size=224),
}
