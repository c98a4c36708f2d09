"""The public API: model builders with pretrained weights and devices, torchvision style.

``tinynet_a(weights="DEFAULT", device="cuda")`` builds the module with no random init (on the
meta device), fetches the verified weights straight onto ``device``, and loads them strictly.
The same builders are the torch.hub entry points (see ``hubconf.py``). The registry is the
family modules' ``VARIANTS`` tables; nothing here is written per model but the entry points.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
import pathlib
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any

import torch

from . import _checkpoints, ghostnet, ghostnetv2, ghostnetv3, tinynet
from ._base import ImageClassifier, Variant
from ._devices import resolve_device
from .manifest import DEFAULT_MANIFEST, Manifest, ModelEntry, load_manifest
from .pretrained import WeightsEnum, get_model_weights, get_weight, resolve_weights
from .weights import Checkpoint, CheckpointError, Weights, get_weights, read_checkpoint

# Where this repository lives on GitHub, for the examples in the help text.
GITHUB_REPO = "OWNER/REPO"

_VARIANTS: dict[str, Variant] = {**ghostnet.VARIANTS, **ghostnetv2.VARIANTS, **ghostnetv3.VARIANTS, **tinynet.VARIANTS}

# The arguments every builder takes (the build arguments, then its class's own options,
# ``Variant.options``): type, default, what it does. The one source of the help text; the
# README's argument table is tested against it.
_ARGUMENT_DOCS = {
    "pretrained": ("bool", "False", "the same as weights='DEFAULT', as in the original hub entry and timm."),
    "weights": ("str | WeightsEnum", "None", "published ImageNet weights, named as in torchvision: 'DEFAULT', "
                "'IMAGENET1K_V1', TinyNet_A_Weights.DEFAULT or 'TinyNet_A_Weights.IMAGENET1K_V1'. They are "
                "verified against weights_manifest.json (downloaded once, then read from the cache) and the model "
                "comes back in eval mode. A file path or URL here is an error: that is checkpoint=."),
    "progress": ("bool", "True", "show the download progress bar on stderr."),
    "device": ("", "None", "'cpu' (default), 'cuda', 'cuda:1', 'mps' or a torch.device; weights load "
               "straight onto it."),
    "num_classes": ("int", "None", "classifier outputs: 1000, or the classes a checkpoint= records (a "
                    "finetune checkpoint names them; a plain state dict's head has them). With published weights and "
                    "another value the backbone is pretrained and the head is new: a warning says so and the model "
                    "comes back in train mode, ready to fine-tune. 0 returns the pooled 1280-d features."),
    "checkpoint": ("str | path", "None", "your own checkpoint (e.g. fine-tuned), a local path or http(s) URL, "
                   "loaded strictly and without running code from it; training checkpoints ({'state_dict': ...}, "
                   "DDP 'module.') are unwrapped, and float16/bfloat16/float64 tensors are cast to float32 (with a "
                   "warning). A checkpoint written by finetune brings its class names and preprocessing "
                   "(model.pretrained_weights.meta['categories'], .transforms()); a model name or num_classes that "
                   "contradicts it is an error. The model comes back in eval mode."),
    "checkpoint_sha256": ("str", "None", "the SHA-256 that the checkpoint= file must have."),
    "in_chans": ("int", "3", "input channels; pretrained stem filters are adapted."),
    "drop_rate": ("float", "0.2", "dropout before the classifier during training."),
    "drop_path_rate": ("float", "0.0", "stochastic depth for training, as timm's: residual branches are dropped "
                       "with a probability rising linearly to this at the last block; 0 leaves the model as it was."),
    "features_only": ("bool", "False", "return feature maps at strides 2..32 instead of logits."),
    "out_indices": ("tuple", "(0, 1, 2, 3, 4)", "which feature maps features_only returns."),
    "fuse": ("bool", "False", "fold BatchNorm into the convolutions for faster inference (eval-only model)."),
    "channels_last": ("bool", "False", "keep weights and inputs in channels_last memory layout."),
    "require_pinned": ("bool", "None", "True refuses published weights that no checksum was ever published for "
                       "(they are trusted on first use instead: the GhostNetV2/V3 files); None follows "
                       "$GHOSTNET_HUB_REQUIRE_PINNED."),
}
_BUILD_ARGUMENTS = ("pretrained", "weights", "progress", "device", "num_classes", "checkpoint", "checkpoint_sha256",
                    "fuse", "channels_last", "require_pinned")
# Spellings that changed: using one is an error that names the new one.
_RENAMED = {"weights_sha256": "checkpoint_sha256"}


@lru_cache(maxsize=1)
def _default_manifest() -> Manifest:
    # The repository's own manifest: a broken $GHOSTNET_HUB_MANIFEST must not break import.
    return load_manifest(DEFAULT_MANIFEST)


def _patterns(argument: str, value: str | Sequence[str] | None) -> list[str]:
    patterns = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"list_models {argument} must be a wildcard pattern or a list of them, e.g. 'tinynet*', "
                        f"got {type(value).__name__} {value!r}")
    return [p for p in patterns if p]


def list_models(filter: str | Sequence[str] = "", *, pretrained: bool = False,
                include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                **removed: Any) -> list[str]:
    """Names of the models, in registry order, as timm's and torchvision's ``list_models``:
    ``filter`` / ``include`` keep the names matching any of the wildcard patterns (``"tinynet*"``),
    ``exclude`` drops those matching any, ``pretrained=True`` keeps those with released weights."""
    if "pretrained_only" in removed:
        raise TypeError("list_models(pretrained_only=...) is now list_models(pretrained=...), as in timm")
    if removed:
        raise TypeError(f"list_models() got unexpected keyword argument(s) {', '.join(map(repr, removed))}")
    _check_flag("pretrained", pretrained)
    names = list(_VARIANTS)
    for argument, value in (("filter", filter), ("include", include)):
        patterns = _patterns(argument, "" if value is None else value)
        if patterns:
            names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    excluded = _patterns("exclude", "" if exclude is None else exclude)
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in excluded)]
    if pretrained:
        released = load_manifest().models
        names = [n for n in names if n in released]
    return names


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
    renamed = [key for key in unknown if key in _RENAMED]
    if renamed:
        raise TypeError(f"{builder}(): {renamed[0]}= is now {_RENAMED[renamed[0]]}= (your own file goes to "
                        "checkpoint=; weights= names published weights, as in torchvision)")
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, accepted, n=1)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(
        f"{builder}() got unexpected keyword argument(s) {', '.join(parts)}; "
        f"it accepts: {', '.join(accepted)}"
    )


# -- building -----------------------------------------------------------------------------

def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def get_model(
    name: str,
    *,
    pretrained: bool = False,
    weights: WeightsEnum | Weights | str | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    num_classes: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_sha256: str | None = None,
    fuse: bool = False,
    channels_last: bool = False,
    require_pinned: bool | None = None,
    **options: Any,
) -> ImageClassifier:
    """Build model ``name``; see ``help(models.tinynet_a)`` for the arguments.

    ``weights`` may also be a ``Weights`` handle from another manifest, ``get_weights(name,
    manifest)``, which is how the command-line tools pass ``--manifest``.
    """
    variant = get_variant(name)
    _reject_unknown_kwargs(name, options, _BUILD_ARGUMENTS + variant.options)
    for flag, value in (("pretrained", pretrained), ("progress", progress), ("fuse", fuse),
                        ("channels_last", channels_last)):
        _check_flag(flag, value)
    if require_pinned is not None:
        _check_flag("require_pinned", require_pinned)
    if pretrained and weights is not None:
        raise ValueError("pretrained=True is weights='DEFAULT': pass one of them, not both")
    # Resolved before anything is built or downloaded: a model without weights fails here.
    published = resolve_weights(name, "DEFAULT" if pretrained else weights)
    if checkpoint is not None:
        if published is not None:
            raise ValueError("pass published weights (weights=, pretrained=True) or your checkpoint=, not both")
        if not isinstance(checkpoint, (str, os.PathLike, Checkpoint)):
            raise TypeError(f"checkpoint must be a path or URL, got {type(checkpoint).__name__} {checkpoint!r}")
    elif checkpoint_sha256 is not None:
        raise ValueError("checkpoint_sha256 checks the file given with checkpoint=; none was given")
    target = resolve_device(device)
    model = _build(name, variant, target=target, num_classes=num_classes, published=published,
                   checkpoint=checkpoint, checkpoint_sha256=checkpoint_sha256, progress=progress, options=options,
                   require_pinned=require_pinned)
    if fuse:
        model.fuse(channels_last=channels_last)
    elif channels_last:
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    return model


def from_checkpoint(checkpoint: str | os.PathLike, *, model: str | None = None, checkpoint_sha256: str | None = None,
                    num_classes: int | None = None, progress: bool = True, device: str | torch.device | None = None,
                    **options: Any) -> ImageClassifier:
    """The model of your checkpoint (a local path or http(s) URL), read once. A checkpoint
    written by ``finetune`` names its model, class names and preprocessing, so ``model`` is
    not needed (and must agree if given); a plain state dict needs ``model``. ``options`` are
    ``get_model``'s (``fuse``, ``channels_last``, ``drop_rate``, ...)."""
    target = resolve_device(device)
    loaded = read_checkpoint(checkpoint, sha256=checkpoint_sha256, progress=progress, map_location=target)
    if loaded.description is not None:
        loaded.description.check(str(loaded.path), model=model, num_classes=num_classes)
        model = loaded.description.architecture
    elif model is None:
        raise ValueError(f"{loaded.path} is a plain state dict that does not name its model: say which it is "
                         f"(one of {', '.join(_VARIANTS)})")
    return get_model(model, checkpoint=loaded, num_classes=num_classes, progress=progress, device=target, **options)


# Files whose frames a warning about the user's call skips: this package, hubconf.py and torch.hub.
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
_INTERNAL_FILES = (str(_PACKAGE_DIR.parent / "hubconf.py"), os.path.realpath(torch.hub.__file__))


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by this function's caller point at the
    first line outside this package: the user's ``tinynet_a(...)``, ``get_model(...)`` or
    ``torch.hub.load(...)``, whichever entry was used."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        path = os.path.realpath(frame.f_code.co_filename)
        if not (path.startswith(str(_PACKAGE_DIR) + os.sep) or path in _INTERNAL_FILES):
            return level
        frame, level = frame.f_back, level + 1
    return level


def _recipe(name: str, published: Weights | None) -> ModelEntry | None:
    if published is not None:
        return published.entry
    return _default_manifest().models.get(name)


def _build(name: str, variant: Variant, *, target: torch.device, num_classes: int | None,
           published: Weights | None, checkpoint: str | os.PathLike | None, checkpoint_sha256: str | None,
           progress: bool, options: dict, require_pinned: bool | None = None) -> ImageClassifier:
    if published is None and checkpoint is None:
        with torch.device(target):  # random init happens on the device itself
            model = variant.build(num_classes=1000 if num_classes is None else num_classes, **options)
        return _describe(model, name, published)

    loaded: Checkpoint | None = None
    if published is not None:
        load_classes, source = 1000, f"the published {name} weights"
        state = published.get_state_dict(progress=progress, map_location=target, require_pinned=require_pinned)
    else:
        loaded = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(
            checkpoint, sha256=checkpoint_sha256, progress=progress, map_location=target)
        source = str(loaded.path)
        load_classes, options = _checkpoints.build_arguments(name, variant, loaded, num_classes, options)
        state = loaded.state
    # Built on the meta device: no memory, no random init to be overwritten.
    with torch.device("meta"):
        model = variant.build(num_classes=load_classes, **options)
    stem = state.get("conv_stem.weight")
    if published is not None and stem is not None and stem.shape[1] != model.in_chans:
        state["conv_stem.weight"] = _checkpoints.adapt_stem(stem, model.in_chans)
    checked, state = _checkpoints.for_backbone(model, variant, state, load_classes, options)
    problem = _checkpoints.mismatch(checked, state)
    if problem:
        fits = _checkpoints.fits_instead(name, state, _VARIANTS)
        raise CheckpointError(f"{source} does not fit {name} built with {options or 'default options'} and "
                              f"num_classes={load_classes}: {problem}{fits}")
    state = _checkpoints.as_float32(state, source, _user_stacklevel() + 1)
    model.load_state_dict(state, strict=True, assign=True)
    requested = load_classes if num_classes is None else num_classes
    new_head = published is not None and not model.features_only and requested not in (load_classes, 0)
    if published is not None and not model.features_only and requested != load_classes:
        model.reset_classifier(requested)  # on the device, freshly initialised
    if new_head:
        warnings.warn(
            f"{name}: pretrained backbone loaded; the classifier for num_classes={requested} is new and untrained "
            "(the published head has 1000 ImageNet classes). The model is in train mode, ready to fine-tune.",
            UserWarning,
            stacklevel=_user_stacklevel(),
        )
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # would be a bug: every tensor must have come from the file or a fresh init
        raise RuntimeError(f"{name}: tensors not loaded: {leftover[:5]}")
    # Loaded weights are for inference; a new head is for training (BatchNorm must not stay frozen).
    model = _describe(model.train(new_head), name, published)
    if loaded is not None and not model.features_only:
        _checkpoints.carry(model, loaded)
    return model


def _describe(model: ImageClassifier, name: str, published: Weights | None) -> ImageClassifier:
    """Record what the model was built from: its published weights, and in ``pretrained_cfg``
    (timm's) the input it expects: the published recipe of ``name``."""
    model.pretrained_weights = published
    e = _recipe(name, published)
    if e is not None:
        model.pretrained_cfg.update(
            architecture=name, input_size=(model.in_chans, e.input_size, e.input_size),
            interpolation=e.interpolation, crop_pct=e.crop_ratio, mean=tuple(e.mean), std=tuple(e.std),
            num_classes=1000, license=e.license, paper_ids=e.paper,
        )
    else:
        model.pretrained_cfg["architecture"] = name
    return model


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
            f"Weights: {get_model_weights(name).__name__}.IMAGENET1K_V1 (the DEFAULT; also pretrained=True). "
            "A model loaded with them carries them: model.pretrained_weights.transforms() is that "
            "preprocessing (torchvision's ImageClassification) and model.pretrained_weights.meta['categories'] "
            "the 1000 class names.",
            f"Weights license: {e.license}. Paper: {e.paper}",
        ]
        if not all(f.pinned for f in e.files):
            lines.append("No checksum was ever published for these weights: they are trusted on first use (every "
                         "source compared, then held to what was seen); require_pinned=True refuses them.")
    else:
        lines += [
            "No released weights: weights= and pretrained=True are errors; train it yourself or pass "
            "checkpoint=.",
            f"Size: {variant.num_params:,} parameters, {variant.macs / 1e6:.2f} M MACs at 224x224.",
        ]
    if hasattr(variant.cls, "reparameterize"):
        lines.append("The size above is the deploy form's: the builder returns the training form (re-parameterisable "
                     "branches, more parameters); fuse=True or model.reparameterize() folds them.")
    lines += ["", "Args:"]
    model_options = tuple(o for o in variant.options if o not in _BUILD_ARGUMENTS)
    for arg in _BUILD_ARGUMENTS[:7] + model_options + _BUILD_ARGUMENTS[7:]:
        kind, default, doc = _ARGUMENT_DOCS[arg]
        lines.append(f"    {arg}{f' ({kind})' if kind else ''}: {doc} Default: {default}.")
    lines += ["", "Example:"]
    if name in manifest.models:
        lines += [
            f"    model = torch.hub.load('{GITHUB_REPO}', '{name}', weights='DEFAULT', trust_repo=True)",
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
        num_classes: int | None = None,
        weights: WeightsEnum | Weights | str | None = None,
        **options: Any,
    ) -> ImageClassifier:
        return get_model(name, pretrained=pretrained, weights=weights, progress=progress, device=device,
                         num_classes=num_classes, **options)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = _help_text(name)
    return entry


# The entry points: one line per model, kept explicit because they are the public contract
# (hubconf.py repeats them for torch.hub). A test checks this list against VARIANTS.
ghostnet_0_5x = _entry_point("ghostnet_0_5x")
ghostnet_1x = _entry_point("ghostnet_1x")
ghostnet_1_3x = _entry_point("ghostnet_1_3x")
ghostnetv2_1x = _entry_point("ghostnetv2_1x")
ghostnetv2_1_3x = _entry_point("ghostnetv2_1_3x")
ghostnetv2_1_6x = _entry_point("ghostnetv2_1_6x")
ghostnetv3_0_5x = _entry_point("ghostnetv3_0_5x")
ghostnetv3_1x = _entry_point("ghostnetv3_1x")
ghostnetv3_1_3x = _entry_point("ghostnetv3_1_3x")
ghostnetv3_1_6x = _entry_point("ghostnetv3_1_6x")
tinynet_a = _entry_point("tinynet_a")
tinynet_b = _entry_point("tinynet_b")
tinynet_c = _entry_point("tinynet_c")
tinynet_d = _entry_point("tinynet_d")
tinynet_e = _entry_point("tinynet_e")

__all__ = ["GITHUB_REPO", "Weights", "WeightsEnum", "from_checkpoint", "get_model", "get_model_weights", "get_variant",
           "get_weight", "get_weights", "list_models", "resolve_device", *_VARIANTS]
