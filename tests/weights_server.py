"""A real HTTP server on 127.0.0.1 that serves weight files and misbehaves on request.

Each path has the bytes to serve and a script: one behaviour per request, in order, then
plain service. Every request is logged (its headers, status, bytes sent) so tests can check
what the client really did. Files carry an ETag and a Last-Modified date, and a Range
request with an If-Range that names neither gets the whole new file (RFC 9110), as real
servers do.
"""
from __future__ import annotations

import email.utils
import gzip
import hashlib
import http.server
import random
import socket
import threading
import time
from dataclasses import dataclass, field

from models import download
from models.download import DownloadOptions
from models.manifest import WeightFile


@dataclass
class Hit:
    path: str
    range: str | None
    status: int = 0
    sent: int = 0
    headers: dict = field(default_factory=dict)
    query: str = ""


@dataclass
class _File:
    data: bytes
    script: list = field(default_factory=list)
    validators: tuple = ("etag", "last_modified")
    modified: float = field(default_factory=lambda: time.time() - 3600)

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.data).hexdigest()[:16] + '"'

    @property
    def last_modified(self) -> str:
        return email.utils.formatdate(self.modified, usegmt=True)


def checksums(data: bytes) -> dict[str, str]:
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "git_blob_sha1": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
        "md5": hashlib.md5(data).hexdigest(),
    }


class WeightsServer:
    """Behaviours (tuples):
    ("ok",)                    serve, honouring Range and If-Range, and If-None-Match/If-Modified-Since (304)
    ("status", code[, headers]) answer with that status and no body
    ("redirect", location)     302 to another path on this server (or any Location)
    ("drop", n)                announce the full body, send n bytes, cut the connection
    ("ignore_range",)          answer 200 with the whole file even to a Range request
    ("corrupt",)               the right length, wrong bytes
    ("short", n)               announce and send only the first n bytes
    ("stall", seconds)         say nothing for that long, then hang up
    ("slow", seconds)          serve normally, spread over that many seconds
    ("gzip",)                  gzip the body and say so, whatever the client accepts
    ("gzip_drop", n)           the same, cut after n bytes of the encoded body
    ("endless",)               200 without a length, random bytes until the client hangs up
    ("length", n)              announce Content-Length n, then send the file and hang up
    """

    def __init__(self):
        self.files: dict[str, _File] = {}
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server._handle(self)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # -- set-up -----------------------------------------------------------------------
    def add(self, path: str, data: bytes, *script: tuple, validators=("etag", "last_modified")) -> str:
        self.files[path] = _File(data, list(script), tuple(validators))
        return self.url(path)

    def replace(self, path: str, data: bytes) -> None:
        """The file at ``path`` changes: new bytes, new ETag, a later Last-Modified."""
        entry = self.files[path]
        entry.data = data
        entry.modified += 86400

    def url(self, path: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def hits_for(self, path: str) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.path == path]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- serving ----------------------------------------------------------------------
    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        path, _, query = handler.path.partition("?")
        hit = Hit(path, handler.headers.get("Range"), headers=dict(handler.headers.items()), query=query)
        with self._lock:
            self.hits.append(hit)
            entry = self.files.get(path)
            behaviour = entry.script.pop(0) if entry and entry.script else ("ok",)
        if entry is None:
            return self._status(handler, hit, 404)
        kind, *args = behaviour
        data = entry.data
        if kind == "status":
            return self._status(handler, hit, args[0], args[1] if len(args) > 1 else {})
        if kind == "redirect":
            return self._status(handler, hit, 302, {"Location": args[0]})
        if kind == "stall":
            time.sleep(args[0])
            handler.close_connection = True
            return
        if kind == "endless":
            return self._endless(handler, hit)
        if kind == "ok" and self._not_modified(handler, entry):
            return self._status(handler, hit, 304)
        if kind == "corrupt":
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        start = 0
        if_range = handler.headers.get("If-Range")
        same = if_range is None or if_range in (entry.etag, entry.last_modified)
        if hit.range and kind not in ("ignore_range", "gzip", "gzip_drop") and same:
            start = int(hit.range.split("=")[1].split("-")[0])
        body = data[start:]
        if kind == "short":
            body = data[: args[0]]
        if kind in ("gzip", "gzip_drop"):
            body = gzip.compress(body)
        hit.status = 206 if start else 200
        handler.send_response(hit.status)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(args[0] if kind == "length" else len(body)))
        if "etag" in entry.validators:
            handler.send_header("ETag", entry.etag)
        if "last_modified" in entry.validators:
            handler.send_header("Last-Modified", entry.last_modified)
        if kind in ("gzip", "gzip_drop"):
            handler.send_header("Content-Encoding", "gzip")
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        if kind in ("drop", "gzip_drop"):
            body = body[: args[0]]
        pieces = 20 if kind == "slow" else 1
        step = max(1, -(-len(body) // pieces))
        try:
            for i in range(0, len(body), step):
                # Counted before the write: the client may finish reading (and the test
                # check the log) before this thread runs again.
                hit.sent += len(body[i:i + step])
                handler.wfile.write(body[i:i + step])
                if kind == "slow":
                    handler.wfile.flush()
                    time.sleep(args[0] / pieces)
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True
            return
        if kind in ("drop", "gzip_drop", "length"):
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # the client hung up first: the connection is already down
                pass
            handler.close_connection = True

    @staticmethod
    def _not_modified(handler, entry: _File) -> bool:
        """A conditional GET (If-None-Match, else If-Modified-Since) that the file still meets (RFC 9110)."""
        etag, since = handler.headers.get("If-None-Match"), handler.headers.get("If-Modified-Since")
        if etag is not None:
            return "etag" in entry.validators and etag == entry.etag
        if since is not None and "last_modified" in entry.validators:
            try:
                return email.utils.parsedate_to_datetime(since).timestamp() >= int(entry.modified)
            except (TypeError, ValueError):
                return False
        return False

    def _endless(self, handler, hit: Hit) -> None:
        hit.status = 200
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Connection", "close")
        handler.end_headers()
        chunk = hashlib.sha256(b"endless").digest() * 2048  # 64 KiB
        handler.close_connection = True
        try:
            while hit.sent < 1 << 34:  # 16 GiB: "forever" for any test
                hit.sent += len(chunk)
                handler.wfile.write(chunk)
        except OSError:
            pass

    def _status(self, handler, hit: Hit, code: int, headers: dict | None = None) -> None:
        hit.status = code
        handler.send_response(code)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", "0")
        handler.end_headers()


def weight_entry(urls, data: bytes, *, algos=("sha256",), size=True, fmt="torch", checksums_of=None) -> dict:
    """A manifest file entry: ``data`` served at ``urls`` (one URL or a list), vouched for by
    the digests ``algos`` of ``checksums_of`` (default: ``data`` itself) and, with ``size``,
    its length."""
    sums = checksums(data if checksums_of is None else checksums_of)
    return {"urls": [urls] if isinstance(urls, str) else list(urls), "format": fmt,
            "checksums": {a: sums[a] for a in algos}, "size": len(data) if size else None}


def write_manifest(path, files_by_model: dict) -> str:
    """A manifest at ``path`` with the real models' metadata and the given file entries
    ({model: [{"urls": [...], "format": ..., "checksums": {...}, "size": ...}, ...]})."""
    import json
    import pathlib

    real = json.loads((pathlib.Path(__file__).resolve().parent.parent / "weights_manifest.json").read_text())
    models = {}
    for name, files in files_by_model.items():
        models[name] = dict(real["models"][name], files=files)
    pathlib.Path(path).write_text(json.dumps({"schema_version": real["schema_version"], "models": models}))
    return str(path)


# -- what the fault tests fetch with -----------------------------------------------------------
# Short timeouts and waits, so a fault shows in seconds; ONCE: no retry.
FAST = DownloadOptions(timeout=(2.0, 0.5), retries=3, backoff=0.01, max_wait=0.2, chunk_size=32 * 1024)
ONCE = DownloadOptions(timeout=(2.0, 0.5), retries=0, chunk_size=32 * 1024)
DATA = random.Random(1).randbytes(300_000)


def weight_file(urls, data=DATA, size=True, model="tinynet_e"):
    return WeightFile(model=model, index=0, urls=tuple(urls), format="torch",
                      checksums={"sha256": checksums(data)["sha256"]}, size=len(data) if size else None)


def fetch(file, cache, **kwargs):
    kwargs.setdefault("options", FAST)
    kwargs.setdefault("mirror", "")
    kwargs.setdefault("offline", False)
    return download.fetch(file, progress=False, cache=cache, **kwargs)


def within(seconds, fn, *args, **kwargs):
    """fn(...) on a thread; fails (instead of hanging the suite) if it is still running."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"hung: still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
