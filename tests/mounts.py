"""Real small filesystems for disk faults: a tmpfs of a given size (full disks), remounted
read-only (Docker image layers). Mounting needs root; where it fails the test is skipped
with the reason printed, and the same path is also covered another way (RLIMIT_FSIZE, a
read-only directory for an unprivileged user)."""
from __future__ import annotations

import contextlib
import pathlib
import shutil
import subprocess

import pytest


def _mount(*args: str) -> str | None:
    """None if the mount command worked, else why not."""
    if shutil.which("mount") is None:
        return "no mount command"
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    return None if result.returncode == 0 else (result.stderr or result.stdout).strip() or f"exit {result.returncode}"


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, size: str = "8m"):
    """A fresh tmpfs of ``size`` at ``path`` for the duration; skips the test if impossible."""
    path.mkdir(parents=True, exist_ok=True)
    failure = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    if failure:
        reason = f"cannot mount a {size} tmpfs at {path} ({failure}); this test needs root"
        print(reason)
        pytest.skip(reason)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_read_only(path: pathlib.Path) -> None:
    failure = _mount("-o", "remount,ro", str(path))
    if failure:
        raise RuntimeError(f"cannot remount {path} read-only: {failure}")


def remount_writable(path: pathlib.Path) -> None:
    failure = _mount("-o", "remount,rw", str(path))
    if failure:
        raise RuntimeError(f"cannot remount {path} writable: {failure}")
