"""`vs.fetch()`: shard tasks in, open shards out: local files, http(s) and hf:// as streams, surviving a flaky
network (io/http.py), read ahead by a background thread (io/readahead.py), kept between epochs in a local
cache (io/cache.py). docs/ERRORS.md states what is retried, refused and redacted.
"""

from __future__ import annotations

import dataclasses
import io
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Mapping

from ..core.stage import OPENER, Context, OpenShard, ShardTask, as_task
from ..errors import ErrorCounts, FetchError, check_policy, handle
from ..io.cache import ShardCache
from ..io.http import FetchOptions, HTTPClient, TransferStats, clean_headers
from ..io.readahead import read_ahead
from ..io.store import DEFAULT_STORES, Stores
from ..io.urls import open_url


@dataclass
class FetchStats(TransferStats, ErrorCounts):
    """Counts of one fetch stage (per DataLoader worker); ``skipped`` counts shards given up, by reason."""

    cache_hits: int = 0
    shards: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: v.copy() if isinstance(v, (dict, list)) else v for k, v in self.__dict__.items()}


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
    """The opener: `ShardTask`s in, `OpenShard`s (the task and its binary stream) out, opened in order.

    ``prefetch``: shards read ahead in a background thread (0: none), holding at most ``prefetch_bytes``.
    ``cache``: a folder keeping whole shards for later epochs, bounded by ``cache_bytes`` (LRU), checked against
    the manifest and its own records (io/cache.py); folders may be shared by processes.
    ``headers``: sent with each HTTP request to the shard URL's own origin (auth; never after a redirect to
    another scheme, host or port, nor to an object store), stripped and checked here; the HF token is taken from
    huggingface_hub's usual places for hf:// URLs. Neither ever appears in errors, stats or state.
    ``storage_options``: settings of the object stores (s3://, gs://, az://) beside the environment's; each
    request to a store is signed as it is sent (io/store.py) and then read as HTTP is.
    ``on_error``: a shard that cannot be read (retries exhausted, HTTP 404, ...) raises ``FetchError``
    ("raise"), or is skipped and counted in ``stats`` with the samples lost ("skip"; "warn" also logs). The
    reader downstream (`tar_samples`) reports how far it got, so samples already delivered stay delivered
    and the rest of the shard is counted from the manifest. A refused ``pipe:`` URL always raises.
    """

    role = OPENER

    def __init__(self, *, prefetch: int = 2, prefetch_bytes: int = 32 << 20, cache: str | None = None,
                 cache_bytes: int = 50 << 30, allow_pipe: bool = False, headers: Mapping[str, str] | None = None,
                 hf_token: str | bool | None = None, options: FetchOptions | None = None, on_error: str = "raise",
                 storage_options: Mapping[str, Any] | None = None):
        self.on_error = check_policy(on_error)
        opts = options or FetchOptions()
        # checked here, where the pipeline is built, rather than at the first request
        self.opts = dataclasses.replace(opts, headers=clean_headers({**opts.headers, **(headers or {})}))
        self.prefetch, self.prefetch_bytes = prefetch, prefetch_bytes
        self.cache = ShardCache(cache, cache_bytes) if cache else None
        self.allow_pipe, self.hf_token = allow_pipe, hf_token
        self.stores = Stores(storage_options) if storage_options else DEFAULT_STORES
        self.stats = FetchStats()
        self.ctx = Context()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["stats"] = FetchStats()  # each worker counts its own
        return state

    def bind(self, ctx: Context) -> None:
        self.ctx = ctx

    def open(self, task: ShardTask, client: HTTPClient | None = None, buffer_size: int | None = None,
             cancel: threading.Event | None = None) -> BinaryIO:
        """The task's stream, buffered by ``buffer_size`` (default: a chunk, for a tar reader reading it directly;
        0: unbuffered, for the read-ahead thread, see `open_url`)."""
        task = as_task(task)
        url = task.url
        client = client or HTTPClient(self.opts, self.stats)
        buffer_size = self.opts.chunk if buffer_size is None else buffer_size
        if self.ctx.num_workers > 1 and not task.worker_split and not task.resampled:
            raise ValueError(f"{self.ctx.num_workers} DataLoader workers would each read every shard: "
                             "add vs.split_by_worker() before vs.fetch()")
        start = task.start_offset  # resuming inside a shard, or reading samples by reference
        if self.cache is not None:  # checked against the manifest's size and sha256 where it gives them
            f = self.cache.open(url, task.bytes, task.sha256, buffer_size)
            if f is not None:
                self.stats.cache_hits += 1
                f.seek(start)
                return f
        caching = self.cache is not None and "://" in url and not start
        if caching and cancel is None:
            cancel = threading.Event()  # the cache's tail read at close retries nothing
        f = open_url(url, client=client, allow_pipe=self.allow_pipe, hf_token=self.hf_token,
                     buffer_size=buffer_size, start=start, cancel=cancel, stores=self.stores)
        self.stats.shards += 1
        if caching:
            tee = self.cache.tee(url, f, task.bytes, task.sha256, cancel)
            return io.BufferedReader(tee, buffer_size) if buffer_size else tee
        return f

    def shard_failed(self, error: BaseException, lost: int | None) -> None:
        """Called by the reader when a shard's stream fails for good: apply ``on_error`` (``lost``: the
        samples of this slot's share of the shard not delivered, None when the manifest does not say)."""
        if self.on_error == "raise" or getattr(error, "reason", None) == "pipe_refused":
            raise error
        note = f" (shard skipped, {'an unknown number of' if lost is None else lost} samples lost)"
        handle(self.on_error, error, self.stats, "fetch", lost, note)

    def _out(self, task: ShardTask, stream: BinaryIO) -> OpenShard:
        # the reader calls shard_failed with how many samples were lost
        return OpenShard(task, stream, None if self.on_error == "raise" else self.shard_failed)

    def __call__(self, tasks: Iterator[ShardTask]) -> Iterator[OpenShard]:
        """Tasks (or mappings with a ``"url"``, as webdataset's items) in, open shards out."""
        client = HTTPClient(self.opts, self.stats)
        tasks = map(as_task, tasks)
        if self.prefetch <= 0:
            for task in tasks:
                try:
                    stream = self.open(task, client)
                except FetchError as e:
                    if self.on_error == "raise" or e.reason == "pipe_refused":
                        raise
                    stream = _Failed(e)
                yield self._out(task, stream)
            return
        opened = read_ahead(tasks, lambda task, cancel: self.open(task, client, 0, cancel), prefetch=self.prefetch,
                            budget_bytes=self.prefetch_bytes, chunk=self.opts.chunk)
        try:
            for task, stream in opened:
                yield self._out(task, stream)
        finally:
            opened.close()  # stops the thread, closes what it opened for no one


__all__ = ["FetchStats", "fetch"]
