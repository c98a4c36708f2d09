"""What is in the weights cache directory, and tidying it up (``python -m models cache
list|prune|clear``, as ``huggingface-cli scan-cache`` and ``delete-cache`` do for theirs).

``$TORCH_HOME/hub/checkpoints`` is shared with torchvision and others: only names this
package writes (``<model>-...`` for its models, ``url-...`` for user URLs) are listed or
removed. Nothing is removed from under a process that holds a file's lock.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass

import filelock

from . import _trust
from .cache import Target, export_target, file_lock, target_for, verify_file
from .manifest import WeightFile

__all__ = ["Entry", "clear", "prune", "scan"]

_SUFFIX = re.compile(r"(\.[0-9a-f]{8}\.partial(\.json)?|\.lock|\.failures(\.\d+\.tmp)?|\.sha256|\.trusted(\.\d+\.tmp)?"
                     r"|\.corrupt-.*)$")
_WORK = ".export-"  # export's work folders (tempfile prefix), removed when it ends or by prune
_KINDS = {"partial": "partial", "json": "resume record", "lock": "lock", "failures": "failure record",
          "tmp": "temporary", "sha256": "checksum", "trusted": "trust record"}


@dataclass
class Entry:
    path: pathlib.Path
    kind: str  # weights, export, partial, resume record, lock, failure record, quarantined, checksum, temporary
    model: str  # a model name, or "url" for a user's URL
    size: int
    age_days: float
    state: str = ""  # weights: verified / trusted on first use / corrupt: ... / not in the manifest; a lock: held

    @property
    def final_name(self) -> str:
        """The weight file this entry belongs to."""
        return _SUFFIX.sub("", self.path.name)


def _kind(name: str) -> str:
    if ".corrupt-" in name:
        return "quarantined"
    match = _SUFFIX.search(name)
    return _KINDS[match[0].rsplit(".", 1)[-1]] if match else "weights"


def _held(lock: pathlib.Path) -> bool:
    try:
        with filelock.FileLock(str(lock)).acquire(timeout=0):
            return False
    except filelock.Timeout:
        return True
    except OSError:
        return False


def _url_digest(name: str) -> str:
    """What a user-URL file's name (``url-<host>-<digest>-<file>``) says to check: the first 16
    digits of the SHA-256 it was asked to match, or ``unverified`` (then the SHA-256 kept beside
    it). A name without those parts, which no download wrote, counts as unverified."""
    return name.split("-")[2] if name.count("-") >= 3 else "unverified"


def _url_target(path: pathlib.Path) -> Target:
    """How to check a user-URL file (see ``_url_digest``)."""
    return Target(label=path.name, urls=(), checksums={}, size=None, cache_name=path.name,
                  sidecar=_url_digest(path.name) == "unverified")


def _state(path: pathlib.Path, known: dict[str, WeightFile]) -> str:
    if path.name in known and not known[path.name].pinned:  # checked against the record of its first use
        state, detail = _trust.state_of(known[path.name], path.parent)
        return "trusted on first use (unpinned)" if state == "ok" else f"corrupt: {detail}"
    if path.name in known:
        found = verify_file(path, target_for(known[path.name]))
    elif path.name.startswith("url-"):
        found = verify_file(path, _url_target(path))
        digest = _url_digest(path.name)
        if found == [] and digest != "unverified":
            from ._hashing import sha256_file

            found = [] if sha256_file(path).startswith(digest) else [f"sha256 does not begin with {digest}"]
    else:
        return "not in the manifest (another version)"
    return "verified" if found == [] else "corrupt: " + "; ".join(found or ["missing"])


def scan(directory: pathlib.Path, files: Sequence[WeightFile], models: Sequence[str],
         verify: bool = True, exports: bool = False) -> tuple[list[Entry], int]:
    """(this package's entries in ``directory``, how many other files are there). With
    ``verify`` each weight file is hashed and checked (read-only). ``exports``: ``directory``
    is the export cache (``cache.exports_dir()``), whose files are checked against the SHA-256
    recorded beside them when they were written."""
    known = {f.cache_name: f for f in files}
    prefixes = sorted((f"{m}-" for m in models), key=len, reverse=True) + (["url-"] if not exports else [])
    prefixes += [_WORK] if exports else []
    entries, others = [], 0
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        names = sorted(os.listdir(directory))
        for name in names:
            prefix = next((p for p in prefixes if name.startswith(p)), None)
            if prefix is None:
                others += 1
                continue
            path = directory / name
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            kind = _kind(name) if stat.S_ISREG(st.st_mode) or ".corrupt-" in name else "not a regular file"
            if exports:
                kind = "export" if kind == "weights" and prefix != _WORK else kind
                kind = "temporary" if prefix == _WORK and kind not in ("lock", "not a regular file") else kind
            entry = Entry(path, kind, prefix[:-1], st.st_size, max(0.0, time.time() - st.st_mtime) / 86400)
            if kind == "export" and verify:
                found = verify_file(path, export_target(path))
                entry.state = "verified" if found == [] else "corrupt: " + "; ".join(found or ["missing"])
            elif kind == "weights" and verify:
                entry.state = _state(path, known)
            elif kind == "lock" and _held(path):
                entry.state = "held"
            entries.append(entry)
    return entries, others


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def prune(directory: pathlib.Path, models: Sequence[str], days: float, exports: bool = False) -> list[Entry]:
    """Remove partial downloads, quarantined files and failure records older than ``days``,
    and locks nobody holds (untouched for as long, or a minute when ``days`` is 0); the
    entries removed. In the export cache: work folders of exports, and exports that no longer
    match the SHA-256 recorded when they were written."""
    removed = []
    entries, _ = scan(directory, (), models, verify=exports, exports=exports)
    for entry in entries:
        if entry.kind == "export":
            if entry.state.startswith("corrupt"):
                _remove(entry.path)
                _remove(entry.path.with_name(entry.path.name + ".sha256"))
                removed.append(entry)
            continue
        if entry.kind == "lock":
            if entry.state != "held" and entry.age_days * 86400 >= max(60.0, days * 86400):
                _remove(entry.path)
                removed.append(entry)
        elif entry.kind not in ("weights", "checksum", "trust record") and entry.age_days >= days:
            lock = directory / (entry.final_name + ".lock")
            if entry.kind in ("partial", "resume record") and lock.exists() and _held(lock):
                continue  # being downloaded right now
            _remove(entry.path)
            removed.append(entry)
    return removed


def clear(directory: pathlib.Path, models: Sequence[str], only: Sequence[str] = (),
          exports: bool = False) -> tuple[list[Entry], list[str]]:
    """Remove every file of this package (of the models in ``only``, if given: model names,
    ``url`` for every user URL's files, ``url-<digits>`` for one URL's): (entries removed,
    weight files skipped because a process holds their lock)."""
    entries, _ = scan(directory, (), models, verify=False, exports=exports)
    urls = tuple(f"{name}-" for name in only if name.startswith("url-"))
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        if not only or entry.model in only or entry.path.name.startswith(urls):
            groups.setdefault(entry.final_name, []).append(entry)
    removed, busy = [], []
    for final, group in groups.items():
        try:
            lock = file_lock(directory / final)
            lock.acquire(timeout=0)
        except (filelock.Timeout, OSError):
            busy.append(final)
            continue
        try:
            for entry in group:
                _remove(entry.path)
                removed.append(entry)
        finally:
            lock.release()
            pathlib.Path(lock.lock_file).unlink(missing_ok=True)
    return removed, busy
