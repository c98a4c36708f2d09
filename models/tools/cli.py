"""``python -m models``: commands for users and maintainers."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
from typing import Sequence


from . import api, download
from .manifest import DEFAULT_MANIFEST, MANIFEST_ENV, ManifestError, load_manifest, validate_manifest


def _selected(manifest, names: Sequence[str], all_models: bool) -> list[str]:
    if all_models or not names:
        return list(manifest.models)
    unknown = [n for n in names if n not in manifest.models]
    if unknown:
        raise SystemExit(
            f"error: no weights for {', '.join(unknown)} in {manifest.source}; "
            f"models with weights: {', '.join(manifest.models)}"
        )
    return list(names)


def _cached_state(entry) -> str:
    """"yes" if a file of the model is in the cache (not re-verified here: see verify)."""
    cache = download.default_cache_dir()
    return "yes" if any((cache / f.cache_name).exists() for f in entry.files) else "no"


def _list(args) -> int:
    manifest = load_manifest(args.manifest)
    rows = [("model", "weights", "top-1", "top-5", "params", "MACs", "input", "file size", "cached")]
    for name in api.list_models():
        if name in manifest.models:
            e = manifest[name]
            size = e.files[0].size
            rows.append((name, "yes", f"{e.top1:.2f}", f"{e.top5:.2f}", f"{e.num_params / 1e6:.2f} M",
                         f"{e.macs / 1e6:.1f} M", str(e.input_size), f"{size / 1e6:.1f} MB" if size else "?",
                         _cached_state(e)))
        else:
            model = api.get_model(name)
            params = sum(p.numel() for p in model.parameters())
            macs = api._UNRELEASED[name][1] if name in api._UNRELEASED else api._default_manifest()[name].macs
            rows.append((name, "no", "-", "-", f"{params / 1e6:.2f} M", f"{macs / 1e6:.1f} M",
                         str(model.default_input_size[0]), "-", "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _info(args) -> int:
    if args.model not in api.list_models():
        raise SystemExit(f"error: unknown model {args.model!r}; models: {', '.join(api.list_models())}")
    model = api.get_model(args.model)
    lines = [f"{args.model}: {type(model).__name__}", api._help_text(args.model).splitlines()[0], ""]
    lines += [
        f"architecture: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"default input {model.default_input_size[0]}x{model.default_input_size[1]}, "
        f"{model.num_features}-channel last feature map, {model.head_hidden_size}-d pooled features",
        "feature taps (features_only=True): " + ", ".join(
            f"{d['module']} (stride {d['reduction']}, {d['num_chs']} ch)" for d in model.feature_info),
    ]
    manifest = load_manifest(args.manifest)
    if args.model in manifest.models:
        weights = api.Weights(args.model, manifest[args.model])
        meta = {k: v for k, v in weights.meta.items() if k != "categories"}
        lines += ["", "published weights:"] + [f"  {k}: {v}" for k, v in meta.items()]
        lines += ["  categories: 1000 ImageNet-1k classes (" + ", ".join(weights.meta["categories"][:3]) + ", ...)"]
        lines += ["", "preprocessing (model.pretrained_weights.transforms()):", "  " + repr(weights.transforms())]
        lines += ["", "files, tried in this order:"]
        cache = download.default_cache_dir()
        for f in manifest[args.model].files:
            state = "in cache" if (cache / f.cache_name).exists() else "not in cache"
            lines.append(f"  [{f.index}] {f.format}, {f.size or 'unknown'} bytes, {state} ({cache / f.cache_name})")
            lines += [f"      {algo}: {digest}" for algo, digest in f.checksums.items()]
            lines += [f"      {url}" for url in f.urls]
    else:
        lines += ["", "no released weights"]
    print("\n".join(lines))
    return 0


def _predict(args) -> int:
    from .predict import SAMPLE_IMAGE, expand_sources, predict

    sources = expand_sources(args.images or [str(SAMPLE_IMAGE)])
    if not sources:
        raise SystemExit("error: no images found in " + ", ".join(args.images))
    model = api.get_model(args.model, pretrained=True, device=args.device, progress=not args.quiet)
    failed = 0
    for result in predict(model, sources, topk=args.topk, batch_size=args.batch_size, workers=args.workers,
                          progress=not args.quiet and not args.json):
        failed += bool(result.error)
        if result.error:
            print(f"{result.source}: skipped, {result.error}", file=sys.stderr)
        if args.json:
            record = {"image": result.source, "model": args.model}
            if result.error:
                record["error"] = result.error
            else:
                record["top"] = [{"label": label, "index": index, "probability": round(p, 6)}
                                 for label, index, p in result.top]
            print(json.dumps(record), flush=True)
        elif not result.error:
            print(result.source)
            for rank, (label, _, p) in enumerate(result.top, 1):
                print(f"  {rank}. {label:<32} {p * 100:6.2f}%")
    if failed:
        print(f"{failed} of {len(sources)} image(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _evaluate(args) -> int:
    from .evaluate import main as evaluate

    return evaluate(args)


def _benchmark(args) -> int:
    from .benchmark import main as benchmark

    return benchmark(args)


def _prefetch(args) -> int:
    manifest = load_manifest(args.manifest)
    failed = 0
    for name in _selected(manifest, args.models, args.all):
        try:
            path, file = download.fetch_first(manifest[name].files, progress=not args.quiet)
        except download.DownloadError as exc:
            print(f"{name}: FAILED\n{exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{name}: {path}")
    return 1 if failed else 0


def _verify(args) -> int:
    manifest = load_manifest(args.manifest)
    corrupt = 0
    for name in _selected(manifest, args.models, False):
        for file in manifest[name].files:
            state, detail = download.verify_cached(file)
            corrupt += state == "corrupt"
            print(f"{name} file {file.index}: {state} {detail}")
    if corrupt:
        print(f"{corrupt} cached file(s) failed verification; delete them or run prefetch again", file=sys.stderr)
    return 1 if corrupt else 0


def _pin(args) -> int:
    """Download every URL of every file, check it against what is recorded, and record the
    SHA-256 and size of the verified bytes where they are missing."""
    path = pathlib.Path(args.manifest or os.environ.get(MANIFEST_ENV) or DEFAULT_MANIFEST)
    manifest = load_manifest(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    problems = 0
    added = 0
    with tempfile.TemporaryDirectory(prefix="pin-") as tmp:
        for name in _selected(manifest, args.models, False):
            for file in manifest[name].files:
                measured: dict[str, tuple[str, int]] = {}
                for i, url in enumerate(file.urls):
                    single = dataclasses.replace(file, urls=(url,))
                    try:
                        got = download.fetch(single, progress=not args.quiet, cache=pathlib.Path(tmp) / f"{name}-{file.index}-{i}",
                                             offline=False, mirror="")
                    except download.DownloadError as exc:
                        problems += 1
                        print(f"REFUSED {name} file {file.index} {url}:\n{exc}", file=sys.stderr)
                        continue
                    measured[url] = (download.sha256_file(got), got.stat().st_size)
                if len(set(measured.values())) > 1:
                    problems += 1
                    print(f"REFUSED {name} file {file.index}: its URLs serve different bytes: {measured}", file=sys.stderr)
                    continue
                if not measured:
                    continue
                sha256, size = next(iter(measured.values()))
                entry = raw["models"][name]["files"][file.index]
                if "sha256" not in entry["checksums"]:
                    entry["checksums"]["sha256"] = sha256
                    added += 1
                if entry.get("size") is None:
                    entry["size"] = size
                    added += 1
                print(f"{name} file {file.index}: verified from {len(measured)} URL(s), sha256 {sha256}, {size} bytes")
    if added:
        invalid = validate_manifest(raw)
        if invalid:  # cannot happen for measured values; never write a manifest that would not load
            raise ManifestError(str(path), invalid)
        tmp_path = path.with_name(path.name + ".tmp")
        tmp_path.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_path, path)
        print(f"wrote {added} new value(s) to {path}")
    else:
        print(f"nothing to add to {path}")
    return 1 if problems else 0


def _check(args) -> int:
    manifest = load_manifest(args.manifest)
    files = sum(len(e.files) for e in manifest.models.values())
    print(f"{manifest.source}: valid ({len(manifest.models)} models, {files} weight files)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models", description="GhostNet and TinyNet weights and tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(group, name, func, help_text):
        sub = group.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(func=func)
        sub.add_argument("--manifest", help="manifest file (default: $GHOSTNET_HUB_MANIFEST or weights_manifest.json)")
        return sub

    add(commands, "list", _list, "the models, their published accuracy and cost, and whether their weights are cached")

    sub = add(commands, "info", _info, "everything known about one model: architecture, weights, preprocessing, files")
    sub.add_argument("model", metavar="MODEL")

    sub = add(commands, "predict", _predict, "classify images with a pretrained model (default: the bundled sample)")
    sub.add_argument("images", nargs="*", metavar="IMAGE|DIR|URL",
                     help="image files, directories (searched recursively) or http(s) URLs")
    sub.add_argument("--model", default="ghostnet_1x", choices=api.list_models(pretrained_only=False),
                     help="model with published weights (default: ghostnet_1x)")
    sub.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps")
    sub.add_argument("--topk", type=_int_at_least(1), default=5, help="classes to show per image (default: 5)")
    sub.add_argument("--batch-size", type=_int_at_least(1), default=32, help="images per forward pass (default: 32)")
    sub.add_argument("--workers", type=_int_at_least(0), default=None,
                     help="DataLoader worker processes (default: 0 for a few images, up to 4 for many)")
    sub.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")

    sub = add(commands, "evaluate", _evaluate,
              "top-1/top-5 on an ImageFolder tree (one folder per class); under torchrun, spread over processes")
    sub.add_argument("--model", required=True, choices=api.list_models(), metavar="MODEL")
    sub.add_argument("--data", required=True, metavar="DIR", help="ImageFolder root: class folders of images")
    sub.add_argument("--weights", help="your checkpoint (path or URL) instead of the published weights")
    sub.add_argument("--num-classes", type=_int_at_least(1), default=1000, help="classes of --weights (default: 1000)")
    sub.add_argument("--class-map", metavar="FILE", help="JSON object: class folder name -> class index")
    sub.add_argument("--batch-size", type=_int_at_least(1), default=64, help="default: 64")
    sub.add_argument("--workers", type=_int_at_least(0), default=min(4, os.cpu_count() or 1),
                     help="DataLoader worker processes per rank (default: up to 4)")
    sub.add_argument("--device", default=None, help="cpu (default), cuda (under torchrun: one GPU per rank), mps")
    sub.add_argument("--limit", type=_int_at_least(1), default=None, help="only the first N images (sorted)")
    sub.add_argument("--fused", action="store_true", help="fold BatchNorm first (same accuracy, faster)")
    sub.add_argument("--channels-last", action="store_true", help="channels_last memory layout")
    sub.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    sub.add_argument("--json", metavar="OUT", help="write the report as JSON (rank 0)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")

    sub = add(commands, "benchmark", _benchmark,
              "latency and throughput per model and mode, against timm and torchvision, and the accuracy-latency figure")
    sub.add_argument("--models", nargs="+", choices=api.list_models(), metavar="MODEL",
                     help="models to measure (default: the six with weights)")
    sub.add_argument("--modes", nargs="+", choices=("eager", "fused", "fused_cl"), default=["eager", "fused", "fused_cl"],
                     help="eager, fused (BatchNorm folded), fused_cl (fused + channels_last)")
    sub.add_argument("--compile", action="store_true", help="also torch.compile the fused channels_last model (slow to start)")
    sub.add_argument("--batch-sizes", nargs="+", type=_int_at_least(1), default=[1, 32], metavar="N",
                     help="batch 1 gives latency, larger batches throughput (default: 1 32)")
    sub.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps")
    sub.add_argument("--threads", type=_int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    sub.add_argument("--amp", choices=("bfloat16", "float16"), default=None, help="autocast dtype (mainly for GPUs)")
    sub.add_argument("--warmup", type=_int_at_least(0), default=5, help="untimed calls per candidate (default: 5)")
    sub.add_argument("--repeats", type=_int_at_least(1), default=20, help="timed rounds (default: 20)")
    sub.add_argument("--references", nargs="*", choices=("timm", "torchvision"), default=["timm", "torchvision"],
                     help="reference implementations to measure alongside (default: both)")
    sub.add_argument("--csv", help="write the results as CSV")
    sub.add_argument("--json", help="write the results and the machine description as JSON")
    sub.add_argument("--plot", help="draw published top-1 against latency to this PNG (needs matplotlib)")
    sub.add_argument("--quiet", action="store_true", help="no progress messages")

    sub = add(commands, "prefetch", _prefetch, "download and verify weights into the cache (for Docker images and clusters)")
    sub.add_argument("models", nargs="*", metavar="MODEL", help="models to fetch (default: all)")
    sub.add_argument("--all", action="store_true", help="every model with weights")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")

    sub = add(commands, "verify", _verify, "re-check every cached weight file against the manifest")
    sub.add_argument("models", nargs="*", metavar="MODEL", help="models to check (default: all)")

    manifest = commands.add_parser("manifest", help="maintainer commands on the weights manifest")
    manifest_commands = manifest.add_subparsers(dest="manifest_command", required=True, metavar="COMMAND")
    sub = add(manifest_commands, "pin", _pin, "download every source, verify it, and record missing SHA-256 and sizes")
    sub.add_argument("models", nargs="*", metavar="MODEL", help="models to pin (default: all)")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")
    add(manifest_commands, "check", _check, "validate the manifest and report every problem")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.manifest:
        # Every part of the command (building models too) reads the manifest from here.
        os.environ[MANIFEST_ENV] = args.manifest
    try:
        return args.func(args)
    except (ManifestError, download.CacheDirError, download.DownloadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
