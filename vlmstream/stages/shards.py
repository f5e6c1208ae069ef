"""`vs.shards(spec)`: resolve a shard list once, then hand each epoch's order to the rest of the chain.

Specs: a brace pattern (`shard-{000000..000127}.tar`, local or URL), a list, a local glob, a manifest
(`index.json`, local or over HTTP) or `hf://datasets/ORG/NAME[@REV]/PATTERN` (through huggingface_hub).
Resolution (dataset/shardlist.py) happens once, where the pipeline is built; DataLoader workers get the resolved
list with the pipeline and never list again. Ranks on one machine share one listing through an on-disk cache.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import random
import time
from typing import Any, Iterator, Mapping, Sequence

from ..core.partition import epoch_order
from ..core.stage import SOURCE, Context, ShardTask
from ..dataset.format import ShardInfo
from ..dataset.shardlist import resolve
from ..errors import redact_spec
from ..io.store import Stores


def cached_resolve(spec: str | Sequence[str], cache_dir: str, ttl: float, **kwargs: Any) -> list[ShardInfo]:
    """Resolve through an on-disk cache shared by the processes of one machine.

    The first process to take the lock lists and writes the result atomically; the others wait on the lock
    and read it, so one machine makes one listing request however many ranks it runs.
    """
    os.makedirs(cache_dir, exist_ok=True)
    allowed = sorted(kwargs.get("allowed_hosts") or ())
    key = hashlib.sha256(json.dumps([spec, allowed] if allowed else spec, sort_keys=True).encode()).hexdigest()[:32]
    path = os.path.join(cache_dir, f"shards-{key}.json")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.exists(path) and time.time() - os.path.getmtime(path) < ttl:
                with open(path) as f:
                    return [ShardInfo(**d) for d in json.load(f)]
            out = resolve(spec, **kwargs)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump([s.__dict__ for s in out], f)
            os.replace(tmp, path)
            return out
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class shards:
    """The source stage: yields one `ShardTask` per shard, in this epoch's order.

    A task carries the shard's URL, its index in the resolved list and, from a manifest (None without one), its
    sample count, sha256 and size: the split stages count by them and `fetch` checks its cache by them.
    ``shuffle`` reorders shards each epoch from (seed, epoch); the seed defaults to the pipeline's.
    ``listing_cache``: a folder where ranks of one machine share the listing for ``listing_ttl`` seconds.
    ``resample=True``: endless; each (rank, worker) draws shards at random with replacement, seeded by
    (seed, epoch, rank, worker). For step-based training: end each epoch with ``vs.take(batches)``.
    ``allowed_hosts``: hosts besides its own that a remote manifest may name shards on ("host", "host:port"
    or "https://host"; for a manifest in a bucket, other buckets: "s3://bucket"); a shard anywhere else is
    refused when the list is resolved.
    ``storage_options``: settings of the object stores (s3://, gs://, az://) beside the environment's, as
    obstore names them (e.g. ``{"endpoint": ..., "region": ...}``); fetch takes the same for reading.
    """

    role = SOURCE

    def __init__(
        self,
        spec: str | Sequence[str],
        *,
        shuffle: bool = True,
        seed: int | None = None,
        listing_cache: str | None = None,
        listing_ttl: float = 3600.0,
        hf_token: str | bool | None = None,
        resample: bool = False,
        allowed_hosts: Sequence[str] = (),
        storage_options: Mapping[str, Any] | None = None,
    ):
        stores = Stores(storage_options) if storage_options else None
        kw = dict(hf_token=hf_token, allowed_hosts=allowed_hosts, stores=stores)
        if listing_cache is not None:
            self.specs = cached_resolve(spec, listing_cache, listing_ttl, **kw)
        else:
            self.specs = resolve(spec, **kw)
        if not self.specs:
            raise ValueError(f"no shards found for {redact_spec(spec)!r}")
        self.shuffle, self.seed, self.resample = shuffle, seed, resample
        self.ctx = Context()

    def __len__(self) -> int:
        return len(self.specs)

    def bind(self, ctx: Context) -> None:
        self.ctx = ctx

    def __call__(self, _: Iterator[Any] | None = None) -> Iterator[ShardTask]:
        c = self.ctx
        seed = c.seed if self.seed is None else self.seed
        n = len(self.specs)
        if self.resample:
            rng = random.Random(f"vlmstream.resample/{seed}/{c.epoch}/{c.rank}/{c.worker}")
            while True:
                yield dataclasses.replace(self.task(rng.randrange(n)), resampled=True)
        for i in epoch_order(n, seed, c.epoch, self.shuffle):
            yield self.task(i)

    def task(self, i: int) -> ShardTask:
        """The task of shard ``i`` of the resolved list, as this stage yields it."""
        s = self.specs[i]
        return ShardTask(s.url, shard=i, samples=s.samples, sha256=s.sha256, bytes=s.bytes, num_shards=len(self.specs))


__all__ = ["cached_resolve", "resolve", "shards"]  # resolve: dataset/shardlist.py, named here too
