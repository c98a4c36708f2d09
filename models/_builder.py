"""What a builder is to a type checker, and the checks of its ``dtype=`` and ``device="meta"``.

The builders (``models.tinynet_a``, ...) are made at run time from ``api.get_model``; their
static type is ``Builder[TinyNet]`` (or ``[GhostNet]``), whose ``__call__`` lists the same
parameters as ``get_model`` (a test compares the two), so that ``mypy --strict`` and IDEs see
every keyword and the family's class.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NoReturn, Protocol, TypeVar

import torch

from ._base import ImageClassifier
from .pretrained import WeightsEnum
from .weights import Weights

__all__ = ["Builder", "check_dtype", "is_meta"]

_M_co = TypeVar("_M_co", bound=ImageClassifier, covariant=True)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Builder(Protocol[_M_co]):
    """The type of every builder (``models.tinynet_a``, ...): ``get_model``'s signature without
    ``name``, returning the family's class. Type checkers and IDEs read it; a test checks it
    against ``get_model``."""

    def __call__(
        self,
        pretrained: bool = False,
        *,
        weights: WeightsEnum | Weights | str | None = None,
        progress: bool = True,
        device: str | torch.device | None = None,
        num_classes: int | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_sha256: str | None = None,
        in_chans: int = 3,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.0,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3, 4),
        fuse: bool = False,
        channels_last: bool = False,
        dtype: torch.dtype | None = None,
        require_pinned: bool | None = None,
        **unknown: NoReturn,
    ) -> _M_co: ...


def check_dtype(dtype: Any) -> None:
    """``dtype=``: None, or a floating dtype the model's layers compute in."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.bfloat16, got {type(dtype).__name__} {dtype!r}")
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype ({', '.join(map(str, _FLOAT_DTYPES))}), got {dtype}")


def is_meta(device: Any) -> bool:
    """Whether ``device`` names the meta device (tensors without storage)."""
    try:
        return isinstance(device, (str, torch.device)) and torch.device(device).type == "meta"
    except RuntimeError:  # not a device name: resolve_device says so
        return False
