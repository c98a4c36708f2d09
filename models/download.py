"""Fetch -> verify -> cache. The only module of the package that touches the network.

A weight file reaches its final name in the cache only after every checksum the manifest
records for it, and its size when recorded, matched the bytes, all computed while they
stream in. A cached file is verified again before each use. One cross-process lock per file
makes N processes asking for it at once produce one download.
"""
from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import pathlib
import queue
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import filelock
import requests
import torch
from tqdm import tqdm

from .manifest import CHECKSUM_LENGTHS, WeightFile

__all__ = [
    "OFFLINE_ENV",
    "MIRROR_ENV",
    "CacheDirError",
    "DownloadError",
    "DownloadOptions",
    "OfflineError",
    "cache_dir",
    "default_cache_dir",
    "fetch",
    "fetch_bytes",
    "fetch_first",
    "fetch_url",
    "is_url",
    "sha256_file",
    "verify_cached",
]

OFFLINE_ENV = "GHOSTNET_HUB_OFFLINE"
MIRROR_ENV = "GHOSTNET_HUB_MIRROR"
_TRUE = {"1", "true", "yes", "on"}
_log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """No source gave verified bytes. ``failures`` holds (url, reason) for each try."""

    def __init__(self, message: str, failures: Sequence[tuple[str, str]] = ()):
        self.failures = list(failures)
        lines = "".join(f"\n  - {url}: {reason}" for url, reason in self.failures)
        super().__init__(message + lines)


class OfflineError(DownloadError):
    """Offline mode is on and the file is not in the cache."""


class CacheDirError(OSError):
    """The cache directory cannot be created or written."""


@dataclass(frozen=True)
class DownloadOptions:
    """How hard to try. ``timeout`` is (connect, read) in seconds; a read timeout is the
    longest silence tolerated between two pieces of the body."""

    timeout: tuple[float, float] = (10.0, 60.0)
    retries: int = 4  # per URL, after the first attempt
    backoff: float = 1.0  # first wait in seconds, doubled each retry
    max_wait: float = 60.0  # cap on any wait, Retry-After included
    chunk_size: int = 1 << 20


@dataclass(frozen=True)
class _Target:
    """What to download: one content, possibly at several URLs."""

    label: str
    urls: tuple[str, ...]
    checksums: Mapping[str, str]
    size: int | None
    cache_name: str
    # For a user URL given without a checksum: the SHA-256 measured at download time is
    # kept beside the file, so a later change to the cached bytes is still caught.
    sidecar: bool = False
    prefetch_hint: str = ""


class _SourceFailed(Exception):
    """This URL cannot give the file; the next one may."""


# -- configuration ------------------------------------------------------------------------

def offline_requested(offline: bool | None = None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in _TRUE


def _mirror_base(mirror: str | None) -> str | None:
    """The mirror to try first: ``mirror``, else ``$GHOSTNET_HUB_MIRROR``; "" means none."""
    base = (mirror if mirror is not None else os.environ.get(MIRROR_ENV, "")).strip()
    if not base:
        return None
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"mirror {base!r} (from {MIRROR_ENV} or mirror=) must be an http(s) URL")
    return base.rstrip("/")


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


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


# -- hashing ------------------------------------------------------------------------------

class _HashThread:
    """One digest fed from a bounded queue on its own thread. hashlib releases the GIL on
    large buffers, so hashing overlaps the caller's reads and writes instead of adding to
    them (on a fast link, hashing is most of the cost of a verified download)."""

    def __init__(self, digest: "hashlib._Hash"):
        self.digest = digest
        self._queue: queue.Queue = queue.Queue(maxsize=16)
        self._thread = threading.Thread(target=self._run, name="weights-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self.digest.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class _Digests:
    """Every requested digest over one pass of the bytes."""

    def __init__(self, algos: Iterable[str], total: int | None):
        hashes: dict[str, "hashlib._Hash"] = {}
        self.deferred: set[str] = set()
        self.total = total
        self.count = 0
        for algo in algos:
            if algo == "sha256":
                hashes["sha256"] = hashlib.sha256()
            elif algo == "md5":
                hashes["md5"] = hashlib.md5(usedforsecurity=False)
            elif algo == "git_blob_sha1":
                # git hashes a header holding the length first: without it known up front,
                # this digest needs a second pass over the finished file.
                if total is None:
                    self.deferred.add(algo)
                else:
                    hashes[algo] = hashlib.sha1(b"blob %d\0" % total, usedforsecurity=False)
        self._threads = {algo: _HashThread(h) for algo, h in hashes.items()}

    def update(self, chunk: bytes) -> None:
        self.count += len(chunk)
        for thread in self._threads.values():
            thread.update(chunk)

    def close(self) -> None:
        for thread in self._threads.values():
            thread.close()

    def hexdigests(self) -> dict[str, str]:
        self.close()
        out = {algo: t.digest.hexdigest() for algo, t in self._threads.items()}
        if "git_blob_sha1" in out and self.count != self.total:
            out["git_blob_sha1"] = "(not computed: the length announced up front was wrong)"
        return out


def _hash_file(path: pathlib.Path, algos: Iterable[str], start: _Digests | None = None, upto: int | None = None,
               chunk_size: int = 1 << 20) -> _Digests:
    digests = start or _Digests(algos, path.stat().st_size)
    with open(path, "rb") as f:
        f.seek(digests.count)
        remaining = (upto if upto is not None else path.stat().st_size) - digests.count
        while remaining > 0:
            chunk = f.read(min(chunk_size, remaining))
            if not chunk:
                break
            digests.update(chunk)
            remaining -= len(chunk)
    return digests


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    return _hash_file(pathlib.Path(path), ("sha256",)).hexdigests()["sha256"]


def _problems(target: _Target, digests: dict[str, str], size: int, expected_sha256: str | None = None) -> list[str]:
    problems = []
    if target.size is not None and size != target.size:
        problems.append(f"size: expected {target.size} bytes, got {size}")
    expected = dict(target.checksums)
    if expected_sha256:
        expected["sha256"] = expected_sha256
    for algo, want in expected.items():
        got = digests.get(algo)
        if got != want:
            problems.append(f"{algo}: expected {want}, got {got}")
    return problems


def _algos(target: _Target) -> set[str]:
    return set(target.checksums) | ({"sha256"} if target.sidecar else set())


def _verify(path: pathlib.Path, target: _Target) -> list[str]:
    """Problems with a finished file: [] when every recorded check passes."""
    digests = _hash_file(path, _algos(target)).hexdigests()
    recorded = None
    if target.sidecar:
        sidecar = path.with_name(path.name + ".sha256")
        try:
            recorded = sidecar.read_text().strip()
        except OSError:
            return [f"{sidecar.name} (the SHA-256 measured at download) is missing"]
    return _problems(target, digests, path.stat().st_size, recorded)


# -- one URL ------------------------------------------------------------------------------

def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _content_total(response: requests.Response, offset: int) -> tuple[int | None, int]:
    """(full file length if the server says, first byte of this body)."""
    if response.status_code == 206:
        spec = response.headers.get("Content-Range", "")
        try:
            unit, rest = spec.split(" ", 1)
            span, total = rest.split("/")
            start = int(span.split("-")[0])
            return (None if total == "*" else int(total)), start
        except ValueError:
            raise _SourceFailed(f"206 answer with an unreadable Content-Range {spec!r}") from None
    length = response.headers.get("Content-Length")
    return (int(length) if length and length.isdigit() else None), 0


def _download(session: requests.Session, url: str, partial: pathlib.Path, target: _Target,
              options: DownloadOptions, progress: bool) -> None:
    """Bring ``partial`` to the complete, verified content of ``target`` from ``url``."""
    digests: _Digests | None = None
    try:
        digests = _transfer(session, url, partial, target, options, progress)
        found = digests.hexdigests()
    finally:
        if digests is not None:
            digests.close()
    if digests.deferred:
        found.update(_hash_file(partial, digests.deferred).hexdigests())
    problems = _problems(target, found, partial.stat().st_size)
    if problems:
        partial.unlink()
        raise _SourceFailed("content does not match the manifest: " + "; ".join(problems))
    if target.sidecar:
        (partial.parent / (target.cache_name + ".sha256")).write_text(found["sha256"] + "\n")


def _transfer(session: requests.Session, url: str, partial: pathlib.Path, target: _Target,
              options: DownloadOptions, progress: bool) -> _Digests:
    """Download into ``partial``, retrying and resuming; the digests of all its bytes."""
    digests: _Digests | None = None
    attempt = 0
    try:
        while True:
            offset = partial.stat().st_size if partial.exists() else 0
            if target.size is not None and offset > target.size:
                partial.unlink()
                offset = 0
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            wait: float | None = None
            try:
                with session.get(url, headers=headers, stream=True, timeout=options.timeout) as response:
                    status = response.status_code
                    if status == 416 and offset:
                        # Our partial file is not a prefix the server recognises: start over.
                        partial.unlink()
                        error = "HTTP 416 for the resumed range; restarting from byte 0"
                    elif status == 429 or status >= 500:
                        wait = _retry_after(response)
                        error = f"HTTP {status} {response.reason}"
                    elif status not in (200, 206):
                        raise _SourceFailed(f"HTTP {status} {response.reason}")
                    else:
                        total, start = _content_total(response, offset)
                        if total is not None and target.size is not None and total != target.size:
                            raise _SourceFailed(
                                f"the server announces {total} bytes, the manifest records {target.size}")
                        if status == 200 and offset:
                            _log.info("%s ignored the Range request; downloading %s from the start", url, target.label)
                            offset = 0
                        if status == 206 and start != offset:
                            partial.unlink(missing_ok=True)
                            error = f"asked to resume at byte {offset}, the server sent from byte {start}; restarting"
                        else:
                            if digests is None or digests.count != offset:
                                if digests is not None:
                                    digests.close()
                                digests = _Digests(_algos(target), total if total is not None else target.size)
                                if offset:
                                    _hash_file(partial, (), start=digests, upto=offset)
                            error = _stream(response, partial, offset, total, digests, target, options, progress)
                            if error is None:
                                return digests
            except requests.RequestException as exc:
                error = f"{type(exc).__name__}: {exc}"
            attempt += 1
            if attempt > options.retries:
                raise _SourceFailed(f"gave up after {attempt} attempts; last: {error}")
            delay = min(options.max_wait, wait if wait is not None else options.backoff * 2 ** (attempt - 1))
            _log.info("%s: %s; retry %d/%d in %.1f s", url, error, attempt, options.retries, delay)
            time.sleep(delay)
    except BaseException:
        if digests is not None:
            digests.close()
        raise


def _stream(response, partial, offset, total, digests, target, options, progress) -> str | None:
    """Append the body to ``partial``; None when complete, else why it stopped short."""
    expected_end = total if total is not None else target.size
    bar = tqdm(total=expected_end, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
               desc=target.cache_name, file=sys.stderr, disable=not progress, leave=False)
    received = offset
    try:
        with open(partial, "ab" if offset else "wb") as f:
            try:
                for chunk in response.iter_content(options.chunk_size):
                    received += len(chunk)
                    if target.size is not None and received > target.size:
                        f.close()
                        partial.unlink()
                        raise _SourceFailed(f"more than the {target.size} bytes the manifest records")
                    f.write(chunk)
                    digests.update(chunk)
                    bar.update(len(chunk))
            except requests.RequestException as exc:
                return f"transfer broke at byte {received}: {type(exc).__name__}: {exc}"
    finally:
        bar.close()
    if total is not None and received != total:
        return f"body ended at byte {received} of {total}"
    return None


# -- the cache ----------------------------------------------------------------------------

def _lock(final: pathlib.Path) -> filelock.FileLock:
    return filelock.FileLock(str(final) + ".lock")


def _cached(final: pathlib.Path, target: _Target) -> bool:
    """True if ``final`` holds verified bytes; a file that fails is set aside, loudly."""
    if not final.exists():
        return False
    problems = _verify(final, target)
    if not problems:
        return True
    aside = final.with_name(f"{final.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(final, aside)
    _log.warning(
        "cached %s failed verification (%s); it was moved to %s and will be downloaded again",
        final, "; ".join(problems), aside,
    )
    return False


def _urls(target: _Target, mirror: str | None) -> list[str]:
    urls = list(target.urls)
    if mirror:
        # A mirror is a copy of the cache directory served over http(s): same file names.
        urls.insert(0, f"{mirror}/{target.cache_name}")
    return urls


def _fetch(target: _Target, *, progress: bool, options: DownloadOptions | None, cache: pathlib.Path,
           offline: bool, mirror: str | None) -> pathlib.Path:
    options = options or DownloadOptions()
    final = cache / target.cache_name
    with _lock(final):
        if _cached(final, target):
            return final
        urls = _urls(target, mirror)
        if offline:
            raise OfflineError(
                f"{target.label}: offline mode ({OFFLINE_ENV}) is on and {final.name} is not in the cache "
                f"{cache}. Fetch it on a machine with network access{target.prefetch_hint}, or copy it "
                f"there; its sources:",
                [(url, "not tried (offline)") for url in urls],
            )
        failures = []
        with requests.Session() as session:
            for url in urls:
                partial = final.with_name(f"{final.name}.{hashlib.sha256(url.encode()).hexdigest()[:8]}.partial")
                try:
                    _download(session, url, partial, target, options, progress)
                except _SourceFailed as exc:
                    failures.append((url, str(exc)))
                    _log.warning("%s: could not use %s: %s", target.label, url, exc)
                    continue
                os.replace(partial, final)
                for leftover in cache.glob(f"{final.name}.*.partial"):  # from sources that failed
                    leftover.unlink(missing_ok=True)
                return final
        raise DownloadError(f"{target.label}: no source gave verified bytes for {final.name}", failures)


def _target(file: WeightFile) -> _Target:
    return _Target(
        label=f"{file.model} weights (file {file.index})",
        urls=file.urls,
        checksums=file.checksums,
        size=file.size,
        cache_name=file.cache_name,
        prefetch_hint=f" (python -m models prefetch {file.model})",
    )


def fetch(file: WeightFile, *, progress: bool = True, options: DownloadOptions | None = None,
          cache: str | os.PathLike | None = None, offline: bool | None = None,
          mirror: str | None = None) -> pathlib.Path:
    """Path of a verified local copy of ``file``, downloading it if the cache lacks it.

    ``offline`` and ``mirror`` default to ``$GHOSTNET_HUB_OFFLINE`` and
    ``$GHOSTNET_HUB_MIRROR``; ``cache`` to ``torch.hub.get_dir()/checkpoints``.
    """
    return _fetch(_target(file), progress=progress, options=options, cache=cache_dir(cache),
                  offline=offline_requested(offline), mirror=_mirror_base(mirror))


def fetch_first(files: Sequence[WeightFile], *, progress: bool = True, options: DownloadOptions | None = None,
                cache: str | os.PathLike | None = None, offline: bool | None = None,
                mirror: str | None = None) -> tuple[pathlib.Path, WeightFile]:
    """The first of ``files`` (same model, in manifest order) that is cached or can be
    downloaded and verified; a cached later file beats downloading an earlier one."""
    cache = cache_dir(cache)
    offline = offline_requested(offline)
    mirror = _mirror_base(mirror)
    for file in files:
        target = _target(file)
        final = cache / target.cache_name
        if final.exists():
            with _lock(final):
                if _cached(final, target):
                    return final, file
    failures: list[tuple[str, str]] = []
    for file in files:
        try:
            path = _fetch(_target(file), progress=progress, options=options, cache=cache, offline=offline,
                          mirror=mirror)
            return path, file
        except DownloadError as exc:
            failures += exc.failures
    kind = OfflineError if offline else DownloadError
    model = files[0].model
    if offline:
        message = (f"{model}: offline mode ({OFFLINE_ENV}) is on and no weight file of it is in the cache {cache}; "
                   f"run `python -m models prefetch {model}` where there is network access (with the same TORCH_HOME), "
                   "or unset the variable. Its sources:")
    else:
        message = f"{model}: every source failed:"
    raise kind(message, failures)


def fetch_bytes(url: str, *, options: DownloadOptions | None = None, max_bytes: int = 64 << 20) -> bytes:
    """A small file (an image to classify) into memory, with the same timeouts and retries
    as weight downloads; nothing is cached or verified, so never use it for weights."""
    options = options or DownloadOptions()
    if offline_requested():
        raise OfflineError(f"offline mode ({OFFLINE_ENV}) is on; not fetching {url}")
    for attempt in range(options.retries + 1):
        wait = None
        try:
            with requests.get(url, stream=True, timeout=options.timeout) as response:
                if response.status_code == 429 or response.status_code >= 500:
                    wait, error = _retry_after(response), f"HTTP {response.status_code}"
                else:
                    response.raise_for_status()
                    body = bytearray()
                    for chunk in response.iter_content(options.chunk_size):
                        body += chunk
                        if len(body) > max_bytes:
                            raise ValueError(f"{url} is larger than {max_bytes} bytes")
                    return bytes(body)
        except (requests.ConnectionError, requests.Timeout) as exc:
            error = f"{type(exc).__name__}: {exc}"
        if attempt < options.retries:
            time.sleep(min(options.max_wait, wait if wait is not None else options.backoff * 2 ** attempt))
    raise DownloadError(f"could not fetch {url} after {options.retries + 1} attempts; last: {error}")


def fetch_url(url: str, *, sha256: str | None = None, progress: bool = True,
              options: DownloadOptions | None = None, cache: str | os.PathLike | None = None,
              offline: bool | None = None) -> pathlib.Path:
    """A user's weight file from ``url``, cached; checked against ``sha256`` when given."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    basename = pathlib.PurePosixPath(urllib.parse.unquote(parts.path)).name or "weights"
    url_key = hashlib.sha256(url.encode()).hexdigest()[:16]
    if sha256 is not None:
        sha256 = sha256.lower()
        if len(sha256) != CHECKSUM_LENGTHS["sha256"] or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    target = _Target(
        label=f"weights from {url}",
        urls=(url,),
        checksums={"sha256": sha256} if sha256 else {},
        size=None,
        cache_name=f"url-{url_key}-{(sha256 or 'unverified')[:16]}-{basename}",
        sidecar=sha256 is None,
    )
    return _fetch(target, progress=progress, options=options, cache=cache_dir(cache),
                  offline=offline_requested(offline), mirror=None)


def verify_cached(file: WeightFile, cache: str | os.PathLike | None = None) -> tuple[str, str]:
    """("ok" | "missing" | "corrupt", detail) for the cached copy of ``file``; a corrupt
    copy is left where it is for the user to inspect."""
    final = cache_dir(cache) / file.cache_name
    with _lock(final):
        if not final.exists():
            return "missing", str(final)
        problems = _verify(final, _target(file))
    return ("corrupt", f"{final}: " + "; ".join(problems)) if problems else ("ok", str(final))
