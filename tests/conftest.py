import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path_factory, monkeypatch):
    """No test reads the user's settings or writes into the user's real cache."""
    for name in ("GHOSTNET_HUB_OFFLINE", "GHOSTNET_HUB_MIRROR", "GHOSTNET_HUB_MANIFEST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))


@pytest.fixture
def server():
    """A fresh loopback weights server (tests/weights_server.py) for one test."""
    from weights_server import WeightsServer

    with WeightsServer() as s:
        yield s


@pytest.fixture(scope="session")
def _weights_server(tmp_path_factory):
    """One loopback server for the session, serving a checkpoint-shaped file (random values)
    for each of the six models, and a manifest pointing at it."""
    from reference import PRETRAINED, checkpoint_bytes
    from weights_server import WeightsServer, checksums, write_manifest

    files = {name: checkpoint_bytes(name, "safetensors" if name == "tinynet_a" else "torch") for name in PRETRAINED}
    with WeightsServer() as server:
        entries = {
            name: [{"urls": [server.add(f"/{name}", data)],
                    "format": "safetensors" if name == "tinynet_a" else "torch",
                    "checksums": {"sha256": checksums(data)["sha256"]}, "size": len(data)}]
            for name, data in files.items()
        }
        manifest = write_manifest(tmp_path_factory.mktemp("manifest") / "weights_manifest.json", entries)
        yield server, manifest, files


@pytest.fixture
def published(_weights_server, monkeypatch):
    """The loopback server and its manifest in use ($GHOSTNET_HUB_MANIFEST); a fresh cache."""
    server, manifest, files = _weights_server
    monkeypatch.setenv("GHOSTNET_HUB_MANIFEST", manifest)
    return server, files
