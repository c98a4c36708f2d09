"""GhostNet and TinyNet A-E, exact to the authors' released ImageNet checkpoints.

Builders take ``pretrained``, ``progress``, ``device``, ``num_classes``, ``weights`` and the
model options; ``list_models``, ``get_model`` and ``get_weights`` work as in torchvision.
"""
from .api import (
    Weights,
    get_model,
    get_weights,
    ghostnet_0_5x,
    ghostnet_1_3x,
    ghostnet_1x,
    list_models,
    tinynet_a,
    tinynet_b,
    tinynet_c,
    tinynet_d,
    tinynet_e,
)
from .ghostnet import GhostNet
from .tinynet import TinyNet

__all__ = [
    "GhostNet",
    "TinyNet",
    "Weights",
    "get_model",
    "get_weights",
    "list_models",
    "ghostnet_0_5x",
    "ghostnet_1x",
    "ghostnet_1_3x",
    "tinynet_a",
    "tinynet_b",
    "tinynet_c",
    "tinynet_d",
    "tinynet_e",
]
