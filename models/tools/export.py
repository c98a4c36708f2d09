"""``python -m models export``: the model as a file for a runtime, checked before it is written.

- ``onnx``: ONNX (opset 18, dynamic batch) for ONNX Runtime and other ONNX runtimes;
  ``--int8``: static QDQ quantization with onnxruntime's ``quantize_static`` (per-channel int8
  weights, uint8 activations with percentile-calibrated ranges).
- ``executorch``: a ``.pte`` lowered to the XNNPACK delegate, the format that runs on Android,
  iOS, Linux and macOS; ``--int8``: PT2E with ``XNNPACKQuantizer`` (per-channel symmetric).
- ``pt2``: a ``torch.export`` archive (``torch.export.load(path).module()``).
- ``openvino``: an OpenVINO IR (``M.xml`` + ``M.bin``) for Intel and AMD CPUs, converted by
  ``openvino.convert_model`` from the ONNX export; ``--precision bf16`` records bfloat16 as its
  inference precision (fast only on CPUs with AVX-512 BF16 or AMX; elsewhere OpenVINO runs it
  in f32); ``--int8``: NNCF post-training quantization (``nncf.quantize``).

The exported model is the fused one (BatchNorm folded); a GhostNet's fp32 ONNX export also has
its ghost halves padded to 16 channels for ONNX Runtime (``ghostnet.pad_ghost_halves``). Before the file is written, its
output is compared with the eager fp32 model on the bundled photo and generated images: an
fp32 export must be within 1e-4 of the largest logit, an INT8 one is reported (its error and
top-1 agreement). ``--float-depthwise`` keeps depthwise convolutions in float in INT8 exports,
as GhostNet's authors advise (iamhankai/ghostnet.pytorch issue 28).
"""
from __future__ import annotations

import copy
import io
import os
import pathlib
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import api
from .._files import WriteError, check_room, probe_writable
from ..description import DESCRIPTION_KEY, ModelDescription, describe
from ..ghostnet import GhostNet, pad_ghost_halves
from . import _executorch, _openvino, _runtimes
from ._args import add_command, build_model, int_at_least, model_source_arguments
from ._runner import quiet_native_output, require
from ._samples import calibration_batches, calibration_id, check_images, default_transforms
from ._workdir import work_folder

__all__ = ["FORMATS", "TOLERANCE", "ExportCheckError", "ExportReport", "calibration_id", "export"]

FORMATS = {"onnx": ".onnx", "executorch": ".pte", "pt2": ".pt2", "openvino": ".xml"}
TOLERANCE = 1e-4  # fp32 exports: max |export - eager| / max |eager logit|
OPSET = 18
_RUNTIMES = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "executorch": ("executorch",), "pt2": (),
             "openvino": ("onnx", "onnxscript", "openvino")}

class ExportCheckError(RuntimeError):
    """The exported model does not compute what the eager model computes; nothing was written."""


@dataclass
class ExportReport:
    path: pathlib.Path
    format: str
    int8: bool
    float_depthwise: bool
    size_bytes: int
    images: int  # check images
    max_error: float  # max |export - eager| / max |eager| over the check images
    top1_agreement: float  # fraction of check images with the same top-1 class
    seconds: float
    precision: str = "fp32"  # of the float parts: fp32, or bf16 (openvino)
    checked_in: str = ""  # openvino: the precision the runtime computed the check in (f32 where bf16 is not native)

    def summary(self) -> str:
        kind = ("int8" + (", depthwise in float" if self.float_depthwise else "")) if self.int8 else self.precision
        limit = f"report only for {kind.split(',')[0]}" if kind != "fp32" else f"limit {TOLERANCE:.0e}"
        size = self.size_bytes / 1e6
        note = ""
        if self.precision == "bf16" and self.checked_in != "bf16":
            note = (f"\nthis CPU has no native bfloat16 (AVX-512 BF16 or AMX): OpenVINO computed the check in "
                    f"{self.checked_in or 'f32'}, as it will run this file on any such CPU")
        return (f"wrote {self.path} ({self.format}, {kind}): {size:.2f} MB in {self.seconds:.0f} s\n"
                f"checked against eager fp32 on {self.images} images (the bundled photo + {self.images - 1} "
                f"generated): max |export - eager| = {self.max_error:.1e} of the largest logit ({limit}); "
                f"top-1 the same on {round(self.top1_agreement * self.images)}/{self.images}{note}")


def _inference_copy(model: nn.Module, format: str = "onnx", int8: bool = False) -> tuple[nn.Module, nn.Module]:
    """(eager fp32 reference, fused contiguous copy to export); ``model`` is left as it is."""
    if getattr(model, "features_only", False):
        raise ValueError("export takes a classifier; a features_only model returns a list of maps")
    reference = copy.deepcopy(model).to("cpu", torch.float32).eval()
    net = copy.deepcopy(reference)
    if getattr(net, "channels_last", False):
        net.to(memory_format=torch.contiguous_format)
        net.channels_last = False
    if not getattr(net, "fused", False):
        net.fuse()
    if format == "executorch":
        _executorch.prepare(net)
    if format == "onnx" and not int8 and isinstance(net, GhostNet):
        # ONNX Runtime keeps the ghost concatenations in its blocked layout only with halves a
        # multiple of 16 (see pad_ghost_halves); measured slower for INT8 (QLinear ops), so fp32 only.
        pad_ghost_halves(net)
    return reference, net


def _to_onnx(net: nn.Module, example: torch.Tensor, path: pathlib.Path) -> None:
    require("onnxscript", "by torch.onnx.export")
    require("onnx", "by torch.onnx.export")
    with quiet_native_output():
        torch.onnx.export(net, (example,), str(path), dynamo=True, opset_version=OPSET, external_data=False,
                          input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}})


def _describe_onnx(path: pathlib.Path, described: ModelDescription) -> None:
    """The description as the file's ``metadata_props`` (ONNX Runtime: ``get_modelmeta()``)."""
    import onnx

    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {DESCRIPTION_KEY: described.to_json()})
    onnx.save(graph, str(path))


def _onnx_int8(fp32: pathlib.Path, out: pathlib.Path, float_depthwise: bool, batches: list[torch.Tensor]) -> None:
    require("onnxruntime", "for INT8 with quantize_static")
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = fp32.with_name("prepared.onnx")
    with quiet_native_output():
        quant_pre_process(str(fp32), str(prepared))
    graph = onnx.load(str(prepared))
    for i, node in enumerate(graph.graph.node):  # every node needs a name to be excluded by
        node.name = node.name or f"{node.op_type}_{i}"
    onnx.save(graph, str(prepared))
    depthwise = [node.name for node in graph.graph.node if node.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in node.attribute)]
    input_name = graph.graph.input[0].name

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches)

        def get_next(self):
            batch = next(self.items, None)
            return None if batch is None else {input_name: batch.numpy()}

    def quantize(method) -> None:
        quantize_static(str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                        nodes_to_exclude=depthwise if float_depthwise else None)

    with quiet_native_output():
        # Activation ranges from the 99.999th percentile, not min/max: one outlier in calibration
        # no longer widens a range for every input (on the model of tests/test_export.py, top-1
        # agreement with fp32 rose from 0.86 to 0.93).
        try:
            quantize(CalibrationMethod.Percentile)
        except ValueError as exc:
            # A tensor whose calibration values (nearly) all agree has no histogram to take a
            # percentile of (numpy: "Too many bins for data range"); min/max is exact for it.
            if "bins" not in str(exc):
                raise
            quantize(CalibrationMethod.MinMax)


def _to_pt2(net: nn.Module, path: pathlib.Path, size: tuple[int, int], described: ModelDescription) -> None:
    example = torch.randn(2, 3, *size)
    dynamic = {"x": {0: torch.export.Dim("batch")}}
    # Into memory, then written by Python: torch's zip writer, writing a file, aborts the whole
    # interpreter when the disk fills (its destructor throws again: SIGABRT, not an exception).
    archive = io.BytesIO()
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=dynamic), archive,
                      extra_files={DESCRIPTION_KEY: described.to_json()})
    path.write_bytes(archive.getbuffer())


def _room_needed(net: nn.Module, format: str, int8: bool) -> int:
    """Bytes the export writes beside ``--out`` at least: its weights in float32 (an ONNX INT8
    export writes the float32 model first), a quarter of that for an ExecuTorch INT8 file."""
    weights = sum(t.numel() * 4 for t in net.state_dict().values() if t.is_floating_point())
    return weights // 4 if int8 and format == "executorch" else weights


def export(model: nn.Module, format: str, out: str | os.PathLike, *, int8: bool = False,
           float_depthwise: bool = False, calibration: str | os.PathLike | None = None, transforms=None,
           max_batch: int = 32, classes: Sequence[str] | None = None, precision: str = "fp32",
           progress: Callable[[str], None] = lambda s: None) -> ExportReport:
    """Export ``model`` (an ImageClassifier; it is copied, not changed) to ``out`` in
    ``format`` ("onnx", "executorch", "pt2", "openvino"), check it against the eager model,
    then write it. ``precision="bf16"`` (openvino) records bfloat16 as the file's inference
    precision; OpenVINO uses it where the CPU has native bfloat16 (AVX-512 BF16, AMX).

    ``int8`` quantizes after calibrating on the images of the folder ``calibration`` (by
    default the bundled photo and generated images: a quick try, not a calibration set).
    ``transforms`` preprocess the check and calibration images (default: the model's
    published preprocessing). ``max_batch`` bounds the batch of an ExecuTorch program. The file
    carries the model's description (``models.description``: model, class names,
    preprocessing, precision), read back by ``backends.load_file``; ``classes`` names the
    outputs if the model's own names are not right (e.g. after ``reset_classifier``).
    Raises ``ExportCheckError`` (and writes nothing) if an fp32 export is off by more than
    ``TOLERANCE`` of the largest logit.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; formats: {', '.join(FORMATS)}")
    if float_depthwise and not int8:
        raise ValueError("float_depthwise applies to int8 exports only")
    if int8 and format == "pt2":
        raise ValueError("INT8 exports are onnx, executorch or openvino files; a pt2 archive holds the fp32 model")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; precisions: fp32, bf16")
    if precision == "bf16" and (format != "openvino" or int8):
        raise ValueError("bf16 is an openvino precision for float models (not with int8)")
    if format == "openvino" and pathlib.Path(out).suffix != ".xml":
        raise ValueError(f"an OpenVINO model is M.xml with its weights in M.bin: give an --out ending in .xml, "
                         f"not {pathlib.Path(out).name}")
    if format == "openvino" and int8:
        require("nncf", "for OpenVINO INT8")
    for module in _RUNTIMES[format]:  # fail before the work, not after it
        require(module, f"to export to {format} and check it")
    start = time.perf_counter()
    out = pathlib.Path(out)
    described = describe(model, classes=classes,
                         precision=("int8-float-depthwise" if float_depthwise else "int8") if int8 else precision)
    reference, net = _inference_copy(model, format, int8)
    transforms = transforms or default_transforms(model)
    images = check_images(transforms)
    size = tuple(images.shape[-2:])
    batches = calibration_batches(transforms, calibration) if int8 else []
    backend = {"onnx": "onnxruntime", "executorch": "executorch", "pt2": "eager", "openvino": "openvino"}[format]
    nothing = "Nothing was written; free space there, or choose another --out"
    needed = _room_needed(net, format, int8)
    probe_writable(out.parent, "Nothing was written; choose another --out")  # before minutes of work, not after
    check_room(out, needed, nothing, at_least=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(out.parent, out.name, needed, exc, nothing, at_least=True) from None
    with work_folder(out.parent) as tmp:
        written = tmp / f"model{FORMATS[format]}"
        progress(f"exporting to {format}{' int8' if int8 else ''}")
        try:  # a full disk, a file size limit, a read-only folder: one error, for every format
            if format == "onnx":
                fp32 = tmp / "fp32.onnx" if int8 else written
                _to_onnx(net, torch.randn(2, 3, *size), fp32)
                if int8:
                    _onnx_int8(fp32, written, float_depthwise, batches)
                _describe_onnx(written, described)
            elif format == "executorch":
                _executorch.write(net, written, size, int8, float_depthwise, batches, max_batch, described)
            elif format == "openvino":
                _to_onnx(net, torch.randn(2, 3, *size), tmp / "fp32.onnx")
                _openvino.write(tmp / "fp32.onnx", written, described, batches)
            else:
                _to_pt2(net, written, size, described)
        except OSError as exc:
            raise WriteError(out.parent, out.name, needed, exc, nothing, at_least=True) from None
        progress("checking the export against the eager model")
        with warnings.catch_warnings():  # (a bf16 file on a CPU without bf16: the report says it)
            warnings.simplefilter("ignore")
            runner = _runtimes.load_file(written, backend, threads=torch.get_num_threads())
        if runner.description != described:
            raise ExportCheckError(f"the {format} file does not carry the model's description; {out} was not written")
        with torch.no_grad():
            expected = reference(images)
            got = runner(images)
        if got.shape != expected.shape or not torch.isfinite(got).all():
            raise ExportCheckError(f"the {format} export returns {tuple(got.shape)} values (finite: "
                                   f"{bool(torch.isfinite(got).all())}), the eager model {tuple(expected.shape)}")
        error = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
        agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
        checked_in = getattr(runner, "inference_precision", "")
        del runner
        if described.precision == "fp32" and error > TOLERANCE:
            raise ExportCheckError(f"the {format} export differs from the eager model by {error:.1e} of the largest "
                                   f"logit (limit {TOLERANCE:.0e}); {out} was not written")
        weights = written.with_suffix(".bin")
        if weights.exists():  # OpenVINO's weights first: whoever finds the new .xml finds its .bin
            os.replace(weights, out.with_suffix(".bin"))
        os.replace(written, out)
    size_bytes = out.stat().st_size + (out.with_suffix(".bin").stat().st_size if format == "openvino" else 0)
    return ExportReport(out, format, int8, float_depthwise, size_bytes, len(images), error, agreement,
                        time.perf_counter() - start, precision, checked_in)


def _run(args) -> int:
    out = pathlib.Path(args.out)
    fmt = args.format or {suffix: f for f, suffix in FORMATS.items()}.get(out.suffix)
    if fmt is None:
        raise SystemExit(f"error: give --format ({', '.join(FORMATS)}) or an --out ending in "
                         f"{', '.join(FORMATS.values())}")
    if (args.calibration or args.float_depthwise) and not args.int8:
        raise SystemExit("error: --calibration and --float-depthwise apply to --int8 exports")
    if args.precision != "fp32" and (fmt != "openvino" or args.int8):
        raise SystemExit(f"error: --precision {args.precision} applies to --format openvino without --int8")
    model = build_model(args, progress=not args.quiet)
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.quiet else (lambda s: None)
    try:
        report = export(model, fmt, out, int8=args.int8, float_depthwise=args.float_depthwise,
                        calibration=args.calibration, max_batch=args.max_batch, precision=args.precision,
                        progress=say)
    except ExportCheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def register(commands) -> None:
    sub = add_command(commands, "export", _run,
                      "export a model to ONNX, ExecuTorch (.pte, XNNPACK), torch.export (.pt2) or OpenVINO (.xml + "
                      ".bin), fp32, bf16 (OpenVINO) or INT8, "
                      "checked against the eager model before it is written")
    sub.add_argument("model", nargs="?", choices=api.list_models(), metavar="MODEL",
                     help="the model (not needed with a --checkpoint written by finetune, which names its own)")
    sub.add_argument("--out", required=True, metavar="FILE",
                     help="where to write it (.onnx, .pte, .pt2, .xml: OpenVINO writes its weights beside it, .bin)")
    sub.add_argument("--format", choices=tuple(FORMATS), default=None, help="default: from the --out suffix")
    sub.add_argument("--int8", action="store_true", help="post-training INT8 quantization (openvino: NNCF)")
    sub.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                     help="openvino: the inference precision the file records (default: fp32); bf16 is fast only "
                          "on CPUs with AVX-512 BF16 or AMX, elsewhere OpenVINO runs it in f32")
    sub.add_argument("--calibration", metavar="DIR", help="with --int8: a folder of calibration images, e.g. a few "
                     "hundred training images (default: the bundled photo and generated images, for a quick try)")
    sub.add_argument("--float-depthwise", action="store_true", help="with --int8: keep depthwise convolutions in float")
    model_source_arguments(sub)
    sub.add_argument("--max-batch", type=int_at_least(1), default=32,
                     help="executorch: the largest batch the program takes (default: 32)")
    sub.add_argument("--quiet", action="store_true", help="no progress messages")

