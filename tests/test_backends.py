"""Runtimes as backends of predict and evaluate: the same labels whatever runs the model (a
file from ``export`` or an export made on the fly and cached), one line for a missing
runtime, and the runtimes imported only by the commands that use them."""
import copy
import io
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

import models
from models.tools import backends
from models.tools._images import SAMPLE_IMAGE, open_image
from models.tools._samples import check_images, default_transforms, generated_images

from helpers import ROOT, cli, run_models
from reference import build, random_state_dict


def _moderate_state(name):
    """Trained-like weights whose logits have a trained model's scale (a few units), so top-5
    labels and probabilities are well separated and comparable across runtimes."""
    model = build(name)
    state = random_state_dict(model, seed=3)
    model.load_state_dict(state)
    with torch.no_grad():
        logits = model.eval()(check_images(default_transforms(model)))
    scale = logits.std() / 3
    state["classifier.weight"] /= scale
    state["classifier.bias"] /= scale
    return state


@pytest.fixture
def moderate_weights(server, tmp_path, monkeypatch):
    """tinynet_e published weights (on loopback) with image-dependent, moderate logits."""
    from weights_server import weight_entry, write_manifest

    buffer = io.BytesIO()
    torch.save(_moderate_state("tinynet_e"), buffer)
    data = buffer.getvalue()
    entry = weight_entry(server.add("/e.pth", data), data)
    manifest = write_manifest(tmp_path / "manifest.json", {"tinynet_e": [entry]})
    monkeypatch.setenv("GHOSTNET_HUB_MANIFEST", manifest)
    return server


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.open(SAMPLE_IMAGE).save(folder / "a_chelsea.png")
    for i, image in enumerate(generated_images(5, seed=11)):
        image.save(folder / f"b_{i}.png")
    return folder


def _labels(result):
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    return [(r["image"], [t["label"] for t in r["top"]], [t["probability"] for t in r["top"]]) for r in records]


def _assert_same_predictions(got, expected):
    assert len(got) == len(expected) == 6
    for (image, labels, probs), (image_ref, labels_ref, probs_ref) in zip(got, expected, strict=True):
        assert image == image_ref and labels == labels_ref
        assert max(abs(a - b) for a, b in zip(probs, probs_ref, strict=True)) <= 1e-4
    assert len({tuple(labels) for _, labels, _ in expected}) > 1  # the images are told apart


# -- fast: the plumbing ------------------------------------------------------------------------

def test_eager_is_the_model_itself_and_unknown_names_are_errors():
    model = build("tinynet_e").eval()
    assert backends.wrap(model, "eager") is model
    assert backends.device_of(model) == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'; backends: eager, compile, onnxruntime"):
        backends.wrap(model, "tensorrt")
    with pytest.raises(ValueError, match="--int8 needs an exported model"):
        backends.wrap(model, "eager", int8=True)


def test_a_file_runs_only_in_the_runtime_it_was_made_for(tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not used")
    with pytest.raises(ValueError, match="backend 'executorch' cannot run it; .onnx files run in onnxruntime"):
        backends.load_file(onnx_file, "executorch")
    with pytest.raises(ValueError, match="does not exist"):
        backends.load_file(tmp_path / "missing.pte")
    with pytest.raises(ValueError, match="nothing known"):
        backends.load_file(onnx_file.rename(tmp_path / "m.bin"))


@pytest.mark.parametrize("module, backend", [("onnxruntime", "onnxruntime"), ("executorch", "executorch"),
                                             ("openvino", "openvino")])
def test_missing_runtime_is_one_line_naming_the_extra(moderate_weights, monkeypatch, module, backend):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    monkeypatch.chdir(ROOT)  # (a clone's hint names its requirements file from where the user is)
    result = cli("predict", str(SAMPLE_IMAGE), "--model", "tinynet_e", "--backend", backend, "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    extra = {"onnxruntime": "export", "executorch": "deploy", "openvino": "deploy"}[module]
    assert result.stderr.strip().splitlines() == [
        f'error: {module} is not installed (needed for the {backend} backend): pip install "ghostnet-hub[{extra}]" '
        f"(in this clone: pip install -r requirements-{extra}.txt), or just pip install {module}"]


def test_int8_options_need_int8(moderate_weights):
    result = cli("predict", "--model", "tinynet_e", "--backend", "onnxruntime", "--float-depthwise")
    assert result.returncode == 1 and "--float-depthwise and --calibration apply to --int8" in result.stderr



def test_int8_options_with_an_exported_file_are_refused_not_ignored(moderate_weights, tmp_path):
    result = cli("predict", "--model", "tinynet_e", "--model-file", str(tmp_path / "m.onnx"), "--int8")
    assert result.returncode != 0 and "m.onnx is already one" in result.stderr
    assert "Traceback" not in result.stderr


def test_cache_key_of_bfloat16_weights_is_their_float32_export(moderate_weights):
    half = build("tinynet_e").eval().to(torch.bfloat16)  # (numpy has no bfloat16: cache_key raised)
    same_as_export = copy.deepcopy(half).float()
    assert backends.cache_key(half, "onnx", {}) == backends.cache_key(same_as_export, "onnx", {})


# -- slow: real runtimes -----------------------------------------------------------------------

@pytest.mark.slow
def test_runtimes_are_imported_only_when_used_and_missing_ones_are_one_line(moderate_weights, tmp_path):
    """In a real process whose onnxruntime and executorch cannot be imported (a sitecustomize
    blocks them): the commands start, and using a runtime is one line, no traceback."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        for name in ("onnxruntime", "executorch"):
            sys.modules[name] = None
    """))
    env = {"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    probe = run_models("list", env=env)
    assert probe.returncode == 0, probe.stderr
    checks = run_models("export", "tinynet_e", "--out", str(tmp_path / "e.pte"), env=env)
    assert checks.returncode == 2 and "Traceback" not in checks.stderr
    assert checks.stderr.strip().splitlines()[-1].startswith("error: executorch is not installed")
    assert not (tmp_path / "e.pte").exists()
    result = run_models("predict", "--model", "tinynet_e", "--backend", "onnxruntime", "--quiet", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        'error: onnxruntime is not installed (needed for the onnxruntime backend): pip install "ghostnet-hub[export]" '
        "(in this clone: pip install -r requirements-export.txt), or just pip install onnxruntime"]
    # Without the block: starting the command line imports none of the optional runtimes.
    probe = subprocess.run([sys.executable, "-c", "import sys; from models.tools import cli; print(sorted(m for m in "
                            "sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'onnxscript', 'executorch', "
                            "'torchao', 'openvino', 'nncf')))"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "executorch", "pt2", "openvino"])
def test_export_then_predict_with_the_file_gives_the_eager_labels(moderate_weights, photos, tmp_path, fmt):
    suffix = {"onnx": ".onnx", "executorch": ".pte", "pt2": ".pt2", "openvino": ".xml"}[fmt]
    out = tmp_path / f"tinynet_e{suffix}"
    exported = cli("export", "tinynet_e", "--out", str(out), "--quiet")
    assert exported.returncode == 0, exported.stderr
    assert f"wrote {out} ({fmt}, fp32)" in exported.stdout and "of the largest logit (limit 1e-04)" in exported.stdout
    eager = _labels(cli("predict", str(photos), "--model", "tinynet_e", "--json", "-", "--quiet"))
    from_file = _labels(cli("predict", str(photos), "--model", "tinynet_e", "--json", "-", "--quiet", "--model-file",
                            str(out), "--batch-size", "4"))
    _assert_same_predictions(from_file, eager)


@pytest.mark.slow
def test_backends_made_on_the_fly_are_cached_and_give_the_eager_labels(moderate_weights, photos, tmp_path):
    eager = _labels(cli("predict", str(photos), "--model", "tinynet_e", "--json", "-", "--quiet"))
    first = cli("predict", str(photos), "--model", "tinynet_e", "--json", "-", "--backend", "onnxruntime")
    assert first.stderr.count("exporting tinynet_e to onnx") == 1
    _assert_same_predictions(_labels(first), eager)
    again = cli("predict", str(photos), "--model", "tinynet_e", "--json", "-", "--backend", "onnxruntime")
    assert "exporting" not in again.stderr  # the cached export
    _assert_same_predictions(_labels(again), eager)
    assert len(list(backends.export_cache_dir().glob("tinynet_e-*.onnx"))) == 1
    compiled = cli("predict", str(photos), "--model", "tinynet_e", "--json", "-", "--quiet", "--backend", "compile")
    _assert_same_predictions(_labels(compiled), eager)
    # The same compiled form (fused, channels_last; six images, inference mode) logit by logit
    # against the unfused eager model: the graph predict just compiled, so Inductor's C++ kernels
    # (a second of g++ each, 30-odd) are built once. (test_fuse compiles the unfused model.)
    model = models.tinynet_e(pretrained=True, progress=False)  # (the served weights, cached by predict)
    x = torch.stack([default_transforms(model)(open_image(str(p))) for p in sorted(photos.iterdir())])
    with torch.inference_mode():
        expected, got = model(x), backends.wrap(copy.deepcopy(model), "compile")(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), (got - expected).abs().max()


@pytest.mark.slow
def test_evaluate_with_a_runtime_counts_what_eager_counts(moderate_weights, tmp_path):
    root = tmp_path / "val"
    for k, wnid in enumerate(("n01440764", "n01443537")):
        (root / wnid).mkdir(parents=True)
        for i, image in enumerate(generated_images(3, seed=20 + k)):
            image.save(root / wnid / f"{i}.png")
    reports = {}
    for backend in ("eager", "onnxruntime"):
        out = tmp_path / f"{backend}.json"
        result = cli("evaluate", "--model", "tinynet_e", "--data", str(root), "--quiet", "--workers", "0",
                     "--backend", backend, "--json", str(out))
        assert result.returncode == 0, result.stderr
        reports[backend] = json.loads(out.read_text())
    for key in ("images", "correct1", "correct5"):
        assert reports["onnxruntime"][key] == reports["eager"][key]


# -- the benchmark measures the runtimes beside the references ---------------------------------

def test_figure_joins_families_marks_int8_and_no_labels_overlap(tmp_path):
    from models.tools._plot import plot
    from models.tools.benchmark import Result

    published = {"ghostnet_1x": 73.98, "tinynet_a": 77.7, "tinynet_b": 75.0, "tinynet_c": 71.2, "tinynet_d": 67.0,
                 "tinynet_e": 59.9}
    timm_ms = {"ghostnet_1x": 28.7, "tinynet_a": 30.7, "tinynet_b": 24.0, "tinynet_c": 18.0, "tinynet_d": 11.0,
               "tinynet_e": 7.1}
    results = []
    for name, top1 in published.items():
        for impl, mode, ratio in (("timm", "eager", 1.0), ("ours", "fused_cl", 0.65), ("ours", "onnxruntime", 0.21),
                                  ("ours", "executorch", 0.23), ("ours", "executorch_int8", 0.16)):
            ms = timm_ms[name] * ratio
            results.append(Result(name, impl, mode, 1, 224, ms, 10.0, 1000 / ms, top1))
    # torchvision's networks, with efficientnet_b0 right next to tinynet_a (their labels used to collide)
    for name, ms, top1 in (("mobilenet_v3_large", 12.0, 75.274), ("mobilenet_v3_small", 4.5, 67.668),
                           ("efficientnet_b0", 31.5, 77.692)):
        results.append(Result(name, "torchvision", "eager", 1, 224, ms, 10.0, 1000 / ms, top1))
    env = {"device": "cpu", "threads": 2, "torch": torch.__version__, "date": "today"}
    boxes = plot(results, env, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(text for text, _ in boxes) == sorted([*published, "mobilenet_v3_large", "mobilenet_v3_small",
                                                         "efficientnet_b0"])
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            assert not box_a.overlaps(box_b), f"labels {a} and {b} overlap"


@pytest.mark.slow
def test_benchmark_measures_the_runtimes_fp32_and_int8_beside_timm(tmp_path):
    import csv

    out = tmp_path / "bench.csv"
    modes = ["fused_cl", "onnxruntime", "onnxruntime_int8", "executorch"]  # (ExecuTorch INT8: test_export.py)
    # In this process (test_benchmark.py runs the command in its own): a new Python that imports
    # every runtime costs ten CPU seconds. --threads sets this process's, restored after.
    threads = torch.get_num_threads()
    try:
        result = cli("benchmark", "--models", "tinynet_e", "--modes", *modes, "--batch-sizes", "1", "2",
                     "--repeats", "2", "--warmup", "1", "--threads", "1", "--quiet", "--references", "timm",
                     "--csv", str(out), "--plot", str(tmp_path / "figure.png"))
    finally:
        torch.set_num_threads(threads)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert sorted((r["implementation"], r["mode"], r["batch"]) for r in rows) == sorted(
        [("ours", m, b) for m in modes for b in ("1", "2")] + [("timm", "eager", "1"), ("timm", "eager", "2")])
    for r in rows:
        assert float(r["median_ms"]) > 0 and (r["implementation"] == "timm") == (r["vs_timm"] == "")
        assert (r["file_mb"] != "") == (r["mode"] in modes[1:])  # the size of the file a runtime runs
    size = {r["mode"]: float(r["file_mb"]) for r in rows if r["file_mb"]}
    assert size["onnxruntime_int8"] < 0.35 * size["onnxruntime"]
    assert any("onnxruntime_int8" in line and "x time" in line for line in result.stdout.splitlines())


def test_ratios_to_timm_eager_and_to_onnx_runtime_on_timms_onnx():
    from models.tools.benchmark import Result, _ratios, table

    def row(impl, mode, batch, ms):
        return Result("tinynet_e", impl, mode, batch, 106, ms, 5.0, batch / ms * 1e3, 59.9)

    results = [row("ours", "openvino", 1, 2.0), row("timm", "eager", 1, 8.0), row("timm", "onnxruntime", 1, 2.5),
               row("ours", "openvino", 32, 40.0), row("timm", "eager", 32, 160.0), row("timm", "onnxruntime", 32, 80.0)]
    results[0].note = "ran in f32: this CPU has no native bfloat16"
    _ratios(results)
    ours1, timm1, peer1, ours32, timm32, peer32 = results
    assert (ours1.vs_timm, ours1.vs_peer) == (0.25, 0.8)  # latency ratios at batch 1
    assert (ours32.vs_timm, ours32.vs_peer) == (4.0, 2.0)  # throughput ratios otherwise
    assert (peer1.vs_timm, peer1.vs_peer, timm1.vs_timm, timm1.vs_peer) == (2.5 / 8, None, None, 8 / 2.5)
    lines = table(results).splitlines()
    assert lines[0].split("  ")[-1] == "vs ORT on timm" and " vs timm " in lines[0]
    assert lines[1].split()[-4:] == ["0.25x", "time", "0.80x", "time"]
    assert lines[4].split()[-4:] == ["4.00x", "img/s", "2.00x", "img/s"]
    assert lines[-1] == "openvino: ran in f32: this CPU has no native bfloat16"


def test_timm_reference_holds_our_models_weights():
    from models.tools import benchmark

    ours = benchmark._seeded("tinynet_e", torch.device("cpu"))
    ref = benchmark.timm_reference("tinynet_e", torch.device("cpu"))
    x = torch.randn(2, 3, 106, 106)
    with torch.no_grad():
        assert torch.equal(ref(x), ours(x))  # the same function: the peer is measured on the same weights
