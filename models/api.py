"""The public API: model builders with pretrained weights and devices, torchvision style.

``tinynet_a(pretrained=True, device="cuda")`` builds the module with no random init (on the
meta device), fetches the verified weights straight onto ``device``, and loads them strictly.
The same builders are the torch.hub entry points (see ``hubconf.py``). The registry is the
family modules' ``VARIANTS`` tables; nothing here is written per model but the entry points.
"""
from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

import torch

from . import ghostnet, tinynet
from ._base import ImageClassifier, Variant
from .manifest import DEFAULT_MANIFEST, Manifest, load_manifest
from .weights import Weights, get_weights, user_state_dict

# Where this repository lives on GitHub, for the examples in the help text.
GITHUB_REPO = "OWNER/REPO"

_VARIANTS: dict[str, Variant] = {**ghostnet.VARIANTS, **tinynet.VARIANTS}

# The arguments every builder takes (the build arguments, then its class's own options,
# ``Variant.options``): type, default, what it does. The one source of the help text; the
# README's argument table is tested against it.
_ARGUMENT_DOCS = {
    "pretrained": ("bool", "False", "load the published ImageNet weights, verified against "
                   "weights_manifest.json (downloaded once, then read from the cache); the model comes back "
                   "in eval mode."),
    "progress": ("bool", "True", "show the download progress bar on stderr."),
    "device": ("", "None", "'cpu' (default), 'cuda', 'cuda:1', 'mps' or a torch.device; weights load "
               "straight onto it."),
    "num_classes": ("int", "1000", "classifier outputs. With pretrained=True and a value other than 1000 the "
                    "backbone is pretrained and the head is new (a warning says so); 0 returns the pooled "
                    "1280-d features."),
    "weights": ("str | path", "None", "a local path or http(s) URL of your own checkpoint (e.g. fine-tuned), "
                "loaded strictly; training checkpoints ({'state_dict': ...}, DDP 'module.') are unwrapped."),
    "weights_sha256": ("str", "None", "the SHA-256 that the weights= file must have."),
    "in_chans": ("int", "3", "input channels; pretrained stem filters are adapted."),
    "drop_rate": ("float", "0.2", "dropout before the classifier during training."),
    "features_only": ("bool", "False", "return feature maps at strides 2..32 instead of logits."),
    "out_indices": ("tuple", "(0, 1, 2, 3, 4)", "which feature maps features_only returns."),
    "fuse": ("bool", "False", "fold BatchNorm into the convolutions for faster inference (eval-only model)."),
    "channels_last": ("bool", "False", "keep weights and inputs in channels_last memory layout."),
}
_BUILD_ARGUMENTS = ("pretrained", "progress", "device", "num_classes", "weights", "weights_sha256", "fuse",
                    "channels_last")


@lru_cache(maxsize=1)
def _default_manifest() -> Manifest:
    # The repository's own manifest: a broken $GHOSTNET_HUB_MANIFEST must not break import.
    return load_manifest(DEFAULT_MANIFEST)


def list_models(pretrained_only: bool = False) -> list[str]:
    """Names of the models; with ``pretrained_only`` those with released weights."""
    if pretrained_only:
        return [name for name in _VARIANTS if name in load_manifest().models]
    return list(_VARIANTS)


def get_variant(name: str) -> Variant:
    """The ``Variant`` behind model ``name``: class, architecture arguments, title, timm's name."""
    if name not in _VARIANTS:
        raise ValueError(f"unknown model {name!r}; models: {', '.join(_VARIANTS)}")
    return _VARIANTS[name]


def _reject_unknown_kwargs(builder: str, kwargs: dict, accepted: Iterable[str]) -> None:
    """Raise a TypeError naming every unknown keyword, with a suggestion for typos.

    The original GhostNet hub entry swallowed ``**kwargs``, so ``num_classes=10`` silently
    built a 1000-class model; here a misspelt option stops the build.
    """
    accepted = sorted(accepted)
    unknown = [key for key in kwargs if key not in accepted]
    if not unknown:
        return
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, accepted, n=1)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(
        f"{builder}() got unexpected keyword argument(s) {', '.join(parts)}; "
        f"it accepts: {', '.join(accepted)}"
    )


# -- devices ------------------------------------------------------------------------------

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
    weights: Weights | str | os.PathLike | None = None,
    weights_sha256: str | None = None,
    fuse: bool = False,
    channels_last: bool = False,
    **options: Any,
) -> ImageClassifier:
    """Build model ``name``; see ``help(models.tinynet_a)`` for the arguments.

    ``weights`` may also be a ``Weights`` (published weights, e.g. from another manifest:
    ``get_weights(name, manifest)``), which is what ``pretrained=True`` uses by default.
    """
    variant = get_variant(name)
    _reject_unknown_kwargs(name, options, _BUILD_ARGUMENTS + variant.options)
    for flag, value in (("pretrained", pretrained), ("progress", progress), ("fuse", fuse),
                        ("channels_last", channels_last)):
        _check_flag(flag, value)
    if pretrained and weights is not None:
        raise ValueError("pass pretrained=True (the published weights) or weights=<your checkpoint>, not both")
    if weights_sha256 is not None and (weights is None or isinstance(weights, Weights)):
        raise ValueError("weights_sha256 checks a file given with weights=; none was given")
    target = resolve_device(device)
    # Fails early, before any download, for a variant without weights.
    published = get_weights(name) if pretrained else weights if isinstance(weights, Weights) else None
    if published is not None and published.name != name:
        raise ValueError(f"weights for {published.name} cannot be loaded into {name}")
    checkpoint = None if published is not None else weights
    model = _build(name, variant, target=target, num_classes=num_classes, published=published,
                   checkpoint=checkpoint, checkpoint_sha256=weights_sha256, progress=progress, options=options)
    if fuse:
        model.fuse(channels_last=channels_last)
    elif channels_last:
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    return model


def _build(name: str, variant: Variant, *, target: torch.device, num_classes: int, published: Weights | None,
           checkpoint: str | os.PathLike | None, checkpoint_sha256: str | None, progress: bool,
           options: dict) -> ImageClassifier:
    if published is None and checkpoint is None:
        with torch.device(target):  # random init happens on the device itself
            model = variant.build(num_classes=num_classes, **options)
        model.pretrained_weights = None
        return model

    # Built on the meta device: no memory, no random init to be overwritten.
    load_classes = 1000 if published is not None else num_classes
    with torch.device("meta"):
        model = variant.build(num_classes=load_classes, **options)
    if published is not None:
        state = published.get_state_dict(progress=progress, map_location=target)
        stem = state.get("conv_stem.weight")
        if stem is not None and stem.shape[1] != model.in_chans:
            state["conv_stem.weight"] = _adapt_stem(stem, model.in_chans)
    else:
        state = user_state_dict(checkpoint, sha256=checkpoint_sha256, progress=progress, map_location=target)
    if model.features_only:
        # A backbone uses a subset of the checkpoint; the rest (head) is not needed.
        wanted = model.state_dict().keys()
        state = {key: value for key, value in state.items() if key in wanted}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        source = f"the published {name} weights" if published is not None else os.fspath(checkpoint)
        raise RuntimeError(f"{source} do not fit {name} built with {options or 'default options'} "
                           f"and num_classes={load_classes}:\n{exc}") from None
    if published is not None and not model.features_only and num_classes != load_classes:
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
    manifest = _default_manifest()
    variant = _VARIANTS[name]
    lines = [f"{variant.title}.", ""]
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
        lines += [
            "No released weights: pretrained=True is an error; train it yourself or pass weights=.",
            f"Size: {variant.num_params:,} parameters, {variant.macs / 1e6:.2f} M MACs at 224x224.",
        ]
    lines += ["", "Args:"]
    model_options = tuple(o for o in variant.options if o not in _BUILD_ARGUMENTS)
    for arg in _BUILD_ARGUMENTS[:6] + model_options + _BUILD_ARGUMENTS[6:]:
        kind, default, doc = _ARGUMENT_DOCS[arg]
        lines.append(f"    {arg}{f' ({kind})' if kind else ''}: {doc} Default: {default}.")
    lines += ["", "Example:"]
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
        weights: Weights | str | os.PathLike | None = None,
        **options: Any,
    ) -> ImageClassifier:
        return get_model(name, pretrained=pretrained, progress=progress, device=device,
                         num_classes=num_classes, weights=weights, **options)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = _help_text(name)
    return entry


# The entry points: one line per model, kept explicit because they are the public contract
# (hubconf.py repeats them for torch.hub). A test checks this list against VARIANTS.
ghostnet_0_5x = _entry_point("ghostnet_0_5x")
ghostnet_1x = _entry_point("ghostnet_1x")
ghostnet_1_3x = _entry_point("ghostnet_1_3x")
tinynet_a = _entry_point("tinynet_a")
tinynet_b = _entry_point("tinynet_b")
tinynet_c = _entry_point("tinynet_c")
tinynet_d = _entry_point("tinynet_d")
tinynet_e = _entry_point("tinynet_e")

__all__ = ["GITHUB_REPO", "Weights", "get_model", "get_variant", "get_weights", "list_models", "resolve_device",
           *_VARIANTS]
