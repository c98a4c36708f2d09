"""Start-up benchmarks: ratios against references measured in the same run, interleaved.
(The user-facing inference-speed benchmark is ``python -m models benchmark``.)

    python benchmarks/bench_hub.py [--model tinynet_a] [--repeats 7]

1. Cold start: a new Python process that loads the pretrained model from the local cache
   (torch.hub.load of this checkout, checksums verified) and runs one forward pass, against
   timm doing the same from the same local file (``pretrained_cfg_overlay=dict(file=...)``),
   when timm is installed. ``python -c "import torch"`` is shown as the floor.
2. In-process: building with weights (meta-device build, weights loaded in place) against
   building with random init and then loading the same state dict.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import models  # noqa: E402
from models.manifest import load_manifest  # noqa: E402

OURS = """
import sys, torch
model = torch.hub.load(sys.argv[1], sys.argv[2], source="local", pretrained=True, progress=False)
size = model.default_input_size
with torch.inference_mode():
    model(torch.randn(1, 3, *size))
"""
TIMM = """
import sys, torch, timm
model = timm.create_model(sys.argv[2], pretrained=True, pretrained_cfg_overlay=dict(file=sys.argv[3])).eval()
size = model.pretrained_cfg["input_size"][1:]
with torch.inference_mode():
    model(torch.randn(1, 3, *size))
"""
FLOOR = "import torch"


def _prepare(name: str, tmp: pathlib.Path) -> tuple[dict, pathlib.Path]:
    """A cache holding a checkpoint-shaped file for ``name``, and a manifest vouching for it."""
    buffer = io.BytesIO()
    torch.save(models.get_model(name).state_dict(), buffer)
    data = buffer.getvalue()
    raw = json.loads((ROOT / "weights_manifest.json").read_text())
    entry = raw["models"][name]
    entry["files"] = [{"urls": ["https://example.invalid/w.pth"], "format": "torch",
                       "checksums": {"sha256": hashlib.sha256(data).hexdigest()}, "size": len(data)}]
    raw["models"] = {name: entry}
    manifest = tmp / "manifest.json"
    manifest.write_text(json.dumps(raw))
    env = {**os.environ, "TORCH_HOME": str(tmp / "torch"), "GHOSTNET_HUB_MANIFEST": str(manifest),
           "GHOSTNET_HUB_OFFLINE": "1"}
    cache = tmp / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    path = cache / load_manifest(manifest)[name].files[0].cache_name
    path.write_bytes(data)
    return env, path


def _run(code: str, args: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], env=env, check=True, cwd=tempfile.gettempdir())
    return time.perf_counter() - start


def _summary(label: str, times: list[float]) -> float:
    median = statistics.median(times)
    print(f"  {label:<52} median {median * 1e3:7.0f} ms  (min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f})")
    return median


def cold_start(name: str, repeats: int, env: dict, path: pathlib.Path) -> None:
    try:
        import timm  # noqa: F401
        have_timm = True
    except ImportError:
        have_timm = False
    runs = {"floor": [], "ours": [], "timm": []}
    for _ in range(repeats):
        runs["floor"].append(_run(FLOOR, [], env))
        runs["ours"].append(_run(OURS, [str(ROOT), name], env))
        if have_timm:
            runs["timm"].append(_run(TIMM, [str(ROOT), models.get_variant(name).timm_name, str(path)], env))
    print(f"\ncold start: new process, {name} from the local cache, one forward pass")
    floor = _summary('python -c "import torch" (floor)', runs["floor"])
    ours = _summary("torch.hub.load(local checkout, pretrained=True)", runs["ours"])
    if have_timm:
        ref = _summary("timm.create_model(pretrained=True, file=...)", runs["timm"])
        print(f"  ratio ours/timm: {ours / ref:.2f}x; above the torch import: {(ours - floor) / (ref - floor):.2f}x")
    else:
        print("  timm is not installed: no reference")


def build_with_weights(name: str, repeats: int) -> None:
    state = models.get_model(name, pretrained=True, progress=False).state_dict()
    state = {k: v.clone() for k, v in state.items()}

    def ours():
        models.get_model(name, pretrained=True, progress=False)

    def random_then_load():
        from models.weights import pretrained_state_dict

        model = models.get_model(name)
        model.load_state_dict(pretrained_state_dict(name, progress=False))
        model.eval()

    ours(), random_then_load()
    a, b = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ours()
        a.append(time.perf_counter() - start)
        start = time.perf_counter()
        random_then_load()
        b.append(time.perf_counter() - start)
    print(f"\nin-process build of {name} with its (cached, verified) weights")
    ours_t = _summary("get_model(pretrained=True): meta build, load in place", a)
    ref_t = _summary("random init, then load_state_dict", b)
    print(f"  ratio: {ours_t / ref_t:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tinynet_a", choices=models.list_models(pretrained=True))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        env, path = _prepare(args.model, pathlib.Path(tmp))
        cold_start(args.model, args.repeats, env, path)
        os.environ.update({k: env[k] for k in ("TORCH_HOME", "GHOSTNET_HUB_MANIFEST", "GHOSTNET_HUB_OFFLINE")})
        build_with_weights(args.model, args.repeats * 3)


if __name__ == "__main__":
    main()
