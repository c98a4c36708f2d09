"""Fetch -> verify -> cache. The only module of the package that touches the network.

A weight file gets its final cache name only after every checksum the manifest records,
and its size, matched the bytes, hashed as they stream in (``_hashing``). One lock per file
(``cache.file_lock``) makes N processes asking at once produce one download. Layers, bottom
up: ``_append_body`` writes one response body; ``_transfer_with_retries`` repeats requests,
resuming with Range, under the one retry policy (``_transient_status``, ``_transient_error``,
``_retry_delay``); ``_download_verified`` checks the finished bytes; ``_fetch`` tries each
source under the lock.
"""
from __future__ import annotations

import contextlib
import email.utils
import hashlib
import logging
import os
import pathlib
import sys
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import requests
from tqdm import tqdm

from ._hashing import Digests, hash_file
from .cache import Target, cache_dir, cached, file_lock, problems, target_for
from .manifest import CHECKSUM_LENGTHS, WeightFile

__all__ = [
    "OFFLINE_ENV",
    "MIRROR_ENV",
    "DownloadError",
    "DownloadOptions",
    "OfflineError",
    "fetch",
    "fetch_bytes",
    "fetch_first",
    "fetch_url",
    "is_url",
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


@dataclass(frozen=True)
class DownloadOptions:
    """How hard to try. ``timeout`` is (connect, read) in seconds; a read timeout is the
    longest silence tolerated between two pieces of the body."""

    timeout: tuple[float, float] = (10.0, 60.0)
    retries: int = 4  # per URL, after the first attempt
    backoff: float = 1.0  # first wait in seconds, doubled each retry
    max_wait: float = 60.0  # cap on any wait, Retry-After included
    chunk_size: int = 1 << 20


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


# -- the retry policy (every HTTP call) -----------------------------------------------------

def _transient_status(status: int) -> bool:
    """An answer worth asking again for: timeout, rate limit, server trouble."""
    return status in (408, 429) or status >= 500


def _transient_error(exc: requests.RequestException) -> bool:
    """A connection that failed or went silent may work on the next try; a malformed URL,
    a scheme requests cannot fetch or a redirect loop will not."""
    return isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError))


def _retry_delay(options: DownloadOptions, attempt: int, response: requests.Response | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based): the Retry-After the server
    sent with ``response`` (seconds or an HTTP date), else exponential backoff; capped by
    ``options.max_wait``."""
    wait = options.backoff * 2 ** (attempt - 1)
    value = response.headers.get("Retry-After", "").strip() if response is not None else ""
    if value.isdigit():
        wait = float(value)
    elif value:
        with contextlib.suppress(TypeError, ValueError):
            wait = max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    return min(options.max_wait, wait)


# -- one URL ------------------------------------------------------------------------------

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


def _download_verified(session: requests.Session, url: str, partial: pathlib.Path, target: Target,
                       options: DownloadOptions, progress: bool) -> None:
    """Bring ``partial`` to the complete, verified content of ``target`` from ``url``."""
    digests: Digests | None = None
    try:
        digests = _transfer_with_retries(session, url, partial, target, options, progress)
        found = digests.hexdigests()
    finally:
        if digests is not None:
            digests.close()
    if digests.deferred:
        found.update(hash_file(partial, digests.deferred).hexdigests())
    wrong = problems(target, found, partial.stat().st_size)
    if wrong:
        partial.unlink()
        raise _SourceFailed("content does not match the manifest: " + "; ".join(wrong))
    if target.sidecar:
        (partial.parent / (target.cache_name + ".sha256")).write_text(found["sha256"] + "\n")


def _transfer_with_retries(session: requests.Session, url: str, partial: pathlib.Path, target: Target,
                           options: DownloadOptions, progress: bool) -> Digests:
    """Download into ``partial``, retrying what the retry policy calls transient and
    resuming with Range; the digests of all its bytes."""
    digests: Digests | None = None
    attempt = 0
    try:
        while True:
            offset = partial.stat().st_size if partial.exists() else 0
            if target.size is not None and offset > target.size:
                partial.unlink()
                offset = 0
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            answer: requests.Response | None = None  # a transient answer, for its Retry-After
            try:
                with session.get(url, headers=headers, stream=True, timeout=options.timeout) as response:
                    status = response.status_code
                    if status == 416 and offset:
                        # Our partial file is not a prefix the server recognises: start over.
                        partial.unlink()
                        error = "HTTP 416 for the resumed range; restarting from byte 0"
                    elif _transient_status(status):
                        answer = response
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
                                digests = Digests(target.algos, total if total is not None else target.size)
                                if offset:
                                    hash_file(partial, (), start=digests, upto=offset)
                            error = _append_body(response, partial, offset, total, digests, target, options, progress)
                            if error is None:
                                return digests
            except requests.RequestException as exc:
                if not _transient_error(exc):
                    raise _SourceFailed(f"{type(exc).__name__}: {exc}") from None
                error = f"{type(exc).__name__}: {exc}"
            attempt += 1
            if attempt > options.retries:
                raise _SourceFailed(f"gave up after {attempt} attempts; last: {error}")
            delay = _retry_delay(options, attempt, answer)
            _log.info("%s: %s; retry %d/%d in %.1f s", url, error, attempt, options.retries, delay)
            time.sleep(delay)
    except BaseException:
        if digests is not None:
            digests.close()
        raise


def _append_body(response, partial, offset, total, digests, target, options, progress) -> str | None:
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


# -- sources, under the cache lock ----------------------------------------------------------

def _urls(target: Target, mirror: str | None) -> list[str]:
    urls = list(target.urls)
    if mirror:
        # A mirror is a copy of the cache directory served over http(s): same file names.
        urls.insert(0, f"{mirror}/{target.cache_name}")
    return urls


def _fetch(target: Target, *, progress: bool, options: DownloadOptions | None, cache: pathlib.Path,
           offline: bool, mirror: str | None) -> pathlib.Path:
    options = options or DownloadOptions()
    final = cache / target.cache_name
    with file_lock(final):
        if cached(final, target):
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
                    _download_verified(session, url, partial, target, options, progress)
                except _SourceFailed as exc:
                    failures.append((url, str(exc)))
                    _log.warning("%s: could not use %s: %s", target.label, url, exc)
                    continue
                os.replace(partial, final)
                for leftover in cache.glob(f"{final.name}.*.partial"):  # from sources that failed
                    leftover.unlink(missing_ok=True)
                return final
        raise DownloadError(f"{target.label}: no source gave verified bytes for {final.name}", failures)


def fetch(file: WeightFile, *, progress: bool = True, options: DownloadOptions | None = None,
          cache: str | os.PathLike | None = None, offline: bool | None = None,
          mirror: str | None = None) -> pathlib.Path:
    """Path of a verified local copy of ``file``, downloading it if the cache lacks it.

    ``offline`` and ``mirror`` default to ``$GHOSTNET_HUB_OFFLINE`` and
    ``$GHOSTNET_HUB_MIRROR``; ``cache`` to ``torch.hub.get_dir()/checkpoints``.
    """
    return _fetch(target_for(file), progress=progress, options=options, cache=cache_dir(cache),
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
        target = target_for(file)
        final = cache / target.cache_name
        if final.exists():
            with file_lock(final):
                if cached(final, target):
                    return final, file
    failures: list[tuple[str, str]] = []
    for file in files:
        try:
            path = _fetch(target_for(file), progress=progress, options=options, cache=cache, offline=offline,
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
    """A small file (an image to classify) into memory, under the same retry policy as
    weight downloads; nothing is cached or verified, so never use it for weights."""
    options = options or DownloadOptions()
    if offline_requested():
        raise OfflineError(f"offline mode ({OFFLINE_ENV}) is on; not fetching {url}")
    attempt = 0
    while True:
        answer = None
        try:
            with requests.get(url, stream=True, timeout=options.timeout) as response:
                if _transient_status(response.status_code):
                    answer, error = response, f"HTTP {response.status_code}"
                else:
                    response.raise_for_status()
                    body = bytearray()
                    for chunk in response.iter_content(options.chunk_size):
                        body += chunk
                        if len(body) > max_bytes:
                            raise ValueError(f"{url} is larger than {max_bytes} bytes")
                    return bytes(body)
        except requests.RequestException as exc:
            if not _transient_error(exc):
                raise
            error = f"{type(exc).__name__}: {exc}"
        attempt += 1
        if attempt > options.retries:
            raise DownloadError(f"could not fetch {url} after {attempt} attempts; last: {error}")
        time.sleep(_retry_delay(options, attempt, answer))


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
    target = Target(
        label=f"weights from {url}",
        urls=(url,),
        checksums={"sha256": sha256} if sha256 else {},
        size=None,
        cache_name=f"url-{url_key}-{(sha256 or 'unverified')[:16]}-{basename}",
        sidecar=sha256 is None,
    )
    return _fetch(target, progress=progress, options=options, cache=cache_dir(cache),
                  offline=offline_requested(offline), mirror=None)
