"""The weights path under the faults real users meet, against the loopback server
(tests/weights_server.py): no network, dead hosts, files that change, encoded and endless
bodies, full and read-only disks (real tmpfs mounts), odd things in the cache. Each test is
a row of docs/weights.md's "What happens when…" table (tests/faults.py), checked at the end."""
import random
import re
import socket

import pytest
import requests

from models import download, weights
from models.download import DownloadError, DownloadOptions

from faults import fault, table
from helpers import cli, doc
from mounts import tmpfs
from reference import checkpoint_bytes
from weights_server import DATA, FAST, ONCE, fetch, weight_entry, weight_file, write_manifest

NEW = random.Random(2).randbytes(300_000)
GHOSTNET_SOURCES = 4  # ghostnet_1x's URLs in the shipped manifest


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def sent(monkeypatch):
    """Every HTTP request the process sends (redirects included), by URL."""
    urls = []
    original = requests.Session.send

    def send(self, request, **kwargs):
        urls.append(request.url)
        return original(self, request, **kwargs)

    monkeypatch.setattr(requests.Session, "send", send)
    return urls


def _no_dns(monkeypatch, code, message):
    original = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise socket.gaierror(code, message)
        return original(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def no_network(monkeypatch):
    """No route anywhere but loopback, as on an air-gapped node: every lookup fails."""
    _no_dns(monkeypatch, socket.EAI_AGAIN, "Temporary failure in name resolution")


@pytest.fixture
def no_dns(monkeypatch):
    """Names other than loopback do not exist (nothing leaves this machine)."""
    _no_dns(monkeypatch, socket.EAI_NONAME, "Name or service not known")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# D5: no network, and errors that cannot pass ---------------------------------------------------
@fault("No network at all (air-gapped node, ghostnet_1x's 4 real sources)",
       "each source tried at most once, no retries: the error comes at once, one line per source with its cause "
       "(`github.com: name does not resolve`), nothing printed twice, one closing hint (offline mode, prefetch, "
       "mirror, `checkpoint=`)")
def test_no_network_fails_at_once_with_one_line_per_source(no_network, sent, caplog):
    with pytest.raises(DownloadError) as err:
        weights.pretrained_state_dict("ghostnet_1x", progress=False)
    lines = str(err.value).splitlines()
    sources = [line for line in lines if line.startswith("  - ")]
    assert len(lines) <= 15 and len(sources) == GHOSTNET_SOURCES, lines
    assert all("name does not resolve" in line for line in sources), sources
    assert len(set(lines)) == len(lines)
    hint = lines[-1]
    assert hint.startswith("hint: ") and all(
        s in hint for s in ("GHOSTNET_HUB_OFFLINE=1", "prefetch ghostnet_1x", "GHOSTNET_HUB_MIRROR", "checkpoint="))
    assert len(sent) <= GHOSTNET_SOURCES  # one attempt per source at most: no retries, no backoff
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]  # said once, in the error
    result = cli("prefetch", "ghostnet_1x", "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) <= 15 and len(set(result.stderr.splitlines())) == len(
        result.stderr.splitlines())


@pytest.mark.parametrize("kind", ["refused", "dns", "tls", "scheme", "loop"])
@fault("A name that does not resolve, a refused connection, a TLS error, a redirect to `file://`, a redirect loop",
       "one attempt (no retries, no backoff), then the next source; the cause in a few words")
def test_errors_that_cannot_pass_get_one_attempt(server, cache, sent, no_dns, kind):
    if kind == "refused":
        url, expected = f"http://127.0.0.1:{closed_port()}/w.pth", "connection refused"
    elif kind == "dns":
        url, expected = "https://weights.invalid/w.pth", "weights.invalid: name does not resolve"
    elif kind == "tls":  # an https URL at a server that speaks plain HTTP
        url, expected = server.add("/w.pth", DATA).replace("http://", "https://"), "TLS error"
    elif kind == "scheme":
        url, expected = server.add("/to-file", b"", *[("redirect", "file:///etc/passwd")] * 10), "unsupported"
    else:
        url, expected = server.add("/loop", b"", *[("redirect", "/loop")] * 500), "redirect loop"
    with pytest.raises(DownloadError) as err:
        fetch(weight_file([url]), cache)
    assert expected in str(err.value)
    if kind == "loop":
        assert len(sent) <= 11  # one attempt, cut after 10 hops
    else:
        assert [u for u in sent if u == url] == [url]


@fault("A server stalls, again and again",
       "read timeouts are retried, but never past a deadline per file (`GHOSTNET_HUB_DEADLINE`, default 900 s), "
       "which the error names")
def test_deadline_bounds_the_time_spent_on_a_file(server, cache, monkeypatch):
    monkeypatch.setenv("GHOSTNET_HUB_DEADLINE", "1.5")
    file = weight_file([server.add("/w.pth", DATA, *[("stall", 2)] * 20)])
    options = DownloadOptions(timeout=(1.0, 0.4), retries=50, backoff=0.05, max_wait=0.1)
    with pytest.raises(DownloadError, match=r"1\.5 s deadline for this file was reached \(set GHOSTNET_HUB_DEADLINE"):
        fetch(file, cache, options=options)
    assert len(server.hits) <= 5


@fault("The mirror (`GHOSTNET_HUB_MIRROR`) refuses connections",
       "one attempt, then upstream, which serves the file")
def test_mirror_that_refuses_connections_costs_one_attempt(server, cache, sent, caplog):
    mirror = f"http://127.0.0.1:{closed_port()}/mirror"
    file = weight_file([server.add("/w.pth", DATA)])
    assert fetch(file, cache, mirror=mirror).read_bytes() == DATA
    assert len([u for u in sent if u.startswith(mirror)]) == 1
    assert "connection refused" in caplog.text


@fault("The mirror URL carries a query string (`https://host/dir/?token=...`)",
       "file names are joined to the path; the query is kept")
def test_mirror_url_with_a_query_string(server, cache, no_dns):
    file = weight_file(["https://upstream.invalid/w.pth"])
    server.add(f"/mirror/{file.cache_name}", DATA)
    assert fetch(file, cache, mirror=server.url("/mirror/?token=abc")).read_bytes() == DATA
    assert [(h.path, h.query) for h in server.hits] == [(f"/mirror/{file.cache_name}", "token=abc")]


@fault("`HF_HUB_OFFLINE=1` is set", "Hugging Face URLs are not tried (the error says so); other sources are")
def test_hf_hub_offline_is_honoured(server, cache, sent, no_dns, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = "https://huggingface.co/timm/ghostnet_100.in1k/resolve/main/model.safetensors"
    assert fetch(weight_file([hf, server.add("/w.pth", DATA)]), cache).read_bytes() == DATA
    with pytest.raises(DownloadError, match=r"huggingface.co/.*: not tried \(HF_HUB_OFFLINE=1\)"):
        fetch(weight_file([hf], data=NEW), cache)
    assert not [u for u in sent if "huggingface.co" in u]


# D1: a resume must continue the same file ----------------------------------------------------
@fault("A download without a recorded checksum is cut off, and the file at the URL changes before the rerun",
       "the resume sends `If-Range` with the ETag/Last-Modified recorded beside the partial; the server sends the "
       "new file whole; nothing is spliced")
def test_changed_file_is_downloaded_whole_not_spliced(server, cache):
    url = server.add("/mine.pth", DATA, ("drop", 150_000))
    with pytest.raises(DownloadError):
        download.fetch_url(url, progress=False, cache=cache, offline=False, options=ONCE)
    server.replace("/mine.pth", NEW)
    assert download.fetch_url(url, progress=False, cache=cache, offline=False, options=FAST).read_bytes() == NEW
    last = server.hits[-1]
    assert "If-Range" in last.headers and last.status == 200


@fault("The same, from a server that sends no ETag or Last-Modified",
       "nothing proves it is the same file: the download starts again from byte 0")
def test_resume_without_validator_or_checksum_starts_over(server, cache):
    url = server.add("/mine.pth", DATA, ("drop", 150_000), validators=())
    with pytest.raises(DownloadError):
        download.fetch_url(url, progress=False, cache=cache, offline=False, options=ONCE)
    server.replace("/mine.pth", NEW)
    assert download.fetch_url(url, progress=False, cache=cache, offline=False, options=FAST).read_bytes() == NEW
    assert server.hits[-1].range is None


def test_unchanged_file_resumes_with_if_range(server, cache):
    url = server.add("/mine.pth", DATA, ("drop", 150_000))
    with pytest.raises(DownloadError):
        download.fetch_url(url, progress=False, cache=cache, offline=False, options=ONCE)
    assert download.fetch_url(url, progress=False, cache=cache, offline=False, options=FAST).read_bytes() == DATA
    last = server.hits[-1]
    assert last.status == 206 and last.headers.get("If-Range") == server.files["/mine.pth"].etag
    assert sum(h.sent for h in server.hits) < len(DATA) + 2 * FAST.chunk_size


def test_checksummed_file_resumes_without_validators(server, cache):
    file = weight_file([server.add("/w.pth", DATA, ("drop", 150_000), validators=())])
    assert fetch(file, cache).read_bytes() == DATA
    assert [h.status for h in server.hits] == [200, 206]  # the checksum catches a splice


# D2: caps and full disks ---------------------------------------------------------------------
@fault("A body never ends (no size recorded, or a user URL)",
       "writing stops at the cap (`GHOSTNET_HUB_MAX_BYTES`, default 1 GiB; the recorded size when known), the "
       "partial is removed, the next source is tried")
def test_endless_body_stops_at_the_cap(server, cache, monkeypatch, caplog):
    cap = 1 << 20
    monkeypatch.setenv("GHOSTNET_HUB_MAX_BYTES", str(cap))
    file = weight_file([server.add("/endless", b"", ("endless",)), server.add("/w.pth", DATA)], size=False)
    assert fetch(file, cache).read_bytes() == DATA
    written = int(re.search(r"stopped after writing ([\d,]+)", caplog.text)[1].replace(",", ""))
    assert written <= cap and "goes past 1,048,576 bytes" in caplog.text
    assert not list(cache.glob("*.partial"))


@fault("A server announces `Content-Length: 10^12`", "refused before a byte is read: more than the cap")
def test_huge_announced_length_is_refused_before_reading(server, cache):
    url = server.add("/huge.pth", DATA, ("length", 10**12))
    with pytest.raises(DownloadError, match=r"announces 1,000,000,000,000 bytes, more than the 1,073,741,824-byte"):
        download.fetch_url(url, progress=False, cache=cache, offline=False, options=FAST)
    assert len(server.hits) == 1 and not list(cache.glob("*.partial"))


@fault("The first source never ends and the disk is smaller than the cap (a real 8 MiB tmpfs, no size recorded)",
       "a body of unannounced size may not outgrow the free space: the source is refused when it does (the source's "
       "fault, not the disk's), its partial removed, and the next source is used; only a real `ENOSPC` ends the "
       "chain (`test_disk_faults.py`)")
def test_endless_source_on_a_small_disk_is_the_sources_fault(server, tmp_path, caplog):
    with tmpfs(tmp_path / "disk", "8m") as disk:
        cache = disk / "cache"
        file = weight_file([server.add("/endless", b"", ("endless",)), server.add("/w.pth", DATA)], size=False)
        assert fetch(file, cache).read_bytes() == DATA
        assert re.search(r"sent more than the [\d,]+ bytes free in .*cache without announcing its size", caplog.text)
        assert len(server.hits_for("/w.pth")) == 1 and not list(cache.glob("*.partial*"))
        caplog.clear()
        other = weight_file([server.add("/endless2", b"", ("endless",))], size=False, model="tinynet_d")
        with pytest.raises(DownloadError) as err:  # no second source: a short error that says what happened
            fetch(other, cache)
        assert not isinstance(err.value, download.CacheWriteError) and "bytes free in" in str(err.value)
        assert not list(cache.glob("*.partial*"))


@fault("A file of known size is larger than the free space", "refused before any request, with both numbers")
def test_known_size_larger_than_free_space_is_refused_before_any_request(server, tmp_path):
    big = random.Random(3).randbytes(2_000_000)
    with tmpfs(tmp_path / "disk", "1m") as disk:
        with pytest.raises(DownloadError, match=r"needs 2,000,000 bytes and [\d,]+ bytes are free"):
            fetch(weight_file([server.add("/big.pth", big)], data=big), disk / "cache")
    assert server.hits == []


@fault("`ghostnet-hub prefetch` on a full disk", "exit status 1 and the message, no traceback; the other "
       "models are not attempted")
def test_prefetch_on_a_full_disk_prints_no_traceback(server, tmp_path):
    e, d = checkpoint_bytes("tinynet_e"), checkpoint_bytes("tinynet_d")
    manifest = write_manifest(tmp_path / "m.json", {"tinynet_e": [weight_entry(server.add("/e.pth", e), e)],
                                                    "tinynet_d": [weight_entry(server.add("/d.pth", d), d)]})
    with tmpfs(tmp_path / "disk", "1m") as disk:
        result = cli("prefetch", "--all", "--manifest", manifest, "--quiet", env={"TORCH_HOME": str(disk)})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot write" in result.stderr and "bytes are free" in result.stderr and str(disk) in result.stderr
    assert server.hits_for("/d.pth") == []


# D3: Content-Encoding --------------------------------------------------------------------------
@fault("A server gzips the body although `Accept-Encoding: identity` was sent",
       "the decoded bytes are sized and verified (the compressed length is not compared); the file is used")
def test_gzip_encoded_body_is_verified_decoded(server, cache):
    file = weight_file([server.add("/w.pth", DATA, ("gzip",))])
    assert fetch(file, cache).read_bytes() == DATA
    assert len(server.hits) == 1 and server.hits[0].headers.get("Accept-Encoding") == "identity"


@fault("An encoded body is cut off", "an encoded stream is never resumed: the retry starts from byte 0")
def test_gzip_body_cut_short_starts_over(server, cache):
    file = weight_file([server.add("/w.pth", DATA, ("gzip_drop", 100_000), ("gzip",))])
    assert fetch(file, cache).read_bytes() == DATA
    assert [h.range for h in server.hits] == [None, None]


# the table ---------------------------------------------------------------------------------------
def test_readme_what_happens_table_is_the_fault_catalogue():
    page = doc("weights")
    block = re.search(r"<!-- faults:begin -->\n(.*?)\n<!-- faults:end -->", page, re.S)
    assert block, "docs/weights.md has no <!-- faults:begin --> ... <!-- faults:end --> table"
    assert block[1] == table(), "docs/weights.md's fault table is stale: paste the output of `python tests/faults.py`"
