"""What torchvision provides for ImageNet classifiers, in one place: the 1000 class names and the
``ImageClassification`` preprocessing preset (imported when first used: torchvision's models are
not needed to build a model)."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from torch import nn


@lru_cache(maxsize=1)
def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k class names, in the classifier's order."""
    # torchvision's public list of the 1000 ImageNet-1k class names, index-aligned with
    # the classifier; reading it from a weights enum downloads nothing.
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def classification_preset(*, crop_size: int, resize_size: int, interpolation: Any, mean: tuple[float, ...],
                          std: tuple[float, ...], antialias: bool | None = True) -> nn.Module:
    """torchvision's ``ImageClassification`` preset: resize the shorter side, center-crop,
    scale to [0, 1], normalise (PIL image or uint8/float tensor in, float tensor out).
    ``interpolation``: a name ("bicubic") or an ``InterpolationMode``; ``antialias`` as torchvision's."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    return ImageClassification(crop_size=crop_size, resize_size=resize_size, mean=mean, std=std,
                               interpolation=InterpolationMode(interpolation), antialias=antialias)
