"""``python -m models evaluate``: exact counts on a synthetic ImageFolder, one process and
``torchrun --nproc_per_node 2`` (gloo), and clear errors on bad data."""
import json
import sys

import pytest
import torch
from PIL import Image

from helpers import PER_CLASS, ROOT, cli, run_models
from reference import build


def _evaluate(*args, torchrun=0, **kwargs):
    args = ("evaluate", "--model", "tinynet_e", "--quiet", "--workers", "1", *args)
    if not torchrun:
        return cli(*args)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    return run_models(*args, launcher=launcher, env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, timeout=120,
                      **kwargs)


@pytest.mark.slow
def test_one_process_and_torchrun_agree_exactly(imagefolder, class_one_always_wins, tmp_path):
    reports = {}
    for procs in (2, 0):  # torchrun first, on an empty cache: its two ranks share one download
        out = tmp_path / f"report-{procs}.json"
        result = _evaluate("--data", str(imagefolder), "--batch-size", "2", "--json", str(out), torchrun=procs)
        assert result.returncode == 1, result.stderr  # one unreadable image: reported, counted, exit 1
        assert result.stderr.count("skipped") >= 1 and "corrupt.jpg" in result.stderr
        assert result.stdout.count("top-1") == 1  # only rank 0 reports
        reports[procs] = json.loads(out.read_text())
    assert [(h.status, h.sent > 0) for h in class_one_always_wins.hits] == [(200, True)]
    single, double = reports[0], reports[2]
    assert single["world_size"] == 1 and double["world_size"] == 2
    for report in (single, double):
        assert report["images"] == 7 and report["skipped"] == 1
        assert report["correct1"] == PER_CLASS["n01443537"]  # class 1 always wins
        assert report["correct5"] == 7  # classes 0, 1, 2 are always in the top 5
        assert report["top1"] == pytest.approx(100 * 2 / 7)
        assert report["images_per_s"] > 0
        assert (report["published_top1"], report["published_top5"]) == (59.9, 81.8)
    assert {k: single[k] for k in ("images", "skipped", "correct1", "correct5")} == \
        {k: double[k] for k in ("images", "skipped", "correct1", "correct5")}


def test_limit_and_printed_report(imagefolder, class_one_always_wins):
    result = _evaluate("--data", str(imagefolder), "--limit", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tinynet_e (1000 classes) on eager, fp32\n  3 images (0 skipped) on 1 process(es)")
    assert "top-1 0.000 %  (0)   published 59.9" in result.stdout  # the first 3 are class 0


def test_fine_tuned_weights_with_sorted_folder_classes(tmp_path, class_one_always_wins):
    model = build("tinynet_e", num_classes=2)
    state = model.state_dict()
    state["classifier.weight"] = torch.zeros_like(state["classifier.weight"])
    state["classifier.bias"] = torch.tensor([0.0, 3.0])
    path = tmp_path / "ft.pth"
    torch.save({"state_dict": state}, path)
    root = tmp_path / "data"
    for name, count in (("cats", 2), ("dogs", 3)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (50, 50)).save(root / name / f"{i}.png")
    out = tmp_path / "r.json"
    result = _evaluate("--data", str(root), "--checkpoint", str(path), "--num-classes", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert (report["images"], report["correct1"], report["published_top1"]) == (5, 3, None)


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("empty", "has no class folders"),
    ("unknown", "do not match the model's 1000 classes"),
    ("mixed", "class folder(s) unknown to the model: not_a_wnid"),
])
def test_bad_data_is_a_clear_error(tmp_path, class_one_always_wins, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "unknown":
        for name in ("cats", "dogs"):
            (root / name).mkdir()
    if layout == "mixed":
        (root / "n01440764").mkdir()
        (root / "not_a_wnid").mkdir()
        (tmp_path / "map.json").write_text(json.dumps({"n01440764": 0}))
    extra = ["--class-map", str(tmp_path / "map.json")] if layout == "mixed" else []
    result = _evaluate("--data", str(root), *extra)
    assert result.returncode == 2 and message in result.stderr, result.stderr
