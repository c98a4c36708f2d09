"""Manifest entry -> ``Weights`` -> verified local file -> state dict, without ever running
code from the file. ``Weights.get_state_dict`` is the only path from a model name to tensors."""
from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _trust, download
from ._presets import classification_preset, imagenet_categories
from ._state_dicts import (
    CheckpointError,
    UnsafeCheckpointError,
    checked_bytes,
    checkpoint_limit,
    deserialize,
    read_state_dict,
    released_state_dict,
)
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

    def provenance(self) -> tuple[str, str | None]:
        """What a model description records of these weights: a line naming them with their
        published checksums, and their SHA-256 if one is published."""
        checksums = self.entry.files[0].checksums
        shown = ", ".join(f"{algo} {digest}" for algo, digest in checksums.items()) or "unpinned: trusted on first use"
        return f"{self.entry.name} published ImageNet weights ({shown})", checksums.get("sha256")

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
    data, actual = checked_bytes(path, sha256, None, max_bytes)
    obj = deserialize(data, path, None, torch.device(map_location))
    description = description_in_checkpoint(obj, str(path))
    return Checkpoint(path, released_state_dict(obj, path), description, actual)


def user_state_dict(weights: str | os.PathLike, *, sha256: str | None = None, progress: bool = True,
                    map_location: torch.device | str = "cpu", max_bytes: int | None = None,
                    **fetch_options: Any) -> dict[str, torch.Tensor]:
    """The state dict of a user's checkpoint: ``read_checkpoint(...).state``."""
    return read_checkpoint(weights, sha256=sha256, progress=progress, map_location=map_location,
                           max_bytes=max_bytes, **fetch_options).state
