"""The shard cache behind ``vs.fetch(cache=..., cache_bytes=...)``: whole shards on local disk for later epochs."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from typing import BinaryIO


class ShardCache:
    """Whole shards kept on local disk, named by a hash of the URL (never by its text), evicted LRU."""

    def __init__(self, folder: str, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        os.makedirs(folder, exist_ok=True)

    def path(self, url: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(url.encode()).hexdigest() + ".tar")

    def get(self, url: str) -> str | None:
        p = self.path(url)
        if os.path.exists(p):
            os.utime(p)  # recency for LRU
            return p
        return None

    def tee(self, url: str, stream: BinaryIO) -> BinaryIO:
        return _CacheTee(self, url, stream)

    def evict(self) -> None:
        entries = []
        for name in os.listdir(self.folder):
            if name.endswith(".tar"):
                st = os.stat(os.path.join(self.folder, name))
                entries.append((st.st_mtime, st.st_size, name))
        total = sum(e[1] for e in entries)
        for _, size, name in sorted(entries):
            if total <= self.max_bytes:
                break
            try:
                os.remove(os.path.join(self.folder, name))
            except FileNotFoundError:
                pass
            total -= size


class _CacheTee(io.RawIOBase):
    """Pass bytes through while writing them to a temp file; publish it atomically only when complete."""

    def __init__(self, cache: ShardCache, url: str, stream: BinaryIO):
        self.cache, self.url, self.stream = cache, url, stream
        self.tmp = f"{cache.path(url)}.part{os.getpid()}.{threading.get_ident()}"
        self.out = open(self.tmp, "wb")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.stream.readinto(b)
        if n:
            self.out.write(memoryview(b)[:n])
        elif self.out is not None:
            self.out.close()
            self.out = None
            os.replace(self.tmp, self.cache.path(self.url))
            self.cache.evict()
        return n

    def close(self) -> None:
        if self.out is not None:  # not read to the end: never publish a partial shard
            self.out.close()
            self.out = None
            os.remove(self.tmp)
        self.stream.close()
        super().close()

