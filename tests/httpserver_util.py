"""A threaded HTTP file server on 127.0.0.1 with fault injection and a request log.

Each path serves bytes registered with `add`; `fault(path, *kinds)` queues
misbehaviours consumed one request at a time:

    "drop"     send the headers and half the body, then cut the connection
    "500"      answer 500 Internal Server Error
    "404"      answer 404 Not Found
    "slow"     sleep `slow_seconds` before answering
    "wrong"    send other bytes of the same length
    "html"     send an HTML page (as an error page from a proxy would be)
    "norange"  ignore the Range header and send the whole file

`/uc?id=ID` and `/download?id=ID&confirm=t&uuid=…` imitate Google Drive:
`/uc` answers with the "cannot scan for viruses" confirmation form for files
registered with `add_drive`, or with Drive's quota error page when
`drive_quota_exceeded` is set.
"""

from __future__ import annotations

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
    sent: int = 0
    complete: bool = False


class FaultServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drive: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.hits: list[Hit] = []
        self.slow_seconds = 1.0
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

    def next_fault(self, path: str) -> str | None:
        with self._lock:
            queue = self.faults.get(path)
            return queue.pop(0) if queue else None

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
            hit = server.record(Hit(parts.path, parts.query, self.headers.get("Range"), 0))
            if parts.path == "/uc":
                self._drive_page(hit, query.get("id", [""])[0])
            elif parts.path == "/download" and query.get("confirm") == ["t"]:
                data = server.drive.get(query.get("id", [""])[0])
                self._send_file(hit, data, None)
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

        def _send_file(self, hit: Hit, data: bytes | None, fault: str | None) -> None:
            if data is None or fault == "404":
                self._simple(hit, 404, b"not found")
                return
            if fault == "500":
                self._simple(hit, 500, b"try again later")
                return
            if fault == "html":
                self._simple(hit, 200, b"<html><body>Proxy login</body></html>", "text/html")
                return
            if fault == "slow":
                time.sleep(server.slow_seconds)
            if fault == "wrong":
                data = bytes(b ^ 0xFF for b in data)
            start = 0
            wanted = self.headers.get("Range")
            if wanted and fault != "norange" and wanted.startswith("bytes=") and wanted.endswith("-"):
                start = int(wanted[len("bytes=") : -1])
                if start >= len(data):
                    self._simple(hit, 416, b"")
                    return
            body = data[start:]
            hit.status = 206 if start else 200
            self.send_response(hit.status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Connection", "close")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            self.close_connection = True
            limit = len(body) // 2 if fault == "drop" else len(body)
            try:
                for i in range(0, limit, 1 << 16):
                    piece = body[i : min(i + (1 << 16), limit)]
                    self.wfile.write(piece)
                    hit.sent += len(piece)
                    if server.throttle:
                        time.sleep(server.throttle)
                self.wfile.flush()
            except OSError:  # the client went away
                return
            if fault == "drop":
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            hit.complete = True

    return Handler
