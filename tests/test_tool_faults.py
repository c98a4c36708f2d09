"""``finetune`` and ``predict`` under the faults real users meet: unreadable data, bad numbers,
a loss that diverges, batches shrunk to one image, damaged checkpoints to resume from, one class
name in two Unicode spellings, a FIFO among the images. Each is a row of docs/weights.md's "What happens
when…" table (tests/faults.py); none may end in a traceback."""
import json
import os
import shutil
import subprocess
import sys
import unicodedata

import pytest
import torch
from PIL import Image
from stripes import write_dataset

from models import api
from models.tools._finetune_data import DataError, find_splits
from models.tools.finetune import finetune

from faults import fault
from helpers import ROOT, cli, run_models

TINY = ["--model", "tinynet_e", "--no-pretrained", "--epochs", "1", "--input-size", "32", "--batch-size", "8",
        "--workers", "0", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    """32 train / 12 val images of 40 px in 4 classes (tests/stripes.py)."""
    return write_dataset(tmp_path_factory.mktemp("stripes"), train=8, val=3, size=40)


@pytest.fixture
def data(stripes, tmp_path):
    """A copy of ``stripes`` this test may damage."""
    return shutil.copytree(stripes, tmp_path / "data")


@pytest.fixture(scope="module")
def finished(stripes, tmp_path_factory):
    """A finished one-epoch run: its OUT folder (best.pth, last.pth, ...)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = cli("finetune", "--data", str(stripes), "--out", str(out), *TINY)
    assert result.returncode == 0, result.stderr
    return out


def _break(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n not an image")


def _finetune(data, out, *options):
    result = cli("finetune", "--data", str(data), "--out", str(out), *TINY, *options)
    assert "Traceback" not in result.stderr
    return result


# -- unreadable data ------------------------------------------------------------------------------

@fault("`finetune`: every training image of a class (or of all classes) is unreadable",
       "an error before any epoch naming the class and a file with its error; nothing is written to OUT")
def test_a_class_without_a_readable_image_stops_before_any_epoch(data, tmp_path):
    for image in (data / "train" / "vertical_warm").iterdir():
        _break(image)
    result = _finetune(data, tmp_path / "out")
    assert result.returncode == 2 and "epoch 1/1" not in result.stdout
    assert "no readable training image in class vertical_warm" in result.stderr
    assert "UnidentifiedImageError" in result.stderr and not (tmp_path / "out" / "best.pth").exists()
    for image in (data / "train").rglob("*.png"):
        _break(image)
    result = _finetune(data, tmp_path / "out")
    assert result.returncode == 2 and "no readable training image in class horizontal_cool" in result.stderr


@fault("`finetune`: more than `--max-skipped` (default 10 %) of an epoch's images are unreadable",
       "the run stops at the end of that epoch, before its checkpoints are written, naming the share and the "
       "option; below it, the share is printed on each epoch's line and kept in metrics.json")
@pytest.mark.slow  # two fine-tuning runs
def test_too_many_unreadable_images_stop_the_run(data, tmp_path):
    for name in ("000.png", "001.png"):
        for cls in ("horizontal_cool", "vertical_cool"):
            _break(data / "train" / cls / name)  # 4 of 32: 12.5 %
    stopped = _finetune(data, tmp_path / "a")
    assert stopped.returncode == 2, stopped.stderr
    assert "4 of 32 training images (12.5 %) could not be read" in stopped.stderr
    assert "--max-skipped 0.1" in stopped.stderr and not (tmp_path / "a" / "best.pth").exists()
    allowed = _finetune(data, tmp_path / "b", "--max-skipped", "0.2")
    assert allowed.returncode == 0, allowed.stderr
    assert "skipped 4 of 32 training images (12.5 %)" in allowed.stdout
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["epochs"][0]["train_skipped"] == 4


@fault("`finetune`: skipping an unreadable image leaves a batch of one (BatchNorm cannot train on it)",
       "that image is left out of the step, and the epoch's line says so; `--batch-size` giving micro-batches "
       "of one is refused before training (unless `--freeze-backbone`)")
@pytest.mark.slow  # an epoch of 16 steps
def test_a_batch_of_one_is_never_trained_on(data, tmp_path):
    _break(data / "train" / "vertical_warm" / "003.png")  # 1 of 32: one batch of 2 keeps a single image
    result = _finetune(data, tmp_path / "a", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    assert "1 lone image left out (a batch of one)" in result.stdout
    refused = _finetune(data, tmp_path / "b", "--batch-size", "1")
    assert refused.returncode == 2 and "at least 2 images per micro-batch" in refused.stderr
    assert not (tmp_path / "b").exists()


# -- numbers ------------------------------------------------------------------------------------

@fault("`finetune --lr inf`, `--weight-decay nan`, `--momentum nan`, `--label-smoothing 1`, ...",
       "refused when the arguments are parsed (and by `finetune()`), naming the option and its range; nothing "
       "is trained")
@pytest.mark.parametrize("option, value", [
    ("--lr", "inf"), ("--lr", "0"), ("--lr", "nan"), ("--weight-decay", "nan"), ("--weight-decay", "-1"),
    ("--momentum", "nan"), ("--momentum", "1.5"), ("--min-lr", "inf"), ("--warmup-epochs", "nan"),
    ("--label-smoothing", "1"), ("--min-scale", "0"), ("--hflip", "2"), ("--drop-rate", "nan"),
    ("--max-skipped", "-0.1"),
])
def test_non_finite_or_out_of_range_numbers_are_refused(stripes, tmp_path, option, value):
    result = _finetune(stripes, tmp_path / "out", "--opt", "sgd", option, value)
    assert result.returncode == 2 and f"argument {option}: " in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=option.lstrip("-").replace("-", "_")):
        finetune(model="tinynet_e", data=stripes, out=tmp_path / "api", **{option.lstrip("-").replace("-", "_"):
                                                                            float(value)})


@fault("`finetune`: the loss becomes NaN or infinite (a learning rate of 1e30)",
       "the run stops at that step, naming the epoch, the step and `--lr`; a model with non-finite weights or "
       "validation loss is never written as best.pth or last.pth")
def test_a_diverging_run_stops_and_writes_no_broken_model(stripes, tmp_path):
    result = _finetune(stripes, tmp_path / "out", "--lr", "1e30")
    assert result.returncode == 2, result.stderr
    assert "epoch 1, step" in result.stderr and "not finite" in result.stderr and "--lr" in result.stderr
    assert not (tmp_path / "out" / "best.pth").exists() and not (tmp_path / "out" / "last.pth").exists()


# -- resume ---------------------------------------------------------------------------------------

@fault("`finetune --resume OUT` when OUT/last.pth is truncated, empty or not finetune's",
       "one error naming the file and what is wrong, and how to go on from best.pth when it is intact; nothing "
       "is overwritten, no traceback")
@pytest.mark.parametrize("damage", [pytest.param("truncated", marks=pytest.mark.slow), "empty", "foreign"])
def test_resume_from_a_damaged_last_pth(finished, tmp_path, damage):
    out = shutil.copytree(finished, tmp_path / "run")
    last = out / "last.pth"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:100_000])
    elif damage == "empty":
        last.write_bytes(b"")
    else:
        torch.save({"conv_stem.weight": torch.zeros(1)}, last)
    damaged, best = last.read_bytes(), (out / "best.pth").read_bytes()
    result = run_models("finetune", "--resume", str(out), "--quiet") if damage == "truncated" else \
        cli("finetune", "--resume", str(out), "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot resume from {last}" in result.stderr
    what = {"truncated": "not a readable torch checkpoint", "empty": "is empty",
            "foreign": "was not written by finetune"}[damage]
    assert what in result.stderr
    assert f"--checkpoint {out / 'best.pth'}" in result.stderr and "epoch 1" in result.stderr
    assert last.read_bytes() == damaged and (out / "best.pth").read_bytes() == best
    (out / "best.pth").write_bytes(b"")
    neither = cli("finetune", "--resume", str(out), "--quiet")
    assert neither.returncode == 2 and "no intact checkpoint" in neither.stderr


# -- class names ------------------------------------------------------------------------------

def _images(folder, count=2):
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")


@fault("One class folder is spelled in Unicode NFC (`café`, as Windows and Linux write it) and another, or "
       "the val/ folder, in NFD (as macOS wrote it)",
       "folder names are read as NFC, so the spellings are one class (the run says so); two folders that "
       "differ only so are refused, naming both")
def test_nfc_and_nfd_spellings_are_one_class(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    for split, name in (("train", nfd), ("val", nfc)):
        _images(tmp_path / "a" / split / name)
        _images(tmp_path / "a" / split / "tea")
    splits = find_splits(tmp_path / "a")
    assert splits.classes == [nfc, "tea"] and "read as Unicode NFC" in splits.description
    for name in (nfc, nfd, "tea"):
        _images(tmp_path / "b" / name)
    with pytest.raises(DataError, match="the same class name in two Unicode spellings"):
        find_splits(tmp_path / "b", val_split=0.5)


# -- predict ----------------------------------------------------------------------------------------

@fault("`predict` is given a FIFO, `/dev/zero` or a directory holding a FIFO named like an image",
       "only regular files are read: each other one is reported and skipped (never a hang, never an endless "
       "read), the images are classified, exit status 1")
@pytest.mark.slow  # a new process: a FIFO that hangs is bounded there
def test_predict_reports_and_skips_what_is_not_a_regular_file(stripes, tmp_path):
    checkpoint = tmp_path / "e.pth"
    torch.save(api.get_model("tinynet_e").state_dict(), checkpoint)
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(stripes / "val" / "vertical_warm" / "000.png", folder / "real.png")
    os.mkfifo(folder / "pipe.jpg")
    os.mkfifo(tmp_path / "given.png")
    command = [sys.executable, "-m", "models", "predict", "--model", "tinynet_e", "--checkpoint", str(checkpoint),
               "--quiet", "--json", "-", str(folder), str(tmp_path / "given.png"), "/dev/zero"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    records = {os.path.basename(r["image"]): r for r in map(json.loads, result.stdout.splitlines())}
    assert "top" in records["real.png"]
    for name, kind in (("pipe.jpg", "a FIFO"), ("given.png", "a FIFO"), ("zero", "a character device")):
        assert kind in records[name]["error"], records[name]
    assert "3 of 4 image(s) could not be read" in result.stderr

