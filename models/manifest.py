"""weights_manifest.json: what each pretrained model's weight files are, and how to check them.

The manifest is data, and data from disk is not trusted blindly: ``load_manifest`` checks
every field and reports every problem at once, each with its JSON path.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pathlib
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._files import read_regular
from ._strict_json import json_problems, parse, too_deep

__all__ = [
    "DEFAULT_MANIFEST",
    "MANIFEST_ENV",
    "SCHEMA_VERSION",
    "ManifestError",
    "Manifest",
    "ModelEntry",
    "WeightFile",
    "load_manifest",
    "validate_manifest",
]

SCHEMA_VERSION = 1
_PACKAGE = pathlib.Path(__file__).resolve().parent
# An installed package carries its copy (setup.py); a clone, and torch.hub's copy of it, has it at the root.
DEFAULT_MANIFEST = next((p for p in (_PACKAGE / "weights_manifest.json", _PACKAGE.parent / "weights_manifest.json")
                         if p.is_file()), _PACKAGE.parent / "weights_manifest.json")
MANIFEST_ENV = "GHOSTNET_HUB_MANIFEST"

# Digest name -> hex length. Checked in this order, strongest first.
CHECKSUM_LENGTHS = {"sha256": 64, "git_blob_sha1": 40, "md5": 32}
FORMATS = {"torch": ".pth", "safetensors": ".safetensors"}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# A model name becomes part of file names in the cache: nothing but these, bounded.
_MODEL_NAME = re.compile(r"[a-z0-9_]{1,64}")
# Bounds on what a manifest may hold (the repository's is 12 kB, 6 levels deep, 6 models, 3
# files a model, 2 URLs a file), so that no manifest can exhaust memory, the stack or a terminal.
MAX_BYTES, MAX_DEPTH = 16 << 20, 32
MAX_MODELS, MAX_FILES, MAX_URLS = 256, 32, 32
_SHOWN_PROBLEMS, _PROBLEM_CHARS = 20, 300


class ManifestError(ValueError):
    """The manifest is unusable; ``problems`` lists each one with its JSON path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        # However broken the file, the message stays short: the first problems, each cut short.
        shown = [p if len(p) <= _PROBLEM_CHARS else p[:_PROBLEM_CHARS - 3] + "..." for p in problems[:_SHOWN_PROBLEMS]]
        more = len(problems) - len(shown)
        lines = "\n".join(f"  - {p}" for p in shown) + (f"\n  ... and {more} more problem(s)" if more else "")
        super().__init__(f"invalid weights manifest {source} ({len(problems)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class WeightFile:
    """One file of weights: the same bytes at each of ``urls``."""

    model: str
    index: int
    urls: tuple[str, ...]
    format: str
    checksums: Mapping[str, str]
    size: int | None
    notes: str = ""
    # False for a file nobody published a checksum for: trusted on first use (see _trust.py).
    pinned: bool = True

    @property
    def cache_name(self) -> str:
        """File name in the cache (and on a mirror): model, first recorded digest, extension.

        The digest in the name keeps two different files out of one cache slot. The first
        recorded one is used (not the strongest) so that pinning a SHA-256 later, which
        appends it, does not move a file already in everyone's cache. An unpinned file is
        named by its URLs instead.
        """
        if not self.pinned:
            digest = hashlib.sha256("\n".join(self.urls).encode()).hexdigest()
            return f"{self.model}-unpinned-{digest[:12]}{FORMATS[self.format]}"
        digest = next(iter(self.checksums.values()))
        return f"{self.model}-{digest[:16]}{FORMATS[self.format]}"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    top1: float
    top5: float
    metrics_source: str
    num_params: int
    macs: int
    input_size: int
    resize_size: int
    crop_ratio: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    license: str
    license_source: str
    paper: str
    upstream: str
    files: tuple[WeightFile, ...]


@dataclass(frozen=True)
class Manifest:
    source: str
    models: Mapping[str, ModelEntry]
    raw: Mapping[str, Any]

    def __getitem__(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            raise KeyError(
                f"no weights for {name!r} in {self.source}; models with weights: {', '.join(self.models)}"
            ) from None


# -- validation ---------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        isinstance(value, int) or math.isfinite(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _url_problem(url: Any) -> str | None:
    if not isinstance(url, str):
        return f"expected a URL string, got {type(url).__name__}"
    parts = urllib.parse.urlsplit(url)
    if not parts.netloc:
        return f"not an absolute URL: {url!r}"
    # Plain http would let anyone on the path swap the file before it is verified; it is
    # accepted only for this machine's loopback address (tests and local servers).
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK):
        return None
    return f"must be an https URL, got {url!r}"


_MODEL_FIELDS: dict[str, tuple[str, Any]] = {
    # field: (description, check)
    "metrics": ("an object with top1, top5, source", None),
    "num_params": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "macs": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "input_size": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "resize_size": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "crop_ratio": ("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
    "interpolation": (f"one of {', '.join(INTERPOLATIONS)}", lambda v: v in INTERPOLATIONS),
    "mean": ("a list of 3 numbers", lambda v: isinstance(v, list) and len(v) == 3 and all(map(_is_number, v))),
    "std": ("a list of 3 positive numbers",
            lambda v: isinstance(v, list) and len(v) == 3 and all(_is_number(x) and x > 0 for x in v)),
    "license": ("a non-empty string", lambda v: isinstance(v, str) and v.strip() != ""),
    "license_source": ("a non-empty string", lambda v: isinstance(v, str) and v.strip() != ""),
    "paper": ("an https URL", lambda v: _url_problem(v) is None),
    "upstream": ("an https URL", lambda v: _url_problem(v) is None),
    "files": ("a non-empty list of weight files", None),
}
_FILE_FIELDS = {"urls", "format", "checksums", "size", "notes"}


def _check_object(value: Any, path: str, required: set[str], optional: set[str], problems: list[str]) -> bool:
    if not isinstance(value, dict):
        problems.append(f"{path}: expected an object, got {type(value).__name__}")
        return False
    for key in sorted(required - value.keys()):
        problems.append(f"{path}.{key}: missing")
    for key in sorted(value.keys() - required - optional):
        problems.append(f"{path}.{key}: unknown field")
    return True


def _validate_file(entry: Any, path: str, problems: list[str]) -> None:
    if not _check_object(entry, path, {"urls", "format", "checksums"}, {"size", "notes", "unpinned"}, problems):
        return
    unpinned = entry.get("unpinned", False)
    if unpinned is not False and unpinned is not True:
        problems.append(f"{path}.unpinned: expected true (or no such field), got {unpinned!r}")
    elif unpinned and entry.get("checksums"):
        problems.append(f"{path}.unpinned: a file with a recorded checksum is pinned; remove \"unpinned\"")
    urls = entry.get("urls")
    if "urls" in entry:
        if not isinstance(urls, list) or not urls:
            problems.append(f"{path}.urls: expected a non-empty list of URLs")
        elif len(urls) > MAX_URLS:
            problems.append(f"{path}.urls: {len(urls)} URLs; at most {MAX_URLS}")
        else:
            for i, url in enumerate(urls):
                problem = _url_problem(url)
                if problem:
                    problems.append(f"{path}.urls[{i}]: {problem}")
            if len(set(map(str, urls))) != len(urls):
                problems.append(f"{path}.urls: the same URL is listed twice")
    if "format" in entry and entry["format"] not in FORMATS:
        problems.append(f"{path}.format: expected one of {', '.join(FORMATS)}, got {entry['format']!r}")
    if "checksums" in entry:
        checksums = entry["checksums"]
        if isinstance(checksums, dict) and not checksums and unpinned is True:
            pass  # declared: loaded on trust at first use, then held to what was seen (_trust.py)
        elif not isinstance(checksums, dict) or not checksums:
            # A file with nothing to check it against would be loaded on trust: refused.
            problems.append(
                f"{path}.checksums: at least one of {', '.join(CHECKSUM_LENGTHS)} is required "
                "(or {} with \"unpinned\": true for a file nobody published a checksum for)"
            )
        else:
            for algo, digest in checksums.items():
                if algo not in CHECKSUM_LENGTHS:
                    problems.append(f"{path}.checksums.{algo}: unknown digest; known: {', '.join(CHECKSUM_LENGTHS)}")
                    continue
                length = CHECKSUM_LENGTHS[algo]
                if not isinstance(digest, str) or not re.fullmatch(f"[0-9a-f]{{{length}}}", digest):
                    problems.append(
                        f"{path}.checksums.{algo}: expected {length} lowercase hex digits, got {digest!r}"
                    )
    size = entry.get("size")
    if size is not None and not (_is_int(size) and size > 0):
        problems.append(f"{path}.size: expected a positive integer or null, got {size!r}")
    if "notes" in entry and not isinstance(entry["notes"], str):
        problems.append(f"{path}.notes: expected a string")


def _validate_model(entry: Any, path: str, problems: list[str]) -> None:
    if not _check_object(entry, path, set(_MODEL_FIELDS), set(), problems):
        return
    for field, (description, check) in _MODEL_FIELDS.items():
        if field not in entry or check is None:
            continue
        if not check(entry[field]):
            problems.append(f"{path}.{field}: expected {description}, got {entry[field]!r}")
    metrics = entry.get("metrics")
    if metrics is not None and _check_object(metrics, f"{path}.metrics", {"top1", "top5", "source"}, set(), problems):
        for key in ("top1", "top5"):
            if key in metrics and not (_is_number(metrics[key]) and 0 <= metrics[key] <= 100):
                problems.append(f"{path}.metrics.{key}: expected a percentage, got {metrics[key]!r}")
        if "source" in metrics and not (isinstance(metrics["source"], str) and metrics["source"].strip()):
            problems.append(f"{path}.metrics.source: expected a non-empty string")
    files = entry.get("files")
    if files is not None:
        if not isinstance(files, list) or not files:
            problems.append(f"{path}.files: expected a non-empty list of weight files")
        elif len(files) > MAX_FILES:
            problems.append(f"{path}.files: {len(files)} weight files; at most {MAX_FILES}")
        else:
            for i, item in enumerate(files):
                _validate_file(item, f"{path}.files[{i}]", problems)


def validate_manifest(data: Any, architectures: Sequence[str] | None = None) -> list[str]:
    """Every problem in ``data`` (parsed JSON), each as ``"$.json.path: what is wrong"``.
    With ``architectures`` (the package's model names), a model without one is a problem."""
    problems: list[str] = []
    json_problems(data, "$", problems)
    if not _check_object(data, "$", {"schema_version", "models"}, {"comment"}, problems):
        return problems
    version = data.get("schema_version")
    if "schema_version" in data and version != SCHEMA_VERSION:
        problems.append(f"$.schema_version: this code reads version {SCHEMA_VERSION}, got {version!r}")
    models = data.get("models")
    if "models" in data:
        if not isinstance(models, dict) or not models:
            problems.append("$.models: expected a non-empty object of model entries")
        elif len(models) > MAX_MODELS:
            problems.append(f"$.models: {len(models)} model entries; at most {MAX_MODELS}")
        else:
            for name, entry in models.items():
                if not _MODEL_NAME.fullmatch(name):
                    problems.append(f"$.models[{json.dumps(name)}]: a model name must be 1 to 64 lowercase "
                                    "letters, digits and underscores (it becomes part of cache file names)")
                elif architectures is not None and name not in architectures:
                    problems.append(f"$.models.{name}: no model of that name in this package; models: "
                                    f"{', '.join(architectures)}")
                _validate_model(entry, f"$.models.{name}", problems)
    return problems


# -- loading ------------------------------------------------------------------------------

def _build(source: str, data: dict) -> Manifest:
    models = {}
    for name, entry in data["models"].items():
        files = tuple(
            WeightFile(
                model=name,
                index=i,
                urls=tuple(f["urls"]),
                format=f["format"],
                checksums=dict(f["checksums"]),
                size=f.get("size"),
                notes=f.get("notes", ""),
                pinned=not f.get("unpinned", False),
            )
            for i, f in enumerate(entry["files"])
        )
        metrics = entry["metrics"]
        models[name] = ModelEntry(
            name=name,
            top1=float(metrics["top1"]),
            top5=float(metrics["top5"]),
            metrics_source=metrics["source"],
            num_params=entry["num_params"],
            macs=entry["macs"],
            input_size=entry["input_size"],
            resize_size=entry["resize_size"],
            crop_ratio=float(entry["crop_ratio"]),
            interpolation=entry["interpolation"],
            mean=tuple(entry["mean"]),
            std=tuple(entry["std"]),
            license=entry["license"],
            license_source=entry["license_source"],
            paper=entry["paper"],
            upstream=entry["upstream"],
            files=files,
        )
    return Manifest(source=source, models=models, raw=data)


@functools.lru_cache(maxsize=1)
def default_manifest() -> Manifest:
    """The repository's own manifest (not $GHOSTNET_HUB_MANIFEST's: a broken one there must not
    break import or help texts), read once."""
    return load_manifest(DEFAULT_MANIFEST)


def load_manifest(path: str | os.PathLike | None = None, *, architectures: Sequence[str] | None = None) -> Manifest:
    """Read and validate a manifest: ``path``, else ``$GHOSTNET_HUB_MANIFEST``, else the
    repository's ``weights_manifest.json``. ``architectures``: see ``validate_manifest``."""
    if path is None:
        path = os.environ.get(MANIFEST_ENV) or DEFAULT_MANIFEST
    path = pathlib.Path(path)
    try:  # only a regular file, bounded: a FIFO or /dev/zero named here would hang or never end
        text = read_regular(path, MAX_BYTES, "the manifest").decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(str(path), [f"cannot read the file: {exc}"]) from None
    if (deep := too_deep(text, MAX_DEPTH)) is not None:
        raise ManifestError(str(path), [f"{deep}: nested more than {MAX_DEPTH} levels deep"])
    try:
        data = parse(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(str(path), [f"not valid JSON: {exc}"]) from None
    problems = validate_manifest(data, architectures)
    if problems:
        raise ManifestError(str(path), problems)
    return _build(str(path), data)
