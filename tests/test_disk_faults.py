"""Full disks, file size limits, read-only folders and killed processes while ``finetune`` writes
its checkpoints, ``export`` its files and a download its bytes: real tmpfs mounts (tests/mounts.py),
``RLIMIT_FSIZE`` in a child process, SIGKILL. The rule is the weights path's: check the free space
before writing, remove the partial file, one error naming the folder, the bytes needed and the
bytes free; never a traceback, never an abort. Each test is a row of docs/weights.md's "What happens
when…" table (tests/faults.py)."""
import hashlib
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from stripes import write_dataset

from models import api, download
from models.manifest import WeightFile
from models.tools._finetuned import save_checkpoint

from faults import fault
from helpers import ROOT, cli
from mounts import remount_read_only, tmpfs

TINY = ["--model", "tinynet_e", "--no-pretrained", "--epochs", "1", "--input-size", "32", "--batch-size", "8",
        "--workers", "0", "--quiet"]
FORMATS = ("onnx", "pte", "pt2")


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("stripes"), train=8, val=3, size=40)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tinynet_e state dict (random weights) to export."""
    path = tmp_path_factory.mktemp("checkpoint") / "e.pth"
    torch.save(api.get_model("tinynet_e").state_dict(), path)
    return path


def _child(command, limit=None, **kwargs):
    """``command`` in a child process with one thread, optionally under RLIMIT_FSIZE ``limit``."""
    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, preexec_fn=limited if limit else None, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _run(command, limit=None, timeout=600):
    process = _child(command, limit)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _clean_failure(result, folder):
    """Exit status 2, one error naming the folder and the space, no traceback, no abort."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "terminate called" not in result.stderr
    assert str(folder) in result.stderr and "bytes are free" in result.stderr, result.stderr[-3000:]


# -- finetune ----------------------------------------------------------------------------------------

@fault("`finetune --out` is a folder that cannot be written (a real tmpfs remounted read-only)",
       "refused before training starts, naming the folder and the cause")
def test_finetune_refuses_an_out_folder_it_cannot_write(stripes, tmp_path):
    with tmpfs(tmp_path / "ro", "4m") as mount:
        (mount / "run").mkdir()
        remount_read_only(mount)
        for out in (mount / "run", mount / "new" / "run"):
            result = cli("finetune", "--data", str(stripes), "--out", str(out), *TINY)
            assert result.returncode == 2 and "epoch 1/1" not in result.stdout, result.stderr
            assert f"cannot write into {out}" in result.stderr and "Read-only file system" in result.stderr


@fault("`finetune` on a disk too small for its checkpoints (a real 2 MiB tmpfs)",
       "refused before training starts: the bytes best.pth and last.pth need at least, and the bytes free")
def test_finetune_refuses_a_disk_too_small_before_training(stripes, tmp_path):
    with tmpfs(tmp_path / "disk", "2m") as disk:
        result = cli("finetune", "--data", str(stripes), "--out", str(disk / "run"), *TINY)
        _clean_failure(result, disk / "run")
        assert "needs at least" in result.stderr and "epoch 1/1" not in result.stdout
        assert not list(disk.rglob("*.pth*"))


@fault("A checkpoint does not fit the free space left (a real 2 MiB tmpfs)",
       "refused before a byte is written, naming the folder, the bytes needed and free; the previous file stays "
       "whole, no `.partial` is left")
def test_a_checkpoint_larger_than_the_free_space_is_not_started(tmp_path):
    with tmpfs(tmp_path / "disk", "2m") as disk:
        (disk / "best.pth").write_bytes(b"previous")
        payload = {"state_dict": {"w": torch.zeros(800_000)}, "epoch": 1}
        with pytest.raises(OSError, match=r"cannot write best.pth into .*: it needs [\d,]+ bytes and [\d,]+ bytes "
                                          r"are free there") as err:
            save_checkpoint(disk / "best.pth", payload)
        assert str(disk) in str(err.value) and "Traceback" not in str(err.value)
        assert sorted(os.listdir(disk)) == ["best.pth"] and (disk / "best.pth").read_bytes() == b"previous"


# A fine-tuning process (5 s, the fast loop's longest test): the full suite's; the finetune checks
# above and the real ENOSPC below stay in the fast loop.
@pytest.mark.slow
@fault("Writing last.pth fails halfway (`RLIMIT_FSIZE`: the free-space check passes, the write does not)",
       "the partial file is removed, best.pth stays whole, exit status 2 with the folder, the cause (`File too "
       "large`), the bytes needed and free; no traceback")
def test_a_checkpoint_write_failing_halfway_leaves_no_partial(stripes, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "models", "finetune", "--data", str(stripes), "--out", str(out), *TINY]
    result = _run(command, limit=5 << 20)  # best.pth (3.2 MB) fits, last.pth (9.4 MB) does not
    _clean_failure(result, out)
    assert "File too large" in result.stderr and "last.pth" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["best.pth", "curves.png", "metrics.json"]
    assert torch.load(out / "best.pth", weights_only=True)["epoch"] == 1


# -- export -------------------------------------------------------------------------------------------

def _export_args(checkpoint, out):
    """``export``'s arguments for ``out``: the checkpoint's tinynet_e."""
    # (a .pte for one image at a time: a program of fixed shape lowers in three quarters of the
    # time, and what is written, and fails, is the same kind of file)
    single = ["--max-batch", "1"] if out.suffix == ".pte" else []
    return ["export", "tinynet_e", "--checkpoint", str(checkpoint), "--out", str(out), "--quiet", *single]


def _export(checkpoint, out):
    return [sys.executable, "-m", "models", *_export_args(checkpoint, out)]


@pytest.mark.slow
@fault("`export --out` on a full disk, in every format (a real 2 MiB tmpfs; `.pt2` used to abort the "
       "interpreter)", "refused before exporting: the bytes the file needs at least and the bytes free; nothing "
       "is left on the disk")
@pytest.mark.parametrize("suffix", FORMATS)
def test_export_on_a_full_disk_fails_cleanly(checkpoint, tmp_path, suffix):
    with tmpfs(tmp_path / "disk", "2m") as disk:  # (refused before any work: the command's main, in this process)
        result = cli(*_export_args(checkpoint, disk / f"m.{suffix}"))
        _clean_failure(result, disk)
        assert os.listdir(disk) == []
        # refused by the room check, before the work: not by the write that a full disk then fails
        assert "No space left on device" not in result.stderr and "2,097,152 bytes are free" in result.stderr


@pytest.mark.slow
@fault("Writing an export fails halfway (`RLIMIT_FSIZE`), in every format",
       "the same clean failure: the cause (`File too large`), the folder, the bytes; no work folder or partial "
       "file is left beside `--out`")
@pytest.mark.parametrize("suffix", FORMATS)
def test_export_write_failing_halfway_fails_cleanly(checkpoint, tmp_path, suffix):
    out = tmp_path / "out" / f"m.{suffix}"
    result = _run(_export(checkpoint, out), limit=1 << 20)
    _clean_failure(result, out.parent)
    assert "File too large" in result.stderr and os.listdir(out.parent) == []


@pytest.mark.slow
@fault("`export` is killed (SIGKILL) while it works",
       "its work folder (`.export-*` beside `--out`) is removed by the next export into that folder; a work "
       "folder whose export is still running is left alone")
def test_a_killed_export_leaves_no_work_folder_after_the_next(checkpoint, tmp_path):
    out = tmp_path / "out" / "m.pt2"
    process = _child(_export(checkpoint, out))
    deadline = time.monotonic() + 300
    while not list(out.parent.glob(".export-*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL and [p for p in out.parent.iterdir() if p.is_dir()]
    again = _run(_export(checkpoint, out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.pt2"]


# -- downloads ------------------------------------------------------------------------------------

@fault("The disk fills up from elsewhere while a file of known size downloads (a real 4 MiB tmpfs)",
       "a real `ENOSPC`: the partial is removed, the error names the cache directory, the bytes needed and "
       "free, and the other sources are not tried into the same disk")
def test_a_real_enospc_ends_the_chain(server, tmp_path):
    data = random.Random(7).randbytes(1_500_000)
    urls = [server.add("/slow.pth", data, ("slow", 2.0)), server.add("/w.pth", data)]
    file = WeightFile("tinynet_e", 0, tuple(urls), "torch", {"sha256": hashlib.sha256(data).hexdigest()}, len(data))
    with tmpfs(tmp_path / "disk", "4m") as disk:
        cache = disk / "cache"

        def fill():  # once the body is being written, something else takes the disk
            # (not at the first request: the room check after the response's headers would then
            # refuse, under load, and the test would see that check instead of a real ENOSPC)
            while not any(p.is_file() and p.stat().st_size for p in cache.glob("*.partial")):
                time.sleep(0.01)
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            try:
                (disk / "filler").write_bytes(b"\0" * (free - 200_000))
            except OSError:  # the download took some of that room meanwhile: the disk is full either way
                pass

        filler = threading.Thread(target=fill)
        filler.start()
        with pytest.raises(download.CacheWriteError) as err:
            download.fetch(file, progress=False, cache=cache, offline=False)
        filler.join()
        assert "No space left on device" in str(err.value) and str(cache) in str(err.value)
        assert server.hits_for("/w.pth") == [] and not list(cache.glob("*.partial"))

