"""Inference form of a model: every BatchNorm folded into the convolution before it, 1x1
convolutions on pooled 1x1 maps turned into matrix products, optionally channels_last.

The result computes the same function (to float rounding) with fewer ops. It is eval-only:
the BatchNorm statistics are baked into the weights, so training it would be wrong.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["bn_affine", "fold_batchnorm", "optimize_for_inference"]


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 such that eval-mode ``bn(y) == y * scale + shift`` per channel."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One convolution computing ``bn(conv(x))`` in eval mode (computed in float64)."""
    scale, _ = bn_affine(bn)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean.double()) * scale + bn.bias.double())
    return fused


class PooledLinear(nn.Module):
    """A 1x1 convolution applied to a pooled (N, C, 1, 1) tensor, as one matrix product: the
    same arithmetic without the convolution machinery, which dominates at this size."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().flatten(1).clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.flatten(1), self.weight, self.bias)[:, :, None, None]


def _get(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _set(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, value)


def optimize_for_inference(model: nn.Module, channels_last: bool = False) -> nn.Module:
    """Fold every (conv, BatchNorm) pair the blocks declare in ``_FUSE``, swap pooled 1x1
    convolutions (``_POOLED_1X1``) for matrix products, and put the model in eval mode, in
    place. With ``channels_last`` the weights and, in forward, the input use that layout."""
    if getattr(model, "fused", False):
        raise RuntimeError("this model is already optimised for inference")
    model.eval()
    # A feature tap on a convolution must keep returning that convolution's output.
    taps = set(getattr(model, "_tap_names", ())) if getattr(model, "features_only", False) else set()
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        for conv_path, bn_path in getattr(module, "_FUSE", ()):
            conv, bn = _get(module, conv_path), _get(module, bn_path)
            if conv is None or bn is None or isinstance(bn, nn.Identity) or prefix + conv_path in taps:
                continue
            _set(module, conv_path, fold_batchnorm(conv, bn))
            _set(module, bn_path, nn.Identity())
        for path in getattr(module, "_POOLED_1X1", ()):
            conv = _get(module, path)
            if isinstance(conv, nn.Conv2d):
                _set(module, path, PooledLinear(conv))
    for param in model.parameters():
        param.requires_grad_(False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.fused = True
    model.channels_last = channels_last
    return model
