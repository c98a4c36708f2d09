"""Weights nobody published a checksum for: trust on first use.

A manifest file marked ``"unpinned": true`` has no SHA-256, MD5 or size to check. What can be
checked is checked: the first time such a model's weights are needed, every one of its sources
is downloaded (into a staging folder beside the cache), each is deserialised safely, and the
reachable ones must agree tensor for tensor (as they are loaded: unwrapped and renamed, see
``weights.released_state_dict``). Only then are they moved into the cache, each with a record of
the SHA-256 and size seen (``NAME.trusted``). From then on the record is the file's checksum:
a cached copy that no longer matches is set aside and fetched again, and a source that now
serves other bytes is refused in one line that says the file is unpinned and how to pin it.

``GHOSTNET_HUB_REQUIRE_PINNED=1`` (or ``require_pinned=True``) refuses unpinned weights outright.
``python -m models manifest pin`` turns the trust into a pin: ``sources_agree`` is its check.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import filelock

from . import download
from ._hashing import sha256_file
from ._state_dicts import CheckpointError, read_state_dict, released_state_dict
from .cache import Target, cache_dir, entry_path, file_lock, remember, set_aside, target_for, verify_file
from .manifest import WeightFile

__all__ = ["REQUIRE_PINNED_ENV", "SourcesDisagree", "TrustError", "UnpinnedWeightsError", "fetch", "read_record",
           "sources_agree", "state_of", "target"]

REQUIRE_PINNED_ENV = "GHOSTNET_HUB_REQUIRE_PINNED"
_SUFFIX = ".trusted"
_log = logging.getLogger(__name__)


class UnpinnedWeightsError(download.DownloadError):
    """Unpinned weights were asked for where only pinned ones are accepted."""


class TrustError(download.DownloadError):
    """An unpinned file differs from the one trusted on first use."""


class SourcesDisagree(download.DownloadError):
    """The sources of one model's weights hold different tensors."""


def _pin_hint(model: str) -> str:
    return (f"to pin it, run `python -m models manifest pin {model}` on a machine with network (it checks every "
            "source) and use that manifest ($GHOSTNET_HUB_MANIFEST)")


def require_pinned(value: bool | None = None) -> bool:
    if value is not None:
        if not isinstance(value, bool):
            raise TypeError(f"require_pinned must be True, False or None, got {value!r}")
        return value
    return os.environ.get(REQUIRE_PINNED_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


# -- the record ------------------------------------------------------------------------------

def _record_path(directory: pathlib.Path, file: WeightFile) -> pathlib.Path:
    return entry_path(directory, file.cache_name + _SUFFIX)


def read_record(file: WeightFile, cache: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """What was seen of ``file`` at first use (sha256, size, url, time), or None."""
    path = _record_path(cache_dir(cache, writable=False), file)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("sha256"), str) and isinstance(record.get("size"), int)
    return record if ok else None


def _write_record(directory: pathlib.Path, file: WeightFile, sha256: str, size: int, url: str) -> None:
    path = _record_path(directory, file)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"sha256": sha256, "size": size, "url": url,
                               "recorded": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def target(file: WeightFile, record: dict[str, Any] | None) -> Target:
    """How a cached copy of ``file`` is checked: its manifest checksums, or for an unpinned
    file the SHA-256 and size recorded at first use (nothing to check without a record)."""
    base = target_for(file)
    if file.pinned or record is None:
        return base
    return dataclasses.replace(base, checksums={"sha256": record["sha256"]}, size=record["size"])


def state_of(file: WeightFile, cache: str | os.PathLike | None = None) -> tuple[str, str]:
    """("ok" | "missing" | "corrupt", detail) of the cached copy, as ``cache.verify_cached``
    says it, with an unpinned file checked against its record and said to be so."""
    final = entry_path(cache_dir(cache, writable=False), file.cache_name)
    record = None if file.pinned else read_record(file, cache)
    if not file.pinned and record is None:
        return ("missing", f"{final} (unpinned; never used here)") if not final.exists() else (
            "corrupt", f"{final}: unpinned and no {file.cache_name}{_SUFFIX} record of its first use")
    found = verify_file(final, target(file, record))
    how = "" if file.pinned else f" (unpinned: trusted on first use {record.get('recorded', '')})"
    if found is None:
        return "missing", f"{final}{how}"
    return ("corrupt", f"{final}: " + "; ".join(found) + how) if found else ("ok", f"{final}{how}")


# -- do the sources agree? ---------------------------------------------------------------------

def _tensors(path: pathlib.Path, file: WeightFile) -> dict:
    return released_state_dict(read_state_dict(path, format=file.format), path)


def sources_agree(copies: Sequence[tuple[WeightFile, pathlib.Path, str]]) -> str | None:
    """None if every copy (file, local path, where it came from) holds the same tensors as
    the first, as they would be loaded; else what differs, in one line. A copy that cannot be
    read safely raises ``CheckpointError``."""
    return _compare([(url, _tensors(path, file)) for file, path, url in copies])


def _compare(loaded: Sequence[tuple[str, dict]]) -> str | None:
    import torch

    if len(loaded) < 2:
        return None
    first_url, reference = loaded[0]
    for url, other in loaded[1:]:
        if other.keys() != reference.keys():
            odd = sorted(reference.keys() ^ other.keys())
            return f"{first_url} and {url} hold different tensors ({len(odd)} keys in one only, e.g. {odd[0]})"
        for key, value in reference.items():
            theirs = other[key]
            if theirs.dtype != value.dtype or theirs.shape != value.shape or not torch.equal(theirs, value):
                return f"{first_url} and {url} differ at {key}"
    return None


# -- fetching --------------------------------------------------------------------------------------

def _cached_copy(files: Sequence[WeightFile], directory: pathlib.Path) -> tuple[pathlib.Path, WeightFile] | None:
    for file in files:
        record = None if file.pinned else read_record(file, directory)
        if file.pinned or record is not None:
            final = entry_path(directory, file.cache_name)
            if verify_file(final, target(file, record)) == []:
                return final, file
    return None


def fetch(files: Sequence[WeightFile], *, require_pinned_weights: bool | None = None, progress: bool = True,
          options: download.DownloadOptions | None = None, cache: str | os.PathLike | None = None,
          offline: bool | None = None, mirror: str | None = None) -> tuple[pathlib.Path, WeightFile]:
    """``download.fetch_first`` for a model's files, any of them unpinned (see the module's
    docstring): (verified local copy, the file it is)."""
    unpinned = [f for f in files if not f.pinned]
    if not unpinned:
        return download.fetch_first(files, progress=progress, options=options, cache=cache, offline=offline,
                                    mirror=mirror)
    model = files[0].model
    if require_pinned(require_pinned_weights):
        pinned = [f for f in files if f.pinned]
        if not pinned:
            raise UnpinnedWeightsError(
                f"{model}: its weights are unpinned (no checksum was ever published for them) and "
                f"{REQUIRE_PINNED_ENV}=1 or require_pinned=True refuses such weights; {_pin_hint(model)}")
        return download.fetch_first(pinned, progress=progress, options=options, cache=cache, offline=offline,
                                    mirror=mirror)
    directory = cache_dir(cache, writable=False)
    found = _cached_copy(files, directory)
    if found is not None:
        return found
    if download.offline_requested(offline):
        raise download.OfflineError(
            f"{model}: offline mode ({download.OFFLINE_ENV}) is on and no trusted copy of its unpinned weights is in "
            f"the cache {directory}; run `python -m models prefetch {model}` where there is network access (with the "
            "same TORCH_HOME; copy NAME.trusted with NAME), or unset the variable")
    directory = cache_dir(cache)
    lock = file_lock(directory / f"{model}-first-use")
    deadline, _ = (options or download.DownloadOptions()).limits()
    try:
        lock.acquire(timeout=(deadline + 60) * len(unpinned))
    except filelock.Timeout:
        raise download.DownloadError(f"{model}: another process has held {lock.lock_file} for too long (it is "
                                     "fetching these weights for the first time); try again later") from None
    try:
        found = _cached_copy(files, directory)  # another process may have done it meanwhile
        if found is not None:
            return found
        return _first_use(files, directory, progress=progress, options=options, mirror=mirror)
    finally:
        lock.release()


def _first_use(files: Sequence[WeightFile], directory: pathlib.Path, *, progress: bool,
               options: download.DownloadOptions | None, mirror: str | None) -> tuple[pathlib.Path, WeightFile]:
    model = files[0].model
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{model}-first-use-", dir=directory))
    try:
        staged, failures = [], []
        for file in files:
            if file.pinned:
                continue
            try:
                path = download.fetch(file, progress=progress, options=options, cache=staging, offline=False,
                                      mirror=mirror)
            except download.CacheWriteError:
                raise
            except download.DownloadError as exc:
                failures += exc.failures
                continue
            staged.append((file, path, ", ".join(file.urls)))
        staged, loaded = _readable(staged, failures)
        if not staged:
            pinned = [f for f in files if f.pinned]
            if pinned:
                return download.fetch_first(pinned, progress=progress, options=options, cache=directory,
                                            mirror=mirror)
            raise download.DownloadError(f"{model}: every source failed:", failures,
                                         "check the network; or load a local copy of the weights with checkpoint=PATH")
        if len(staged) < len([f for f in files if not f.pinned]):
            _log.warning("%s: only %d of its unpinned sources could be reached and read, so they were not all "
                         "compared; trusting what was downloaded", model, len(staged))
        measured = {file.index: (sha256_file(path), path.stat().st_size) for file, path, _ in staged}
        for file, _, url in staged:
            _check_against_record(file, directory, *measured[file.index], url)
        problem = _compare(loaded)
        if problem:
            raise SourcesDisagree(
                f"{model}: its sources disagree: {problem}. These weights are unpinned (no checksum was ever "
                f"published), so they are trusted only when every reachable source agrees: nothing was recorded or "
                f"loaded; {_pin_hint(model)} once the sources agree")
        for file, path, url in staged:
            _publish(file, path, directory, *measured[file.index], url)
        first, _, _ = staged[0]
        return entry_path(directory, first.cache_name), first
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _readable(staged: list, failures: list) -> tuple[list, list]:
    """The staged copies that deserialise safely, and their tensors; the others join ``failures``
    (a source whose file cannot be read is as good as unreachable, and is not recorded)."""
    kept, loaded = [], []
    for file, path, url in staged:
        try:
            loaded.append((url, _tensors(path, file)))
        except CheckpointError as exc:
            failures.append((url, str(exc)))
            _log.warning("%s: %s cannot be used: %s", file.model, url, exc)
            continue
        kept.append((file, path, url))
    return kept, loaded


def _check_against_record(file: WeightFile, directory: pathlib.Path, sha256: str, size: int, url: str) -> None:
    record = read_record(file, directory)
    if record is None or (record["sha256"], record["size"]) == (sha256, size):
        return
    raise TrustError(
        f"{file.model} weights (file {file.index}): {url} now serves a file ({size:,} bytes, sha256 {sha256}) other "
        f"than the one trusted on first use here on {record.get('recorded', '?')} ({record['size']:,} bytes, sha256 "
        f"{record['sha256']}); the file is unpinned (no checksum was ever published), so it was refused. If you trust "
        f"the new file, forget the old one with `python -m models cache clear {file.model}`; {_pin_hint(file.model)}")


def _publish(file: WeightFile, path: pathlib.Path, directory: pathlib.Path, sha256: str, size: int, url: str) -> None:
    final = entry_path(directory, file.cache_name)
    if os.path.lexists(final):
        set_aside(final, "it did not match the record of its first use")
    if read_record(file, directory) is None:
        _write_record(directory, file, sha256, size, url)
    os.replace(path, final)
    remember(final, os.stat(final), target(file, {"sha256": sha256, "size": size}))
