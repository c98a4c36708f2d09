"""N processes (DDP ranks, parallel notebooks) asking for the same weights at once."""
import os
import subprocess
import sys
import time

import pytest

from helpers import ROOT
from reference import checkpoint_bytes
from weights_server import weight_entry, write_manifest

pytestmark = pytest.mark.slow

PROCESSES = 8

CHILD = """
import hashlib, pathlib, sys, time
import torch
import models
from models import weights

rank, sync = int(sys.argv[1]), pathlib.Path(sys.argv[2])
(sync / f"ready-{rank}").touch()
while not (sync / "go").exists():  # start together, not as imports happen to finish
    time.sleep(0.01)
state = weights.pretrained_state_dict("tinynet_e", progress=False)
model = models.tinynet_e()
model.load_state_dict(state, strict=True)
digest = hashlib.sha256()
for key, value in model.state_dict().items():
    digest.update(key.encode())
    digest.update(value.cpu().contiguous().numpy().tobytes())
print(digest.hexdigest())
"""


def test_processes_share_one_verified_download(server, tmp_path):
    data = checkpoint_bytes("tinynet_e")
    sync = tmp_path / "sync"
    sync.mkdir()
    # The one download is slow, so every other process arrives while it is running.
    url = server.add("/tinynet_e.pth", data, ("slow", 2.0))
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_e": [weight_entry(url, data)]})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_HOME": str(tmp_path / "torch"),
           "GHOSTNET_HUB_MANIFEST": manifest, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(rank), str(sync)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(PROCESSES)]
    deadline = time.monotonic() + 120
    while len(list(sync.glob("ready-*"))) < PROCESSES and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    (sync / "go").touch()
    results = [p.communicate(timeout=120) for p in procs]
    hits = server.hits_for("/tinynet_e.pth")
    for proc, (_out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    digests = {out.strip() for out, _ in results}
    assert len(digests) == 1 and len(next(iter(digests))) == 64
    assert [(h.status, h.sent) for h in hits] == [(200, len(data))]
    cached = list((tmp_path / "torch" / "hub" / "checkpoints").glob("tinynet_e-*.pth"))
    assert len(cached) == 1 and cached[0].read_bytes() == data
