"""Weights nobody published a checksum for (GhostNetV2/V3): trusted on first use, against
loopback servers and files these tests make. The first use compares every source and records
what it saw; a later, different file is refused; disagreeing sources are refused; pinned-only
mode refuses them outright; ``manifest pin`` turns them into pinned weights."""
import argparse
import io
import json
import logging
import pathlib
import re

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

import models
import models.weights
from models import _trust
from models.cache import default_cache_dir
from models.download import OfflineError

from helpers import cli
from weights_server import checksums, write_manifest

NAME = "ghostnetv2_1x"


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"conv_stem.weight": torch.randn(4, 3, 3, 3, generator=g),
            "blocks.2.0.ghost1.cheap_rpr_conv.0.bn.weight": torch.rand(4, generator=g),
            "bn1.num_batches_tracked": torch.tensor(5)}


def _authors_file(state):
    """Like the authors' release asset: a training checkpoint, EMA weights beside the weights,
    thop's counters in the state dict."""
    buffer = io.BytesIO()
    torch.save({"epoch": 449, "arch": "ghostnet", "args": argparse.Namespace(model="ghostnetv3"),
                "state_dict": {**state, "conv_stem.total_ops": torch.zeros(1, dtype=torch.float64)},
                "state_dict_ema": {k: torch.zeros_like(v) for k, v in state.items()}}, buffer)
    return buffer.getvalue()


def _timm_file(state):
    """Like timm's copy on Hugging Face: safetensors, the branch BatchNorms named bn1."""
    return safetensors_bytes({k.replace("_rpr_conv.0.bn.", "_rpr_conv.0.bn1."): v for k, v in state.items()})


def _unpinned(url, fmt):
    return {"urls": [url], "format": fmt, "checksums": {}, "size": None, "unpinned": True}


@pytest.fixture
def sources(server, tmp_path, monkeypatch):
    """The model's two sources on loopback, and a manifest in use that lists them unpinned."""
    state = _state()
    data = {"/authors.pth.tar": _authors_file(state), "/timm.safetensors": _timm_file(state)}
    for path, body in data.items():
        server.add(path, body)
    manifest = write_manifest(tmp_path / "m.json", {NAME: [_unpinned(server.url("/authors.pth.tar"), "torch"),
                                                           _unpinned(server.url("/timm.safetensors"), "safetensors")]})
    monkeypatch.setenv("GHOSTNET_HUB_MANIFEST", manifest)
    return server, state, data, manifest


def _load(**kwargs):
    return models.get_weights(NAME).get_state_dict(progress=False, **kwargs)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_first_use_compares_every_source_and_records_what_it_saw(sources):
    server, state, data, _ = sources
    assert not models.get_weights(NAME).pinned
    assert _equal(_load(), state)  # the state_dict: not the EMA weights, not thop's counters, authors' names
    assert [len(server.hits_for(p)) for p in data] == [1, 1]  # both sources, once
    files = models.get_weights(NAME).entry.files
    for file, body in zip(files, data.values(), strict=True):
        record = _trust.read_record(file)
        assert (record["sha256"], record["size"]) == (checksums(body)["sha256"], len(body))
        assert (default_cache_dir() / file.cache_name).read_bytes() == body
    assert _equal(_load(), state) and [len(server.hits_for(p)) for p in data] == [1, 1]  # the cache, no network


def test_a_source_that_later_serves_other_bytes_is_refused_in_one_line(sources):
    server, _, data, _ = sources
    _load()
    cached, other = (default_cache_dir() / f.cache_name for f in models.get_weights(NAME).entry.files)
    for path in (cached, other):  # damaged: set aside and fetched again, the same bytes
        path.write_bytes(path.read_bytes()[:-1] + b"!")
    _load()
    assert cached.read_bytes() == data["/authors.pth.tar"] and list(cached.parent.glob(cached.name + ".corrupt-*"))
    server.replace("/authors.pth.tar", _authors_file(_state(seed=1)))
    cached.unlink()
    other.unlink()
    with pytest.raises(_trust.TrustError) as err:
        _load()
    message = str(err.value)
    assert "\n" not in message and "unpinned" in message and "trusted on first use" in message
    assert f"python -m models manifest pin {NAME}" in message and f"cache clear {NAME}" in message
    assert not cached.exists()  # the new bytes were not kept under the trusted name
    # Forgetting the trust (cache clear) is the user's explicit way to accept new files.
    server.replace("/timm.safetensors", _timm_file(_state(seed=1)))
    assert cli("cache", "clear", NAME).returncode == 0
    assert _equal(_load(), _state(seed=1))


def test_sources_that_disagree_are_refused_and_nothing_is_recorded(server, tmp_path, monkeypatch):
    server.add("/a.pth", _authors_file(_state()))
    server.add("/b.safetensors", _timm_file(_state(seed=2)))
    manifest = write_manifest(tmp_path / "m.json", {NAME: [_unpinned(server.url("/a.pth"), "torch"),
                                                           _unpinned(server.url("/b.safetensors"), "safetensors")]})
    monkeypatch.setenv("GHOSTNET_HUB_MANIFEST", manifest)
    with pytest.raises(_trust.SourcesDisagree) as err:
        _load()
    message = str(err.value)
    assert "\n" not in message and "differ at conv_stem.weight" in message and "nothing was recorded" in message
    assert not [p for p in default_cache_dir().iterdir() if not p.name.endswith(".lock")]


def test_require_pinned_refuses_unpinned_weights_before_any_download(sources, monkeypatch):
    server, state, _, _ = sources
    with pytest.raises(_trust.UnpinnedWeightsError, match="unpinned"):
        models.ghostnetv2_1x(pretrained=True, require_pinned=True)
    monkeypatch.setenv("GHOSTNET_HUB_REQUIRE_PINNED", "1")
    with pytest.raises(_trust.UnpinnedWeightsError, match="GHOSTNET_HUB_REQUIRE_PINNED=1"):
        models.ghostnetv2_1x(weights="DEFAULT")
    result = cli("predict", "--model", NAME)
    assert result.returncode != 0 and "unpinned" in result.stderr and "Traceback" not in result.stderr
    assert not server.hits
    assert _equal(_load(require_pinned=False), state)  # the keyword overrides the environment
    with pytest.raises(TypeError, match="require_pinned must be True or False"):
        models.ghostnetv2_1x(pretrained=True, require_pinned="yes")


@pytest.mark.parametrize("second", ["missing", "unsafe"])
def test_one_usable_source_is_trusted_alone_with_a_warning(server, tmp_path, monkeypatch, caplog, second):
    import datetime

    server.add("/a.pth", _authors_file(_state()))
    if second == "unsafe":  # a pickled object beside the tensors: refused unread, as any such file
        buffer = io.BytesIO()
        torch.save({"state_dict": _state(), "saved": datetime.date(2022, 11, 23)}, buffer)
        server.add("/b.pth", buffer.getvalue())
    manifest = write_manifest(tmp_path / "m.json", {NAME: [_unpinned(server.url("/a.pth"), "torch"),
                                                           _unpinned(server.url("/b.pth"), "torch")]})
    monkeypatch.setenv("GHOSTNET_HUB_MANIFEST", manifest)
    with caplog.at_level(logging.WARNING):
        assert _equal(_load(), _state())
    assert "only 1 of its unpinned sources could be reached and read" in caplog.text
    assert ("refused to load" in caplog.text) == (second == "unsafe")
    first, second = models.get_weights(NAME).entry.files
    assert _trust.read_record(first) is not None and _trust.read_record(second) is None


def test_offline_uses_the_trusted_copy_and_says_what_is_missing(sources, monkeypatch):
    monkeypatch.setenv("GHOSTNET_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="no trusted copy of its unpinned weights"):
        _load()
    monkeypatch.delenv("GHOSTNET_HUB_OFFLINE")
    _load()
    monkeypatch.setenv("GHOSTNET_HUB_OFFLINE", "1")
    assert _equal(_load(), sources[1])


def test_verify_cache_list_info_and_list_say_pinned_or_trusted_on_first_use(sources):
    _, _, data, manifest = sources
    assert "not used here yet" in cli("info", NAME).stdout
    assert cli("prefetch", NAME, "--quiet").returncode == 0
    verify = cli("verify")
    assert verify.returncode == 0 and f"{NAME} file 0: ok" in verify.stdout
    assert verify.stdout.count("(unpinned: trusted on first use") == 2
    listing = cli("cache", "list")
    assert listing.stdout.count("trusted on first use (unpinned)") == 2 and listing.stdout.count("trust record") == 2
    info = cli("info", NAME).stdout
    assert info.count("unpinned, in cache") == 2 and "trusted on first use 20" in info
    assert re.search(rf"^{NAME} +yes \(unpinned\) +75.19", cli("list").stdout, re.M)
    file = models.get_weights(NAME).entry.files[1]
    (default_cache_dir() / file.cache_name).write_bytes(data["/timm.safetensors"] + b"x")
    damaged = cli("verify")
    assert damaged.returncode == 1 and f"{NAME} file 1: corrupt" in damaged.stdout
    assert cli("cache", "prune", "--days", "0").returncode == 0 and _trust.read_record(file) is not None
    assert cli("cache", "clear", NAME).returncode == 0 and _trust.read_record(file) is None  # the trust is forgotten


def test_manifest_pin_records_sha256_and_size_and_the_model_loads_pinned(sources):
    server, state, data, manifest = sources
    result = cli("manifest", "pin", NAME, "--quiet")
    assert result.returncode == 0, result.stderr
    entries = json.loads(pathlib.Path(manifest).read_text())["models"][NAME]["files"]
    for entry, body in zip(entries, data.values(), strict=True):
        assert "unpinned" not in entry
        assert (entry["checksums"], entry["size"]) == ({"sha256": checksums(body)["sha256"]}, len(body))
    weights = models.get_weights(NAME)
    assert weights.pinned and all(f.cache_name.startswith(f"{NAME}-") and "unpinned" not in f.cache_name
                                  for f in weights.entry.files)
    assert _equal(_load(), state)
    assert not list(default_cache_dir().glob("*.trusted"))  # pinned: checked against the manifest
    verify = cli("verify")
    assert verify.returncode == 0 and "unpinned" not in verify.stdout
    assert re.search(rf"^{NAME} +yes +75.19", cli("list").stdout, re.M)


def test_manifest_pin_refuses_sources_that_disagree(server, tmp_path):
    server.add("/a.pth", _authors_file(_state()))
    server.add("/b.safetensors", _timm_file(_state(seed=3)))
    manifest = write_manifest(tmp_path / "m.json", {NAME: [_unpinned(server.url("/a.pth"), "torch"),
                                                           _unpinned(server.url("/b.safetensors"), "safetensors")]})
    before = pathlib.Path(manifest).read_text()
    result = cli("manifest", "pin", "--manifest", manifest, "--quiet")
    assert result.returncode == 1 and f"REFUSED {NAME}: its files disagree" in result.stderr
    assert "differ at conv_stem.weight" in result.stderr and pathlib.Path(manifest).read_text() == before


@pytest.mark.slow  # GhostNetV3 built and loaded five times
def test_ghostnetv3_from_the_authors_training_checkpoint_and_timms_copy(server, tmp_path, monkeypatch):
    from reference import random_state_dict

    state = random_state_dict(models.ghostnetv3_1x(), seed=11)
    server.add("/v3.pth.tar", _authors_file(state))
    server.add("/v3.safetensors", safetensors_bytes(
        {k.replace(".bn.", ".bn1.") if "_rpr_" in k else k: v for k, v in state.items()}))
    manifest = write_manifest(tmp_path / "m.json", {"ghostnetv3_1x": [
        _unpinned(server.url("/v3.pth.tar"), "torch"), _unpinned(server.url("/v3.safetensors"), "safetensors")]})
    monkeypatch.setenv("GHOSTNET_HUB_MANIFEST", manifest)
    model = models.ghostnetv3_1x(weights="DEFAULT", progress=False)
    assert not model.training and not model.pretrained_weights.pinned
    assert _equal(model.state_dict(), state)
    from models.description import describe

    assert "(unpinned: trusted on first use)" in describe(model).weights
    # docs/weights.md's two steps to the EMA weights, from the authors' file in the cache.
    cached = default_cache_dir() / models.get_weights("ghostnetv3_1x").entry.files[0].cache_name
    assert str(cached) in cli("info", "ghostnetv3_1x").stdout
    torch.save(models.weights.read_state_dict(cached)["state_dict_ema"], tmp_path / "ema.pth")
    ema = models.ghostnetv3_1x(checkpoint=tmp_path / "ema.pth")
    assert all(not v.any() for v in ema.state_dict().values())  # (the served file's EMA weights are zeros)
