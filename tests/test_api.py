"""The package API: builders with pretrained weights and devices, list/get, weights objects."""
import io
import warnings

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import models
from models import api
from models import weights as weights_module

from reference import PRETRAINED, PUBLISHED, build, measure


def _reference_state(files, name):
    data = files[name]
    if name == "tinynet_a":
        from safetensors.torch import load

        return load(data)
    return torch.load(io.BytesIO(data), weights_only=True)


def test_list_models():
    assert models.list_models() == list(PUBLISHED)
    assert models.list_models(pretrained_only=True) == list(PRETRAINED)


@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_loads_published_weights_in_eval_mode(published, name):
    server, files = published
    model = models.get_model(name, pretrained=True, progress=False)
    reference = _reference_state(files, name)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert not model.training
    assert model.pretrained_weights.name == name
    assert [h.path for h in server.hits_for(f"/{name}")] == [f"/{name}"]


def test_builder_and_get_model_agree(published):
    a = models.tinynet_e(pretrained=True, progress=False)
    b = models.get_model("tinynet_e", pretrained=True, progress=False)
    x = torch.randn(2, 3, 106, 106)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_pretrained_build_does_no_random_init_and_no_copy(published, monkeypatch):
    init_devices = []
    real_normal = torch.nn.init.normal_

    def spy(tensor, *args, **kwargs):
        init_devices.append(tensor.device.type)
        return real_normal(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", spy)
    loaded = {}
    real_load = weights_module.Weights.get_state_dict

    def keep(*args, **kwargs):
        loaded.update(real_load(*args, **kwargs))
        return loaded

    monkeypatch.setattr(weights_module.Weights, "get_state_dict", keep)
    model = models.ghostnet_1x(pretrained=True, progress=False)
    assert set(init_devices) <= {"meta"}  # no random values drawn into real memory
    models.ghostnet_1x()
    assert "cpu" in init_devices  # (the spy does see a random build)
    # The module holds the very tensors that were read from the file: no second copy.
    for key, value in model.state_dict().items():
        assert value.data_ptr() == loaded[key].data_ptr(), key


def test_random_init_model_is_in_train_mode_without_weights():
    model = models.tinynet_e()
    assert model.training and model.pretrained_weights is None


def test_pretrained_new_head_warns_once(published):
    _, files = published
    with pytest.warns(UserWarning) as record:
        model = models.tinynet_b(pretrained=True, num_classes=10, progress=False)
    assert len(record) == 1 and "classifier for num_classes=10 is new and untrained" in str(record[0].message)
    reference = _reference_state(files, "tinynet_b")
    state = model.state_dict()
    assert state["classifier.weight"].shape == (10, 1280)
    assert all(torch.equal(state[k], reference[k]) for k in state if not k.startswith("classifier"))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 188, 188)).shape == (1, 10)


def test_pretrained_feature_extractor_with_num_classes_zero(published):
    full = models.ghostnet_1x(pretrained=True, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embedder = models.ghostnet_1x(pretrained=True, num_classes=0, progress=False)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = full.forward_head(full.forward_features(x), pre_logits=True)
        torch.testing.assert_close(embedder(x), expected, rtol=0, atol=0)


def test_pretrained_features_only(published):
    full = models.tinynet_c(pretrained=True, progress=False)
    backbone = models.tinynet_c(pretrained=True, features_only=True, out_indices=(2, 4), progress=False)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        maps = backbone(x)
        y = full.act1(full.bn1(full.conv_stem(x)))
        taps = []
        for stage in full.blocks:
            y = stage(y)
            taps.append(y)
    torch.testing.assert_close(maps[0], taps[2], rtol=0, atol=0)
    torch.testing.assert_close(maps[1], taps[6], rtol=0, atol=0)


@pytest.mark.parametrize("in_chans", [1, 2, 4, 7])
def test_pretrained_stem_adapted_to_in_chans(published, in_chans):
    _, files = published
    rgb = _reference_state(files, "tinynet_e")["conv_stem.weight"]
    model = models.tinynet_e(pretrained=True, in_chans=in_chans, progress=False)
    stem = model.conv_stem.weight
    assert stem.shape == (32, in_chans, 3, 3)
    # A constant image answers as its RGB version does.
    torch.testing.assert_close(stem.sum(dim=1), rgb.sum(dim=1))


def test_pretrained_without_released_weights_is_an_error(published):
    server, _ = published
    before = len(server.hits)
    with pytest.raises(ValueError, match="'ghostnet_1_3x' has no released weights; models with weights: "
                                         "ghostnet_1x, tinynet_a, tinynet_b, tinynet_c, tinynet_d, tinynet_e"):
        models.ghostnet_1_3x(pretrained=True)
    assert len(server.hits) == before


def test_user_weights(tmp_path, published):
    source = build("tinynet_e", num_classes=10)
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    model = models.tinynet_e(weights=str(path), num_classes=10)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    assert not model.training and model.pretrained_weights is None
    with pytest.raises(RuntimeError, match=r"do not fit tinynet_e .* num_classes=1000"):
        models.tinynet_e(weights=path)
    with pytest.raises(weights_module.CheckpointError, match="sha256 expected"):
        models.tinynet_e(weights=path, num_classes=10, weights_sha256="0" * 64)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(pretrained=True, weights="x.pth"), ValueError, "not both"),
    (dict(weights_sha256="0" * 64), ValueError, "weights_sha256 checks a file given with weights="),
    (dict(pretrained="yes"), TypeError, "pretrained must be True or False"),
    (dict(device="gpu"), ValueError, "device 'gpu' is not a device name torch understands.*available here: cpu"),
    (dict(device=0.5), TypeError, "device must be a string or torch.device"),
    (dict(device="meta"), ValueError, "device type 'meta' is not supported here"),
    (dict(pretrianed=True), TypeError, r"'pretrianed' \(did you mean 'pretrained'\?\)"),
])
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        models.tinynet_e(**kwargs)


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'tinynet_f'; models: ghostnet_0_5x, .*tinynet_e"):
        models.get_model("tinynet_f")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_unavailable_cuda_is_a_clear_error(device):
    with pytest.raises(ValueError, match=r"cannot be used: CUDA is not available .*available here: cpu"):
        models.tinynet_e(device=device)


def test_unavailable_mps_is_a_clear_error():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ValueError, match="'mps' cannot be used: MPS is not available"):
        models.tinynet_e(device="mps")


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), None])
def test_cpu_device_forms(published, device):
    model = models.tinynet_e(pretrained=True, device=device, progress=False)
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pretrained", [True, False])
def test_cuda_device(published, pretrained):
    model = models.tinynet_e(pretrained=pretrained, device="cuda", num_classes=10, progress=False)
    assert {t.device for t in model.state_dict().values()} == {torch.device("cuda", torch.cuda.current_device())}
    with torch.no_grad():
        assert model(torch.randn(1, 3, 106, 106, device="cuda")).device.type == "cuda"


# -- weights objects ------------------------------------------------------------------------

@pytest.mark.parametrize("name", PRETRAINED)
def test_transforms_are_torchvision_presets_with_the_published_recipe(name):
    w = models.get_weights(name)
    size = PUBLISHED[name][2]
    resize = int(size / 0.875) if name != "ghostnet_1x" else 256
    mode = T.InterpolationMode.BILINEAR if name == "ghostnet_1x" else T.InterpolationMode.BICUBIC
    image = Image.frombytes("RGB", (320, 240), bytes(range(256)) * 900)
    expected = T.Compose([
        T.Resize(resize, interpolation=mode, antialias=True), T.CenterCrop(size), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])(image)
    got = w.transforms()(image)
    assert got.shape == (3, size, size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_weights_meta():
    from torchvision.models import ResNet50_Weights

    w = models.get_weights("tinynet_b")
    meta = w.meta
    assert meta["categories"] == ResNet50_Weights.IMAGENET1K_V2.meta["categories"] and len(meta["categories"]) == 1000
    assert meta["metrics"] == {"ImageNet-1K": {"acc@1": 75.0, "acc@5": 92.2}}
    assert meta["num_params"] == 3_730_562 and meta["macs"] == 200_709_360
    assert meta["license"] == "Apache-2.0" and meta["paper"].startswith("https://arxiv.org/")
    assert w.url == w.urls[0] and len(w.urls) == 3 and all(u.startswith("https://") for u in w.urls)
    assert models.get_weights("ghostnet_1x").meta["file_size"] is None  # not published for the authors' file
    with pytest.raises(ValueError, match="no released weights"):
        models.get_weights("ghostnet_0_5x")


def test_unreleased_variant_facts_match_the_code():
    unreleased = [name for name in models.list_models() if name not in models.list_models(pretrained_only=True)]
    assert unreleased == ["ghostnet_0_5x", "ghostnet_1_3x"]
    for name in unreleased:
        variant = api.get_variant(name)
        measured = measure(name)
        assert measured.input_size == (224, 224)
        assert (measured.params, measured.macs) == (variant.num_params, variant.macs)
