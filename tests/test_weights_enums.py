"""torchvision's weights objects: one enum class per released model, named as torchvision names
them, written out in models/pretrained.py (type checkers and ``from models import
TinyNet_A_Weights`` need a static name), checked here against the manifest; and ``meta``."""
import io

import pytest
import torch

import models
from models import pretrained
from models.manifest import load_manifest

FAMILY_NAMES = {"ghostnet": "GhostNet", "ghostnetv2": "GhostNetV2", "ghostnetv3": "GhostNetV3", "tinynet": "TinyNet"}


def _torchvision_name(model):
    """torchvision's rule: the family, then the model's suffix upper-cased (tinynet_a -> TinyNet_A_Weights)."""
    family, *rest = model.split("_")
    return "_".join([FAMILY_NAMES[family], *(part.upper() for part in rest), "Weights"])


def _missing_enum(model):
    """What models/pretrained.py lacks for a released ``model``, as the code to paste."""
    name = _torchvision_name(model)
    return (f"{model} has released weights but no weights enum: add to models/pretrained.py, in registry order,\n\n"
            f"class {name}(WeightsEnum):\n    IMAGENET1K_V1 = _Release({model!r})\n    DEFAULT = IMAGENET1K_V1\n\n"
            f"and {name!r} to __all__ at the top of models/pretrained.py (see CONTRIBUTING.md)")


def test_every_released_model_has_its_enum():
    released = list(load_manifest().models)
    missing = [model for model in released if not hasattr(models, _torchvision_name(model))]
    assert not missing, "\n\n".join(map(_missing_enum, missing))
    extra = [model for model in pretrained.released_models() if model not in released]
    assert not extra, f"weights enums of models without a manifest entry, to remove from models/pretrained.py: {extra}"
    # Registry order, as list_models(pretrained=True) (predict's choices and error messages list them so).
    assert pretrained.released_models() == models.list_models(pretrained=True)


def test_one_weights_enum_per_released_model_named_as_torchvision_names_them():
    enums = {model: _torchvision_name(model) for model in load_manifest().models}
    for name, enum_name in enums.items():
        enum = getattr(models, enum_name)
        assert enum.__name__ == enum_name and enum_name in pretrained.__all__ and enum_name in models.__all__
        assert models.get_model_weights(name) is enum is models.get_model_weights(getattr(models, name))
        assert list(enum.__members__) == ["IMAGENET1K_V1", "DEFAULT"]
        assert enum.DEFAULT is enum.IMAGENET1K_V1 is models.get_weight(f"{enum.__name__}.IMAGENET1K_V1")
        assert models.get_weight(f"{enum.__name__}.DEFAULT") is enum.DEFAULT
        assert repr(enum.DEFAULT) == f"{enum.__name__}.IMAGENET1K_V1"
    members = {member: name for name, enum in enums.items() for member in getattr(models, enum)}  # hashable
    assert len(members) == len(enums) and members[models.TinyNet_A_Weights.DEFAULT] == "tinynet_a"
    # Exactly the enums in __all__: no stale name is exported.
    assert sorted(n for n in pretrained.__all__ if n.endswith("_Weights")) == sorted(enums.values())
    with pytest.raises(ValueError, match="names no weights"):
        models.get_weight("ResNet50_Weights.IMAGENET1K_V1")


def test_the_missing_enum_message_is_code_that_works():
    """The message of the first test, run: the class it prints is the enum the others expect."""
    namespace = {"WeightsEnum": pretrained.WeightsEnum, "_Release": pretrained._Release}
    code = _missing_enum("tinynet_e").split("\n\n")[1]
    exec(code, namespace)
    enum = namespace["TinyNet_E_Weights"]
    assert [(m.name, m.value) for m in enum] == [(m.name, m.value) for m in models.TinyNet_E_Weights]
    assert enum.DEFAULT.model_name == "tinynet_e"


def test_enum_attributes_parse_the_manifest_once_per_content(tmp_path, monkeypatch):
    """url, meta and transforms() read the manifest in use; it is parsed again only when its bytes change."""
    parsed = []
    real = pretrained.load_manifest
    monkeypatch.setattr(pretrained, "load_manifest", lambda path: parsed.append(path) or real(path))
    copy = tmp_path / "manifest.json"
    copy.write_bytes(pretrained.DEFAULT_MANIFEST.read_bytes())
    monkeypatch.setenv("GHOSTNET_HUB_MANIFEST", str(copy))
    member = models.TinyNet_B_Weights.DEFAULT
    for _ in range(3):
        assert member.url.startswith("https://") and member.meta["num_params"] == 3_730_562
    assert len(parsed) == 1
    copy.write_text(copy.read_text().replace(member.url, "https://example.com/tinynet_b.pth", 1))
    assert member.url == "https://example.com/tinynet_b.pth" and len(parsed) == 2  # a change is seen


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


def test_torchvision_meta_keys_match_torchvision_conventions():
    from torchvision.models import MobileNet_V3_Small_Weights

    ours, theirs = models.GhostNet_1X_Weights.DEFAULT.meta, MobileNet_V3_Small_Weights.DEFAULT.meta
    assert set(theirs) <= set(ours)
    assert type(ours["_ops"]) is type(theirs["_ops"]) and ours["_ops"] == 0.141
    assert ours["_file_size"] == round(20_871_632 / 2**20, 3)  # the first file with a recorded size
    assert ours["file_size"] is None  # (the authors' file's size is not recorded)


def test_a_weights_handle_from_another_manifest_loads_from_that_manifest(published, server, tmp_path):
    """The CLI's --manifest: get_model(name, weights=get_weights(name, manifest))."""
    from reference import checkpoint_bytes
    from weights_server import weight_entry, write_manifest

    data = checkpoint_bytes("tinynet_d", seed=7)
    other = write_manifest(tmp_path / "other.json", {"tinynet_d": [weight_entry(server.add("/other.pth", data), data)]})
    handle = models.get_weights("tinynet_d", other)
    assert repr(handle) == f"Weights('tinynet_d', manifest={other!r})"
    assert handle == models.TinyNet_D_Weights.DEFAULT.resolve(other)
    model = models.tinynet_d(weights=handle, progress=False)
    expected = torch.load(io.BytesIO(data), weights_only=True)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert [h.path for h in server.hits] == ["/other.pth"]
    with pytest.raises(ValueError, match="the weights of tinynet_d cannot be loaded into tinynet_e"):
        models.tinynet_e(weights=handle)
