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
