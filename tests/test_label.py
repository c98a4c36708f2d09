"""``python -m models label``: a collection of images labelled into one JSON-lines file, in input
order, on one process or under ``torchrun``; killed at any moment, the same command finishes it
with no image labelled twice and none skipped, and the file equals an uninterrupted run's."""
import collections
import contextlib
import json
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import models
from models.description import describe, preprocessing_for
from models.tools._samples import settle_batchnorm

from helpers import ROOT, cli, doc, readme_argv

COUNT = 2000  # the kill-and-resume run's images
BATCH = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A described 10-class tinynet_e that reads 16-pixel images (fast), with random weights and
    BatchNorm statistics measured on random images: freshly built, its features are ~1e-7 and every
    image gets the same scores; measured, each image has its own, which a line-for-line
    comparison then checks to 6 decimals."""
    torch.manual_seed(1)
    model = settle_batchnorm(models.tinynet_e(num_classes=10), (torch.rand(32, 3, 16, 16) * 4 - 2 for _ in range(4)))
    description = describe(model, classes=[f"kind {i}" for i in range(10)])
    description = description.with_(preprocessing=preprocessing_for("tinynet_e", 16))
    path = tmp_path_factory.mktemp("model") / "tiny.pth"
    torch.save({"state_dict": model.state_dict(), "description": description.to_dict()}, path)
    return path


def _images(folder, count, broken=()):
    """``count`` small PNGs of noise, 100 to a sub-folder; the indices in ``broken`` are not images."""
    generator = torch.Generator().manual_seed(count)
    for i in range(count):
        path = folder / f"{i // 100:02d}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i in broken:
            path.write_bytes(b"\x89PNG\r\n\x1a\n torn")
            continue
        side = 16 + i % 17
        pixels = torch.randint(0, 256, (side, side, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(path)
    return folder


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("photos"), COUNT)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _label(checkpoint, *args):
    return cli("label", "--checkpoint", str(checkpoint), "--quiet", "--workers", "0", *args)


def test_directory_list_file_and_url_in_input_order_with_error_lines(checkpoint, tmp_path, server):
    photos = _images(tmp_path / "photos", 30, broken={7})
    url = server.add("/remote.png", (photos / "00" / "0003.png").read_bytes())
    listed = tmp_path / "list.txt"
    listed.write_text(f"{photos / '00' / '0002.png'}\n\n{photos / 'missing.png'}\n{url}\n")
    out = tmp_path / "out" / "results.jsonl"
    result = _label(checkpoint, str(photos), url, "--from-list", str(listed), "--out", str(out), "--topk", "3",
                    "--batch-size", "4")
    assert result.returncode == 1, result.stderr  # unreadable images: the file is complete, the exit says so
    records = _records(out)
    files = sorted(str(p) for p in photos.rglob("*.png"))
    assert [r["image"] for r in records] == [*files, url, str(photos / "00" / "0002.png"), str(photos / "missing.png"),
                                             url]
    assert [r["index"] for r in records] == list(range(34))
    errors = {r["index"]: r["error"] for r in records if "error" in r}
    assert list(errors) == [7, 32] and errors[32].startswith("FileNotFoundError")
    digest = describe(models.api.from_checkpoint(checkpoint, progress=False)).digest
    for r in records:
        assert r["model_digest"] == digest
        if "error" not in r:
            assert [t["label"] for t in r["top"]] == [f"kind {t['index']}" for t in r["top"]] and len(r["top"]) == 3
            assert r["top"][0]["probability"] >= r["top"][1]["probability"] >= r["top"][2]["probability"]
    assert len({r["top"][0]["probability"] for r in records if "top" in r}) > 20  # each image its own scores
    # The URL serves file 3's bytes. In another batch, an image's last digit may differ (CPU kernels
    # round differently with the batch): why a run's batches are the same whatever splits or resumes it.
    for a, b in ((30, 3), (33, 3), (31, 2)):
        assert [t["index"] for t in records[a]["top"]] == [t["index"] for t in records[b]["top"]]
        assert [t["probability"] for t in records[a]["top"]] == pytest.approx(
            [t["probability"] for t in records[b]["top"]], abs=1e-5)
    assert f"{out}: 34 images, 2 unreadable (error lines)" in result.stdout
    assert "34 labelled now on 1 process(es)" in result.stdout and "done before" not in result.stdout
    assert "0007.png" in result.stderr and "missing.png" in result.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.jsonl"]  # the parts are gone
    again = _label(checkpoint, str(photos), "--out", str(out))
    assert again.returncode == 2 and "exists" in again.stderr  # a finished file is never overwritten


@contextlib.contextmanager
def _interrupted_after(batches):
    """Ctrl-C in the middle of a one-process run, after ``batches`` batches were read."""
    from models.tools import label

    calls, real = [], label.collate_images

    def collate(batch):
        calls.append(1)
        if len(calls) > batches:
            raise KeyboardInterrupt
        return real(batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(label, "collate_images", collate)
        yield


def test_interrupted_then_resumed_equals_uninterrupted_and_other_settings_are_refused(checkpoint, tmp_path):
    photos = _images(tmp_path / "photos", 100, broken={5})
    common = (str(photos), "--batch-size", "8")
    straight = _label(checkpoint, *common, "--out", str(tmp_path / "straight.jsonl"))
    assert straight.returncode == 1, straight.stderr
    out = tmp_path / "resumed.jsonl"
    with _interrupted_after(3):
        stopped = _label(checkpoint, *common, "--out", str(out))
    assert stopped.returncode == 130 and not out.exists()
    (part,) = (tmp_path / "resumed.jsonl.parts").glob("part-*.jsonl")
    assert len(part.read_text().splitlines()) == 24
    with open(part, "a") as f:  # a write torn by a kill: discarded on resume
        f.write('{"index": 24, "ima')
    retrained = torch.load(checkpoint, weights_only=True)
    retrained["state_dict"]["classifier.bias"] += 1.0  # the same model, described alike, other weights
    torch.save(retrained, tmp_path / "retrained.pth")
    for other, named in ((["--topk", "3"], "topk"), (["--batch-size", "4"], "batch_size"),
                         (["--checkpoint", str(tmp_path / "retrained.pth")], "checkpoint_sha256"),
                         (["--backend", "compile"], "backend")):
        refused = _label(checkpoint, *common, *other, "--out", str(out))
        assert refused.returncode == 2, refused.stderr
        (line,) = refused.stderr.strip().splitlines()
        assert "unfinished run with other settings" in line and named in line, line
    (tmp_path / "photos" / "new.png").write_bytes((photos / "00" / "0001.png").read_bytes())
    resumed = _label(checkpoint, *common, "--out", str(out))  # (the new file is not in the run's list)
    assert resumed.returncode == 1, resumed.stderr
    assert "76 labelled now on 1 process(es)" in resumed.stdout and "24 done before" in resumed.stdout
    assert out.read_text() == (tmp_path / "straight.jsonl").read_text()
    assert not (tmp_path / "resumed.jsonl.parts").exists()


def test_a_batch_is_done_only_when_a_part_holds_all_its_lines_whole(tmp_path):
    """What a kill or a lost node leaves in a part: a cut line, zeros where the last blocks were,
    a batch begun and not ended. Only whole batches count; a part is cut back to its last one."""
    from models.tools._label_parts import RunFolder, shard

    def lines(indices, error=()):
        return "".join(json.dumps({"index": i, "image": f"{i}.png", **({"error": "E"} if i in error else {"top": []}),
                                   "model_digest": "d"}) + "\n" for i in indices).encode()

    folder = RunFolder(tmp_path / "out.jsonl")
    folder.dir.mkdir()
    first, second = folder.part(0), folder.part(1)
    # batches of 4 inputs, 10 inputs: batch 2 has 2
    first.write_bytes(lines(range(0, 4), error={1}) + lines(range(8, 10)) + lines([4, 5]) + b'{"index": 6, "im')
    second.write_bytes(lines(range(4, 8)) + b"\0" * 100 + lines(range(0, 4)))
    done, ends = folder.done(batch_size=4, total=10)
    assert sorted(done) == [0, 1, 2] and done[0].path == first and done[0].errors == 1
    # (the zeros glue onto the line after them: that batch is not whole there)
    assert ends == {first: len(lines(range(0, 4), error={1}) + lines(range(8, 10))), second: len(lines(range(4, 8)))}
    assert shard(3, done, 0, 2) == [] and shard(5, {1: 0, 3: 0}, 1, 2) == [2]
    assert folder.merge(batch_size=4, total=10) == (10, 1)
    assert [json.loads(line)["index"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == list(range(10))
    assert not folder.dir.exists()


@pytest.mark.slow  # an ONNX export
def test_a_runtime_backend_labels_like_eager(checkpoint, tmp_path):
    photos = _images(tmp_path / "photos", 12, broken={4})
    runs = {}
    for backend in ("eager", "onnxruntime"):
        out = tmp_path / f"{backend}.jsonl"
        result = _label(checkpoint, str(photos), "--backend", backend, "--out", str(out))
        assert result.returncode == 1, result.stderr
        runs[backend] = _records(out)
    for eager, runtime in zip(runs["eager"], runs["onnxruntime"], strict=True):
        assert runtime["image"] == eager["image"] and ("error" in runtime) == ("error" in eager)
        assert runtime["model_digest"] == eager["model_digest"]  # the same model, described by the file
        if "error" not in eager:
            assert [t["index"] for t in runtime["top"]] == [t["index"] for t in eager["top"]]
            for a, b in zip(runtime["top"], eager["top"], strict=True):
                assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)


def _commands(name):
    """The command lines of docs/label.md's block ``<!-- label:NAME -->``, as words."""
    block = doc("label").split(f"<!-- label:{name} -->\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").strip().splitlines()]


def test_docs_one_process_commands(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "photos", 20, broken={3})
    (tmp_path / "paths.txt").write_text("photos/00/0001.png\nphotos/00/0002.png\n")
    for words in _commands("one"):
        argv = readme_argv(words)
        assert argv[:3] == [sys.executable, "-m", "models"] and "--out" in argv, words
        result = cli(*argv[3:], "--checkpoint", str(checkpoint), "--workers", "0")
        assert result.returncode in (0, 1), (words, result.stderr)  # 1: photos/00/0003.png is not an image
        out = tmp_path / argv[argv.index("--out") + 1]
        assert len(_records(out)) == (20 if "photos" in words else 2) and "images/s" in result.stdout
        out.unlink()


def _start(words, cwd):
    """A command line of the docs (torchrun ...) started in its own process group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(readme_argv(words), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _kill_all(pid):
    """SIGKILL a process and every process under it, at once: torchrun starts each rank in a
    session of its own, so killing torchrun's process group would leave the ranks running."""
    children = collections.defaultdict(list)
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            children[int(stat.read_text().rsplit(")", 1)[1].split()[1])].append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children[found[-1]]
    for each in reversed(found):  # the ranks' DataLoader workers, the ranks, then torchrun
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)


def _finish(process, timeout=150):
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_all(process.pid)
        out, err = process.communicate()
        pytest.fail(f"label did not finish in {timeout} s:\n{out}\n{err[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _done_batches(parts):
    """The batches the part files hold whole (lines that end, every index of the batch)."""
    indices = [json.loads(line)["index"] for part in parts.glob("part-*.jsonl")
               for line in part.read_bytes().split(b"\n")[:-1]]
    assert len(indices) == len(set(indices))  # nothing written twice
    sizes = collections.Counter(i // BATCH for i in indices)
    return {b for b, n in sizes.items() if n == min(BATCH, COUNT - b * BATCH)}


def _kill_midway(words, cwd, parts):
    """Start the two-rank run; SIGKILL torchrun and both ranks once some batches are written."""
    process = _start(words, cwd)
    deadline = time.monotonic() + 150
    while len(_done_batches(parts) if (parts / "run.json").exists() else ()) < 8:
        assert process.poll() is None, _finish(process).stderr[-3000:]
        assert time.monotonic() < deadline, "no batch was written"
        time.sleep(0.01)
    _kill_all(process.pid)
    process.communicate()
    return _done_batches(parts)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAST = ["--batch-size", str(BATCH), "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def reference(checkpoint, collection, tmp_path_factory):
    """The collection labelled by one process, never interrupted, as the page's commands name it
    (photos/..., relative); and the folder to run them in (``photos`` there is the collection)."""
    folder = tmp_path_factory.mktemp("reference")
    (folder / "photos").symlink_to(collection)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        result = cli("label", "photos", "--checkpoint", str(checkpoint), *FAST, "--out", "reference.jsonl")
    assert result.returncode == 0, result.stderr
    lines = (folder / "reference.jsonl").read_text().splitlines()
    assert len(lines) == COUNT
    return lines


def _kill_then_finish(finish, checkpoint, collection, reference, tmp_path):
    """docs/label.md's torchrun command (2 ranks, gloo) SIGKILLed once some batches are written,
    then ``finish``: the output equals the uninterrupted run's, line for line."""
    (tmp_path / "photos").symlink_to(collection)
    ((*torchrun,),) = _commands("torchrun")
    assert torchrun[:4] == ["torchrun", "--standalone", "--nproc-per-node", "2"], torchrun
    assert finish[-3:] == torchrun[-3:] == ["photos", "--out", "results.jsonl"], finish
    fast = ["--checkpoint", str(checkpoint), *FAST]
    out, parts = tmp_path / "results.jsonl", tmp_path / "results.jsonl.parts"
    done = _kill_midway(torchrun + fast, tmp_path, parts)
    assert 8 <= len(done) < COUNT // BATCH and not out.exists()
    result = _finish(_start(finish + fast, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    before = sum(min(BATCH, COUNT - b * BATCH) for b in done)
    now = int(re.search(r"(\d+) labelled now", result.stdout)[1])
    assert f"{before} done before" in result.stdout and now == COUNT - before  # none twice, none skipped
    assert out.read_text().splitlines() == reference
    assert not parts.exists()
    return result


@pytest.mark.slow  # torchrun twice; 2,000 images
def test_killed_two_rank_run_resumes_to_the_uninterrupted_output_line_for_line(checkpoint, collection, reference,
                                                                               tmp_path):
    """The same command again, after a SIGKILL of torchrun and both ranks."""
    ((*torchrun,),) = _commands("torchrun")
    result = _kill_then_finish(torchrun, checkpoint, collection, reference, tmp_path)
    assert "labelled now on 2 process(es)" in result.stdout


@pytest.mark.slow  # torchrun twice; 2,000 images
def test_killed_run_is_finished_by_the_several_node_command_on_other_processes(checkpoint, collection, reference,
                                                                               tmp_path):
    """The page's several-node command, run as one node of one process on loopback, finishes
    what the killed two-rank run left: the rest re-sharded over another number of processes."""
    (nodes,) = _commands("nodes")
    port = _free_port()
    for option, value in (("--nnodes", "1"), ("--nproc-per-node", "1"), ("--rdzv-endpoint", f"127.0.0.1:{port}")):
        nodes[nodes.index(option) + 1] = value
    nodes = [w.removeprefix("/shared/") for w in nodes]  # (the same files as the torchrun command's)
    result = _kill_then_finish(nodes, checkpoint, collection, reference, tmp_path)
    assert "labelled now on 1 process(es)" in result.stdout
