"""``python -m models benchmark``: runs, measures what it says, writes its table, files and figure.
(Speed targets are reported by the command, never asserted here: machines are noisy.)"""
import csv
import json

import pytest
import torch

from helpers import cli, run_models


@pytest.mark.slow  # runs the benchmark: tens of seconds
def test_benchmark_command_writes_table_csv_json_and_figure(tmp_path):
    out = {ext: tmp_path / f"bench.{ext}" for ext in ("csv", "json", "png")}
    result = run_models(
        "benchmark", "--models", "tinynet_e", "ghostnet_0_5x", "--modes", "eager", "fused", "fused_cl",
        "--batch-sizes", "1", "3", "--repeats", "2",
        "--warmup", "1", "--threads", "1", "--quiet", "--references", "timm", "--csv", str(out["csv"]),
        "--json", str(out["json"]), "--plot", str(out["png"]), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "threads=1" in result.stdout and "device=cpu" in result.stdout
    rows = list(csv.DictReader(out["csv"].open()))
    # 2 models x (3 of our modes + timm) x 2 batch sizes
    assert len(rows) == 16
    assert {(r["implementation"], r["mode"]) for r in rows} == {
        ("ours", "eager"), ("ours", "fused"), ("ours", "fused_cl"), ("timm", "eager")}
    for r in rows:
        assert float(r["median_ms"]) > 0
        rate = float(r["images_per_s"])
        assert abs(rate - int(r["batch"]) / float(r["median_ms"]) * 1000) < 1e-6 * rate + 1e-9
        if r["implementation"] == "ours":
            timm_row = next(t for t in rows if t["implementation"] == "timm" and t["model"] == r["model"]
                            and t["batch"] == r["batch"])
            expected = (float(r["median_ms"]) / float(timm_row["median_ms"]) if r["batch"] == "1"
                        else float(r["images_per_s"]) / float(timm_row["images_per_s"]))
            assert abs(float(r["vs_timm"]) - expected) < 1e-9
    report = json.loads(out["json"].read_text())
    assert report["environment"]["threads"] == 1 and len(report["results"]) == 16
    assert [r["top1"] for r in report["results"] if r["model"] == "tinynet_e"][0] == 59.9
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = result.stdout.splitlines()
    assert any("tinynet_e" in line and "fused_cl" in line and "x time" in line for line in table)


@pytest.mark.slow  # runs the benchmark: tens of seconds
def test_every_timed_cpu_call_starts_after_the_thread_pools_settle(monkeypatch):
    """Runtimes' thread pools spin on after a call (ONNX Runtime's slowed the next candidate 2x);
    each timed call waits SETTLE_S first, so no candidate inherits another's spinning threads."""
    from models.tools import benchmark

    events = []
    monkeypatch.setattr(benchmark.time, "sleep", lambda s: events.append(("sleep", s)))
    real = benchmark.time.perf_counter
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: events.append(("clock",)) or real())
    results = benchmark.run(["tinynet_e"], modes=["eager", "fused"], batch_sizes=[1], warmup=0, repeats=3,
                            references=["timm"])
    assert len(results) == 3
    timed = [i for i, e in enumerate(events) if e == ("clock",)][::2]  # each timed call reads the clock twice
    assert len(timed) == 3 * 3  # rounds x candidates
    assert all(events[i - 1] == ("sleep", benchmark.SETTLE_S) for i in timed)



class _Stop(Exception):
    pass


@pytest.mark.parametrize("options", [["--modes", "eager", "compiled"], ["--modes", "eager", "--compile"]])
def test_compiled_is_measured_when_asked_for(monkeypatch, options):
    """``--modes eager compiled`` measured eager alone, silently, unless --compile was also given."""
    from models.tools import benchmark

    asked = []

    def record(models, *, modes, **kwargs):
        asked.append(list(modes))
        raise _Stop  # before measuring anything

    monkeypatch.setattr(benchmark, "run", record)
    with pytest.raises(_Stop):
        cli("benchmark", "--models", "tinynet_e", "--references", "timm", "--quiet", *options)
    assert asked == [["eager", "compiled"]]


@pytest.mark.slow  # runs the benchmark: tens of seconds
def test_openvino_modes_beside_onnx_runtime_on_timms_onnx_on_a_named_cpu(tmp_path):
    """The peer a user would pick (ONNX Runtime on timm's own ONNX export) is measured in the same
    run, every row has its ratio to it, and the CPU's features are in the header and the JSON."""
    from models.tools import _cpu

    out = tmp_path / "bench.json"
    result = run_models("benchmark", "--models", "tinynet_e", "--modes", "openvino", "openvino_bf16", "--batch-sizes",
                        "1", "--repeats", "2", "--warmup", "1", "--threads", "1", "--quiet", "--references", "timm",
                        "timm_onnx", "--json", str(out), timeout=1200)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    rows = {(r["implementation"], r["mode"]): r for r in report["results"]}
    assert sorted(rows) == [("ours", "openvino"), ("ours", "openvino_bf16"), ("timm", "eager"), ("timm", "onnxruntime")]
    peer = rows["timm", "onnxruntime"]
    assert peer["vs_peer"] is None and peer["file_mb"] > 1 and peer["vs_timm"] > 0
    for key in (("ours", "openvino"), ("ours", "openvino_bf16"), ("timm", "eager")):
        assert abs(rows[key]["vs_peer"] - rows[key]["median_ms"] / peer["median_ms"]) < 1e-9
    assert rows["ours", "openvino"]["file_mb"] > 1.8 * rows["ours", "openvino_bf16"]["file_mb"]  # 16-bit weights
    cpu = report["environment"]["cpu"]
    assert cpu == {**_cpu.cpu_features()} and "openvino" in report["environment"]
    lines = result.stdout.splitlines()
    assert lines[1] == f"cpu: {_cpu.summary()} ({cpu['source']})"
    bf16_note = "openvino_bf16: ran in f32: this CPU has no native bfloat16"
    assert (bf16_note in lines) == (not _cpu.native_bf16()) and rows["ours", "openvino_bf16"]["note"] == (
        "" if _cpu.native_bf16() else bf16_note.split(": ", 1)[1])


@pytest.mark.slow  # runs the benchmark: tens of seconds
def test_ghostnetv2_and_v3_are_benchmarked_beside_timms_implementation():
    from models.tools import benchmark

    results = benchmark.run(["ghostnetv2_1x", "ghostnetv3_1x"], modes=["eager", "fused"], batch_sizes=[1], warmup=0,
                            repeats=1, references=["timm"])
    assert {(r.model, r.implementation, r.mode) for r in results} == {
        (m, impl, mode) for m in ("ghostnetv2_1x", "ghostnetv3_1x")
        for impl, mode in (("ours", "eager"), ("ours", "fused"), ("timm", "eager"))}
    assert {r.model: r.top1 for r in results} == {"ghostnetv2_1x": 75.19, "ghostnetv3_1x": 76.94}
    assert all(r.vs_timm > 0 for r in results if r.implementation == "ours")


def test_the_benchmarks_random_weights_export_within_tolerance():
    """The benchmark times exports made on the fly from its random weights, and every export is
    checked against the eager model first. With a fresh model's BatchNorm statistics GhostNetV2's
    logits reached 1e6, its fused form (what is exported) was a third off the eager model, the
    export was refused and the run stopped (V3's reached 1e22). Statistics measured on the
    calibration images keep it at a trained model's scale."""
    import copy

    from models.tools import benchmark, export
    from models.tools._samples import check_images, default_transforms

    ours = benchmark._seeded("ghostnetv2_1x", torch.device("cpu"))
    x = check_images(default_transforms(ours))
    fused = copy.deepcopy(ours).fuse()
    with torch.no_grad():
        eager = ours(x)
        assert eager.abs().max() < 1e3, eager.abs().max()
        assert (fused(x) - eager).abs().max() <= export.TOLERANCE * eager.abs().max()
