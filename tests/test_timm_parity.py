"""Numerical parity with timm, an independent implementation that loads the same checkpoints."""
import re

import pytest
import timm  # the test oracle (requirements-dev.txt); never imported by the package
import torch

from reference import PRETRAINED, build, random_state_dict

TOLERANCE = 1e-5


def _load_both(ours, theirs, seed):
    """Load one random state dict into both. timm's feature wrapper names ``blocks.N`` as
    ``blocks_N`` and keeps blocks after the last tap, which ours drops; otherwise the keys
    must be identical, in the same order."""
    state = random_state_dict(theirs, seed=seed)
    theirs.load_state_dict(state, strict=True)
    renamed = {re.sub(r"^blocks_(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}
    our_keys = list(ours.state_dict())
    assert our_keys == list(renamed)[: len(our_keys)]
    ours.load_state_dict({k: renamed[k] for k in our_keys}, strict=True)


def _pair(name, **kwargs):
    ours = build(name, **kwargs).eval()
    theirs = timm.create_model(PRETRAINED[name], pretrained=False, **kwargs).eval()
    return ours, theirs


@pytest.mark.parametrize("name", PRETRAINED)
def test_logits_match_timm(name):
    ours, theirs = _pair(name)
    _load_both(ours, theirs, seed=len(name))
    size = ours.default_input_size
    for shape in ((3, 3, *size), (2, 3, 256, 320)):
        x = torch.randn(shape)
        with torch.no_grad():
            mine, ref = ours(x), theirs(x)
        assert mine.shape == (shape[0], 1000)
        # Guard against a degenerate comparison: the logits must depend on the image
        # far more than the tolerance, or a wrong block could hide under it.
        assert (ref[0] - ref[1]).abs().max() > 100 * TOLERANCE
        assert (mine - ref).abs().max().item() <= TOLERANCE, shape


@pytest.mark.parametrize("name", PRETRAINED)
def test_feature_maps_match_timm(name):
    ours, theirs = _pair(name, features_only=True)
    assert [{k: d[k] for k in ("num_chs", "reduction", "module", "index")} for d in ours.feature_info] == \
        [{k: d[k] for k in ("num_chs", "reduction", "module", "index")} for d in theirs.feature_info.get_dicts()]
    # Both backbones hold the same subset of the checkpoint's keys.
    _load_both(ours, theirs, seed=3)
    x = torch.randn(2, 3, 160, 224)
    with torch.no_grad():
        mine, ref = ours(x), theirs(x)
    assert len(mine) == len(ref) == 5
    for i, (a, b) in enumerate(zip(mine, ref, strict=True)):
        assert a.shape == b.shape, i
        assert (a - b).abs().max().item() <= TOLERANCE, i


@pytest.mark.parametrize("name", ["ghostnet_1x", "tinynet_c"])
def test_selected_feature_maps_match_timm(name):
    ours, theirs = _pair(name, features_only=True, out_indices=(1, 3))
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction()
    _load_both(ours, theirs, seed=5)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for a, b in zip(ours(x), theirs(x), strict=True):
            assert (a - b).abs().max().item() <= TOLERANCE
