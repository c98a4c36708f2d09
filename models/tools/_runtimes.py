"""Exported files -> runners: a file written by ``export`` loaded into ONNX Runtime, ExecuTorch,
OpenVINO or torch (``.pt2``), with the model description it carries. One floor above
``_runner``; ``export`` (which checks each file it writes by loading it) and ``backends`` build
on it."""
from __future__ import annotations

import os
import pathlib

import torch

from ..description import DESCRIPTION_KEY
from . import _openvino
from ._runner import BACKENDS, SUFFIXES, Runner, described, quiet_native_output, require


def _onnxruntime(path: pathlib.Path, threads: int | None) -> Runner:
    ort = require("onnxruntime", "for the onnxruntime backend")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    text = session.get_modelmeta().custom_metadata_map.get(DESCRIPTION_KEY)

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: images.numpy()})[0])

    return Runner("onnxruntime", path, run, description=described(text, path))


def _executorch(path: pathlib.Path, threads: int | None) -> Runner:
    require("executorch", "for the executorch backend")
    with quiet_native_output():
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        _unsafe_reset_threadpool(threads or torch.get_num_threads())
        program = Runtime.get().load_program(pathlib.Path(path))
        method = program.load_method("forward")
        text = None
        if DESCRIPTION_KEY in program.method_names:  # a constant method: the JSON as uint8
            text = program.load_method(DESCRIPTION_KEY).execute(())[0].numpy().tobytes()
    max_batch = method.metadata.input_tensor_meta(0).sizes()[0]

    def run(images: torch.Tensor) -> torch.Tensor:
        return method.execute((images,))[0]

    run.program = program  # keeps the program (and its buffers) alive as long as the method
    return Runner("executorch", path, run, max_batch=max_batch, description=described(text, path))


def _pt2(path: pathlib.Path, backend: str) -> Runner:
    extra = {DESCRIPTION_KEY: ""}
    module = torch.export.load(str(path), extra_files=extra).module()  # (it refuses .eval(): a Runner holds it)
    if backend == "compile":
        module = torch.compile(module)
    return Runner(backend, path, module, description=described(extra[DESCRIPTION_KEY] or None, path))


def load_file(path: str | os.PathLike, backend: str | None = None, *, threads: int | None = None) -> Runner:
    """A file written by ``export`` (``.onnx``, ``.pte``, ``.pt2`` or OpenVINO's ``.xml``) in
    ``backend``, which is inferred from the suffix when not given. A ``.pt2`` runs eagerly or
    compiled; an OpenVINO file in the inference precision it records (f32 if none). The runner
    carries the file's model description (``runner.description``: model, class names,
    preprocessing, precision), or None for a file exported elsewhere."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"exported model {path} does not exist")
    backend = backend or SUFFIXES.get(path.suffix)
    expected = {".onnx": ("onnxruntime",), ".pte": ("executorch",), ".pt2": ("eager", "compile"),
                ".xml": ("openvino",)}.get(path.suffix)
    if backend not in BACKENDS or expected is None or backend not in expected:
        raise ValueError(f"{path}: backend {backend!r} cannot run it; {path.suffix or 'no suffix'} files run in "
                         f"{' or '.join(expected) if expected else 'nothing known (use .onnx, .pte, .pt2 or .xml)'}")
    if backend == "onnxruntime":
        runner = _onnxruntime(path, threads)
    elif backend == "executorch":
        runner = _executorch(path, threads)
    elif backend == "openvino":
        runner = _openvino.load(path, threads)
    else:
        runner = _pt2(path, backend)
    return runner
