"""``ghostnet-hub`` (``python -m models`` in a clone): commands for users and maintainers. The
weights commands live here; each application module (predict, evaluate, benchmark) registers its
own command."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import warnings
from collections.abc import Sequence

from .. import __version__, _cache_files, _commands, _trust, api, download
from .._hashing import sha256_file
from ..cache import CacheDirError, cache_dir, default_cache_dir, exports_dir, url_prefix
from ..manifest import DEFAULT_MANIFEST, MANIFEST_ENV, ManifestError, load_manifest, validate_manifest
from ..weights import CheckpointError, get_weights
from . import backends, benchmark, evaluate, export, finetune, label, predict
from ._args import add_command


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
    cache = default_cache_dir()
    return "yes" if any((cache / f.cache_name).exists() for f in entry.files) else "no"


def _list(args) -> int:
    manifest = load_manifest(args.manifest)
    rows = [("model", "weights", "top-1", "top-5", "params", "MACs", "input", "file size", "cached")]
    for name in api.list_models():
        if name in manifest.models:
            e = manifest[name]
            size = e.files[0].size
            pinned = all(f.pinned for f in e.files)
            rows.append((name, "yes" if pinned else "yes (unpinned)", f"{e.top1:.2f}", f"{e.top5:.2f}",
                         f"{e.num_params / 1e6:.2f} M",
                         f"{e.macs / 1e6:.1f} M", str(e.input_size), f"{size / 1e6:.1f} MB" if size else "?",
                         _cached_state(e)))
        else:
            # The table row's facts (GhostNetV3's size is its deploy form's, as published).
            v = api.get_variant(name)
            rows.append((name, "no", "-", "-", f"{v.num_params / 1e6:.2f} M", f"{v.macs / 1e6:.1f} M",
                         str(v.input_size), "-", "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _info(args) -> int:
    if args.model not in api.list_models():
        raise SystemExit(f"error: unknown model {args.model!r}; models: {', '.join(api.list_models())}")
    model = api.get_model(args.model)
    form = " (training form; reparameterize() or fuse=True folds its branches)" if hasattr(
        model, "reparameterize") else ""
    lines = [f"{args.model}: {type(model).__name__}", api.get_variant(args.model).title + ".", ""]
    lines += [
        f"architecture: {sum(p.numel() for p in model.parameters()):,} parameters{form}, "
        f"default input {model.default_input_size[0]}x{model.default_input_size[1]}, "
        f"{model.num_features}-channel last feature map, {model.head_hidden_size}-d pooled features",
        "feature taps (features_only=True): " + ", ".join(
            f"{d['module']} (stride {d['reduction']}, {d['num_chs']} ch)" for d in model.feature_info),
    ]
    manifest = load_manifest(args.manifest)
    if args.model in manifest.models:
        weights = get_weights(args.model, manifest)
        meta = {k: v for k, v in weights.meta.items() if k != "categories"}
        lines += ["", "published weights:"] + [f"  {k}: {v}" for k, v in meta.items()]
        lines += ["  categories: 1000 ImageNet-1k classes (" + ", ".join(weights.meta["categories"][:3]) + ", ...)"]
        lines += ["", "preprocessing (model.pretrained_weights.transforms()):", "  " + repr(weights.transforms())]
        lines += ["", "files, tried in this order:"]
        cache = default_cache_dir()
        for f in manifest[args.model].files:
            state = "in cache" if (cache / f.cache_name).exists() else "not in cache"
            pinned = "pinned" if f.pinned else "unpinned"
            lines.append(f"  [{f.index}] {f.format}, {f.size or 'unknown'} bytes, {pinned}, {state} "
                         f"({cache / f.cache_name})")
            lines += [f"      {algo}: {digest}" for algo, digest in f.checksums.items()]
            if not f.pinned:
                record = _trust.read_record(f)
                lines.append("      unpinned (no checksum published): " + (
                    f"trusted on first use {record['recorded']}, sha256 {record['sha256']}, {record['size']} bytes"
                    if record else "not used here yet; trusted on first use"))
            lines += [f"      {url}" for url in f.urls]
    else:
        lines += ["", "no released weights"]
    print("\n".join(lines))
    return 0


def _prefetch(args) -> int:
    manifest = load_manifest(args.manifest)
    failed = 0
    for name in _selected(manifest, args.models, args.all):
        try:
            path, file = _trust.fetch(manifest[name].files, progress=not args.quiet)
        except download.CacheWriteError as exc:  # the disk, not the sources: the next model would fail too
            print(f"{name}: FAILED\n{exc}", file=sys.stderr)
            return 1
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
            state, detail = _trust.state_of(file)
            corrupt += state == "corrupt"
            print(f"{name} file {file.index}: {state} {detail}")
    if corrupt:
        print(f"{corrupt} cached file(s) failed verification; delete them or run prefetch again", file=sys.stderr)
    return 1 if corrupt else 0


def _pin(args) -> int:
    """Download every URL of every file, check it against what is recorded (and the files of one
    model against each other, tensor for tensor), and record the SHA-256 and size of the verified
    bytes where they are missing: an unpinned file becomes pinned."""
    path = pathlib.Path(args.manifest or os.environ.get(MANIFEST_ENV) or DEFAULT_MANIFEST)
    manifest = load_manifest(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    problems = 0
    added = 0
    with tempfile.TemporaryDirectory(prefix="pin-") as tmp:
        for name in _selected(manifest, args.models, False):
            copies, values = [], []
            for file in manifest[name].files:
                measured: dict[str, tuple[str, int]] = {}
                for i, url in enumerate(file.urls):
                    single = dataclasses.replace(file, urls=(url,))
                    try:
                        got = download.fetch(single, progress=not args.quiet, offline=False, mirror="",
                                             cache=pathlib.Path(tmp) / f"{name}-{file.index}-{i}")
                    except download.DownloadError as exc:
                        problems += 1
                        print(f"REFUSED {name} file {file.index} {url}:\n{exc}", file=sys.stderr)
                        continue
                    measured[url] = (sha256_file(got), got.stat().st_size)
                    if len(measured) == 1:
                        copies.append((file, got, url))
                if len(set(measured.values())) > 1:
                    problems += 1
                    print(f"REFUSED {name} file {file.index}: its URLs serve different bytes: {measured}",
                          file=sys.stderr)
                    copies = [c for c in copies if c[0] is not file]
                    continue
                if measured:
                    values.append((file, *next(iter(measured.values())), len(measured)))
            try:
                disagreement = _trust.sources_agree(copies)
            except CheckpointError as exc:
                disagreement = str(exc)
            if disagreement:
                problems += 1
                print(f"REFUSED {name}: its files disagree: {disagreement}; nothing recorded for it", file=sys.stderr)
                continue
            for file, sha256, size, count in values:
                added += _record_pin(raw["models"][name]["files"][file.index], sha256, size)
                print(f"{name} file {file.index}: verified from {count} URL(s), sha256 {sha256}, {size} bytes")
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


def _record_pin(entry: dict, sha256: str, size: int) -> int:
    """Record what was measured where the manifest ``entry`` lacks it; how many values were added."""
    added = 0
    if "sha256" not in entry["checksums"]:
        entry["checksums"]["sha256"] = sha256
        entry.pop("unpinned", None)  # pinned from now on
        added += 1
    if entry.get("size") is None:
        entry["size"] = size
        added += 1
    return added


def _check(args) -> int:
    manifest = load_manifest(args.manifest, architectures=api.list_models())
    files = sum(len(e.files) for e in manifest.models.values())
    print(f"{manifest.source}: valid ({len(manifest.models)} models, {files} weight files)")
    return 0


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _cache_models(args) -> tuple[list[str], list]:
    manifest = load_manifest(args.manifest)
    names = list(dict.fromkeys([*api.list_models(), *manifest.models]))
    return names, [f for e in manifest.models.values() for f in e.files]


def _cache_dirs(writable: bool) -> list[tuple[pathlib.Path, bool]]:
    """(directory, holds exports): the weights cache, and the exports made on the fly."""
    return [(cache_dir(writable=writable), False), (exports_dir(), True)]


def _cache_list(args) -> int:
    names, files = _cache_models(args)
    corrupt = False
    for directory, exports in _cache_dirs(writable=False):
        entries, others = _cache_files.scan(directory, files, names, verify=not args.no_verify, exports=exports)
        if exports and not entries:
            continue  # no export was ever made on the fly: nothing to say
        rows = [("model", "kind", "size", "age", "state", "file")]
        rows += [(e.model, e.kind, _size(e.size), f"{e.age_days:.0f} d" if e.age_days >= 1 else "today", e.state,
                  e.path.name) for e in entries]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        print(f"{directory}: {len(entries)} file(s) of this package, {_size(sum(e.size for e in entries))}"
              + (f"; {others} other file(s) not shown" if others else ""))
        if entries:
            for row in rows:
                print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        corrupt = corrupt or any(e.state.startswith("corrupt") for e in entries)
    return 1 if corrupt else 0


def _cache_prune(args) -> int:
    names, _ = _cache_models(args)
    removed = []
    for directory, exports in _cache_dirs(writable=True):
        removed += _cache_files.prune(directory, names, args.days, exports=exports)
    for entry in removed:
        print(f"removed {entry.kind} {entry.path.name} ({_size(entry.size)}, {entry.age_days:.1f} days old)")
    print(f"pruned {len(removed)} file(s), {_size(sum(e.size for e in removed))}")
    return 0


def _cache_clear(args) -> int:
    names, _ = _cache_models(args)
    unknown = [m for m in args.models if m not in names and m != "url" and not download.is_url(m)]
    if unknown:
        raise SystemExit(f"error: unknown model {', '.join(unknown)}; models: {', '.join(names)} (or url for every "
                         "user URL's files, or one URL)")
    only = [url_prefix(m) if download.is_url(m) else m for m in args.models]
    removed, busy = [], []
    for directory, exports in _cache_dirs(writable=True):
        gone, held = _cache_files.clear(directory, names, only, exports=exports)
        removed, busy = removed + gone, busy + held
    for entry in removed:
        print(f"removed {entry.path.name} ({_size(entry.size)})")
    for final in busy:
        print(f"skipped {final}: another process holds its lock (downloading or exporting?)", file=sys.stderr)
    print(f"cleared {len(removed)} file(s), {_size(sum(e.size for e in removed))}")
    return 1 if busy else 0


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """``prog``: how the user started the command (``python -m ghostnet_hub``); by default the
    command this copy of the package has (``ghostnet-hub`` installed, ``python -m models`` in a clone)."""
    parser = argparse.ArgumentParser(prog=prog or _commands.command(),
                                     description="GhostNet and TinyNet weights and tools.")
    parser.add_argument("--version", action="version", version=f"ghostnet-hub {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_command(commands, "list", _list,
                "the models, their published accuracy and cost, and whether their weights are cached")
    sub = add_command(commands, "info", _info,
                      "everything known about one model: architecture, weights, preprocessing, files")
    sub.add_argument("model", metavar="MODEL")
    for tool in (predict, label, evaluate, benchmark, finetune, export):
        tool.register(commands)

    sub = add_command(commands, "prefetch", _prefetch,
                      "download and verify weights into the cache (for Docker images and clusters)")
    sub.add_argument("models", nargs="*", metavar="MODEL", help="models to fetch (default: all)")
    sub.add_argument("--all", action="store_true", help="every model with weights")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")

    sub = add_command(commands, "verify", _verify, "re-check every cached weight file against the manifest")
    sub.add_argument("models", nargs="*", metavar="MODEL", help="models to check (default: all)")

    cache = commands.add_parser("cache", help="what is in the weights cache; remove leftovers or weights")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")
    sub = add_command(cache_commands, "list", _cache_list,
                      "every file of this package in the weights cache and the export cache (exports made on the "
                      "fly by --backend): model, kind, size, age, verified or not")
    sub.add_argument("--no-verify", action="store_true", help="do not hash the weight files")
    sub = add_command(cache_commands, "prune", _cache_prune,
                      "remove partial downloads, quarantined files and failure records older than --days, "
                      "locks nobody holds, and damaged exports")
    sub.add_argument("--days", type=float, default=7.0, help="minimum age in days (default: 7)")
    sub = add_command(cache_commands, "clear", _cache_clear,
                      "remove the cached weights and exports of MODEL (default: of every model and user URL)")
    sub.add_argument("models", nargs="*", metavar="MODEL|url|URL",
                     help="a model, url (every file downloaded from a user's URL, checkpoint=URL), or one such URL")

    manifest = commands.add_parser("manifest", help="maintainer commands on the weights manifest")
    manifest_commands = manifest.add_subparsers(dest="manifest_command", required=True, metavar="COMMAND")
    sub = add_command(manifest_commands, "pin", _pin,
                      "download every source, verify it, and record missing SHA-256 and sizes")
    sub.add_argument("models", nargs="*", metavar="MODEL", help="models to pin (default: all)")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")
    add_command(manifest_commands, "check", _check, "validate the manifest and report every problem")
    return parser


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    # A command's user is told what happened, not which library line noticed it.
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _warn_in_one_line
    try:
        return args.func(args)
    # Expected failures (a full disk, no network, a bad file, a missing runtime) are reported, never a traceback.
    except (ManifestError, CacheDirError, download.DownloadError, ValueError, OSError,
            backends.MissingRuntime) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown
