"""A threaded HTTP file server on 127.0.0.1 with fault injection and a request log.

Each path serves bytes registered with `add`; `fault(path, *kinds)` queues
misbehaviours consumed one request at a time, `always(path, *kinds)` applies
its kinds to every request once the queue is empty. A kind may combine
several with "+" ("norange+drop"):

    "drop"      send the headers and half the body, then cut the connection
    "stall"     send the headers and half the body, then go silent for `stall_seconds`
    "truncate"  send half the body without a Content-Length, then close cleanly
    "500"       answer 500 Internal Server Error
    "404"       answer 404 Not Found
    "slow"      sleep `slow_seconds` before answering
    "wrong"     send other bytes of the same length
    "html"      send an HTML page (as an error page from a proxy would be)
    "login"     send a 28-byte "Please log in" page as text/plain
    "norange"   ignore the Range header and send the whole file
    "gzip"      gzip the body (Content-Encoding: gzip) whatever the client accepts

With `gzip_when_allowed` set, every file is gzip-encoded unless the request's
Accept-Encoding rules gzip out, as many CDNs and mirrors do.

`/uc?id=ID` and `/download?id=ID&confirm=t&uuid=…` imitate Google Drive:
`/uc` answers with the "cannot scan for viruses" confirmation form for files
registered with `add_drive`, or with Drive's quota error page when
`drive_quota_exceeded` is set.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Hit:
    path: str
    query: str
    range: str | None
    status: int
    accept_encoding: str | None = None
    sent: int = 0
    complete: bool = False


class FaultServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drive: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.sticky: dict[str, str] = {}
        self.hits: list[Hit] = []
        self.slow_seconds = 1.0
        self.stall_seconds = 2.0
        self.gzip_when_allowed = False
        self.throttle = 0.0  # seconds slept after every 64 KiB chunk
        self.drive_quota_exceeded = False
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.url(path)

    def add_drive(self, file_id: str, data: bytes) -> None:
        self.drive[file_id] = data

    def fault(self, path: str, *kinds: str) -> None:
        self.faults[path].extend(kinds)

    def always(self, path: str, *kinds: str) -> None:
        self.sticky[path] = "+".join(kinds)

    def next_fault(self, path: str) -> set[str]:
        with self._lock:
            queue = self.faults.get(path)
            kind = queue.pop(0) if queue else self.sticky.get(path, "")
        return set(kind.split("+")) - {""}

    def record(self, hit: Hit) -> Hit:
        with self._lock:
            self.hits.append(hit)
        return hit

    def hits_for(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]

    def full_transfers(self, path: str) -> int:
        """Responses that sent the whole file from byte 0."""
        size = len(self.files.get(path, b""))
        return sum(1 for h in self.hits_for(path) if h.range is None and h.complete and h.sent == size)

    def bytes_sent(self, path: str) -> int:
        return sum(h.sent for h in self.hits_for(path))

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _make_handler(server: FaultServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            hit = server.record(
                Hit(parts.path, parts.query, self.headers.get("Range"), 0, self.headers.get("Accept-Encoding"))
            )
            if parts.path == "/uc":
                self._drive_page(hit, query.get("id", [""])[0])
            elif parts.path == "/download" and query.get("confirm") == ["t"]:
                data = server.drive.get(query.get("id", [""])[0])
                self._send_file(hit, data, set())
            else:
                self._send_file(hit, server.files.get(parts.path), server.next_fault(parts.path))

        def _simple(self, hit: Hit, status: int, body: bytes, ctype: str = "text/plain") -> None:
            hit.status = status
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            hit.sent, hit.complete = len(body), True
            self.close_connection = True

        def _drive_page(self, hit: Hit, file_id: str) -> None:
            if server.drive_quota_exceeded:
                page = (
                    "<html><body><div class='uc-main'><p class='uc-error-caption'>Sorry, you can't "
                    "view or download this file at this time.</p><p class='uc-error-subcaption'>Too "
                    "many users have viewed or downloaded this file recently.</p></div></body></html>"
                )
                self._simple(hit, 200, page.encode(), "text/html; charset=utf-8")
                return
            if file_id not in server.drive:
                self._simple(hit, 404, b"not found")
                return
            page = f"""<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head>
<body><form id="search" action="/search"><input type="text" value=""></form>
<div class="uc-main"><p class="uc-warning-caption">Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="{server.base}/download" method="get">
<input type="submit" id="uc-download-link" class="goog-inline-block" value="Download anyway"/>
<input type="hidden" name="id" value="{file_id}">
<input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t">
<input type="hidden" name="uuid" value="4bd3c0a2-uuid"></form></div></body></html>"""
            self._simple(hit, 200, page.encode(), "text/html; charset=utf-8")

        def _gzip_allowed(self) -> bool:
            accepted = self.headers.get("Accept-Encoding")
            return accepted is None or "gzip" in accepted or "*" in accepted

        def _send_file(self, hit: Hit, data: bytes | None, fault: set[str]) -> None:
            if data is None or "404" in fault:
                self._simple(hit, 404, b"not found")
                return
            if "500" in fault:
                self._simple(hit, 500, b"try again later")
                return
            if "html" in fault:
                self._simple(hit, 200, b"<html><body>Proxy login</body></html>", "text/html")
                return
            if "login" in fault:
                self._simple(hit, 200, b"<html>Please log in.</html>\n", "text/plain")
                return
            if "slow" in fault:
                time.sleep(server.slow_seconds)
            if "wrong" in fault:
                data = bytes(b ^ 0xFF for b in data)
            encoded = "gzip" in fault or (server.gzip_when_allowed and self._gzip_allowed())
            start = 0
            wanted = self.headers.get("Range")
            if wanted and not encoded and "norange" not in fault and wanted.startswith("bytes=") and wanted.endswith("-"):
                start = int(wanted[len("bytes=") : -1])
                if start >= len(data):
                    self._simple(hit, 416, b"")
                    return
            body = gzip.compress(data) if encoded else data[start:]
            hit.status = 206 if start else 200
            self.send_response(hit.status)
            self.send_header("Content-Type", "application/octet-stream")
            if "truncate" not in fault:
                self.send_header("Content-Length", str(len(body)))
            if encoded:
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Connection", "close")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            self.close_connection = True
            cut = fault & {"drop", "stall", "truncate"}
            limit = len(body) // 2 if cut else len(body)
            try:
                for i in range(0, limit, 1 << 16):
                    piece = body[i : min(i + (1 << 16), limit)]
                    self.wfile.write(piece)
                    hit.sent += len(piece)
                    if server.throttle:
                        time.sleep(server.throttle)
                self.wfile.flush()
                if "stall" in fault:
                    time.sleep(server.stall_seconds)
            except OSError:  # the client went away
                return
            if "drop" in fault or "stall" in fault:
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            hit.complete = not cut

    return Handler
