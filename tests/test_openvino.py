"""OpenVINO and the reduced precisions: the CPU features that decide them, the IR export (its
precision and the model's description in ``rt_info``, checked before it is written), the
backend (compiled once per input shape, with the settings chosen, not OpenVINO's defaults) and
PyTorch's own bfloat16 and x86 INT8 paths. (INT8 accuracy: tests/test_export.py; the
benchmark's modes and its peer: tests/test_benchmark.py.)"""
import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from models.description import DESCRIPTION_KEY, describe
from models.tools import _cpu, _openvino, backends, export

from helpers import ROOT, cli
from reference import build

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
flags\t\t: fpu
"""
ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse avx avx2 fma f16c vaes
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm bf16 i8mm sve
CPU implementer\t: 0x41
"""


# -- fast: the CPU -------------------------------------------------------------------------------

def test_cpu_features_are_read_from_proc_cpuinfo():
    spr = _cpu._from_cpuinfo(SAPPHIRE_RAPIDS)
    assert spr["model"] == "Intel(R) Xeon(R) Platinum 8480+" and spr["vendor"] == "GenuineIntel"
    assert {name for name in _cpu.FEATURES if spr[name]} == set(_cpu.FEATURES) - {"avx_vnni"}
    assert _cpu.native_bf16(spr) and _cpu.native_int8(spr)
    zen3 = _cpu._from_cpuinfo(ZEN3)
    assert {name for name in _cpu.FEATURES if zen3[name]} == {"avx2"}
    assert not _cpu.native_bf16(zen3) and not _cpu.native_int8(zen3)
    assert _cpu.summary(zen3) == "AMD EPYC: avx2 (no avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8)"
    arm = _cpu._from_cpuinfo(GRAVITON3)
    assert _cpu.native_bf16(arm) and not arm["avx2"]
    assert _cpu._from_cpuinfo("") is None


def test_cpu_features_of_this_machine_and_without_proc_cpuinfo(monkeypatch):
    found = _cpu.cpu_features()
    assert set(_cpu.FEATURES) <= set(found) and found["model"]
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        assert found["source"] == "/proc/cpuinfo"
        flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith(("flags", "Features")))
                    .split(":", 1)[1].split())
        assert all(found[name] == (name in flags) for name in _cpu.FEATURES)

    def unreadable(self, *args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(pathlib.Path, "read_text", unreadable)  # as on macOS and Windows
    elsewhere = _cpu.cpu_features.__wrapped__()
    assert elsewhere["source"] == "torch.cpu probes" and set(_cpu.FEATURES) <= set(elsewhere)
    for name in ("avx2", "avx512_bf16", "amx_bf16"):  # PyTorch's probes agree with the kernel's flags
        assert elsewhere[name] == found[name], name


# -- fast: options and files ---------------------------------------------------------------------

def test_openvino_options_are_checked_before_any_work(tmp_path):
    model = build("tinynet_e")
    with pytest.raises(ValueError, match=r"give an --out ending in \.xml, not m\.onnx"):
        export.export(model, "openvino", tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="bf16 is an openvino precision for float models"):
        export.export(model, "onnx", tmp_path / "m.onnx", precision="bf16")
    with pytest.raises(ValueError, match=r"not with int8"):
        export.export(model, "openvino", tmp_path / "m.xml", precision="bf16", int8=True)
    with pytest.raises(ValueError, match="unknown precision 'fp16'; precisions: fp32, bf16"):
        export.export(model, "openvino", tmp_path / "m.xml", precision="fp16")
    result = cli("export", "tinynet_e", "--out", str(tmp_path / "m.onnx"), "--precision", "bf16")
    assert result.returncode == 1 and "--precision bf16 applies to --format openvino without --int8" in result.stderr
    with pytest.raises(ValueError, match="--precision bf16 runs in openvino or compile"):
        backends.wrap(model, "onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="--float-depthwise needs an exported model"):
        backends.wrap(model, "compile", int8=True, float_depthwise=True)
    with pytest.raises(ValueError, match="m.xml is already one"):
        backends.wrap(model, "openvino", file=tmp_path / "m.xml", precision="bf16")
    assert list(tmp_path.iterdir()) == []


def test_an_openvino_file_needs_its_weights_and_must_be_one(tmp_path):
    xml = tmp_path / "m.xml"
    xml.write_text("<net/>")
    with pytest.raises(ValueError, match=r"m\.xml: its weights m\.bin are missing"):
        backends.load_file(xml)
    (tmp_path / "m.bin").write_bytes(b"\0" * 16)
    xml.write_text("not an IR")
    with pytest.raises(ValueError, match=r"m\.xml is not an OpenVINO model that OpenVINO can read: ") as caught:
        backends.load_file(xml)
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=r"backend 'onnxruntime' cannot run it; \.xml files run in openvino"):
        backends.load_file(xml, "onnxruntime")


# -- fast: the backend, on a small IR built here --------------------------------------------------

def _small_ir(path, precision=None, description=None):
    """An IR of (N, 3, 4, 4) -> (N, 2): the sum of each image's channels times (1, -1), so every
    output row tells which input row it came from."""
    import openvino as ov
    import openvino.opset13 as ops

    images = ops.parameter([-1, 3, 4, 4], np.float32, name="images")
    sums = ops.reduce_sum(images, ops.constant(np.array([1, 2, 3], dtype=np.int64)), keep_dims=False)
    logits = ops.multiply(ops.unsqueeze(sums, ops.constant(np.int64(1))), ops.constant(np.array([[1, -1]], np.float32)))
    graph = ov.Model([logits], [images])
    if precision:
        graph.set_rt_info(precision, ["runtime_options", "INFERENCE_PRECISION_HINT"])
    if description:
        graph.set_rt_info(description.to_json(), DESCRIPTION_KEY)
    ov.save_model(graph, str(path), compress_to_fp16=False)
    return path


def _expected(x):
    return x.sum((1, 2, 3))[:, None] * torch.tensor([[1.0, -1.0]])


_TWO_RUNNERS = """
import gc, os, signal, sys
import torch
from models.tools import backends
first, second = (backends.load_file(sys.argv[1]) for _ in range(2))
print(first(torch.ones(1, 3, 4, 4)).tolist(), second(torch.ones(1, 3, 4, 4)).tolist())
del first  # dropped in the order loaded, as a notebook or a server drops models
gc.collect()
del second
gc.collect()
try:
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
except KeyboardInterrupt:
    print("interrupted")
"""


@pytest.mark.slow  # a new process, so that a crash is seen
def test_two_openvino_runners_dropped_in_the_order_loaded_leave_signals_working(tmp_path):
    # OpenVINO's CPU plugin gives the thread that loads it its own signal stack and puts back the
    # one it found when its Core goes: with two Cores gone first-in first-out, the thread is left
    # with a freed signal stack, and the next signal (Ctrl-C, a child's SIGCHLD) killed the
    # process with SIGSEGV. A process of its own, so that the crash is seen, not suffered.
    path = _small_ir(tmp_path / "m.xml")
    result = subprocess.run([sys.executable, "-c", _TWO_RUNNERS, str(path)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.split() == ["[[48.0,", "-48.0]]", "[[48.0,", "-48.0]]", "interrupted"]


def test_openvino_runner_compiles_once_per_shape_with_the_settings_chosen(tmp_path, monkeypatch):
    runner = backends.load_file(_small_ir(tmp_path / "m.xml"), threads=1)
    assert runner.backend == "openvino" and runner.description is None
    model = runner._run
    first = torch.randn(3, 3, 4, 4)

    def torch_copy(*args, **kwargs):  # woke torch's OpenMP threads to spin beside OpenVINO's
        raise AssertionError("a torch copy on the way to OpenVINO")

    with monkeypatch.context() as patched:
        patched.setattr(torch.Tensor, "copy_", torch_copy)
        out = runner(first)
    torch.testing.assert_close(out, _expected(first))
    runner(torch.randn(3, 3, 4, 4))
    torch.testing.assert_close(out, _expected(first))  # a result is the caller's, not the request's buffer
    (compiled, _, buffer), = model._compiled.values()
    assert buffer is not None  # small inputs: copied into the tensor bound to the request
    settings = {key: str(compiled.get_property(key)) for key in ("INFERENCE_NUM_THREADS", "NUM_STREAMS",
                                                                  "ENABLE_CPU_PINNING", "PERFORMANCE_HINT")}
    assert settings == {"INFERENCE_NUM_THREADS": "1", "NUM_STREAMS": "1", "ENABLE_CPU_PINNING": "False",
                        "PERFORMANCE_HINT": "LATENCY"}
    assert runner.inference_precision == "f32"  # chosen: OpenVINO's own default is bf16 on AMX CPUs
    assert compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    for batch in (1, 2, 4, 5, 6):
        x = torch.randn(batch, 3, 4, 4)
        torch.testing.assert_close(runner(x), _expected(x))
    assert list(model._compiled) == [(b, 3, 4, 4) for b in (2, 4, 5, 6)]  # the last KEEP shapes
    monkeypatch.setattr(type(model), "COPY_BYTES", 0)  # large inputs: shared with OpenVINO, not copied
    x = torch.randn(7, 3, 4, 4)
    torch.testing.assert_close(runner(x), _expected(x))
    assert model._compiled[(7, 3, 4, 4)][2] is None
    with pytest.raises(ValueError, match=r"takes images of shape \(N, 3, 4, 4\), not \(1, 3, 5, 5\)"):
        runner(torch.randn(1, 3, 5, 5))


def test_openvino_runner_reads_the_description_and_the_precision_of_the_file(tmp_path):
    described = describe(build("tinynet_e", num_classes=2), precision="bf16")
    path = _small_ir(tmp_path / "m.xml", precision="bf16", description=described)
    native = "BF16" in _openvino.core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        runner = backends.load_file(path)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(runner(x), _expected(x), atol=0.05, rtol=0.02)
    assert runner.description == described and runner.description.precision_text == "bfloat16"
    assert runner.inference_precision == ("bf16" if native else "f32")
    assert [str(w.message) for w in said] == ([] if native else [
            "m.xml asks for bfloat16, which this CPU has no instructions for (AVX-512 BF16 or AMX): OpenVINO "
            "runs it in f32"])


# -- slow: the export, and the cache of exports made on the fly ----------------------------------

@pytest.mark.slow
def test_bf16_export_records_its_precision_and_says_what_ran(tmp_path):
    model = build("tinynet_e", num_classes=10).eval()
    out = tmp_path / "e.xml"
    report = export.export(model, "openvino", out, precision="bf16")
    text = out.read_text()
    assert '<INFERENCE_PRECISION_HINT value="bf16" />' in text and DESCRIPTION_KEY in text
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        runner = backends.load_file(out)
    assert [str(w.message).split(",")[0] for w in said] == (
        [] if runner.inference_precision == "bf16" else ["e.xml asks for bfloat16"])
    assert runner.description == describe(model, precision="bf16")
    params = sum(p.numel() for p in model.parameters())
    assert out.with_suffix(".bin").stat().st_size < 2.2 * params  # weights stored in 16 bits
    assert report.size_bytes == out.stat().st_size + out.with_suffix(".bin").stat().st_size
    assert report.precision == "bf16" and report.checked_in == runner.inference_precision
    lines = report.summary().splitlines()
    assert lines[0].startswith(f"wrote {out} (openvino, bf16): ") and "(report only for bf16)" in lines[1]
    assert (len(lines) == 3) == (runner.inference_precision != "bf16")  # the CPU without bf16 is named
    assert report.max_error < 3e-2 and report.top1_agreement >= 0.75


@pytest.mark.slow
def test_openvino_exports_made_on_the_fly_are_cached_with_their_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = build("tinynet_e", num_classes=3).eval()
    images = torch.randn(2, 3, 106, 106)
    said = []
    first = backends.wrap(model, "openvino", progress=said.append)
    with torch.no_grad():
        torch.testing.assert_close(first(images), model(images), atol=1e-4 * model(images).abs().max().item(), rtol=0)
    (xml,) = (tmp_path / "torch" / "hub" / "exports").glob("tinynet_e-*.xml")
    weights = xml.with_suffix(".bin")
    assert all(f.with_name(f.name + ".sha256").is_file() for f in (xml, weights)) and len(said) == 1
    backends.wrap(model, "openvino", progress=said.append)
    assert len(said) == 1  # reused
    listed = cli("cache", "list", env={"TORCH_HOME": str(tmp_path / "torch")})
    assert listed.returncode == 0 and listed.stdout.count("verified") == 2, listed.stdout
    weights.write_bytes(weights.read_bytes()[:1000])  # the weights truncated, the .xml intact
    again = backends.wrap(model, "openvino", progress=said.append)
    assert any(f"is damaged ({weights.name}: sha256" in s and "exporting it again" in s for s in said), said
    torch.testing.assert_close(again(images), first(images))
    assert cli("cache", "list", env={"TORCH_HOME": str(tmp_path / "torch")}).returncode == 0


# -- slow: PyTorch's own reduced precisions ------------------------------------------------------

@pytest.mark.slow
def test_compile_in_bfloat16_autocast_reads_like_the_model(tmp_path):
    model = build("tinynet_e", num_classes=4).eval()
    reference = build("tinynet_e", num_classes=4).eval()
    reference.load_state_dict(model.state_dict())
    compiled = backends.wrap(model, "compile", precision="bf16")
    assert compiled.precision_text == "fp32, bfloat16 autocast" and compiled.num_classes == 4
    x = torch.randn(2, 3, 106, 106)
    with torch.no_grad():
        got, expected = compiled(x), reference(x)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
