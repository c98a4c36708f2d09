"""GhostNetV2 and GhostNetV3 are the authors' architectures: their key names and shapes (the
authors' module tree, data/*.keys.tsv), timm's logits for the same weights, V3's deploy form."""
import re

import pytest
import timm  # the test oracle; never imported by the package
import torch

import models
from models.ghostnet import pad_ghost_halves
from models.weights import CheckpointError

from helpers import marked_slow
from reference import V2V3, WIDER, build, random_state_dict, reference_keys

TIMM_BN = re.compile(r"(_rpr_(?:conv\.\d+|scale))\.bn1\.")


def _ours_from_timm(state):
    """timm's state dict under the authors' names (timm calls the branch BatchNorms bn1)."""
    return {TIMM_BN.sub(r"\1.bn.", key): value for key, value in state.items()}


@pytest.mark.parametrize("name", V2V3)
def test_state_dict_is_the_authors_module_tree(name):
    state = build(name).state_dict()
    expected = reference_keys(name)
    assert [key for key, _ in expected] == list(state), "key names or order differ from the authors'"
    assert all(tuple(state[key].shape) == shape for key, shape in expected)
    # timm's implementation holds the same tensors (its own order, its bn1 names).
    theirs = {k: tuple(v.shape) for k, v in _ours_from_timm(timm.create_model(V2V3[name]).state_dict()).items()}
    assert theirs == {k: tuple(v.shape) for k, v in state.items()}


def test_key_counts_and_what_v2_adds_to_v1():
    v1, v2, v3 = (set(build(n).state_dict()) for n in ("ghostnet_1x", "ghostnetv2_1x", "ghostnetv3_1x"))
    assert (len(v1), len(v2), len(v3)) == (512, 764, 1956)
    assert v1 < v2 and {k.split(".")[4] for k in v2 - v1} == {"short_conv"}
    # 14 of the 16 blocks have DFC attention: every block but the first two.
    gated = {tuple(k.split(".")[1:3]) for k in v2 if ".short_conv." in k}
    assert len(gated) == 14 and ("0", "0") not in gated and ("1", "0") not in gated


def _pair(name, **kwargs):
    ours = build(name, **kwargs).eval()
    theirs = timm.create_model(V2V3[name], pretrained=False, **kwargs).eval()
    state = random_state_dict(theirs, seed=len(name))
    theirs.load_state_dict(state)
    state = _ours_from_timm(state)
    if kwargs.get("features_only"):  # timm's feature wrapper: blocks_N, and blocks after the last tap
        state = {re.sub(r"^blocks_(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}
        keep = ours.state_dict()  # (once: state_dict() per key took seconds)
        state = {k: v for k, v in state.items() if k in keep}
    ours.load_state_dict(state)
    return ours.double(), theirs.double()


# The widest models, and GhostNetV3 1x, take seconds each in float64: the slow run checks them.
WIDTHS = marked_slow(V2V3, [*WIDER, "ghostnetv3_1x"])


@pytest.mark.parametrize("name", WIDTHS)
def test_logits_equal_timms_in_float64(name):
    ours, theirs = _pair(name)
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        mine, ref = ours(x), theirs(x)
    assert (ref[0] - ref[1]).abs().max() > 1e-3  # the logits depend on the image
    assert (mine - ref).abs().max() <= 1e-12 * ref.abs().max()


@pytest.mark.parametrize("name", ["ghostnetv2_1x", "ghostnetv3_0_5x"])
def test_feature_maps_equal_timms(name):
    ours, theirs = _pair(name, features_only=True)
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction()
    x = torch.randn(1, 3, 96, 64, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(ours(x), theirs(x), strict=True):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-12 * b.abs().max()


def _trained_v3(name="ghostnetv3_0_5x", **kwargs):
    """Checkpoint-like weights for a training-form GhostNetV3: each branch's BatchNorm scaled so
    that the five summed branches add up to what one would give (as training leaves them); with
    every branch at full scale the activations grow ~3x a block and float32 loses the logits."""
    model = build(name, **kwargs)
    state = random_state_dict(model, seed=7)
    for key in state:
        if "_rpr_" in key and key.endswith(("bn.weight", "bn.bias", "_skip.weight", "_skip.bias")):
            state[key] = state[key] / 4
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.slow  # GhostNetV3 1x ours and timm's, trained-like
def test_reparameterize_gives_the_authors_deploy_form_and_timms_values():
    ours = _trained_v3("ghostnetv3_1x")
    theirs = timm.create_model("ghostnetv3_100").eval()
    theirs.load_state_dict(_timm_names(ours.state_dict()))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        before = ours(x)
        ours.reparameterize()
        theirs.convert_to_deploy()
        after = ours(x)
    deployed = ours.state_dict()
    assert {k: tuple(v.shape) for k, v in deployed.items()} == dict(reference_keys("ghostnetv3_1x.deploy"))
    assert len(deployed) == 492 and deployed.keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.allclose(deployed[key], value, rtol=1e-5, atol=1e-6), key
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    assert not any(".bn_dw." in k or "rpr" in k for k in deployed)
    ours.reparameterize()  # a second call changes nothing
    assert ours.state_dict().keys() == deployed.keys()


def _timm_names(state):
    return {re.sub(r"(_rpr_(?:conv\.\d+|scale))\.bn\.", r"\1.bn1.", k): v for k, v in state.items()}


@pytest.mark.parametrize("channels_last", [False, True])
def test_fuse_folds_the_branches_within_1e_5(channels_last):
    model = _trained_v3()
    x = torch.randn(2, 3, 112, 96)
    with torch.no_grad():
        training_form = model(x)
        model.fuse(channels_last=channels_last)
        fused = model(x)
    assert model.fused and not any("rpr" in k or k.endswith("running_mean") for k in model.state_dict())
    assert (fused - training_form).abs().max() <= 1e-5 * training_form.abs().max()
    with pytest.raises(RuntimeError, match="cannot be trained"):
        model.train()


def test_fuse_builder_option_and_the_deploy_cost():
    from torch.utils.flop_counter import FlopCounterMode

    model = models.ghostnetv3_1x(fuse=True)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    # The folded BatchNorms add nothing: the cost of the deploy form (GhostNetV2's), as recorded.
    assert counter.get_total_flops() // 2 == models.get_weights("ghostnetv3_1x").meta["macs"] == 167_048_288


def test_features_only_v3_reparameterizes():
    model = _trained_v3(features_only=True, out_indices=(1, 2))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        after = model.reparameterize()(x)
    for a, b in zip(before, after, strict=True):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_ghost_padding_leaves_the_attention_models_alone():
    model = build("ghostnetv2_1x").fuse()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert pad_ghost_halves(model) is model
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_help_says_which_weights_are_unpinned_and_which_size_is_the_deploy_forms():
    unpinned, deploy = "No checksum was ever published for these weights", "The size above is the deploy form's"
    assert unpinned in models.ghostnetv3_1x.__doc__ and deploy in models.ghostnetv3_1x.__doc__
    assert unpinned in models.ghostnetv2_1x.__doc__ and deploy not in models.ghostnetv2_1x.__doc__
    assert deploy in models.ghostnetv3_0_5x.__doc__ and "No released weights" in models.ghostnetv3_0_5x.__doc__
    assert unpinned not in models.ghostnet_1x.__doc__


# -- the wrong file for the model: strict, and the error names the right one ---------------------

def test_a_ghostnet_file_is_refused_by_ghostnetv2_naming_ghostnet(tmp_path):
    path = tmp_path / "v1.pth"
    torch.save(random_state_dict(build("ghostnet_1x")), path)
    with pytest.raises(CheckpointError) as err:
        models.ghostnetv2_1x(checkpoint=path)
    message = str(err.value)
    assert "252 tensor(s) missing" in message and "short_conv" in message and "It fits ghostnet_1x" in message
    assert "\n" not in message


def test_a_ghostnetv2_file_is_refused_by_a_ghostnet_backbone(tmp_path):
    # The backbone needs only part of a checkpoint, but only of its own model's checkpoint.
    path = tmp_path / "v2.pth"
    torch.save(random_state_dict(build("ghostnetv2_1x")), path)
    with pytest.raises(CheckpointError, match="It fits ghostnetv2_1x"):
        models.ghostnet_1x(features_only=True, checkpoint=path)
    # Its own checkpoint still feeds the backbone, whole or as a backbone's state dict.
    own = tmp_path / "own.pth"
    torch.save(random_state_dict(build("ghostnetv2_1x", features_only=True)), own)
    assert models.ghostnetv2_1x(features_only=True, checkpoint=path).features_only
    assert models.ghostnetv2_1x(features_only=True, checkpoint=own).features_only


@pytest.mark.slow  # GhostNetV3 trained-like, saved and loaded
def test_a_timm_trained_v3_checkpoint_loads_under_the_authors_names(tmp_path):
    import argparse

    ours = _trained_v3("ghostnetv3_0_5x")
    state = ours.state_dict()
    counters = {"conv_stem.total_ops": torch.zeros(1, dtype=torch.float64),
                "conv_stem.total_params": torch.zeros(1, dtype=torch.float64)}  # thop's, in training checkpoints
    path = tmp_path / "timm.pth.tar"
    torch.save({"epoch": 3, "state_dict": {**_timm_names(state), **counters}, "args": argparse.Namespace(lr=0.1),
                "state_dict_ema": {k: torch.zeros_like(v) for k, v in state.items()}}, path)
    loaded = models.ghostnetv3_0_5x(checkpoint=path)
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())  # state_dict, not the EMA


def test_the_attention_pools_by_two_and_takes_a_one_pixel_map_as_it_is():
    from models.ghostnetv2 import half

    x = torch.arange(24.0).view(1, 1, 4, 6)
    assert torch.equal(half(x), torch.tensor([[[[3.5, 5.5, 7.5], [15.5, 17.5, 19.5]]]]))
    assert torch.equal(half(x[..., :1, :]), torch.tensor([[[[0.5, 2.5, 4.5]]]]))  # (timm's and the authors' fail)
    assert torch.equal(half(x[..., :1, :1]), x[..., :1, :1])


@pytest.mark.slow
def test_finetune_trains_ghostnetv3_and_its_checkpoint_fuses(tmp_path):
    import contextlib
    import io

    from stripes import write_dataset

    from models.tools.finetune import finetune

    data = write_dataset(tmp_path / "data", train=4, val=2, size=72)
    with contextlib.redirect_stdout(io.StringIO()):
        result = finetune(model="ghostnetv3_0_5x", data=data, out=tmp_path / "out", pretrained=False, epochs=1,
                          input_size=64, batch_size=8, workers=0, progress=False)
    trained = models.from_checkpoint(result.best)  # the training form, with the user's classes
    fused = models.from_checkpoint(result.best, fuse=True)
    assert trained.num_classes == fused.num_classes == 4 and any("rpr" in k for k in trained.state_dict())
    assert fused.fused and not any("rpr" in k for k in fused.state_dict())
    assert fused.pretrained_weights.meta["categories"] == trained.pretrained_weights.meta["categories"]
    # One epoch from scratch leaves BatchNorm statistics that blow activations up (logits ~1e13):
    # compared in float64, where that costs no precision.
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = trained.double()(x)
        got = models.from_checkpoint(result.best).double().fuse()(x)
    assert (got - expected).abs().max() <= 1e-9 * expected.abs().max()
