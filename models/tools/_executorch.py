"""ExecuTorch, one export format: the fused model made ready for XNNPACK, PT2E INT8 with the
XNNPACK quantizer, and the ``.pte`` program lowered to the XNNPACK delegate (``export --out M.pte``)."""
from __future__ import annotations

import pathlib

import torch
import torch.nn.functional as F
from torch import nn

from ..description import DESCRIPTION_KEY, ModelDescription
from ..fuse import pooled_as_convolutions
from ..layers import SqueezeExcite
from ._runner import quiet_native_output, require


class _ClampedHardsigmoid(nn.Module):
    """hardsigmoid as XNNPACK takes it into its delegate: a clamp, an add and a multiply. (It
    leaves hardsigmoid itself out; every squeeze-excitation of GhostNet cut the program in two.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(x + 3.0, 0.0, 6.0) * (1 / 6)


def prepare(net: nn.Module) -> nn.Module:
    """The fused ``net`` (a copy) as XNNPACK takes it whole into its delegate, computing the same, in place."""
    for module in net.modules():
        if isinstance(module, SqueezeExcite):
            module.mean_by_rows = True  # XNNPACK's one-sum mean is ~1e-5 off on large maps
            if isinstance(module.gate, nn.Hardsigmoid):
                module.gate = _ClampedHardsigmoid()
    return pooled_as_convolutions(net)  # (XNNPACK leaves out the flatten before a matrix product)


def _is_depthwise(node) -> bool:
    """A grouped convolution node of an exported graph (all of ours are depthwise)."""
    index = {torch.ops.aten.conv2d.default: 6, torch.ops.aten.convolution.default: 8}.get(
        node.target if node.op == "call_function" else None)
    return index is not None and len(node.args) > index and node.args[index] > 1


def _quantize(net: nn.Module, example: torch.Tensor, dynamic: dict | None, float_depthwise: bool,
              batches: list[torch.Tensor]) -> nn.Module:
    """PT2E post-training quantization with the XNNPACK quantizer (per-channel symmetric)."""
    require("executorch", "for INT8 with the XNNPACK quantizer")
    with quiet_native_output():  # torchao logs notes on its own internals when imported
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph = torch.export.export(net, (example,), dynamic_shapes=dynamic).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    if float_depthwise:
        quantizer.set_filter_function(lambda node: not _is_depthwise(node))
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    return convert_pt2e(prepared)


def write(net: nn.Module, path: pathlib.Path, size: tuple[int, int], int8: bool, float_depthwise: bool,
          batches: list[torch.Tensor], max_batch: int, described: ModelDescription) -> None:
    """``net`` (``prepare``d) lowered to XNNPACK, taking batches of 1 to ``max_batch``, written to ``path``."""
    require("executorch", "to export to ExecuTorch")
    with quiet_native_output():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

    # Traced at the largest batch: the memory plan is sized from the example.
    example = torch.randn(max_batch, 3, *size)
    dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=max_batch)}} if max_batch > 1 else None
    if int8:
        net = _quantize(net, example, dynamic, float_depthwise, batches)
    with quiet_native_output():
        program = torch.export.export(net, (example,), dynamic_shapes=dynamic)
        # The description rides in the program as a constant method returning its JSON as bytes
        # (ExecuTorch programs have no string metadata; a method is read without running the model).
        text = torch.frombuffer(bytearray(described.to_json().encode()), dtype=torch.uint8)
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                              constant_methods={DESCRIPTION_KEY: text}).to_executorch()
    path.write_bytes(lowered.buffer)
