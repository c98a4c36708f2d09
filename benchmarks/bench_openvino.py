"""What a call costs in OpenVINO beyond the model's own work, against ONNX Runtime: ratios from
runs interleaved round by round in one process. (The user-facing comparison of runtimes is
``python -m models benchmark``; this isolates the fixed cost that dominates a 2 ms model.)

    python benchmarks/bench_openvino.py [--model tinynet_e] [--threads 2] [--rounds 200]

1. A trivial graph (one Add on 8 floats): the fixed cost of a call, ONNX Runtime's
   ``session.run`` against OpenVINO called four ways (``compiled(x)``, ``request.infer(x)``
   sharing memory, a fresh input tensor each call, and the tensor bound once as the backend does).
2. The model at batch 1: ONNX Runtime, OpenVINO as a user gets it by default (the dynamic-batch IR
   compiled with OpenVINO's defaults: threads pinned to cores, ``compiled(x)``), and the backend
   of ``backends.load_file`` (a model per input shape, threads not pinned, the input bound once).
   Wall-clock medians and, where one thread runs the model in the caller's thread, the CPU time
   of that thread (robust to other processes on a shared machine).
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from models import api  # noqa: E402
from models.tools import _cpu, _openvino, backends, export  # noqa: E402


def _interleaved(candidates: dict, rounds: int, settle: float) -> dict[str, tuple[float, float]]:
    """{name: (median wall ms, median caller-thread CPU ms)}, round-robin after a warm-up."""
    for call in candidates.values():
        for _ in range(10):
            call()
    wall = {name: [] for name in candidates}
    cpu = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, call in candidates.items():
            time.sleep(settle)
            start, start_cpu = time.perf_counter(), time.thread_time()
            call()
            cpu[name].append(time.thread_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return {name: (statistics.median(wall[name]) * 1e3, statistics.median(cpu[name]) * 1e3) for name in candidates}


def fixed_cost(threads: int, rounds: int) -> dict:
    import onnx.helper as h
    import onnxruntime as ort
    import openvino as ov
    import openvino.opset13 as ops

    x = np.ones((1, 8), np.float32)
    graph = h.make_graph([h.make_node("Add", ["x", "x"], ["y"])], "add", [h.make_tensor_value_info("x", 1, [1, 8])],
                         [h.make_tensor_value_info("y", 1, [1, 8])])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]).SerializeToString(),
                                   options, providers=["CPUExecutionProvider"])
    param = ops.parameter([1, 8], np.float32, name="x")
    compiled = _openvino.core().compile_model(ov.Model([ops.add(param, param)], [param]), "CPU",
                                                 {**_openvino._CONFIG, "INFERENCE_NUM_THREADS": threads})
    request, bound = compiled.create_infer_request(), compiled.create_infer_request()
    buffer = np.zeros_like(x)
    bound.set_input_tensor(ov.Tensor(buffer, shared_memory=True))

    def fresh_tensor():
        request.set_input_tensor(ov.Tensor(x, shared_memory=True))
        request.infer()

    def bound_once():
        np.copyto(buffer, x)
        bound.infer()

    calls = {"onnxruntime run": lambda: session.run(None, {"x": x}), "openvino compiled(x)": lambda: compiled(x),
             "openvino infer(x, shared)": lambda: request.infer(x, share_inputs=True, share_outputs=True),
             "openvino new tensor + infer()": fresh_tensor, "openvino bound tensor + infer()": bound_once}
    # Tens of microseconds: many calls per sample, no pause between them.
    return {name: (min(_timed(call) for _ in range(5)), None) for name, call in calls.items()}


def _timed(call, n: int = 2000) -> float:
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n * 1e3


def model_cost(name: str, threads: int, rounds: int, settle: float) -> dict:
    torch.manual_seed(0)
    model = api.get_model(name).eval()
    size = model.default_input_size
    x = torch.randn(1, 3, *size)
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        export.export(model, "onnx", folder / "m.onnx")
        export.export(model, "openvino", folder / "m.xml")
        onnx_runner = backends.load_file(folder / "m.onnx", threads=threads)
        ours = backends.load_file(folder / "m.xml", threads=threads)
        naive = _openvino.core().compile_model(str(folder / "m.xml"), "CPU", {"INFERENCE_NUM_THREADS": threads})
        array = x.numpy()
        candidates = {"onnxruntime (our ONNX)": lambda: onnx_runner(x),
                      "openvino defaults (dynamic, pinned, compiled(x))": lambda: naive(array),
                      "openvino backend (per shape, unpinned, bound input)": lambda: ours(x)}
        return _interleaved(candidates, rounds, settle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tinynet_e", choices=api.list_models())
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--settle", type=float, default=0.05, help="idle seconds before each timed call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cpu: {_cpu.summary()}; threads={args.threads}")
    for title, figures in (("fixed cost of a call (trivial graph)", fixed_cost(args.threads, args.rounds)),
                           (f"{args.model}, batch 1", model_cost(args.model, args.threads, args.rounds, args.settle))):
        print(f"\n{title}")
        base = next(iter(figures.values()))[0]
        for what, (wall, cpu) in figures.items():
            extra = f", caller-thread CPU {cpu:.3f} ms" if cpu is not None else ""
            print(f"  {what:52s} {wall:8.3f} ms ({wall / base:.2f}x){extra}")


if __name__ == "__main__":
    main()
