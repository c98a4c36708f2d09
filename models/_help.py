"""The builders' help text, from one source: what each argument does (``_ARGUMENT_DOCS``, which
docs/using.md's argument table is tested against) and the model's published facts."""
from __future__ import annotations

from ._base import Variant
from .manifest import Manifest
from .pretrained import get_model_weights

# Where this repository lives on GitHub, for the examples in the help text.
GITHUB_REPO = "OWNER/REPO"

# The arguments every builder takes (the build arguments, then its class's own options,
# ``Variant.options``): type, default, what it does. The one source of the help text; the
# docs/using.md's argument table is tested against it.
_ARGUMENT_DOCS = {
    "pretrained": ("bool", "False", "the same as weights='DEFAULT', as in the original hub entry and timm."),
    "weights": ("str | WeightsEnum", "None", "published ImageNet weights, named as in torchvision: 'DEFAULT', "
                "'IMAGENET1K_V1', TinyNet_A_Weights.DEFAULT or 'TinyNet_A_Weights.IMAGENET1K_V1'. They are "
                "verified against weights_manifest.json (downloaded once, then read from the cache) and the model "
                "comes back in eval mode. A file path or URL here is an error: that is checkpoint=."),
    "progress": ("bool", "True", "show the download progress bar on stderr."),
    "device": ("", "None", "'cpu' (default), 'cuda', 'cuda:1', 'mps' or a torch.device; weights load straight onto "
               "it. 'meta': no storage, nothing fetched (with weights=, the model they give, pretrained_weights set: "
               "to_empty(device=...), then load_state_dict(pretrained_weights.get_state_dict())); no checkpoint=."),
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
    "dtype": ("torch.dtype", "None", "a floating dtype (torch.bfloat16, torch.float16, torch.float64) the model is "
              "cast to once its weights are loaded (and fused); inputs must then have it too. None keeps float32."),
    "require_pinned": ("bool", "None", "True refuses published weights that no checksum was ever published for "
                       "(they are trusted on first use instead: the GhostNetV2/V3 files); None follows "
                       "$GHOSTNET_HUB_REQUIRE_PINNED."),
}
_BUILD_ARGUMENTS = ("pretrained", "weights", "progress", "device", "num_classes", "checkpoint", "checkpoint_sha256",
                    "fuse", "channels_last", "dtype", "require_pinned")


def help_text(name: str, variant: Variant, manifest: Manifest) -> str:
    """The docstring of builder ``name``: what it is, its weights and preprocessing, every argument
    (``_ARGUMENT_DOCS``), an example."""
    lines = [f"{variant.title}.", ""]
    size = (f"Size: {variant.num_params:,} parameters, {variant.macs / 1e6:.2f} M MACs at "
            f"{variant.input_size}x{variant.input_size}.")
    if name in manifest.models:
        e = manifest[name]
        lines += [
            f"ImageNet-1k: top-1 {e.top1} %, top-5 {e.top5} % ({e.metrics_source}).",
            size,
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
            size,
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
            f"    logits = model(torch.randn(8, 3, {variant.input_size}, {variant.input_size}))",
        ]
    return "\n".join(lines)
