"""Fine-tuning runs end to end (slow): killed and resumed equals uninterrupted, the docs'
commands as written with 2 processes equal to 1, DataLoader workers changing nothing, and
tinynet_e learning from scratch with predict agreeing with its validation top-1."""

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
from finetuning import FAST, SERIAL, TINY, TOLERANCE, max_difference, quiet, state_of
from stripes import CLASSES

from models.tools.finetune import finetune

from helpers import ROOT, cli, doc, readme_argv, readme_cli, run_models

# The flag with which predict and evaluate take a checkpoint file (#10 renames it --checkpoint).
CHECKPOINT_FLAG = "--checkpoint"

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
    a, b = state_of(killed / "last.pth"), state_of(tmp_path / "straight" / "last.pth")
    assert max_difference(a, b) <= 1e-6
    curves = [[value for r in json.loads((out / "metrics.json").read_text())["epochs"]
               for value in (r["train_loss"], r["val_loss"], r["val_top1"])] for out in (killed, tmp_path / "straight")]
    assert len(curves[0]) == 9 and curves[0] == pytest.approx(curves[1], rel=1e-5)


README = doc("finetune")  # docs/finetune.md, where the README points for fine-tuning


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
    ddp, reference = state_of(tmp_path / "runs/tinynet_e/last.pth"), state_of(tmp_path / "runs/one/last.pth")
    difference = max_difference(ddp, reference)
    without_sync_bn = max_difference(state_of(tmp_path / "runs/unsynced/last.pth"), reference)
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
    assert max_difference(state_of(result.last), state_of(tiny_run[0].last)) == 0.0


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
    predicted = cli("predict", CHECKPOINT_FLAG, str(out / "best.pth"), str(data / "val"), "--topk", "1", "--json", "-",
                    "--workers", "0")
    assert predicted.returncode == 0, predicted.stderr
    records = [json.loads(line) for line in predicted.stdout.splitlines()]
    correct = sum(r["top"][0]["label"] == r["image"].split("/")[-2] for r in records)
    assert len(records) == 48 and 100.0 * correct / 48 == pytest.approx(metrics["best_val_top1"])
