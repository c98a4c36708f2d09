"""Plain files on disk, read and written the way the weights cache does it, for every part of
the package that touches one (the cache, the manifest, checkpoints, exports, images).

Reading: only a regular file is opened, without blocking (a FIFO would wait for a writer
forever, ``/dev/zero`` never ends), and a read is bounded. Writing: the free space is checked
first; the bytes go to a partial file beside the target, which is renamed into place only when
complete and removed when anything fails; the failure is one ``WriteError`` naming the folder,
the bytes needed and the bytes free."""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import stat
import tempfile

__all__ = ["WriteError", "check_room", "free_bytes", "no_room", "open_regular", "probe_writable", "read_regular",
           "write_file"]


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """An fd on ``path`` and its stat, refusing anything but a regular file. Opening never
    blocks (a FIFO would wait for a writer forever), so no odd file hangs its reader."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise IsADirectoryError(f"{path} is {_kind(st.st_mode)}, not a regular file")
    return fd, st


def read_regular(path: str | os.PathLike, limit: int, what: str = "the file") -> bytes:
    """The bytes of the regular file ``path``; one larger than ``limit`` is refused unread."""
    fd, st = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        if st.st_size > limit:
            raise OSError(f"{path}: {what} is {st.st_size:,} bytes, larger than {_mib(limit)}; refused unread")
        data = f.read(limit + 1)
    if len(data) > limit:  # (it grew while being read)
        raise OSError(f"{path}: {what} is larger than {_mib(limit)}; refused")
    return data


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n:,} bytes"


def free_bytes(directory: str | os.PathLike) -> int | None:
    """Bytes free for writing in ``directory`` (or its nearest existing parent, for a folder
    not made yet); None if the system cannot say."""
    path = pathlib.Path(directory).absolute()
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            if folder.is_dir():
                return shutil.disk_usage(folder).free
    return None


def _size(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,}"


def no_room(name: str, directory: str | os.PathLike, needed: int | None, free: int | None,
            error: OSError | None = None, at_least: bool = False) -> str:
    """The one sentence every write failure starts with: what, where, the cause, the bytes."""
    cause = f" ({getattr(error, 'strerror', None) or error})" if error else ""
    return (f"cannot write {name} into {directory}{cause}: it needs {'at least ' if at_least else ''}"
            f"{_size(needed)} bytes and {_size(free)} bytes are free there")


class WriteError(OSError):
    """A file could not be written (full disk, file size limit, read-only folder); nothing was
    left behind. ``directory``, ``needed``, ``free`` and ``error`` say why; the message ends
    with ``hint``, what to do about it."""

    def __init__(self, directory: str | os.PathLike, name: str, needed: int | None, error: OSError | None = None,
                 hint: str = "", *, at_least: bool = False, message: str | None = None):
        self.directory, self.needed, self.error = pathlib.Path(directory), needed, error
        self.free = free_bytes(directory)
        message = message or no_room(name, directory, needed, self.free, error, at_least)
        super().__init__(message + (f". {hint}" if hint else ""))


def check_room(path: str | os.PathLike, needed: int, hint: str = "", *, at_least: bool = False,
               name: str | None = None) -> None:
    """Refuse, before writing, ``needed`` bytes that the folder of ``path`` cannot take."""
    path = pathlib.Path(path)
    free = free_bytes(path.parent)
    if free is not None and needed > free:
        raise WriteError(path.parent, name or path.name, needed, hint=hint, at_least=at_least)


def probe_writable(directory: str | os.PathLike, hint: str = "") -> None:
    """Refuse a folder this process cannot write into (or, when it does not exist yet, whose
    nearest existing parent it cannot), by writing: ``os.access`` says yes to root even on a
    read-only mount. Nothing is left behind."""
    path = pathlib.Path(directory).absolute()
    folder = next((p for p in (path, *path.parents) if p.is_dir()), path)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise WriteError(path, "", None, exc, hint,
                         message=f"cannot write into {directory} ({exc.strerror or exc})") from None


def write_file(path: str | os.PathLike, data: bytes | memoryview, hint: str = "") -> None:
    """``data`` as the file ``path``: free space checked first, written beside as
    ``<name>.partial`` (synced, so a full disk shows now and not at write-back), renamed into
    place; on any failure the partial is removed and the previous file stays whole."""
    path = pathlib.Path(path)
    partial = path.with_name(path.name + ".partial")
    check_room(path, len(data), hint)
    try:
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise WriteError(path.parent, path.name, len(data), exc, hint) from None
