"""Weights path benchmarks: ratios against a bare reference measured in the same run.

    python benchmarks/bench_weights.py [--repeats 15]

1. Cache hit: our verify-then-load (every recorded checksum re-computed, safe unpickling)
   against a plain ``torch.load(weights_only=True)`` of the same file.
2. Download: ``download.fetch`` (streaming hash, size check, lock, atomic rename) from a
   loopback HTTP server against a bare ``requests`` loop writing the same bytes to disk.
The two sides alternate within each repetition so that machine noise hits both alike.
(The user-facing inference-speed benchmark is ``python -m models benchmark``.)
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import io
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time

import requests
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from models import download, ghostnet_1x  # noqa: E402
from models.manifest import WeightFile  # noqa: E402
from models.weights import read_state_dict  # noqa: E402


def _checkpoint() -> bytes:
    buffer = io.BytesIO()
    torch.save(ghostnet_1x().state_dict(), buffer)  # the size of the real file, ~21 MB
    return buffer.getvalue()


def _sums(data: bytes) -> dict[str, str]:
    return {
        "git_blob_sha1": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _report(title: str, ours: list[float], ref: list[float], ours_name: str, ref_name: str, higher_is_better=False):
    mo, mr = statistics.median(ours), statistics.median(ref)
    spread = lambda xs: (max(xs) - min(xs)) / statistics.median(xs) * 100  # noqa: E731
    print(f"\n{title}")
    print(f"  {ours_name:<44} median {mo * 1e3:8.1f} ms  (spread {spread(ours):4.0f}%)")
    print(f"  {ref_name:<44} median {mr * 1e3:8.1f} ms  (spread {spread(ref):4.0f}%)")
    if higher_is_better:
        print(f"  throughput ratio ours/reference: {mr / mo:.2f}x")
    else:
        print(f"  time ratio ours/reference: {mo / mr:.2f}x")


def bench_cache_hit(data: bytes, repeats: int, tmp: pathlib.Path) -> None:
    sums = _sums(data)
    file = WeightFile(model="ghostnet_1x", index=0, urls=("https://example.invalid/w.pth",), format="torch",
                      checksums={"git_blob_sha1": sums["git_blob_sha1"]}, size=len(data))
    cache = tmp / "cache"
    cache.mkdir()
    (cache / file.cache_name).write_bytes(data)
    path = cache / file.cache_name

    def ours():
        got = download.fetch(file, progress=False, cache=cache, offline=True, mirror="")
        read_state_dict(got, format="torch")

    def plain():
        torch.load(path, map_location="cpu", weights_only=True)

    ours(), plain()  # warm the page cache and imports
    a, b = [], []
    for _ in range(repeats):
        a.append(_timed(ours))
        b.append(_timed(plain))
    _report(f"cache hit, {len(data) / 1e6:.1f} MB checkpoint, git blob SHA-1 recorded", a, b,
            "verify + load (models.download + weights)", "torch.load(weights_only=True), no check")


class _Handler(http.server.SimpleHTTPRequestHandler):
    rate: float | None = None  # bytes per second; None: as fast as loopback goes

    def log_message(self, *args):
        pass

    def copyfile(self, source, outputfile):
        if self.rate is None:
            return super().copyfile(source, outputfile)
        while chunk := source.read(1 << 20):
            outputfile.write(chunk)
            time.sleep(len(chunk) / self.rate)


def bench_download(data: bytes, repeats: int, tmp: pathlib.Path, rate: float | None) -> None:
    served = tmp / "served"
    served.mkdir(exist_ok=True)
    (served / "w.pth").write_bytes(data)
    handler = functools.partial(type("H", (_Handler,), {"rate": rate}), directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/w.pth"
    sums = _sums(data)
    out = tmp / "out"
    out.mkdir(exist_ok=True)

    def bare():
        with requests.get(url, stream=True, timeout=30) as r, open(out / "bare.pth", "wb") as f:
            r.raise_for_status()
            for chunk in r.iter_content(1 << 20):
                f.write(chunk)

    # As the real manifest records them: one digest per file today, two once pinned.
    for algos in (("git_blob_sha1",), ("git_blob_sha1", "sha256")):
        file = WeightFile(model="ghostnet_1x", index=0, urls=(url,), format="torch",
                          checksums={a: sums[a] for a in algos}, size=len(data))

        def ours(file=file):
            (out / file.cache_name).unlink(missing_ok=True)
            download.fetch(file, progress=False, cache=out, offline=False, mirror="")

        ours(), bare()
        a, b = [], []
        for _ in range(repeats):
            a.append(_timed(ours))
            b.append(_timed(bare))
        link = "loopback at full speed" if rate is None else f"a {rate / 1e6:.0f} MB/s link"
        _report(f"download over {link}, {len(data) / 1e6:.1f} MB, size + {' + '.join(algos)} checked", a, b,
                "download.fetch (verify, lock, atomic rename)", "bare requests loop to disk", higher_is_better=True)
    httpd.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    data = _checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        bench_cache_hit(data, args.repeats, pathlib.Path(tmp))
        bench_download(data, args.repeats, pathlib.Path(tmp), rate=None)
        bench_download(data, max(3, args.repeats // 3), pathlib.Path(tmp), rate=100e6)


if __name__ == "__main__":
    main()
