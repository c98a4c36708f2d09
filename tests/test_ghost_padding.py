"""ghostnet.pad_ghost_halves: the fp32 ONNX export's layout for ONNX Runtime's blocked kernels."""
import collections
import copy

import pytest
import torch

from models.ghostnet import GhostModule, GhostNet, pad_ghost_halves
from models.tools import export

from reference import MODELS, build

GHOSTNETS = [name for name, row in MODELS.items() if row.cls is GhostNet]


def _fused(name):
    torch.manual_seed(0)
    model = build(name).eval()
    model.fuse()
    return model


@pytest.mark.parametrize("name", GHOSTNETS)
def test_padding_changes_the_layout_not_the_outputs(name):
    model = _fused(name).double()  # float64: any difference is the padding's, not rounding's
    padded = pad_ghost_halves(copy.deepcopy(model))
    real = [g.out_chs for g in model.modules() if isinstance(g, GhostModule)]
    ghosts = [g for g in padded.modules() if isinstance(g, GhostModule)]
    assert ghosts and all(g.primary_conv[0].out_channels % 16 == 0 for g in ghosts)
    assert any(g.out_chs > r for g, r in zip(ghosts, real, strict=True))  # something was padded
    zero_channels = {}

    def count_zero_channels(module, inputs, output):
        zero_channels[module] = int((output.abs().sum((0, 2, 3)) == 0).sum())

    for ghost in ghosts:
        ghost.register_forward_hook(count_zero_channels)
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        expected, got = model(x), padded(x)
    assert (got - expected).abs().max() <= 1e-12 * expected.abs().max()
    for ghost, real_chs in zip(ghosts, real, strict=True):  # the padding is exactly zero all the way through
        assert zero_channels[ghost] >= ghost.out_chs - real_chs


def test_padding_needs_a_fused_classifier():
    with pytest.raises(ValueError, match="fused"):
        pad_ghost_halves(build("ghostnet_1x").eval())
    features = build("ghostnet_1x", features_only=True).eval()
    features.fuse()
    with pytest.raises(ValueError, match="features_only"):
        pad_ghost_halves(features)


def _runtime_ops(path, tmp_path):
    """Operator counts of the graph ONNX Runtime actually runs (after its layout transforms)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.slow
def test_onnx_runtime_keeps_the_padded_ghost_concatenations_in_its_blocked_layout(tmp_path):
    model = _fused("ghostnet_1x")
    plain = tmp_path / "plain.onnx"
    export._to_onnx(copy.deepcopy(model), torch.randn(2, 3, 224, 224), plain)
    padded = tmp_path / "padded.onnx"
    report = export.export(model, "onnx", padded)  # the export pads (fp32 ONNX) and checks it against eager
    assert report.max_error <= export.TOLERANCE
    before, after = _runtime_ops(plain, tmp_path), _runtime_ops(padded, tmp_path)
    reorders = [sum(ops[k] for k in ops if k.startswith("Reorder")) for ops in (before, after)]
    print(f"ONNX Runtime layout reorders: {reorders[0]} unpadded, {reorders[1]} padded")
    if before["ReorderOutput"] == 0:
        pytest.skip("this CPU's ONNX Runtime has no blocked (NCHWc) layout: nothing for the padding to do")
    assert before["Concat"] == after["Concat"] == 32
    # 78 -> 15 with AVX-512's 16-channel blocks, 45 -> 15 with AVX2's 8-channel blocks; the 15 left
    # sit at the SE means and the head, whatever the block size.
    assert reorders[1] * 3 <= reorders[0]
