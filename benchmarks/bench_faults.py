"""Fault figures of the weights path (issue 11), each beside its reference from the same run.

    python benchmarks/bench_faults.py [--repo PATH] [--skip-slow-old]

1. No network at all (a process in its own network namespace, ``unshare -n``; as root),
   ghostnet_1x's 4 real sources: seconds from the call to the error, and its lines, in
   process; and ``python -m models prefetch ghostnet_1x``'s stderr lines.
2. 4 processes started together, the first weight file's only source refusing connections:
   the slowest process's load time, against one process doing the same alone and against 4
   processes loading with no dead source.
3. An endless body (a user URL; cap ``GHOSTNET_HUB_MAX_BYTES`` = 8 MiB): bytes written
   before it stopped, against the cap.
``--repo`` measures another checkout (e.g. the base commit) with the same script; an old
checkout has no cap, so 3 runs only for this one.
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent.parent

NO_NETWORK = """
import time
from models import weights
start = time.monotonic()
try:
    weights.pretrained_state_dict("ghostnet_1x", progress=False)
except Exception as exc:
    print(f"{time.monotonic() - start:.3f}")
    print(exc)
"""

LOAD = """
import pathlib, sys, time
from models import weights
sync = pathlib.Path(sys.argv[1])
(sync / f"ready-{sys.argv[2]}").touch()
while not (sync / "go").exists():
    time.sleep(0.01)
start = time.monotonic()
weights.pretrained_state_dict("tinynet_e", progress=False)
print(f"{time.monotonic() - start:.3f}")
"""

ENDLESS = """
import re, sys
from models import download
try:
    download.fetch_url(sys.argv[1], progress=False, offline=False)
except Exception as exc:
    print(exc)
"""


def _env(repo: pathlib.Path, home: pathlib.Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GHOSTNET_HUB_", "HF_HUB_"))}
    return {**env, "PYTHONPATH": str(repo), "TORCH_HOME": str(home), "OMP_NUM_THREADS": "1", **extra}


def no_network(repo: pathlib.Path, tmp: pathlib.Path) -> None:
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        print("1. no network: skipped (cannot create a network namespace; run as root)")
        return
    env = _env(repo, tmp / "nonet")
    out = subprocess.run(["unshare", "-n", sys.executable, "-c", NO_NETWORK], cwd=repo, env=env,
                         capture_output=True, text=True).stdout.splitlines()
    cli = subprocess.run(["unshare", "-n", sys.executable, "-m", "models", "prefetch", "ghostnet_1x", "--quiet"],
                         cwd=repo, env=env, capture_output=True, text=True)
    lines = out[1:]
    print(f"1. no network, ghostnet_1x (4 sources): error after {float(out[0]):.3f} s, {len(lines)} lines "
          f"({len(set(lines))} distinct); `prefetch` stderr {len(cli.stderr.splitlines())} lines, "
          f"exit {cli.returncode}, traceback: {'Traceback' in cli.stderr}")


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _serve(directory: pathlib.Path):
    import functools

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Files, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def _manifest(tmp: pathlib.Path, files: list[list[str]], data: bytes) -> str:
    tmp = pathlib.Path(tempfile.mkdtemp(dir=tmp))
    sys.path.insert(0, str(HERE / "tests"))
    from weights_server import weight_entry, write_manifest

    # Two files of the same weights under different digests (so different cache names), as the
    # authors' checkpoint and timm's re-save are.
    algos = [("git_blob_sha1",), ("sha256",)]
    return write_manifest(tmp / "m.json", {"tinynet_e": [weight_entry(urls, data, algos=algos[i % 2])
                                                         for i, urls in enumerate(files)]})


def _together(repo: pathlib.Path, tmp: pathlib.Path, manifest: str, n: int) -> list[float]:
    sync = pathlib.Path(tempfile.mkdtemp(dir=tmp))
    env = _env(repo, sync / "torch", GHOSTNET_HUB_MANIFEST=manifest)
    procs = [subprocess.Popen([sys.executable, "-c", LOAD, str(sync), str(i)], cwd=repo, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for i in range(n)]
    while len(list(sync.glob("ready-*"))) < n and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    (sync / "go").touch()
    return [float(p.communicate()[0].strip() or "nan") for p in procs]


def dead_first_source(repo: pathlib.Path, tmp: pathlib.Path) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from models import tinynet_e

    buffer = io.BytesIO()
    torch.save(tinynet_e().state_dict(), buffer)
    data = buffer.getvalue()
    served = tmp / "served"
    served.mkdir()
    (served / "e.pth").write_bytes(data)
    httpd, base = _serve(served)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/e.pth"
    manifest = _manifest(tmp, [[dead], [f"{base}/e.pth"]], data)
    healthy = _manifest(tmp, [[f"{base}/e.pth"]], data)
    alone, four, four_healthy = [], [], []
    for _ in range(3):  # interleaved
        alone.append(max(_together(repo, tmp, manifest, 1)))
        four.append(max(_together(repo, tmp, manifest, 4)))
        four_healthy.append(max(_together(repo, tmp, healthy, 4)))
    print(f"2. first source refusing connections: 4 processes together, slowest {statistics.median(four):.2f} s "
          f"(median of 3); one process alone {statistics.median(alone):.2f} s; 4 processes with no dead source "
          f"{statistics.median(four_healthy):.2f} s")
    httpd.shutdown()


class _Endless(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = hashlib.sha256(b"x").digest() * 2048
        try:
            for _ in range(1 << 16):  # 4 GiB at most
                self.wfile.write(chunk)
        except OSError:
            pass


def endless(repo: pathlib.Path, tmp: pathlib.Path) -> None:
    cap = 8 << 20
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/endless.pth"
    env = _env(repo, tmp / "endless", GHOSTNET_HUB_MAX_BYTES=str(cap))
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", ENDLESS, url], cwd=repo, env=env, capture_output=True,
                         text=True).stdout
    import re

    written = re.search(r"stopped after writing ([\d,]+)", out)
    print(f"3. endless body, cap {cap:,} bytes: wrote {written[1] if written else '?'} bytes, then refused "
          f"({time.monotonic() - start:.1f} s with start-up)")
    httpd.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=pathlib.Path, default=HERE, help="checkout to measure (default: this one)")
    args = parser.parse_args()
    repo = args.repo.resolve()
    print(f"measuring {repo}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        no_network(repo, tmp)
        dead_first_source(repo, tmp)
        if repo == HERE:
            endless(repo, tmp)


if __name__ == "__main__":
    main()
