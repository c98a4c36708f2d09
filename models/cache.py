"""The weights cache: where it is, what a cached file must be, the per-file lock, and what
a process remembers about the files it verified.

A cached file is trusted only after every check its ``Target`` records passes; one that
fails (or anything odd at its name: a directory, a FIFO, a dangling link) is set aside
(``*.corrupt-<time>-<pid>``), never deleted, so a user can look at it. Reading and
verifying need no write access and no lock: a final name only ever changes by an atomic
rename, so a read-only cache (a Docker image layer, a shared volume) works as it is.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import re
import stat
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import filelock
import torch

from . import _commands
from ._files import open_regular
from ._hashing import hash_bytes, hash_stream
from .manifest import WeightFile

__all__ = [
    "CacheDirError",
    "Target",
    "cache_dir",
    "cached",
    "discard_partial",
    "default_cache_dir",
    "entry_path",
    "file_lock",
    "load_bytes",
    "partial_meta",
    "partial_path",
    "problems",
    "resume_point",
    "set_aside",
    "target_for",
    "url_prefix",
    "verify_cached",
    "verify_file",
]

_log = logging.getLogger(__name__)
# A cache name is one portable path component (no separators, nothing Windows forbids),
# of bounded length; anything else is refused before it becomes a path.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


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
        prefetch_hint=f" ({_commands.command('prefetch ' + file.model)})",
    )


# -- the directory and the names in it ------------------------------------------------------

def default_cache_dir() -> pathlib.Path:
    """``torch.hub.get_dir()/checkpoints`` (so ``TORCH_HOME`` moves it), without creating it."""
    return pathlib.Path(torch.hub.get_dir()) / "checkpoints"


def exports_dir() -> pathlib.Path:
    """``torch.hub.get_dir()/exports``: the exports ``--backend onnxruntime|executorch`` makes
    on the fly, named by what they were made from, each with its SHA-256 beside it."""
    return pathlib.Path(torch.hub.get_dir()) / "exports"


def export_target(path: pathlib.Path) -> Target:
    """How a cached export is checked: against the SHA-256 recorded when it was written."""
    return Target(label=path.name, urls=(), checksums={}, size=None, cache_name=path.name, sidecar=True)


def record_sha256(path: pathlib.Path) -> None:
    """Keep the SHA-256 of the file at ``path`` beside it (``NAME.sha256``), written whole."""
    from ._hashing import sha256_file

    sidecar = path.with_name(path.name + ".sha256")
    partial = sidecar.with_name(sidecar.name + f".{os.getpid()}.tmp")
    partial.write_text(sha256_file(path) + "\n")
    os.replace(partial, sidecar)


def cache_dir(path: str | os.PathLike | None = None, *, writable: bool = True) -> pathlib.Path:
    """The weights cache, ``default_cache_dir()`` unless ``path`` is given. With ``writable``
    (for writing into it) it is created if needed and checked to be writable; without, it is
    only named (reading a verified file needs nothing more)."""
    directory = pathlib.Path(path) if path is not None else default_cache_dir()
    if not writable:
        return directory
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


def entry_path(directory: pathlib.Path, name: str) -> pathlib.Path:
    """``directory / name``, refusing any name that is not one plain file name, so that no
    manifest or URL can place a file outside the cache."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"refusing the cache file name {name!r}: not a plain, portable file name")
    return directory / name


def url_prefix(url: str) -> str:
    """How the cache names of a user URL's files begin: ``url-`` and 16 digits of its hash."""
    return f"url-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def partial_path(final: pathlib.Path, url: str) -> pathlib.Path:
    """Where the bytes of ``final`` from ``url`` accumulate; ``<partial>.json`` beside it
    records the server's validators (ETag, Last-Modified) for resuming."""
    return final.with_name(f"{final.name}.{hashlib.sha256(url.encode()).hexdigest()[:8]}.partial")


def _validator(meta: dict) -> str | None:
    """What If-Range may carry: a strong ETag, else the Last-Modified date."""
    etag = meta.get("etag") or ""
    return etag if etag and not etag.startswith("W/") else (meta.get("last_modified") or None)


def partial_meta(partial: pathlib.Path) -> dict:
    """What was recorded about the server's file when ``partial`` was started."""
    try:
        meta = json.loads(_read_small(pathlib.Path(f"{partial}.json")))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def discard_partial(partial: pathlib.Path) -> None:
    for path in (partial, pathlib.Path(f"{partial}.json")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def resume_point(partial: pathlib.Path, target: Target, cap: int) -> tuple[int, dict]:
    """(offset, headers) for the next request: resume only a plain file of ours that the
    server can prove unchanged (If-Range) or that a recorded checksum will check."""
    try:
        st = partial.lstat()
    except FileNotFoundError:
        return 0, {}
    if not os.path.isfile(partial) or os.path.islink(partial):
        set_aside(partial, "not a regular file")
        return 0, {}
    meta = partial_meta(partial)
    validator = None if meta.get("encoded") else _validator(meta)  # (the file name is per URL)
    limit = target.size if target.size is not None else cap
    if st.st_size == 0 or st.st_size > limit or meta.get("encoded") or not (validator or target.checksums):
        discard_partial(partial)
        return 0, {}
    headers = {"Range": f"bytes={st.st_size}-"}
    if validator:
        headers["If-Range"] = validator
    return st.st_size, headers


def _read_small(path: pathlib.Path, limit: int = 1 << 20) -> bytes:
    fd, _ = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)


def set_aside(path: pathlib.Path, why: str) -> pathlib.Path:
    """Move ``path`` (whatever it is) out of the way, loudly; nothing is deleted."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, aside)
    _log.warning("cached %s failed verification (%s); it was moved to %s and will be downloaded again",
                 path, why, aside)
    return aside


def file_lock(final: pathlib.Path) -> filelock.FileLock:
    """The cross-process lock of one cache file: N processes asking at once make one download."""
    lock = pathlib.Path(str(final) + ".lock")
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(lock.lstat().st_mode):  # a directory there would make every try fail
            set_aside(lock, "not a regular file")
    return filelock.FileLock(str(lock))


# -- verification -----------------------------------------------------------------------------

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


def _sidecar_lines(path: pathlib.Path) -> list[str] | None:
    """The checksum file beside a user-URL file: its SHA-256 measured at download, then (in
    files written since) the server's validators as JSON, for revalidation."""
    try:
        return _read_small(path.with_name(path.name + ".sha256"), 4096).decode("utf-8", "replace").splitlines()
    except OSError:
        return None


def write_sidecar(final: pathlib.Path, sha256: str, partial: pathlib.Path) -> None:
    """Record beside ``final`` the SHA-256 its bytes had at download and the validators (ETag,
    Last-Modified) its server sent with them, kept with ``partial``."""
    meta = partial_meta(partial)
    validators = {} if meta.get("encoded") else {k: meta[k] for k in ("etag", "last_modified") if meta.get(k)}
    final.with_name(final.name + ".sha256").write_text(sha256 + "\n" + (json.dumps(validators) + "\n"
                                                                        if validators else ""))


def recorded_validators(path: pathlib.Path) -> dict[str, str]:
    """The ETag and Last-Modified recorded beside a user-URL file ({} if none were)."""
    lines = _sidecar_lines(path) or []
    try:
        meta = json.loads(lines[1]) if len(lines) > 1 else {}
    except ValueError:
        return {}
    return {k: v for k, v in meta.items() if k in ("etag", "last_modified") and isinstance(v, str)} \
        if isinstance(meta, dict) else {}


def _recorded_sha256(path: pathlib.Path) -> str | None:
    lines = _sidecar_lines(path)
    return None if lines is None else (lines[0].strip() if lines else "")


# path -> (identity of the inode that was verified, its Target); see load_bytes.
_verified: dict[str, tuple[tuple, Target]] = {}


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def remember(path: pathlib.Path, st: os.stat_result, target: Target) -> None:
    """``path`` held verified bytes of ``target`` as of ``st``."""
    _verified[os.path.abspath(path)] = (_identity(st), target)


def verify_file(path: pathlib.Path, target: Target) -> list[str] | None:
    """Problems with the file at ``path``: [] when every recorded check passes, None when
    nothing is there. Reads through one fd, never blocks, needs no write access."""
    try:
        fd, st = open_regular(path)
    except (FileNotFoundError, NotADirectoryError):
        return ["a link to nothing"] if os.path.lexists(path) else None
    except OSError as exc:
        return [str(exc)]
    with os.fdopen(fd, "rb") as f:
        found = hash_stream(f, target.algos, st.st_size).hexdigests()
    recorded = None
    if target.sidecar:
        recorded = _recorded_sha256(path)
        if recorded is None:
            return [f"{path.name}.sha256 (the SHA-256 measured at download) is missing"]
    wrong = problems(target, found, st.st_size, recorded)
    if not wrong:
        remember(path, st, target)
    return wrong


def cached(final: pathlib.Path, target: Target) -> bool:
    """True if ``final`` holds verified bytes; anything else there is set aside, loudly.
    Call under the file's lock."""
    found = verify_file(final, target)
    if found is None:
        return False
    if found:
        set_aside(final, "; ".join(found))
        return False
    return True


def load_bytes(path: str | os.PathLike) -> tuple[bytes, list[str]]:
    """The bytes of ``path`` in one read, and what is wrong with them: a cache file this
    process verified must still be the verified inode (device, inode, size, mtime, ctime);
    if it changed since, the bytes read are hashed again and any mismatch is returned, so
    what is loaded is always what was verified."""
    path = pathlib.Path(path)
    fd, before = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        data = f.read()
        after = os.fstat(f.fileno())
    known = _verified.get(os.path.abspath(path))
    if known is None:
        return data, []
    identity, target = known
    if _identity(before) == _identity(after) == identity and len(data) == after.st_size:
        return data, []
    recorded = _recorded_sha256(path) if target.sidecar else None
    wrong = problems(target, hash_bytes(data, target.algos), len(data), recorded)
    if not wrong:
        remember(path, after, target)
    return data, wrong


# -- what one process learned, for the others waiting on the lock --------------------------------

def _failure_record(final: pathlib.Path) -> pathlib.Path:
    return final.with_name(final.name + ".failures")


def _urls_key(urls: Sequence[str]) -> str:
    # URLs may carry tokens (a mirror's query): the record keeps only their hash.
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()


def record_failures(final: pathlib.Path, urls: Sequence[str], failures: Sequence[tuple[str, str]]) -> None:
    """Written under the lock when every source failed (one reason per URL, in order), so
    that processes waiting on the lock fail at once with the same reasons instead of
    retrying the same dead sources."""
    record = _failure_record(final)
    tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps({"time": time.time(), "pid": os.getpid(), "urls": _urls_key(urls),
                                   "reasons": [reason for _, reason in failures]}))
        os.replace(tmp, record)


def recent_failures(final: pathlib.Path, urls: Sequence[str], waiting_since: float) -> list[tuple[str, str]] | None:
    """The failures another process recorded for these ``urls`` while this one waited for
    the lock; None if there is no such record. (A process that comes later tries again.)"""
    try:
        data = json.loads(_read_small(_failure_record(final)))
        when, pid, recorded, reasons = data["time"], data["pid"], data["urls"], data["reasons"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if recorded != _urls_key(urls) or len(reasons) != len(urls) or when < waiting_since:
        return None
    ago = max(0.0, time.time() - when)
    return [(url, f"{reason} (found by process {pid} {ago:.0f} s ago)") for url, reason in zip(urls, reasons,
                                                                                                strict=True)]


def forget_failures(final: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        _failure_record(final).unlink()


def verify_cached(file: WeightFile, cache: str | os.PathLike | None = None) -> tuple[str, str]:
    """("ok" | "missing" | "corrupt", detail) for the cached copy of ``file``. Read-only: a
    corrupt copy is left where it is for the user to inspect, and no lock is taken."""
    final = entry_path(cache_dir(cache, writable=False), file.cache_name)
    found = verify_file(final, target_for(file))
    if found is None:
        return "missing", str(final)
    return ("corrupt", f"{final}: " + "; ".join(found)) if found else ("ok", str(final))
