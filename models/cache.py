"""The weights cache: where it is, what a cached file must be, and the per-file lock.

A cached file is trusted only after every check its ``Target`` records passes; one that
fails is set aside (``*.corrupt-<time>-<pid>``), never deleted, so a user can look at it.
"""
from __future__ import annotations

import logging
import os
import pathlib
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass

import filelock
import torch

from ._hashing import hash_file
from .manifest import WeightFile

__all__ = [
    "CacheDirError",
    "Target",
    "cache_dir",
    "cached",
    "default_cache_dir",
    "file_lock",
    "problems",
    "target_for",
    "verify_cached",
    "verify_file",
]

_log = logging.getLogger(__name__)


class CacheDirError(OSError):
    """The cache directory cannot be created or written."""


@dataclass(frozen=True)
class Target:
    """What to download and how to check it: one content, possibly at several URLs."""

    label: str
    urls: tuple[str, ...]
    checksums: Mapping[str, str]
    size: int | None
    cache_name: str
    # For a user URL given without a checksum: the SHA-256 measured at download time is
    # kept beside the file, so a later change to the cached bytes is still caught.
    sidecar: bool = False
    prefetch_hint: str = ""

    @property
    def algos(self) -> set[str]:
        return set(self.checksums) | ({"sha256"} if self.sidecar else set())


def target_for(file: WeightFile) -> Target:
    return Target(
        label=f"{file.model} weights (file {file.index})",
        urls=file.urls,
        checksums=file.checksums,
        size=file.size,
        cache_name=file.cache_name,
        prefetch_hint=f" (python -m models prefetch {file.model})",
    )


def default_cache_dir() -> pathlib.Path:
    """``torch.hub.get_dir()/checkpoints`` (so ``TORCH_HOME`` moves it), without creating it."""
    return pathlib.Path(torch.hub.get_dir()) / "checkpoints"


def cache_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The weights cache, ``default_cache_dir()`` unless ``path`` is given, created if needed
    and checked to be writable."""
    directory = pathlib.Path(path) if path is not None else default_cache_dir()
    hint = (
        "set TORCH_HOME to a writable directory (the cache is $TORCH_HOME/hub/checkpoints)"
        if path is None else "pass a writable cache directory"
    )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Probe by writing: os.access says yes to root even on a read-only mount.
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise CacheDirError(f"the weights cache directory {directory} is not writable ({exc}); {hint}") from None
    return directory


def file_lock(final: pathlib.Path) -> filelock.FileLock:
    """The cross-process lock of one cache file: N processes asking at once make one download."""
    return filelock.FileLock(str(final) + ".lock")


def problems(target: Target, digests: dict[str, str], size: int, expected_sha256: str | None = None) -> list[str]:
    """What does not match ``target`` in bytes with these ``digests`` and ``size``."""
    found = []
    if target.size is not None and size != target.size:
        found.append(f"size: expected {target.size} bytes, got {size}")
    expected = dict(target.checksums)
    if expected_sha256:
        expected["sha256"] = expected_sha256
    for algo, want in expected.items():
        got = digests.get(algo)
        if got != want:
            found.append(f"{algo}: expected {want}, got {got}")
    return found


def verify_file(path: pathlib.Path, target: Target) -> list[str]:
    """Problems with a finished file: [] when every recorded check passes."""
    digests = hash_file(path, target.algos).hexdigests()
    recorded = None
    if target.sidecar:
        sidecar = path.with_name(path.name + ".sha256")
        try:
            recorded = sidecar.read_text().strip()
        except OSError:
            return [f"{sidecar.name} (the SHA-256 measured at download) is missing"]
    return problems(target, digests, path.stat().st_size, recorded)


def cached(final: pathlib.Path, target: Target) -> bool:
    """True if ``final`` holds verified bytes; a file that fails is set aside, loudly."""
    if not final.exists():
        return False
    found = verify_file(final, target)
    if not found:
        return True
    aside = final.with_name(f"{final.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(final, aside)
    _log.warning(
        "cached %s failed verification (%s); it was moved to %s and will be downloaded again",
        final, "; ".join(found), aside,
    )
    return False


def verify_cached(file: WeightFile, cache: str | os.PathLike | None = None) -> tuple[str, str]:
    """("ok" | "missing" | "corrupt", detail) for the cached copy of ``file``; a corrupt
    copy is left where it is for the user to inspect."""
    final = cache_dir(cache) / file.cache_name
    with file_lock(final):
        if not final.exists():
            return "missing", str(final)
        found = verify_file(final, target_for(file))
    return ("corrupt", f"{final}: " + "; ".join(found)) if found else ("ok", str(final))
