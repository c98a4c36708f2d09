"""``python -m models``: commands for users and maintainers."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import tempfile
from typing import Sequence

from . import download
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


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
                    measured[url] = (_sha256(got), got.stat().st_size)
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
    try:
        return args.func(args)
    except (ManifestError, download.CacheDirError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
