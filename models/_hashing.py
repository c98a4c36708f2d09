"""Streaming multi-digest hashing: every digest a file needs, in one pass over its bytes,
each on its own thread so that hashing overlaps reading or downloading."""
from __future__ import annotations

import hashlib
import os
import pathlib
import queue
import threading
from collections.abc import Iterable
from typing import BinaryIO

__all__ = ["Digests", "hash_bytes", "hash_file", "hash_stream", "sha256_file"]


class _HashThread:
    """One digest fed from a bounded queue on its own thread. hashlib releases the GIL on
    large buffers, so hashing overlaps the caller's reads and writes instead of adding to
    them (on a fast link, hashing is most of the cost of a verified download)."""

    def __init__(self, digest: hashlib._Hash):
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


class Digests:
    """Every requested digest (``sha256``, ``md5``, ``git_blob_sha1``) over one pass of the
    bytes. ``total`` is the length when known up front: git's blob digest hashes it first,
    so without it that digest is ``deferred`` to a second pass over the finished file."""

    def __init__(self, algos: Iterable[str], total: int | None):
        hashes: dict[str, hashlib._Hash] = {}
        self.deferred: set[str] = set()
        self.total = total
        self.count = 0
        for algo in algos:
            if algo == "sha256":
                hashes["sha256"] = hashlib.sha256()
            elif algo == "md5":
                hashes["md5"] = hashlib.md5(usedforsecurity=False)
            elif algo == "git_blob_sha1":
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


def hash_file(path: pathlib.Path, algos: Iterable[str], start: Digests | None = None, upto: int | None = None,
              chunk_size: int = 1 << 20) -> Digests:
    """Feed ``path`` (from ``start.count``, up to byte ``upto``) into ``start`` or new digests."""
    digests = start or Digests(algos, path.stat().st_size)
    with open(path, "rb") as f:
        f.seek(digests.count)
        remaining = (upto if upto is not None else path.stat().st_size) - digests.count
        _feed(f, digests, remaining, chunk_size)
    return digests


def hash_stream(f: BinaryIO, algos: Iterable[str], size: int, chunk_size: int = 1 << 20) -> Digests:
    """Digests of the ``size`` bytes of an open file, read from where it stands."""
    digests = Digests(algos, size)
    _feed(f, digests, size, chunk_size)
    return digests


def hash_bytes(data: bytes, algos: Iterable[str], chunk_size: int = 1 << 20) -> dict[str, str]:
    """Hex digests of bytes already in memory."""
    digests = Digests(algos, len(data))
    view = memoryview(data)
    for i in range(0, len(data), chunk_size):
        digests.update(view[i:i + chunk_size])
    return digests.hexdigests()


def _feed(f: BinaryIO, digests: Digests, remaining: int, chunk_size: int) -> None:
    while remaining > 0:
        chunk = f.read(min(chunk_size, remaining))
        if not chunk:
            break
        digests.update(chunk)
        remaining -= len(chunk)


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    return hash_file(pathlib.Path(path), ("sha256",)).hexdigests()["sha256"]
