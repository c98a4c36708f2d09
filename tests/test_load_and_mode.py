"""What loading leaves behind: a fused model refuses a state dict it cannot take without
touching a parameter, and the train/eval mode after loading and after a new head is what a
timm user relies on (and what docs/using.md's table says)."""
import re
import warnings

import pytest
import timm  # the test oracle (requirements-dev.txt)
import torch

import models

from helpers import doc


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# -- a fused model and a state dict it cannot take ------------------------------------

@pytest.mark.parametrize("name", ["tinynet_e", "ghostnet_0_5x"])
@pytest.mark.parametrize("strict", [True, False])
def test_fused_model_refuses_an_unfused_state_dict_untouched(name, strict):
    fused = getattr(models, name)(fuse=True)
    before = _snapshot(fused)
    torch.manual_seed(1)
    unfused = getattr(models, name)().state_dict()  # other values: a partial copy would show
    with pytest.raises(RuntimeError) as caught:
        fused.load_state_dict(unfused, strict=strict)
    assert _unchanged(fused, before)
    message = str(caught.value)
    # Short, one line, and it says what to do.
    assert "\n" not in message and len(message) < 400, message
    assert "before fusing" in message and ".fuse()" in message and "fused" in message


def test_fused_model_refuses_a_state_dict_of_another_shape_untouched():
    fused = models.tinynet_e(fuse=True)
    before = _snapshot(fused)
    other = models.tinynet_d(fuse=True).state_dict()
    with pytest.raises(RuntimeError, match="nothing was loaded") as caught:
        fused.load_state_dict(other)
    assert _unchanged(fused, before)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400
    # strict=False keeps torch's rule: keys may be missing, a present key must fit.
    with pytest.raises(RuntimeError, match="shape"):
        fused.load_state_dict({"conv_stem.weight": torch.zeros(1, 3, 3, 3)}, strict=False)
    assert _unchanged(fused, before)


def test_fused_model_takes_the_state_dict_of_a_fused_model():
    source, target = models.tinynet_e(fuse=True), models.tinynet_e(fuse=True)
    torch.nn.init.normal_(source.conv_stem.weight)
    result = target.load_state_dict(source.state_dict())
    assert result.missing_keys == result.unexpected_keys == []
    assert _unchanged(target, source.state_dict())
    # strict=False and assign= behave as torch's.
    partial = {"conv_stem.weight": torch.ones_like(source.conv_stem.weight)}
    result = target.load_state_dict(partial, strict=False, assign=True)
    assert "conv_stem.bias" in result.missing_keys
    assert target.conv_stem.weight.data_ptr() == partial["conv_stem.weight"].data_ptr()  # assigned, not copied
    x = torch.randn(1, 3, 64, 64)
    unfused = models.tinynet_e().eval()
    unfused.load_state_dict(models.tinynet_e().state_dict())  # an unfused model is not affected
    assert target(x).shape == unfused(x).shape == (1, 1000)


# -- the mode after loading and after a new head ----------------------------------------

def test_a_new_head_means_training_and_no_head_keeps_the_mode():
    model = models.tinynet_e().eval()
    model.reset_classifier(4)
    assert model.training and all(m.training for m in model.modules())
    assert "train mode" in model.reset_classifier.__doc__
    model.eval().reset_classifier(0)
    assert not any(m.training for m in model.modules())
    model.train().reset_classifier(0)
    assert all(m.training for m in model.modules())
    fused = models.tinynet_e(fuse=True)
    head = fused.classifier
    with pytest.raises(RuntimeError, match="fused"):
        fused.reset_classifier(4)
    assert fused.classifier is head and not fused.training and fused.num_classes == 1000


def _published_file(files, tmp_path, name):
    # tinynet_a is served as safetensors, the others as torch files (conftest.py).
    path = tmp_path / (f"{name}.safetensors" if name == "tinynet_a" else f"{name}.pth")
    path.write_bytes(files[name])
    return path


def _timm_pretrained(name, path, **kwargs):
    """timm's model with the same published weights, read from ``path`` (no download)."""
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)


def _one_step(model):
    """One SGD step on a batch; the running mean of the first BatchNorm before and after."""
    bn = model.bn1
    before = bn.running_mean.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(4, 3, 64, 64) * 3 + 1, torch.tensor([0, 1, 2, 3])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return before, bn.running_mean


def test_load_then_new_head_then_a_step_updates_batchnorm_as_in_timm(published, tmp_path):
    _, files = published
    theirs = _timm_pretrained("tinynet_e", _published_file(files, tmp_path, "tinynet_e"))
    ours = models.tinynet_e(pretrained=True, progress=False)
    assert not ours.training  # inference-ready, as the hub use case wants
    for model in (theirs, ours):
        model.reset_classifier(4)
        before, after = _one_step(model)
        assert not torch.equal(before, after), type(model).__name__  # BatchNorm is not frozen


# docs/using.md's mode table: "| `call` | timm's mode | our mode |".
_MODE_TABLE = "| call | timm | here |"
# timm's spelling of each call (with the published file instead of a download).
_TIMM_CALLS = {
    'models.get_model("tinynet_a")': lambda path, mine: timm.create_model("tinynet_a"),
    'models.get_model("tinynet_a", pretrained=True)': lambda path, mine: _timm_pretrained("tinynet_a", path),
    'models.get_model("tinynet_a", checkpoint="mine.pth")':
        lambda path, mine: timm.create_model("tinynet_a", checkpoint_path=str(mine)),
    'models.get_model("tinynet_a", pretrained=True, num_classes=10)':
        lambda path, mine: _timm_pretrained("tinynet_a", path, num_classes=10),
}


def _mode(model):
    return "train" if model.training else "eval"


@pytest.mark.slow  # loads our and timm's pretrained model per row
def test_readme_mode_table_is_what_timm_and_the_models_do(published, tmp_path, monkeypatch):
    _, files = published
    readme = doc("using")
    section = readme[readme.index("## Coming from torchvision or timm"):]
    lines = section.split(_MODE_TABLE + "\n", 1)[1].splitlines()[1:]
    rows = [re.fullmatch(r"\| `(.*)` \| (\w+) \| \**(\w+)\** \|", line).groups()
            for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("|"))]]
    assert len(rows) == 6
    path = _published_file(files, tmp_path, "tinynet_a")
    monkeypatch.chdir(tmp_path)
    torch.save(models.tinynet_a().state_dict(), tmp_path / "mine.pth")
    for call, timm_mode, our_mode in rows:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the new-head warning
            if call.startswith("m."):  # on a loaded model in eval mode, and on one in train mode
                for start in ("eval", "train"):
                    for m in (models.tinynet_a(pretrained=True, progress=False),
                              _timm_pretrained("tinynet_a", path)):
                        m.train(start == "train")
                        eval(call, {"m": m})
                        expected = timm_mode if isinstance(m, timm.models.EfficientNet) else our_mode
                        assert _mode(m) == (start if expected == "unchanged" else expected), (call, type(m), start)
                continue
            ours = eval(call, {"models": models})
            theirs = _TIMM_CALLS[call](path, tmp_path / "mine.pth")
        assert (_mode(theirs), _mode(ours)) == (timm_mode, our_mode), call
    assert {call for call, *_ in rows if not call.startswith("m.")} == set(_TIMM_CALLS)
