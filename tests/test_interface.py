"""The model interface a torchvision/timm user expects, on every model, and its errors."""
import functools
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import models

from helpers import ROOT, marked_slow
from reference import MODELS, WIDER, build

ALL = list(MODELS)
# For the tests that run every model: the wider GhostNetV2/V3 took a third of their time.
WIDTHS = marked_slow(MODELS, WIDER)


def _small():
    """A cheap non-square input."""
    return torch.randn(2, 3, 96, 112)


@functools.cache
def _as_built(name):
    """``build(name).eval()``, one per model for the tests below that only run it or read it, never
    change it (a build per test took most of their time: 0.1 to 0.4 s each)."""
    return build(name).eval()


@pytest.fixture(scope="module", autouse=True)
def _forget_the_models():
    yield
    _as_built.cache_clear()


# -- classifier --------------------------------------------------------------------------

@pytest.mark.parametrize("name", WIDTHS)
def test_num_classes_zero_returns_pooled_features(name):
    model = build(name, num_classes=0).eval()
    assert isinstance(model.classifier, nn.Identity)
    x = _small()
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 1280)
        assert torch.equal(out, model.forward_head(model.forward_features(x), pre_logits=True))
    assert not any(key.startswith("classifier") for key in model.state_dict())


@pytest.mark.parametrize("name", ["ghostnet_0_5x", "ghostnet_1x", "tinynet_e"])
def test_num_classes_ten(name):
    model = build(name, num_classes=10).eval()
    assert model.classifier.in_features == 1280 and model.classifier.out_features == 10
    with torch.no_grad():
        assert model(_small()).shape == (2, 10)


@pytest.mark.parametrize("name", WIDTHS)
def test_reset_classifier_uses_pooled_head_width(name):
    model = build(name).eval()
    x = _small()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(7)
    model.eval()  # (a new head puts the model in train mode)
    # The head's input is the 1280-d pooled vector, not the last feature map's channels
    # (960 * width for GhostNet): the bug another library shipped.
    assert model.classifier.in_features == model.head_hidden_size == 1280
    assert model.num_classes == 7
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(logits, model.classifier(features))
    model.reset_classifier(0)
    with torch.no_grad():
        assert torch.equal(model(x), features)


def test_reset_classifier_keeps_dtype_and_mode():
    model = build("tinynet_e").double().train()
    model.reset_classifier(5)
    assert model.classifier.weight.dtype == torch.float64
    assert model.classifier.training
    model.eval().reset_classifier(3)
    assert model.classifier.training and model.training  # a new head is for training (test_load_and_mode.py)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64, dtype=torch.float64)).shape == (1, 3)


# -- input channels and sizes --------------------------------------------------------

@pytest.mark.parametrize("name", ["ghostnet_1x", "tinynet_a"])
@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans(name, in_chans):
    model = build(name, in_chans=in_chans).eval()
    assert model.conv_stem.weight.shape[1] == in_chans
    with torch.no_grad():
        assert model(torch.randn(2, in_chans, 64, 80)).shape == (2, 1000)


@pytest.mark.parametrize("name", WIDTHS)
@pytest.mark.parametrize("size", [(32, 32), (33, 47), (224, 96), (97, 161)])
def test_any_input_size_from_32(name, size):
    model = _as_built(name)
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["ghostnet_1x", "tinynet_b"])
def test_no_grad_and_inference_mode_agree_with_autograd(name):
    model = build(name).eval()
    x = _small()
    reference = model(x).detach()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference, rtol=0, atol=0)


# -- training ------------------------------------------------------------------------


# -- multi-scale features ------------------------------------------------------------

@pytest.mark.parametrize("name", WIDTHS)
def test_features_only_maps_and_feature_info(name):
    model = build(name, features_only=True).eval()
    info = model.feature_info
    assert info.reduction() == [2, 4, 8, 16, 32]
    assert [d["index"] for d in info] == [0, 1, 2, 3, 4]
    height, width = 97, 130
    with torch.no_grad():
        maps = model(torch.randn(2, 3, height, width))
    assert [m.shape[1] for m in maps] == info.channels()
    for feature, stride in zip(maps, info.reduction(), strict=True):
        h, w = height, width
        for _ in range(int(math.log2(stride))):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        assert feature.shape[-2:] == (h, w)
    # A backbone holds only what its taps use: no head, same key names as the classifier.
    keys = set(model.state_dict())
    assert keys < set(_as_built(name).state_dict())
    assert not any(k.startswith(("classifier", "conv_head")) for k in keys)


def test_features_only_out_indices_select_and_prune():
    full = build("ghostnet_1x", features_only=True).eval()
    part = build("ghostnet_1x", features_only=True, out_indices=(0, -2)).eval()
    assert [d["index"] for d in part.feature_info] == [0, 3]
    assert len(part.blocks) == 6  # nothing after blocks.5, the stride-16 tap
    keep = part.state_dict()
    part.load_state_dict({k: v for k, v in full.state_dict().items() if k in keep}, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        all_maps, some = full(x), part(x)
    assert torch.equal(some[0], all_maps[0]) and torch.equal(some[1], all_maps[3])
    stem_only = build("ghostnet_1x", features_only=True, out_indices=[0])
    assert set(stem_only.state_dict()) == {"conv_stem.weight"}


def test_features_only_model_has_no_classifier():
    model = build("tinynet_e", features_only=True)
    with pytest.raises(RuntimeError, match="features_only"):
        model.reset_classifier(10)
    with pytest.raises(RuntimeError, match="features_only"):
        model.forward_features(torch.randn(1, 3, 64, 64))


# -- errors --------------------------------------------------------------------------

@pytest.mark.parametrize("width", [0, -0.5, float("nan"), float("inf")])
def test_bad_width(width):
    with pytest.raises(ValueError, match="width"):
        models.GhostNet(width=width)
    with pytest.raises(ValueError, match="width"):
        models.TinyNet(width=width)


@pytest.mark.parametrize("arg", ["resolution", "depth"])
def test_bad_tinynet_factor(arg):
    with pytest.raises(ValueError, match=arg):
        models.TinyNet(**{arg: 0})
    with pytest.raises(TypeError, match=arg):
        models.TinyNet(**{arg: "1.0"})


@pytest.mark.parametrize("name", ["ghostnet_1x", "tinynet_c"])
def test_bad_num_classes(name):
    with pytest.raises(ValueError, match="num_classes must be >= 0, got -1"):
        build(name, num_classes=-1)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        build(name, num_classes=10.0)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        build(name, num_classes=True)
    model = build(name)
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-3)
    assert model.num_classes == 1000 and model.classifier.out_features == 1000


@pytest.mark.parametrize("kwargs, message", [
    (dict(in_chans=0), "in_chans must be >= 1"),
    (dict(drop_rate=1.0), r"drop_rate must be in \[0, 1\)"),
    (dict(drop_rate=-0.1), r"drop_rate must be in \[0, 1\)"),
    (dict(out_indices=(1, 2)), "only applies with features_only=True"),
    (dict(features_only=True, out_indices=(0, 5)), "5 is out of range"),
    (dict(features_only=True, out_indices=(2, 2)), "strictly increasing"),
    (dict(features_only=True, out_indices=()), "non-empty"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build("tinynet_e", **kwargs)


@pytest.mark.parametrize("name", ALL)
def test_unknown_builder_kwargs_raise_type_error(name):
    with pytest.raises(TypeError, match=rf"{name}\(\) got unexpected keyword argument\(s\) 'num_clases' "
                                        r"\(did you mean 'num_classes'\?\)"):
        build(name, num_clases=10)
    with pytest.raises(TypeError, match="'pretrianed'.*'bogus'"):
        build(name, pretrianed=True, bogus=1)


def test_builders_fix_their_architecture():
    with pytest.raises(TypeError, match="'width'"):
        models.ghostnet_1x(width=2.0)
    with pytest.raises(TypeError, match="'depth'"):
        models.tinynet_a(depth=2.0)


@pytest.mark.parametrize("name", ["ghostnet_1x", "tinynet_a"])
def test_wrong_input_channels(name):
    model = _as_built(name)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\), got \(2, 1, 64, 64\); build the model with in_chans=1"):
        model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"got \(3, 64, 64\)"):
        model(torch.randn(3, 64, 64))
    features = build(name, features_only=True)
    with pytest.raises(ValueError, match="in_chans=4"):
        features(torch.randn(1, 4, 64, 64))


# -- packaging -----------------------------------------------------------------------

@pytest.mark.slow  # a new Python process
def test_importing_models_does_not_import_timm():
    code = (
        "import sys, models; models.ghostnet_1x(); models.tinynet_a(features_only=True); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'timm'); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- what fine-tuning users reach for (timm's names) ----------------------------------


@pytest.mark.parametrize("name", ["ghostnet_1x", "tinynet_e"])
def test_reset_classifier_with_global_pool(name):
    model = build(name).eval()
    x = _small()
    model.reset_classifier(4, global_pool="max")
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        fmap = model.forward_features(x)
    assert model(x).shape == (2, 4) and model.global_pool == "max"
    if name.startswith("tinynet"):
        torch.testing.assert_close(pooled, fmap.amax((2, 3)))
    model.reset_classifier(3)  # keeps the pooling
    assert model.global_pool == "max" and model.classifier.out_features == 3
    with pytest.raises(ValueError, match="global_pool must be one of 'avg', 'max'"):
        model.reset_classifier(3, global_pool="catavgmax")


@pytest.mark.parametrize("fused", [False, True])
def test_torchscript_compiles_the_model(fused):
    # All eight models, fused and unfused, features_only too: tests/test_torchscript.py (slow).
    model = build("tinynet_e").eval()
    if fused:
        model.fuse()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.9+: "torch.jit.script is deprecated"
        scripted = torch.jit.script(model)
    x = _small()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=1e-5)
    with pytest.raises(torch.jit.Error, match=r"expects a batch of images shaped \(N, 3, H, W\), got \(2, 1, 64, 64\)"):
        scripted(torch.randn(2, 1, 64, 64))
