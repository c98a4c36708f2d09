"""The benchmark's figure: published top-1 against measured latency, each family's models
joined by a line as in the papers' figures, one colour per way of running them, INT8 points
hollow (their top-1 is not published: they are drawn at the fp32 model's), labels placed so
that none overlaps another."""
from __future__ import annotations

FAMILIES = {"ghostnet": ("GhostNet", "o"), "tinynet": ("TinyNet", "s"), "mobilenet_v3": ("MobileNetV3", "v"),
            "efficientnet": ("EfficientNet", "^")}
COLOURS = {"timm eager": "#1f4e79", "torchvision eager": "#2e8b57", "ours eager": "#f5a623", "ours fused": "#e67e22",
           "ours fused_cl": "#c0392b", "ours compiled": "#6c3483", "ours onnxruntime": "#117a65",
           "ours executorch": "#2874a6", "ours onnxruntime_int8": "#48c9b0", "ours executorch_int8": "#85c1e9",
           "ours onnxruntime_int8_fdw": "#76d7c4", "ours executorch_int8_fdw": "#aed6f1", "ours openvino": "#7d3c98",
           "ours openvino_int8": "#bb8fce", "ours openvino_bf16": "#a569bd", "timm onnxruntime": "#5d6d7e"}


def family(model: str) -> tuple[str, str]:
    return next((value for prefix, value in FAMILIES.items() if model.startswith(prefix)), (model, "D"))


def _place_labels(ax, fig, labels: list[tuple[str, float, float]]) -> list:
    """Annotate each (text, x, y), trying offsets around the point until the label overlaps
    no label already placed and no point; returns (text, box in pixels) per label."""
    renderer = fig.canvas.get_renderer()
    points = [ax.transData.transform((x, y)) for _, x, y in labels]
    frame = ax.get_window_extent(renderer)
    offsets = [(5, 3), (5, -10), (-5, 3), (-5, -10), (5, 10), (-5, 10), (5, -17), (-5, -17), (12, 16), (-12, 16),
               (12, -23), (-12, -23), (5, 24), (-5, 24), (5, -30), (-5, -30)]
    placed, boxes = [], []
    for text, x, y in labels:
        best = None
        for dx, dy in offsets:
            note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                               ha="left" if dx > 0 else "right", va="bottom")
            box = note.get_window_extent(renderer).expanded(1.05, 1.1)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            clashes = 10 * sum(box.overlaps(b) for b in boxes) + sum(box.contains(*p) for p in points)
            clashes += 0 if inside else 5
            if best is None or clashes < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clashes, note, box)
            else:
                note.remove()
            if clashes == 0:
                break
        placed.append((text, best[1].get_window_extent(renderer)))
        boxes.append(best[2])
    return placed


def plot(results, env: dict, path) -> list:
    """Draw the figure to ``path``; returns (label, its box in pixels) for each model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib (pip install matplotlib)") from None
    batch = min(r.batch for r in results)
    points = [r for r in results if r.batch == batch and r.top1 is not None]
    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=110)
    series: dict[tuple[str, str], list] = {}
    for r in points:
        series.setdefault((family(r.model)[0], f"{r.implementation} {r.mode}"), []).append(r)
    for (_, way), group in series.items():
        # In size order, as the authors draw a family: a variant slower than a larger one shows as a kink.
        group.sort(key=lambda r: (r.top1, r.median_ms))
        int8 = "int8" in way
        colour = COLOURS.get(way, "#555555")
        ax.plot([r.median_ms for r in group], [r.top1 for r in group], color=colour, lw=1.2,
                ls="--" if int8 else "-", marker=family(group[0].model)[1], ms=6,
                mfc="white" if int8 else colour, mec=colour)
    # One label per model, at its point nearest the top-left (its fastest fp32 point).
    labels = {}
    for r in sorted(points, key=lambda r: ("int8" in r.mode, r.median_ms)):
        labels.setdefault(r.model, (r.model, r.median_ms, r.top1))
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_xlabel(f"latency at batch {batch} (ms, median, log scale), {env['device']}, {env['threads']} threads")
    ax.set_ylabel("published ImageNet top-1 (%)")
    ax.set_title(f"accuracy vs latency, torch {env['torch']}, {env['date']}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ways = sorted({way for _, way in series}, key=lambda w: list(COLOURS).index(w) if w in COLOURS else 99)
    handles = [Line2D([], [], color=COLOURS.get(w, "#555555"), ls="--" if "int8" in w else "-", marker="o",
                      mfc="white" if "int8" in w else COLOURS.get(w, "#555555"),
                      label=w + (" (top-1 not published: drawn at fp32's)" if "int8" in w else "")) for w in ways]
    handles += [Line2D([], [], color="black", ls="", marker=m, label=name)
                for name, m in sorted({family(r.model) for r in points})]
    ax.legend(handles=handles, fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.canvas.draw()  # the layout is final: label boxes can be measured
    boxes = _place_labels(ax, fig, list(labels.values()))
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return boxes
