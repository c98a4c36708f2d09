"""GhostNet, GhostNetV2, GhostNetV3 and TinyNet A-E, exact to the authors' released ImageNet checkpoints.

Builders take ``weights`` (torchvision's: ``"DEFAULT"``, ``TinyNet_A_Weights.IMAGENET1K_V1``),
``pretrained``, ``checkpoint``, ``progress``, ``device``, ``num_classes`` and the model
options; ``list_models`` works as in timm and torchvision, ``get_model``,
``get_model_weights`` and ``get_weight`` as in torchvision. The applications
(``python -m models ...``, or the ``ghostnet-hub`` command of the installed package
``ghostnet_hub``) live in ``models.tools``, which this package never imports.
"""
from . import api
from ._version import __version__
from .api import *  # noqa: F403 - the builders, one per VARIANTS row, and the registry functions
from .ghostnet import GhostNet
from .ghostnetv2 import GhostNetV2
from .ghostnetv3 import GhostNetV3
from .pretrained import (
    GhostNet_1X_Weights,
    GhostNetV2_1_3X_Weights,
    GhostNetV2_1_6X_Weights,
    GhostNetV2_1X_Weights,
    GhostNetV3_1X_Weights,
    TinyNet_A_Weights,
    TinyNet_B_Weights,
    TinyNet_C_Weights,
    TinyNet_D_Weights,
    TinyNet_E_Weights,
)
from .tinynet import TinyNet

__all__ = ["GhostNet", "GhostNetV2", "GhostNetV3", "TinyNet", "GhostNet_1X_Weights", "GhostNetV2_1X_Weights",
           "GhostNetV2_1_3X_Weights", "GhostNetV2_1_6X_Weights", "GhostNetV3_1X_Weights", "TinyNet_A_Weights",
           "TinyNet_B_Weights", "TinyNet_C_Weights", "TinyNet_D_Weights", "TinyNet_E_Weights", "__version__",
           *api.__all__]
