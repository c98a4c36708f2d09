"""The package API: builders with pretrained weights and devices, list/get, weights objects."""
import io
import re
import sys
import warnings

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import models
from models import ghostnet, ghostnetv2, ghostnetv3, tinynet
from models import weights as weights_module
from models._hashing import sha256_file
from models.manifest import load_manifest

from reference import MODELS, PRETRAINED, build, measure


def _reference_state(files, name):
    data = files[name]
    if name == "tinynet_a":
        from safetensors.torch import load

        return load(data)
    return torch.load(io.BytesIO(data), weights_only=True)


FAMILIES = (ghostnet, ghostnetv2, ghostnetv3, tinynet)


def test_list_models():
    # Every row of the family tables, in their order (the README's table lists them: test_readme).
    assert models.list_models() == [name for family in FAMILIES for name in family.VARIANTS]
    released = load_manifest().models
    assert set(released) <= set(models.list_models())
    assert models.list_models(pretrained=True) == [name for name in models.list_models() if name in released]


def test_list_models_filters_as_timm_and_torchvision():
    # (the expected lists are the family tables: a new row joins them)
    tinynets = list(tinynet.VARIANTS)
    # timm's list_models("tinynet*"); the old signature took the string for pretrained_only=True.
    assert models.list_models("tinynet*") == tinynets
    assert models.list_models(filter="ghostnet_*") == list(ghostnet.VARIANTS)
    assert models.list_models(["ghostnet_*_1x", "ghostnet_1x", "tinynet_e"]) == ["ghostnet_1x", "tinynet_e"]
    released = load_manifest().models
    assert models.list_models("ghost*", pretrained=True) == [
        name for family in (ghostnet, ghostnetv2, ghostnetv3) for name in family.VARIANTS if name in released]
    assert models.list_models("ghostnetv3*") == list(ghostnetv3.VARIANTS)
    # torchvision's include= / exclude=
    assert models.list_models(include="tinynet_[ab]") == ["tinynet_a", "tinynet_b"]
    assert models.list_models(include=["*_1x", "*_e"], exclude=["tinynet*", "ghostnetv*"]) == ["ghostnet_1x"]
    assert models.list_models(exclude=["ghost*", "tinynet_[a-c]"]) == tinynets[3:]
    assert models.list_models("resnet*") == []


@pytest.mark.parametrize("call, error, message", [
    (lambda: models.list_models(True), TypeError, "filter must be a wildcard pattern"),
    (lambda: models.list_models(["tinynet*", 3]), TypeError, "filter must be a wildcard pattern"),
    (lambda: models.list_models(include=models), TypeError, "include must be a wildcard pattern"),
    (lambda: models.list_models(pretrained_only=True), TypeError, r"is now list_models\(pretrained=...\)"),
    (lambda: models.list_models("tinynet*", True), TypeError, "positional argument"),
    (lambda: models.list_models(pretrained="yes"), TypeError, "pretrained must be True or False"),
])
def test_list_models_rejects_what_it_would_misread(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_loads_published_weights_in_eval_mode(published, name):
    server, files = published
    before = len(server.hits_for(f"/{name}"))  # (the server serves the whole session)
    model = models.get_model(name, pretrained=True, progress=False)
    reference = _reference_state(files, name)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert not model.training
    assert model.pretrained_weights.name == name
    assert [h.path for h in server.hits_for(f"/{name}")[before:]] == [f"/{name}"]


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


def test_pretrained_new_head_warns_once_at_the_users_line_and_is_ready_to_train(published):
    _, files = published
    with pytest.warns(UserWarning) as record:
        model = models.tinynet_b(pretrained=True, num_classes=10, progress=False); line = sys._getframe().f_lineno  # noqa: E702
    assert len(record) == 1 and "classifier for num_classes=10 is new and untrained" in str(record[0].message)
    assert (record[0].filename, record[0].lineno) == (__file__, line)  # not api.py
    # Ready to fine-tune: BatchNorm must not stay frozen in eval mode.
    assert model.training and all(m.training for m in model.modules())
    with pytest.warns(UserWarning) as record:
        models.get_model("tinynet_b", weights="DEFAULT", num_classes=3, progress=False); line = sys._getframe().f_lineno  # noqa: E702,E501
    assert (record[0].filename, record[0].lineno) == (__file__, line)
    assert not models.tinynet_b(pretrained=True, progress=False).training
    assert not models.tinynet_b(pretrained=True, num_classes=0, progress=False).training  # an embedder
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


@pytest.mark.parametrize("kwargs", [dict(pretrained=True), dict(weights="DEFAULT"), dict(weights="IMAGENET1K_V1")])
def test_pretrained_without_released_weights_is_an_error(published, kwargs):
    server, _ = published
    before = len(server.hits)
    # (the served manifest holds the pinned models)
    with pytest.raises(ValueError, match="'ghostnet_1_3x' has no released weights; models with weights: "
                                         + ", ".join(PRETRAINED) + "$"):
        models.ghostnet_1_3x(**kwargs)
    assert len(server.hits) == before
    with pytest.raises(ValueError, match="'ghostnet_1_3x' has no released weights"):
        models.get_model_weights("ghostnet_1_3x")


@pytest.mark.parametrize("name", ["tinynet_e", "ghostnet_0_5x"])  # with and without released weights
def test_user_checkpoint(tmp_path, published, name):
    source = build(name, num_classes=10)
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    sha256 = sha256_file(path)
    for checkpoint in (str(path), path):
        model = getattr(models, name)(checkpoint=checkpoint, num_classes=10, checkpoint_sha256=sha256)
        expected = source.state_dict()  # (once: state_dict() per key took seconds)
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
        assert not model.training and model.pretrained_weights.weights_sha256 == sha256
        assert model.pretrained_weights.meta["categories"] == [f"class {i}" for i in range(10)]
    # A plain state dict names no classes: its classifier's rows are the count, unless one is given.
    assert models.get_model(name, checkpoint=path).num_classes == 10
    with pytest.raises(weights_module.CheckpointError, match=rf"does not fit {name} .* num_classes=1000"):
        models.get_model(name, checkpoint=path, num_classes=1000)
    with pytest.raises(weights_module.CheckpointError, match="sha256 expected"):
        models.get_model(name, checkpoint=path, num_classes=10, checkpoint_sha256="0" * 64)


@pytest.mark.parametrize("weights", ["mine.pth", "finetuned", "https://example.com/w.pth", "./DEFAULT"])
def test_a_path_in_weights_is_an_error_naming_checkpoint(tmp_path, monkeypatch, weights):
    monkeypatch.chdir(tmp_path)
    torch.save(build("tinynet_e").state_dict(), tmp_path / "mine.pth")  # even when the file exists
    (tmp_path / "DEFAULT").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"weights='{re.escape(weights)}' .*pass checkpoint='{re.escape(weights)}'"):
        models.tinynet_e(weights=weights)
    with pytest.raises(ValueError, match="is a path: .*checkpoint="):
        models.get_model("tinynet_e", weights=tmp_path / "mine.pth")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(pretrained=True, weights="DEFAULT"), ValueError, "not both"),
    (dict(pretrained=True, checkpoint="x.pth"), ValueError, "not both"),
    (dict(weights="DEFAULT", checkpoint="x.pth"), ValueError, "not both"),
    (dict(checkpoint_sha256="0" * 64), ValueError, "checkpoint_sha256 checks the file given with checkpoint="),
    (dict(weights_sha256="0" * 64), TypeError, r"weights_sha256= is now checkpoint_sha256="),
    (dict(checkpoint=3), TypeError, "checkpoint must be a path or URL"),
    (dict(weights=3), TypeError, "weights must be None, a weights enum member"),
    (dict(weights="default"), ValueError, "is not the name of published weights of tinynet_e"),
    (dict(weights="<TinyNet_A_Weights.DEFAULT>"), ValueError, "are the weights of tinynet_a, not of tinynet_e"),
    (dict(weights="TinyNet_A_Weights.IMAGENET1K_V1"), ValueError, "weights of tinynet_a, not of tinynet_e"),
    (dict(weights="TinyNet_E_Weights.IMAGENET1K_V9"), ValueError, "not a member of TinyNet_E_Weights"),
    (dict(pretrained="yes"), TypeError, "pretrained must be True or False"),
    (dict(device="gpu"), ValueError, "device 'gpu' is not a device name torch understands.*available here: cpu"),
    (dict(device=0.5), TypeError, "device must be a string or torch.device"),
    (dict(device="xla"), ValueError, "device type 'xla' is not supported here"),  # ('meta': test_builder_options)
    (dict(pretrianed=True), TypeError, r"'pretrianed' \(did you mean 'pretrained'\?\)"),
])
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        models.tinynet_e(**{key: _member(value) for key, value in kwargs.items()})


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet50'; models: " + ", ".join(models.list_models())):
        models.get_model("resnet50")


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
    size = MODELS[name].input_size
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


@pytest.mark.parametrize("name", MODELS)
def test_each_table_row_records_the_size_of_its_code(name):
    """What the help text, the CLI, the benchmark and the README read from the row is the code's
    (GhostNetV3: its deploy form's); a wrong or placeholder row is told what to write."""
    row, measured = MODELS[name], measure(name)
    recorded = dict(num_params=row.num_params, macs=row.macs, input_size=row.input_size)
    actual = dict(num_params=measured.params, macs=measured.macs, input_size=measured.input_size[0])
    assert measured.input_size[0] == measured.input_size[1]
    assert recorded == actual, f"{name}'s table row: write " + ", ".join(f"{k}={v:_}" for k, v in actual.items())
    if row.timm_name is not None:  # the benchmark and the timm tests build it
        import timm

        assert row.timm_name in timm.list_models(), f"{name}: timm has no {row.timm_name!r}; write None"
    if name in load_manifest().models:  # the manifest records the same (test_manifest: and the papers' accuracy)
        e = load_manifest()[name]
        assert (e.num_params, e.macs, e.input_size) == (row.num_params, row.macs, row.input_size)


# -- torchvision's weights API ------------------------------------------------------------------

def _member(text):
    """"<Enum.MEMBER>" -> that member of the package's enums; anything else as it is."""
    if isinstance(text, str) and text.startswith("<"):
        enum, member = text.strip("<>").split(".")
        return getattr(getattr(models, enum), member)
    return text


def test_weights_members_carry_url_transforms_meta_and_state_dict(published):
    _, files = published
    member = models.TinyNet_C_Weights.DEFAULT
    handle = models.get_weights("tinynet_c")
    assert member.url == handle.url and member.url.startswith("http://127.0.0.1")  # the manifest in use
    assert member.transforms()(torch.zeros(3, 300, 300, dtype=torch.uint8)).shape == (3, 184, 184)
    state, reference = member.get_state_dict(progress=False), _reference_state(files, "tinynet_c")
    assert state.keys() == reference.keys() and all(torch.equal(v, reference[k]) for k, v in state.items())
    meta = member.meta
    # torchvision's keys, so that code written for torchvision reads them ...
    assert meta["_metrics"] == {"ImageNet-1K": {"acc@1": 71.2, "acc@5": 89.7}}
    assert meta["_ops"] == pytest.approx(0.0995, abs=1e-3)  # GFLOPs as torchvision counts them (GMACs)
    assert meta["_file_size"] == pytest.approx(len(files["tinynet_c"]) / 2**20, abs=1e-3)  # MB
    assert isinstance(meta["_docs"], str) and meta["recipe"].startswith("https://")
    assert meta["min_size"] == (32, 32) and meta["num_params"] == 2_457_234 and len(meta["categories"]) == 1000
    # ... and the richer ones this project had.
    assert meta["metrics"] == meta["_metrics"] and meta["macs"] == 99_536_432 and meta["license"]


@pytest.mark.parametrize("weights", [
    "DEFAULT", "IMAGENET1K_V1", "TinyNet_D_Weights.IMAGENET1K_V1", "TinyNet_D_Weights.DEFAULT",
    "<TinyNet_D_Weights.DEFAULT>", "<TinyNet_D_Weights.IMAGENET1K_V1>",
])
def test_every_torchvision_spelling_of_weights_loads_the_published_weights(published, weights):
    _, files = published
    reference = _reference_state(files, "tinynet_d")
    weights = _member(weights)
    for model in (models.tinynet_d(weights=weights, progress=False),
                  models.get_model("tinynet_d", weights=weights, progress=False)):
        assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
        assert not model.training and model.pretrained_weights.name == "tinynet_d"


# -- timm's pretrained_cfg ---------------------------------------------------------------------

def test_timm_resolves_the_published_input_config():
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=models.tinynet_a())
    assert config["input_size"] == (3, 192, 192) and config["interpolation"] == "bicubic"
    assert config["crop_pct"] == 0.875
    assert resolve_data_config({}, model=models.ghostnet_1x())["interpolation"] == "bilinear"  # the authors'
    assert resolve_data_config({}, model=models.tinynet_e(in_chans=1))["input_size"] == (1, 106, 106)


@pytest.mark.parametrize("name", MODELS)
def test_pretrained_cfg_on_every_model(name):
    model = getattr(models, name)(features_only=name.endswith("_e"))
    cfg = model.pretrained_cfg
    assert cfg is model.default_cfg
    assert {"input_size", "interpolation", "crop_pct", "mean", "std", "num_classes", "first_conv",
            "classifier"} <= set(cfg)
    assert cfg["input_size"] == (3, *model.default_input_size)
    assert (cfg["first_conv"], cfg["classifier"], cfg["architecture"]) == ("conv_stem", "classifier", name)
    manifest = load_manifest()
    if name in manifest.models:
        e = manifest[name]
        assert (cfg["input_size"][1], cfg["interpolation"], cfg["crop_pct"], cfg["mean"], cfg["std"]) == (
            e.input_size, e.interpolation, e.crop_ratio, tuple(e.mean), tuple(e.std))
    if name.startswith("tinynet") and MODELS[name].timm_name:  # the same as timm's own for these models
        import timm
        from timm.data import resolve_data_config

        theirs = resolve_data_config({}, model=timm.create_model(MODELS[name].timm_name, pretrained=False))
        assert resolve_data_config({}, model=model) == theirs
