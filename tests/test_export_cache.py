"""The export cache (``$TORCH_HOME/hub/exports``, what ``--backend onnxruntime|executorch``
exports on the fly) is managed like the weights cache: a damaged export is detected by the
SHA-256 recorded when it was written and made again (before: reused into a traceback on every
later run), and ``cache list|prune|clear`` cover it."""
import pathlib

import pytest
import torch

from models.tools import backends

from helpers import cli
from reference import build

pytestmark = pytest.mark.slow  # ONNX exports, 10 s and more each


def _exports(torch_home):
    return sorted(p for p in (pathlib.Path(torch_home) / "hub" / "exports").glob("tinynet_e-*.onnx"))


def test_a_damaged_cached_export_is_made_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = build("tinynet_e", num_classes=3).eval()
    images = torch.randn(2, 3, 106, 106)
    said = []
    first = backends.wrap(model, "onnxruntime", progress=said.append)
    expected = first(images)
    (path,) = _exports(tmp_path / "torch")
    assert path.with_name(path.name + ".sha256").read_text().strip() and len(said) == 1
    backends.wrap(model, "onnxruntime", progress=said.append)
    assert len(said) == 1  # reused, not exported again

    listed = cli("cache", "list", env={"TORCH_HOME": str(tmp_path / "torch")})
    assert listed.returncode == 0 and "tinynet_e  export" in listed.stdout and "verified" in listed.stdout

    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated, as by a full disk
    listed = cli("cache", "list", env={"TORCH_HOME": str(tmp_path / "torch")})
    assert listed.returncode == 1 and "corrupt: sha256" in listed.stdout

    again = backends.wrap(model, "onnxruntime", progress=said.append)
    assert any("is damaged" in s and "exporting it again" in s for s in said), said
    torch.testing.assert_close(again(images), expected)
    assert cli("cache", "list", env={"TORCH_HOME": str(tmp_path / "torch")}).returncode == 0

    good = {f: f.read_bytes() for f in (path, path.with_name(path.name + ".sha256"))}  # (for `clear`, below)
    path.write_bytes(b"garbage")
    pruned = cli("cache", "prune", env={"TORCH_HOME": str(tmp_path / "torch")})
    assert pruned.returncode == 0 and f"removed export {path.name}" in pruned.stdout
    assert not path.exists() and not path.with_name(path.name + ".sha256").exists()

    for f, data in good.items():  # the good export back, as a new export would write it (seconds saved)
        f.write_bytes(data)
    cleared = cli("cache", "clear", "tinynet_e", env={"TORCH_HOME": str(tmp_path / "torch")})
    assert cleared.returncode == 0 and f"removed {path.name}" in cleared.stdout
    assert _exports(tmp_path / "torch") == []
