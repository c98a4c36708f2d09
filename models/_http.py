"""One URL's bytes into a partial file, under the one retry policy (``_transient_status``,
``_transient_error``, ``_retry_delay``, ``_retrying``): only timeouts, connections broken
mid-body, 408, 429 and 5xx are retried, with backoff; a name that does not resolve, a refused
or unreachable connection, TLS, an unsupported scheme or a redirect loop get one attempt; all
within one deadline per file. A resume (Range) needs the server to prove the file unchanged
(If-Range with the ETag or Last-Modified kept beside the partial) or a recorded checksum to
catch a splice. An encoded (gzip) body is checked as decoded bytes and never resumed. Bodies
are capped; a failure to write is the machine's, not the source's (``WriteFailed``)."""
from __future__ import annotations

import contextlib
import email.utils
import errno
import json
import logging
import math
import os
import pathlib
import socket
import ssl
import sys
import time
import urllib.parse
from dataclasses import dataclass

import requests
from tqdm import tqdm

from ._files import free_bytes
from ._hashing import Digests, hash_file
from .cache import Target, discard_partial, partial_meta, resume_point

_log = logging.getLogger("models.download")

DEADLINE_ENV = "GHOSTNET_HUB_DEADLINE"
MAX_BYTES_ENV = "GHOSTNET_HUB_MAX_BYTES"
DEFAULT_DEADLINE = 900.0  # seconds for one file, all its sources
DEFAULT_MAX_BYTES = 1 << 30  # no GhostNet/TinyNet file is a tenth of this; a disk is far more
MAX_REDIRECTS = 10


@dataclass(frozen=True)
class DownloadOptions:
    """How hard to try. ``timeout`` is (connect, read) in seconds (read: the longest silence
    between two pieces of a body). ``deadline``: seconds for one file, all sources (default
    ``$GHOSTNET_HUB_DEADLINE``, else 900); ``max_bytes``: cap on a body of unrecorded size
    (default ``$GHOSTNET_HUB_MAX_BYTES``, else 1 GiB)."""

    timeout: tuple[float, float] = (10.0, 20.0)
    retries: int = 4  # per URL, after the first attempt, for transient failures only
    backoff: float = 1.0  # first wait in seconds, doubled each retry
    max_wait: float = 60.0  # cap on any wait, Retry-After included
    chunk_size: int = 1 << 20
    deadline: float | None = None
    max_bytes: int | None = None

    def limits(self) -> tuple[float, int]:
        """(deadline in seconds, byte cap), from the options or the environment."""
        return (_setting(self.deadline, DEADLINE_ENV, DEFAULT_DEADLINE, float),
                _setting(self.max_bytes, MAX_BYTES_ENV, DEFAULT_MAX_BYTES, int))


def _setting(value, env: str, default, kind):
    if value is None:
        text = os.environ.get(env, "").strip()
        try:
            value = kind(text) if text else default
        except ValueError:
            raise ValueError(f"{env}={text!r} is not a number") from None
    # NaN would pass "<= 0" and then make every deadline comparison false: no deadline at all.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{env} (or the option) must be a positive finite number, got {value!r}")
    return value


class SourceFailed(Exception):
    """This URL cannot give the file; the next one may. ``host_down``: nothing on that host
    will answer either (name, refusal, TLS), so its other URLs need not be tried."""

    def __init__(self, reason: str, *, host_down: bool = False):
        super().__init__(reason)
        self.host_down = host_down


class WriteFailed(Exception):
    """The cache could not take the bytes (full disk, file size limit, read-only): trying
    another source into the same disk would fail the same way."""

    def __init__(self, directory: pathlib.Path, needed: int | None, error: OSError | None = None):
        self.directory, self.needed, self.error = directory, needed, error
        self.free = free_bytes(directory)
        super().__init__(str(error) if error else "not enough free space")


_SLACK = 64 << 10  # room kept free below a body of unannounced size (file system metadata): _append_body


# -- the retry policy (every HTTP call) -----------------------------------------------------

def _transient_status(status: int) -> bool:
    """An answer worth asking again for: timeout, rate limit, server trouble."""
    return status in (408, 429) or status >= 500


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost error under requests' and urllib3's wrappers."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in getattr(exc, "args", ()) if isinstance(a, BaseException)), None)
        inner = inner or exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return exc


def _classify(exc: requests.RequestException, url: str) -> tuple[bool, str, bool]:
    """(transient, the cause in a few words, the whole host is down) for a failed request."""
    failed_url = getattr(getattr(exc, "request", None), "url", None) or url
    parts = urllib.parse.urlsplit(failed_url)
    host = parts.hostname or failed_url
    if isinstance(exc, requests.TooManyRedirects):
        return False, f"redirect loop (more than {MAX_REDIRECTS} redirects)", False
    if isinstance(exc, (requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema,
                        requests.exceptions.InvalidURL)):
        return False, f"cannot fetch {failed_url!r} (unsupported or invalid URL)", False
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return False, "the encoded body could not be decoded", False
    cause = _root_cause(exc)
    if isinstance(exc, requests.exceptions.SSLError) or isinstance(cause, ssl.SSLError):
        reason = getattr(cause, "reason", None) or str(cause).split(":")[-1].strip(" )'\"") or "handshake failed"
        return False, f"{host}: TLS error ({reason})", True
    if isinstance(exc, requests.ConnectTimeout):
        return True, f"{host}: connection timed out", False
    # (urllib3's ReadTimeoutError, by name: urllib3 is requests' dependency, not one of ours)
    if isinstance(exc, requests.Timeout) or isinstance(cause, TimeoutError) or \
            type(cause).__name__ == "ReadTimeoutError":
        return True, f"{host}: no data within the read timeout", False
    if isinstance(cause, socket.gaierror):
        return False, f"{host}: name does not resolve", True
    if isinstance(cause, ConnectionRefusedError):
        return False, f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}: connection refused", True
    code = getattr(cause, "errno", None)
    if code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.ENETDOWN):
        return False, f"{host}: {os.strerror(code).lower()}", True
    if isinstance(exc, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        return True, f"{host}: connection broken ({type(cause).__name__})", False
    return False, f"{type(exc).__name__}: {exc}", False


def _transient_error(exc: requests.RequestException, url: str = "") -> bool:
    """A timeout or a connection broken while talking may work on the next try; a name that
    does not resolve, a refusal, TLS, a bad scheme or a redirect loop will not."""
    return _classify(exc, url)[0]


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


def session() -> requests.Session:
    s = requests.Session()
    s.max_redirects = MAX_REDIRECTS
    s.headers["Accept-Encoding"] = "identity"  # the bytes as stored: sizes, offsets and hashes mean one thing
    return s


def deadline_reason(deadline: float) -> str:
    return f"gave up: the {deadline:g} s deadline for this file was reached (set {DEADLINE_ENV} to allow more)"


# -- one URL ------------------------------------------------------------------------------

def _content_total(response: requests.Response) -> tuple[int | None, int]:
    """(full file length if the server says, first byte of this body)."""
    if response.status_code == 206:
        spec = response.headers.get("Content-Range", "")
        try:
            unit, rest = spec.split(" ", 1)
            span, total = rest.split("/")
            start = int(span.split("-")[0])
            return (None if total == "*" else int(total)), start
        except ValueError:
            raise SourceFailed(f"206 answer with an unreadable Content-Range {spec!r}") from None
    length = response.headers.get("Content-Length", "")
    return (int(length) if length.isdigit() else None), 0


def _encoded(response: requests.Response) -> bool:
    return response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")


class _Again(Exception):
    """This attempt failed in a way worth another: ``error`` says how; ``answer`` is the
    response whose Retry-After counts."""

    def __init__(self, error: str, answer: requests.Response | None = None):
        super().__init__(error)
        self.error, self.answer = error, answer


def _retrying(url: str, options: DownloadOptions, deadline_at: float, once):
    """The one retry loop: ``once(timeout)`` until it returns, retrying only what the policy
    calls transient, with backoff, never past ``deadline_at``."""
    deadline, _ = options.limits()
    attempt = 0
    while True:
        left = deadline_at - time.monotonic()
        if left <= 0:
            raise SourceFailed(deadline_reason(deadline))
        answer = None
        try:
            return once((min(options.timeout[0], left), min(options.timeout[1], left)))
        except _Again as again:
            error, answer = again.error, again.answer
        except requests.RequestException as exc:
            transient, error, host_down = _classify(exc, url)
            if not transient:
                raise SourceFailed(error, host_down=host_down) from None
        attempt += 1
        if attempt > options.retries:
            raise SourceFailed(f"gave up after {attempt} attempts; last: {error}")
        delay = _retry_delay(options, attempt, answer)
        if time.monotonic() + delay >= deadline_at:
            raise SourceFailed(f"{deadline_reason(deadline)}; last: {error}")
        _log.info("%s: %s; retry %d/%d in %.1f s", url, error, attempt, options.retries, delay)
        time.sleep(delay)


def transfer(http: requests.Session, url: str, partial: pathlib.Path, target: Target, options: DownloadOptions,
             progress: bool, deadline_at: float) -> tuple[Digests, bool]:
    """Bring ``partial`` to the whole body of ``url``: (digests of all its bytes, whether
    any of them came from an earlier response). Raises ``SourceFailed``, ``WriteFailed``."""
    _, cap = options.limits()
    digests: Digests | None = None
    resumed = False

    def once(timeout) -> Digests:
        nonlocal digests, resumed
        offset, headers = resume_point(partial, target, cap)
        with http.get(url, headers=headers, stream=True, timeout=timeout) as response:
            status = response.status_code
            if status == 416 and offset:  # our partial is not a prefix the server knows
                discard_partial(partial)
                raise _Again("HTTP 416 for the resumed range; restarting from byte 0")
            if _transient_status(status):
                raise _Again(f"HTTP {status} {response.reason}", response)
            if status not in (200, 206):
                raise SourceFailed(f"HTTP {status} {response.reason}")
            offset = _check_answer(response, partial, target, offset, cap, url)
            if digests is None or digests.count != offset:
                if digests is not None:
                    digests.close()
                total = None if _encoded(response) else _content_total(response)[0]
                digests = Digests(target.algos, total if total is not None else target.size)
                if offset:
                    hash_file(partial, (), start=digests, upto=offset)
            resumed = resumed or offset > 0
            _append_body(response, partial, offset, digests, target, options, progress, cap, deadline_at)
            return digests

    try:
        return _retrying(url, options, deadline_at, once), resumed
    except BaseException:
        if digests is not None:
            digests.close()
        raise


def _check_answer(response, partial: pathlib.Path, target: Target, offset: int, cap: int, url: str) -> int:
    """Where the body of this answer starts in the file. Refuses lengths that cannot be
    right and resumed bodies that do not continue ours; records validators of a new body."""
    encoded = _encoded(response)
    if response.status_code == 206:
        total, start = _content_total(response)
        etag, recorded = response.headers.get("ETag"), partial_meta(partial).get("etag")
        if encoded or not offset or start != offset or (etag and recorded and etag != recorded):
            discard_partial(partial)
            raise _Again(f"a resumed answer that does not continue our bytes (from byte {start}); restarting")
    else:
        if offset:
            _log.info("%s sent the whole file to a Range request (changed, or no Range support)", url)
        offset = 0
        total = None if encoded else _content_total(response)[0]
    if total is not None and target.size is not None and total != target.size:
        raise SourceFailed(f"the server announces {total} bytes, the manifest records {target.size}")
    if total is not None and total > cap:
        raise SourceFailed(f"the server announces {total:,} bytes, more than the {cap:,}-byte limit "
                           f"(set {MAX_BYTES_ENV} to allow more)")
    needed = (total if total is not None else target.size or 0) - offset
    free = free_bytes(partial.parent)
    if free is not None and needed > free:
        raise WriteFailed(partial.parent, needed)
    if offset == 0:
        meta = {"etag": response.headers.get("ETag"), "encoded": encoded,
                "last_modified": response.headers.get("Last-Modified")}
        try:
            pathlib.Path(f"{partial}.json").write_text(json.dumps(meta))
        except OSError as exc:
            raise WriteFailed(partial.parent, needed, exc) from None
    return offset


def _append_body(response, partial: pathlib.Path, offset: int, digests: Digests, target: Target,
                 options: DownloadOptions, progress: bool, cap: int, deadline_at: float) -> None:
    """Append the body to ``partial``, or raise ``_Again`` saying why it stopped short."""
    total = None if _encoded(response) else _content_total(response)[0]
    limit = target.size if target.size is not None else cap
    # A body whose size nobody announced (no size recorded, no Content-Length) may not outgrow the
    # disk either: one that does is the source's fault (an endless body, say), and the next source
    # may serve the file; a write that fails anyway is the machine's (WriteFailed) and ends the chain.
    free = free_bytes(partial.parent) if target.size is None and total is None else None
    room = None if free is None else max(0, free - _SLACK)
    bar = tqdm(total=total if total is not None else target.size, initial=offset, unit="B", unit_scale=True,
               unit_divisor=1024, desc=target.cache_name, file=sys.stderr, disable=not progress, leave=False)
    received, over, full = offset, False, False
    try:
        with open(partial, "ab" if offset else "wb") as f:
            for chunk in response.iter_content(options.chunk_size):
                if received + len(chunk) > limit:  # nothing past the cap is ever written
                    over = True
                    break
                if room is not None and received - offset + len(chunk) > room:
                    full = True
                    break
                f.write(chunk)
                received += len(chunk)
                digests.update(chunk)
                bar.update(len(chunk))
                if time.monotonic() > deadline_at:
                    raise SourceFailed(deadline_reason(options.limits()[0]))
    except requests.RequestException as exc:  # (before OSError: requests' errors are OSErrors)
        cause = _classify(exc, response.url)[1]
        if isinstance(exc, requests.exceptions.ContentDecodingError):
            raise SourceFailed(cause) from None
        raise _Again(f"transfer broke at byte {received}: {cause}") from None
    except OSError as exc:
        discard_partial(partial)
        raise WriteFailed(partial.parent, total if total is not None else target.size, exc) from None
    finally:
        bar.close()
    if full:
        discard_partial(partial)
        raise SourceFailed(f"sent more than the {free:,} bytes free in {partial.parent} without announcing its size; "
                           f"stopped after writing {received:,} (if the file is that large, free space there)")
    if over:
        discard_partial(partial)
        why = "the manifest records that size" if target.size is not None else f"the limit; set {MAX_BYTES_ENV}"
        raise SourceFailed(f"the body goes past {limit:,} bytes ({why}); stopped after writing {received:,}")
    if total is not None and received != total:
        raise _Again(f"body ended at byte {received} of {total}")


def changed(url: str, validators: dict[str, str], options: DownloadOptions) -> bool:
    """Whether the file at ``url`` is no longer the one whose ``validators`` (ETag, Last-Modified)
    were recorded: one conditional GET, its body never read; ``SourceFailed`` if no answer says."""
    asks = (("If-None-Match", "etag"), ("If-Modified-Since", "last_modified"))
    headers = {name: validators[key] for name, key in asks if validators.get(key)}
    try:
        with session() as http, http.get(url, headers=headers, stream=True, timeout=options.timeout) as response:
            if response.status_code not in (200, 304):
                raise SourceFailed(f"HTTP {response.status_code} {response.reason}")
            # 304: unchanged. A server that ignores the conditions still names the version it sends.
            key, header = ("etag", "ETag") if validators.get("etag") else ("last_modified", "Last-Modified")
            return response.status_code == 200 and response.headers.get(header) != validators[key]
    except requests.RequestException as exc:
        raise SourceFailed(_classify(exc, url)[1]) from None


def get_bytes(url: str, options: DownloadOptions, max_bytes: int) -> bytes:
    """A small body into memory (an image), under the same policy and deadline."""

    def once(timeout) -> bytes:
        with http.get(url, stream=True, timeout=timeout) as response:
            if _transient_status(response.status_code):
                raise _Again(f"HTTP {response.status_code} {response.reason}", response)
            if response.status_code >= 400:
                raise SourceFailed(f"HTTP {response.status_code} {response.reason}")
            body = bytearray()
            for chunk in response.iter_content(options.chunk_size):
                body += chunk
                if len(body) > max_bytes:
                    raise SourceFailed(f"larger than {max_bytes} bytes")
            return bytes(body)

    with session() as http:
        return _retrying(url, options, time.monotonic() + options.limits()[0], once)
