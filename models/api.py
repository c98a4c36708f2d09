"""The public API: model builders with pretrained weights and devices, torchvision style.

``tinynet_a(weights="DEFAULT", device="cuda")`` builds the module with no random init (on the
meta device), fetches the verified weights straight onto ``device``, and loads them strictly.
The same builders are the torch.hub entry points (see ``hubconf.py``). The registry is the
family modules' ``VARIANTS`` tables; nothing here is written per model but the entry points.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
import os
import pathlib
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import torch

from . import _checkpoints
from ._base import ImageClassifier, Variant
from ._builder import Builder, check_dtype, is_meta
from ._devices import resolve_device
from ._help import GITHUB_REPO, help_text
from ._registry import VARIANTS, get_variant
from .ghostnet import GhostNet
from .ghostnetv2 import GhostNetV2
from .ghostnetv3 import GhostNetV3
from .manifest import ModelEntry, load_manifest
from .manifest import default_manifest as _default_manifest
from .pretrained import WeightsEnum, get_model_weights, get_weight, resolve_weights
from .tinynet import TinyNet
from .weights import Checkpoint, CheckpointError, Weights, get_weights, read_checkpoint

# Spellings that changed: using one is an error that names the new one.
_RENAMED = {"weights_sha256": "checkpoint_sha256"}


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
    names = list(VARIANTS)
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


def _reject_unknown_kwargs(builder: str, kwargs: dict, accepted: Iterable[str]) -> None:
    """Raise a TypeError naming every unknown keyword, with a suggestion for typos.

    The original GhostNet hub entry swallowed ``**kwargs``, so ``num_classes=10`` silently
    built a 1000-class model; here a misspelt option stops the build.
    """
    accepted = sorted(set(accepted))  # each once, however many lists name it
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
) -> ImageClassifier:
    """Build model ``name``; see ``help(models.tinynet_a)`` for the arguments.

    ``weights`` may also be a ``Weights`` handle from another manifest, ``get_weights(name,
    manifest)``, which is how the command-line tools pass ``--manifest``.
    """
    variant = get_variant(name)  # (**unknown is typed NoReturn: type checkers flag a misspelt keyword)
    _reject_unknown_kwargs(name, unknown, _DEFAULTS)
    for flag, value in (("pretrained", pretrained), ("progress", progress), ("fuse", fuse),
                        ("channels_last", channels_last)):
        _check_flag(flag, value)
    check_dtype(dtype)
    if require_pinned is not None:
        _check_flag("require_pinned", require_pinned)
    # The class's own options, passed on only when given, so the class checks them and keeps its defaults.
    given = {"in_chans": in_chans, "drop_rate": drop_rate, "drop_path_rate": drop_path_rate,
             "features_only": features_only, "out_indices": out_indices}
    options = {key: value for key, value in given.items() if value is not _DEFAULTS[key]}
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
    target = torch.device("meta") if is_meta(device) else resolve_device(device)
    if target.type == "meta" and checkpoint is not None:
        raise ValueError("device='meta' reads no file: build the model on 'meta' without checkpoint=, then "
                         "model.to_empty(device=...) and load your checkpoint into it")
    # Tensors without storage take no weights: on 'meta', the model the weights would give, nothing fetched.
    fetch = published if target.type != "meta" else None
    model = _build(name, variant, target=target, num_classes=num_classes, published=fetch, checkpoint=checkpoint,
                   checkpoint_sha256=checkpoint_sha256, progress=progress, options=options,
                   require_pinned=require_pinned)
    if published is not None and fetch is None:
        model = _describe(model.train(not model.features_only and num_classes not in (None, 1000, 0)), name, published)
    if fuse:
        model.fuse(channels_last=channels_last)
    elif channels_last:
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    if dtype is not None:  # after loading and fusing (folding BatchNorm is done in float64)
        model.to(dtype=dtype)
    return model


def from_checkpoint(checkpoint: str | os.PathLike, *, model: str | None = None, checkpoint_sha256: str | None = None,
                    num_classes: int | None = None, progress: bool = True, device: str | torch.device | None = None,
                    **options: Any) -> ImageClassifier:
    """The model of your checkpoint (a local path or http(s) URL), read once. A checkpoint
    written by ``finetune`` names its model, class names and preprocessing, so ``model`` is
    not needed (and must agree if given); a plain state dict needs ``model``. ``options`` are
    ``get_model``'s (``fuse``, ``channels_last``, ``drop_rate``, ...)."""
    target = resolve_device(device)
    loaded = read_checkpoint(checkpoint, sha256=checkpoint_sha256, progress=progress, map_location=target,
                             max_bytes=_checkpoints.size_limit(VARIANTS, [model] if model else list(VARIANTS),
                                                                num_classes))
    if loaded.description is not None:
        loaded.description.check(str(loaded.path), model=model, num_classes=num_classes)
        model = loaded.description.architecture
    elif model is None:
        raise ValueError(f"{loaded.path} is a plain state dict that does not name its model: say which it is "
                         f"(one of {', '.join(VARIANTS)})")
    return get_model(model, checkpoint=loaded, num_classes=num_classes, progress=progress, device=target, **options)


_GET_MODEL_SIGNATURE = inspect.signature(get_model)
_DEFAULTS = {p.name: p.default for p in list(_GET_MODEL_SIGNATURE.parameters.values())[1:-1]}  # name, **unknown


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
            checkpoint, sha256=checkpoint_sha256, progress=progress, map_location=target,
            max_bytes=_checkpoints.size_limit(VARIANTS, [name], num_classes))
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
        fits = _checkpoints.fits_instead(name, state, VARIANTS)
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


_M = TypeVar("_M", bound=ImageClassifier)


def _entry_point(name: str, family: type[_M]) -> Builder[_M]:
    """``get_model(name, ...)`` with its signature (for help() and IDEs), typed ``Builder[family]``."""

    def entry(*args: Any, **kwargs: Any) -> _M:
        return cast(_M, get_model(name, *args, **kwargs))

    entry.__signature__ = _GET_MODEL_SIGNATURE.replace(  # type: ignore[attr-defined]
        parameters=list(_GET_MODEL_SIGNATURE.parameters.values())[1:], return_annotation=family.__name__)
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = help_text(name, VARIANTS[name], _default_manifest())
    return entry


# The entry points: one line per model, kept explicit because they are the public contract
# (hubconf.py repeats them for torch.hub). A test checks this list against VARIANTS.
ghostnet_0_5x = _entry_point("ghostnet_0_5x", GhostNet)
ghostnet_1x = _entry_point("ghostnet_1x", GhostNet)
ghostnet_1_3x = _entry_point("ghostnet_1_3x", GhostNet)
ghostnetv2_1x = _entry_point("ghostnetv2_1x", GhostNetV2)
ghostnetv2_1_3x = _entry_point("ghostnetv2_1_3x", GhostNetV2)
ghostnetv2_1_6x = _entry_point("ghostnetv2_1_6x", GhostNetV2)
ghostnetv3_0_5x = _entry_point("ghostnetv3_0_5x", GhostNetV3)
ghostnetv3_1x = _entry_point("ghostnetv3_1x", GhostNetV3)
ghostnetv3_1_3x = _entry_point("ghostnetv3_1_3x", GhostNetV3)
ghostnetv3_1_6x = _entry_point("ghostnetv3_1_6x", GhostNetV3)
tinynet_a = _entry_point("tinynet_a", TinyNet)
tinynet_b = _entry_point("tinynet_b", TinyNet)
tinynet_c = _entry_point("tinynet_c", TinyNet)
tinynet_d = _entry_point("tinynet_d", TinyNet)
tinynet_e = _entry_point("tinynet_e", TinyNet)

_BUILDERS = list(VARIANTS)  # (a name of this module: the docs' reader, griffe, expands only those)
__all__ = ["GITHUB_REPO", "Weights", "WeightsEnum", "from_checkpoint", "get_model", "get_model_weights", "get_variant",
           "get_weight", "get_weights", "list_models", "resolve_device", *_BUILDERS]
if TYPE_CHECKING:  # they cannot read *_BUILDERS: the builders by name (a test checks them)
    __all__ += ["ghostnet_0_5x", "ghostnet_1x", "ghostnet_1_3x", "ghostnetv2_1x", "ghostnetv2_1_3x", "ghostnetv2_1_6x",
                "ghostnetv3_0_5x", "ghostnetv3_1x", "ghostnetv3_1_3x", "ghostnetv3_1_6x", "tinynet_a", "tinynet_b",
                "tinynet_c", "tinynet_d", "tinynet_e"]
