"""PyTorch Hub entry points for GhostNet and TinyNet A-E."""
dependencies = ["torch"]

from models import (  # noqa: E402,F401
    ghostnet_0_5x,
    ghostnet_1_3x,
    ghostnet_1x,
    tinynet_a,
    tinynet_b,
    tinynet_c,
    tinynet_d,
    tinynet_e,
)
