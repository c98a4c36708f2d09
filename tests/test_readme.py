"""The README states what the code does: its models table and its Python examples."""
import io
import pathlib
import re

import pytest
import torch

from models.manifest import load_manifest

from reference import PUBLISHED, measure

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()


def _table_rows():
    rows = {}
    for line in README.splitlines():
        match = re.match(r"\| `((?:ghostnet|tinynet)_\w+)` \| (.+) \|$", line)
        if match:
            rows[match[1]] = [cell.strip() for cell in match[2].split("|")]
    return rows


def test_table_lists_every_model_once():
    assert list(_table_rows()) == list(PUBLISHED)


@pytest.mark.parametrize("name", PUBLISHED)
def test_table_row_matches_the_code_and_the_manifest(name):
    size, params, macs, top1, top5, released = _table_rows()[name]
    manifest = load_manifest()
    if name in manifest.models:
        assert (float(top1), float(top5), released) == (manifest[name].top1, manifest[name].top5, "yes")
    else:
        assert (top1, top5, released) == ("–", "–", "no")
    measured = measure(name)
    assert int(size) == measured.input_size[0]
    assert int(params.replace(",", "")) == measured.params
    assert macs == f"{measured.macs / 1e6:.2f} M"


def test_python_example_runs():
    block = re.search(r"```python\n(import torch\nimport models\n.*?)```", README, re.S)[1]
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["backbone"].feature_info.channels() == [24, 32, 88, 240]
    assert [m.shape[1] for m in namespace["maps"]] == [24, 32, 88, 240]
    assert namespace["model"].num_classes == 37


def test_pretrained_weights_example_runs(server, tmp_path, monkeypatch):
    from reference import checkpoint_bytes
    from weights_server import weight_entry, write_manifest

    block = re.search(r"```python\n(from models import tinynet_a\n.*?)```", README, re.S)[1]
    data = checkpoint_bytes("tinynet_a")
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_a": [weight_entry(server.add("/a.pth", data), data)]})
    monkeypatch.setenv("GHOSTNET_HUB_MANIFEST", manifest)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert len(server.hits) == 1
    expected = torch.load(io.BytesIO(data), weights_only=True)
    assert torch.equal(namespace["model"].conv_stem.weight, expected["conv_stem.weight"])
    assert torch.equal(namespace["state"]["bn2.running_var"], expected["bn2.running_var"])


@pytest.mark.slow
def test_hub_examples_run(github_checkout, published, recwarn, tmp_path, monkeypatch):
    """Every python block that uses torch.hub, in order, against this checkout in the hub
    cache and the loopback weights server."""
    monkeypatch.chdir(tmp_path)  # the examples write files (an ONNX export)
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "OWNER/REPO" in b]
    assert len(blocks) == 5
    headline, *blocks = blocks
    assert 'device="cuda"' in headline
    if torch.cuda.is_available():
        exec(compile(headline, "README.md", "exec"), {})
    else:  # the one-liner asks for a GPU: without one, the error says so
        with pytest.raises(ValueError, match="'cuda' cannot be used: CUDA is not available"):
            exec(compile(headline, "README.md", "exec"), {})
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert len(namespace["categories"]) == 1000
    assert namespace["preprocess"](torch.zeros(3, 300, 300, dtype=torch.uint8)).shape == (3, 192, 192)
    assert namespace["model"].classifier.out_features == 10 and namespace["model"].training
    assert [m.shape[1] for m in namespace["maps"]] == [24, 40, 80, 160]
    assert len(namespace["fpn"](dict(enumerate(namespace["maps"])))) == 4
    assert namespace["fast"].fused
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(namespace["program"].module()(x), namespace["fast"](x))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "ghostnet.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    # (the served test weights are random and give logits ~1e5: compare to that scale)
    expected = namespace["fast"](x)
    assert (torch.from_numpy(onnx_out) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_argument_table_matches_the_help_source():
    """The README's argument table and the builders' help text come from one source."""
    from models.api import _ARGUMENT_DOCS

    section = README.split("Every entry point takes the same arguments:", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| `(\w+)=([^`]+)` \|", section, re.M)
    assert [name for name, _ in rows] == list(_ARGUMENT_DOCS)
    for name, default in rows:
        assert default == _ARGUMENT_DOCS[name][1], name
