"""The public API: model builders with pretrained weights and devices, torchvision style.

``tinynet_a(pretrained=True, device="cuda")`` builds the module with no random init (on the
meta device), fetches the verified weights straight onto ``device``, and loads them strictly.
The same builders are the torch.hub entry points (see ``hubconf.py``).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch
from torch import nn

from . import ghostnet, tinynet
from ._base import ImageClassifier, reject_unknown_kwargs
from .manifest import DEFAULT_MANIFEST, ModelEntry, load_manifest
from .weights import pretrained_state_dict, user_state_dict

__all__ = ["GITHUB_REPO", "Weights", "get_model", "get_weights", "list_models"]

# Where this repository lives on GitHub, for examples in the help text.
GITHUB_REPO = "OWNER/REPO"

_ARCHITECTURES: dict[str, Callable[..., ImageClassifier]] = {
    "ghostnet_0_5x": ghostnet.ghostnet_0_5x,
    "ghostnet_1x": ghostnet.ghostnet_1x,
    "ghostnet_1_3x": ghostnet.ghostnet_1_3x,
    "tinynet_a": tinynet.tinynet_a,
    "tinynet_b": tinynet.tinynet_b,
    "tinynet_c": tinynet.tinynet_c,
    "tinynet_d": tinynet.tinynet_d,
    "tinynet_e": tinynet.tinynet_e,
}
# Size and cost of the variants the manifest does not describe (no released weights);
# tests check them against the code.
_UNRELEASED = {
    "ghostnet_0_5x": (2_587_292, 42_328_152),
    "ghostnet_1_3x": (7_358_820, 227_003_256),
}
_TITLES = {
    "ghostnet_0_5x": "GhostNet 0.5x (Han et al., CVPR 2020)",
    "ghostnet_1x": "GhostNet 1.0x (Han et al., CVPR 2020)",
    "ghostnet_1_3x": "GhostNet 1.3x (Han et al., CVPR 2020)",
    **{
        name: f"TinyNet-{name[-1].upper()} (Han et al., NeurIPS 2020): EfficientNet-B0 scaled by "
              f"r={r}, w={w}, d={d}"
        for name, (r, w, d) in tinynet._TINYNETS.items()
    },
}
_MODEL_OPTIONS = ("in_chans", "drop_rate", "features_only", "out_indices")
_INFERENCE_OPTIONS = ("fuse", "channels_last")
_ARGUMENTS = ("pretrained", "progress", "device", "num_classes", "weights", "weights_sha256") + _MODEL_OPTIONS \
    + _INFERENCE_OPTIONS


# -- weights objects ----------------------------------------------------------------------

@dataclass(frozen=True)
class Weights:
    """The published ImageNet weights of one model: where they are, how to feed the model,
    what it outputs. Shaped like torchvision's weights enums (``url``, ``transforms()``,
    ``meta``)."""

    name: str
    entry: ModelEntry

    @property
    def urls(self) -> list[str]:
        """Every URL of every file, in the order they are tried."""
        return [url for f in self.entry.files for url in f.urls]

    @property
    def url(self) -> str:
        return self.entry.files[0].urls[0]

    def transforms(self) -> nn.Module:
        """torchvision's ``ImageClassification`` preset with this model's resize, crop,
        interpolation and normalisation (PIL image or uint8/float tensor in, batch-ready
        float tensor out)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms._presets import ImageClassification

        return ImageClassification(
            crop_size=self.entry.input_size,
            resize_size=self.entry.resize_size,
            mean=self.entry.mean,
            std=self.entry.std,
            interpolation=InterpolationMode(self.entry.interpolation),
        )

    @property
    def meta(self) -> dict[str, Any]:
        e = self.entry
        return {
            "categories": _imagenet_categories(),
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
        }

    def get_state_dict(self, progress: bool = True, map_location: torch.device | str = "cpu") -> dict:
        return pretrained_state_dict(self.name, progress=progress, map_location=map_location)


@lru_cache(maxsize=1)
def _default_manifest():
    return load_manifest(DEFAULT_MANIFEST)


@lru_cache(maxsize=1)
def _imagenet_categories() -> list[str]:
    # torchvision's public list of the 1000 ImageNet-1k class names, index-aligned with
    # the classifier; reading it from a weights enum downloads nothing.
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def list_models(pretrained_only: bool = False) -> list[str]:
    """Names of the models; with ``pretrained_only`` those with released weights."""
    if pretrained_only:
        return [name for name in _ARCHITECTURES if name in load_manifest().models]
    return list(_ARCHITECTURES)


def get_weights(name: str) -> Weights:
    """The ``Weights`` of model ``name`` (from the manifest in use)."""
    manifest = load_manifest()
    if name not in manifest.models:
        raise ValueError(
            f"{name!r} has no released weights; models with weights: {', '.join(manifest.models)}"
        )
    return Weights(name, manifest[name])


# -- devices ------------------------------------------------------------------------------

def _available_devices() -> list[str]:
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def _resolve_device(device: Any) -> torch.device:
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


# -- building -----------------------------------------------------------------------------

def _adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """RGB stem filters for ``in_chans`` inputs, keeping the sum over input channels, so a
    uniform image gives the same response as its RGB version: with fewer than 3 channels the
    RGB filters are folded onto them (grayscale: summed); with more, they are cycled and
    each copy divided by how many copies it has."""
    out, _, kh, kw = weight.shape
    if in_chans <= 3:
        adapted = weight.new_zeros(out, in_chans, kh, kw)
        for c in range(3):
            adapted[:, c % in_chans] += weight[:, c]
        return adapted
    source = torch.arange(in_chans, device=weight.device) % 3
    copies = torch.bincount(source, minlength=3)[source].to(weight.dtype)
    return weight[:, source] / copies.view(1, -1, 1, 1)


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def get_model(
    name: str,
    *,
    pretrained: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    num_classes: int = 1000,
    weights: str | os.PathLike | None = None,
    weights_sha256: str | None = None,
    fuse: bool = False,
    channels_last: bool = False,
    **options: Any,
) -> ImageClassifier:
    """Build model ``name``; see ``help(models.tinynet_a)`` for the arguments."""
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; models: {', '.join(_ARCHITECTURES)}")
    reject_unknown_kwargs(name, options, _ARGUMENTS)
    for flag, value in (("pretrained", pretrained), ("progress", progress), ("fuse", fuse),
                        ("channels_last", channels_last)):
        _check_flag(flag, value)
    model = _build(name, pretrained, progress, _resolve_device(device), num_classes, weights, weights_sha256, options)
    if fuse:
        model.fuse(channels_last=channels_last)
    elif channels_last:
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    return model


def _build(name: str, pretrained: bool, progress: bool, target: torch.device, num_classes: int,
           weights: str | os.PathLike | None, weights_sha256: str | None, options: dict) -> ImageClassifier:
    if pretrained and weights is not None:
        raise ValueError("pass pretrained=True (the published weights) or weights=<your checkpoint>, not both")
    if weights_sha256 is not None and weights is None:
        raise ValueError("weights_sha256 checks a file given with weights=; none was given")
    build = _ARCHITECTURES[name]
    # Fails early, before any download, for a variant without weights.
    published = get_weights(name) if pretrained else None

    if not pretrained and weights is None:
        with torch.device(target):  # random init happens on the device itself
            model = build(num_classes=num_classes, **options)
        model.pretrained_weights = None
        return model

    # Built on the meta device: no memory, no random init to be overwritten.
    load_classes = 1000 if pretrained else num_classes
    with torch.device("meta"):
        model = build(num_classes=load_classes, **options)
    if pretrained:
        state = pretrained_state_dict(name, progress=progress, map_location=target)
    else:
        state = user_state_dict(weights, sha256=weights_sha256, progress=progress, map_location=target)
    stem = state.get("conv_stem.weight")
    if stem is not None and pretrained and stem.shape[1] != model.in_chans:
        state["conv_stem.weight"] = _adapt_stem(stem, model.in_chans)
    if model.features_only:
        # A backbone uses a subset of the checkpoint; the rest (head) is not needed.
        state = {key: value for key, value in state.items() if key in model.state_dict()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        source = f"the published {name} weights" if pretrained else f"{os.fspath(weights)}"
        raise RuntimeError(f"{source} do not fit {name} built with {options or 'default options'} "
                           f"and num_classes={load_classes}:\n{exc}") from None
    if pretrained and not model.features_only and num_classes != load_classes:
        model.reset_classifier(num_classes)  # on the device, freshly initialised
        if num_classes:
            warnings.warn(
                f"{name}: pretrained backbone loaded; the classifier for num_classes={num_classes} is new "
                "and untrained (the published head has 1000 ImageNet classes)",
                UserWarning,
                stacklevel=3,
            )
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # would be a bug: every tensor must have come from the file or a fresh init
        raise RuntimeError(f"{name}: tensors not loaded: {leftover[:5]}")
    model.pretrained_weights = published
    return model.eval()


def _help_text(name: str) -> str:
    # The repository's own manifest: a broken $GHOSTNET_HUB_MANIFEST must not break import.
    manifest = _default_manifest()
    lines = [f"{_TITLES[name]}.", ""]
    if name in manifest.models:
        e = manifest[name]
        lines += [
            f"ImageNet-1k: top-1 {e.top1} %, top-5 {e.top5} % ({e.metrics_source}).",
            f"Size: {e.num_params:,} parameters, {e.macs / 1e6:.2f} M MACs at {e.input_size}x{e.input_size}.",
            f"Preprocessing: RGB in [0, 1], resize the shorter side to {e.resize_size} ({e.interpolation}), "
            f"center-crop {e.input_size}, normalise with mean {tuple(e.mean)} and std {tuple(e.std)}.",
            "A model loaded with pretrained=True carries it: model.pretrained_weights.transforms() is that "
            "preprocessing (torchvision's ImageClassification) and model.pretrained_weights.meta['categories'] "
            "the 1000 class names.",
            f"Weights license: {e.license}. Paper: {e.paper}",
        ]
    else:
        params, macs = _UNRELEASED[name]
        lines += [
            "No released weights: pretrained=True is an error; train it yourself or pass weights=.",
            f"Size: {params:,} parameters, {macs / 1e6:.2f} M MACs at 224x224.",
        ]
    lines += [
        "",
        "Args:",
        "    pretrained (bool): load the published ImageNet weights, verified against weights_manifest.json",
        "        (download once, then from the cache); the model comes back in eval mode.",
        "    progress (bool): show the download progress bar on stderr.",
        "    device: 'cpu' (default), 'cuda', 'cuda:1', 'mps' or a torch.device; weights load straight onto it.",
        "    num_classes (int): classifier outputs. With pretrained=True and a value other than 1000 the",
        "        backbone is pretrained and the head is new (a warning says so); 0 returns the pooled",
        "        1280-d features.",
        "    weights (str | path): a local path or http(s) URL of your own checkpoint (e.g. fine-tuned),",
        "        loaded strictly; training checkpoints ({'state_dict': ...}, DDP 'module.') are unwrapped.",
        "    weights_sha256 (str): the SHA-256 that file must have.",
        "    in_chans (int): input channels, default 3; pretrained stem filters are adapted.",
        "    drop_rate (float): dropout before the classifier during training.",
        "    features_only (bool), out_indices (tuple): return feature maps at strides 2..32 instead.",
        "    fuse (bool): fold BatchNorm into the convolutions for faster inference (eval-only model).",
        "    channels_last (bool): keep weights and inputs in channels_last memory layout.",
        "",
        "Example:",
    ]
    if name in manifest.models:
        lines += [
            f"    model = torch.hub.load('{GITHUB_REPO}', '{name}', pretrained=True, trust_repo=True)",
            "    top5 = model(model.pretrained_weights.transforms()(image).unsqueeze(0)).softmax(-1).topk(5)",
        ]
    else:
        lines += [
            f"    model = torch.hub.load('{GITHUB_REPO}', '{name}', num_classes=10, trust_repo=True)",
            "    logits = model(torch.randn(8, 3, 224, 224))",
        ]
    return "\n".join(lines)


def _entry_point(name: str) -> Callable[..., ImageClassifier]:
    def entry(
        pretrained: bool = False,
        progress: bool = True,
        device: str | torch.device | None = None,
        num_classes: int = 1000,
        weights: str | os.PathLike | None = None,
        **options: Any,
    ) -> ImageClassifier:
        return get_model(name, pretrained=pretrained, progress=progress, device=device,
                         num_classes=num_classes, weights=weights, **options)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = _help_text(name)
    return entry


ghostnet_0_5x = _entry_point("ghostnet_0_5x")
ghostnet_1x = _entry_point("ghostnet_1x")
ghostnet_1_3x = _entry_point("ghostnet_1_3x")
tinynet_a = _entry_point("tinynet_a")
tinynet_b = _entry_point("tinynet_b")
tinynet_c = _entry_point("tinynet_c")
tinynet_d = _entry_point("tinynet_d")
tinynet_e = _entry_point("tinynet_e")
