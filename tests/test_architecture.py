"""The architectures are exactly the published ones: checkpoint keys, sizes, cost."""
import pytest
import torch

from reference import MODELS, PRETRAINED, build, measure, reference_keys


@pytest.mark.parametrize("name", PRETRAINED)
def test_state_dict_matches_released_checkpoint(name):
    state = build(name).state_dict()
    expected = reference_keys(name)
    assert [key for key, _ in expected] == list(state), "key names or order differ"
    for key, shape in expected:
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("name", PRETRAINED)
def test_checkpoint_shaped_state_dict_loads_strictly(name):
    # A state dict built only from the released file's listing, not from our model.
    g = torch.Generator().manual_seed(1)
    checkpoint = {
        key: torch.tensor(7) if key.endswith("num_batches_tracked") else torch.randn(shape, generator=g)
        for key, shape in reference_keys(name)
    }
    model = build(name)
    result = model.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint[key]), key


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count(name):
    # measure(): sum(p.numel() for p in published_form(build(name)).parameters()), counted once per
    # session with the MACs below (building GhostNetV3 and reparameterizing it takes up to a second).
    assert measure(name).params == MODELS[name].num_params


@pytest.mark.parametrize("name", MODELS)
def test_macs_at_default_input(name):
    row = MODELS[name]
    measured = measure(name)
    assert measured.input_size == (row.input_size, row.input_size)
    # Only conv and linear appear among the counted operators.
    assert measured.ops <= {"aten.convolution", "aten.addmm", "aten.mm"}, measured.ops
    assert measured.macs == row.macs


# Stage depths and output channels of each TinyNet (the paper's factors applied to
# EfficientNet-B0, as the released checkpoints have them).
TINYNET_STAGES = {
    "tinynet_a": ((1, 2, 2, 4, 4, 5, 1), (16, 24, 40, 80, 112, 192, 320)),
    "tinynet_b": ((1, 2, 2, 3, 3, 4, 1), (16, 24, 32, 64, 88, 144, 240)),
    "tinynet_c": ((1, 2, 2, 3, 3, 3, 1), (8, 16, 24, 40, 64, 104, 176)),
    "tinynet_d": ((1, 1, 1, 2, 2, 3, 1), (8, 16, 24, 40, 64, 104, 176)),
    "tinynet_e": ((1, 1, 1, 2, 2, 2, 1), (8, 16, 24, 40, 56, 96, 160)),
}


@pytest.mark.parametrize("name", TINYNET_STAGES)
def test_tinynet_stage_depths_and_widths(name):
    depths, channels = TINYNET_STAGES[name]
    model = build(name)
    assert tuple(len(stage) for stage in model.blocks) == depths
    assert tuple(stage[-1].bn2.num_features if i == 0 else stage[-1].bn3.num_features
                 for i, stage in enumerate(model.blocks)) == channels
    assert model.conv_stem.out_channels == 32 and model.conv_head.out_channels == 1280


def test_ghostnet_channel_rounding_per_width():
    # make_divisible(c * w, 4): 0.5x and 1.3x round differently from a plain multiply.
    for name, stem, last in (("ghostnet_0_5x", 8, 480), ("ghostnet_1x", 16, 960), ("ghostnet_1_3x", 20, 1248)):
        model = build(name)
        assert model.conv_stem.out_channels == stem
        assert model.num_features == last
        assert model.conv_head.out_channels == 1280

