"""`vs.fetch()`: open shards from local files, http(s) and hf:// as streams, surviving a flaky network.

HTTP goes through the standard library's http.client (no curl subprocess): one keep-alive connection per
host, connect and read timeouts and a low-speed limit, retries with exponential backoff and jitter for what
another attempt can fix (network errors, timeouts, stalls, 408/425/429/5xx; ``Retry-After`` honoured), and a
transfer that breaks is resumed with a Range request from the byte where it broke, so a reader downstream
sees every byte exactly once. A background thread can read the next shards ahead, bounded in bytes, and a
local cache folder can keep shards between epochs. docs/ERRORS.md states what is retried, refused and
redacted.
"""

from __future__ import annotations

import email.utils
import http.client
import io
import queue
import random
import re
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, Mapping
from urllib.parse import SplitResult, urljoin, urlsplit

from .cache import ShardCache
from .errors import ErrorCounts, Reasoned, check_policy, handle, redact
from .pipeline import Context

FINISH_WAIT_S = 2.0  # a closed read-ahead stream waits this long, at most, for its thread to let go of it
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
REDIRECT_STATUS = {301, 302, 303, 307, 308}


class FetchError(Reasoned, IOError):
    """A shard could not be read; the message names the (redacted) URL and what happened.

    ``reason``: "retries_exhausted", "http_error" (a status that is not retried), "changed" (ETag), "bad_range",
    "redirects", "redirect_refused" (to a scheme other than http(s)), "bad_url" (cannot be a request),
    "bad_response" (an answer http.client cannot read), "bad_certificate", "not_found", "io_error",
    "checksum" (a shard read into the cache does not match the manifest), "cancelled" (its reader closed it
    while a retry waited), or "pipe_refused" (never skipped: a set-up error).
    """


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
class FetchStats(ErrorCounts):
    """Counts of one fetch stage (per DataLoader worker); ``skipped`` counts shards given up, by reason."""

    requests: int = 0
    retries: int = 0
    resumed: int = 0  # Range requests that continued a broken transfer
    stalls: int = 0  # transfers slower than the low-speed limit (each retried, or given up)
    bytes: int = 0
    cache_hits: int = 0
    shards: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: v.copy() if isinstance(v, (dict, list)) else v for k, v in self.__dict__.items()}


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

    def __init__(self, opts: FetchOptions, stats: FetchStats):
        self.opts, self.stats = opts, stats
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

    def request(self, url: str, start: int = 0, headers: Mapping[str, str] | None = None
                ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection, str]:
        """GET url (from byte `start`), following redirects; one attempt, errors raised as they come.

        ``headers`` add to the options' for this request. All of them (credentials, as far as we know) go to
        url's own origin only: a redirect to another scheme, host or port, https -> http included, gets none.
        """
        headers = {**self.headers, **clean_headers(headers or {})}
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
    gone), ends a wait for a retry at once.
    """

    def __init__(self, url: str, client: HTTPClient, headers: Mapping[str, str] | None = None, start: int = 0,
                 cancel: threading.Event | None = None):
        self.url, self.client, self.opts = url, client, client.opts
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


def open_url(url: str, *, client: HTTPClient | None = None, allow_pipe: bool = False, hf_token: str | bool | None = None,
             buffer_size: int = 1 << 20, start: int = 0, cancel: threading.Event | None = None) -> BinaryIO:
    """Open a shard for reading from byte `start`: a local path, file://, http(s)://, hf:// or (only if
    allowed) pipe:. ``buffer_size=0``: unbuffered, where each ``readinto`` fills its buffer but at the end of
    the stream or (HTTP) just before an error; ``cancel`` ends an HTTP stream's wait for a retry."""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise FetchError(f"{redact(url)[:40]!r}: pipe: URLs run shell commands; pass allow_pipe=True to use them",
                             reason="pipe_refused")
        if start:
            raise FetchError(f"{redact(url)[:40]!r}: a pipe: stream cannot start at byte {start}", reason="pipe_refused")
        # buffered even for buffer_size=0: a pipe's raw reads are short, and a BufferedReader's fill the buffer
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, bufsize=buffer_size or io.DEFAULT_BUFFER_SIZE)
        return proc.stdout
    headers = None
    if url.startswith("hf://"):
        url, token = hf_resolve_url(url, hf_token)
        headers = {"Authorization": f"Bearer {token}"} if token else None
    if url.startswith(("http://", "https://")):
        client = client or HTTPClient(FetchOptions(), FetchStats())
        stream = HTTPStream(url, client, headers, start, cancel)
        return io.BufferedReader(stream, buffer_size) if buffer_size else stream
    path = url[7:] if url.startswith("file://") else url
    try:
        f = open(path, "rb", buffering=buffer_size)
    except OSError as e:
        raise FetchError(f"{redact(path)}: {e.strerror}", reason="not_found" if isinstance(e, FileNotFoundError) else "io_error"
                         ) from None
    if start:
        f.seek(start)
    return f


def hf_resolve_url(url: str, token: str | bool | None = None) -> tuple[str, str | None]:
    """hf://datasets/ORG/NAME[@REV]/PATH -> the Hub's resolve URL and the token to send (never logged).

    Both as huggingface_hub's own downloads: the endpoint from ``HF_ENDPOINT``; the token a string, none for
    False, else the user's (``HF_TOKEN``, the token file; True requires one; ``HF_HUB_DISABLE_IMPLICIT_TOKEN``).
    """
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import get_token_to_send

    from .shardlist import parse_hf_url

    repo_type, repo_id, revision, path = parse_hf_url(url)
    return hf_hub_url(repo_id, path, repo_type=repo_type, revision=revision), (get_token_to_send(token) or None)


# ------------------------------------------------------------------------------------------------ read-ahead


class _Buffers:
    """Chunk buffers handed from the reader thread to the stream that reads them, and back once read: a new
    buffer costs a page fault per 4 KiB on first touch (14 a 57 KB sample on the benchmark machine), a reused
    one nothing. As many are alive as the read-ahead budget allows, plus one."""

    def __init__(self, size: int):
        self.size = size
        self.free: list[bytearray] = []
        self.lock = threading.Lock()

    def get(self) -> bytearray:
        with self.lock:
            if self.free:
                return self.free.pop()
        return bytearray(self.size)

    def put(self, buf: bytearray) -> None:
        with self.lock:
            self.free.append(buf)


class _ChunkStream(io.RawIOBase):
    """The consumer side of a read-ahead: chunks arrive through a queue from the reader thread. ``read(n)`` copies
    straight out of them (the tar reader's members: one copy, no buffer in between); a chunk's buffer goes back
    to the reader, and its bytes to the budget, once read."""

    def __init__(self, budget: "_Budget", buffers: _Buffers):
        self.q: queue.Queue = queue.Queue()
        self.budget, self.buffers = budget, buffers
        self.buf: bytearray | None = None  # the chunk being read, its filled part and the position in it
        self.view = memoryview(b"")
        self.pos = 0
        self.done = False
        self.abandoned = threading.Event()  # set by close(): the reader thread stops filling this stream
        self.finished = threading.Event()  # set by the reader thread once it is done with this stream
        self.lock = threading.Lock()

    def push(self, buf: bytearray, n: int) -> bool:
        """Called by the reader thread with a buffer holding n bytes; False (and the buffer recycled) once closed."""
        with self.lock:
            if self.abandoned.is_set():
                self.recycle(buf)
                return False
            self.q.put((buf, n))
            return True

    def recycle(self, buf: bytearray) -> None:
        self.budget.release(len(buf))
        self.buffers.put(buf)

    def _advance(self) -> bool:
        """Recycle the chunk just read and move to the next one; False at the end of the stream."""
        if self.buf is not None:
            self.recycle(self.buf)
            self.buf, self.view, self.pos = None, memoryview(b""), 0
        if self.done:
            return False
        got = self.q.get()
        if got is None or isinstance(got, BaseException):
            self.done = True
            if got is not None:
                raise got
            return False
        self.buf, n = got
        self.view = memoryview(self.buf)[:n]
        return True

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        parts: list[bytes | memoryview] = []  # a view of the current chunk last, bytes copied out of earlier ones
        want = n if n is not None and n >= 0 else None
        while want is None or want > 0:
            if self.pos >= len(self.view):
                if parts and isinstance(parts[-1], memoryview):
                    parts[-1] = bytes(parts[-1])  # copied out before its buffer goes back to the reader
                if not self._advance():
                    break
            end = len(self.view) if want is None else min(len(self.view), self.pos + want)
            parts.append(self.view[self.pos:end])
            if want is not None:
                want -= end - self.pos
            self.pos = end
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    def readinto(self, b) -> int:
        if self.pos >= len(self.view) and not self._advance():
            return 0
        n = min(len(b), len(self.view) - self.pos)
        b[:n] = self.view[self.pos:self.pos + n]
        self.pos += n
        return n

    def close(self) -> None:
        """Tell the thread to stop, then drain what it queued so its buffers return to the budget. A verdict on
        the whole shard that the thread reached at its end (the cache's copy does not match the manifest) is
        raised here: the reader stopped at the end of the archive, before it; other errors after that point
        concern bytes nobody reads."""
        if self.closed:
            return
        with self.lock:
            self.abandoned.set()
        self.finished.wait(FINISH_WAIT_S)  # the thread stops at its next chunk, or reads a small tail
        verdict = None
        with self.lock:
            while True:
                try:
                    got = self.q.get_nowait()
                except queue.Empty:
                    break
                if isinstance(got, tuple):
                    self.recycle(got[0])
                elif isinstance(got, FetchError) and got.reason == "checksum":
                    verdict = got
        if self.buf is not None:
            self.recycle(self.buf)
            self.buf, self.view = None, memoryview(b"")
        self.done = True
        super().close()
        if verdict is not None:
            raise verdict


class _Budget:
    """Bytes held in read-ahead buffers, bounded: the reader thread waits when it is spent."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cv = threading.Condition()

    def take(self, n: int, cancelled: Callable[[], bool]) -> bool:
        """Wait until n more bytes fit (one chunk always fits); False if cancelled meanwhile."""
        with self.cv:
            while self.used > 0 and self.used + n > self.limit:
                if cancelled():
                    return False
                self.cv.wait(0.1)
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self.cv:
            self.used -= n
            self.cv.notify_all()


# ----------------------------------------------------------------------------------------------------- stage


class _Failed(io.RawIOBase):
    """The stream of a shard that could not be opened, under on_error="skip": reading raises the error, so
    the reader downstream meets it where it would meet a transfer that broke for good."""

    def __init__(self, error: FetchError):
        self.error = error

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        raise self.error


class fetch:
    """The stage: shard items in, ``{**item, "stream": binary file}`` out, opened in order.

    ``prefetch``: shards read ahead in a background thread (0: none), holding at most ``prefetch_bytes``.
    ``cache``: a folder keeping whole shards for later epochs, bounded by ``cache_bytes`` (LRU), checked against
    the manifest and its own records (vlmstream/cache.py); folders may be shared by processes.
    ``headers``: sent with each HTTP request to the shard URL's own origin (auth; never after a redirect to
    another scheme, host or port), stripped and checked here; the HF token is taken from huggingface_hub's
    usual places for hf:// URLs. Neither ever appears in errors, stats or state.
    ``on_error``: a shard that cannot be read (retries exhausted, HTTP 404, ...) raises ``FetchError``
    ("raise"), or is skipped and counted in ``stats`` with the samples lost ("skip"; "warn" also logs). The
    reader downstream (`tar_samples`) reports how far it got, so samples already delivered stay delivered
    and the rest of the shard is counted from the manifest. A refused ``pipe:`` URL always raises.
    """

    def __init__(self, *, prefetch: int = 2, prefetch_bytes: int = 32 << 20, cache: str | None = None,
                 cache_bytes: int = 50 << 30, allow_pipe: bool = False, headers: Mapping[str, str] | None = None,
                 hf_token: str | bool | None = None, options: FetchOptions | None = None, on_error: str = "raise"):
        self.on_error = check_policy(on_error)
        self.opts = options or FetchOptions()
        # checked here, where the pipeline is built, rather than at the first request
        self.opts = FetchOptions(**{**self.opts.__dict__, "headers": clean_headers({**self.opts.headers,
                                                                                   **(headers or {})})})
        self.prefetch, self.prefetch_bytes = prefetch, prefetch_bytes
        self.cache = ShardCache(cache, cache_bytes) if cache else None
        self.allow_pipe, self.hf_token = allow_pipe, hf_token
        self.stats = FetchStats()
        self.ctx = Context()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["stats"] = FetchStats()  # each worker counts its own
        return state

    def bind(self, ctx: Context) -> None:
        self.ctx = ctx

    def open(self, item: Mapping[str, Any], client: HTTPClient, buffer_size: int | None = None,
             cancel: threading.Event | None = None) -> BinaryIO:
        """The item's stream, buffered by ``buffer_size`` (default: a chunk, for a tar reader reading it directly;
        0: unbuffered, for the read-ahead thread, see `open_url`)."""
        url = item["url"]
        buffer_size = self.opts.chunk if buffer_size is None else buffer_size
        if self.ctx.num_workers > 1 and not item.get("worker_split") and not item.get("resampled"):
            raise ValueError(f"{self.ctx.num_workers} DataLoader workers would each read every shard: "
                             "add vs.split_by_worker() before vs.fetch()")
        start = item.get("start_offset", 0)  # resuming inside a shard, or reading samples by reference
        if self.cache is not None:  # checked against the manifest's size and sha256 where it gives them
            f = self.cache.open(url, item.get("bytes"), item.get("sha256"), buffer_size)
            if f is not None:
                self.stats.cache_hits += 1
                f.seek(start)
                return f
        caching = self.cache is not None and "://" in url and not start
        if caching and cancel is None:
            cancel = threading.Event()  # the cache's tail read at close retries nothing
        f = open_url(url, client=client, allow_pipe=self.allow_pipe, hf_token=self.hf_token,
                     buffer_size=buffer_size, start=start, cancel=cancel)
        self.stats.shards += 1
        if caching:
            tee = self.cache.tee(url, f, item.get("bytes"), item.get("sha256"), cancel)
            return io.BufferedReader(tee, buffer_size) if buffer_size else tee
        return f

    def shard_failed(self, error: FetchError, lost: int | None) -> None:
        """Called by the reader when a shard's stream fails for good: apply ``on_error`` (``lost``: the
        samples of this slot's share of the shard not delivered, None when the manifest does not say)."""
        if self.on_error == "raise" or error.reason == "pipe_refused":
            raise error
        note = f" (shard skipped, {'an unknown number of' if lost is None else lost} samples lost)"
        handle(self.on_error, error, self.stats, "fetch", lost, note)

    def _out(self, item: Mapping[str, Any], stream: BinaryIO) -> dict[str, Any]:
        out = {**item, "stream": stream}
        if self.on_error != "raise":
            out["on_fetch_error"] = self.shard_failed  # the reader calls it with how many samples were lost
        return out

    def __call__(self, it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        client = HTTPClient(self.opts, self.stats)
        if self.prefetch <= 0:
            for item in it:
                try:
                    stream = self.open(item, client)
                except FetchError as e:
                    if self.on_error == "raise" or e.reason == "pipe_refused":
                        raise
                    stream = _Failed(e)
                yield self._out(item, stream)
            return
        yield from self._read_ahead(it, client)

    def _read_ahead(self, it: Iterator[dict[str, Any]], client: HTTPClient) -> Iterator[dict[str, Any]]:
        budget = _Budget(self.prefetch_bytes)
        buffers = _Buffers(self.opts.chunk)
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def reader() -> None:
            try:
                for item in it:
                    if stop.is_set():
                        return
                    out = _ChunkStream(budget, buffers)
                    ready.put((item, out))
                    cancelled = lambda: stop.is_set() or out.abandoned.is_set()  # noqa: E731
                    try:
                        if stop.is_set():
                            return
                        # Unbuffered: each read goes straight into a chunk, and a short one (the end, or an
                        # error next) is handed on at once, so the consumer gets every byte before any error.
                        with self.open(item, client, 0, out.abandoned) as f:
                            while not cancelled() and budget.take(buffers.size, cancelled):
                                buf = buffers.get()
                                try:
                                    n = f.readinto(buf)
                                except BaseException:
                                    out.recycle(buf)
                                    raise
                                if not n:
                                    out.recycle(buf)
                                    break
                                if not out.push(buf, n):
                                    break
                        out.q.put(None)
                    except BaseException as e:  # handed to the consumer, who raises it where it reads
                        out.q.put(e)
                    finally:
                        out.finished.set()
                ready.put(None)
            except BaseException as e:
                ready.put(e)

        t = threading.Thread(target=reader, name="vlmstream-fetch", daemon=True)
        t.start()
        try:
            while True:
                got = ready.get()
                if got is None:
                    return
                if isinstance(got, BaseException):
                    raise got
                item, stream = got
                yield self._out(item, stream)
        finally:
            stop.set()
            while True:  # unblock the thread if it waits on a full queue, and close what it opened for no one
                try:
                    got = ready.get_nowait()
                except queue.Empty:
                    break
                if isinstance(got, tuple):
                    got[1].close()  # ends the thread's retries of that shard
            t.join(timeout=5)
