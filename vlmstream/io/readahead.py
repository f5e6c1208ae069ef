"""Read-ahead: a background thread reads the next shards into reused chunk buffers, bounded in bytes.

The consumer (the tar reader) reads each shard from a `ChunkStream` whose ``read(n)`` copies straight out of the
thread's chunks (one copy of each byte); a chunk's buffer goes back to the thread once read. Whatever the thread
holds reaches the consumer before an error does, and a stream its consumer closed stops the thread's work on it
at once (its retries included: the thread passes the stream's ``abandoned`` event as the transfer's cancel).
"""

from __future__ import annotations

import io
import queue
import threading
from typing import Any, BinaryIO, Callable, Iterator

from ..errors import FetchError

FINISH_WAIT_S = 2.0  # a closed stream waits this long, at most, for its thread to let go of it

class Buffers:
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


class ChunkStream(io.RawIOBase):
    """The consumer side of a read-ahead: chunks arrive through a queue from the reader thread. ``read(n)`` copies
    straight out of them (the tar reader's members: one copy, no buffer in between); a chunk's buffer goes back
    to the reader, and its bytes to the budget, once read."""

    def __init__(self, budget: "Budget", buffers: Buffers):
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


class Budget:
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


def read_ahead(items: Iterator[Any], open_stream: Callable[[Any, threading.Event], BinaryIO], *, prefetch: int,
               budget_bytes: int, chunk: int) -> Iterator[tuple[Any, ChunkStream]]:
    """``(item, stream)`` for each item, in order, the streams filled by one background thread that opens up to
    ``prefetch`` items ahead and holds at most ``budget_bytes`` in chunks of ``chunk`` bytes.

    ``open_stream(item, cancel)`` opens an item unbuffered (each raw read goes straight into a chunk, and a short
    one, the end or an error next, is handed on at once); ``cancel`` is set once the consumer closed the stream."""
    budget = Budget(budget_bytes)
    buffers = Buffers(chunk)
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def reader() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                out = ChunkStream(budget, buffers)
                ready.put((item, out))
                cancelled = lambda: stop.is_set() or out.abandoned.is_set()  # noqa: E731
                try:
                    if stop.is_set():
                        return
                    with open_stream(item, out.abandoned) as f:
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
            yield got
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
