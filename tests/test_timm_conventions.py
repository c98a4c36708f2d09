"""timm's model hooks on our models, checked against timm's own model holding the same weights:
forward_intermediates, prune_intermediate_layers, group_matcher / no_weight_decay (and timm's
optimizer factory with layer decay), reset_classifier(0, global_pool="")."""
import copy

import pytest
import timm  # the test oracle (requirements-dev.txt)
import timm.optim
import torch

import models

from reference import PRETRAINED, random_state_dict

TOLERANCE = 1e-5


# GhostNet (its stem tap before BatchNorm, its head after the pooling) in the slow lane: seconds per build.
@pytest.fixture(scope="module", params=["tinynet_e", pytest.param("ghostnet_1x", marks=pytest.mark.slow)])
def pair(request):
    """(ours, timm's), in eval mode, with one random state dict."""
    name = request.param
    theirs = timm.create_model(PRETRAINED[name], pretrained=False).eval()
    state = random_state_dict(theirs, seed=1)
    theirs.load_state_dict(state)
    ours = getattr(models, name)().eval()
    ours.load_state_dict(state)
    return ours, theirs, state


def _fresh(pair):
    ours, theirs, state = pair
    o = getattr(models, ours.pretrained_cfg["architecture"])().eval()
    o.load_state_dict(state)
    t = timm.create_model(theirs.pretrained_cfg["architecture"], pretrained=False).eval()
    t.load_state_dict(state)
    return o, t


def _close(a, b):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= TOLERANCE


X = torch.randn(2, 3, 96, 128)


@pytest.mark.parametrize("kwargs", [{}, {"indices": 2}, {"indices": (0, -1)}, {"indices": [1, 3], "stop_early": True},
                                    {"indices": 3, "intermediates_only": True}])
def test_forward_intermediates_match_timm(pair, kwargs):
    ours, theirs, _ = pair
    with torch.no_grad():
        mine, ref = ours.forward_intermediates(X, **kwargs), theirs.forward_intermediates(X, **kwargs)
        if not kwargs.get("intermediates_only"):
            (final, mine), (ref_final, ref) = mine, ref
            if not kwargs.get("stop_early"):
                assert torch.equal(final, ours.forward_features(X))
            _close(final, ref_final)
        assert len(mine) == len(ref) == len(ours._take_indices(kwargs.get("indices")))
        for a, b in zip(mine, ref, strict=True):
            _close(a, b)
        # The same maps as features_only taps them.
        taps = getattr(models, ours.pretrained_cfg["architecture"])(features_only=True).eval()
        keep = taps.state_dict()
        taps.load_state_dict({k: v for k, v in ours.state_dict().items() if k in keep})
        every = taps(X)
        for a, i in zip(mine, ours._take_indices(kwargs.get("indices")), strict=True):
            assert torch.equal(a, every[i])


@pytest.mark.parametrize("bad, error, message", [
    ({"indices": 6}, ValueError, "last 6 feature maps; there are 5"),
    ({"indices": (0, 5)}, ValueError, "5 is not a tap; taps are 0..4"),
    ({"indices": "1"}, TypeError, "indices must be None, an int"),
    ({"output_fmt": "NHWC"}, ValueError, "output_fmt must be 'NCHW'"),
    ({"stop_early": 1}, TypeError, "stop_early must be True or False"),
])
def test_forward_intermediates_errors(bad, error, message):
    with pytest.raises(error, match=message):
        models.tinynet_e().forward_intermediates(X, **bad)


@pytest.mark.parametrize("indices, prune_head", [((1, 2), True), (2, True), (1, False), ((0,), True)])
def test_prune_intermediate_layers_as_timm(pair, indices, prune_head):
    ours, theirs = _fresh(pair)
    taken = ours.prune_intermediate_layers(indices, prune_head=prune_head)
    assert taken == theirs.prune_intermediate_layers(indices, prune_head=prune_head)
    assert ours.num_features == theirs.num_features and ours.head_hidden_size == theirs.head_hidden_size
    # What is left holds the same weights: timm's pruned state dict, key for key.
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        mine = ours.forward_intermediates(X, indices=indices)
        ref = theirs.forward_intermediates(X, indices=indices)
        for a, b in zip(mine[1], ref[1], strict=True):
            _close(a, b)
        _close(ours(X), theirs(X))  # the head is gone on both, or kept on both


def test_group_matcher_and_layer_decay_as_timm(pair):
    ours, theirs, _ = pair
    for coarse in (False, True):
        assert ours.group_matcher(coarse) == theirs.group_matcher(coarse)
    assert ours.no_weight_decay() == set()
    from timm.optim._param_groups import param_groups_layer_decay

    def named_groups(model):
        names = {id(p): n for n, p in model.named_parameters()}
        groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.7)
        return sorted((g["lr_scale"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in groups)

    assert named_groups(ours) == named_groups(theirs)
    optimizer = timm.optim.create_optimizer_v2(ours, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    reference = timm.optim.create_optimizer_v2(theirs, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    assert len(optimizer.param_groups) == len(reference.param_groups) > 10
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(ours.parameters()))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch 2.9+: "torch.jit.script is deprecated"
def test_reset_classifier_without_pooling_returns_the_map_as_timm(pair):
    ours, theirs = _fresh(pair)
    ours.reset_classifier(0, global_pool="")
    theirs.reset_classifier(0, global_pool="")
    assert not ours.training  # no new head: the mode stays
    with torch.no_grad():
        mine = ours(X)
        assert mine.dim() == 4 and mine.shape[1] == ours.head_hidden_size == 1280
        _close(mine, theirs(X))
        assert torch.equal(mine, ours.forward_head(ours.forward_features(X), pre_logits=True))
        # A fused GhostNet's pooled 1x1 head runs on the whole map too. In float64: random weights make
        # activations of ~1e5, and float32's rounding then depends on the kernels (threads) chosen.
        unfused = copy.deepcopy(ours).double()
        ours.double().fuse()
        expected = unfused(X.double())
        assert (ours(X.double()) - expected).abs().max() <= 1e-9 * expected.abs().max()
        assert torch.jit.script(ours)(X.double()).shape == mine.shape
    with pytest.raises(ValueError, match="global_pool='' .* needs num_classes=0"):
        models.tinynet_e().reset_classifier(10, global_pool="")
    model = models.tinynet_e()
    model.reset_classifier(0, global_pool="")
    with pytest.raises(ValueError, match="needs num_classes=0"):
        model.reset_classifier(10)  # the pooling it keeps is none
    model.reset_classifier(10, global_pool="avg")
    assert model(X).shape == (2, 10)
