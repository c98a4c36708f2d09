"""The work folder of an export: beside ``--out`` (so the finished file is renamed into place,
never copied), held by a lock, and removed by the next export when a killed one left it."""
from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import shutil

import filelock

_WORK = ".export-"  # work folders, beside --out so that the finished file is renamed into place, never copied


def _lock_free(lock: pathlib.Path) -> bool:
    """Whether nobody holds ``lock`` (its export died, or finished)."""
    try:
        with filelock.FileLock(str(lock)).acquire(timeout=0):
            return True
    except (filelock.Timeout, OSError):
        return False


@contextlib.contextmanager
def work_folder(parent: pathlib.Path):
    """A work folder beside ``--out``, held by a lock taken before it exists and released after
    it is gone. Folders that a killed export left here (their lock free) are removed first;
    one whose export still runs is left alone."""
    for lock in parent.glob(f"{_WORK}*.lock"):
        folder = lock.with_suffix("")
        if _lock_free(lock):
            shutil.rmtree(folder, ignore_errors=True)
            lock.unlink(missing_ok=True)
    for folder in parent.glob(f"{_WORK}*"):  # (its lock file gone too: nothing can hold it)
        if folder.is_dir() and not folder.with_name(folder.name + ".lock").exists():
            shutil.rmtree(folder, ignore_errors=True)
    name = f"{_WORK}{os.getpid()}-{secrets.token_hex(4)}"
    lock = filelock.FileLock(str(parent / f"{name}.lock"))
    try:
        with lock:
            folder = parent / name
            folder.mkdir()
            try:
                yield folder
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        pathlib.Path(lock.lock_file).unlink(missing_ok=True)
