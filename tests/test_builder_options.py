"""What a torchvision/timm user passes to a builder and to the weights: every option in the
signature (each once in the errors), dtype=, device="meta", weights versions, transforms
(antialias=...), the hub's get_weight / get_model_weights, and the manifest read once."""
import ast
import importlib.util
import inspect
import os
import re
import sys

import pytest
import torch

import models
from models import _help, api
from models import manifest as manifest_module

from helpers import ROOT

# -- signatures ---------------------------------------------------------------------------

EVERY_OPTION = ["pretrained", "weights", "progress", "device", "num_classes", "checkpoint", "checkpoint_sha256",
                "in_chans", "drop_rate", "drop_path_rate", "features_only", "out_indices", "fuse", "channels_last",
                "dtype", "require_pinned"]


def _parameters(function, drop):
    return [p for p in inspect.signature(function).parameters.values()
            if p.name not in drop and p.kind is not p.VAR_KEYWORD]


@pytest.mark.parametrize("name", models.list_models())
def test_builders_and_get_model_list_every_option(name):
    builder = getattr(models, name)
    params = _parameters(builder, ())
    assert [p.name for p in params] == EVERY_OPTION
    assert [p.name for p in _parameters(models.get_model, ("name",))] == EVERY_OPTION
    # The documented defaults are the real ones; the class's own options keep the class's defaults.
    family = api.get_variant(name).cls
    own = inspect.signature(family).parameters
    for p in params:
        assert _help._ARGUMENT_DOCS[p.name][1] == repr(p.default), p.name
        if p.name in own and p.name != "num_classes":
            assert own[p.name].default == p.default, p.name
    assert set(api.get_variant(name).options) <= set(EVERY_OPTION)  # a new class option cannot be forgotten
    assert inspect.signature(builder).return_annotation in (family.__name__, family)


def test_the_static_builder_type_is_get_models_signature():
    """mypy reads api.Builder (a Protocol); runtime reads get_model: one list, checked here."""
    static = inspect.signature(api.Builder.__call__)
    runtime = inspect.signature(models.get_model)
    assert [(p.name, p.kind, p.default, p.annotation) for p in list(static.parameters.values())[1:]] == \
        [(p.name, p.kind, p.default, p.annotation) for p in list(runtime.parameters.values())[1:]]
    assert static.return_annotation == "_M_co" and runtime.return_annotation == "ImageClassifier"


def test_type_checkers_see_every_builder():
    """api.__all__ lists the builders as *_BUILDERS, which mypy cannot read: the names spelt
    out for it must be the models (a new model missing there is untyped, not missing)."""
    tree = ast.parse(inspect.getsource(api))
    (block,) = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    (extend,) = block.body
    assert ast.literal_eval(extend.value) == models.list_models()


def test_unknown_keyword_lists_each_accepted_option_once():
    with pytest.raises(TypeError) as caught:
        models.tinynet_e(num_clases=3)
    message = str(caught.value)
    assert "'num_clases' (did you mean 'num_classes'?)" in message
    accepted = message.split("it accepts: ", 1)[1].split(", ")
    assert sorted(accepted) == sorted(EVERY_OPTION) and len(accepted) == len(set(accepted))
    with pytest.raises(TypeError, match="get_model|tinynet_e"):
        models.get_model("tinynet_e", drop_pth_rate=0.1)


# -- weights versions ------------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["IMAGENET1K_V2", "imagenet", "default", "IMAGENET22K_V1",
                                     "TinyNet_E_Weights.IMAGENET1K_V2"])
def test_an_unknown_version_names_the_versions_that_exist(weights):
    with pytest.raises(ValueError) as caught:
        models.tinynet_e(weights=weights)
    message = str(caught.value)
    assert "IMAGENET1K_V1" in message and "DEFAULT" in message and "checkpoint=" not in message, message


def test_a_path_for_weights_still_points_at_checkpoint(tmp_path):
    for weights in ("mine.pth", "finetuned", str(tmp_path / "x"), "https://example.com/w.pth"):
        with pytest.raises(ValueError, match="checkpoint="):
            models.tinynet_e(weights=weights)
    with pytest.raises(ValueError, match="no released weights"):
        models.ghostnet_0_5x(weights="IMAGENET1K_V2")


# -- dtype and device="meta" -------------------------------------------------------------------

def test_dtype_casts_after_loading(published):
    _, files = published
    reference = models.tinynet_e(pretrained=True, progress=False)
    model = models.tinynet_e(pretrained=True, progress=False, dtype=torch.bfloat16)
    assert {t.dtype for t in model.parameters()} == {torch.bfloat16} and not model.training
    assert torch.equal(model.conv_stem.weight, reference.conv_stem.weight.to(torch.bfloat16))
    assert model.bn1.num_batches_tracked.dtype == torch.int64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference(x), rtol=0.1, atol=0.2)
    fused = models.tinynet_e(fuse=True, channels_last=True, dtype=torch.float16)
    assert fused.conv_stem.weight.dtype == torch.float16 and fused.fused
    assert fused.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert models.get_model("ghostnet_0_5x", dtype=torch.float64).classifier.weight.dtype == torch.float64


@pytest.mark.parametrize("dtype, error", [(torch.int8, "floating"), ("bfloat16", "torch.dtype"),
                                          (torch.complex64, "floating")])
def test_dtype_refuses_what_is_not_a_float_dtype(dtype, error):
    with pytest.raises(TypeError, match=error):
        models.tinynet_e(dtype=dtype)


def test_meta_device_builds_without_storage_and_downloads_nothing(published):
    server, _ = published
    hits = len(server.hits)
    model = models.tinynet_e(pretrained=True, device="meta", progress=False)
    assert len(server.hits) == hits  # nothing fetched
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.pretrained_weights is not None and not model.training  # as the loaded model would be
    assert model(torch.empty(2, 3, 64, 64, device="meta")).shape == (2, 1000)
    # Later: storage, then the weights.
    model.to_empty(device="cpu")
    model.load_state_dict(model.pretrained_weights.get_state_dict(progress=False))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), models.tinynet_e(pretrained=True, progress=False)(x))
    head = models.tinynet_e(pretrained=True, num_classes=4, device=torch.device("meta"), progress=False)
    assert head.classifier.weight.is_meta and head.num_classes == 4 and head.training  # a new head: train
    assert models.ghostnet_0_5x(device="meta", dtype=torch.bfloat16).conv_stem.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="meta.*checkpoint"):
        models.tinynet_e(checkpoint=str(ROOT / "no-such.pth"), device="meta")


# -- transforms --------------------------------------------------------------------------------

def test_transforms_take_torchvisions_preset_options(published):
    enum_member = models.TinyNet_E_Weights.DEFAULT
    preset = enum_member.transforms(antialias=False)
    assert preset.antialias is False
    assert enum_member.transforms().antialias is True  # torchvision's default
    handle = enum_member.resolve()
    custom = handle.transforms(crop_size=96, resize_size=110, interpolation="bilinear")
    assert (custom.crop_size, custom.resize_size, custom.interpolation.value) == ([96], [110], "bilinear")
    published_preset = handle.transforms()
    assert published_preset.crop_size == [handle.entry.input_size] and published_preset.mean == list(handle.entry.mean)
    with pytest.raises(TypeError):
        handle.transforms(antialiasing=False)


# -- hub entries -------------------------------------------------------------------------------

def test_hub_offers_get_weight_and_get_model_weights(published):
    spec = importlib.util.spec_from_file_location("_hubconf_options", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    private = sys.modules[hubconf._models.__name__]
    assert hubconf.get_weight is private.get_weight and hubconf.get_model_weights is private.get_model_weights
    member = torch.hub.load(str(ROOT), "get_weight", "TinyNet_E_Weights.DEFAULT", source="local")
    assert repr(member) == "TinyNet_E_Weights.IMAGENET1K_V1"
    enum = torch.hub.load(str(ROOT), "get_model_weights", "tinynet_e", source="local")
    assert enum.__name__ == "TinyNet_E_Weights" and enum.DEFAULT.transforms().crop_size == [106]
    model = torch.hub.load(str(ROOT), "tinynet_e", weights=member, source="local", progress=False)
    assert model.pretrained_weights.name == "tinynet_e"


# -- the manifest, read once per content of the file ----------------------------------------

def test_weights_enum_reads_the_manifest_once_per_file_content(published, tmp_path, monkeypatch):
    parsed = []
    real_parse = manifest_module.parse
    monkeypatch.setattr(manifest_module, "parse", lambda text: parsed.append(1) or real_parse(text))
    member = models.TinyNet_E_Weights.DEFAULT
    first = member.url
    for _ in range(5):
        assert member.url == first and member.meta["input_size"] and member.transforms()
    assert len(parsed) <= 1
    # Another file, or the same file changed, is read again.
    path = tmp_path / "m.json"
    with open(os.environ["GHOSTNET_HUB_MANIFEST"]) as f:
        text = f.read()
    path.write_text(text.replace(first, first + "?moved"))
    monkeypatch.setenv("GHOSTNET_HUB_MANIFEST", str(path))
    assert member.url == first + "?moved"
    count = len(parsed)
    stat = path.stat()
    path.write_text(text.replace(first, first + "?again"))  # the same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and mtime (a rewrite within one clock tick)
    assert member.url == first + "?again" and len(parsed) == count + 1
    assert re.fullmatch(r"Weights\('tinynet_e'.*\)", repr(member.resolve()))
