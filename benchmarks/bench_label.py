"""Throughput of ``label`` (issue 23): images/s on 1 and 2 processes of one thread each, for the
eager model and the runtimes, as ratios to the one-process eager run measured in the same run.

    python benchmarks/bench_label.py [--model tinynet_e] [--images 512] [--repeats 3]
                                     [--backends eager onnxruntime openvino]

Each run is the command a user types (``ghostnet-hub label``, under ``torchrun --standalone
--nproc-per-node 2`` for two processes) with OMP_NUM_THREADS=1 and ``--workers 0``, so one
process is one core: it reads, decodes and labels. The figure is the command's own images/s,
from the first batch to the last (model loading and the merge left out: they do not grow with
the collection). The model has random weights (no download), the images are generated JPEGs
of 200-400 pixels. Each backend runs once first (its export is made and cached, not timed);
then every configuration runs once per repeat, interleaved, so a busy machine slows all alike;
the median and the range of the repeats are shown.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

import torch
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _checkpoint(name: str, path: pathlib.Path) -> None:
    import models
    from models.description import describe

    torch.manual_seed(0)
    model = models.get_model(name)
    torch.save({"state_dict": model.state_dict(), "description": describe(model).to_dict()}, path)


def _images(folder: pathlib.Path, count: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        width, height = 200 + (37 * i) % 200, 200 + (53 * i) % 200
        pixels = torch.randint(0, 256, (height // 8, width // 8, 3), generator=generator, dtype=torch.uint8)
        image = Image.fromarray(pixels.numpy()).resize((width, height), Image.BILINEAR)  # photo-like: smooth
        (folder / f"{i // 100:03d}").mkdir(exist_ok=True)
        image.save(folder / f"{i // 100:03d}" / f"{i:05d}.jpg", quality=90)


def _run(procs: int, backend: str, work: pathlib.Path, checkpoint: pathlib.Path, tag: str) -> float:
    out = work / f"{tag}-{backend}-{procs}.jsonl"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                "--no-python", sys.executable] if procs > 1 else [sys.executable]
    command = [*launcher, "-m", "models", "label", str(work / "photos"), "--out", str(out), "--checkpoint",
               str(checkpoint), "--backend", backend, "--workers", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TORCH_HOME": str(work / "torch-home")}
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr[-3000:]}")
    out.unlink()
    return float(re.search(r"([\d.]+) images/s", result.stdout)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tinynet_e")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["eager", "onnxruntime", "openvino"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-label-") as tmp:
        work = pathlib.Path(tmp)
        (work / "photos").mkdir()
        _images(work / "photos", args.images)
        checkpoint = work / f"{args.model}.pth"
        _checkpoint(args.model, checkpoint)
        for backend in args.backends:  # the export, made once and cached; and every import warm
            _run(1, backend, work, checkpoint, "warm-up")
        rates: dict[tuple[str, int], list[float]] = {(b, p): [] for b in args.backends for p in (1, 2)}
        for repeat in range(args.repeats):
            for (backend, procs), values in rates.items():
                values.append(_run(procs, backend, work, checkpoint, f"r{repeat}"))
                print(f"repeat {repeat + 1}: {backend}, {procs} process(es): {values[-1]:.1f} images/s", flush=True)
    base = statistics.median(rates[("eager", 1)]) if ("eager", 1) in rates else None
    print(f"\n{args.model}, {args.images} JPEG images, {os.cpu_count()} CPUs, 1 thread per process, "
          f"{args.repeats} interleaved repeats")
    print(f"{'backend':<12} {'procs':>5} {'images/s (median)':>18} {'range':>15} {'x 1-proc eager':>15}")
    for (backend, procs), values in rates.items():
        median = statistics.median(values)
        ratio = f"{median / base:.2f}x" if base else "-"
        print(f"{backend:<12} {procs:>5} {median:>18.1f} {min(values):>7.1f}-{max(values):<7.1f} {ratio:>15}")


if __name__ == "__main__":
    main()
