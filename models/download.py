"""Fetch -> verify -> cache. With ``_http`` (its transfer layer and the one retry policy),
the only part of the package that touches the network.

A weight file gets its final cache name only after every checksum the manifest records,
and its size, matched the bytes, hashed as they stream in (``_hashing``). A verified cached
file is used without a lock and without write access. Otherwise one lock per file
(``cache.file_lock``) makes N processes asking at once produce one download, and when
every source fails, the waiting processes read what the first one learned (a short-lived
failure record beside the lock) instead of trying the same dead sources in turn. Errors
name each source once, with its cause in a few words, and end with one hint.
"""
from __future__ import annotations

import logging
import os
import pathlib
import re
import time
import urllib.parse
from collections.abc import Sequence

import filelock

from . import _commands, _http
from ._files import no_room
from ._hashing import hash_file
from ._http import DEADLINE_ENV, MAX_BYTES_ENV, DownloadOptions, SourceFailed, WriteFailed
from .cache import (
    CacheDirError,
    Target,
    cache_dir,
    cached,
    discard_partial,
    entry_path,
    file_lock,
    forget_failures,
    partial_path,
    problems,
    recent_failures,
    record_failures,
    recorded_validators,
    remember,
    target_for,
    url_prefix,
    verify_file,
    write_sidecar,
)
from .manifest import CHECKSUM_LENGTHS, WeightFile

__all__ = [
    "DEADLINE_ENV",
    "HF_OFFLINE_ENV",
    "MAX_BYTES_ENV",
    "MIRROR_ENV",
    "OFFLINE_ENV",
    "CacheWriteError",
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
HF_OFFLINE_ENV = "HF_HUB_OFFLINE"  # Hugging Face's own switch, honoured for its URLs
_HF_HOSTS = ("huggingface.co", "hf.co")
_TRUE = {"1", "true", "yes", "on"}
_log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """No source gave verified bytes. ``failures`` holds (url, reason) for each source,
    each printed once; ``hint`` is the one closing suggestion."""

    def __init__(self, message: str, failures: Sequence[tuple[str, str]] = (), hint: str = ""):
        self.failures = list(failures)
        self.hint = hint
        lines = "".join(f"\n  - {url}: {reason}" for url, reason in self.failures)
        super().__init__(message + lines + (f"\nhint: {hint}" if hint else ""))


class OfflineError(DownloadError):
    """Offline mode is on and the file is not in the cache."""


class CacheWriteError(DownloadError):
    """The cache cannot take the file (full disk, file size limit, read-only): a property
    of the machine, so no other source is tried into the same disk."""


# -- configuration ------------------------------------------------------------------------

def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def offline_requested(offline: bool | None = None) -> bool:
    return offline if offline is not None else _flag(OFFLINE_ENV)


def _mirror_base(mirror: str | None) -> str | None:
    """The mirror to try first: ``mirror``, else ``$GHOSTNET_HUB_MIRROR``; "" means none."""
    base = (mirror if mirror is not None else os.environ.get(MIRROR_ENV, "")).strip()
    if not base:
        return None
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"mirror {base!r} (from {MIRROR_ENV} or mirror=) must be an http(s) URL")
    return base


def _mirror_url(base: str, name: str) -> str:
    """``name`` inside the mirror's directory; a query (a token) stays a query."""
    parts = urllib.parse.urlsplit(base)
    path = parts.path.rstrip("/") + "/" + urllib.parse.quote(name)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _urls(target: Target, mirror: str | None) -> list[str]:
    # A mirror is a copy of the cache directory served over http(s): same file names.
    return ([_mirror_url(mirror, target.cache_name)] if mirror else []) + list(target.urls)


def _skip_reason(url: str, dead_hosts: dict[str, str]) -> str | None:
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if _flag(HF_OFFLINE_ENV) and any(host == h or host.endswith("." + h) for h in _HF_HOSTS):
        return f"not tried ({HF_OFFLINE_ENV}=1)"
    if parts.netloc.lower() in dead_hosts:
        return f"{dead_hosts[parts.netloc.lower()]} (not tried again)"
    return None


def _hint(model: str) -> str:
    return (f"to work without the network, set {OFFLINE_ENV}=1 and use a cache filled by "
            f"`{_commands.command('prefetch ' + model)}` on a machine with network (same TORCH_HOME), "
            f"set {MIRROR_ENV} to a copy inside your network, or load a local file with checkpoint=PATH")


def _write_error(target: Target, exc: WriteFailed) -> CacheWriteError:
    where = f"the cache {exc.directory}"
    return CacheWriteError(f"{target.label}: {no_room(target.cache_name, where, exc.needed, exc.free, exc.error)}. "
                           "Nothing was kept; other sources were not tried into the same disk. Free space there "
                           f"(`{_commands.command('cache prune')}`) or set TORCH_HOME to a disk with room.")


# -- one file, under its lock ------------------------------------------------------------------

def _download_verified(http, url: str, partial: pathlib.Path, target: Target, options: DownloadOptions,
                       progress: bool, deadline_at: float) -> None:
    """Bring ``partial`` to the complete, verified content of ``target`` from ``url``. Bytes
    resumed from an earlier attempt that do not verify are discarded and downloaded again."""
    for fresh in (False, True):
        digests, resumed = _http.transfer(http, url, partial, target, options, progress, deadline_at)
        found = digests.hexdigests()
        if digests.deferred:
            found.update(hash_file(partial, digests.deferred).hexdigests())
        wrong = problems(target, found, partial.stat().st_size)
        if not wrong:
            break
        discard_partial(partial)
        if fresh or not resumed:
            raise SourceFailed("content does not match the recorded checksums: " + "; ".join(wrong))
        _log.info("%s: bytes resumed from an earlier download did not verify (%s); starting again from byte 0",
                  url, "; ".join(wrong))
    if target.sidecar:
        try:
            write_sidecar(partial.parent / target.cache_name, found["sha256"], partial)
        except OSError as exc:
            raise WriteFailed(partial.parent, None, exc) from None


def _publish(partial: pathlib.Path, final: pathlib.Path, target: Target) -> None:
    """Give the verified ``partial`` its final name, remembering the inode (see cache.load_bytes)."""
    os.replace(partial, final)
    remember(final, os.stat(final), target)  # (under the lock: only an outsider could swap it between)
    discard_partial(partial)  # its resume record
    for leftover in final.parent.glob(f"{final.name}.*.partial"):  # from sources that failed
        discard_partial(leftover)
    forget_failures(final)


def _changed_upstream(final: pathlib.Path, target: Target, offline: bool, options: DownloadOptions) -> bool:
    """Whether a user URL's cached file, with no checksum to pin its content, changed there (one conditional
    request with the validators recorded at download); offline, with none, or with no answer, it stands."""
    pinned = not target.sidecar or offline or _skip_reason(target.urls[0], {})
    if pinned or not (validators := recorded_validators(final)):
        return False
    try:  # (a cache that cannot take the new file, read-only say, keeps the one it has)
        return _http.changed(target.urls[0], validators, options) and cache_dir(final.parent) is not None
    except (SourceFailed, CacheDirError) as exc:
        _log.warning("%s: could not revalidate or replace the cached %s (%s); using it", target.label, final.name, exc)
        return False


def _offline_error(target: Target, final: pathlib.Path, urls: Sequence[str]) -> OfflineError:
    return OfflineError(
        f"{target.label}: offline mode ({OFFLINE_ENV}) is on and {final.name} is not in the cache "
        f"{final.parent}. Fetch it on a machine with network access{target.prefetch_hint}, or copy it "
        "there; its sources:",
        [(url, "not tried (offline)") for url in urls],
    )


def _fetch(target: Target, *, progress: bool, options: DownloadOptions | None, cache: str | os.PathLike | None,
           offline: bool, mirror: str | None, dead_hosts: dict[str, str] | None = None,
           found: list[str] | None | bool = False, hint: str = "") -> tuple[pathlib.Path, list[tuple[str, str]]]:
    """(verified local copy of ``target``, failures of sources tried before the one that
    worked). ``found``: what ``verify_file`` already said about the cached copy, if asked."""
    options = options or DownloadOptions()
    dead_hosts = {} if dead_hosts is None else dead_hosts
    directory = cache_dir(cache, writable=False)
    final = entry_path(directory, target.cache_name)
    if found is False:
        found = verify_file(final, target)  # no lock and no write access needed
    stale = found == [] and _changed_upstream(final, target, offline, options)
    if found == [] and not stale:
        return final, []
    urls = _urls(target, mirror)
    if offline and found is None:
        raise _offline_error(target, final, urls)
    deadline, _ = options.limits()  # (a bad setting does not stand in the way of a cache hit)
    try:
        cache_dir(cache)
    except CacheDirError as exc:
        if found:
            raise CacheDirError(f"the cached {final} failed verification ({'; '.join(found)}) and cannot be "
                                f"replaced: {exc}") from None
        raise
    waiting_since = time.time()
    lock = file_lock(final)
    try:
        lock.acquire(timeout=deadline + 60)
    except filelock.Timeout:
        raise DownloadError(f"{target.label}: another process has held {lock.lock_file} for over {deadline + 60:g} s "
                            f"({DEADLINE_ENV} bounds its download); try again later") from None
    try:
        if not stale and cached(final, target):
            return final, []
        if offline:
            raise _offline_error(target, final, urls)
        earlier = recent_failures(final, urls, waiting_since)
        if earlier is not None:
            raise DownloadError(f"{target.label}: no source gave verified bytes for {final.name}", earlier, hint)
        if target.size is not None:  # before any request, as huggingface_hub does
            have = max((p.stat().st_size for u in urls if (p := partial_path(final, u)).is_file()), default=0)
            failed = WriteFailed(directory, target.size - have)
            if failed.free is not None and failed.needed > failed.free:
                raise _write_error(target, failed)
        return final, _try_sources(target, final, urls, options, progress, dead_hosts, hint)
    finally:
        lock.release()


def _try_sources(target: Target, final: pathlib.Path, urls: list[str], options: DownloadOptions, progress: bool,
                 dead_hosts: dict[str, str], hint: str) -> list[tuple[str, str]]:
    deadline, _ = options.limits()
    deadline_at = time.monotonic() + deadline
    failures: list[tuple[str, str]] = []
    with _http.session() as http:
        for url in urls:
            skip = _skip_reason(url, dead_hosts)
            if skip is None and time.monotonic() >= deadline_at:
                skip = "not tried: " + _http.deadline_reason(deadline)
            if skip:
                failures.append((url, skip))
                continue
            partial = partial_path(final, url)
            try:
                _download_verified(http, url, partial, target, options, progress, deadline_at)
                _publish(partial, final, target)
            except SourceFailed as exc:
                failures.append((url, str(exc)))
                if exc.host_down:
                    dead_hosts[urllib.parse.urlsplit(url).netloc.lower()] = str(exc)
                _log.info("%s: could not use %s: %s", target.label, url, exc)
                continue
            except WriteFailed as exc:
                raise _write_error(target, exc) from None
            except OSError as exc:
                raise _write_error(target, WriteFailed(final.parent, target.size, exc)) from None
            return failures
    record_failures(final, urls, failures)
    raise DownloadError(f"{target.label}: no source gave verified bytes for {final.name}", failures, hint)


def _warn_recovered(label: str, path: pathlib.Path, failures: Sequence[tuple[str, str]]) -> None:
    if failures:
        _log.warning("%s: using %s after %d source(s) failed:%s", label, path.name, len(failures),
                     "".join(f"\n  - {url}: {reason}" for url, reason in failures))


# -- public ---------------------------------------------------------------------------------

def fetch(file: WeightFile, *, progress: bool = True, options: DownloadOptions | None = None,
          cache: str | os.PathLike | None = None, offline: bool | None = None,
          mirror: str | None = None) -> pathlib.Path:
    """Path of a verified local copy of ``file``, downloading it if the cache lacks it.

    ``offline`` and ``mirror`` default to ``$GHOSTNET_HUB_OFFLINE`` and
    ``$GHOSTNET_HUB_MIRROR``; ``cache`` to ``torch.hub.get_dir()/checkpoints``.
    """
    target = target_for(file)
    path, failures = _fetch(target, progress=progress, options=options, cache=cache,
                            offline=offline_requested(offline), mirror=_mirror_base(mirror))
    _warn_recovered(target.label, path, failures)
    return path


def fetch_first(files: Sequence[WeightFile], *, progress: bool = True, options: DownloadOptions | None = None,
                cache: str | os.PathLike | None = None, offline: bool | None = None,
                mirror: str | None = None) -> tuple[pathlib.Path, WeightFile]:
    """The first of ``files`` (same model, in manifest order) that is cached or can be
    downloaded and verified; a cached later file beats downloading an earlier one."""
    directory = cache_dir(cache, writable=False)
    offline = offline_requested(offline)
    mirror = _mirror_base(mirror)
    checked = {}
    for file in files:
        checked[file.index] = verify_file(entry_path(directory, file.cache_name), target_for(file))
        if checked[file.index] == []:
            return directory / file.cache_name, file
    failures: list[tuple[str, str]] = []
    dead_hosts: dict[str, str] = {}
    for file in files:
        target = target_for(file)
        try:
            path, earlier = _fetch(target, progress=progress, options=options, cache=cache, offline=offline,
                                   mirror=mirror, dead_hosts=dead_hosts, found=checked.get(file.index, False))
        except CacheWriteError:
            raise
        except DownloadError as exc:
            failures += exc.failures
            continue
        _warn_recovered(target.label, path, failures + earlier)
        return path, file
    model = files[0].model
    if offline:
        raise OfflineError(
            f"{model}: offline mode ({OFFLINE_ENV}) is on and no weight file of it is in the cache {directory}; "
            f"run `{_commands.command('prefetch ' + model)}` where there is network access (with the same TORCH_HOME), "
            "or unset the variable. Its sources:", failures)
    raise DownloadError(f"{model}: every source failed:", failures, _hint(model))


def fetch_bytes(url: str, *, options: DownloadOptions | None = None, max_bytes: int = 64 << 20) -> bytes:
    """A small file (an image to classify) into memory, under the same retry policy as
    weight downloads; nothing is cached or verified, so never use it for weights."""
    if offline_requested():
        raise OfflineError(f"offline mode ({OFFLINE_ENV}) is on; not fetching {url}")
    try:
        return _http.get_bytes(url, options or DownloadOptions(), max_bytes)
    except SourceFailed as exc:
        raise DownloadError(f"could not fetch {url}: {exc}") from None


def _portable_name(url_path: str) -> str:
    """The last path segment of a URL as a short file name any OS accepts."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", pathlib.PurePosixPath(urllib.parse.unquote(url_path)).name)
    name = name.strip("._-") or "weights"
    if len(name) > 64:
        suffix = pathlib.PurePosixPath(name).suffix[:16]
        name = name[: 64 - len(suffix)] + suffix
    return name


def fetch_url(url: str, *, sha256: str | None = None, progress: bool = True,
              options: DownloadOptions | None = None, cache: str | os.PathLike | None = None,
              offline: bool | None = None) -> pathlib.Path:
    """A user's weight file from ``url``, cached; checked against ``sha256`` when given."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    if sha256 is not None:
        sha256 = sha256.lower()
        if len(sha256) != CHECKSUM_LENGTHS["sha256"] or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    target = Target(
        label=f"weights from {url}",
        urls=(url,),
        checksums={"sha256": sha256} if sha256 else {},
        size=None,
        cache_name=f"{url_prefix(url)}-{(sha256 or 'unverified')[:16]}-{_portable_name(parts.path)}",
        sidecar=sha256 is None,
    )
    path, failures = _fetch(target, progress=progress, options=options, cache=cache,
                            offline=offline_requested(offline), mirror=None,
                            hint="download it another way and pass its local path as checkpoint=PATH")
    _warn_recovered(target.label, path, failures)
    return path

