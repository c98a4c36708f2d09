"""Manifest entry -> ``Weights`` -> verified local file -> state dict, without ever running
code from the file. ``Weights.get_state_dict`` is the only path from a model name to tensors."""
from __future__ import annotations

import hashlib
import io
import os
import pathlib
import pickle
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from . import _trust, download
from ._files import open_regular
from ._unpickle import refusal, safe_globals
from .cache import load_bytes
from .description import ModelDescription, description_in_checkpoint
from .manifest import Manifest, ModelEntry, load_manifest

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "UnsafeCheckpointError",
    "Weights",
    "checkpoint_limit",
    "get_weights",
    "pretrained_state_dict",
    "read_checkpoint",
    "read_state_dict",
    "released_state_dict",
    "user_state_dict",
]

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


def _deserialize(data: bytes, path: pathlib.Path, format: str | None, device: torch.device) -> Any:
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
    data, _ = _checked_bytes(path, sha256, format, max_bytes)
    return _deserialize(data, path, format, torch.device(map_location))


def _checked_bytes(path: pathlib.Path, sha256: str | None, format: str | None = None,
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


@lru_cache(maxsize=1)
def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k class names, in the classifier's order."""
    # torchvision's public list of the 1000 ImageNet-1k class names, index-aligned with
    # the classifier; reading it from a weights enum downloads nothing.
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def classification_preset(*, crop_size: int, resize_size: int, interpolation: Any, mean: tuple[float, ...],
                          std: tuple[float, ...], antialias: bool | None = True) -> nn.Module:
    """torchvision's ``ImageClassification`` preset: resize the shorter side, center-crop,
    scale to [0, 1], normalise (PIL image or uint8/float tensor in, float tensor out).
    ``interpolation``: a name ("bicubic") or an ``InterpolationMode``; ``antialias`` as torchvision's."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    return ImageClassification(crop_size=crop_size, resize_size=resize_size, mean=mean, std=std,
                               interpolation=InterpolationMode(interpolation), antialias=antialias)


@dataclass(frozen=True, repr=False)
class Weights:
    """The published ImageNet weights of one model, resolved in one manifest: where they
    are, how to feed the model, what it outputs. Shaped like torchvision's weights enum
    members (``url``, ``transforms()``, ``meta``, ``get_state_dict()``), and accepted by
    ``weights=`` as they are. It carries its own manifest entry, so the bytes it fetches
    are the ones that entry describes, whatever manifest the environment names.
    ``TinyNet_A_Weights.IMAGENET1K_V1.resolve(manifest)`` and ``get_weights(name, manifest)``
    return one."""

    name: str
    entry: ModelEntry
    source: str = ""  # the manifest it came from

    def __repr__(self) -> str:
        return f"Weights({self.name!r}, manifest={self.source!r})" if self.source else f"Weights({self.name!r})"

    @property
    def urls(self) -> list[str]:
        """Every URL of every file, in the order they are tried."""
        return [url for f in self.entry.files for url in f.urls]

    @property
    def url(self) -> str:
        return self.entry.files[0].urls[0]

    def transforms(self, *, crop_size: int | None = None, resize_size: int | None = None,
                   mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                   interpolation: Any = None, antialias: bool | None = True) -> nn.Module:
        """torchvision's ``ImageClassification`` preset with this model's resize, crop,
        interpolation and normalisation (PIL image or uint8/float tensor in, batch-ready
        float tensor out). Its arguments, as torchvision's presets take them (e.g.
        ``antialias=False``), replace the published values."""
        e = self.entry
        return classification_preset(
            crop_size=e.input_size if crop_size is None else crop_size,
            resize_size=e.resize_size if resize_size is None else resize_size,
            interpolation=e.interpolation if interpolation is None else interpolation,
            mean=tuple(e.mean) if mean is None else mean, std=tuple(e.std) if std is None else std,
            antialias=antialias)

    @property
    def meta(self) -> dict[str, Any]:
        """torchvision's keys (``categories``, ``num_params``, ``min_size``, ``recipe``,
        ``_metrics``, ``_ops`` in GFLOPs as torchvision counts them, i.e. GMACs, ``_file_size``
        in MB, ``_docs``) and this project's (``metrics``, ``macs``, ``file_size`` in bytes,
        ``license``, ...)."""
        e = self.entry
        sizes = [f.size for f in e.files if f.size]
        return {
            "categories": imagenet_categories(),
            "metrics": {"ImageNet-1K": {"acc@1": e.top1, "acc@5": e.top5}},
            "metrics_source": e.metrics_source,
            "num_params": e.num_params,
            "macs": e.macs,
            "input_size": (e.input_size, e.input_size),
            "min_size": (32, 32),
            "file_size": e.files[0].size,
            "license": e.license,
            "license_source": e.license_source,
            "paper": e.paper,
            "docs": e.upstream,
            "recipe": e.upstream,
            "_metrics": {"ImageNet-1K": {"acc@1": e.top1, "acc@5": e.top5}},
            "_ops": round(e.macs / 1e9, 3),
            "_file_size": round(sizes[0] / 2**20, 3) if sizes else None,
            "_docs": f"The authors' ImageNet-1k weights; accuracy: {e.metrics_source}. "
                     f"Evaluated at {e.input_size}x{e.input_size} after resizing to {e.resize_size} "
                     f"({e.interpolation}).",
        }

    @property
    def pinned(self) -> bool:
        """Whether every file of these weights has a published checksum; if not, they are
        trusted on first use (see ``_trust.py``)."""
        return all(f.pinned for f in self.entry.files)

    def get_state_dict(self, progress: bool = True, map_location: torch.device | str = "cpu",
                       require_pinned: bool | None = None, **fetch_options: Any) -> dict[str, torch.Tensor]:
        """The verified tensors, read straight onto ``map_location``. ``require_pinned`` (default:
        ``$GHOSTNET_HUB_REQUIRE_PINNED``) refuses weights without a published checksum.
        ``fetch_options`` go to ``download.fetch_first`` (cache, offline, mirror, options)."""
        path, file = _trust.fetch(self.entry.files, require_pinned_weights=require_pinned, progress=progress,
                                  **fetch_options)
        return released_state_dict(read_state_dict(path, format=file.format, map_location=map_location), path)


def get_weights(name: str, manifest: Manifest | str | os.PathLike | None = None) -> Weights:
    """The ``Weights`` of model ``name`` in ``manifest`` (a ``Manifest`` or its path; by
    default ``$GHOSTNET_HUB_MANIFEST``, else the repository's)."""
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    if name not in manifest.models:
        raise ValueError(
            f"{name!r} has no released weights; models with weights: {', '.join(manifest.models)}"
        )
    return Weights(name, manifest[name], manifest.source)


def pretrained_state_dict(name: str, *, progress: bool = True, map_location: torch.device | str = "cpu",
                          manifest: Manifest | str | os.PathLike | None = None,
                          **fetch_options: Any) -> dict[str, torch.Tensor]:
    """The published weights of model ``name``, verified against the manifest: a shortcut
    for ``get_weights(name, manifest).get_state_dict(...)``."""
    return get_weights(name, manifest).get_state_dict(progress=progress, map_location=map_location, **fetch_options)


@dataclass(frozen=True)
class Checkpoint:
    """A user's checkpoint, read once: its state dict (unwrapped), the model description it
    carries if this package wrote it (else None), and the SHA-256 of the bytes read."""

    path: pathlib.Path
    state: dict[str, torch.Tensor]
    description: ModelDescription | None
    sha256: str


def read_checkpoint(source: str | os.PathLike, *, sha256: str | None = None, progress: bool = True,
                    map_location: torch.device | str = "cpu", max_bytes: int | None = None,
                    **fetch_options: Any) -> Checkpoint:
    """A user's checkpoint (local path or http(s) URL), e.g. a fine-tuned model.

    With ``sha256`` the file must match it: the bytes hashed are the bytes loaded. A
    training checkpoint is unwrapped: the state dict nested under ``state_dict``/
    ``model_state_dict``/``model``, and DDP's ``module.`` prefix removed. A checkpoint written
    by ``finetune`` (or any file with a ``description``) brings its model description. A file
    larger than ``max_bytes`` (see ``checkpoint_limit``) is refused unread.
    """
    source = os.fspath(source)
    if download.is_url(source):
        path = download.fetch_url(source, sha256=sha256, progress=progress, **fetch_options)
        sha256 = None  # fetch_url checked it
    else:
        path = pathlib.Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
    data, actual = _checked_bytes(path, sha256, None, max_bytes)
    obj = _deserialize(data, path, None, torch.device(map_location))
    description = description_in_checkpoint(obj, str(path))
    return Checkpoint(path, released_state_dict(obj, path), description, actual)


def user_state_dict(weights: str | os.PathLike, *, sha256: str | None = None, progress: bool = True,
                    map_location: torch.device | str = "cpu", max_bytes: int | None = None,
                    **fetch_options: Any) -> dict[str, torch.Tensor]:
    """The state dict of a user's checkpoint: ``read_checkpoint(...).state``."""
    return read_checkpoint(weights, sha256=sha256, progress=progress, map_location=map_location,
                           max_bytes=max_bytes, **fetch_options).state
