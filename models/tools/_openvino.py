"""OpenVINO, one runtime among the backends: its IR written from the ONNX export (``export
--format openvino``), NNCF INT8, and the model compiled for the CPU and run like the eager model
(``backends.load_file("M.xml")``). The precision the file records is the one it runs in: chosen,
never left to OpenVINO's default (bf16 on AMX CPUs)."""
from __future__ import annotations

import functools
import math
import pathlib
import threading
import warnings
from collections import OrderedDict

import numpy as np  # (OpenVINO's own requirement)
import torch

from ..description import DESCRIPTION_KEY, ModelDescription
from ._runner import Runner, described, quiet_native_output, require

# The inference precision an OpenVINO file records (rt_info ``runtime_options``), by its description's.
_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32", "int8-float-depthwise": "f32"}


def write(onnx_file: pathlib.Path, path: pathlib.Path, described: ModelDescription,
          batches: list[torch.Tensor]) -> None:
    """An OpenVINO IR (``path`` and its ``.bin``) with a dynamic batch, converted from the ONNX
    export ``onnx_file`` (unpadded; removed once converted); NNCF-quantized for an int8
    description. The description and the inference precision ride in the IR's ``rt_info``
    (``runtime_options`` is what OpenVINO applies when it compiles). From ONNX, from a traced
    module and from ``torch.export`` the compiled models ran alike (within 2-6 % of CPU time, 1
    thread, batch 1); ``torch.export``'s left 10 ScatterNDUpdate and 20 Reshape nodes of batch
    arithmetic in tinynet_e's compiled graph, and tracing is deprecated in PyTorch, so ONNX, the
    graph ONNX Runtime runs too."""
    ov = require("openvino", "to export to OpenVINO")
    with quiet_native_output():
        graph = ov.convert_model(onnx_file)
    onnx_file.unlink()
    if described.precision.startswith("int8"):
        graph = _nncf_int8(graph, batches, described.precision == "int8-float-depthwise")
    graph.set_rt_info(described.to_json(), DESCRIPTION_KEY)
    graph.set_rt_info(_PRECISION[described.precision], ["runtime_options", "INFERENCE_PRECISION_HINT"])
    # fp32 weights stay fp32 (OpenVINO's default, fp16 weights, is ~1e-3 off); a bf16 file's are
    # rounded further when it runs, so fp16 halves its size for nothing.
    ov.save_model(graph, str(path), compress_to_fp16=described.precision == "bf16")


def _nncf_int8(graph, batches: list[torch.Tensor], float_depthwise: bool):
    """NNCF post-training quantization (its defaults: symmetric int8, per-channel weights), one
    calibration image per item as NNCF expects; depthwise convolutions (OpenVINO's
    ``GroupConvolution``) left in float with ``float_depthwise``."""
    nncf = require("nncf", "for OpenVINO INT8")
    import logging

    items = [image[None].numpy() for batch in batches for image in batch]
    ignored = nncf.IgnoredScope(types=["GroupConvolution"]) if float_depthwise else None
    nncf.set_log_level(logging.ERROR)  # (it logs every layer it leaves out)
    with quiet_native_output():
        return nncf.quantize(graph, nncf.Dataset(items), subset_size=len(items), ignored_scope=ignored)


# OpenVINO's CPU settings for one caller at a time: one stream of ``threads`` threads, as ONNX
# Runtime gets, latency first. Threads are not pinned to cores (OpenVINO pins them by default on
# Linux): on a machine shared with other processes a pinned tinynet_e took 9.3 ms a call instead
# of 3.4 ms (median, 1 thread), waiting for its core while another was free.
_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False}


class _Compiled:
    """An OpenVINO model compiled once per input shape (the last ``KEEP`` kept): with static
    shapes OpenVINO skips shape inference and memory planning on every call (tinynet_e, batch 1:
    2.6 instead of 3.2 ms of CPU a call). Inputs up to ``COPY_BYTES`` are copied into a tensor
    bound to the request once (40 us a call, against 70 us for handing over a new one); larger
    ones are shared with OpenVINO without a copy."""

    KEEP = 4
    COPY_BYTES = 1 << 22

    def __init__(self, ov, core, graph, path: pathlib.Path, config: dict, precision: str):
        self._ov, self._core, self._graph, self._path, self._config = ov, core, graph, path, config
        self._compiled: OrderedDict[tuple, tuple] = OrderedDict()
        self._lock = threading.Lock()  # one infer request per shape: one caller at a time
        shape = graph.input(0).get_partial_shape()
        self._item = tuple(d.get_length() if d.is_static else None for d in shape)[1:]
        self.inference_precision = precision  # what will run; read back from each compiled model

    def _compile(self, shape: tuple) -> tuple:
        graph = self._graph.clone()
        graph.reshape({graph.input(0): self._ov.PartialShape(list(shape))})
        compiled = self._core.compile_model(graph, "CPU", self._config)
        self.inference_precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        request = compiled.create_infer_request()
        buffer = None
        if 4 * math.prod(shape) <= self.COPY_BYTES:
            buffer = np.empty(shape, np.float32)
            request.set_input_tensor(self._ov.Tensor(buffer, shared_memory=True))
        return compiled, request, buffer

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        shape = tuple(images.shape)
        if len(shape) != 1 + len(self._item) or any(d is not None and d != n for d, n in zip(self._item, shape[1:],
                                                                                              strict=True)):
            item = ", ".join("?" if d is None else str(d) for d in self._item)
            raise ValueError(f"{self._path} takes images of shape (N, {item}), not {shape}")
        with self._lock:
            entry = self._compiled.pop(shape, None) or self._compile(shape)
            self._compiled[shape] = entry
            if len(self._compiled) > self.KEEP:
                self._compiled.popitem(last=False)
            _, request, buffer = entry
            if buffer is not None:
                # numpy's copy, not torch's: a torch op wakes torch's OpenMP threads, which then
                # spin beside OpenVINO's (tinynet_e, 2 threads: 9.6 instead of 3.6 ms of CPU a call)
                np.copyto(buffer, images.numpy())
            else:
                request.set_input_tensor(self._ov.Tensor(images.numpy(), shared_memory=True))
            request.infer()
            return torch.from_numpy(request.get_output_tensor(0).data.copy())


@functools.cache
def core():
    """The one OpenVINO Core of this process, never released. OpenVINO's CPU plugin gives the
    thread that loads it a signal stack of its own, and its Core puts back the stack it found
    when it goes: two Cores released first-in first-out leave the thread a freed signal stack, and
    the next signal (Ctrl-C, a child process's SIGCHLD) kills the process with SIGSEGV
    (tests/test_openvino.py). One Core that stays is also the cheaper one: the plugin loads once."""
    return require("openvino", "for the openvino backend").Core()


def load(path: pathlib.Path, threads: int | None) -> Runner:
    ov = require("openvino", "for the openvino backend")
    weights = path.with_suffix(".bin")
    if not weights.is_file():
        raise ValueError(f"{path}: its weights {weights.name} are missing (an OpenVINO model is the .xml and the "
                         f".bin beside it)")
    try:
        graph = core().read_model(str(path), str(weights))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not an OpenVINO model that OpenVINO can read: {first}") from None
    text = graph.get_rt_info(DESCRIPTION_KEY).astype(str) if graph.has_rt_info(DESCRIPTION_KEY) else None
    key = ["runtime_options", "INFERENCE_PRECISION_HINT"]
    # Chosen, never left to OpenVINO: its default on AMX CPUs is bf16, which a file exported
    # elsewhere did not ask for.
    precision = graph.get_rt_info(key).astype(str) if graph.has_rt_info(key) else "f32"
    runs = precision
    if precision == "bf16" and "BF16" not in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        warnings.warn(f"{path.name} asks for bfloat16, which this CPU has no instructions for (AVX-512 BF16 or "
                      "AMX): OpenVINO runs it in f32", stacklevel=3)
        runs = "f32"
    config = {**_CONFIG, "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
              "INFERENCE_PRECISION_HINT": precision}
    return Runner("openvino", path, _Compiled(ov, core(), graph, path, config, runs),
                  description=described(text, path))
