"""A checkpoint meets a model: which class count and options to build, how the state dict
differs when it does not fit (in one line, with the model it would fit), float16/bfloat16/
float64 files loaded as float32, RGB stem filters for other input channels, what a backbone
takes, and what the loaded model carries from the file."""
from __future__ import annotations

import warnings

import torch

from ._base import ImageClassifier, Variant
from .description import describe
from .weights import Checkpoint, checkpoint_limit


def adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
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


def build_arguments(name: str, variant: Variant, loaded: Checkpoint, num_classes: int | None,
                    options: dict) -> tuple[int, dict]:
    """The class count and options to build for a checkpoint: those its description records
    (what the caller says must agree), else the rows of its classifier (else 1000)."""
    described = loaded.description
    if described is not None:
        described.check(str(loaded.path), model=name, num_classes=num_classes)
        recorded = {k: v for k, v in described.options.items() if k in variant.options}
        return described.num_classes, {**recorded, **options}
    if num_classes is None:
        head = loaded.state.get("classifier.weight")
        num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 1000
    return num_classes, options


def carry(model: ImageClassifier, loaded: Checkpoint) -> None:
    """The model carries what its checkpoint says it is (class names, preprocessing), as a
    published model carries its weights: ``model.pretrained_weights``."""
    base = loaded.description
    if base is not None and base.num_classes != model.num_classes:
        base = None
    described = describe(model) if base is None else base
    model.pretrained_weights = described.with_(weights=loaded.path.name, weights_sha256=loaded.sha256)
    pre = described.preprocessing
    model.pretrained_cfg.update(input_size=(model.in_chans, pre["input_size"], pre["input_size"]),
                                interpolation=pre["interpolation"], mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                                crop_pct=pre["input_size"] / pre["resize_size"], num_classes=model.num_classes)


def as_float32(state: dict[str, torch.Tensor], source: str, stacklevel: int) -> dict[str, torch.Tensor]:
    """Floating tensors as float32, the dtype the model is built in: ``assign=True`` would
    otherwise give the model the file's dtype, and the first float32 input would fail."""
    others = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()
                     if t.is_floating_point() and t.dtype != torch.float32})
    if not others:
        return state
    warnings.warn(f"{source} holds {' and '.join(others)} tensors: loaded as float32, the model's dtype",
                  UserWarning, stacklevel=stacklevel)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def mismatch(model: ImageClassifier, state: dict[str, torch.Tensor]) -> str:
    """How a state dict differs from the model's, in one line ("" if it fits)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    reshaped = [k for k in expected if k in got and got[k] != expected[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (e.g. {k}: file {list(got[k])}, model {list(expected[k])})")
    return "; ".join(parts)


def for_backbone(model: ImageClassifier, variant: Variant, state: dict[str, torch.Tensor], num_classes: int,
                 options: dict) -> tuple[ImageClassifier, dict[str, torch.Tensor]]:
    """(the model a state dict must fit, the state dict to load). A backbone (features_only) takes
    the part of a whole checkpoint it uses, but only of a checkpoint of its own model: GhostNet's
    keys are a subset of GhostNetV2's, so keeping what the backbone wants would half-load another
    model; that checkpoint must then fit the whole model, and ``mismatch`` says how it does not."""
    if not model.features_only or not mismatch(model, state):
        return model, state
    whole_options = {k: v for k, v in options.items() if k not in ("features_only", "out_indices")}
    with torch.device("meta"):
        whole = variant.build(num_classes=num_classes, **whole_options)
    if mismatch(whole, state):
        return whole, state
    wanted = model.state_dict().keys()
    return model, {key: value for key, value in state.items() if key in wanted}


def fits_instead(name: str, state: dict[str, torch.Tensor], variants: dict[str, Variant]) -> str:
    """" It is a NAME checkpoint..." when another model of the registry takes the state dict."""
    head = state.get("classifier.weight")
    classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 1000
    fits = []
    for other, variant in variants.items():
        if other == name:
            continue
        if not mismatch(_on_meta(variant, classes), state):
            fits.append(other)
    return f". It fits {' and '.join(fits)} (num_classes={classes}): load it with that model" if fits else ""


def size_limit(variants: dict[str, Variant], names: list[str], num_classes: int | None) -> int:
    """The largest checkpoint file any of these models can have (``checkpoint_limit``), with a
    head of ``num_classes``, or of up to ImageNet-21k's 21,843 classes when the file is to say."""
    classes = max(num_classes if num_classes is not None else 21843, 1)
    return max(checkpoint_limit(_on_meta(variants[n], classes)) for n in names if n in variants)


# Built once per architecture and class count, on the meta device (no storage), and only read:
# building the fifteen models took seconds of every from_checkpoint() that did not name its
# model, and of every checkpoint that did not fit.
_META: dict[tuple[object, ...], ImageClassifier] = {}


def _on_meta(variant: Variant, classes: int) -> ImageClassifier:
    key = (variant.cls, *sorted(variant.args.items()), classes)
    if key not in _META:
        with torch.device("meta"):
            _META[key] = variant.build(num_classes=classes)
    return _META[key]
