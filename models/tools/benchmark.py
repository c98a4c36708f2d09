"""``python -m models benchmark``: latency and throughput of each model in each inference
mode (eager, fused, channels_last, compiled, in bfloat16 autocast or x86 INT8; ONNX Runtime,
ExecuTorch and OpenVINO, fp32, bf16 and INT8), against timm's implementation of the same model
(eager, and the peer a user would pick: ONNX Runtime on timm's own ONNX export, with the same
weights) and torchvision's mobile networks, measured in the same run and interleaved, on a CPU
whose features (AVX-512, VNNI, AMX) are printed; and the published-top-1-vs-latency figure.
(``benchmarks/`` holds the maintainers' measurements of start-up and verification cost.)"""
from __future__ import annotations

import contextlib
import csv
import pathlib
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import api
from ..manifest import Manifest, load_manifest
from . import _cpu, backends
from ._args import add_command, amp_arguments, amp_dtype, int_at_least, json_argument, write_json
from ._plot import plot
from ._samples import settle_batchnorm

# Our model run eagerly (as built, fused, fused + channels_last), compiled, or exported to a
# runtime: fp32, INT8, INT8 with depthwise convolutions kept in float ("fdw").
EAGER_MODES = ("eager", "fused", "fused_cl", "compiled")
RUNTIME_MODES = {  # mode: (backend, int8, float_depthwise, precision)
    "onnxruntime": ("onnxruntime", False, False, "fp32"),
    "onnxruntime_int8": ("onnxruntime", True, False, "fp32"),
    "onnxruntime_int8_fdw": ("onnxruntime", True, True, "fp32"),
    "executorch": ("executorch", False, False, "fp32"),
    "executorch_int8": ("executorch", True, False, "fp32"),
    "executorch_int8_fdw": ("executorch", True, True, "fp32"),
    "openvino": ("openvino", False, False, "fp32"),
    "openvino_bf16": ("openvino", False, False, "bf16"),
    "openvino_int8": ("openvino", True, False, "fp32"),
    "openvino_int8_fdw": ("openvino", True, True, "fp32"),
    # PyTorch's own reduced precisions (backends.wrap "compile"): bfloat16 autocast, x86 PT2E INT8
    "compile_bf16": ("compile", False, False, "bf16"),
    "compile_int8_x86": ("compile", True, False, "fp32"),
}
MODES = EAGER_MODES + tuple(RUNTIME_MODES)
DEFAULT_MODES = ("eager", "fused", "fused_cl", "onnxruntime", "onnxruntime_int8", "executorch", "executorch_int8",
                 "openvino", "openvino_int8")
# References: timm's model run eagerly, and ONNX Runtime on timm's own ONNX export (the peer a
# user who knows ONNX would pick), both with our model's weights; torchvision's mobile networks.
REFERENCES = ("timm", "timm_onnx", "torchvision")
# Idle time before each timed CPU call. Thread pools keep spinning after a call returns (ONNX
# Runtime's for 10-30 ms): timm's ghostnet right after an ONNX Runtime call took 50-62 ms, after a
# 30 ms pause 23.6 ms, as after a long sleep. Every candidate starts from the same idle machine.
SETTLE_S = 0.05

# torchvision references: builder name -> (weights enum, input size)
TORCHVISION = {
    "mobilenet_v3_large": ("MobileNet_V3_Large_Weights", 224),
    "mobilenet_v3_small": ("MobileNet_V3_Small_Weights", 224),
    "efficientnet_b0": ("EfficientNet_B0_Weights", 224),
}


@dataclass
class Result:
    model: str
    implementation: str  # ours | timm | torchvision
    mode: str
    batch: int
    input_size: int
    median_ms: float
    spread_pct: float  # (p90 - p10) / median
    images_per_s: float
    top1: float | None
    vs_timm: float | None = None  # ours/timm: latency ratio at batch 1, throughput ratio otherwise
    file_mb: float | None = None  # runtime modes: the size of the exported file they run
    vs_peer: float | None = None  # the same, against ONNX Runtime on timm's ONNX export
    note: str = ""  # e.g. a bf16 mode on a CPU without native bfloat16


@dataclass
class _Candidate:
    model: str
    implementation: str
    mode: str
    input_size: int
    top1: float | None
    module: nn.Module
    times: dict
    note: str = ""


def _seeded(name: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # the same random weights every run: exports made on the fly are reused from the cache
    return settle_batchnorm(api.get_model(name)).to(device)  # (at a trained model's scale: exports can be checked)


def _ours(name: str, mode: str, device: torch.device, progress: Callable[[str], None]) -> Callable:
    model = _seeded(name, device)
    if mode in RUNTIME_MODES:
        backend, int8, float_depthwise, precision = RUNTIME_MODES[mode]
        if device.type != "cpu":
            raise ValueError(f"mode {mode} runs on the CPU; measure it without --device {device}")
        return backends.wrap(model, backend, int8=int8, float_depthwise=float_depthwise, precision=precision,
                             name=name, threads=torch.get_num_threads(), progress=progress)
    if mode == "eager":
        return model
    model.fuse(channels_last=mode in ("fused_cl", "compiled"))
    return torch.compile(model) if mode == "compiled" else model


def _note(mode: str, module) -> str:
    """What the CPU made of a reduced-precision mode, when it is not what the name says."""
    if mode.endswith("bf16") and not _cpu.native_bf16():
        if isinstance(module, backends.Runner) and module.inference_precision != "bf16":
            return f"ran in {module.inference_precision}: this CPU has no native bfloat16"
        return "bfloat16 emulated: this CPU has no native bfloat16"
    if "int8" in mode and not _cpu.native_int8():
        return "no int8 dot-product instructions (VNNI, AMX) on this CPU"
    return ""


def timm_reference(name: str, device: torch.device) -> nn.Module:
    """timm's implementation of ``name`` holding the weights our benchmark model holds (the
    checkpoints' keys are timm's), so that every implementation computes the same function."""
    import timm

    timm_name = api.get_variant(name).timm_name
    if timm_name is None:
        raise ValueError(f"timm has no model like {name} (its table row names none)")
    ref = timm.create_model(timm_name, pretrained=False)
    state = _seeded(name, torch.device("cpu")).state_dict()
    # GhostNetV3's re-parameterisable branches: the authors' `.bn.` is timm's `.bn1.`
    state = {re.sub(r"(rpr_conv\.\d+|rpr_scale)\.bn\.", r"\1.bn1.", k): v for k, v in state.items()}
    ref.load_state_dict(state)
    return ref.to(device).eval()


def _timm_onnx(ref: nn.Module, size: int, folder: pathlib.Path) -> backends.Runner:
    """ONNX Runtime on timm's model exported as a user would: ``torch.onnx.export`` (dynamo,
    opset 18, dynamic batch), in a session set up as ours (same threads, all graph optimizations)."""
    path = folder / f"timm-{len(list(folder.iterdir()))}.onnx"
    with backends.quiet_native_output():
        torch.onnx.export(ref.cpu(), (torch.randn(2, 3, size, size),), str(path), dynamo=True, opset_version=18,
                          external_data=False, input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    return backends.load_file(path, "onnxruntime", threads=torch.get_num_threads())


def _candidates(names, modes, device, references, manifest: Manifest, progress,
                folder: pathlib.Path) -> list[_Candidate]:
    out = []
    for name in names:
        variant = api.get_variant(name)
        size = variant.input_size
        top1 = manifest[name].top1 if name in manifest.models else None
        for mode in modes:
            module = _ours(name, mode, device, progress)
            out.append(_Candidate(name, "ours", mode, size, top1, module, {}, _note(mode, module)))
        # A model timm does not have (its row names none) is measured without timm's rows.
        if references & {"timm", "timm_onnx"} and variant.timm_name is not None:
            with contextlib.suppress(ImportError):
                ref = timm_reference(name, device)
                if "timm" in references:
                    out.append(_Candidate(name, "timm", "eager", size, top1, ref, {}))
                if "timm_onnx" in references:
                    progress(f"exporting timm's {name} to ONNX (the peer: ONNX Runtime on timm's ONNX)")
                    out.append(_Candidate(name, "timm", "onnxruntime", size, top1, _timm_onnx(ref, size, folder), {}))
    if "torchvision" in references:
        import torchvision

        for name, (weights_name, size) in TORCHVISION.items():
            weights = getattr(torchvision.models, weights_name).IMAGENET1K_V1
            module = getattr(torchvision.models, name)(weights=None).to(device).eval()
            out.append(_Candidate(name, "torchvision", "eager", size, weights.meta["_metrics"]["ImageNet-1K"]["acc@1"],
                                  module, {}))
    return out


def _timer(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":
        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return now
    return time.perf_counter


def run(models: Sequence[str] | None = None, *, modes: Sequence[str] = ("eager", "fused", "fused_cl"),
        batch_sizes: Sequence[int] = (1, 32), device: str | torch.device | None = None, warmup: int = 5,
        repeats: int = 20, references: Sequence[str] = REFERENCES, amp: str | None = None,
        manifest: Manifest | str | None = None,
        progress: Callable[[str], None] = lambda s: None) -> list[Result]:
    """Time every model (default: those with weights) in every mode, with the references,
    interleaved round by round; one ``Result`` per candidate and batch size."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)}")
    device = api.resolve_device(device)
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    unknown = [r for r in references if r not in REFERENCES]
    if unknown:
        raise ValueError(f"unknown reference(s) {', '.join(unknown)}; references: {', '.join(REFERENCES)}")
    names = list(models) if models else [n for n in api.list_models() if n in manifest.models]
    with tempfile.TemporaryDirectory(prefix="ghostnet-hub-benchmark-") as folder:
        candidates = _candidates(names, modes, device, set(references), manifest, progress, pathlib.Path(folder))
        return _measure(candidates, batch_sizes, device, warmup, repeats, amp, progress)


def _measure(candidates: list[_Candidate], batch_sizes: Sequence[int], device: torch.device, warmup: int,
             repeats: int, amp: str | None, progress: Callable[[str], None]) -> list[Result]:
    batches = list(batch_sizes)
    now = _timer(device)
    autocast = (torch.autocast(device.type, dtype=getattr(torch, amp)) if amp else contextlib.nullcontext())
    results = []
    for batch in batches:
        inputs = {c.input_size: torch.randn(batch, 3, c.input_size, c.input_size, device=device) for c in candidates}
        # Runtimes use torch's thread count (set above); every candidate gets the same.
        with torch.inference_mode(), autocast:
            for c in candidates:
                progress(f"warm-up {c.implementation} {c.model} {c.mode} batch {batch}")
                for _ in range(warmup):
                    c.module(inputs[c.input_size])
            # Round-robin: every candidate runs once per round, so drifts in machine load
            # (other processes, CPU clocks) hit all of them alike.
            for r in range(repeats):
                progress(f"round {r + 1}/{repeats}, batch {batch}")
                for c in candidates:
                    x = inputs[c.input_size]
                    if device.type == "cpu":
                        time.sleep(SETTLE_S)
                    start = now()
                    c.module(x)
                    c.times.setdefault(batch, []).append(now() - start)
        for c in candidates:
            times = sorted(c.times[batch])
            median = statistics.median(times)
            p10, p90 = times[int(0.1 * (len(times) - 1))], times[int(round(0.9 * (len(times) - 1)))]
            path = getattr(c.module, "path", None)  # a backends.Runner's file
            files = [path, path.with_suffix(".bin")] if path and path.suffix == ".xml" else [path] if path else []
            results.append(Result(c.model, c.implementation, c.mode, batch, c.input_size, median * 1e3,
                                  (p90 - p10) / median * 100, batch / median, c.top1,
                                  file_mb=sum(f.stat().st_size for f in files) / 1e6 if files else None,
                                  note=c.note))
    _ratios(results)
    return results


def _ratio(r: Result, ref: Result) -> float:
    return r.median_ms / ref.median_ms if r.batch == 1 else r.images_per_s / ref.images_per_s


def _ratios(results: list[Result]) -> None:
    """``vs_timm`` (against timm eager) for ours and the peer; ``vs_peer`` (against ONNX
    Runtime on timm's ONNX) for every other row of the model."""
    timm = {(r.model, r.batch): r for r in results if r.implementation == "timm" and r.mode == "eager"}
    peer = {(r.model, r.batch): r for r in results if r.implementation == "timm" and r.mode == "onnxruntime"}
    for r in results:
        ref = timm.get((r.model, r.batch))
        if ref is not None and r is not ref:
            r.vs_timm = _ratio(r, ref)
        ref = peer.get((r.model, r.batch))
        if ref is not None and r is not ref:
            r.vs_peer = _ratio(r, ref)


def table(results: list[Result]) -> str:
    def ratio(value: float | None, batch: int) -> str:
        return "" if value is None else f"{value:.2f}x time" if batch == 1 else f"{value:.2f}x img/s"

    header = ("model", "impl", "mode", "batch", "input", "median ms", "spread", "img/s", "vs timm", "vs ORT on timm")
    rows = [header] + [(
        r.model, r.implementation, r.mode, str(r.batch), str(r.input_size), f"{r.median_ms:.2f}",
        f"{r.spread_pct:.0f}%", f"{r.images_per_s:.1f}", ratio(r.vs_timm, r.batch), ratio(r.vs_peer, r.batch),
    ) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    notes = dict.fromkeys((r.mode, r.note) for r in results if r.note)
    return "\n".join(lines + [f"{mode}: {note}" for mode, note in notes])


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "device": str(device), "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["cpu"] = dict(_cpu.cpu_features())
    import importlib.metadata as metadata

    for runtime in ("onnxruntime", "executorch", "openvino", "nncf", "timm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[runtime] = metadata.version(runtime)
    return info


def write(results: list[Result], env: dict, csv_path=None) -> None:
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in results)


def _run(args) -> int:
    device = api.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = list(args.modes)  # "compiled" in --modes is enough; --compile adds it
    if args.compile and "compiled" not in modes:
        modes.append("compiled")
    if args.modes is DEFAULT_MODES:  # the defaults measure the runtimes that are installed
        for runtime, prefix in (("onnxruntime", "onnxruntime"), ("executorch", "executorch"),
                                ("openvino", "openvino"), ("nncf", "openvino_int8")):
            try:
                backends.require(runtime)
            except backends.MissingRuntime as exc:
                print(f"{exc}: no {prefix} modes", file=sys.stderr)
                modes = [m for m in modes if not m.startswith(prefix)]
    references = set(args.references)
    if "timm" in references:
        try:
            import timm  # noqa: F401
        except ImportError:
            print("timm is not installed: no timm reference (pip install timm)", file=sys.stderr)
            references -= {"timm", "timm_onnx"}
    if "timm_onnx" in references:
        try:
            for module in ("onnxruntime", "onnx", "onnxscript"):
                backends.require(module, "for the timm_onnx reference")
        except backends.MissingRuntime as exc:
            print(f"{exc}: no timm_onnx reference", file=sys.stderr)
            references.discard("timm_onnx")
    env = environment(device)
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.quiet else (lambda s: None)
    results = run(args.models, modes=modes, batch_sizes=args.batch_sizes, device=device, warmup=args.warmup,
                  repeats=args.repeats, references=references, amp=amp_dtype(args.amp, args.amp_dtype, device.type),
                  manifest=args.manifest, progress=say)
    # With --json -, the JSON is the output and the text goes to standard error.
    text = sys.stderr if args.json == "-" else sys.stdout
    print(" ".join(f"{k}={v}" for k, v in env.items() if k != "cpu"), file=text)
    print(f"cpu: {_cpu.summary(env['cpu'])} ({env['cpu']['source']})", file=text)
    print(table(results), file=text)
    write(results, env, args.csv)
    if args.json:
        write_json(args.json, {"environment": env, "results": [asdict(r) for r in results]})
    if args.plot:
        plot(results, env, args.plot)
        print(f"figure: {args.plot}", file=text)
    return 0


def register(commands) -> None:
    sub = add_command(commands, "benchmark", _run,
                      "latency and throughput per model and mode, against timm (eager, and ONNX Runtime on timm's "
                      "ONNX) and torchvision, on a CPU whose features are printed, and the accuracy-latency figure "
                      "(maintainers' start-up and verification benchmarks: benchmarks/)")
    sub.add_argument("--models", nargs="+", choices=api.list_models(), metavar="MODEL",
                     help="models to measure (default: those with weights)")
    sub.add_argument("--modes", nargs="+", choices=MODES, default=DEFAULT_MODES, metavar="MODE",
                     help="eager, fused (BatchNorm folded), fused_cl (fused + channels_last), compiled; onnxruntime, "
                          "executorch, openvino (exported on the fly, cached), each also _int8 and _int8_fdw (INT8, "
                          "depthwise in float); openvino_bf16 (bfloat16 inference precision: native with AVX-512 "
                          "BF16 or AMX, else OpenVINO runs f32); compile_bf16 (compiled, bfloat16 autocast), "
                          "compile_int8_x86 (PT2E X86InductorQuantizer, compiled) "
                          f"(default: {' '.join(DEFAULT_MODES)}, the runtimes if installed)")
    sub.add_argument("--compile", action="store_true",
                     help="also torch.compile the fused channels_last model (slow to start)")
    sub.add_argument("--batch-sizes", nargs="+", type=int_at_least(1), default=[1, 32], metavar="N",
                     help="batch 1 gives latency, larger batches throughput (default: 1 32)")
    sub.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps")
    sub.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    amp_arguments(sub)
    sub.add_argument("--warmup", type=int_at_least(0), default=5, help="untimed calls per candidate (default: 5)")
    sub.add_argument("--repeats", type=int_at_least(1), default=20, help="timed rounds (default: 20)")
    sub.add_argument("--references", nargs="*", choices=REFERENCES, default=list(REFERENCES),
                     help="reference implementations to measure alongside: timm (eager), timm_onnx (ONNX Runtime on "
                          "timm's own ONNX export, the same weights), torchvision (default: all three)")
    sub.add_argument("--csv", help="write the results as CSV")
    json_argument(sub, "the results and the machine description")
    sub.add_argument("--plot", help="draw published top-1 against latency to this PNG (needs matplotlib)")
    sub.add_argument("--quiet", action="store_true", help="no progress messages")
