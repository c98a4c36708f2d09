"""Published facts the tests check the models against (../shared/REFERENCE.md, copied here
because a user's clone has no ../shared)."""
import pathlib

import torch

import models

DATA = pathlib.Path(__file__).parent / "data"

# name: (parameters, MACs in millions, default input size) -- REFERENCE.md section 3.
PUBLISHED = {
    "ghostnet_0_5x": (2_587_292, 42.33, 224),
    "ghostnet_1x": (5_182_508, 141.15, 224),
    "ghostnet_1_3x": (7_358_820, 227.00, 224),
    "tinynet_a": (6_187_972, 336.87, 192),
    "tinynet_b": (3_730_562, 200.71, 188),
    "tinynet_c": (2_457_234, 99.54, 184),
    "tinynet_d": (2_338_446, 51.58, 152),
    "tinynet_e": (2_042_972, 24.36, 106),
}
# The six models with released checkpoints, and timm's name for each.
PRETRAINED = {
    "ghostnet_1x": "ghostnet_100",
    "tinynet_a": "tinynet_a",
    "tinynet_b": "tinynet_b",
    "tinynet_c": "tinynet_c",
    "tinynet_d": "tinynet_d",
    "tinynet_e": "tinynet_e",
}


def build(name, **kwargs):
    return getattr(models, name)(**kwargs)


def reference_keys(name):
    """[(key, shape)] exactly as the released checkpoint of ``name`` holds them."""
    rows = []
    for line in (DATA / f"{name}.keys.tsv").read_text().splitlines():
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
