"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an object-store server, for the retry tests.

Each request is, by a seeded draw: answered ``503 Slow Down`` without reaching the server, cut off by a
connection reset before it is forwarded, forwarded and then cut off before the reply (the request took
effect but its sender never hears so: the hard case for conditional creates), delayed, or passed on
unchanged. ``endless=True`` answers every request with 503. Counters say what was injected, and
``bytes_sent`` how many body bytes each GET of a path returned (to check reads fetch only what they need).
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from tests.buckets.servers import loopback_only

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultyProxy:
    """Forwards to ``upstream`` (a loopback endpoint); ``url`` is where clients connect instead."""

    def __init__(self, upstream: str, *, error_rate: float = 0.0, reset_rate: float = 0.0,
                 lost_reply_rate: float = 0.0, delay_rate: float = 0.0, delay_s: float = 0.2, seed: int = 0) -> None:
        parts = urlsplit(loopback_only(upstream))
        self.upstream = (parts.hostname, parts.port)
        self.rates = {"error": error_rate, "reset": reset_rate, "lost_reply": lost_reply_rate, "delay": delay_rate}
        self.delay_s, self.endless = delay_s, False
        self.injected: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()  # path -> body bytes of GET replies
        self._rng, self._lock = random.Random(seed), threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def draw(self) -> str:
        """The fault for the next request ("pass" for none)."""
        with self._lock:
            if self.endless:
                fault = "error"
            else:
                x, fault = self._rng.random(), "pass"
                for name, rate in self.rates.items():
                    if x < rate:
                        fault = name
                        break
                    x -= rate
            self.injected[fault] += 1
            return fault

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN: the client sees a connection reset."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _handler(proxy: FaultyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _any(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fault = proxy.draw()
            if fault == "error":
                return self._reply(503, {"Content-Type": "application/xml", "Retry-After": "0"},
                                   b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>")
            if fault == "reset":
                self.close_connection = True
                return _reset(self.connection)
            if fault == "delay":
                time.sleep(proxy.delay_s)
            status, headers, payload = self._forward(body)
            if fault == "lost_reply":
                self.close_connection = True
                return _reset(self.connection)
            if self.command == "GET":
                with proxy._lock:
                    proxy.bytes_sent[urlsplit(self.path).path] += len(payload)
            self._reply(status, headers, payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _any

        def _forward(self, body: bytes) -> tuple[int, dict, bytes]:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                             headers=headers)
                response = conn.getresponse()
                payload = response.read()
                return response.status, {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}, payload
            finally:
                conn.close()

        def _reply(self, status: int, headers: dict, payload: bytes) -> None:
            self.send_response_only(status)
            for key, value in headers.items():
                if key.lower() != "content-length":
                    self.send_header(key, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(payload)))
            elif "content-length" not in {k.lower() for k in headers}:
                self.send_header("Content-Length", "0")
            else:
                self.send_header("Content-Length", next(v for k, v in headers.items() if k.lower() == "content-length"))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    return Handler
