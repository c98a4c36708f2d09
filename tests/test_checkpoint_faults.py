"""Your own checkpoints and settings under the faults real users meet: a huge file that is not a
checkpoint, a ``checkpoint=`` URL whose file changes upstream, user-URL files in ``cache clear``,
a FIFO or ``/dev/zero`` as the manifest. Real processes (memory measured, hangs bounded by a
timeout), real loopback servers. Each test is a row of docs/weights.md's "What happens when…" table."""
import hashlib
import io
import logging
import os
import pathlib
import resource
import subprocess
import sys

import pytest
import torch

from models.download import OFFLINE_ENV
from models.weights import user_state_dict

from faults import fault
from helpers import ROOT, cli

HUGE = """
import resource, sys
import models
models.tinynet_e()  # the baseline: torch, the package and the model built once (about 1 GB on some CI machines)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
try:
    models.tinynet_e(checkpoint=sys.argv[1])
except Exception as exc:
    print(type(exc).__name__, exc)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GHOSTNET_HUB_", "HF_HUB_"))}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _bounded_memory():
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a runaway read fails, not the machine


@fault("`checkpoint=` names a 3 GiB file that is not a checkpoint, or one far larger than any checkpoint of "
       "that model", "refused from its first bytes and its size, before it is read (the process grows by under "
       "300 MB, not by 3 GiB); the error names the file and the limit")
@pytest.mark.parametrize("head, message", [
    (b"", "is neither a torch checkpoint nor a safetensors file"),
    (b"PK\x03\x04", "far more than any checkpoint of this model"),
])
@pytest.mark.slow  # a new process per case: its memory is what is measured
def test_a_huge_file_is_refused_before_it_is_read(tmp_path, head, message):
    path = tmp_path / "huge.pth"
    with open(path, "wb") as f:
        f.write(head + b"\1" * 16)
        f.truncate(3 << 30)  # sparse: no disk used
    result = subprocess.run([sys.executable, "-c", HUGE, str(path)], cwd=ROOT, env=_env(), capture_output=True,
                            text=True, timeout=120, preexec_fn=_bounded_memory)
    base_mb, *lines, peak_mb = result.stdout.strip().splitlines()
    assert lines and lines[0].startswith("CheckpointError") and message in lines[0], result.stdout + result.stderr
    assert str(path) in lines[0] and int(peak_mb) - int(base_mb) < 300, (base_mb, peak_mb, lines)


def _checkpoint(value: float) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.full((4,), value)}, buffer)
    return buffer.getvalue()


@fault("The file behind a `checkpoint=` URL changes upstream",
       "without `checkpoint_sha256=` each load revalidates the cached copy (a conditional request with the ETag "
       "or Last-Modified recorded at download; `304` costs no body) and a changed file is downloaded again; with "
       "`checkpoint_sha256=` or offline the cached copy is used with no request; a server that cannot be "
       "reached leaves the cached copy in use, with a warning")
def test_checkpoint_url_is_revalidated_unless_pinned(server, tmp_path, monkeypatch, caplog):
    first, second = _checkpoint(1.0), _checkpoint(2.0)
    url = server.add("/mine.pth", first)
    assert user_state_dict(url, progress=False)["w"][0] == 1.0
    etag = server.files["/mine.pth"].etag
    server.replace("/mine.pth", second)
    seen = len(server.hits)
    assert user_state_dict(url, progress=False)["w"][0] == 2.0
    assert server.hits[seen].headers.get("If-None-Match") == etag
    seen = len(server.hits)
    assert user_state_dict(url, progress=False)["w"][0] == 2.0
    assert [(h.status, h.sent) for h in server.hits[seen:]] == [(304, 0)]

    pinned = hashlib.sha256(second).hexdigest()
    assert user_state_dict(url, sha256=pinned, progress=False)["w"][0] == 2.0
    seen = len(server.hits)
    server.replace("/mine.pth", first)
    assert user_state_dict(url, sha256=pinned, progress=False)["w"][0] == 2.0  # pinned: the content cannot change
    monkeypatch.setenv(OFFLINE_ENV, "1")
    assert user_state_dict(url, progress=False)["w"][0] == 2.0
    assert len(server.hits) == seen
    monkeypatch.delenv(OFFLINE_ENV)

    server.files["/mine.pth"].script.append(("status", 503))
    server.files["/mine.pth"].script.append(("status", 503))
    with caplog.at_level(logging.WARNING, logger="models.download"):
        assert user_state_dict(url, progress=False)["w"][0] == 2.0
    assert "could not revalidate" in caplog.text and "HTTP 503" in caplog.text


@fault("`ghostnet-hub cache clear url` or `cache clear URL`",
       "removes every user-URL file, or the files of that one URL (its checksum sidecar included); published "
       "weights stay")
def test_cache_clear_removes_user_url_files(server, tmp_path):
    urls = [server.add("/a.pth", _checkpoint(1.0)), server.add("/b.pth", _checkpoint(2.0))]
    for url in urls:
        user_state_dict(url, progress=False)
    cache = pathlib.Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    (cache / "tinynet_e-0123456789abcdef.pth").write_bytes(b"published")  # another file of this package
    names = lambda: sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))  # noqa: E731
    assert len([n for n in names() if n.startswith("url-")]) == 4  # two files, two sidecars
    one = cli("cache", "clear", urls[0])
    assert one.returncode == 0, one.stderr
    left = [n for n in names() if n.startswith("url-")]
    assert len(left) == 2 and all(n.endswith(("-b.pth", "-b.pth.sha256")) for n in left), left
    every = cli("cache", "clear", "url")
    assert every.returncode == 0, every.stderr
    assert names() == ["tinynet_e-0123456789abcdef.pth"]


@fault("`GHOSTNET_HUB_MANIFEST` names a FIFO, `/dev/zero` or a directory",
       "refused at once (only a regular file is read, at most 16 MiB of it): a manifest error naming it; never a "
       "hang or an endless read")
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "directory"])
@pytest.mark.slow  # a new process per case: a hang or an endless read is bounded there
def test_a_manifest_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    path = {"fifo": tmp_path / "fifo.json", "/dev/zero": "/dev/zero", "directory": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    result = subprocess.run([sys.executable, "-m", "models", "manifest", "check"], cwd=ROOT,
                            env=_env(GHOSTNET_HUB_MANIFEST=str(path)), capture_output=True, text=True, timeout=60,
                            preexec_fn=_bounded_memory)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    expected = {"fifo": "is a FIFO", "/dev/zero": "is a character device", "directory": "is a directory"}[kind]
    assert f"invalid weights manifest {path}" in result.stderr and expected in result.stderr
