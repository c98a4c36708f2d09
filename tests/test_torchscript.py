"""torch.jit.script compiles every architecture, unfused and fused, and computes what eager does;
the PyTorch Hub listing says so with the "scriptable" tag, as the original GhostNet listing did.
One model of each architecture: scripting compiles the code, which the widths of a family share
(scripting every width took about four minutes of the suite and checked the same code again)."""
import re
import warnings

import pytest
import torch

from helpers import ROOT
from reference import ARCHITECTURES, build, random_state_dict


def _script(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.9+: "torch.jit.script is deprecated"
        return torch.jit.script(model)


def _trained(name, **kwargs):
    """The model with checkpoint-like weights (BatchNorm statistics far from their init)."""
    model = build(name, **kwargs)
    model.load_state_dict(random_state_dict(model))
    return model.eval()


@pytest.mark.slow  # scripting takes seconds per model
@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("form", ["unfused", "fused", "fused+channels_last"])
def test_scripted_model_equals_eager(name, form):
    model = _trained(name)
    if form != "unfused":
        model.fuse(channels_last=form.endswith("channels_last"))
    scripted = _script(model)
    x = torch.randn(2, 3, 96, 112)
    with torch.no_grad():
        expected = model(x)
        got = scripted(x)
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
    # A scripted model saves and loads without the Python code.
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(_save(scripted))(x), got, rtol=0, atol=0)


def _save(scripted):
    import io

    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ghostnet_1x", "tinynet_a"])
@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3, 4), (0,), (1, 3)])
def test_scripted_features_only_equals_eager(name, out_indices):
    model = _trained(name, features_only=True, out_indices=out_indices)
    scripted = _script(model)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for got, expected in zip(scripted(x), model(x), strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_scripted_training_model_with_drop_path_and_a_new_head():
    model = build("tinynet_e", num_classes=7, drop_path_rate=0.2).train()
    scripted = _script(model)
    loss = scripted(torch.randn(4, 3, 64, 64)).logsumexp(-1).sum()
    loss.backward()
    assert model.classifier.weight.grad is not None


def test_hub_listing_is_tagged_scriptable():
    (listing,) = (ROOT / "hub").glob("*.md")
    tags = re.search(r"^tags: \[(.*)\]$", listing.read_text(), re.M)[1]
    assert "scriptable" in [t.strip() for t in tags.split(",")]
