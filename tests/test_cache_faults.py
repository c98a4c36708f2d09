"""The weights cache under faults: a read-only cache (a Docker layer; real tmpfs mounts), names that
would leave the cache, odd things (directories, FIFOs, symlinks) at a cache file's, lock's or
partial's name, long or unportable names, stale partial downloads. Rows of docs/weights.md's
"What happens when…" table (tests/faults.py), after test_faults.py's."""
import hashlib
import os
import pathlib
import random
import re
import shutil

import pytest

from models import download
from models.cache import CacheDirError, verify_cached
from models.download import DownloadError, OfflineError

from faults import fault
from mounts import remount_read_only, tmpfs
from weights_server import DATA, ONCE, fetch, weight_file, within

NEW = random.Random(2).randbytes(300_000)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"



@fault("The cache is on a read-only filesystem (a Docker layer; a real tmpfs remounted read-only)",
       "verified files load offline and online with no lock and no write; a missing file offline is an "
       "`OfflineError`; `verify` reports without setting anything aside")
def test_read_only_cache_serves_verified_files(server, tmp_path):
    file = weight_file([server.add("/w.pth", DATA)])
    other = weight_file([server.add("/n.pth", NEW)], data=NEW, model="tinynet_d")
    with tmpfs(tmp_path / "ro", "8m") as mount:
        cache = mount / "cache"
        fetch(file, cache)
        (cache / other.cache_name).write_bytes(NEW[:-1] + b"!")  # damaged, to be reported
        remount_read_only(mount)
        assert fetch(file, cache, offline=True).read_bytes() == DATA
        assert fetch(file, cache, offline=False).read_bytes() == DATA
        assert verify_cached(file, cache)[0] == "ok" and verify_cached(other, cache)[0] == "corrupt"
        assert (cache / other.cache_name).exists()
        with pytest.raises(OfflineError, match="python -m models prefetch"):
            fetch(weight_file([server.url("/x")], data=b"x"), cache, offline=True)
        with pytest.raises(CacheDirError, match="not writable"):
            fetch(weight_file([server.url("/x")], data=b"x"), cache)
        with pytest.raises(CacheDirError, match="failed verification .* cannot be replaced"):
            fetch(other, cache)
    assert len(server.hits) == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop privileges")
def test_read_only_cache_for_an_ordinary_user(server, tmp_path):
    import tempfile

    cache = pathlib.Path(tempfile.mkdtemp(prefix="ro-cache-"))  # /tmp: other users may look inside
    file = weight_file([server.add("/w.pth", DATA)])
    fetch(file, cache)
    cache.chmod(0o555)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: an ordinary user, whom the mode bits bind (root they don't)
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            paths = {fetch(file, cache, offline=offline).read_bytes() == DATA for offline in (True, False)}
            message = "ok" if paths == {True} else "wrong bytes"
        except BaseException as exc:  # report anything to the parent
            message = repr(exc)
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    cache.chmod(0o755)
    shutil.rmtree(cache)
    with os.fdopen(read_end) as pipe:
        assert pipe.read() == "ok"
    assert len(server.hits) == 1


@fault("A manifest is bypassed and a model name holds `../`", "the cache path is refused; nothing is written outside")
def test_cache_paths_cannot_leave_the_cache(server, tmp_path):
    cache = tmp_path / "a" / "b" / "cache"
    cache.mkdir(parents=True)
    file = weight_file([server.add("/w.pth", DATA)], model="../../../escaped")
    with pytest.raises(ValueError, match="not a plain, portable file name"):
        fetch(file, cache)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "cache"]


@pytest.mark.parametrize("odd", ["directory", "fifo", "link-to-directory", "link-to-fifo", "dangling-link"])
@fault("A directory, a FIFO or a symlink (to either, or to nothing) sits at a cache file's name",
       "set aside as `*.corrupt-*` with a warning and downloaded again; never a hang, never a raw OS error")
def test_odd_things_at_a_cache_name_are_set_aside(server, cache, odd, caplog):
    file = weight_file([server.add("/w.pth", DATA)])
    cache.mkdir()
    final, elsewhere = cache / file.cache_name, cache.parent / "elsewhere"
    if odd == "directory":
        final.mkdir()
    elif odd == "fifo":
        os.mkfifo(final)
    elif odd == "dangling-link":
        final.symlink_to(elsewhere)
    else:
        elsewhere.mkdir() if odd == "link-to-directory" else os.mkfifo(elsewhere)
        final.symlink_to(elsewhere)
    assert within(30, fetch, file, cache).read_bytes() == DATA
    assert list(cache.glob(f"{file.cache_name}.corrupt-*")) and "failed verification" in caplog.text


def test_odd_things_at_lock_and_partial_names_do_not_hang(server, cache):
    file = weight_file([server.add("/w.pth", DATA)])
    cache.mkdir()
    (cache / (file.cache_name + ".lock")).mkdir()
    os.mkfifo(cache / f"{file.cache_name}.{hashlib.sha256(server.url('/w.pth').encode()).hexdigest()[:8]}"
                       ".partial")
    assert within(30, fetch, file, cache).read_bytes() == DATA


@fault("A user URL's file name is very long, or holds characters Windows forbids (`:`)",
       "cache names are bounded (URL hashed, name cut to 64 characters) and portable")
def test_user_url_names_are_short_and_portable(server, cache):
    name = "run%3A7%20" + "x" * 300 + ".pth"
    url = server.add(f"/{name}", DATA)
    assert download.fetch_url(url, progress=False, cache=cache, offline=False).read_bytes() == DATA
    for path in cache.iterdir():
        assert len(path.name) <= 120 and not re.search(r'[<>:"\\|?* ]', path.name), path.name


@fault("A leftover `.partial` holds bytes that do not verify",
       "discarded, and the file downloaded again from byte 0 in the same call")
def test_stale_partial_is_discarded_within_the_same_call(server, cache):
    file = weight_file([server.add("/w.pth", DATA, ("drop", 150_000))])
    with pytest.raises(DownloadError):
        fetch(file, cache, options=ONCE)
    (partial,) = cache.glob("*.partial")
    partial.write_bytes(b"\0" * 1000 + partial.read_bytes()[1000:])  # bytes no server sent
    assert fetch(file, cache).read_bytes() == DATA
    assert [h.range is None for h in server.hits] == [True, False, True]
