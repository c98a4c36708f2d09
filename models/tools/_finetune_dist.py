"""Many processes for ``finetune``: the process group that torchrun asks for (gloo on CPU, NCCL
with one GPU per rank), and BatchNorm synchronised across ranks. On GPUs that is torch's
``SyncBatchNorm``; on CPU, which torch's refuses, the same statistics come from a
differentiable ``all_reduce`` over gloo, so ``--sync-bn`` means the same thing everywhere."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .. import api


@dataclass
class World:
    rank: int
    size: int
    device: torch.device
    owns_group: bool  # this run created the process group, so it destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks (float64 on the CPU, for exact counts)."""
        if self.size > 1:
            values = values.to(self.device)
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values.cpu()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str | torch.device | None) -> World:
    """This process's rank, the number of ranks and its device; joins torchrun's process
    group if it is one of several. Default device: this rank's GPU if there is one, else CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        resolved = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    elif size > 1 and str(device) == "cuda":
        resolved = api.resolve_device(f"cuda:{local_rank}")  # one GPU per rank
    else:
        resolved = api.resolve_device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    owns = False
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), resolved, owns)
    return World(0, 1, resolved, False)


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

