"""A model's identity travels with it (issue 18): whatever file a user holds (a finetune
``best.pth``, an ``.onnx``, a ``.pte``, a ``.pt2``), every entry point knows the model, its class
names and its preprocessing, or refuses with a clear one-line error.

The journey test runs it as a user would, through the command line (finetune in a subprocess,
the later commands' own main): finetune -> export to every format -> predict and evaluate each
file with no ``--model``."""
import hashlib
import json
import warnings

import pytest
import torch
from stripes import CLASSES, write_dataset

import models
from models.description import DESCRIPTION_KEY, ModelDescription, describe
from models.tools import backends, export
from models.tools.finetune import finetune

from helpers import cli, run_models
from reference import build

TINY = {"input_size": 32, "batch_size": 8, "workers": 0, "progress": False}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """(data, best.pth) of one epoch of tinynet_e on the 4 striped classes, in this process."""
    data = write_dataset(tmp_path_factory.mktemp("shapes"), train=8, val=3, size=40)
    result = finetune(model="tinynet_e", data=data, out=tmp_path_factory.mktemp("run"), pretrained=False, epochs=1,
                      **TINY)
    return data, result.best


@pytest.fixture(scope="module")
def shapes_onnx(shapes, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "shapes.onnx"
    export.export(models.from_checkpoint(shapes[1]), "onnx", path)
    return path


def _image(data):
    return str(data / "val" / "vertical_warm" / "000.png")


# -- the library ----------------------------------------------------------------------------------

def test_builders_take_classes_and_names_from_the_projects_checkpoint(shapes):
    """Before: models.tinynet_e(checkpoint=best.pth) failed with a size mismatch (1000 vs 4)."""
    best = shapes[1]
    model = models.tinynet_e(checkpoint=best)
    assert model.num_classes == 4 and not model.training
    assert model.pretrained_weights.meta["categories"] == list(CLASSES)
    assert model.pretrained_weights.weights_sha256 == hashlib.sha256(best.read_bytes()).hexdigest()
    size = model.pretrained_weights.preprocessing["input_size"]
    assert size == 32 and model.pretrained_weights.transforms().crop_size == [32]
    assert models.get_model("tinynet_e", checkpoint=best).pretrained_weights.classes == CLASSES
    with pytest.raises(ValueError, match=r"holds a 4-class tinynet_e .*not 10 classes"):
        models.tinynet_e(checkpoint=best, num_classes=10)


@pytest.mark.slow  # the error builds every model to name the one that fits
def test_a_wrong_architecture_is_one_short_error_naming_the_right_model(shapes, tmp_path):
    """Before: 33,792 characters (every missing and mismatched key)."""
    with pytest.raises(ValueError, match="holds a tinynet_e, not a tinynet_a") as described:
        models.tinynet_a(checkpoint=shapes[1])
    plain = tmp_path / "plain.pth"
    torch.save(models.from_checkpoint(shapes[1]).state_dict(), plain)
    with pytest.raises(ValueError, match="does not fit tinynet_a") as undescribed:
        models.tinynet_a(checkpoint=plain)
    message = str(undescribed.value)
    assert len(message) < 600 and "It fits tinynet_e (num_classes=4)" in message, message
    assert len(str(described.value)) < 300


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_reduced_or_double_precision_checkpoint_loads_as_float32(tmp_path, dtype):
    """Before: the model kept the file's dtype and its first float32 input failed."""
    source = build("tinynet_e", num_classes=3)
    path = tmp_path / "half.pth"
    torch.save({k: v.to(dtype) if v.is_floating_point() else v for k, v in source.state_dict().items()}, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = models.tinynet_e(checkpoint=path)
    said = [str(w.message) for w in caught if "loaded as float32" in str(w.message)]
    assert len(said) == 1 and str(dtype).removeprefix("torch.") in said[0]
    assert {p.dtype for p in model.state_dict().values() if p.is_floating_point()} == {torch.float32}
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    result = cli("predict", "--model", "tinynet_e", "--checkpoint", str(path), "--json", "-", "--quiet")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert json.loads(result.stdout)["top"][0]["label"].startswith("class ")
    assert result.stderr.count("loaded as float32") == 1 and "warning: " in result.stderr  # said once, one line


def test_description_round_trips_and_refuses_what_is_not_one():
    model = build("tinynet_e", num_classes=2)
    described = describe(model, classes=["cat", "dog"])
    assert ModelDescription.from_json(described.to_json()) == described
    assert described.classes == ("cat", "dog") and described.architecture == "tinynet_e"
    with pytest.raises(ValueError, match="not a model description"):
        ModelDescription.from_json('{"format": "other"}', "x.onnx")
    with pytest.raises(ValueError, match="3 class names given for a 2-class model"):
        describe(model, classes=["a", "b", "c"])


# -- exported files (an export takes 10 s and more: slow) ---------------------------------------------

@pytest.mark.slow
def test_an_onnx_export_carries_the_description(shapes, shapes_onnx):
    runner = backends.load_file(shapes_onnx)
    described = runner.description
    assert (described.architecture, described.classes, described.precision) == ("tinynet_e", CLASSES, "fp32")
    assert described.weights_sha256 == hashlib.sha256(shapes[1].read_bytes()).hexdigest()
    assert runner.pretrained_weights.meta["categories"] == list(CLASSES)


@pytest.mark.slow
def test_predict_names_the_fine_tuned_classes_with_no_model_given(shapes, shapes_onnx):
    """Before: 'model': 'ghostnet_1x' and ImageNet labels (.pte), or a raw ONNX Runtime
    traceback ('Got: 224 Expected: 106') without --model."""
    data, best = shapes
    eager = json.loads(cli("predict", "--checkpoint", str(best), _image(data), "--json", "-", "--topk", "4").stdout)
    result = cli("predict", "--model-file", str(shapes_onnx), _image(data), "--json", "-", "--topk", "4")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["model"] == "tinynet_e" and {t["label"] for t in record["top"]} == set(CLASSES)
    assert record["top"][0]["label"] == eager["top"][0]["label"]


@pytest.mark.slow
def test_a_flag_that_contradicts_the_file_is_an_error_naming_both(shapes, shapes_onnx):
    data = shapes[0]
    result = cli("predict", "--model", "tinynet_a", "--model-file", str(shapes_onnx), _image(data))
    assert result.returncode == 2 and "holds a tinynet_e, not a tinynet_a" in result.stderr
    result = cli("predict", "--model-file", str(shapes_onnx), "--num-classes", "1000", _image(data))
    assert result.returncode == 2 and "4-class tinynet_e" in result.stderr and "not 1000 classes" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_file_without_a_description_needs_model_and_says_so(shapes, shapes_onnx, tmp_path):
    import onnx

    graph = onnx.load(str(shapes_onnx))
    del graph.metadata_props[:]  # as a file exported by another tool
    foreign = tmp_path / "foreign.onnx"
    onnx.save(graph, str(foreign))
    result = cli("predict", "--model-file", str(foreign), _image(shapes[0]))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "carries no model description" in lines[0]
    assert "--model" in lines[0] and "Traceback" not in result.stderr
    assert backends.load_file(foreign).description is None
    # With --model and the checkpoint it came from, it runs with that model's names.
    result = cli("predict", "--model", "tinynet_e", "--checkpoint", str(shapes[1]), "--model-file", str(foreign),
                 _image(shapes[0]), "--json", "-", "--topk", "4")
    assert result.returncode == 0 and {t["label"] for t in json.loads(result.stdout)["top"]} == set(CLASSES)


@pytest.mark.slow
def test_evaluate_says_what_produced_its_numbers(shapes, shapes_onnx, tmp_path):
    """Before: the same header for every backend and precision, and 'top5' holding top-4."""
    data = shapes[0]
    eager_json, onnx_json = tmp_path / "eager.json", tmp_path / "onnx.json"
    eager = cli("evaluate", "--checkpoint", str(shapes[1]), "--data", str(data / "val"), "--workers", "0",
                "--quiet", "--json", str(eager_json))
    ran = cli("evaluate", "--model-file", str(shapes_onnx), "--data", str(data / "val"), "--workers", "0",
              "--quiet", "--json", str(onnx_json))
    assert eager.returncode == 0 and ran.returncode == 0, eager.stderr + ran.stderr
    assert ran.stdout.splitlines()[0].startswith(f"tinynet_e (4 classes) on onnxruntime, fp32, {shapes_onnx}")
    report, reference = json.loads(onnx_json.read_text()), json.loads(eager_json.read_text())
    assert (report["backend"], report["precision"], report["file"]) == ("onnxruntime", "fp32", str(shapes_onnx))
    assert report["file_sha256"] == hashlib.sha256(shapes_onnx.read_bytes()).hexdigest()
    assert (reference["backend"], reference["file"]) == ("eager", str(shapes[1]))
    assert "top4" in report and "top5" not in report and report["top_k"] == 4
    assert (report["correct1"], report["correct4"]) == (reference["correct1"], reference["correct4"])


@pytest.mark.slow
def test_a_pt2_archive_carries_the_description(shapes, tmp_path):
    """As an extra file of the archive (the .pte's constant method is checked by the journey
    below, whose ExecuTorch lowering is the slow part)."""
    path = tmp_path / "shapes.pt2"
    export.export(models.from_checkpoint(shapes[1]), "pt2", path)
    described = backends.load_file(path).description
    assert (described.architecture, described.classes) == ("tinynet_e", CLASSES)
    extra = {DESCRIPTION_KEY: ""}
    torch.export.load(str(tmp_path / "shapes.pt2"), extra_files=extra)
    assert json.loads(extra[DESCRIPTION_KEY])["classes"] == list(CLASSES)


# -- the whole journey, as a user runs it ------------------------------------------------------------

@pytest.mark.slow
def test_the_journey_through_the_command_line(tmp_path):
    """finetune in a subprocess, as a user runs it -> export (.onnx, .pte, .pt2) -> predict and
    evaluate each file with no --model. Export, predict and evaluate run the commands' own main
    in this process: the files are the hand-off under test, and a new Python for each command
    cost a minute (an export's imports alone, ten CPU seconds; the pip user's journey below runs
    export in a process of its own). The fine-tuned class names and the same top-1 on every
    file, and evaluate names backend, precision and file and agrees with the eager counts."""
    data = write_dataset(tmp_path / "shapes", train=8, val=3, size=40)
    run = tmp_path / "runs" / "shapes"
    env = {"OMP_NUM_THREADS": "1"}
    done = run_models("finetune", "--model", "tinynet_e", "--data", str(data), "--out", str(run), "--no-pretrained",
                      "--epochs", "1", "--input-size", "32", "--batch-size", "8", "--workers", "0", "--quiet", env=env)
    assert done.returncode == 0, done.stderr
    best = run / "best.pth"
    files = [tmp_path / f"shapes{suffix}" for suffix in (".onnx", ".pte", ".pt2")]
    for path in files:
        done = cli("export", "--checkpoint", str(best), "--out", str(path), "--max-batch", "4", "--quiet")
        assert done.returncode == 0, done.stderr
    image = _image(data)

    def top(*args):
        done = cli("predict", image, "--json", "-", "--topk", "4", *args)
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)
        assert record["model"] == "tinynet_e" and {t["label"] for t in record["top"]} == set(CLASSES), record
        return record["top"][0]["label"]

    eager = top("--checkpoint", str(best))
    assert [top("--model-file", str(path)) for path in files] == [eager] * 3
    assert top("--checkpoint", str(best), "--backend", "onnxruntime") == eager  # exported on the fly

    def evaluate(*args):
        out = tmp_path / "report.json"
        done = cli("evaluate", "--data", str(data / "val"), "--workers", "0", "--quiet", "--json", str(out), *args)
        assert done.returncode == 0, done.stderr
        return json.loads(out.read_text())

    reference = evaluate("--checkpoint", str(best))
    for path, backend in zip(files, ("onnxruntime", "executorch", "eager"), strict=True):
        report = evaluate("--model-file", str(path))
        assert (report["model"], report["backend"], report["precision"]) == ("tinynet_e", backend, "fp32")
        assert report["file"] == str(path) and report["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert (report["correct1"], report["correct4"]) == (reference["correct1"], reference["correct4"]), path


@pytest.mark.slow
def test_the_journey_for_a_pip_user(installed, published, tmp_path):
    """docs/finetune.md's fine-tune-and-use commands, spelled as the docs spell them, run by a
    user who pip-installed the package, from their own project directory (not the clone):
    the model starts from the published weights (a loopback server), and the exported file
    names the fine-tuned classes with no --model."""
    from helpers import doc, readme_argv, run_checked

    readme = doc("finetune")

    def block(name):
        text = readme.split(f"<!-- finetune:{name} -->\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
        return text.strip().splitlines()

    project = installed.project
    write_dataset(project / "my_images", train=8, val=3, size=40)
    env = {"OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp_path / "torch")}  # ($GHOSTNET_HUB_MANIFEST: published)
    (train,) = block("one")
    run_checked(readme_argv(train, installed) + ["--epochs", "1", "--input-size", "32", "--batch-size", "8",
                                                  "--workers", "0", "--quiet"], cwd=project, env=env)
    predict, evaluate, export_line, predict_file = block("use")
    run_checked(readme_argv(export_line, installed) + ["--quiet"], cwd=project, env=env)
    eager = run_checked(readme_argv(predict, installed) + ["--json", "-", "--quiet"], cwd=project, env=env)
    from_file = run_checked(readme_argv(predict_file, installed) + ["--json", "-", "--quiet"], cwd=project, env=env)
    records = [[json.loads(line) for line in out.stdout.splitlines()] for out in (eager, from_file)]
    assert len(records[0]) == 12 and all(r["model"] == "tinynet_e" for r in records[0] + records[1])
    assert [r["top"][0]["label"] for r in records[1]] == [r["top"][0]["label"] for r in records[0]]
    assert {r["top"][0]["label"] for r in records[1]} <= set(CLASSES)
    onnx_file = project / "runs" / "tinynet_e" / "model.onnx"
    report = project / "report.json"
    run_checked(readme_argv(evaluate.replace("--checkpoint runs/tinynet_e/best.pth", f"--model-file {onnx_file}"),
                            installed) + ["--json", str(report), "--quiet", "--workers", "0"], cwd=project, env=env)
    measured = json.loads(report.read_text())
    assert (measured["model"], measured["backend"], measured["file"]) == ("tinynet_e", "onnxruntime", str(onnx_file))
    assert measured["images"] == 12 and "top4" in measured
