"""``python -m models finetune`` / ``finetune()``: data errors, the recipe's parts, what lands in
OUT, the result used by predict, evaluate and the builders, resume after SIGKILL, DDP against
one process, and proof that it learns (tests/stripes.py: a generated, learnable image set)."""
import io
import json
import shutil

import pytest
import torch
from finetuning import TINY, quiet
from PIL import Image
from stripes import CLASSES

from models import api
from models.tools._finetune_data import DataError, TrainImages, find_splits, train_transform
from models.tools.finetune import finetune

from helpers import ROOT, cli
from reference import build

# The flag with which predict and evaluate take a checkpoint file (#10 renames it --checkpoint).
CHECKPOINT_FLAG = "--checkpoint"


def load_with_weights(path, num_classes):
    """The package builder with a user checkpoint."""
    return api.get_model("tinynet_e", checkpoint=path, num_classes=num_classes)


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
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # The file names its classes: no num_classes needed (it failed with a size mismatch before).
    hub = torch.hub.load(str(ROOT), "tinynet_e", source="local", checkpoint=str(best))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hub.eval()(x), model.eval()(x), rtol=0, atol=0)
    assert hub.pretrained_weights.meta["categories"] == list(CLASSES)
    assert api.from_checkpoint(best).pretrained_weights.meta["categories"] == list(CLASSES)


def test_predict_prints_the_users_class_names(tiny_run, small_data):
    image = small_data / "val" / "vertical_warm" / "000.png"
    result = cli("predict", CHECKPOINT_FLAG, str(tiny_run[0].best), str(image), "--topk", "4", "--json", "-")
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


@pytest.mark.slow  # a fine-tuning run to read one number from its checkpoint
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
