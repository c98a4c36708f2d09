"""Runtimes as backends: the same model run eagerly, through ``torch.compile``, in ONNX Runtime,
in ExecuTorch (XNNPACK) or in OpenVINO, from a file made by ``python -m models export`` or from
an export made on the fly and cached. Every backend is called like the eager model: a float batch
(N, 3, H, W) in, logits out; so preprocessing and output stay the same whatever runs it.

ONNX Runtime, ExecuTorch and OpenVINO are optional (the ``export`` extra has ONNX and ONNX Runtime,
the ``deploy`` extra ExecuTorch and OpenVINO too) and imported only when a backend needs them; a
missing one is a ``MissingRuntime`` error of one line naming the extra to install.

The floors below: ``_runner`` (the Runner, ``require``), ``_runtimes`` (``load_file``), ``export``
(which makes the files); this module, above them, makes a model run in a backend, and is what
the commands use. Its public names include the lower floors' (``backends.load_file``, ...).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import api
from ..cache import export_target, exports_dir, file_lock, record_sha256, verify_file
from ..description import describe
from . import export as exporter
from ._args import build_model
from ._compiled import compiled as compile_model
from ._runner import (
    BACKENDS,
    FORMAT_OF,
    SUFFIXES,
    MissingRuntime,
    Runner,
    device_of,
    lend,
    quiet_native_output,
    require,
    say,
)
from ._runtimes import load_file

__all__ = ["BACKENDS", "FORMAT_OF", "SUFFIXES", "MissingRuntime", "Runner", "add_arguments", "device_of", "lend",
           "load_file", "model_from_args", "options_from_args", "quiet_native_output", "require", "say", "wrap"]

# -- on-the-fly exports, cached -------------------------------------------------------------

def export_cache_dir() -> pathlib.Path:
    """``$TORCH_HOME/hub/exports``: exports made on the fly, named by what they were made from."""
    return exports_dir()


@functools.cache
def _source_digest() -> str:
    """The library's code: an export made by another version of the models is not reused."""
    digest = hashlib.sha256()
    library = pathlib.Path(__file__).resolve().parents[1]
    # The library and every tool: what an export writes may change with any module it imports (a
    # list of those by hand would miss the next one, and a new version only costs a new export).
    for path in sorted(library.glob("*.py")) + sorted(library.glob("tools/*.py")):
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
        compiled = compile_model(model, precision, int8, calibration)
        compiled.pretrained_weights = weights
        return compiled
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


def model_from_args(args: argparse.Namespace, **options: Any):
    """What predict and evaluate run: the exported ``--model-file`` (its description says what
    it is; a file without one needs ``--model``), else the model of ``build_model`` run by
    ``--backend``. ``args.model`` is set to the model's name."""
    wrap_options = options_from_args(args)
    file = wrap_options.pop("model_file")
    backend = wrap_options.pop("backend")
    tell = (lambda s: None) if getattr(args, "quiet", False) else say
    if file is None:
        return wrap(build_model(args, **options), backend, name=None, progress=tell, **wrap_options)
    refuse_export_options(file, **wrap_options)
    runner = load_file(file, backend)
    described = runner.description
    if described is None:
        if args.model is None:
            raise ValueError(f"{file} carries no model description (it was not written by this package's export): "
                             "pass --model NAME to say what it is (and --checkpoint FILE or --num-classes N if it "
                             "is not the published model)")
        return lend(runner, build_model(args, **options))
    described.check(str(file), model=args.model, num_classes=args.num_classes)
    if args.checkpoint:  # redundant with a described file; it must at least be the same model
        checkpoint = api.from_checkpoint(args.checkpoint, model=args.model, checkpoint_sha256=args.checkpoint_sha256,
                                         num_classes=args.num_classes, progress=False)
        theirs = checkpoint.pretrained_weights
        if (theirs.architecture, theirs.classes) != (described.architecture, described.classes):
            raise ValueError(f"--checkpoint {args.checkpoint} ({theirs.summary()}) is not the model of {file} "
                             f"({described.summary()}): drop --checkpoint (the file names its own model)")
    args.model = described.architecture
    return runner


def refuse_export_options(file: str | os.PathLike, *, int8: bool = False, float_depthwise: bool = False,
                          calibration: str | os.PathLike | None = None, precision: str = "fp32") -> None:
    if int8 or float_depthwise or calibration or precision != "fp32":  # the file is what it is: these would be ignored
        raise ValueError(f"--int8, --float-depthwise, --calibration and --precision make an export; {file} is already "
                         "one (export it with those options, or drop the file to export on the fly)")


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
