"""Inference form of a model: every BatchNorm folded into the convolution before it, 1x1
convolutions on pooled 1x1 maps turned into matrix products, optionally channels_last.

The result computes the same function (to float rounding) with fewer ops. It is eval-only:
the BatchNorm statistics are baked into the weights, so training it would be wrong.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["bn_affine", "fold_batchnorm", "fused_state_dict_problem", "optimize_for_inference"]

# What only a BatchNorm holds: a state dict with such keys that a fused model lacks is unfused.
_BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


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
        if x.shape[2] == 1 and x.shape[3] == 1:
            return F.linear(x.flatten(1), self.weight, self.bias)[:, :, None, None]
        # An unpooled map (reset_classifier(0, global_pool="")): the 1x1 convolution it stands for.
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)

    def as_conv(self) -> nn.Conv2d:
        """The 1x1 convolution this stands for, with the same weights."""
        conv = nn.Conv2d(self.weight.shape[1], self.weight.shape[0], 1, bias=self.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(self.weight[:, :, None, None])
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.eval().requires_grad_(False)


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


def pooled_as_convolutions(model: nn.Module) -> nn.Module:
    """Every ``PooledLinear`` of ``model`` back to its 1x1 convolution, in place: an ExecuTorch
    export wants them so. Before a matrix product the pooled map is flattened, a reshape with the
    batch size in it, which XNNPACK leaves out of its delegate for a program of any batch size:
    the program came in pieces, two at every squeeze-excitation."""
    for path, module in list(model.named_modules()):
        if isinstance(module, PooledLinear):
            _set(model, path, module.as_conv())
    return model


def _listed(keys: list[str]) -> str:
    return ", ".join(map(repr, keys[:2])) + (f" and {len(keys) - 2} more" if len(keys) > 2 else "")


def fused_state_dict_problem(model: nn.Module, state_dict: Mapping[str, Any], strict: bool) -> str | None:
    """Why the fused ``model`` cannot take ``state_dict`` (one line), or None if it can.

    torch's ``load_state_dict`` copies every tensor that fits before it reports the ones that
    do not; checked first, a refused state dict leaves the model as it was. An unfused state
    dict is refused even with ``strict=False``: its convolution weights have the fused model's
    names and shapes, but without their BatchNorm they compute something else.
    """
    own = model.state_dict()
    name = type(model).__name__
    unfused = [k for k in state_dict if k not in own and k.rpartition(".")[2] in _BATCHNORM_STATISTICS]
    if unfused:
        return (f"this {name} is fused (BatchNorm folded into its convolutions) and the state dict is not "
                f"(it holds BatchNorm statistics: {_listed(unfused)}); nothing was loaded. Load the weights before "
                "fusing: build the model without fuse, load_state_dict, then .fuse()")
    shapes = [k for k, v in state_dict.items()
              if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    missing = [k for k in own if k not in state_dict] if strict else []
    unexpected = [k for k in state_dict if k not in own] if strict else []
    problems = [f"{what}: {_listed(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                             ("wrong shape", shapes)) if keys]
    if not problems:
        return None
    return (f"the state dict does not fit this fused {name} ({'; '.join(problems)}); nothing was loaded. A fused "
            "model takes a fused model's state dict: load unfused weights before fusing, then .fuse()")
