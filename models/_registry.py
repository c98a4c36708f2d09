"""The registry: every model's ``Variant`` (its family table's row), by name, in one dict.
Below ``api`` (the builders) and ``description`` (which needs a model's class to know its
preprocessing), so neither has to import the other for it."""
from __future__ import annotations

from . import ghostnet, ghostnetv2, ghostnetv3, tinynet
from ._base import Variant

VARIANTS: dict[str, Variant] = {**ghostnet.VARIANTS, **ghostnetv2.VARIANTS, **ghostnetv3.VARIANTS, **tinynet.VARIANTS}


def get_variant(name: str) -> Variant:
    """The ``Variant`` behind model ``name``: class, architecture arguments, title, timm's name."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; models: {', '.join(VARIANTS)}")
    return VARIANTS[name]
