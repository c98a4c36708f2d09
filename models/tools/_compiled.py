"""PyTorch's own fast paths for users who stay in it (``--backend compile``): the fused
channels_last model compiled, in bfloat16 autocast, or quantized to INT8 by PT2E with the x86
Inductor quantizer."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._runner import quiet_native_output, require


class _Within(nn.Module):
    """``module`` run inside ``context()`` (bfloat16 autocast, a compiler setting), float32
    logits out; the attributes of ``source``, the model it was made from (class names,
    preprocessing, ``num_classes``), read through."""

    def __init__(self, module: nn.Module, context: Callable[[], contextlib.AbstractContextManager],
                 precision_text: str, source: nn.Module):
        super().__init__()
        self.module, self.context, self.precision_text = module, context, precision_text
        self.__dict__["_source"] = source  # (not a submodule: its parameters are not this module's)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.context():
            return self.module(images).float()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_source"], name)


def compiled(model: nn.Module, precision: str, int8: bool, calibration: str | os.PathLike | None) -> nn.Module:
    """PyTorch's own ways for users who stay in it: the fused channels_last model compiled, in
    bfloat16 autocast (oneDNN uses AVX-512 BF16 / AMX where the CPU has them), or quantized to
    int8 by PT2E with ``X86InductorQuantizer`` and compiled with freezing (oneDNN int8 kernels)."""
    if not getattr(model, "fused", False):
        model.fuse(channels_last=True)
    if int8:
        return _x86_int8(model, calibration)
    compiled = torch.compile(model)
    if precision == "bf16":
        return _Within(compiled, lambda: torch.autocast("cpu", torch.bfloat16), "fp32, bfloat16 autocast", model)
    return compiled


def _x86_int8(model: nn.Module, calibration: str | os.PathLike | None) -> nn.Module:
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        raise ValueError(f"--backend compile --int8 uses PyTorch's X86InductorQuantizer, for x86 CPUs; this one is "
                         f"{platform.machine()} (use --backend executorch --int8)")
    require("torchao", "for INT8 with the X86 Inductor quantizer")
    from ._samples import calibration_batches, default_transforms  # (it imports the tools above this module)

    with quiet_native_output():  # torchao logs notes on its own internals when imported
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    batches = calibration_batches(default_transforms(model), calibration)
    with quiet_native_output():
        graph = torch.export.export(model, (batches[0],), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph.module(), quantizer)
        with torch.no_grad():
            for batch in batches:
                prepared(batch)
        quantized = convert_pt2e(prepared)
    # Freezing folds the quantized weights into oneDNN's packed int8 form (without it they are
    # dequantized on every call). It inserts onednn.qconv_prepack, which has no fake-tensor kernel
    # in PyTorch 2.14 (qlinear_prepack has one), so tracing the graph with the weights as inputs
    # fails ("UnsupportedOperatorException: onednn.qconv_prepack"); with prepare_freezing Dynamo
    # keeps them as constants and the prepacking is folded first (pytorch/pytorch#126093).
    return _Within(torch.compile(quantized, options={"freezing": True}),
                   lambda: torch._dynamo.config.patch(prepare_freezing=True), "INT8 (PT2E, X86InductorQuantizer)",
                   model)
