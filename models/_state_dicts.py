"""A checkpoint file -> tensors, without ever running code from it: the format sniffed and the
size checked before the file is read, the bytes read once (and checked against what this process
verified), pickles through ``torch.load(weights_only=True)`` with an allow-list, and a released
file's names mapped to this package's. Below ``weights`` (the manifest's files) and ``_trust``
(comparing the sources of an unpinned file), which both read through it."""
from __future__ import annotations

import hashlib
import io
import os
import pathlib
import pickle
import re
import struct
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._files import open_regular
from ._unpickle import refusal, safe_globals
from .cache import load_bytes

# Keys under which training scripts commonly nest the model's weights.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


class CheckpointError(ValueError):
    """The file is not a state dict this package can use."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled objects beyond tensors and plain containers: refused unread."""


def _sniff_format(head: bytes, size: int, path: pathlib.Path) -> str:
    """The format of a file of ``size`` bytes from its first bytes ``head``, read before the rest."""
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive, or a legacy pickle
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        return "safetensors"  # 8-byte header length, then a JSON header
    raise CheckpointError(f"{path} is neither a torch checkpoint nor a safetensors file")


def checkpoint_limit(model: nn.Module) -> int:
    """The most bytes any checkpoint of ``model``'s architecture can take: every value in
    float64, four times over (weights, two optimizer moments, an EMA copy), plus 16 MiB of
    everything else. A larger file is not a checkpoint of it, and is not read."""
    values = sum(t.numel() for t in model.state_dict().values())
    return 8 * 4 * values + (16 << 20)


def deserialize(data: bytes, path: pathlib.Path, format: str | None, device: torch.device) -> Any:
    """Tensors from ``data``, the bytes that were checked: nothing is read from disk again."""
    format = format or _sniff_format(data[:16], len(data), path)
    if format == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(data)
        except (SafetensorError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
        return {k: v.to(device) for k, v in tensors.items()} if device.type != "cpu" else tensors
    try:
        with safe_globals():
            return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(refusal(path, exc)) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        # A truncated or garbled file surfaces here; the checksums normally stop it earlier.
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {exc}") from None


def _check_head(path: pathlib.Path, format: str | None, max_bytes: int | None) -> None:
    """Refuse from its first bytes and its size, before it is read, a file that is not a
    checkpoint or that is larger than ``max_bytes``."""
    try:
        fd, st = open_regular(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        head = f.read(16)
    if format is None:
        _sniff_format(head, st.st_size, path)
    if max_bytes is not None and st.st_size > max_bytes:
        raise CheckpointError(f"{path} is {st.st_size:,} bytes, far more than any checkpoint of this model can be "
                              f"({max_bytes:,} bytes at most: every value in float64, with optimizer state and an "
                              "EMA copy); it was not read. Is it the right file?")


def read_state_dict(path: str | os.PathLike, *, format: str | None = None,
                    map_location: torch.device | str = "cpu", sha256: str | None = None,
                    max_bytes: int | None = None) -> Any:
    """Tensors of a checkpoint file, placed on ``map_location`` as they are read.

    The file is read once into memory and those bytes are deserialized: a cached file this
    process verified must still be the verified one (else its bytes are checked again), so
    what is loaded is what was verified. Pickle files go through
    ``torch.load(weights_only=True)``, whose unpickler builds only tensors and plain
    containers (plus training scripts' ``argparse.Namespace`` and numpy scalars), so a file
    crafted to run code is refused before any of it runs. safetensors files hold no code.
    With ``sha256`` those bytes must have it, checked before they are deserialized. The
    format is checked from the first bytes, and ``max_bytes`` against the size, before the
    file is read.
    """
    path = pathlib.Path(path)
    data, _ = checked_bytes(path, sha256, format, max_bytes)
    return deserialize(data, path, format, torch.device(map_location))


def checked_bytes(path: pathlib.Path, sha256: str | None, format: str | None = None,
                   max_bytes: int | None = None) -> tuple[bytes, str]:
    """The file's bytes, read once (see ``read_state_dict``), and their SHA-256."""
    _check_head(path, format, max_bytes)
    data, wrong = load_bytes(path)
    if wrong:
        raise CheckpointError(f"{path} changed on disk after it was verified ({'; '.join(wrong)}); it was not "
                              "loaded. Load again to set it aside and fetch a verified copy.")
    actual = hashlib.sha256(data).hexdigest()
    if sha256 is not None and actual != sha256.lower():
        raise CheckpointError(f"{path} does not match the expected checksum: sha256 expected {sha256.lower()}, "
                              f"got {actual}; it was not loaded")
    return data, actual


def _as_state_dict(obj: Any, path: pathlib.Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path} is not a plain state dict: {len(bad)} entries are not name -> tensor, e.g. {bad[:3]}"
        )
    return dict(obj)


# What released files hold beside this package's names: thop's profiler counters (buffers it adds
# to every module it measures), and timm's names for GhostNetV3's branch BatchNorms (the authors'
# ``.bn.``; timm's re-save says ``.bn1.``, see timm's ghostnet checkpoint_filter_fn).
_COUNTERS = ("total_ops", "total_params")
_TIMM_BRANCH_BN = re.compile(r"(_rpr_(?:conv\.\d+|scale))\.bn1\.")


def released_state_dict(obj: Any, path: pathlib.Path) -> dict[str, torch.Tensor]:
    """The weights of a published file (or a user's checkpoint) under this package's names: a
    training checkpoint unwrapped (its ``state_dict``, not its ``state_dict_ema``), profiler
    counters dropped, timm's GhostNetV3 branch names mapped to the authors'."""
    state = _as_state_dict(_unwrap(obj), path)
    return {_TIMM_BRANCH_BN.sub(r"\1.bn.", key): value for key, value in state.items()
            if key.rpartition(".")[2] not in _COUNTERS}


def _unwrap(obj: Any) -> Any:
    """A training checkpoint's model weights: the nested state dict, DDP's ``module.`` gone."""
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj
