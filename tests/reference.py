"""Published facts the tests check the models against, and measurements of the code that
several test files compare with them (made once per session).

Sources: GhostNet, Han et al., CVPR 2020 (https://arxiv.org/abs/1911.11907) and the authors'
code and checkpoints (https://github.com/huawei-noah/Efficient-AI-Backbones); TinyNet, Han et
al., NeurIPS 2020 (https://arxiv.org/abs/2010.14819), the same repository's tinynet_pytorch,
and timm's re-measurement of those weights (https://github.com/huggingface/pytorch-image-models,
results/results-imagenet.csv). GhostNetV2 (https://arxiv.org/abs/2211.12905) and GhostNetV3
(https://arxiv.org/abs/2404.11202), the same repository's ghostnetv2_pytorch and ghostnetv3_pytorch.
The key listings in data/ were read from the released files; those of GhostNetV2/V3 from the
authors' model definitions (their headers say so; data/keys_from_authors.py writes them).
"""
import functools
import pathlib
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

import models
from models.ghostnetv2 import GhostNetV2
from models.manifest import DEFAULT_MANIFEST, load_manifest

DATA = pathlib.Path(__file__).parent / "data"

# Every model, in registry order, with its table row (models/*.py VARIANTS): parameters, MACs
# and input size as published (tests compare them with the code, the manifest and the README).
MODELS = {name: models.get_variant(name) for name in models.list_models()}
_MANIFEST = load_manifest(DEFAULT_MANIFEST)
# The models with released, pinned checkpoints, and timm's name for each.
PRETRAINED = {name: MODELS[name].timm_name for name, entry in _MANIFEST.models.items()
              if all(f.pinned for f in entry.files)}
# GhostNetV2/V3: released with no published checksum (unpinned), and timm's name for each;
# then the widths without released weights.
UNPINNED = {name: MODELS[name].timm_name for name, entry in _MANIFEST.models.items()
            if not all(f.pinned for f in entry.files)}
V2V3 = {name: v.timm_name for name, v in MODELS.items() if issubclass(v.cls, GhostNetV2) and v.timm_name}
# One model of each architecture (class): its released width with the fewest MACs, else its first.
# The widths and depths of one class run the same code, so the checks of the code rather than of a
# model's numbers (TorchScript compiling it, lowering it to a runtime's operators) take one of each.
_CHOSEN: dict = {}
for _name in sorted(MODELS, key=lambda n: (n not in PRETRAINED and n not in UNPINNED, MODELS[n].macs)):
    _CHOSEN.setdefault(MODELS[_name].cls, _name)
ARCHITECTURES = [name for name in MODELS if name in _CHOSEN.values()]  # (in registry order)
# GhostNetV2/V3 wider than their architecture's model above: its code at more channels, seconds each
# in the per-model checks, which run them in the full run only.
WIDER = [name for name, v in MODELS.items() if issubclass(v.cls, GhostNetV2) and v.macs > MODELS[_CHOSEN[v.cls]].macs]


def build(name, **kwargs):
    return getattr(models, name)(**kwargs)


def published_form(model):
    """The model as its size is published: GhostNetV3 in its deploy form, the others as built."""
    return model.reparameterize() if hasattr(model, "reparameterize") else model


@dataclass(frozen=True)
class Measured:
    params: int
    macs: int  # multiply-accumulates at the default input size, 1 image
    ops: frozenset  # the operators FlopCounterMode counted
    input_size: tuple


@functools.cache
def measure(name):
    """Parameters and MACs of model ``name`` as built by the code (``published_form``), counted once per session
    (FlopCounterMode takes seconds per model, and four test files compare against it)."""
    model = published_form(build(name).eval())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, *model.default_input_size))
    return Measured(
        params=sum(p.numel() for p in model.parameters()),
        macs=counter.get_total_flops() // 2,  # FlopCounterMode counts 2 FLOPs per multiply-accumulate
        ops=frozenset(map(str, counter.get_flop_counts()["Global"])),
        input_size=model.default_input_size,
    )


def reference_keys(name):
    """[(key, shape)] exactly as the released checkpoint of ``name`` holds them."""
    rows = []
    for line in (DATA / f"{name}.keys.tsv").read_text().splitlines():
        if line.startswith("#"):  # where the listing comes from
            continue
        key, shape = line.split("\t")
        rows.append((key, tuple(int(d) for d in shape.strip("()").split(",") if d.strip())))
    return rows


def random_state_dict(model, seed=0):
    """A state dict like a trained checkpoint's: He-scaled weights, BN affine and running
    statistics far from their init values, so that every term of BN matters."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            out[key] = torch.randint(1, 1000, value.shape, generator=g)
        elif key.endswith("running_var"):
            out[key] = torch.rand(value.shape, generator=g) * 1.5 + 0.5
        elif key.endswith("running_mean") or key.endswith("bias"):
            out[key] = torch.randn(value.shape, generator=g) * 0.2
        elif value.dim() == 1:  # BN weight
            out[key] = torch.rand(value.shape, generator=g) + 0.5
        else:
            fan_in = value[0].numel()
            out[key] = torch.randn(value.shape, generator=g) * (2.0 / fan_in) ** 0.5
    return out

# Published top-1 / top-5: GhostNet's paper (Table 7); TinyNet, GhostNetV2 and V3: timm's
# results-imagenet.csv (the authors publish no top-5 for them).
METRICS = {
    "ghostnet_1x": (73.98, 91.46),
    "ghostnetv2_1x": (75.19, 92.33),
    "ghostnetv2_1_3x": (76.75, 93.36),
    "ghostnetv2_1_6x": (77.84, 93.95),
    "ghostnetv3_1x": (76.94, 93.12),
    "tinynet_a": (77.7, 93.5),
    "tinynet_b": (75.0, 92.2),
    "tinynet_c": (71.2, 89.7),
    "tinynet_d": (67.0, 87.1),
    "tinynet_e": (59.9, 81.8),
}

# Every content checksum published for the real files (the git blob ids of the authors'
# repository files; the SHA-256 of timm's Hugging Face copies as listed there), and nothing else.
# (model, algorithm, digest, size or None)
KNOWN_CHECKSUMS = {
    ("ghostnet_1x", "git_blob_sha1", "26da9f2807cd5ba95c607cec01ceb9700d94e0ae", None),
    ("ghostnet_1x", "sha256", "8efbcf55d97872c828768b096d4ebebc51f8b7e29623fd3b3933d78cc230e2e2", 20_871_632),
    ("ghostnet_1x", "sha256", "1dfc1e5e737afceb3bc984112bb8ff3498dd2483df33e8975ad852bca7e1dce3", 20_995_213),
    ("tinynet_a", "git_blob_sha1", "7edaf2cd767b53050a9a4932c5ed06b003410578", None),
    ("tinynet_b", "git_blob_sha1", "16c51b73f9d625927ed70a3ca9df213d0c3c80cf", None),
    ("tinynet_c", "git_blob_sha1", "82455519fb2bb26aa75a72488619e9da6c491804", None),
    ("tinynet_d", "git_blob_sha1", "96b1dfb0963fa0fcb8dfdc7ea44858bc981e20fd", None),
    ("tinynet_e", "git_blob_sha1", "70947cdf5ba6b9f1d2aec1a2b2a636d69f3449ba", None),
    ("tinynet_a", "sha256", "5d9911de836222b28e99095dff561a6600f354c05b61ea179aaa848a830bc3ca", 24_999_246),
    ("tinynet_b", "sha256", "15bfc4a0a42cb55b5b59070d30fa28f327d4d6af9c2c1167686c70b364e36911", 15_175_153),
    ("tinynet_d", "sha256", "65e2964364a05ab0a080f769e9f6bb6fca1c36ee73c602548686e07ed35914e5", 9_507_149),
}


def checkpoint_bytes(name, fmt="torch", seed=0):
    """A file like the released checkpoint of ``name`` (random values), as bytes."""
    import io

    state = random_state_dict(build(name), seed=seed)
    if fmt == "safetensors":
        from safetensors.torch import save

        return save(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
