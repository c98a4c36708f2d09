"""GhostNet, GhostNetV2, GhostNetV3 and TinyNet A-E, exact to the authors' released ImageNet checkpoints.

Builders take ``weights`` (torchvision's: ``"DEFAULT"``, ``TinyNet_A_Weights.IMAGENET1K_V1``),
``pretrained``, ``checkpoint``, ``progress``, ``device``, ``num_classes`` and the model
options; ``list_models`` works as in timm and torchvision, ``get_model``,
``get_model_weights`` and ``get_weight`` as in torchvision. The applications
(``python -m models ...``, or the ``ghostnet-hub`` command of the installed package
``ghostnet_hub``) live in ``models.tools``, which this package never imports.
"""
from . import api, pretrained
from ._version import __version__
from .api import *  # noqa: F403 - the builders, one per VARIANTS row, and the registry functions
from .ghostnet import GhostNet
from .ghostnetv2 import GhostNetV2
from .ghostnetv3 import GhostNetV3
from .pretrained import *  # noqa: F403 - the weights enums, one per released model (pretrained.__all__)
from .tinynet import TinyNet

__all__ = ["GhostNet", "GhostNetV2", "GhostNetV3", "TinyNet", "__version__", *api.__all__]
# The weights enums, as pretrained.__all__ spells them out (type checkers read the star import above).
__all__ += [name for name in pretrained.__all__ if name not in __all__]
