"""A real HTTP server on 127.0.0.1 that serves weight files and misbehaves on request.

Each path has the bytes to serve and a script: one behaviour per request, in order, then
plain service. Every request is logged (Range header, status, bytes sent) so tests can
check what the client really did.
"""
from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Hit:
    path: str
    range: str | None
    status: int = 0
    sent: int = 0


@dataclass
class _File:
    data: bytes
    script: list = field(default_factory=list)


def checksums(data: bytes) -> dict[str, str]:
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "git_blob_sha1": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
        "md5": hashlib.md5(data).hexdigest(),
    }


class WeightsServer:
    """Behaviours (tuples):
    ("ok",)                    serve, honouring Range
    ("status", code[, headers]) answer with that status and no body
    ("redirect", path)         302 to another path on this server
    ("drop", n)                announce the full body, send n bytes, cut the connection
    ("ignore_range",)          answer 200 with the whole file even to a Range request
    ("corrupt",)               the right length, wrong bytes
    ("short", n)               announce and send only the first n bytes
    ("stall", seconds)         say nothing for that long, then hang up
    ("slow", seconds)          serve normally, spread over that many seconds
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
    def add(self, path: str, data: bytes, *script: tuple) -> str:
        self.files[path] = _File(data, list(script))
        return self.url(path)

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
        path = handler.path.split("?")[0]
        hit = Hit(path, handler.headers.get("Range"))
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
            hit.status = 302
            handler.send_response(302)
            handler.send_header("Location", args[0])
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if kind == "stall":
            time.sleep(args[0])
            handler.close_connection = True
            return
        if kind == "corrupt":
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        start = 0
        if hit.range and kind != "ignore_range":
            start = int(hit.range.split("=")[1].split("-")[0])
        body = data[start:]
        if kind == "short":
            body = data[: args[0]]
        hit.status = 206 if start else 200
        handler.send_response(hit.status)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(body)))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        if kind == "drop":
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
        if kind == "drop":
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True

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
