"""Runtimes as backends: the same model run eagerly, through ``torch.compile``, in ONNX Runtime,
in ExecuTorch (XNNPACK) or in OpenVINO, from a file made by ``python -m models export`` or from
an export made on the fly and cached. Every backend is called like the eager model: a float batch
(N, 3, H, W) in, logits out; so preprocessing and output stay the same whatever runs it.

ONNX Runtime, ExecuTorch and OpenVINO are optional (the ``deploy`` extra) and imported only when a
backend needs them; a missing one is a ``MissingRuntime`` error of one line naming the pip
command.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import io
import json
import math
import os
import pathlib
import sys
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..cache import export_target, exports_dir, file_lock, record_sha256, verify_file
from ..description import DESCRIPTION_KEY, ModelDescription, describe

__all__ = ["BACKENDS", "DEPLOY_INSTALL", "MissingRuntime", "Runner", "add_arguments", "device_of", "lend",
           "load_file", "options_from_args", "require", "wrap"]

BACKENDS = ("eager", "compile", "onnxruntime", "executorch", "openvino")
# What installs the optional runtimes: the ``deploy`` extra of this package.
DEPLOY_INSTALL = 'pip install ".[deploy]"'
# The pip package behind each optional module.
_PIP_NAMES = {"onnxruntime": "onnxruntime", "onnx": "onnx", "onnxscript": "onnxscript", "executorch": "executorch",
              "torchao": "executorch", "openvino": "openvino", "nncf": "nncf"}
SUFFIXES = {".onnx": "onnxruntime", ".pte": "executorch", ".pt2": "eager", ".xml": "openvino"}
# The export format behind each runtime backend.
FORMAT_OF = {"onnxruntime": "onnx", "executorch": "executorch", "openvino": "openvino"}


class MissingRuntime(ImportError):
    """An optional runtime (ONNX Runtime, ExecuTorch) is not installed; the message is one
    line that names what to install."""


def require(module: str, purpose: str = "") -> Any:
    """``import module``, or a ``MissingRuntime`` naming the deploy extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        what = f" (needed {purpose})" if purpose else ""
        raise MissingRuntime(
            f"{top} is not installed{what}: {DEPLOY_INSTALL} from this repository, "
            f"or pip install {_PIP_NAMES.get(top, top)}"
        ) from None


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Silence what the runtimes and exporters print (ExecuTorch logs its CPU probing on file
    descriptor 2, the ONNX exporter prints progress) and their warnings; what they printed is
    shown if the block fails."""
    sink = tempfile.TemporaryFile(mode="w+b")
    python_output = io.StringIO()
    saved = []
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
    with contextlib.suppress(OSError):  # without real descriptors (some notebooks) only Python's is caught
        for fd in (1, 2):
            saved.append((fd, os.dup(fd)))
            os.dup2(sink.fileno(), fd)
    try:
        with contextlib.redirect_stdout(python_output), contextlib.redirect_stderr(python_output), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the runtimes' notes on their own internals
            yield
    except BaseException:
        _restore(saved)
        sink.seek(0)
        sys.stderr.write(sink.read().decode(errors="replace") + python_output.getvalue())
        raise
    finally:
        _restore(saved)
        sink.close()


def _restore(saved: list) -> None:
    while saved:
        fd, copy = saved.pop()
        os.dup2(copy, fd)
        os.close(copy)


class Runner:
    """An exported model in its runtime, called like the eager model: float images
    (N, 3, H, W) in, logits (N, classes) out, on the CPU. Batches larger than the program
    takes (``max_batch``, ExecuTorch) are run in pieces."""

    device = torch.device("cpu")
    training = False

    def __init__(self, backend: str, path: pathlib.Path, run: Callable[[torch.Tensor], torch.Tensor],
                 max_batch: int | None = None, description: ModelDescription | None = None):
        self.backend, self.path, self._run, self.max_batch = backend, pathlib.Path(path), run, max_batch
        # What the file says it is (None for a file exported elsewhere); like a published
        # model's weights, it gives the preprocessing and class names.
        self.description = description
        self.pretrained_weights: Any = description
        self.num_classes = description.num_classes if description is not None else None

    @property
    def inference_precision(self) -> str:
        """What the runtime computes the float parts in (OpenVINO: ``f32`` or ``bf16`` as compiled)."""
        return getattr(self._run, "inference_precision", "f32")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.detach().to("cpu", torch.float32).contiguous()
        step = self.max_batch or len(images)
        parts = [self._run(images[i:i + step]) for i in range(0, len(images), step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def eval(self) -> Runner:
        return self

    def __repr__(self) -> str:
        return f"Runner({self.backend}, {str(self.path)!r})"


def device_of(model: Any) -> torch.device:
    """Where a model's inputs go: its parameters' device, or the CPU for a runtime."""
    if isinstance(model, Runner):
        return model.device
    first = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return first.device if first is not None else torch.device("cpu")


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

    return Runner("onnxruntime", path, run, description=_described(text, path))


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
    return Runner("executorch", path, run, max_batch=max_batch, description=_described(text, path))


# OpenVINO's CPU settings for one caller at a time: one stream of ``threads`` threads, as ONNX
# Runtime gets, latency first. Threads are not pinned to cores (OpenVINO pins them by default on
# Linux): on a machine shared with other processes a pinned tinynet_e took 9.3 ms a call instead
# of 3.4 ms (median, 1 thread), waiting for its core while another was free.
_OPENVINO_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False}


class _OpenVINOModel:
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
            buffer = torch.empty(shape)
            request.set_input_tensor(self._ov.Tensor(buffer.numpy(), shared_memory=True))
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
                buffer.copy_(images)
            else:
                request.set_input_tensor(self._ov.Tensor(images.numpy(), shared_memory=True))
            request.infer()
            return torch.from_numpy(request.get_output_tensor(0).data.copy())


def _openvino(path: pathlib.Path, threads: int | None) -> Runner:
    ov = require("openvino", "for the openvino backend")
    weights = path.with_suffix(".bin")
    if not weights.is_file():
        raise ValueError(f"{path}: its weights {weights.name} are missing (an OpenVINO model is the .xml and the "
                         f".bin beside it)")
    core = ov.Core()
    try:
        graph = core.read_model(str(path), str(weights))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not an OpenVINO model that OpenVINO can read: {first}") from None
    text = graph.get_rt_info(DESCRIPTION_KEY).astype(str) if graph.has_rt_info(DESCRIPTION_KEY) else None
    key = ["runtime_options", "INFERENCE_PRECISION_HINT"]
    # Chosen, never left to OpenVINO: its default on AMX CPUs is bf16, which a file exported
    # elsewhere did not ask for.
    precision = graph.get_rt_info(key).astype(str) if graph.has_rt_info(key) else "f32"
    runs = precision
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        warnings.warn(f"{path.name} asks for bfloat16, which this CPU has no instructions for (AVX-512 BF16 or "
                      "AMX): OpenVINO runs it in f32", stacklevel=3)
        runs = "f32"
    config = {**_OPENVINO_CONFIG, "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
              "INFERENCE_PRECISION_HINT": precision}
    return Runner("openvino", path, _OpenVINOModel(ov, core, graph, path, config, runs),
                  description=_described(text, path))


def _pt2(path: pathlib.Path, backend: str) -> Runner:
    extra = {DESCRIPTION_KEY: ""}
    module = torch.export.load(str(path), extra_files=extra).module()  # (it refuses .eval(): a Runner holds it)
    if backend == "compile":
        module = torch.compile(module)
    return Runner(backend, path, module, description=_described(extra[DESCRIPTION_KEY] or None, path))


def _described(text: str | bytes | None, path: pathlib.Path) -> ModelDescription | None:
    return None if text is None else ModelDescription.from_json(text, str(path))


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
        runner = _openvino(path, threads)
    else:
        runner = _pt2(path, backend)
    return runner


# -- on-the-fly exports, cached -------------------------------------------------------------

def export_cache_dir() -> pathlib.Path:
    """``$TORCH_HOME/hub/exports``: exports made on the fly, named by what they were made from."""
    return exports_dir()


@functools.cache
def _source_digest() -> str:
    """The library's code: an export made by another version of the models is not reused."""
    digest = hashlib.sha256()
    library = pathlib.Path(__file__).resolve().parents[1]
    for path in sorted(library.glob("*.py")) + [pathlib.Path(__file__).with_name("export.py")]:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@functools.cache
def _versions(fmt: str) -> dict:
    import importlib.metadata as metadata

    names = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "executorch": ("executorch", "torchao"), "pt2": (),
             "openvino": ("openvino", "nncf")}[fmt]
    found = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return {"torch": torch.__version__, **found}


def cache_key(model: nn.Module, fmt: str, options: dict) -> str:
    """What an export depends on: the weights, the code, the options and the tool versions."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + str(tuple(tensor.shape)).encode())
        # (as float32, which is what export computes in: numpy has no bfloat16)
        digest.update(tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else None)
                      .contiguous().numpy().tobytes())
    digest.update(json.dumps({"class": type(model).__name__, "format": fmt, "options": options,
                              "versions": _versions(fmt), "code": _source_digest()}, sort_keys=True,
                             default=str).encode())
    return digest.hexdigest()


def wrap(model: nn.Module, backend: str = "eager", *, file: str | os.PathLike | None = None, int8: bool = False,
         float_depthwise: bool = False, calibration: str | os.PathLike | None = None, precision: str = "fp32",
         threads: int | None = None, name: str | None = None, progress: Callable[[str], None] | None = None) -> Any:
    """``model`` (a built ImageClassifier, with ``pretrained_weights`` if it has them) run by
    ``backend``. With ``file``, that exported file is run instead (the model only lends it
    its preprocessing and labels). Otherwise ``onnxruntime``/``executorch``/``openvino`` export
    the model on the fly into the export cache (``export_cache_dir()``) and reuse that file while
    the weights, code, options and tool versions are the same; ``compile`` fuses the model in
    place (channels_last) and compiles it. ``precision="bf16"``: an OpenVINO export that records
    bfloat16, or ``compile`` under ``torch.autocast("cpu", torch.bfloat16)``; ``int8`` with
    ``compile``: PT2E with PyTorch's ``X86InductorQuantizer`` (x86 CPUs), then compiled."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; precisions: fp32, bf16")
    weights = getattr(model, "pretrained_weights", None)
    if file is not None:
        refuse_export_options(file, int8=int8, float_depthwise=float_depthwise, calibration=calibration,
                              precision=precision)
        return lend(load_file(file, backend, threads=threads), model)
    if int8 and backend == "eager":
        raise ValueError("--int8 needs an exported model: use --backend onnxruntime, executorch or openvino (or "
                         "compile, x86), not eager")
    if precision == "bf16" and (backend not in ("openvino", "compile") or int8):
        raise ValueError(f"--precision bf16 runs in openvino or compile (autocast), without --int8; not in {backend}")
    if backend == "eager":
        return model
    if backend == "compile":
        if float_depthwise:
            raise ValueError("--float-depthwise needs an exported model (onnxruntime, executorch, openvino); "
                             "compile's INT8 quantizes every convolution")
        compiled = _compiled(model, precision, int8, calibration)
        compiled.pretrained_weights = weights
        return compiled
    from . import export as exporter

    fmt = FORMAT_OF[backend]
    require({"onnx": "onnxruntime"}.get(fmt, fmt), f"for the {backend} backend")
    options = {"int8": int8, "float_depthwise": float_depthwise,
               "calibration": exporter.calibration_id(calibration) if int8 else None,
               "description": describe(model).to_dict()}  # the class names and preprocessing the file carries
    if fmt == "openvino":
        options["precision"] = precision
    key = cache_key(model, fmt, options)
    label = name or getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__.lower()
    tag = "int8-" if int8 else "bf16-" if precision == "bf16" else ""
    path = export_cache_dir() / f"{label}-{tag}{key[:20]}{exporter.FORMATS[fmt]}"
    files = [path, path.with_suffix(".bin")] if fmt == "openvino" else [path]  # OpenVINO: the weights beside
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path):
        # Checked against the SHA-256 recorded when it was written: a damaged file (truncated,
        # overwritten) is made again rather than handed to the runtime.
        found = [verify_file(f, export_target(f)) for f in files]
        damaged = [problem if f == path else f"{f.name}: {problem}" for f, problems in zip(files, found, strict=True)
                   for problem in problems or []]
        if damaged:
            (progress or say)(f"cached export {path.name} is damaged ({'; '.join(damaged)}): exporting it again")
            for f in files:
                f.unlink(missing_ok=True)
        if damaged or None in found:
            what = f"{fmt}{' int8' if int8 else ' bf16' if precision == 'bf16' else ''}"
            (progress or say)(f"exporting {label} to {what} (once; cached in {path.parent})")
            exporter.export(model, fmt, path, int8=int8, float_depthwise=float_depthwise, calibration=calibration,
                            precision=precision)
            for f in files:
                record_sha256(f)
    return lend(load_file(path, backend, threads=threads), model)


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


def _compiled(model: nn.Module, precision: str, int8: bool, calibration: str | os.PathLike | None) -> nn.Module:
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


def refuse_export_options(file: str | os.PathLike, *, int8: bool = False, float_depthwise: bool = False,
                          calibration: str | os.PathLike | None = None, precision: str = "fp32") -> None:
    if int8 or float_depthwise or calibration or precision != "fp32":  # the file is what it is: these would be ignored
        raise ValueError(f"--int8, --float-depthwise, --calibration and --precision make an export; {file} is already "
                         "one (export it with those options, or drop the file to export on the fly)")


def lend(runner: Runner, model: nn.Module) -> Runner:
    """A runner for a file that has no description takes the eager model's (class names,
    preprocessing), which the caller says is the model of the file."""
    if runner.description is None:
        runner.pretrained_weights = getattr(model, "pretrained_weights", None)
        runner.num_classes = getattr(model, "num_classes", None)
        runner.pretrained_cfg = getattr(model, "pretrained_cfg", None)
    return runner


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the command-line options predict and evaluate share --------------------------------------

def add_arguments(parser) -> None:
    group = parser.add_argument_group("backend (how the model runs)")
    group.add_argument("--backend", choices=BACKENDS, default=None,
                       help="eager (default), compile (torch.compile), onnxruntime, executorch (XNNPACK) or openvino; "
                            "without --model-file the model is exported on the fly and cached")
    group.add_argument("--model-file", metavar="FILE",
                       help="a file written by `export` (.onnx, .pte, .pt2, .xml); the backend follows its suffix")
    group.add_argument("--int8", action="store_true",
                       help="an INT8 export (onnxruntime, executorch, openvino), or compile's x86 PT2E INT8")
    group.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                       help="bf16: an OpenVINO export in bfloat16, or compile under bfloat16 autocast; fast only on "
                            "CPUs with AVX-512 BF16 or AMX (default: fp32)")
    group.add_argument("--float-depthwise", action="store_true",
                       help="with --int8: keep depthwise convolutions in float")
    group.add_argument("--calibration", metavar="DIR",
                       help="with --int8: calibration images (default: the bundled sample and generated images)")


def options_from_args(args) -> dict:
    """The keywords of ``wrap`` from the options of ``add_arguments``; without ``--backend``,
    a ``--model-file`` picks the backend of its suffix."""
    backend = args.backend
    if backend is None:
        backend = SUFFIXES.get(pathlib.Path(args.model_file).suffix, "eager") if args.model_file else "eager"
    if (args.float_depthwise or args.calibration) and not args.int8:
        raise SystemExit("error: --float-depthwise and --calibration apply to --int8")
    return {"backend": backend, "model_file": args.model_file, "int8": args.int8,
            "float_depthwise": args.float_depthwise, "calibration": args.calibration,
            "precision": getattr(args, "precision", "fp32")}
