"""The speed tables of docs/speed.md and the README's summary line, from one
``python -m models benchmark --json`` run.

    python benchmarks/readme_tables.py docs/benchmark-cpu-2threads.json

prints the "Speed" table (eager PyTorch modes) and the "Deploy runtimes" tables (runtimes, fp32
and INT8; file sizes), every figure a ratio to timm eager measured in the same run, and the one
line the README shows (``summary``). docs/speed.md and README.md hold exactly this output
(tests/test_readme.py checks it), so their figures all come from the committed run.
"""
from __future__ import annotations

import json
import sys

EAGER = {"eager": "eager", "fused": "fused", "fused_cl": "fused + channels_last", "compiled": "torch.compile"}
RUNTIMES = {
    "fused_cl": "fused + channels_last",
    "compiled": "torch.compile",
    "onnxruntime": "ONNX Runtime",
    "executorch": "ExecuTorch",
    "onnxruntime_int8": "ONNX Runtime INT8",
    "onnxruntime_int8_fdw": "ONNX Runtime INT8, dw float",
    "executorch_int8": "ExecuTorch INT8",
    "executorch_int8_fdw": "ExecuTorch INT8, dw float",
    "openvino": "OpenVINO",
    "openvino_bf16": "OpenVINO bf16",
    "compile_bf16": "torch.compile bf16",
    "openvino_int8": "OpenVINO INT8",
    "openvino_int8_fdw": "OpenVINO INT8, dw float",
    "compile_int8_x86": "torch.compile INT8 (x86)",
}
# fp32 file -> its INT8 file
FILES = {"onnxruntime": "onnxruntime_int8", "executorch": "executorch_int8", "openvino": "openvino_int8"}
PEER = "ONNX Runtime on timm's ONNX"  # timm's "onnxruntime" rows, when the run measured them


def _results(path: str) -> tuple[dict, list[str], list[int]]:
    with open(path) as f:
        results = json.load(f)["results"]
    ours = {(r["model"], r["mode"], r["batch"]): r for r in results if r["implementation"] == "ours"}
    # (timm's rows: eager, and the peer "onnxruntime" on timm's ONNX export)
    timm, peer = ({(r["model"], r["batch"]): r for r in results if r["implementation"] == "timm" and r["mode"] == mode}
                  for mode in ("eager", "onnxruntime"))
    models = list(dict.fromkeys(r["model"] for r in results if r["implementation"] == "ours"))
    batches = sorted({r["batch"] for r in results})
    return {"ours": ours, "timm": timm, "peer": peer}, models, batches


def _cell(r: dict, batch: int, bold: bool = False, absolute: bool = False) -> str:
    text = f"{r['vs_timm']:.2f}×"
    if absolute:
        text += f" ({r['median_ms']:.1f} ms)" if batch == 1 else f" ({r['images_per_s']:.0f} img/s)"
    return f"**{text}**" if bold else text


def _table(data: dict, models: list[str], batches: list[int], columns: dict, best_groups: list[set],
           peer: bool = False) -> str:
    modes = [m for m in columns if any((name, m, b) in data["ours"] for name in models for b in batches)]
    peer = peer and bool(data["peer"])
    lines = []
    for batch in batches:
        what = "latency" if batch == 1 else "throughput"
        lines.append(f"| batch {batch} {what}, vs timm eager | timm eager | " + (f"{PEER} | " if peer else "")
                     + " | ".join(columns[m] for m in modes) + " |")
        lines.append("|---" * (len(modes) + 2 + peer) + "|")
        for name in models:
            ref = data["timm"][(name, batch)]
            cells = [name, f"{ref['median_ms']:.1f} ms" if batch == 1 else f"{ref['images_per_s']:.0f} img/s"]
            if peer:
                cells.append(_cell(data["peer"][(name, batch)], batch, absolute=True))
            rows = {m: data["ours"].get((name, m, batch)) for m in modes}
            best = set()
            for group in best_groups:  # the best of each group (fp32, INT8) is bold, with its absolute figure
                present = [m for m in modes if m in group and rows[m]]
                if present:
                    pick = min if batch == 1 else max
                    best.add(pick(present, key=lambda m: rows[m]["vs_timm"]))
            cells += [_cell(rows[m], batch, m in best, m in best) if rows[m] else "–" for m in modes]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def _files(data: dict, models: list[str]) -> str:
    pairs = [(fp32, int8) for fp32, int8 in FILES.items() if any((n, fp32, 1) in data["ours"] for n in models)]
    lines = ["| file, MB | " + " | ".join(f"{RUNTIMES[a]} fp32 | INT8 (vs fp32)" for a, _ in pairs) + " |",
             "|---" * (2 * len(pairs) + 1) + "|"]
    for name in models:
        cells = [name]
        for fp32, int8 in pairs:
            a, b = data["ours"].get((name, fp32, 1)), data["ours"].get((name, int8, 1))
            cells.append(f"{a['file_mb']:.1f}" if a else "–")
            cells.append(f"{b['file_mb']:.1f} ({b['file_mb'] / a['file_mb']:.2f}×)" if a and b else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables(path: str) -> dict[str, str]:
    """``{"speed": ..., "deploy": ..., "files": ...}``: markdown tables of the run at ``path``."""
    data, models, batches = _results(path)
    fp32 = {"eager", "fused", "fused_cl", "compiled", "onnxruntime", "executorch", "openvino"}
    int8 = {m for m in RUNTIMES if "int8" in m}
    bf16 = {m for m in RUNTIMES if "bf16" in m}
    return {"speed": _table(data, models, batches, EAGER, [set(EAGER)]),
            "deploy": _table(data, models, batches, RUNTIMES, [fp32, int8, bf16], peer=True),
            "files": _files(data, models)}


def _range(data: dict, models: list[str], mode: str, batch: int) -> str:
    ratios = [data["ours"][(name, mode, batch)]["vs_timm"] for name in models if (name, mode, batch) in data["ours"]]
    return f"{min(ratios):.2f}–{max(ratios):.2f}×"


def summary(path: str) -> str:
    """The README's one line on speed: the ranges over the models of the fused + channels_last
    and ONNX Runtime ratios to timm eager, batch 1 latency and batch 32 throughput."""
    data, models, batches = _results(path)
    first, last = batches[0], batches[-1]
    line = (f"One run on this project's 2-vCPU CI machine, as ratios to timm eager in the same run: fused + "
            f"channels_last PyTorch takes {_range(data, models, 'fused_cl', first)} of its batch-{first} latency "
            f"and gives {_range(data, models, 'fused_cl', last)} its batch-{last} throughput")
    if any(key[1] == "onnxruntime" for key in data["ours"]):
        line += (f"; ONNX Runtime takes {_range(data, models, 'onnxruntime', first)} and gives "
                 f"{_range(data, models, 'onnxruntime', last)}")
    return line + "."


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "docs/benchmark-cpu-2threads.json"
    for name, text in tables(path).items():
        print(f"<!-- {name}-table -->\n{text}\n")
    print(f"<!-- speed-summary -->\n{summary(path)}")
