"""GhostNet and TinyNet A-E, exact to the authors' released ImageNet checkpoints.

Builders take ``pretrained``, ``progress``, ``device``, ``num_classes``, ``weights`` and the
model options; ``list_models``, ``get_model`` and ``get_weights`` work as in torchvision.
The applications (``python -m models ...``) live in ``models.tools``, which this package
never imports.
"""
from . import api
from .api import *  # noqa: F403 - the builders, one per VARIANTS row, and the registry functions
from .ghostnet import GhostNet
from .tinynet import TinyNet

__all__ = ["GhostNet", "TinyNet", *api.__all__]
