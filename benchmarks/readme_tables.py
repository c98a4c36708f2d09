"""The README's speed tables, from one ``python -m models benchmark --json`` run.

    python benchmarks/readme_tables.py docs/benchmark-cpu-2threads.json

prints the "Speed" table (eager PyTorch modes) and the "Deploy" tables (runtimes, fp32 and
INT8; file sizes), every figure a ratio to timm eager measured in the same run. The README
holds exactly this output (tests/test_readme.py checks it), so its figures all come from the
committed run.
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


if __name__ == "__main__":
    for name, text in tables(sys.argv[1] if len(sys.argv) > 1 else "docs/benchmark-cpu-2threads.json").items():
        print(f"<!-- {name}-table -->\n{text}\n")
