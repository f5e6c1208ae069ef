"""Real servers on loopback for the tests: nginx (Range, keep-alive) and a fault-injecting stdlib server."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

from loopback_nginx import LoopbackNginx  # noqa: E402  (tools/loopback_nginx.py)

Nginx = LoopbackNginx  # the tests' name for it


@dataclass
class Fault:
    """What the server does to one request (the n-th to a path, counting from 0)."""

    status: int | None = None  # answer with this status and no body
    retry_after: str | None = None
    cut_at: int | None = None  # send this many body bytes, then reset the connection
    short_by: int | None = None  # claim the full Content-Length, send fewer bytes, close
    stall: float | None = None  # sleep this long before sending the body
    ignore_range: bool = False  # answer 200 with the whole body even when a Range was asked
    overclaim: int | None = None  # claim a file this many bytes longer (Content-Length, Content-Range), send the body, close
    drip: float | None = None  # send the body one byte at a time, this many seconds apart
    redirect: str | None = None  # answer 302 with this Location


@dataclass
class FaultPlan:
    """Faults by (path, request number); `log` records (path, range start, status) of every request."""

    faults: dict[tuple[str, int], Fault] = field(default_factory=dict)
    log: list[tuple[str, int, int]] = field(default_factory=list)
    token: str | None = None  # if set, a request whose query lacks token=<this> is answered 403
    seen: list[tuple[str, bool, dict[str, str]]] = field(default_factory=list)  # (path, over TLS, headers) of each
    counts: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next(self, path: str, range_header: str | None = None) -> Fault | None:
        """The fault for this request (``range_header``: its Range header, for plans that care)."""
        with self.lock:
            n = self.counts[path]
            self.counts[path] += 1
            return self.faults.get((path, n))


def _handler(root: str, plan: FaultPlan) -> type:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            plan.seen.append((path, isinstance(self.connection, ssl.SSLSocket), dict(self.headers.items())))
            if plan.token is not None and f"token={plan.token}" not in query.split("&"):
                plan.log.append((path, 0, 403))
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            fault = plan.next(path, self.headers.get("Range"))
            if fault and fault.redirect:
                plan.log.append((path, 0, 302))
                self.send_response(302)
                self.send_header("Location", fault.redirect)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            file = os.path.join(root, path.lstrip("/"))
            if not os.path.isfile(file):
                plan.log.append((path, 0, 404))
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            with open(file, "rb") as f:
                body = f.read()
            start = 0
            m = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if m and not (fault and fault.ignore_range):
                start = int(m.group(1))
            if fault and fault.status:
                plan.log.append((path, start, fault.status))
                self.send_response(fault.status)
                if fault.retry_after:
                    self.send_header("Retry-After", fault.retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206 if start else 200
            plan.log.append((path, start, status))
            part = body[start:]
            extra = (fault.overclaim or 0) if fault else 0
            self.send_response(status)
            self.send_header("Content-Length", str(len(part) + extra))
            self.send_header("ETag", '"v1"')
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) + extra - 1}/{len(body) + extra}")
            self.end_headers()
            if fault and fault.stall:
                time.sleep(fault.stall)
            if fault and fault.cut_at is not None:
                self.wfile.write(part[: fault.cut_at])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if fault and fault.drip:
                for i in range(len(part)):
                    self.wfile.write(part[i:i + 1])
                    self.wfile.flush()
                    time.sleep(fault.drip)
                return
            if fault and fault.overclaim:
                self.wfile.write(part)
                self.wfile.flush()
                self.close_connection = True
                return
            if fault and fault.short_by:
                self.wfile.write(part[: max(0, len(part) - fault.short_by)])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(part)

    return Handler


class _Server(http.server.ThreadingHTTPServer):
    tls: ssl.SSLContext | None = None  # if set, connections that open with a TLS handshake are served over TLS

    def get_request(self):
        sock, addr = super().get_request()
        if self.tls is not None and sock.recv(1, socket.MSG_PEEK) == b"\x16":  # a TLS record: the handshake
            sock = self.tls.wrap_socket(sock, server_side=True)
        return sock, addr

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that gave up (a read timeout on a stall): expected here, not worth a traceback
        super().handle_error(request, client_address)


@contextlib.contextmanager
def fault_server(root: str, plan: FaultPlan | None = None, tls: tuple[str, str] | None = None
                 ) -> Iterator[tuple[str, FaultPlan]]:
    """A server for ``root`` on loopback. ``tls``: (cert, key) files; then the same port also speaks TLS and
    the URL given is https:// (http:// with the same host and port reaches it in plain text)."""
    plan = plan or FaultPlan()
    server = _Server(("127.0.0.1", 0), _handler(root, plan))
    server.daemon_threads = True
    if tls is not None:
        server.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.tls.load_cert_chain(*tls)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}", plan
    finally:
        server.shutdown()
        server.server_close()


def self_signed(folder: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, made with the openssl command: (cert file, key file)."""
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def request_body(handler: http.server.BaseHTTPRequestHandler) -> bytes:
    """A request's body, sent with a Content-Length or chunked (a streamed upload), trailers read past."""
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def no_sleep(_: float) -> None:
    """A FetchOptions.sleep that records nothing and waits for nothing (tests stay fast)."""


Sleeps = Callable[[float], None]
