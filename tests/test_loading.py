"""From manifest to loaded model: verified files only, never code from a file."""
import argparse
import io
import os
import pathlib

import numpy as np
import pytest
import torch

from models import download, weights
from models.download import DownloadError, OfflineError
from models.weights import CheckpointError, UnsafeCheckpointError

from faults import fault
from reference import build, checkpoint_bytes
from weights_server import checksums, weight_entry, write_manifest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("GHOSTNET_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("GHOSTNET_HUB_MIRROR", raising=False)
    return tmp_path / "torch-home" / "hub" / "checkpoints"


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_pretrained_state_dict_loads_strictly(server, cache, tmp_path, fmt):
    data = checkpoint_bytes("tinynet_e", fmt)
    manifest = write_manifest(tmp_path / "m.json", {
        "tinynet_e": [weight_entry([server.add("/e", data)], data, fmt=fmt, algos=("git_blob_sha1", "sha256"))]})
    state = weights.pretrained_state_dict("tinynet_e", manifest=manifest, progress=False)
    model = build("tinynet_e")
    model.load_state_dict(state, strict=True)
    expected = torch.load(io.BytesIO(checkpoint_bytes("tinynet_e")), weights_only=True)
    assert _equal(model.state_dict(), expected)
    assert all(t.device.type == "cpu" for t in state.values())
    assert (cache / f"tinynet_e-{checksums(data)['git_blob_sha1'][:16]}.pth"
            if fmt == "torch" else cache / f"tinynet_e-{checksums(data)['git_blob_sha1'][:16]}.safetensors").exists()


def test_next_file_is_used_when_every_url_of_the_first_fails(server, cache, tmp_path):
    data = checkpoint_bytes("tinynet_e", "safetensors")
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_e": [
        weight_entry([server.url("/gone1"), server.url("/gone2")], b"whatever"),
        weight_entry([server.add("/e.safetensors", data)], data, fmt="safetensors"),
    ]})
    state = weights.pretrained_state_dict("tinynet_e", manifest=manifest, progress=False)
    build("tinynet_e").load_state_dict(state, strict=True)
    assert [h.path for h in server.hits] == ["/gone1", "/gone2", "/e.safetensors"]


def test_every_failure_is_listed_when_no_file_works(server, cache, tmp_path):
    data = checkpoint_bytes("tinynet_e")
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_e": [
        weight_entry([server.url("/gone")], data),
        weight_entry([server.add("/bad", data, ("corrupt",))], data),
    ]})
    with pytest.raises(DownloadError) as err:
        weights.pretrained_state_dict("tinynet_e", manifest=manifest, progress=False)
    message = str(err.value)
    assert "tinynet_e: every source failed" in message
    assert server.url("/gone") + ": HTTP 404" in message and server.url("/bad") + ": content does not match" in message
    assert not list(cache.glob("tinynet_e-*.pth"))


def test_cached_later_file_is_used_before_downloading_an_earlier_one(server, cache, tmp_path):
    data = checkpoint_bytes("tinynet_e")
    second = weight_entry([server.add("/second", data)], data)
    first_only = write_manifest(tmp_path / "a.json", {"tinynet_e": [second]})
    weights.pretrained_state_dict("tinynet_e", manifest=first_only, progress=False)
    first = weight_entry([server.url("/first")], b"other bytes")
    both = write_manifest(tmp_path / "b.json", {"tinynet_e": [first, second]})
    weights.pretrained_state_dict("tinynet_e", manifest=both, progress=False)
    assert [h.path for h in server.hits] == ["/second"]


def test_offline_model_error_names_the_prefetch_command(server, cache, tmp_path, monkeypatch):
    data = checkpoint_bytes("tinynet_e")
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_e": [weight_entry([server.add("/e", data)], data)]})
    monkeypatch.setenv("GHOSTNET_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError) as err:
        weights.pretrained_state_dict("tinynet_e", manifest=manifest, progress=False)
    assert "python -m models prefetch tinynet_e" in str(err.value) and server.url("/e") in str(err.value)
    assert server.hits == []
    monkeypatch.delenv("GHOSTNET_HUB_OFFLINE")
    weights.pretrained_state_dict("tinynet_e", manifest=manifest, progress=False)
    monkeypatch.setenv("GHOSTNET_HUB_OFFLINE", "1")
    build("tinynet_e").load_state_dict(weights.pretrained_state_dict("tinynet_e", manifest=manifest, progress=False))
    assert len(server.hits) == 1


def test_manifest_from_environment(server, cache, tmp_path, monkeypatch):
    data = checkpoint_bytes("tinynet_e")
    monkeypatch.setenv("GHOSTNET_HUB_MANIFEST", write_manifest(tmp_path / "m.json", {
        "tinynet_e": [weight_entry([server.add("/e", data)], data)]}))
    weights.pretrained_state_dict("tinynet_e", progress=False)
    assert [h.path for h in server.hits] == ["/e"]


# 10: a file that would run code --------------------------------------------------------------
class _Payload:
    """Unpickling this calls Path.touch(marker): the stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _malicious_checkpoint(marker) -> bytes:
    state = {k: v for k, v in build("tinynet_e").state_dict().items()}
    state["bn1.weight"] = _Payload(marker)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@fault("A checkpoint is crafted to run code when unpickled, and the manifest vouches for its bytes",
       "refused before any of it runs (`torch.load(weights_only=True)`), whatever the checksums say")
def test_malicious_pickle_is_refused_and_never_runs(server, cache, tmp_path):
    marker = tmp_path / "code-ran"
    data = _malicious_checkpoint(marker)
    # The manifest vouches for these exact bytes: checksums alone would let them through.
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_e": [weight_entry([server.add("/evil", data)], data)]})
    with pytest.raises(UnsafeCheckpointError, match="refused to load .*nothing from it was executed"):
        weights.pretrained_state_dict("tinynet_e", manifest=manifest, progress=False)
    assert not marker.exists()
    local = tmp_path / "evil.pth"
    local.write_bytes(data)
    with pytest.raises(UnsafeCheckpointError):
        weights.user_state_dict(local)
    assert not marker.exists()
    # The file really is an exploit: a plain unpickling runs it.
    torch.load(local, weights_only=False)
    assert marker.exists()


# verify, then load the same bytes ---------------------------------------------------------------
def _swap_after_fetch(monkeypatch, replace):
    """Between verification (fetch_first) and loading, ``replace(path)`` changes the cached file."""
    original = download.fetch_first

    def fetch_then_change(*args, **kwargs):
        path, file = original(*args, **kwargs)
        replace(path)
        return path, file

    monkeypatch.setattr(download, "fetch_first", fetch_then_change)


@fault("The cached file is replaced between its verification and its loading",
       "what is loaded is what was verified: a changed file (other inode, size, mtime or ctime) is hashed again "
       "as read and refused if it no longer matches")
def test_file_changed_between_verification_and_load_is_not_loaded(server, cache, tmp_path, monkeypatch):
    data, other = checkpoint_bytes("tinynet_e"), checkpoint_bytes("tinynet_e", seed=1)
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_e": [weight_entry([server.add("/e", data)], data)]})

    def swap(path):
        path.with_name("swap").write_bytes(other)
        os.replace(path.with_name("swap"), path)

    _swap_after_fetch(monkeypatch, swap)
    with pytest.raises(CheckpointError, match="changed on disk after it was verified .*sha256: expected"):
        weights.pretrained_state_dict("tinynet_e", manifest=manifest, progress=False)


def test_file_changed_in_place_after_verification_is_not_loaded(server, cache, tmp_path, monkeypatch):
    data, other = checkpoint_bytes("tinynet_e"), checkpoint_bytes("tinynet_e", seed=1)
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_e": [weight_entry([server.add("/e", data)], data)]})

    def overwrite(path):
        stamp = path.stat().st_mtime_ns
        with open(path, "r+b") as f:
            f.write(other[:len(data)])
        os.utime(path, ns=(stamp, stamp + 10**9))  # a write a moment later

    _swap_after_fetch(monkeypatch, overwrite)
    with pytest.raises(CheckpointError, match="changed on disk after it was verified"):
        weights.pretrained_state_dict("tinynet_e", manifest=manifest, progress=False)


def test_same_bytes_under_a_new_inode_still_load(server, cache, tmp_path, monkeypatch):
    data = checkpoint_bytes("tinynet_e")
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_e": [weight_entry([server.add("/e", data)], data)]})

    def copy(path):
        path.with_name("copy").write_bytes(path.read_bytes())
        os.replace(path.with_name("copy"), path)

    _swap_after_fetch(monkeypatch, copy)
    build("tinynet_e").load_state_dict(weights.pretrained_state_dict("tinynet_e", manifest=manifest, progress=False))


# weights=: a user's own checkpoint -------------------------------------------------------------
def _training_checkpoint(tmp_path, name="ckpt.pth"):
    state = build("tinynet_e", num_classes=10).state_dict()
    path = tmp_path / name
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}, "best_acc1": 0.5}, path)
    return path, state


def test_user_checkpoint_is_unwrapped(tmp_path):
    path, state = _training_checkpoint(tmp_path)
    loaded = weights.user_state_dict(path)
    assert _equal(loaded, state)
    build("tinynet_e", num_classes=10).load_state_dict(loaded, strict=True)


def test_user_checkpoint_with_wrong_sha256_is_not_loaded(tmp_path):
    path, _ = _training_checkpoint(tmp_path)
    actual = checksums(path.read_bytes())["sha256"]
    with pytest.raises(CheckpointError, match=f"sha256 expected {'a' * 64}, got {actual}; it was not loaded"):
        weights.user_state_dict(path, sha256="a" * 64)
    assert weights.user_state_dict(path, sha256=actual)


def test_user_url_checkpoint(server, cache, tmp_path):
    path, state = _training_checkpoint(tmp_path)
    data = path.read_bytes()
    url = server.add("/ft.pth", data)
    assert _equal(weights.user_state_dict(url, sha256=checksums(data)["sha256"], progress=False), state)
    with pytest.raises(DownloadError, match="sha256: expected"):
        weights.user_state_dict(url, sha256="b" * 64, progress=False)


def test_user_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        weights.user_state_dict(path)
    path.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="neither a torch checkpoint nor a safetensors file"):
        weights.user_state_dict(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.user_state_dict(tmp_path / "nope.pth")


def test_truncated_torch_file_is_a_clear_error(tmp_path):
    path, _ = _training_checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        weights.user_state_dict(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_tensors_are_placed_on_the_requested_gpu(tmp_path, fmt):
    path = tmp_path / f"w.{fmt}"
    path.write_bytes(checkpoint_bytes("tinynet_e", fmt))
    state = weights.user_state_dict(path, map_location="cuda:0")
    assert all(t.device == torch.device("cuda:0") for t in state.values())


# training checkpoints from common scripts ------------------------------------------------------------
def _args(**extra):
    return argparse.Namespace(model="tinynet_e", lr=0.1, epochs=3, batch_size=128, opt="sgd", momentum=0.9,
                              data_path="/data/imagenet", amp=True, resume="", milestones=[30, 60], **extra)


def _timm_checkpoint(path, state):
    """As timm's train.py (CheckpointSaver) saves one."""
    model = build("tinynet_e", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"epoch": 7, "arch": "tinynet_e", "state_dict": state, "optimizer": optimizer.state_dict(),
                "version": 2, "args": _args(), "metric": np.float64(71.25), "state_dict_ema": state}, path)


def _torchvision_checkpoint(path, state):
    """As torchvision's references/classification/train.py saves one."""
    model = build("tinynet_e", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30)
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "epoch": np.int64(7), "args": _args(world_size=8),
                "best_acc1": np.float32(71.5)}, path)


@pytest.mark.parametrize("script", ["timm", "torchvision"])
@fault("A training checkpoint from timm's or torchvision's scripts (`argparse.Namespace` args, numpy scalars)",
       "loaded: exactly these harmless types are allowed through `safe_globals`; the weights are unwrapped")
def test_training_checkpoints_of_common_scripts_load(tmp_path, script):
    state = build("tinynet_e", num_classes=10).state_dict()
    path = tmp_path / f"{script}.pth"
    (_timm_checkpoint if script == "timm" else _torchvision_checkpoint)(path, state)
    loaded = weights.user_state_dict(path)
    assert _equal(loaded, state)
    build("tinynet_e", num_classes=10).load_state_dict(loaded, strict=True)


@pytest.mark.parametrize("what", ["model", "object"])
@fault("A checkpoint holds a whole pickled `nn.Module`, or another Python object",
       "refused, in one plain paragraph: what was found, why, and how to convert it (save its `state_dict`)")
def test_other_pickled_objects_are_refused_in_one_plain_paragraph(tmp_path, what):
    path = tmp_path / "ckpt.pth"
    state = build("tinynet_e").state_dict()
    torch.save(build("tinynet_e") if what == "model" else {"state_dict": state, "root": pathlib.PurePosixPath("/x")},
               path)
    with pytest.raises(UnsafeCheckpointError) as err:
        weights.user_state_dict(path)
    message = str(err.value)
    assert "\x1b" not in message and "\n" not in message and len(message) < 800, message
    assert "nothing from it was executed" in message and "weights_only=False" in message
    if what == "model":
        assert "a whole pickled model (models.tinynet.TinyNet)" in message and "model.state_dict()" in message
    else:
        assert "pathlib.PurePosixPath" in message and 'ckpt["state_dict"]' in message
