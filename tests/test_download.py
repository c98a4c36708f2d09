"""Download, verify, cache: every fault a real server can throw, and no unverified byte kept."""
import logging
import os
import random
import time

import pytest

from models import download
from models.cache import CacheDirError, cache_dir, verify_cached
from models.download import DownloadError, DownloadOptions, OfflineError
from models.manifest import WeightFile

from faults import fault
from weights_server import checksums

# Short timeouts and waits so that every fault resolves in well under a second.
FAST = DownloadOptions(timeout=(2.0, 0.5), retries=3, backoff=0.01, max_wait=0.2, chunk_size=32 * 1024)
DATA = random.Random(0).randbytes(300_000)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def weight_file(urls, data=DATA, algos=("sha256",), size=True, model="tinynet_e"):
    sums = checksums(data)
    return WeightFile(model=model, index=0, urls=tuple(urls), format="torch",
                      checksums={a: sums[a] for a in algos}, size=len(data) if size else None)


def fetch(file, cache, **kwargs):
    kwargs.setdefault("options", FAST)
    kwargs.setdefault("mirror", "")
    return download.fetch(file, progress=False, cache=cache, offline=False, **kwargs)


def assert_cache_holds_only_verified(cache, file, expect_final=True):
    """Nothing but verified bytes under a final name; leftovers only under other names."""
    final = cache / file.cache_name
    assert final.exists() == expect_final
    if expect_final:
        assert checksums(final.read_bytes())["sha256"] == checksums(DATA)["sha256"]
    for path in cache.iterdir():
        if path != final:
            assert path.name.endswith((".lock", ".partial", ".partial.json", ".sha256", ".failures")) \
                or ".corrupt-" in path.name, path.name


# 1 ----------------------------------------------------------------------------------------
@fault("A source answers 404",
       "not retried; the next source is used, and a warning lists the sources that failed")
def test_404_on_first_source_uses_the_next(server, cache, caplog):
    file = weight_file([server.add("/gone", b""), server.add("/w.pth", DATA)])
    server.files.pop("/gone")
    path = fetch(file, cache)
    assert path.read_bytes() == DATA
    assert [h.status for h in server.hits] == [404, 200]  # a 404 is not retried
    assert "HTTP 404" in caplog.text
    assert_cache_holds_only_verified(cache, file)


def test_all_sources_404_lists_every_url(server, cache):
    file = weight_file([server.url("/a.pth"), server.url("/b.pth")])
    with pytest.raises(DownloadError) as err:
        fetch(file, cache)
    message = str(err.value)
    assert server.url("/a.pth") + ": HTTP 404" in message and server.url("/b.pth") + ": HTTP 404" in message
    assert [url for url, _ in err.value.failures] == list(file.urls)
    assert_cache_holds_only_verified(cache, file, expect_final=False)


# 2 ----------------------------------------------------------------------------------------
@fault("A server answers 429 or 5xx",
       "retried with exponential backoff, honouring `Retry-After`")
def test_500_and_503_are_retried(server, cache):
    file = weight_file([server.add("/w.pth", DATA, ("status", 500), ("status", 503), ("status", 500))])
    assert fetch(file, cache).read_bytes() == DATA
    assert [h.status for h in server.hits] == [500, 503, 500, 200]
    assert_cache_holds_only_verified(cache, file)


def test_429_retry_after_is_honoured(server, cache):
    file = weight_file([server.add("/w.pth", DATA, ("status", 429, {"Retry-After": "1"}))])
    start = time.monotonic()
    fetch(file, cache, options=DownloadOptions(timeout=(2, 2), backoff=0.01, max_wait=5))
    assert time.monotonic() - start >= 0.9  # waited as told, not the 0.01 s backoff
    assert [h.status for h in server.hits] == [429, 200]


def test_retries_are_bounded(server, cache):
    file = weight_file([server.add("/w.pth", DATA, *[("status", 503)] * 10)])
    with pytest.raises(DownloadError, match="gave up after 4 attempts; last: HTTP 503"):
        fetch(file, cache)
    assert len(server.hits) == 4
    assert_cache_holds_only_verified(cache, file, expect_final=False)


# 3, 4 -------------------------------------------------------------------------------------
@fault("The connection drops mid-body",
       "resumed with `Range` where the kept bytes end; at most one read buffer is fetched twice")
def test_dropped_connection_resumes_with_range(server, cache):
    file = weight_file([server.add("/w.pth", DATA, ("drop", 100_000), ("drop", 50_000))],
                       algos=("git_blob_sha1", "md5"))
    assert fetch(file, cache).read_bytes() == DATA
    hits = server.hits
    assert [h.status for h in hits] == [200, 206, 206]
    # Each resume starts where the bytes kept on disk end: at most one read buffer of the
    # interrupted body is lost, never the whole prefix.
    first, second = (int(h.range.split("=")[1].rstrip("-")) for h in hits[1:])
    assert 100_000 - FAST.chunk_size < first <= 100_000
    assert first + 50_000 - FAST.chunk_size < second <= first + 50_000
    assert sum(h.sent for h in hits) < len(DATA) + 2 * FAST.chunk_size
    assert_cache_holds_only_verified(cache, file)


@fault("A server ignores `Range`",
       "its whole body is taken, from byte 0")
def test_server_ignoring_range_restarts_cleanly(server, cache):
    file = weight_file([server.add("/w.pth", DATA, ("drop", 100_000), ("ignore_range",))])
    assert fetch(file, cache).read_bytes() == DATA
    assert [(h.range is None, h.status, h.sent) for h in server.hits] == [(True, 200, 100_000), (False, 200, len(DATA))]
    assert_cache_holds_only_verified(cache, file)


@fault("A process is killed mid-download",
       "the next run resumes the partial file")
def test_partial_file_left_by_a_killed_process_is_resumed(server, cache):
    file = weight_file([server.add("/w.pth", DATA, ("drop", 120_000))], size=False)
    with pytest.raises(DownloadError):
        fetch(file, cache, options=DownloadOptions(timeout=(2, 0.5), retries=0, chunk_size=FAST.chunk_size))
    assert_cache_holds_only_verified(cache, file, expect_final=False)
    kept = next(cache.glob("*.partial")).stat().st_size
    assert kept > 120_000 - FAST.chunk_size
    assert fetch(file, cache).read_bytes() == DATA  # a later run picks up the partial file
    assert server.hits[-1].range == f"bytes={kept}-"


# 5 ----------------------------------------------------------------------------------------
@fault("A source serves wrong bytes",
       "refused with the expected and actual digests; the next source is used; nothing unverified is kept")
def test_wrong_bytes_name_both_digests_and_next_source_is_used(server, cache, caplog):
    file = weight_file([server.add("/bad.pth", DATA, ("corrupt",)), server.add("/good.pth", DATA)])
    assert fetch(file, cache).read_bytes() == DATA
    wrong = checksums(bytes(b ^ 0xFF for b in DATA[:64]) + DATA[64:])["sha256"]
    assert f"sha256: expected {checksums(DATA)['sha256']}, got {wrong}" in caplog.text
    assert_cache_holds_only_verified(cache, file)


@pytest.mark.parametrize("algo", ["sha256", "git_blob_sha1", "md5"])
def test_each_recorded_digest_is_enforced(server, cache, algo):
    file = weight_file([server.add("/w.pth", DATA, ("corrupt",))], algos=(algo,))
    with pytest.raises(DownloadError, match=f"{algo}: expected {checksums(DATA)[algo]}, got "):
        fetch(file, cache, options=DownloadOptions(retries=0))
    assert_cache_holds_only_verified(cache, file, expect_final=False)
    assert not list(cache.glob("*.partial"))  # wrong bytes are not kept to resume from


# 6 ----------------------------------------------------------------------------------------
def test_body_shorter_than_content_length_is_resumed(server, cache):
    file = weight_file([server.add("/w.pth", DATA, ("drop", 10))])
    assert fetch(file, cache).read_bytes() == DATA
    assert [(h.status, h.sent) for h in server.hits] == [(200, 10), (200, len(DATA))]
    assert_cache_holds_only_verified(cache, file)


def test_body_shorter_than_recorded_size_is_refused(server, cache):
    file = weight_file([server.add("/w.pth", DATA, ("short", 1000))])
    with pytest.raises(DownloadError, match=f"announces 1000 bytes, the manifest records {len(DATA)}"):
        fetch(file, cache, options=DownloadOptions(retries=0))
    assert_cache_holds_only_verified(cache, file, expect_final=False)


def test_short_body_without_recorded_size_fails_its_checksum(server, cache):
    file = weight_file([server.add("/w.pth", DATA, ("short", 1000))], size=False)
    with pytest.raises(DownloadError, match="sha256: expected"):
        fetch(file, cache, options=DownloadOptions(retries=0))
    assert_cache_holds_only_verified(cache, file, expect_final=False)


# 7 ----------------------------------------------------------------------------------------
def test_stalled_server_times_out_and_next_source_is_used(server, cache):
    file = weight_file([server.add("/slow.pth", DATA, ("stall", 5), ("stall", 5)), server.add("/w.pth", DATA)])
    start = time.monotonic()
    path = fetch(file, cache, options=DownloadOptions(timeout=(1, 0.3), retries=1, backoff=0.01))
    assert path.read_bytes() == DATA
    assert time.monotonic() - start < 4  # two 0.3 s read timeouts, not two 5 s stalls
    assert [h.path for h in server.hits] == ["/slow.pth", "/slow.pth", "/w.pth"]


def test_partial_download_of_a_failed_source_is_removed_after_success(server, cache):
    file = weight_file([server.add("/a.pth", DATA, ("drop", 100_000), ("status", 404)), server.add("/b.pth", DATA)])
    assert fetch(file, cache, options=DownloadOptions(retries=0, chunk_size=FAST.chunk_size)).read_bytes() == DATA
    assert [h.path for h in server.hits] == ["/a.pth", "/b.pth"]
    assert not list(cache.glob("*.partial"))
    assert_cache_holds_only_verified(cache, file)


# 8 ----------------------------------------------------------------------------------------
def test_redirect_chain_is_followed(server, cache):
    server.add("/final.pth", DATA)
    server.add("/hop2", b"", ("redirect", "/final.pth"))
    file = weight_file([server.add("/hop1", b"", ("redirect", "/hop2"))])
    assert fetch(file, cache).read_bytes() == DATA
    assert [(h.path, h.status) for h in server.hits] == [("/hop1", 302), ("/hop2", 302), ("/final.pth", 200)]


# 9 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip", "truncate"])
@fault("A cached file is damaged",
       "set aside as `*.corrupt-*` (not deleted), downloaded again, with a warning")
def test_tampered_cache_is_set_aside_and_downloaded_again(server, cache, caplog, damage):
    file = weight_file([server.add("/w.pth", DATA)])
    final = fetch(file, cache)
    if damage == "flip":
        final.write_bytes(DATA[:-1] + bytes([DATA[-1] ^ 1]))
    else:
        final.write_bytes(DATA[:1000])
    with caplog.at_level(logging.WARNING):
        assert fetch(file, cache).read_bytes() == DATA
    assert "failed verification" in caplog.text and "downloaded again" in caplog.text
    assert len(server.hits) == 2
    aside = list(cache.glob("*.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() != DATA
    assert_cache_holds_only_verified(cache, file)


def test_verified_cache_hit_makes_no_request(server, cache):
    file = weight_file([server.add("/w.pth", DATA)])
    fetch(file, cache)
    fetch(file, cache)
    assert len(server.hits) == 1
    assert verify_cached(file, cache) == ("ok", str(cache / file.cache_name))


# 11 ---------------------------------------------------------------------------------------
def test_unwritable_cache_names_directory_and_fix(server, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("TORCH_HOME", str(blocker))
    file = weight_file([server.add("/w.pth", DATA)])
    with pytest.raises(CacheDirError) as err:
        download.fetch(file, progress=False, offline=False, mirror="")
    assert str(blocker / "hub" / "checkpoints") in str(err.value) and "TORCH_HOME" in str(err.value)
    assert server.hits == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop privileges")
def test_read_only_cache_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become an ordinary user, whom a read-only mode bit binds (root it doesn't)
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            cache_dir(ro)
            message = "no error"
        except CacheDirError as exc:
            message = str(exc)
        except BaseException as exc:  # report anything else to the parent
            message = repr(exc)
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    assert f"the weights cache directory {ro} is not writable" in message and "Permission denied" in message


# 13 ---------------------------------------------------------------------------------------
@fault("`GHOSTNET_HUB_OFFLINE=1` and the file is not cached",
       "no request; the error names the file, its URLs and the `prefetch` command")
def test_offline_without_cache_names_file_urls_and_prefetch_command(server, cache):
    file = weight_file([server.add("/w.pth", DATA)])
    with pytest.raises(OfflineError) as err:
        download.fetch(file, progress=False, cache=cache, offline=True)
    message = str(err.value)
    assert file.cache_name in message and server.url("/w.pth") in message
    assert "python -m models prefetch tinynet_e" in message and "GHOSTNET_HUB_OFFLINE" in message
    assert server.hits == []


def test_offline_with_cache_uses_it_without_network(server, cache, monkeypatch):
    file = weight_file([server.add("/w.pth", DATA)])
    fetch(file, cache)
    monkeypatch.setenv("GHOSTNET_HUB_OFFLINE", "1")
    assert download.fetch(file, progress=False, cache=cache).read_bytes() == DATA
    assert len(server.hits) == 1


def test_mirror_from_environment_is_tried_first(server, cache, monkeypatch):
    file = weight_file(["https://upstream.invalid/w.pth"])
    server.add(f"/mirror/{file.cache_name}", DATA)
    monkeypatch.setenv("GHOSTNET_HUB_MIRROR", server.url("/mirror/"))
    path = download.fetch(file, progress=False, cache=cache, offline=False, options=FAST)
    assert path.read_bytes() == DATA
    assert [h.path for h in server.hits] == [f"/mirror/{file.cache_name}"]


def test_mirror_with_wrong_bytes_falls_back_to_upstream(server, cache):
    file = weight_file([server.add("/w.pth", DATA)])
    server.add(f"/mirror/{file.cache_name}", DATA, ("corrupt",))
    path = fetch(file, cache, mirror=server.url("/mirror"))
    assert path.read_bytes() == DATA
    assert [h.path for h in server.hits] == [f"/mirror/{file.cache_name}", "/w.pth"]


def test_bad_mirror_value_is_an_error(cache):
    with pytest.raises(ValueError, match="must be an http"):
        download.fetch(weight_file(["https://x.invalid/w"]), cache=cache, mirror="ftp://mirror")


# user URLs ----------------------------------------------------------------------------------
def test_user_url_with_sha256(server, cache):
    url = server.add("/mine.pth", DATA)
    path = download.fetch_url(url, sha256=checksums(DATA)["sha256"].upper(), progress=False, cache=cache, offline=False)
    assert path.read_bytes() == DATA
    with pytest.raises(DownloadError, match="sha256: expected 0000"):
        download.fetch_url(server.add("/other.pth", DATA), sha256="0" * 64, progress=False, cache=cache,
                           offline=False, options=FAST)


def test_user_url_without_sha256_is_still_checked_against_what_was_downloaded(server, cache, caplog):
    url = server.add("/mine.pth", DATA)
    path = download.fetch_url(url, progress=False, cache=cache, offline=False)
    sidecar = path.with_name(path.name + ".sha256").read_text().splitlines()  # the SHA-256, then the validators
    assert sidecar[0] == checksums(DATA)["sha256"] and '"etag"' in sidecar[1]
    path.write_bytes(DATA[:5])
    assert download.fetch_url(url, progress=False, cache=cache, offline=False).read_bytes() == DATA
    assert "failed verification" in caplog.text and len(server.hits) == 2


def test_progress_bar_goes_to_stderr_and_can_be_turned_off(server, cache, capfd):
    file = weight_file([server.add("/w.pth", DATA)])
    download.fetch(file, progress=True, cache=cache, offline=False, mirror="", options=FAST)
    err = capfd.readouterr().err
    assert file.cache_name in err and "B/s" in err
    (cache / file.cache_name).unlink()
    download.fetch(file, progress=False, cache=cache, offline=False, mirror="", options=FAST)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("env, text", [("GHOSTNET_HUB_DEADLINE", "nan"), ("GHOSTNET_HUB_DEADLINE", "inf"),
                                       ("GHOSTNET_HUB_DEADLINE", "-1"), ("GHOSTNET_HUB_MAX_BYTES", "0")])
def test_limits_that_are_not_positive_finite_numbers_are_refused(monkeypatch, env, text):
    """A NaN deadline passed the old "<= 0" check and then turned the deadline off."""
    monkeypatch.setenv(env, text)
    with pytest.raises(ValueError, match=rf"{env} \(or the option\) must be a positive finite number, got"):
        DownloadOptions().limits()


@pytest.mark.parametrize("option", [{"deadline": float("nan")}, {"max_bytes": True}])
def test_limit_options_that_are_not_positive_finite_numbers_are_refused(option):
    with pytest.raises(ValueError, match="must be a positive finite number"):
        DownloadOptions(**option).limits()
