"""``python -m models finetune`` / ``finetune()``: data errors, the recipe's parts, what lands in
OUT, the result used by predict, evaluate and the builders, resume after SIGKILL, DDP against
one process, and proof that it learns (tests/stripes.py: a generated, learnable image set)."""
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image
from stripes import CLASSES, write_dataset

from models import api
from models.tools._finetune_data import DataError, TrainImages, find_splits, train_transform
from models.tools.finetune import finetune

from helpers import ROOT, cli, doc, readme_argv, readme_cli, run_models
from reference import build

# The flag with which predict and evaluate take a checkpoint file (#10 renames it --checkpoint).
CHECKPOINT_FLAG = "--checkpoint"
# Small and fast: 32 train / 12 val images of 40 px, trained at 32 px, 4 steps per epoch.
TINY = {"input_size": 32, "batch_size": 8, "workers": 0, "progress": False}


def load_with_weights(path, num_classes):
    """The package builder with a user checkpoint."""
    return api.get_model("tinynet_e", checkpoint=path, num_classes=num_classes)


def quiet(fn, *args, **kwargs):
    """fn(...) with its stdout captured: (result, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = fn(*args, **kwargs)
    return result, out.getvalue()


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("stripes-small"), train=8, val=3, size=40)


@pytest.fixture(scope="module")
def tiny_run(small_data, tmp_path_factory):
    """Two epochs of tinynet_e from scratch: (result, stdout)."""
    out = tmp_path_factory.mktemp("tiny-run")
    return quiet(finetune, model="tinynet_e", data=small_data, out=out, pretrained=False, epochs=2, **TINY)


def _plain_types_only(obj, where="checkpoint"):
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert isinstance(key, (str, int)), f"{where}: key {key!r}"
            _plain_types_only(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _plain_types_only(value, f"{where}[{i}]")
    else:
        assert obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor)), f"{where}: {type(obj)}"


# -- data -------------------------------------------------------------------------------------

def _folder(root, layout):
    for split, classes in layout.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize("layout, options, message", [
    (None, {}, "does not exist"),
    ({"": {"a": 2, "b": 2}}, {}, "needs train/ and val/ folders"),
    ({"train": {"a": 0, "b": 0}, "val": {"a": 1}}, {}, "no images in"),
    ({"train": {"a": 3}, "val": {"a": 1}}, {}, "only one class"),
    ({"train": {"a": 3, "b": 2}, "val": {"a": 1}}, {}, "class(es) missing from"),
    ({"train": {"a": 3, "b": 2}, "val": {"a": 1, "b": 1, "c": 1}}, {}, "that train/ does not have: c"),
    ({"train": {"a": 3, "b": 0}, "val": {"a": 1, "b": 1}}, {}, "class folder(s) without images"),
    ({"": {"a": 3, "b": 1}}, {"val_split": 0.2}, "class b has 1 image"),
    ({"": {"a": 3, "b": 3}}, {"val_split": 1.5}, "between 0 and 1"),
])
def test_bad_data_is_a_clear_error(tmp_path, layout, options, message):
    root = _folder(tmp_path / "data", layout) if layout else tmp_path / "missing"
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        find_splits(root, **options)


def test_bad_data_on_the_command_line(tmp_path):
    _folder(tmp_path, {"train": {"a": 2}, "val": {"a": 1}})
    result = cli("finetune", "--model", "tinynet_e", "--data", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "only one class" in result.stderr
    assert cli("finetune", "--data", str(tmp_path)).returncode == 2  # no model, no out


def test_val_split_is_seeded_and_stratified(tmp_path):
    _folder(tmp_path, {"": {"a": 10, "b": 20, "c": 5}})
    first, again, other = (find_splits(tmp_path, val_split=0.2, seed=s) for s in (0, 0, 1))
    assert first.train == again.train and first.val == again.val
    assert first.val != other.val
    held = {c: sum(1 for _, t in first.val if t == i) for i, c in enumerate(first.classes)}
    assert held == {"a": 2, "b": 4, "c": 1}
    assert not {p for p, _ in first.train} & {p for p, _ in first.val}
    assert len(first.train) + len(first.val) == 35


def test_hidden_folders_and_other_files_are_not_data(tmp_path):
    _folder(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    splits = find_splits(tmp_path)
    assert splits.classes == ["a", "b"] and len(splits.train) == 4 and len(splits.val) == 2


def test_augmentation_is_a_function_of_seed_epoch_and_image(small_data):
    splits = find_splits(small_data)
    data = TrainImages(splits.train, train_transform(48, (0.5,) * 3, (0.5,) * 3, "bilinear", 0.08, 0.5), seed=3)
    first = data[(2, 5)][1]
    torch.manual_seed(123)  # the global RNG (workers, ranks) plays no part
    data[(2, 4)]
    assert torch.equal(data[(2, 5)][1], first)
    assert not torch.equal(data[(3, 5)][1], first)  # another epoch, another crop
    assert data[(2, 5)][1].shape == (3, 48, 48)


# -- what lands in OUT ---------------------------------------------------------------------------

def test_out_holds_checkpoints_metrics_and_curves(tiny_run):
    result, stdout = tiny_run
    out = result.out
    assert sorted(p.name for p in out.iterdir()) == ["best.pth", "curves.png", "last.pth", "metrics.json"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2]
    for record in metrics["epochs"]:
        assert {"epoch", "train_loss", "val_loss", "val_top1", "lr", "seconds"} <= set(record)
    best = max(metrics["epochs"], key=lambda r: (r["val_top1"], -r["val_loss"]))
    assert (metrics["best_epoch"], metrics["best_val_top1"]) == (best["epoch"], best["val_top1"])
    assert result.best_val_top1 == metrics["best_val_top1"]
    assert [line.split()[1] for line in stdout.splitlines() if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert "from random initialisation" in stdout

    for name, epoch in (("best.pth", best["epoch"]), ("last.pth", 2)):
        checkpoint = torch.load(out / name, weights_only=True)
        _plain_types_only(checkpoint)
        assert checkpoint["epoch"] == epoch and checkpoint["classes"] == list(CLASSES)
        assert checkpoint["preprocessing"] == {"input_size": 32, "resize_size": 37, "interpolation": "bicubic",
                                               "mean": pytest.approx([0.485, 0.456, 0.406]),
                                               "std": pytest.approx([0.229, 0.224, 0.225])}
        assert checkpoint["architecture"] == {"name": "tinynet_e", "num_classes": 4}
        assert checkpoint["args"]["epochs"] == 2 and checkpoint["args"]["pretrained"] is False
    assert "resume" in torch.load(out / "last.pth", weights_only=True)


def test_the_builders_load_best_pth(tiny_run):
    best = tiny_run[0].best
    state = torch.load(best, weights_only=True)["state_dict"]
    model = load_with_weights(best, 4)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # The file names its classes: no num_classes needed (it failed with a size mismatch before).
    hub = torch.hub.load(str(ROOT), "tinynet_e", source="local", checkpoint=str(best))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hub.eval()(x), model.eval()(x), rtol=0, atol=0)
    assert hub.pretrained_weights.meta["categories"] == list(CLASSES)
    assert api.from_checkpoint(best).pretrained_weights.meta["categories"] == list(CLASSES)


def test_predict_prints_the_users_class_names(tiny_run, small_data):
    image = small_data / "val" / "vertical_warm" / "000.png"
    result = cli("predict", CHECKPOINT_FLAG, str(tiny_run[0].best), str(image), "--topk", "4", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["model"] == "tinynet_e" and sorted(t["label"] for t in record["top"]) == sorted(CLASSES)
    plain = tiny_run[0].out.parent / "plain.pth"
    torch.save(build("tinynet_e").state_dict(), plain)
    refused = cli("predict", CHECKPOINT_FLAG, str(plain), str(image))
    # A plain state dict names no model: --checkpoint then needs --model (and has no class names).
    assert refused.returncode == 2 and "plain state dict that does not name its model" in refused.stderr


def test_evaluate_reproduces_best_val_top1(tiny_run, small_data, tmp_path):
    report = tmp_path / "report.json"
    result = cli("evaluate", CHECKPOINT_FLAG, str(tiny_run[0].best), "--data", str(small_data / "val"), "--quiet",
                 "--workers", "0", "--json", str(report))
    assert result.returncode == 0, result.stderr
    measured = json.loads(report.read_text())
    assert measured["images"] == 12 and measured["top1"] == pytest.approx(tiny_run[0].best_val_top1, abs=1e-9)


# -- starting points and options --------------------------------------------------------------------

STILL = {"epochs": 1, "lr": 1e-9, "min_lr": 0.0, "weight_decay": 0.0, **TINY}  # training that moves nothing


@pytest.mark.slow
def test_default_starts_from_the_published_weights(published, small_data, tmp_path):
    server, files = published  # (one server for the session: count this test's requests)
    before = len(server.hits)
    result, stdout = quiet(finetune, model="tinynet_e", data=small_data, out=tmp_path, **STILL)
    served = torch.load(io.BytesIO(files["tinynet_e"]), weights_only=True)
    trained = torch.load(result.last, weights_only=True)["state_dict"]
    for key in ("conv_stem.weight", "blocks.3.0.conv_pw.weight", "conv_head.weight"):
        torch.testing.assert_close(trained[key], served[key], rtol=0, atol=1e-6)
    assert trained["classifier.weight"].shape == (4, 1280)
    assert [h.path for h in server.hits[before:]] == ["/tinynet_e"]
    assert "from the published tinynet_e weights, new 4-class head" in stdout


@pytest.mark.slow
def test_checkpoint_start_keeps_a_matching_head_and_replaces_another(tiny_run, small_data, tmp_path):
    source = torch.load(tiny_run[0].best, weights_only=True)["state_dict"]
    result, stdout = quiet(finetune, model="tinynet_e", data=small_data, out=tmp_path / "a",
                           checkpoint=str(tiny_run[0].best), **STILL)
    trained = torch.load(result.last, weights_only=True)["state_dict"]
    for key in ("conv_stem.weight", "classifier.weight"):
        torch.testing.assert_close(trained[key], source[key], rtol=0, atol=1e-6)
    assert f"from your checkpoint {tiny_run[0].best};" in stdout

    imagenet = build("tinynet_e").state_dict()  # a plain 1000-class state dict
    torch.save({"state_dict": imagenet}, tmp_path / "imagenet.pth")
    result, stdout = quiet(finetune, model="tinynet_e", data=small_data, out=tmp_path / "b",
                           checkpoint=str(tmp_path / "imagenet.pth"), **STILL)
    trained = torch.load(result.last, weights_only=True)["state_dict"]
    torch.testing.assert_close(trained["conv_stem.weight"], imagenet["conv_stem.weight"], rtol=0, atol=1e-6)
    assert trained["classifier.weight"].shape == (4, 1280) and "new 4-class head" in stdout


@pytest.mark.slow
def test_freeze_backbone_trains_only_the_head(tiny_run, small_data, tmp_path):
    source = torch.load(tiny_run[0].best, weights_only=True)["state_dict"]
    result, _ = quiet(finetune, model="tinynet_e", data=small_data, out=tmp_path, checkpoint=str(tiny_run[0].best),
                      freeze_backbone=True, epochs=1, lr=1e-2, **TINY)
    trained = torch.load(result.last, weights_only=True)["state_dict"]
    changed = [k for k in source if not torch.equal(source[k], trained[k])]
    assert changed == ["classifier.weight", "classifier.bias"]  # BatchNorm statistics included


@pytest.mark.slow
def test_gradient_accumulation_equals_the_whole_batch(tiny_run, small_data, tmp_path):
    # A linear probe without dropout: the head's gradient is an average over the images, so two
    # accumulated micro-batches of 4 must give the step one batch of 8 gives (SGD: the update is
    # the gradient, with nothing that magnifies rounding).
    common = {"checkpoint": str(tiny_run[0].best), "freeze_backbone": True, "drop_rate": 0.0, "epochs": 1,
              "opt": "sgd", "lr": 0.1, **TINY}
    whole, _ = quiet(finetune, model="tinynet_e", data=small_data, out=tmp_path / "whole", **common)
    accumulated, _ = quiet(finetune, model="tinynet_e", data=small_data, out=tmp_path / "acc", accum_steps=2,
                           **common)
    a = torch.load(whole.last, weights_only=True)["state_dict"]
    b = torch.load(accumulated.last, weights_only=True)["state_dict"]
    assert not torch.equal(a["classifier.weight"], torch.load(tiny_run[0].best)["state_dict"]["classifier.weight"])
    torch.testing.assert_close(b["classifier.weight"], a["classifier.weight"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_amp_bfloat16_on_cpu(small_data, tmp_path):
    result, stdout = quiet(finetune, model="tinynet_e", data=small_data, out=tmp_path, pretrained=False, epochs=1,
                           amp=True, **TINY)
    assert "bfloat16 autocast" in stdout and torch.isfinite(torch.tensor(result.epochs[0]["train_loss"]))


@pytest.mark.slow
def test_unreadable_images_are_reported_and_skipped(small_data, tmp_path):
    data = shutil.copytree(small_data, tmp_path / "data")
    (data / "train" / "vertical_cool" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "val" / "horizontal_warm" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    result = cli("finetune", "--model", "tinynet_e", "--data", str(data), "--out", str(tmp_path / "out"),
                 "--no-pretrained", "--epochs", "2", "--input-size", "48", "--batch-size", "11", "--workers", "0",
                 "--quiet")
    assert result.returncode == 0, result.stderr
    skipped = [line for line in result.stderr.splitlines() if line.startswith("rank 0: skipped ")]
    assert len(skipped) == 2  # each once, not once per epoch
    assert "train/vertical_cool/broken.png: UnidentifiedImageError" in skipped[0]
    assert "val/horizontal_warm/broken.jpg: UnidentifiedImageError" in skipped[1]
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())["epochs"][0]
    assert (record["val_images"], record["val_skipped"]) == (12, 1)
    assert record["train_images"] + record["train_skipped"] == 33  # 3 batches of 11, the broken one left out


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 6, "accum_steps": 4}, "must divide by the number of processes times --accum-steps"),
    ({"batch_size": 64}, "32 training images do not fill one batch of 64"),
    ({"checkpoint": "x.pth", "pretrained": False}, "contradict"),
    ({"lr_max": 1.0}, "unexpected option"),
    ({"model": "ghostnet_1_3x"}, "ghostnet_1_3x has no published weights to start from: train it from scratch"),
])
def test_bad_options_are_clear_errors(small_data, tmp_path, options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        finetune(**{"model": "tinynet_e", "data": small_data, "out": tmp_path, **TINY, **options})


def test_drop_path_rate(small_data, tmp_path):
    run = lambda: quiet(finetune, model="tinynet_e", data=small_data, out=tmp_path, pretrained=False,  # noqa: E731
                        epochs=1, drop_path_rate=0.1, **TINY)
    if "drop_path_rate" in api.get_variant("tinynet_e").options:  # once the models have stochastic depth
        result, _ = run()
        assert torch.load(result.best, weights_only=True)["architecture"]["drop_path_rate"] == 0.1
    else:
        with pytest.raises(ValueError, match="tinynet_e has no stochastic depth"):
            run()


def test_resume_refuses_other_settings_and_finished_runs_stay_finished(tiny_run, small_data):
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        finetune(resume=tiny_run[0].out, lr=0.5)
    with pytest.raises(ValueError, match="already holds a run"):  # a new run does not overwrite an old one
        finetune(model="tinynet_e", data=small_data, out=tiny_run[0].out)
    before = tiny_run[0].last.read_bytes()
    result, stdout = quiet(finetune, resume=tiny_run[0].out, progress=False)
    assert result.best_val_top1 == tiny_run[0].best_val_top1
    assert not [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert tiny_run[0].last.read_bytes() == before


# -- resume, DDP, learning (slow) ---------------------------------------------------------------------

def _state(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _max_difference(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


SERIAL = {"OMP_NUM_THREADS": "1"}  # the same kernels in every process of these comparisons


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(small_data, tmp_path):
    args = ["finetune", "--model", "tinynet_e", "--data", str(small_data), "--no-pretrained", "--epochs", "3",
            "--input-size", "48", "--batch-size", "8", "--workers", "0", "--quiet"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "models", *args, "--out", str(killed)], cwd=ROOT,
                               env={**os.environ, **SERIAL}, stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("epoch 1/3"):
            process.send_signal(signal.SIGKILL)  # during epoch 2
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert torch.load(killed / "last.pth", weights_only=True)["epoch"] == 1

    resumed = run_models("finetune", "--resume", str(killed), "--quiet", env=SERIAL)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1" in resumed.stdout and "epoch 1/3" not in resumed.stdout
    straight = run_models(*args, "--out", str(tmp_path / "straight"), env=SERIAL)
    assert straight.returncode == 0, straight.stderr
    a, b = _state(killed / "last.pth"), _state(tmp_path / "straight" / "last.pth")
    assert _max_difference(a, b) <= 1e-6
    curves = [[value for r in json.loads((out / "metrics.json").read_text())["epochs"]
               for value in (r["train_loss"], r["val_loss"], r["val_top1"])] for out in (killed, tmp_path / "straight")]
    assert len(curves[0]) == 9 and curves[0] == pytest.approx(curves[1], rel=1e-5)


README = doc("finetune")  # docs/finetune.md, where the README points for fine-tuning
# Appended to the README's commands in the tests: small and fast, 2 epochs of 2 steps (so the
# sampler's reshuffle per epoch counts), and no dropout, whose masks depend on the process (the
# augmentation does not: it is seeded per image). SGD at a small rate, not AdamW: AdamW divides
# each gradient by its own running RMS, so parameters whose gradient is zero in theory (a bias
# that a BatchNorm follows) move by the full rate on float noise alone, as much between two
# one-process runs with different thread counts as between one process and two.
FAST = ["--epochs", "2", "--input-size", "64", "--batch-size", "16", "--workers", "0", "--drop-rate", "0", "--quiet",
        "--opt", "sgd", "--lr", "1e-3"]
# The largest difference of any weight or BatchNorm statistic, 2 processes vs 1: float sums in another
# order. 1.03e-5 on an AVX2 EPYC (under 1e-5 on the AVX-512 Xeon before); without --sync-bn it is ~1.
TOLERANCE = 1e-4


def readme_commands(name):
    block = README.split(f"<!-- finetune:{name} -->\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.strip().splitlines()]


@pytest.mark.slow
def test_readme_commands_and_two_processes_equal_one(published, small_data, tmp_path, monkeypatch):
    server, _ = published  # (one server for the session: count this test's requests)
    before = len(server.hits)
    shutil.copytree(small_data, tmp_path / "my_images")
    env = {**os.environ, "PYTHONPATH": str(ROOT), **SERIAL}
    run = lambda words: subprocess.run(readme_argv(words), cwd=tmp_path, env=env, capture_output=True,  # noqa: E731
                                       text=True, timeout=300)
    (torchrun,) = readme_commands("torchrun")
    (single,) = readme_commands("one")
    assert "--sync-bn" in torchrun and "--nproc_per_node" in torchrun

    two = run(torchrun + FAST)
    assert two.returncode == 0, two.stderr
    hits = [(h.path, h.status, h.range) for h in server.hits[before:]]
    assert hits == [("/tinynet_e", 200, None)], (hits, two.stderr)  # one download for both processes
    assert [line.split()[1] for line in two.stdout.splitlines() if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert "2 process(es) on cpu, global batch 16 (8 per process" in two.stdout and "synchronised" in two.stdout
    one = run(single + FAST + ["--sync-bn", "--out", "runs/one"])
    assert one.returncode == 0, one.stderr
    assert "1 process(es) on cpu, global batch 16 (16 per process" in one.stdout
    # Without --sync-bn each process normalises by its own half-batch: a different training.
    unsynced = run([w for w in torchrun if w != "--sync-bn"] + FAST + ["--out", "runs/unsynced"])
    assert unsynced.returncode == 0, unsynced.stderr
    ddp, reference = _state(tmp_path / "runs/tinynet_e/last.pth"), _state(tmp_path / "runs/one/last.pth")
    difference = _max_difference(ddp, reference)
    without_sync_bn = _max_difference(_state(tmp_path / "runs/unsynced/last.pth"), reference)
    print(f"largest difference, 2 processes vs 1 after 4 steps: {difference:.2e}; without --sync-bn "
          f"{without_sync_bn:.2e}")
    assert difference <= TOLERANCE < without_sync_bn / 100

    monkeypatch.chdir(tmp_path)
    (resume,) = readme_commands("resume")
    resumed = readme_cli(resume, "--epochs", "3")  # one epoch more, now in one process
    assert resumed.returncode == 0, resumed.stderr
    assert [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("epoch ")] == ["3/3"]
    metrics = json.loads((tmp_path / "runs/tinynet_e/metrics.json").read_text())
    predict, evaluate, export, predict_file = readme_commands("use")
    predicted = readme_cli(predict, "--topk", "1", "--quiet")
    assert predicted.returncode == 0, predicted.stderr
    labels = [line.split()[1] for line in predicted.stdout.splitlines() if line.startswith("  1.")]
    assert len(labels) == 12 and set(labels) <= set(CLASSES)
    evaluated = readme_cli(evaluate, "--quiet", "--workers", "0")
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"top-1 {metrics['best_val_top1']:.3f} %" in evaluated.stdout
    assert readme_cli(export, "--quiet").returncode == 0  # no model name: the checkpoint names it
    from_file = readme_cli(predict_file, "--topk", "1", "--quiet")
    assert from_file.returncode == 0, from_file.stderr
    assert [line.split()[1] for line in from_file.stdout.splitlines() if line.startswith("  1.")] == labels

    block = re.search(r"```python\n(import models\nfrom models.tools.finetune import finetune\n.*?)```", README,
                      re.S)[1]
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(block, "docs/finetune.md", "exec"), namespace)
    assert namespace["result"].classes == list(CLASSES) and namespace["model"].num_classes == 4
    assert namespace["same"].pretrained_weights.meta["categories"] == list(CLASSES)
    assert len(server.hits) == before + 1  # the cache served every later run


@pytest.mark.slow
def test_workers_do_not_change_the_result(tiny_run, small_data, tmp_path):
    # Each image's crop is seeded by (seed, epoch, index): DataLoader worker processes, persistent
    # across epochs, must produce the very tensors the main process does.
    result, _ = quiet(finetune, model="tinynet_e", data=small_data, out=tmp_path, pretrained=False, epochs=2,
                      **{**TINY, "workers": 2})
    assert _max_difference(_state(result.last), _state(tiny_run[0].last)) == 0.0


@pytest.mark.slow
def test_tinynet_e_learns_from_scratch_and_predict_agrees(tmp_path, monkeypatch):
    # The figure commands of docs/finetune.md, as written (the data: 4 classes, 32 train and 12 val images
    # each, drawn apart); --workers 0 only saves starting processes (see the test above).
    make_data, train = readme_commands("figure")
    assert make_data[1] == "tests/stripes.py" and "--no-pretrained" in train
    made = subprocess.run(readme_argv([make_data[0], str(ROOT / make_data[1]), *make_data[2:]]), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    monkeypatch.chdir(tmp_path)
    result = readme_cli(train, "--workers", "0", "--quiet")
    assert result.returncode == 0, result.stderr
    data, out = tmp_path / train[train.index("--data") + 1], tmp_path / train[train.index("--out") + 1]
    metrics = json.loads((out / "metrics.json").read_text())
    first, last = metrics["epochs"][0], metrics["epochs"][-1]
    print(f"tinynet_e from scratch: val top-1 {first['val_top1']:.1f} % -> best {metrics['best_val_top1']:.1f} % "
          f"(epoch {metrics['best_epoch']}), last {last['val_top1']:.1f} %, "
          f"{sum(r['seconds'] for r in metrics['epochs']):.0f} s of training")
    assert metrics["best_val_top1"] >= 90.0 and last["val_top1"] >= 90.0
    assert last["train_loss"] < first["train_loss"] / 2 and first["val_top1"] <= 50.0

    # The round trip: best.pth -> predict, whose top-1 on each val image is the folder's class.
    predicted = cli("predict", CHECKPOINT_FLAG, str(out / "best.pth"), str(data / "val"), "--topk", "1", "--json",
                    "--workers", "0")
    assert predicted.returncode == 0, predicted.stderr
    records = [json.loads(line) for line in predicted.stdout.splitlines()]
    correct = sum(r["top"][0]["label"] == r["image"].split("/")[-2] for r in records)
    assert len(records) == 48 and 100.0 * correct / 48 == pytest.approx(metrics["best_val_top1"])


def test_checkpoint_sha256_is_checked_for_a_finetune_checkpoint_too(tmp_path):
    """--checkpoint-sha256 was ignored when the file was one finetune wrote (the file was read,
    unpickled and loaded whatever its checksum)."""
    import hashlib

    from models.description import preprocessing_for
    from models.tools._finetuned import FORMAT, save_checkpoint
    from models.weights import CheckpointError

    path = tmp_path / "best.pth"
    net = build("tinynet_e", num_classes=2)
    save_checkpoint(path, {"architecture": {"name": "tinynet_e", "num_classes": 2}, "classes": ["a", "b"],
                           "preprocessing": preprocessing_for("tinynet_e"), "epoch": 1, "val_top1": None,
                           "state_dict": net.state_dict()})
    assert torch.load(path, weights_only=True)["format"] == FORMAT
    right = hashlib.sha256(path.read_bytes()).hexdigest()
    # (a checkpoint of an earlier version, without a description: its facts are read all the same)
    assert api.from_checkpoint(path, checkpoint_sha256=right).pretrained_weights.classes == ("a", "b")
    with pytest.raises(CheckpointError, match="does not match the expected checksum"):
        api.from_checkpoint(path, checkpoint_sha256="0" * 64)
    result = cli("predict", str(ROOT / "examples" / "chelsea.jpg"), "--checkpoint", str(path),
                 "--checkpoint-sha256", "0" * 64)
    assert result.returncode != 0 and "does not match the expected checksum" in result.stderr
    assert "Traceback" not in result.stderr
