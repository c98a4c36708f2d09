"""The fused inference form: same function, fewer ops, eval-only; compile, export, ONNX."""
import functools
import warnings

import pytest
import torch
from torch import nn

import models
from models.fuse import PooledLinear
from models.tools._samples import settle_batchnorm

from helpers import marked_slow
from reference import ARCHITECTURES, PRETRAINED, build

# One released model of each architecture (ghostnet_1x, tinynet_e): what torch.export and the ONNX
# exporter trace, and what the fast loop folds. (Every released model, V2 and V3 included, is
# exported to ONNX and checked in test_export.py; the full run folds every released model.)
_ONE_EACH = [name for name in ARCHITECTURES if name in PRETRAINED]


@functools.cache
def _calibrated_state(name, options):
    """Random weights with BatchNorm as training leaves it: affine terms far from identity
    (the last BN of each residual branch small, as trained residual nets have it), running
    statistics measured on data at the model's input size; so activations and logits have
    a trained model's scale and every folded term matters. Calibrated once per model and
    options in a session: every test gets fresh modules loaded with these tensors."""
    torch.manual_seed(7)
    model = build(name, **dict(options))
    branch_ends = {"bn3", "bn2"} if name.startswith("tinynet") else {"ghost2"}
    for path, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            small = path.startswith("blocks.") and any(part in branch_ends for part in path.split("."))
            nn.init.uniform_(module.weight, *((0.1, 0.5) if small else (0.5, 1.5)))
            nn.init.uniform_(module.bias, -0.3, 0.3)
    settle_batchnorm(model, (torch.randn(8, 3, *model.default_input_size) for _ in range(3)))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _trained_like(name, **kwargs):
    """A new model holding the calibrated weights of ``_calibrated_state``, in eval mode."""
    model = build(name, **kwargs)
    model.load_state_dict(_calibrated_state(name, tuple(sorted(kwargs.items()))))
    return model.eval()


def _pair(name, channels_last=False, **kwargs):
    plain = _trained_like(name, **kwargs)
    fused = _trained_like(name, **kwargs).fuse(channels_last=channels_last)
    again = _trained_like(name, **kwargs).conv_stem.weight
    assert all(torch.equal(a, b) for a, b in zip(plain.conv_stem.weight, again, strict=True))
    return plain, fused


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("name", marked_slow(PRETRAINED, set(PRETRAINED) - set(_ONE_EACH)))
def test_fused_matches_unfused(name, channels_last):
    plain, fused = _pair(name, channels_last)
    x = torch.randn(8, 3, *plain.default_input_size)
    with torch.no_grad():
        ref, out = plain(x), fused(x)
    assert (ref[0] - ref[1]).abs().max() > 1e-2  # a comparison that can tell models apart
    assert (out - ref).abs().max().item() <= 1e-4
    assert torch.equal(out.argmax(dim=1), ref.argmax(dim=1))
    # Folding adds no error of its own: against float64, fused is as close as unfused.
    with torch.no_grad():
        exact = _trained_like(name).double()(x.double())
    assert (out.double() - exact).abs().max() <= 3 * (ref.double() - exact).abs().max() + 1e-6
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert len(list(fused.parameters())) < len(list(plain.parameters()))  # one bias per folded BN pair
    if channels_last:
        assert fused.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)


def test_fused_model_is_eval_only():
    model = build("tinynet_e").fuse()
    assert not model.training and model.fused
    with pytest.raises(RuntimeError, match="fused for inference .* cannot be trained"):
        model.train()
    model.eval()
    with pytest.raises(RuntimeError, match="already optimised"):
        model.fuse()
    assert not any(p.requires_grad for p in model.parameters())


def test_pooled_1x1_convolutions_become_matrix_products():
    fused = build("ghostnet_1x").fuse()
    assert isinstance(fused.conv_head, PooledLinear)
    assert all(isinstance(m.conv_reduce, PooledLinear) for m in fused.modules() if hasattr(m, "conv_reduce"))


@pytest.mark.parametrize("name", ["ghostnet_1x", "tinynet_b"])
def test_fused_features_keep_their_taps(name):
    plain, fused = _pair(name, features_only=True)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        for a, b in zip(plain(x), fused(x), strict=True):
            assert (a - b).abs().max().item() <= 1e-4
    if name == "ghostnet_1x":  # the stride-2 tap is the stem conv before its BN: not folded
        assert isinstance(fused.bn1, nn.BatchNorm2d)


def test_fuse_and_channels_last_from_the_entry_point(published):
    plain = models.tinynet_c(pretrained=True, progress=False)
    fast = models.tinynet_c(pretrained=True, progress=False, fuse=True, channels_last=True)
    assert fast.fused and fast.channels_last
    x = torch.randn(4, 3, 184, 184)
    with torch.no_grad():
        assert (fast(x) - plain(x)).abs().max().item() <= 1e-4
    layout_only = models.tinynet_c(channels_last=True)
    assert layout_only.training and not layout_only.fused
    assert layout_only.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(TypeError, match="fuse must be True or False"):
        models.tinynet_c(fuse="yes")


@pytest.mark.slow
@pytest.mark.parametrize("name", _ONE_EACH)
def test_torch_export(name):
    model = _trained_like(name)
    x = torch.randn(2, 3, *model.default_input_size)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_torch_export_fused_channels_last():
    plain, fused = _pair("ghostnet_1x", channels_last=True)
    x = torch.randn(2, 3, 224, 224)
    program = torch.export.export(fused, (x,))
    with torch.no_grad():
        assert (program.module()(x) - plain(x)).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", _ONE_EACH)
def test_onnx_export_runs_in_onnxruntime(name, tmp_path):
    import onnx
    import onnxruntime as ort

    model = _trained_like(name)
    x = torch.randn(2, 3, *model.default_input_size)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own progress chatter
        torch.onnx.export(model, (x,), str(path), opset_version=18, dynamo=True,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}})
    graph = onnx.load(str(path))
    assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) >= 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = torch.randn(5, 3, *model.default_input_size)  # another batch size than traced
    (got,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(got) - model(batch)).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_torch_compile_of_the_unfused_model():
    # (The fused form, as `--backend compile` compiles it, is checked logit by logit in
    # test_backends.py, where predict compiles the same graph: Inductor builds its kernels once.)
    plain = _trained_like("tinynet_e")
    x = torch.randn(2, 3, 106, 106)
    with torch.no_grad():
        assert (torch.compile(plain)(x) - plain(x)).abs().max().item() <= 1e-4
