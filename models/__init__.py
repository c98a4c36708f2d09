"""GhostNet and TinyNet A-E, exact to the authors' released ImageNet checkpoints."""
from .ghostnet import GhostNet, ghostnet_0_5x, ghostnet_1_3x, ghostnet_1x
from .tinynet import TinyNet, tinynet_a, tinynet_b, tinynet_c, tinynet_d, tinynet_e

__all__ = [
    "GhostNet",
    "TinyNet",
    "ghostnet_0_5x",
    "ghostnet_1x",
    "ghostnet_1_3x",
    "tinynet_a",
    "tinynet_b",
    "tinynet_c",
    "tinynet_d",
    "tinynet_e",
]
