"""``export``: ONNX, ExecuTorch (XNNPACK) and torch.export files of the released models, each checked
against the eager model before it is written; INT8 accuracy measured on a model that has
learned something (tinynet_e trained here on a generated, learnable image set)."""
import copy
import json
import shlex
import shutil

import pytest
import torch
from torch import nn

from models.tools import _runtimes, backends, export
from models.tools._images import SAMPLE_IMAGE
from models.tools._samples import (
    calibration_id,
    check_images,
    default_transforms,
    generated_images,
    settle_batchnorm,
)

from helpers import DOCS, ROOT, built_once, cli, readme_cli
from reference import ARCHITECTURES, PRETRAINED, build, random_state_dict


def _trained_like(name, **kwargs):
    """Random weights with a trained model's statistics: BatchNorm affine terms far from
    identity (the last of each residual branch small), running statistics measured on images
    at the model's input size; so activations and logits have a trained model's scale and a
    comparison to 1e-4 of the largest logit measures the export, not float32 itself."""
    model = build(name, **kwargs)
    model.load_state_dict(random_state_dict(model, seed=5))
    branch_ends = {"bn3", "bn2"} if name.startswith("tinynet") else {"ghost2"}
    for path, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d) and path.startswith("blocks.") and branch_ends & set(path.split(".")):
            with torch.no_grad():
                module.weight.mul_(0.3)
    return settle_batchnorm(model)


# -- fast -------------------------------------------------------------------------------------

def test_check_images_are_the_bundled_photo_and_generated_ones():
    model = build("tinynet_e")
    transforms = default_transforms(model)
    images = check_images(transforms)
    assert images.shape == (8, 3, 106, 106)
    from PIL import Image

    assert torch.equal(images[0], transforms(Image.open(SAMPLE_IMAGE).convert("RGB")))
    again = generated_images(7)
    assert [i.tobytes() for i in again] == [i.tobytes() for i in generated_images(7)]  # deterministic
    assert len({i.tobytes() for i in again}) == 7


def test_options_are_checked_before_any_work(tmp_path):
    model = build("tinynet_e")
    with pytest.raises(ValueError, match="unknown format 'tflite'; formats: onnx, executorch, pt2, openvino$"):
        export.export(model, "tflite", tmp_path / "m.tflite")
    with pytest.raises(ValueError, match="float_depthwise applies to int8 exports only"):
        export.export(model, "onnx", tmp_path / "m.onnx", float_depthwise=True)
    with pytest.raises(ValueError, match="a pt2 archive holds the fp32 model"):
        export.export(model, "pt2", tmp_path / "m.pt2", int8=True)
    with pytest.raises(ValueError, match="features_only"):
        export.export(build("tinynet_e", features_only=True), "pt2", tmp_path / "m.pt2")
    result = cli("export", "tinynet_e", "--out", str(tmp_path / "m.bin"))
    assert result.returncode == 1 and "give --format (onnx, executorch, pt2, openvino)" in result.stderr
    result = cli("export", "tinynet_e", "--out", str(tmp_path / "m.onnx"), "--float-depthwise")
    assert result.returncode == 1 and "apply to --int8 exports" in result.stderr
    result = cli("export", "ghostnet_1_3x", "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 2 and "no released weights" in result.stderr and "--checkpoint FILE" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_computes_something_else_is_not_written(tmp_path, monkeypatch):
    from models.description import describe

    model = _trained_like("tinynet_e")

    class Off:
        description = describe(model)

        def __call__(self, images):
            return torch.zeros(len(images), 1000)

    monkeypatch.setattr(export, "_to_pt2", lambda net, path, *args: path.write_bytes(b"program"))
    monkeypatch.setattr(_runtimes, "load_file", lambda *args, **kwargs: Off())
    out = tmp_path / "m.pt2"
    with pytest.raises(export.ExportCheckError, match=r"differs from the eager model by 1\.0e\+00 of the largest"):
        export.export(model, "pt2", out)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary folder
    Off.description = None  # a file that lost the model's description is not written either
    with pytest.raises(export.ExportCheckError, match="does not carry the model's description"):
        export.export(model, "pt2", out)
    assert list(tmp_path.iterdir()) == []


def test_calibration_set_is_named_by_its_files(tmp_path):
    assert calibration_id(None) == "sample-v1"
    folder = tmp_path / "calib"
    folder.mkdir()
    generated_images(1)[0].save(folder / "a.png")
    first = calibration_id(folder)
    generated_images(2)[1].save(folder / "b.png")
    assert calibration_id(folder) != first
    with pytest.raises(ValueError, match="does not exist"):
        calibration_id(tmp_path / "missing")


# -- slow: every released model to ONNX, every architecture to ExecuTorch -------------------------
# An ExecuTorch lowering takes a minute or more: one released model of each architecture is lowered
# (XNNPACK takes the same operators from every width of it), and every released model, with its own
# input size and depth, goes to ONNX. (Lowering all eight took about four minutes more.)
_EXPORTS = [(name, "onnx") for name in [*PRETRAINED, "ghostnetv2_1x", "ghostnetv3_1x"]]  # (V2/V3: DFC, branches)
_EXPORTS += [(name, "executorch") for name in ARCHITECTURES]


@pytest.mark.slow
@pytest.mark.parametrize("name, fmt", _EXPORTS)
def test_every_model_exports_and_runs_in_its_runtime(name, fmt, tmp_path):
    model = _trained_like(name)
    out = tmp_path / f"{name}{export.FORMATS[fmt]}"
    report = export.export(model, fmt, out)
    assert out.is_file() and report.size_bytes == out.stat().st_size and report.images == 8
    assert report.max_error <= export.TOLERANCE and report.top1_agreement == 1.0
    assert not model.fused and model.training is False  # the caller's model is left as it was
    runner = backends.load_file(out)
    transforms = default_transforms(model)  # 3 other images: a batch size the export was not traced with
    x = torch.stack([transforms(image) for image in generated_images(3, seed=9)])
    with torch.no_grad():
        expected = model(x)
    assert (expected[0] - expected[1]).abs().max() > 1e-3 * expected.abs().max()  # outputs tell inputs apart
    assert (runner(x) - expected).abs().max() <= export.TOLERANCE * expected.abs().max()
    if fmt == "onnx":
        import onnx

        graph = onnx.load(str(out))
        assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 18
        assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    else:
        # Lowered to XNNPACK in one piece, and one more for the classifier after its flatten; a
        # GhostNetV2/V3 in one more at each DFC attention (XNNPACK has no nearest upsampling).
        # (There were two pieces at every block: squeeze-excitation's flatten, hardsigmoid, mean.)
        attentions = sum(getattr(m, "short_conv", None) is not None for m in model.modules())
        assert out.read_bytes().count(b"XnnpackBackend") == 2 + attentions
        assert runner.max_batch == 32
        assert runner(torch.randn(40, 3, *model.default_input_size)).shape == (40, 1000)  # run in pieces


@pytest.mark.slow
def test_ghostnetv3_exports_its_deploy_form_to_a_pt2_archive(tmp_path):
    model = _trained_like("ghostnetv3_1x")
    report = export.export(model, "pt2", tmp_path / "v3.pt2")
    assert report.max_error <= export.TOLERANCE and report.top1_agreement == 1.0
    program = torch.export.load(str(tmp_path / "v3.pt2"))
    assert not any("rpr" in name for name in program.state_dict)  # the branches were folded
    assert not model.fused and any("rpr" in name for name in model.state_dict())  # the caller's model unchanged


@pytest.mark.slow
def test_pt2_archive_and_the_command_line(tmp_path, published):
    out = tmp_path / "e.pt2"
    result = cli("export", "tinynet_e", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"wrote {out} (pt2, fp32): ") and " MB in " in lines[0]
    assert "checked against eager fp32 on 8 images (the bundled photo + 7 generated)" in lines[1]
    assert "top-1 the same on 8/8" in lines[1]
    program = torch.export.load(str(out)).module()
    import models

    eager = models.tinynet_e(pretrained=True, progress=False)
    x = torch.randn(2, 3, 106, 106)
    with torch.no_grad():
        assert (program(x) - eager(x)).abs().max() <= 1e-4 * eager(x).abs().max()


# -- slow: INT8 accuracy on a model that learned something ------------------------------------

CLASSES = 6  # the six kinds of generated image: colour fields, gradients, checkerboards, shapes, stripes, noise


def _dataset(count, seed, transforms):
    images = generated_images(count, seed=seed)
    return torch.stack([transforms(i) for i in images]), torch.arange(count) % CLASSES, images


def _train_learned(folder):
    """Trains tinynet_e to tell the six kinds of generated image apart (a minute and more of
    CPU), into ``folder``: its checkpoint, a calibration folder of training images and the
    held-out images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same training (float sums in the same order) on any machine; and at
    # batch 32 one thread is as fast as two, and many times faster when the cores are shared
    torch.manual_seed(0)
    model = build("tinynet_e", num_classes=CLASSES)
    transforms = default_transforms(model)
    x, y, pil = _dataset(480, 100, transforms)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    # One cycle (warm-up, then down to ~0): the same 150 steps end in a settled model. At a constant
    # rate they ended mid-stride, with many held-out images near a tie between two classes, which
    # INT8 rounding then flipped: agreement with fp32 went from 95 % to 73 % between two CPUs (AVX2,
    # AVX-512 VNNI), whose float sums (so the trained model) and int8 kernels differ.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=150, pct_start=0.15)
    model.train()
    for _ in range(150):
        batch = torch.randint(0, len(x), (32,))
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    torch.set_num_threads(threads)
    torch.save(model.state_dict(), folder / "tinynet_e-shapes.pth")
    calibration = folder / "calibration"
    for i, image in enumerate(pil[:96]):
        (calibration / str(i % CLASSES)).mkdir(parents=True, exist_ok=True)
        image.save(calibration / str(i % CLASSES) / f"{i}.png")
    held_x, held_y, _ = _dataset(240, 200, transforms)
    torch.save({"x": held_x, "y": held_y}, folder / "held-out.pt")


@pytest.fixture(scope="session")
def learned(tmp_path_factory):
    """tinynet_e trained briefly to tell the six kinds of generated image apart; its
    checkpoint, a calibration folder of training images and held-out images. Trained once per
    run (``built_once``): the three formats' tests, split over two xdist workers, trained it twice."""
    folder = built_once(tmp_path_factory, "learned", _train_learned)
    checkpoint = folder / "tinynet_e-shapes.pth"
    model = build("tinynet_e", num_classes=CLASSES)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    held = torch.load(folder / "held-out.pt", weights_only=True)
    return model.eval(), checkpoint, folder / "calibration", held["x"], held["y"]


def _top1(logits, labels):
    return (logits.argmax(-1) == labels).float().mean().item()


def _figures(logits, fp32, labels):
    return {"top1": _top1(logits, labels), "agreement": _top1(logits, fp32.argmax(-1)),
            "max_error": ((logits - fp32).abs().max() / fp32.abs().max()).item()}


def _file_bytes(path):
    """An export's size on disk: an OpenVINO model is its .xml and its .bin."""
    files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    return sum(f.stat().st_size for f in files)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "executorch", "openvino"])
def test_int8_accuracy_on_held_out_images(learned, tmp_path, fmt):
    model, checkpoint, calibration, x, y = learned
    with torch.no_grad():
        fp32 = model(x)
    figures = {"fp32 eager": {"top1": _top1(fp32, y)}}
    assert figures["fp32 eager"]["top1"] >= 0.6  # the model has learned something (chance: 1/6)
    sizes = {}
    for float_depthwise in (False, True):
        out = tmp_path / f"int8-{float_depthwise}{export.FORMATS[fmt]}"
        if fmt == "onnx":  # through the command line, from the user's checkpoint
            args = ["--float-depthwise"] if float_depthwise else []
            result = cli("export", "tinynet_e", "--checkpoint", str(checkpoint), "--num-classes", str(CLASSES),
                         "--out", str(out), "--int8", "--calibration", str(calibration), "--quiet", *args)
            assert result.returncode == 0, result.stderr
            assert "int8" in result.stdout and "report only for int8" in result.stdout
        else:
            # (ExecuTorch: the float-depthwise program for one image at a time, a program of fixed
            # shape, lowered in three quarters of the time; the int8 one takes batches of 1 to 32.
            # docs/deploy.md's phone export, run by a test below, is the third: int8, batch 1.)
            single = {"max_batch": 1} if fmt == "executorch" and float_depthwise else {}
            export.export(model, fmt, out, int8=True, float_depthwise=float_depthwise, calibration=calibration,
                          **single)
        logits = backends.load_file(out)(x)
        mode = "int8, depthwise in float" if float_depthwise else "int8"
        figures[mode] = _figures(logits, fp32, y)
        sizes[mode] = _file_bytes(out)
    if fmt == "executorch":
        # An fp32 .pte is its float32 weights (BatchNorm folded) and a program of a few kB; lowering
        # one, only to weigh it, was a third ExecuTorch lowering and a minute of this test.
        fused = copy.deepcopy(model).fuse()
        sizes["fp32 weights"] = 4 * sum(t.numel() for t in fused.state_dict().values() if t.is_floating_point())
    else:
        fp32_file = tmp_path / f"fp32{export.FORMATS[fmt]}"
        export.export(model, fmt, fp32_file)
        sizes["fp32"] = _file_bytes(fp32_file)
    if fmt == "openvino":  # and bfloat16: OpenVINO's where the CPU has it, PyTorch's autocast everywhere
        bf16_file = tmp_path / "bf16.xml"
        export.export(model, fmt, bf16_file, precision="bf16")
        runner = backends.load_file(bf16_file)
        figures[f"bf16, run in {runner.inference_precision}"] = _figures(runner(x), fp32, y)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            figures["bf16, PyTorch autocast"] = _figures(model(x).float(), fp32, y)
        assert figures["bf16, PyTorch autocast"]["agreement"] >= 0.95, figures
        # and PyTorch's x86 INT8 (PT2E, X86InductorQuantizer, compiled), calibrated on the same images
        compiled = backends.wrap(copy.deepcopy(model), "compile", int8=True, calibration=calibration)
        with torch.no_grad():
            figures["int8, PyTorch compile x86"] = _figures(compiled(x), fp32, y)
        assert figures["int8, PyTorch compile x86"]["agreement"] >= 0.75, figures
    print(f"\n{fmt}: {len(y)} held-out images", json.dumps({"figures": figures, "bytes": sizes}, indent=1))
    for mode in ("int8", "int8, depthwise in float"):
        assert figures[mode]["agreement"] >= 0.75, figures  # (a broken quantization: ~1/6)
        assert figures[mode]["top1"] >= figures["fp32 eager"]["top1"] - 0.1, figures
    # (a 6-class head: the 1000-class models' INT8 files are 0.27x of fp32, this one a little more;
    # an OpenVINO IR's .xml, a graph of 0.3 MB with quantization nodes, does not shrink)
    assert sizes["int8"] <= (0.42 if fmt == "openvino" else 0.35) * sizes.get("fp32", sizes.get("fp32 weights"))


# -- the commands and code of docs/deploy.md and docs/speed.md run as written ---------------------------

def _readme_block(marker, fence):
    """The first ``fence`` code block after ``marker`` (an HTML comment, or the block's first lines)."""
    readme = DOCS  # the README and the docs/ pages
    if marker.startswith("<!--"):
        return readme.split(marker, 1)[1].split(f"```{fence}\n", 1)[1].split("```", 1)[0]
    return marker + readme.split(f"```{fence}\n{marker}", 1)[1].split("```", 1)[0]


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A working directory with what the README's commands read: the photo, a folder of
    images to calibrate on, an ImageFolder to evaluate."""
    (tmp_path / "examples").mkdir()
    shutil.copy(SAMPLE_IMAGE, tmp_path / "examples" / "chelsea.jpg")
    (tmp_path / "my_images").mkdir()
    for i, image in enumerate(generated_images(6, seed=30)):
        image.save(tmp_path / "my_images" / f"{i}.png")
    for k, wnid in enumerate(("n01440764", "n01443537")):
        (tmp_path / "imagenet" / "val" / wnid).mkdir(parents=True)
        for i, image in enumerate(generated_images(2, seed=40 + k)):
            image.save(tmp_path / "imagenet" / "val" / wnid / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_readme_deploy_commands_run_as_written(published, user_folder):
    lines = [line.split("  #")[0].strip() for line in _readme_block("<!-- deploy:commands -->", "bash").splitlines()]
    assert len(lines) == 4
    for line in lines:
        result = readme_cli(line)
        assert result.returncode == 0, (line, result.stderr)
    assert (user_folder / "ghostnet_1x.onnx").is_file() and (user_folder / "tinynet_e.pte").is_file()


@pytest.mark.slow
def test_readme_deploy_python_example_runs(published, user_folder):
    block = _readme_block("from PIL import Image\n\nimport models\nfrom models.tools import backends", "python")
    namespace = {}
    exec(compile(block, "docs/deploy.md", "exec"), namespace)
    model, image = namespace["model"], namespace["image"]
    with torch.no_grad():
        expected = model(image)
    assert (namespace["runner"](image) - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert namespace["top5"].indices.shape == (1, 5)
    assert isinstance(namespace["int8"], backends.Runner) and namespace["int8"].path.suffix == ".onnx"
    assert namespace["report"].max_error <= export.TOLERANCE


def _option(args, flag):
    """The values after ``flag`` up to the next option."""
    start = args.index(flag) + 1
    end = next((i for i in range(start, len(args)) if args[i].startswith("--")), len(args))
    return args[start:end]


@pytest.mark.slow
def test_readme_benchmark_command_is_the_committed_run(tmp_path):
    """docs/speed.md's tables come from docs/benchmark-cpu-2threads.json; the command printed above
    them is the one that made it (modes, batch sizes, threads), and it runs: here with the
    options repeated at the end to measure one model once instead of all of them 30 times."""
    command = shlex.split(_readme_block("<!-- deploy:benchmark -->", "bash").replace("\\\n", " "))
    assert command[:2] == ["ghostnet-hub", "benchmark"]
    args = command[2:]
    run = json.loads((ROOT / "docs" / "benchmark-cpu-2threads.json").read_text())
    assert {r["mode"] for r in run["results"] if r["implementation"] == "ours"} == set(_option(args, "--modes"))
    assert {r["batch"] for r in run["results"]} == {int(b) for b in _option(args, "--batch-sizes")}
    assert run["environment"]["threads"] == int(_option(args, "--threads")[0])
    out = {"--json": tmp_path / "run.json", "--csv": tmp_path / "run.csv", "--plot": tmp_path / "run.png"}
    threads = torch.get_num_threads()  # --threads sets this process's (cli runs in process)
    result = readme_cli(command, "--models", "tinynet_e", "--modes", "fused_cl", "onnxruntime", "--batch-sizes", "1",
                 "--repeats", "1", "--warmup", "0", "--references", "timm", "--quiet",
                 *(x for option, path in out.items() for x in (option, str(path))))
    torch.set_num_threads(threads)
    assert result.returncode == 0, result.stderr
    assert all(path.stat().st_size > 0 for path in out.values())
    mine = json.loads(out["--json"].read_text())["results"]
    assert sorted((r["implementation"], r["mode"]) for r in mine) == [
        ("ours", "fused_cl"), ("ours", "onnxruntime"), ("timm", "eager")]
