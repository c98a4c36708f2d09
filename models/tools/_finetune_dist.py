"""BatchNorm synchronised across the ranks of ``finetune``. On GPUs that is torch's
``SyncBatchNorm``; on CPU, which torch's refuses, the same statistics come from a
differentiable ``all_reduce`` over gloo, so ``--sync-bn`` means the same thing everywhere."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; the gradient of each rank's input is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole global batch: per-channel
    sums and counts, then sums of squared deviations, are added over the ranks by a
    differentiable all_reduce, whose backward adds the gradients over the ranks as well (as
    SyncBatchNorm does). Without a process group of several ranks, or in eval mode, it is plain
    BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        xf = x.float()
        # Two passes, as BatchNorm computes it: the global mean, then the global sum of squared
        # deviations from it (E[x^2] - E[x]^2 in float32 would lose digits to cancellation).
        count = torch.full((1,), xf.numel() / channels, dtype=torch.float32, device=x.device)
        first = _AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), count]))
        n = first[-1]
        mean = first[:channels] / n
        centered = xf - mean[None, :, None, None]
        var = _AllReduceSum.apply((centered * centered).sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (n / (n - 1)), alpha=factor)
        y = centered * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of ``model`` synchronised across ranks, in place (same parameters,
    buffers and state-dict names)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = CpuSyncBatchNorm
    return model

