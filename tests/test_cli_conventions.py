"""The command line as a torchvision/timm user tries it: --checkpoint for every model (also the
GhostNets without released weights), --model offering what can be loaded, top-k labelled with
the k used, --version, and skip messages kept out of the progress bar."""
import argparse
import collections
import json
import re

import pytest
import torch
from PIL import Image

import models

from helpers import cli
from reference import build

TABBY = 281


@pytest.fixture
def imagefolder(tmp_path):
    """Three class folders (sorted: 0 cats, 1 dogs, 2 owls), two images each, one broken file."""
    root = tmp_path / "data"
    for name in ("cats", "dogs", "owls"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40 + i, 40), (30 * i, 60, 90)).save(root / name / f"{i}.png")
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff not an image")
    return root


def _checkpoint(tmp_path, name, num_classes, winner):
    """A checkpoint of ``name`` whose logits always rank ``winner`` first, then the others in order."""
    state = build(name, num_classes=num_classes).state_dict()
    state["classifier.weight"] = torch.zeros_like(state["classifier.weight"])
    state["classifier.bias"] = -torch.arange(num_classes, dtype=torch.float32)
    state["classifier.bias"][winner] = 10.0
    path = tmp_path / f"{name}-{num_classes}.pth"
    torch.save({"state_dict": state}, path)
    return path


@pytest.mark.parametrize("name", ["ghostnet_0_5x", "ghostnet_1_3x", "tinynet_e"])
def test_evaluate_a_checkpoint_of_any_model_with_three_classes(imagefolder, tmp_path, name):
    path = _checkpoint(tmp_path, name, 3, winner=1)
    out = tmp_path / "report.json"
    result = cli("evaluate", "--model", name, "--data", str(imagefolder), "--checkpoint", str(path),
                 "--num-classes", "3", "--workers", "0", "--quiet", "--json", str(out))
    assert result.returncode == 1, result.stderr  # (the broken image)
    assert "no released weights" not in result.stderr
    report = json.loads(out.read_text())
    assert (report["images"], report["correct1"], report["correct3"], report["top_k"]) == (6, 2, 6, 3)
    assert "correct5" not in report and "top5" not in report  # with 3 classes the key says top-3
    assert report["published_top1"] is None
    assert "  top-3 100.000 %" in result.stdout and "top-5" not in result.stdout  # the k actually used


def test_evaluate_and_predict_old_flag_names_the_new_one(imagefolder, tmp_path):
    for command in (["evaluate", "--model", "tinynet_e", "--data", str(imagefolder)], ["predict"]):
        result = cli(*command, "--weights", "mine.pth")
        assert result.returncode == 2 and "--weights is now --checkpoint" in result.stderr


def test_predict_offers_what_can_be_loaded(tmp_path):
    usage = cli("predict", "--help").stdout
    offered = re.search(r"--model \{([\w,]+)\}", usage)[1].split(",")
    assert offered == models.list_models(pretrained=True)
    refused = cli("predict", "--model", "ghostnet_1_3x")
    assert refused.returncode == 2
    assert "'ghostnet_1_3x' has no released weights" in refused.stderr and "--checkpoint" in refused.stderr
    assert cli("predict", "--model", "resnet50").returncode == 2
    # With --checkpoint, any model: labels from the checkpoint's classes.
    path = _checkpoint(tmp_path, "ghostnet_1_3x", 3, winner=2)
    result = cli("predict", "--model", "ghostnet_1_3x", "--checkpoint", str(path), "--num-classes", "3",
                 "--json", "-", "--quiet")
    assert result.returncode == 0, result.stderr
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert [t["label"] for t in record["top"]] == ["class 2", "class 0", "class 1"]  # top-5 of 3: three
    imagenet = _checkpoint(tmp_path, "ghostnet_0_5x", 1000, winner=TABBY)
    result = cli("predict", "--model", "ghostnet_0_5x", "--checkpoint", str(imagenet), "--topk", "1", "--quiet")
    assert result.returncode == 0 and result.stdout.splitlines()[1].split()[:2] == ["1.", "tabby"]


def test_num_classes_without_a_checkpoint_is_an_error():
    result = cli("predict", "--num-classes", "3")
    assert result.returncode == 2 and "--num-classes applies to the file given with --checkpoint" in result.stderr


def test_version():
    from models import __version__

    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ghostnet-hub {__version__}"


def _lines_outside_the_bar(stderr, marker):
    """The stderr lines that contain ``marker``, as a terminal shows them (after the last \\r)."""
    return [line.split("\r")[-1] for line in stderr.split("\n") if marker in line]


def test_skip_messages_stay_out_of_the_progress_bar(imagefolder, serve_fixed_logits):
    serve_fixed_logits("tinynet_e", {0: 10.0})
    result = cli("predict", str(imagefolder), "--model", "tinynet_e", "--batch-size", "2")
    assert result.returncode == 1 and "img/s" in result.stderr  # the bar was drawn
    (skipped,) = _lines_outside_the_bar(result.stderr, "skipped")
    assert skipped.startswith(str(imagefolder / "dogs" / "broken.jpg") + ": skipped")
    (imagenet := imagefolder.parent / "imagenet").mkdir()  # evaluate: class folders named by WordNet id
    for wnid, folder in zip(("n01440764", "n01443537", "n01484850"), ("cats", "dogs", "owls"), strict=True):
        (imagefolder / folder).rename(imagenet / wnid)
    evaluated = cli("evaluate", "--model", "tinynet_e", "--data", str(imagenet), "--batch-size", "2",
                    "--workers", "0")
    assert evaluated.returncode == 1 and "img/s" in evaluated.stderr
    (skipped,) = _lines_outside_the_bar(evaluated.stderr, "skipped " + str(imagenet))
    assert skipped.startswith("rank 0: skipped ")


def _options(parser, command=()):
    """(command, action) for every option of ``parser`` and its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*command, name))
        else:
            yield " ".join(command), action


def test_an_option_means_one_thing_in_every_command():
    """An option that several commands take is the same kind of option in each (a switch, or a
    value of the same type): #22 found --json a switch in predict and a file in evaluate and
    benchmark, and --amp a switch in two and a dtype in one."""
    from models.tools import cli as commands

    kinds = collections.defaultdict(dict)
    for command, action in _options(commands.build_parser()):
        for option in action.option_strings:
            kind = getattr(action.type, "__name__", action.type)
            kinds[option][command] = (type(action).__name__, action.nargs, kind)
    assert {"predict", "evaluate", "benchmark"} <= set(kinds["--json"]) and len(kinds["--amp"]) >= 3
    mixed = {option: by for option, by in kinds.items() if len(set(by.values())) > 1}
    assert not mixed, f"options of different kinds under one name: {mixed}"


def test_json_dash_is_standard_output_and_an_existing_image_is_not_taken_for_the_file(tmp_path):
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    before = image.read_bytes()
    refused = cli("predict", "--json", str(image), "--model", "tinynet_e")
    assert refused.returncode == 2 and "is not a .json/.jsonl file" in refused.stderr
    assert image.read_bytes() == before
    for command in (["predict", str(image)], ["evaluate", "--data", str(tmp_path)], ["benchmark"]):
        assert "(-: to standard output, instead of the text)" in " ".join(cli(*command, "--help").stdout.split())
