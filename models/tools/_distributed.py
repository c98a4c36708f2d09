"""Many processes under torchrun, for every command that spreads work over them (finetune,
evaluate, label): the one place that joins torchrun's process group (gloo on CPU, NCCL with
one GPU per rank) and knows this process's rank, the number of ranks and its device."""
from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from .. import api

T = TypeVar("T")


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

    def from_main(self, work: Callable[[], T]) -> T:
        """``work()`` done by rank 0 alone, and its result, or the exception it raised, given to
        every rank (``broadcast_object_list``): for what only rank 0 may know, such as the files
        in a folder that only rank 0's node has. Every rank calls it; all return or all raise."""
        outcome: tuple[bool, object] | None = None
        if self.main:
            try:
                outcome = (True, work())
            except Exception as exc:
                if self.size == 1:
                    raise
                outcome = (False, exc)
        if self.size > 1:
            sent = [(False, _portable(outcome[1])) if self.main and not outcome[0] else outcome]
            dist.broadcast_object_list(sent, src=0)
            if not self.main:
                outcome = sent[0]
        done, value = outcome
        if not done:
            raise value  # on rank 0 with its own traceback
        return value

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _portable(exc: Exception) -> Exception:
    """``exc``, or, when it cannot be rebuilt from its pickle on another rank (its ``__init__``
    takes other arguments than its ``args``), its nearest built-in class with its message: every
    rank then stops on the same error, none on a TypeError of unpickling it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        builtin = next(c for c in type(exc).__mro__ if c.__module__ == "builtins")
        return builtin(str(exc))


def setup(device: str | torch.device | None, *, gpu_by_default: bool = True) -> World:
    """This process's rank, the number of ranks and its device; joins torchrun's process
    group if it is one of several (torchrun's environment: WORLD_SIZE, RANK, LOCAL_RANK and the
    rendezvous, on one node or several). Default device: this rank's GPU if there is one and
    ``gpu_by_default``, else CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None and not gpu_by_default:
        resolved = torch.device("cpu")
    elif device is None:
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
        if dist.get_rank() == 0 and restart_hazard():
            print(f"warning: {restart_hazard()}", file=sys.stderr, flush=True)
        return World(dist.get_rank(), dist.get_world_size(), resolved, owns)
    return World(0, 1, resolved, False)


def restarts() -> tuple[int, int]:
    """(how many times torchrun's agent on this node has restarted this command's processes
    after a failure, how many times it may): ``--max-restarts``; (0, 0) outside torchrun."""
    return (int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")))


def restart_hazard() -> str | None:
    """Why a restart by torchrun may fail, if it may: its agents share one store with the
    processes (torch >= 2.5's default for the c10d rendezvous) and keep it across restarts,
    where the restarted processes find the dead ones' addresses and connect to them
    (seen here: "Connection refused" after a SIGKILL, then a hang; pytorch/pytorch#135712)."""
    if (restarts()[1] > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1"):
        return ("torchrun --max-restarts with the store its agents share: a restarted process may connect to "
                "the addresses of the ones that died and fail (pytorch/pytorch#135712). Start torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (docs/finetune.md, On a cluster)")
    return None
