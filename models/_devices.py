"""Device names as users write them ("cuda", "cuda:1", "mps", a torch.device), checked
against what this machine has, with errors that say what is available."""
from __future__ import annotations

from typing import Any

import torch


def _available_devices() -> list[str]:
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(device: Any) -> torch.device:
    """A usable torch.device, or a ValueError that names it and what this machine has."""
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__} {device!r}")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device {device!r} is not a device name torch understands (such as 'cpu', 'cuda', 'cuda:1', "
            f"'mps'); available here: {', '.join(_available_devices())}"
        ) from None
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = resolved.index if resolved.index is not None else (torch.cuda.current_device() if count else 0)
        if index < count:
            return torch.device("cuda", index)
        reason = (f"this machine has {count} CUDA device(s)" if count else
                  f"CUDA is not available (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})")
    elif resolved.type == "mps":
        if torch.backends.mps.is_available():
            return resolved
        reason = "MPS is not available"
    else:
        reason = f"device type {resolved.type!r} is not supported here"
    raise ValueError(f"device {device!r} cannot be used: {reason}; available here: {', '.join(_available_devices())}")
