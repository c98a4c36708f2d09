"""The model as a training loop uses it: gradients to every parameter, BatchNorm on a batch of one,
dropout and drop path as timm schedules them, the initialisation for training from scratch, and
gradient checkpointing."""
import math

import pytest
import torch
from torch import nn

from helpers import marked_slow
from reference import MODELS, WIDER, build


# (the wider GhostNetV2/V3 took half this test's time: the full run checks them)
@pytest.mark.parametrize("name", marked_slow(MODELS, WIDER))
def test_train_forward_backward_reaches_every_parameter(name):
    model = build(name, num_classes=10).train()
    x = torch.randn(4, 3, 64, 64)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for key, param in model.named_parameters():
        assert param.grad is not None, key
        assert torch.isfinite(param.grad).all(), key
        assert param.grad.abs().sum() > 0, key


@pytest.mark.parametrize("name", ["ghostnet_1x", "tinynet_d"])
def test_batch_of_one_in_train_mode_is_plain_batchnorm(name):
    model = build(name).train()
    x = torch.randn(1, 3, *model.default_input_size)
    with torch.no_grad():
        stem = model.conv_stem(x)
    out = model(x)
    assert out.shape == (1, 1000)
    # The stem BN updated its running statistics from this one image, as BN does.
    torch.testing.assert_close(model.bn1.running_mean, 0.1 * stem.mean((0, 2, 3)))
    assert model.bn1.num_batches_tracked.item() == 1
    # At 32x32 the last maps are 1x1: one value per channel, which BN refuses in training.
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as ours:
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError) as plain:
        nn.BatchNorm2d(4).train()(torch.randn(1, 4, 1, 1))
    assert str(ours.value).split(",")[0] == str(plain.value).split(",")[0]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_drop_rate_applies_to_logits_only_in_training():
    x = torch.randn(2, 3, 64, 64)
    model = build("tinynet_e", drop_rate=0.5).train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        features = model.forward_features(x)
        assert torch.equal(model.forward_head(features, pre_logits=True),
                           model.forward_head(features, pre_logits=True))
    plain = build("tinynet_e", drop_rate=0.0).train()
    with torch.no_grad():
        assert torch.equal(plain(x), plain(x))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), model(x))


@pytest.mark.parametrize("name", ["ghostnet_1x", "tinynet_a"])
def test_initialisation_for_training_from_scratch(name):
    model = build(name)
    for key, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.weight.numel() >= 4096:
            kh, kw = module.kernel_size
            expected = math.sqrt(2.0 / (kh * kw * module.out_channels // module.groups))
            assert module.weight.std().item() == pytest.approx(expected, rel=0.1), key
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            assert not module.bias.any(), key
        if isinstance(module, nn.BatchNorm2d):
            assert (module.weight == 1).all() and not module.bias.any(), key
    bound = 1 / math.sqrt(model.classifier.out_features)
    assert model.classifier.weight.abs().max() <= bound and not model.classifier.bias.any()
    # Signal neither explodes nor vanishes through the stages at init.
    stds = []
    handles = [stage.register_forward_hook(lambda m, i, o: stds.append(o.std().item())) for stage in model.blocks]
    with torch.no_grad():
        logits = model.train()(torch.randn(4, 3, 128, 128))
    for h in handles:
        h.remove()
    assert all(0.3 < s < 5 for s in stds), stds
    assert 0.01 < logits.std().item() < 2


def test_drop_path_rate_is_off_by_default_and_leaves_inference_unchanged():
    plain = build("tinynet_b")
    assert not any(type(m).__name__ == "DropPath" for m in plain.modules())
    deep = build("tinynet_b", drop_path_rate=0.3)
    deep.load_state_dict(plain.state_dict())  # same keys: stochastic depth has no parameters
    x = torch.randn(2, 3, 96, 112)  # a cheap non-square input
    with torch.no_grad():
        assert torch.equal(deep.eval()(x), plain.eval()(x))
    deep.train()
    with torch.no_grad():
        assert not torch.equal(deep.forward_features(x), deep.forward_features(x))  # branches dropped at random


@pytest.mark.parametrize("name", ["tinynet_a", "tinynet_e"])
def test_drop_path_schedule_is_timms(name):
    import timm

    ours = build(name, drop_path_rate=0.2)
    theirs = timm.create_model(name, pretrained=False, drop_path_rate=0.2)
    rates = [getattr(b.drop_path, "p", 0.0) for stage in ours.blocks for b in stage]
    expected = [getattr(b.drop_path, "drop_prob", 0.0) if b.has_skip else 0.0 for stage in theirs.blocks for b in stage]
    assert rates == pytest.approx(expected) and max(rates) > 0.15


def test_drop_path_in_every_ghost_bottleneck():
    model = build("ghostnet_1x", drop_path_rate=0.2)
    rates = [b.drop_path.p if hasattr(b.drop_path, "p") else 0.0 for stage in model.blocks for b in stage
             if hasattr(b, "ghost1")]
    assert len(rates) == 16 and rates == pytest.approx([0.2 * i / 16 for i in range(16)])
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\)"):
        build("ghostnet_1x", drop_path_rate=1.0)


def _saved_activation_bytes(model, x):
    """Bytes of the tensors autograd keeps for backward (by storage, once each) while the
    forward pass runs: the activation memory that gradient checkpointing trades for compute."""
    storages = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x).logsumexp(dim=-1).sum()
    return loss, sum(storages.values())


@pytest.mark.parametrize("name", ["ghostnet_1x", "tinynet_c"])
def test_grad_checkpointing_saves_memory_and_keeps_the_gradients(name):
    import copy

    plain = build(name, drop_rate=0.0).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x = torch.randn(4, 3, 96, 96)
    loss, kept = _saved_activation_bytes(plain, x)
    loss.backward()
    loss_ckpt, kept_ckpt = _saved_activation_bytes(checkpointed, x)
    loss_ckpt.backward()
    # (measured: ghostnet_1x 30.0 -> 3.0 MB, tinynet_c 40.6 -> 5.0 MB)
    assert kept_ckpt < 0.25 * kept, (kept_ckpt, kept)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for (key, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=key)
    checkpointed.set_grad_checkpointing(False)
    assert _saved_activation_bytes(checkpointed, x)[1] == kept
    with pytest.raises(TypeError, match="enable must be True or False"):
        plain.set_grad_checkpointing("yes")
