"""HTTP(S) transfers that survive a flaky network: one stream per shard, resumed by Range where it broke.

Through the standard library's http.client (no curl subprocess): one keep-alive connection per origin, connect
and read timeouts and a low-speed limit, retries with exponential backoff and jitter for what another attempt
can fix (network errors, timeouts, stalls, 408/425/429/5xx; ``Retry-After`` honoured), so a reader sees every
byte exactly once. What is not worth a retry fails at once: a URL that cannot be a request, a redirect to another
scheme, a refused certificate, another status. Credentials go to their own origin only. docs/ERRORS.md states
what is retried, refused and redacted.
"""

from __future__ import annotations

import email.utils
import http.client
import io
import random
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import SplitResult, urljoin, urlsplit

from ..errors import FetchError, redact

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
REDIRECT_STATUS = {301, 302, 303, 307, 308}


class _Retry(Exception):
    """A failure worth another attempt: a status in RETRY_STATUS, a body that ended early, a stall."""

    def __init__(self, why: str, wait: float | None = None):
        super().__init__(why)
        self.why, self.wait = why, wait


# What is retried: network errors and timeouts (OSError), bodies cut short, garbled status lines, and the
# above. Not retried: a URL or redirect that cannot be followed, a refused certificate, an HTTP status
# outside RETRY_STATUS, an answer http.client cannot read, and programming errors.
_RETRIED = (_Retry, OSError, http.client.IncompleteRead, http.client.BadStatusLine)
_NOT_IN_URL = re.compile(r"[\x00-\x20\x7f]")  # what http.client refuses in a request line: controls and spaces


def _check_url(url: str) -> SplitResult:
    """The parts of an http(s) URL that can be requested; FetchError "bad_url" for one that cannot (a URL
    that cannot be a request now will not be one after a retry)."""
    why = None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError as e:
        parts, why = None, str(e)
    if parts is None:
        pass
    elif parts.scheme not in ("http", "https"):
        why = f"scheme {parts.scheme!r} is not http or https"
    elif _NOT_IN_URL.search(url):
        why = "a space or control character (percent-encode it)"
    elif not parts.hostname:
        why = "no host"
    else:
        try:
            parts.hostname.encode("idna")  # what the socket layer will do with it
        except UnicodeError:
            why = "not a valid host name"
    if why is not None:
        raise FetchError(f"{redact(url)}: not a URL that can be requested: {why}", reason="bad_url")
    return parts


@dataclass
class FetchOptions:
    """How HTTP transfers are made and when they are retried (docs/ERRORS.md, "Fetch: retries and timeouts").

    ``read_timeout`` bounds each wait for the next bytes; ``low_speed_limit`` / ``low_speed_time`` bound a
    transfer that keeps trickling: slower than ``low_speed_limit`` bytes/s over ``low_speed_time`` seconds of
    waiting for the server is a stall, retried by Range like a broken connection (0: no limit).
    """

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    low_speed_limit: int = 1024  # bytes/s
    low_speed_time: float = 60.0  # seconds
    retries: int = 8  # failed attempts in a row of one shard that are tried again (see HTTPStream._attempt)
    backoff: float = 0.5  # seconds, doubled each retry, with full jitter
    max_backoff: float = 30.0
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # e.g. {"Authorization": "Bearer ..."}
    chunk: int = 1 << 20
    sleep: Callable[[float], None] | None = None  # the wait before a retry (None: a wait that a closed stream ends)


@dataclass
class TransferStats:
    """What an `HTTPClient` counts (the fetch stage's stats extend it)."""

    requests: int = 0
    retries: int = 0
    resumed: int = 0  # Range requests that continued a broken transfer
    stalls: int = 0  # transfers slower than the low-speed limit (each retried, or given up)
    bytes: int = 0


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP field name (RFC 9110 "token")
_HEADER_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # controls (a line break) in a value; tab is allowed


def clean_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers fit to send: values stripped of surrounding whitespace (a token read from a file keeps its
    newline), names and values checked. The ValueError for a bad one never holds the value: it is a secret."""
    out = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ValueError("fetch headers: a header name is not a valid HTTP field name (letters, digits and "
                             "!#$%&'*+-.^_`|~ only; the name is not shown)")
        value = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        value = value.strip()
        if _HEADER_BAD.search(value):
            raise ValueError(f"fetch headers: the value of {name!r} holds a line break or another control "
                             "character (the value is not shown)")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"fetch headers: the value of {name!r} holds a character HTTP cannot send (not "
                             "Latin-1; the value is not shown)") from None
        out[name] = value
    return out


def _origin(parts: SplitResult) -> tuple[str, str, int]:
    """(scheme, host, port): what a credential is given for; http and https of one host are two origins."""
    return parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


class HTTPClient:
    """Keep-alive connections by host, shared by the streams of one fetch stage (one per thread)."""

    def __init__(self, opts: FetchOptions, stats: TransferStats | None = None):
        self.opts, self.stats = opts, stats if stats is not None else TransferStats()
        self.headers = clean_headers(opts.headers)
        self._idle: dict[tuple[str, str], http.client.HTTPConnection] = {}
        self._lock = threading.Lock()

    def _conn(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        with self._lock:
            conn = self._idle.pop((scheme, netloc), None)
        if conn is not None:
            return conn
        host = netloc.rsplit("@", 1)[-1]
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        return cls(host, timeout=self.opts.connect_timeout)

    def release(self, scheme: str, netloc: str, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            old = self._idle.pop((scheme, netloc), None)
            self._idle[(scheme, netloc)] = conn
        if old is not None:
            old.close()

    def request(self, url: str, start: int = 0, headers: Mapping[str, str] | None = None, *, alone: bool = False
                ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection, str]:
        """GET url (from byte `start`), following redirects; one attempt, errors raised as they come.

        ``headers`` add to the options' for this request (``alone``: they replace them: a signed object-store
        request gets none of the headers meant for HTTP servers). All of them (credentials, as far as we know)
        go to url's own origin only: a redirect to another scheme, host or port, https -> http included, gets
        none.
        """
        headers = {**({} if alone else self.headers), **clean_headers(headers or {})}
        first = url
        origin = _origin(_check_url(url))
        for _ in range(10):
            parts = _check_url(url)
            conn = self._conn(parts.scheme, parts.netloc)
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            h = dict(headers) if _origin(parts) == origin else {}
            if start:
                h["Range"] = f"bytes={start}-"
            self.stats.requests += 1
            try:
                conn.request("GET", path, headers=h)
                if conn.sock is not None:
                    conn.sock.settimeout(self.opts.read_timeout)
                resp = conn.getresponse()
            except Exception:
                conn.close()
                raise
            if resp.status in REDIRECT_STATUS and resp.getheader("Location"):
                resp.read()
                self.release(parts.scheme, parts.netloc, conn)
                url = self._redirect(first, url, resp.getheader("Location"))
                continue
            return resp, conn, url
        raise FetchError(f"{redact(first)}: too many redirects", reason="redirects")

    @staticmethod
    def _redirect(first: str, url: str, location: str) -> str:
        """Where a redirect from ``url`` goes, resolved as a browser would; only http(s) is followed."""
        try:
            target = urljoin(url, location.strip())
            scheme = urlsplit(target).scheme
        except ValueError:
            raise FetchError(f"{redact(first)}: redirected to a URL that cannot be parsed", reason="bad_url") from None
        if scheme not in ("http", "https"):
            raise FetchError(f"{redact(first)}: redirect to a {scheme or 'schemeless'} URL refused (only http and https "
                             "are followed)", reason="redirect_refused")
        return target


def _read_once(resp: http.client.HTTPResponse, b: memoryview) -> int:
    """Read at most one recv's worth of the body into ``b``. (``HTTPResponse.readinto`` loops recvs until ``b``
    is full, and when a later recv fails the bytes of the earlier ones are lost with it.)"""
    if resp.chunked:  # http.client's own framing; a copy, but shards are rarely sent chunked
        data = resp.read1(len(b))
        b[:len(data)] = data
        return len(data)
    if resp.length is not None:
        b = b[:resp.length]
    n = resp.fp.readinto1(b)
    if resp.length is not None:
        resp.length -= n
    return n


class HTTPStream(io.RawIOBase):
    """A readable stream over one HTTP(S) URL that retries and resumes by Range where it broke.

    ``readinto`` fills its buffer, short only at the end of the body or when the transfer broke after some
    bytes: those are returned at once and the retry happens on the next call, so a reader never loses bytes it
    was given to an error that comes after them. ``cancel``: an event that, once set (the stream's reader is
    gone), ends a wait for a retry at once. ``signer``: for an object in a store, gives the (URL, headers) of
    each request, signed just before it is sent; ``url`` is then the store URL errors name.
    """

    def __init__(self, url: str, client: HTTPClient, headers: Mapping[str, str] | None = None, start: int = 0,
                 cancel: threading.Event | None = None,
                 signer: Callable[[], tuple[str, Mapping[str, str]]] | None = None):
        self.url, self.client, self.opts = url, client, client.opts
        self.signer = signer
        self._headers = headers  # per-URL headers (an hf:// token): kept out of errors and reprs
        self.cancel = cancel
        self.pos = start  # > 0: the first request is already a Range request (resuming a checkpoint)
        self.length: int | None = None
        self.etag: str | None = None
        self.resp: http.client.HTTPResponse | None = None
        self.conn: http.client.HTTPConnection | None = None
        self.where: tuple[str, str] | None = None
        self.failures: list[str] = []
        self._pending: BaseException | None = None  # a failure met after bytes were returned: raised next call
        self._waited, self._got = 0.0, 0  # the low-speed window: seconds spent waiting in recv, bytes they gave
        self.tries = 0  # failed attempts in a row (see _attempt)
        self._opened_at = start  # where the current connection's body started
        self._attempt(self._open)

    def readable(self) -> bool:
        return True

    # -- one attempt at each step; _attempt wraps them in the retry policy
    def _recv(self, resp: http.client.HTTPResponse, b: memoryview) -> int:
        """One recv, timed: only the time spent waiting for the server counts towards the low-speed limit
        (a reader that pauses is not a slow server)."""
        t = time.monotonic()
        n = _read_once(resp, b)
        self._waited += time.monotonic() - t
        self._got += n
        return n

    def _check_speed(self) -> None:
        """Raise _Retry when the last ``low_speed_time`` seconds of waiting gave less than ``low_speed_limit``
        bytes a second: a server that trickles never trips a per-recv timeout."""
        if self._waited < self.opts.low_speed_time or not self.opts.low_speed_limit:
            return
        waited, got = self._waited, self._got
        self._waited, self._got = 0.0, 0
        if got < self.opts.low_speed_limit * waited:
            self.client.stats.stalls += 1
            raise _Retry(f"stalled: {got} bytes in {waited:.1f} s of waiting, under low_speed_limit="
                         f"{self.opts.low_speed_limit} bytes/s")

    def _open(self) -> None:
        self._waited, self._got, self._opened_at = 0.0, 0, self.pos
        if self.signer is not None:
            target, headers = self.signer()
            resp, conn, final = self.client.request(target, self.pos, headers, alone=True)
        else:
            resp, conn, final = self.client.request(self.url, self.pos, self._headers)
        status = resp.status
        if status in RETRY_STATUS:
            wait = _retry_after(resp.getheader("Retry-After"))
            conn.close()
            raise _Retry(f"HTTP {status}", wait)
        if status not in (200, 206):
            conn.close()
            raise FetchError(f"{redact(self.url)}: HTTP {status} {resp.reason}", reason="http_error")
        etag = resp.getheader("ETag")
        if self.etag and etag and etag != self.etag:
            conn.close()
            raise FetchError(f"{redact(self.url)}: the file changed while it was read (ETag {self.etag} -> {etag})",
                             reason="changed")
        self.etag = self.etag or etag
        if status == 200:
            if self.length is None and resp.length is not None:
                self.length = resp.length
            if self.pos:  # the server ignored Range: read up to where we were and throw it away
                try:
                    self._skip(resp, self.pos)
                except BaseException:
                    conn.close()
                    raise
        else:
            m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.getheader("Content-Range", ""))
            if not m or int(m.group(1)) != self.pos:
                conn.close()
                raise FetchError(f"{redact(self.url)}: bad Content-Range {resp.getheader('Content-Range')!r}",
                                 reason="bad_range")
            if m.group(3) != "*":
                self.length = int(m.group(3))
        if self.pos:
            self.client.stats.resumed += 1
        parts = urlsplit(final)
        self.resp, self.conn, self.where = resp, conn, (parts.scheme, parts.netloc)

    def _skip(self, resp: http.client.HTTPResponse, n: int) -> None:
        scratch = memoryview(bytearray(min(n, self.opts.chunk)))
        while n:
            got = self._recv(resp, scratch[:min(n, len(scratch))])
            if not got:
                raise _Retry("body ended before the resume point (server ignores Range)")
            n -= got
            self._check_speed()

    def _attempt(self, step: Callable[[], Any]) -> Any:
        """step(), retried by the policy. ``self.tries`` counts the failed attempts in a row; it starts again
        only after a connection that got a whole chunk through, so a server that gives a few bytes per
        connection (a trickle, a reset each time) still runs out of retries."""
        while True:
            try:
                return step()
            except FetchError:
                self._drop()
                raise
            except ssl.SSLCertVerificationError as e:  # an OSError, but no retry will change the certificate
                self._drop()
                raise FetchError(f"{redact(self.url)}: TLS certificate refused: {e.verify_message}",
                                 reason="bad_certificate") from None
            except _RETRIED as e:
                self._drop()
                if self.pos - self._opened_at >= self.opts.chunk:
                    self.tries = 0
                why = e.why if isinstance(e, _Retry) else f"{type(e).__name__}: {e}"
                self.failures.append(why)
                if self.tries >= self.opts.retries:
                    raise FetchError(
                        f"{redact(self.url)}: gave up after {self.tries + 1} attempts at byte {self.pos}"
                        f" of {self.length if self.length is not None else '?'}: {why}", reason="retries_exhausted"
                    ) from None
                wait = e.wait if isinstance(e, _Retry) and e.wait is not None else None
                if wait is None:
                    wait = random.uniform(0, min(self.opts.max_backoff, self.opts.backoff * 2**self.tries))
                self.tries += 1
                self.client.stats.retries += 1
                self._wait(wait)
            except http.client.ImproperConnectionState:  # a programming error: raised as it is
                self._drop()
                raise
            except http.client.HTTPException as e:
                self._drop()
                raise FetchError(f"{redact(self.url)}: an answer http.client cannot read as HTTP/1.x: "
                                 f"{type(e).__name__}", reason="bad_response") from None

    def _wait(self, seconds: float) -> None:
        """Wait before a retry; a stream whose reader is gone (``cancel`` set) stops waiting, and retrying."""
        if self.opts.sleep is not None:
            self.opts.sleep(seconds)
        elif self.cancel is not None:
            self.cancel.wait(seconds)
        else:
            time.sleep(seconds)
        if self.cancel is not None and self.cancel.is_set():
            raise FetchError(f"{redact(self.url)}: closed by its reader at byte {self.pos}", reason="cancelled")

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.resp = self.conn = None

    def _finish(self) -> None:
        """The body is complete: its connection goes back to the client for the next request."""
        if self.resp is not None:
            self.resp.read()  # nothing left to read: this closes the response, as keep-alive requires
            self.client.release(*self.where, self.conn)
            self.resp = self.conn = None

    def _fill(self, b: memoryview) -> int:
        if self._pending is not None:
            error, self._pending = self._pending, None
            raise error
        got = 0
        while got < len(b):
            if self.length is not None and self.pos >= self.length:
                self._finish()
                break
            try:
                if self.resp is None:
                    self._open()
                n = self._recv(self.resp, b[got:])
                if not n:
                    if self.length is not None and self.pos < self.length:
                        raise _Retry(f"connection closed at byte {self.pos} of {self.length}")
                    self._finish()  # a body of unknown length ends with its connection's last byte
                    break
                got += n
                self.pos += n
                self._check_speed()
            except _RETRIED as e:
                if not got:
                    raise
                self._drop()
                self._pending = e  # the bytes already here go to the reader first
                break
        self.client.stats.bytes += got
        return got

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")
        if self.length is not None and self.pos >= self.length and self._pending is None:
            self._finish()
            return 0
        return self._attempt(lambda: self._fill(view))

    def close(self) -> None:
        self._drop()
        super().close()


