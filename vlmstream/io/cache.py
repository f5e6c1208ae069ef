"""The shard cache behind ``vs.fetch(cache=..., cache_bytes=...)``: whole shards on local disk for later epochs.

Files in the cache folder (no name comes from a URL's text):

- ``H.tar``: a finished shard, ``H`` the SHA-256 of its URL;
- ``H.meta``: its record, JSON written when it was stored: ``size``, ``sha256`` (when the manifest gave one),
  and the file's ``ino`` and ``mtime_ns``;
- ``H.tar.part.HOST.PID.N`` and ``H.meta.part.HOST.PID.N``: files being written by process PID on host HOST
  (a hash of the host name).

What is checked, and when (docs/ERRORS.md, "The shard cache"):

- storing: the bytes are hashed while they stream through (only where the manifest gives a sha256) and
  counted; a shard whose size or sha256 differs from the manifest's is never stored, and the reader gets a
  ``FetchError`` with reason "checksum". A stored shard's mtime is set to a whole second at least 2 s in the
  past, so that any later write to it gives another mtime, however coarse the file system's clock.
- every open: the open file's size, inode and mtime_ns against its record, and its size and recorded sha256
  against the manifest's when known. A missing file, a missing record or any difference is a miss: the entry
  is removed and the shard fetched again. The bytes are not hashed again.

Several processes may share one folder: an entry is opened, then checked through its open descriptor (never
stat-then-open); files that vanish between a listing and a stat, utime or remove are passed over; an entry
appears by rename, its record first; and publishing, removing and evicting take an exclusive ``flock`` on the
folder. Partial files count towards the bound; those of a process that is gone, or not written to for
``STALE_PARTIAL_S``, are removed when a cache is created and at each eviction.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import itertools
import json
import os
import re
import socket
import threading
import time
from typing import Any, BinaryIO, Iterator

from ..errors import FetchError, log, redact

STALE_PARTIAL_S = 3600.0  # a partial file not written to for this long belongs to a download that is gone
TRAILER_BYTES = 1 << 20  # left unread by a reader that stopped at the end of the archive, read at close, at most
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_PART = re.compile(r"\.part\.([0-9a-f]{8})\.(\d+)\.\d+$")  # HOST, PID
_ENTRY = re.compile(r"[0-9a-f]{64}\.tar")
_serial = itertools.count()  # partial files of one process, told apart
_NO_RECORD, _NO_SHA256 = "no record", "stored without a sha256 (no manifest then)"  # misses, not damage


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


class ShardCache:
    """Whole shards kept on local disk, named by a hash of the URL (never by its text), evicted LRU.

    ``max_bytes`` bounds the finished shards and the partial downloads together; downloads in progress cannot
    be evicted, so the folder exceeds the bound by at most what is being written at that moment.
    """

    def __init__(self, folder: str, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        os.makedirs(folder, exist_ok=True)
        self.remove_stale_partials()

    def path(self, url: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(url.encode()).hexdigest() + ".tar")

    @staticmethod
    def _record_path(path: str) -> str:
        return path[: -len(".tar")] + ".meta"

    @staticmethod
    def _partial(path: str) -> str:
        """A new partial file's name for ``path``: it says which host and process write it."""
        return f"{path}.part.{_HOST}.{os.getpid()}.{next(_serial)}"

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Exclusive across processes and threads (each call opens its own descriptor of the folder)."""
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # no flock here (some network file systems): every step also tolerates races
                pass
            yield
        finally:
            os.close(fd)

    # -------------------------------------------------------------------------------------------- reading

    def open(self, url: str, size: int | None = None, sha256: str | None = None,
             buffering: int = -1) -> BinaryIO | None:
        """The cached shard opened for reading, or None (a miss). ``size`` and ``sha256`` are the manifest's
        (None: unknown). An entry that fails a check is removed, so that the shard is fetched again."""
        path = self.path(url)
        f, why = self._open_checked(path, size, sha256, buffering)
        if f is None and why is not None:  # look again under the lock: a publish may have been half done
            with self._lock():
                f, why = self._open_checked(path, size, sha256, buffering)
                if f is None and why is not None:
                    self._remove_entry(path)
                    (log.info if why in (_NO_RECORD, _NO_SHA256) else log.warning)(
                        "shard cache: %s: %s; removed, fetching it again", redact(url), why)
        if f is not None:
            with contextlib.suppress(OSError):  # recency for LRU, in the access time; the mtime stays as recorded
                st = os.fstat(f.fileno())
                os.utime(f.fileno(), ns=(time.time_ns(), st.st_mtime_ns))
        return f

    def get(self, url: str, size: int | None = None, sha256: str | None = None) -> str | None:
        """The cached shard's path if it is there and passes the checks (the file may go at any time after:
        read it through ``open`` instead)."""
        f = self.open(url, size, sha256)
        if f is None:
            return None
        f.close()
        return self.path(url)

    def _open_checked(self, path: str, size: int | None, sha256: str | None,
                      buffering: int) -> tuple[BinaryIO | None, str | None]:
        """(file, None) for a good entry, (None, None) for none, (None, why) for one that fails a check."""
        try:
            f = open(path, "rb", buffering=buffering)
        except OSError:  # not there (or not readable): a miss
            return None, None
        try:
            why = self._check(os.fstat(f.fileno()), self._read_record(path), size, sha256)
        except BaseException:
            f.close()
            raise
        if why is None:
            return f, None
        f.close()
        return None, why

    def _read_record(self, path: str) -> dict[str, Any] | None:
        try:
            with open(self._record_path(path)) as f:
                record = json.load(f)
        except (FileNotFoundError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    @staticmethod
    def _check(st: os.stat_result, record: dict[str, Any] | None, size: int | None,
               sha256: str | None) -> str | None:
        """Why an entry cannot be used, or None."""
        if record is None:
            return _NO_RECORD
        if st.st_size != record.get("size"):
            return f"{st.st_size} bytes on disk, {record.get('size')} when stored"
        if size is not None and st.st_size != size:
            return f"{st.st_size} bytes, the manifest says {size}"
        if (st.st_ino, st.st_mtime_ns) != (record.get("ino"), record.get("mtime_ns")):
            return "the file changed since it was stored (another inode or mtime)"
        if sha256 is not None and record.get("sha256") != sha256:
            return "stored with another sha256 than the manifest's" if record.get("sha256") else _NO_SHA256
        return None

    # -------------------------------------------------------------------------------------------- writing

    def tee(self, url: str, stream: BinaryIO, size: int | None = None, sha256: str | None = None,
            cancel: threading.Event | None = None) -> BinaryIO:
        """``stream`` read through, its bytes stored as they pass; the shard is published once read to its end
        and found to match ``size`` and ``sha256`` (the manifest's; None: unknown). ``cancel``: the stream's
        retry switch (set: no more retries), for the tail read at close."""
        return _CacheTee(self, url, stream, size, sha256, cancel)

    def _publish(self, path: str, partial: str, out: io.BufferedWriter, sha256: str | None) -> bool:
        """Make a finished download the entry at ``path``: its record first, then the shard, both by rename.
        False if the partial file was removed meanwhile (taken for a stale one)."""
        out.flush()
        now = time.time_ns()
        os.utime(out.fileno(), ns=(now, (now // 10**9 - 2) * 10**9))  # any later write changes the mtime
        st = os.fstat(out.fileno())
        out.close()
        record_path = self._record_path(path)
        record_partial = self._partial(record_path)
        with open(record_partial, "w") as f:
            json.dump({"size": st.st_size, "sha256": sha256, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}, f)
        with self._lock():
            try:
                still_ours = os.stat(partial).st_ino == st.st_ino
            except FileNotFoundError:
                still_ours = False
            if not still_ours:
                _remove(record_partial)
                return False
            os.replace(record_partial, record_path)
            try:
                os.replace(partial, path)
            except FileNotFoundError:  # removed by hand between the stat and here
                _remove(record_path)
                return False
            self._evict_locked(0)
        return True

    # ------------------------------------------------------------------------------------------- eviction

    def evict(self, reserve: int = 0) -> None:
        """Remove stale partial files, then the least recently used shards until the shards and partial files
        take at most ``max_bytes - reserve`` (``reserve``: room for a download about to start)."""
        with self._lock():
            self._evict_locked(reserve)

    def remove_stale_partials(self) -> None:
        """Remove the partial files of downloads that are gone (their process ended, or they stalled)."""
        with self._lock():
            self._scan(remove_stale=True)

    def _scan(self, remove_stale: bool) -> tuple[list[tuple[int, int, str]], int]:
        """(shards as (access time ns, size, path), bytes of shards and live partial files); stale partial
        files removed on the way. Files that vanish meanwhile are passed over."""
        now = time.time()
        names = set(os.listdir(self.folder))
        shards: list[tuple[int, int, str]] = []
        total = 0
        for name in names:
            p = os.path.join(self.folder, name)
            is_partial = ".part" in name
            if not is_partial and not _ENTRY.fullmatch(name):
                if name.endswith(".meta") and name[: -len(".meta")] + ".tar" not in names:
                    _remove(p)  # a record left without its shard
                continue
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            if is_partial:
                if remove_stale and self._stale(name, st, now):
                    _remove(p)
                    continue
            else:
                shards.append((st.st_atime_ns, st.st_size, p))
            total += st.st_size
        return shards, total

    @staticmethod
    def _stale(name: str, st: os.stat_result, now: float) -> bool:
        m = _PART.search(name)
        if m is not None and m.group(1) == _HOST and not _pid_alive(int(m.group(2))):
            return True
        return now - st.st_mtime > STALE_PARTIAL_S

    def _evict_locked(self, reserve: int) -> None:
        shards, total = self._scan(remove_stale=True)
        for _, size, p in sorted(shards):
            if total + reserve <= self.max_bytes:
                break
            self._remove_entry(p)
            total -= size

    def _remove_entry(self, path: str) -> None:
        """The shard first, then its record: a reader that opened the shard before still finds the record."""
        _remove(path)
        _remove(self._record_path(path))


class _CacheTee(io.RawIOBase):
    """Pass bytes through while writing them to a partial file; publish it only when complete and verified.

    A failure to write (a full disk) drops the copy and lets the bytes pass on: the cache is never the reason a
    shard cannot be read.
    """

    def __init__(self, cache: ShardCache, url: str, stream: BinaryIO, size: int | None, sha256: str | None,
                 cancel: threading.Event | None = None):
        self.cache, self.url, self.stream = cache, url, stream
        self.size, self.sha256, self.cancel = size, sha256, cancel
        self.path = cache.path(url)
        self.partial = cache._partial(self.path)
        self.hash = hashlib.sha256() if sha256 else None
        self.written = 0
        self.out: io.BufferedWriter | None = None
        try:
            if size and size <= cache.max_bytes:
                cache.evict(reserve=size)  # room before the bytes arrive
            self.out = open(self.partial, "wb")
        except OSError as e:
            self._drop(e)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.stream.readinto(b)
        if self.out is None:
            return n
        if n:
            view = memoryview(b)[:n]
            try:
                self.out.write(view)
            except OSError as e:
                self._drop(e)
                return n
            self.written += n
            if self.hash is not None:
                self.hash.update(view)
        else:
            self._finish()
        return n

    def _finish(self) -> None:
        """At the end of the stream: publish the copy if it is what the manifest describes, else raise."""
        out, self.out = self.out, None
        wrong = None
        if self.size is not None and self.written != self.size:
            wrong = f"{self.written} bytes, the manifest says {self.size}"
        elif self.hash is not None and self.hash.hexdigest() != self.sha256:
            wrong = f"sha256 {self.hash.hexdigest()[:16]}..., the manifest says {self.sha256[:16]}..."
        if wrong is not None:
            out.close()
            _remove(self.partial)
            raise FetchError(f"{redact(self.url)}: the shard read does not match the manifest ({wrong}); not cached",
                             reason="checksum")
        try:
            self.cache._publish(self.path, self.partial, out, self.sha256)
        except OSError as e:
            out.close()
            self._drop(e)

    def _drop(self, error: OSError) -> None:
        """Stop copying (the bytes still pass through) and remove what was written."""
        if self.out is not None:
            with contextlib.suppress(OSError):
                self.out.close()
            self.out = None
        _remove(self.partial)
        log.warning("shard cache: %s not cached: %s", redact(self.url), error)

    def close(self) -> None:
        if self.out is not None and not self.closed:
            self._read_tail()
        if self.out is not None:  # not read to the end: never publish a partial shard
            self.out.close()
            self.out = None
            _remove(self.partial)
        self.stream.close()
        super().close()

    def _read_tail(self) -> None:
        """A tar reader stops at the end-of-archive block and leaves the padding after it (up to 10 KiB from tar
        and GNU tar): read that little so that the whole shard is kept. Only a small tail, and without retries
        (``cancel`` set): it is worth a copy, not a wait; a tail that fails leaves the shard uncached."""
        left = TRAILER_BYTES if self.size is None else self.size - self.written
        if left > TRAILER_BYTES:
            return
        if self.cancel is not None:
            self.cancel.set()
        buf = bytearray(64 << 10)
        try:
            while self.out is not None and left >= 0:
                n = self.readinto(buf)  # publishes at the end of the stream (a mismatch raises "checksum")
                if not n:
                    return
                left -= n
        except Exception as e:  # noqa: BLE001 - the transfer of a tail nobody reads: the copy is dropped
            if getattr(e, "reason", None) == "checksum":
                raise
            log.debug("shard cache: %s not cached: its tail did not arrive (%s)", redact(self.url), e)


__all__ = ["STALE_PARTIAL_S", "ShardCache"]
