"""Runtimes as backends: the same model run eagerly, through ``torch.compile``, in ONNX Runtime,
in ExecuTorch (XNNPACK) or in OpenVINO, from a file made by ``python -m models export`` or from
an export made on the fly and cached. Every backend is called like the eager model: a float batch
(N, 3, H, W) in, logits out; so preprocessing and output stay the same whatever runs it.

ONNX Runtime, ExecuTorch and OpenVINO are optional (the ``export`` extra has ONNX and ONNX Runtime,
the ``deploy`` extra ExecuTorch and OpenVINO too) and imported only when a backend needs them; a
missing one is a ``MissingRuntime`` error of one line naming the extra to install.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import io
import json
import os
import pathlib
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .. import _commands
from ..cache import export_target, exports_dir, file_lock, record_sha256, verify_file
from ..description import DESCRIPTION_KEY, ModelDescription, describe

__all__ = ["BACKENDS", "MissingRuntime", "Runner", "add_arguments", "device_of", "lend",
           "load_file", "options_from_args", "require", "wrap"]

BACKENDS = ("eager", "compile", "onnxruntime", "executorch", "openvino")
# The pip package behind each optional module, and the smallest extra of this package that has it
# (requirements-export.txt, requirements-deploy.txt).
_PIP_NAMES = {"onnxruntime": "onnxruntime", "onnx": "onnx", "onnxscript": "onnxscript", "executorch": "executorch",
              "torchao": "executorch", "openvino": "openvino", "nncf": "nncf"}
_EXTRAS = {"onnxruntime": "export", "onnx": "export", "onnxscript": "export", "executorch": "deploy",
           "torchao": "deploy", "openvino": "deploy", "nncf": "deploy"}
SUFFIXES = {".onnx": "onnxruntime", ".pte": "executorch", ".pt2": "eager", ".xml": "openvino"}
# The export format behind each runtime backend.
FORMAT_OF = {"onnxruntime": "onnx", "executorch": "executorch", "openvino": "openvino"}


class MissingRuntime(ImportError):
    """An optional runtime (ONNX Runtime, ExecuTorch) is not installed; the message is one
    line that names what to install."""


def require(module: str, purpose: str = "") -> Any:
    """``import module``, or a ``MissingRuntime`` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        what = f" (needed {purpose})" if purpose else ""
        raise MissingRuntime(
            f"{top} is not installed{what}: {_commands.install(_EXTRAS.get(top, 'deploy'))}, "
            f"or just pip install {_PIP_NAMES.get(top, top)}"
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


def described(text: str | bytes | None, path: pathlib.Path) -> ModelDescription | None:
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
        from . import _openvino  # (it imports this module)

        runner = _openvino.load(path, threads)
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
        from ._compiled import compiled as compile_model  # (it imports this module)

        compiled = compile_model(model, precision, int8, calibration)
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
