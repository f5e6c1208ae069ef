"""`vs.shards(spec)`: resolve a shard list once, then hand each epoch's order to the rest of the chain.

Specs: a brace pattern (`shard-{000000..000127}.tar`, local or URL), a list, a local glob, a manifest
(`index.json`, local or over HTTP) or `hf://datasets/ORG/NAME[@REV]/PATTERN` (through huggingface_hub).
Resolution happens once, where the pipeline is built; DataLoader workers get the resolved list with the
pipeline and never list again. Ranks on one machine share one listing through an on-disk cache.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import random
import time
from typing import Any, Iterator, Mapping, Sequence

import braceexpand

from ..core.partition import epoch_order
from ..core.stage import SOURCE, Context, ShardTask
from ..dataset.format import ShardInfo, parse_manifest
from ..errors import FormatError, redact, redact_spec
from ..io.hub import list_hf, read_hf_file
from ..io.patterns import fixed_prefix, glob_match, has_glob
from ..io.store import DEFAULT_STORES, Stores, is_store_url, list_objects
from ..io.urls import open_url, resolve_entry


def _from_manifest(url: str, data: bytes, allowed_hosts: Sequence[str] = ()) -> list[ShardInfo]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{redact(url)}: invalid manifest JSON: {e}") from None
    return [ShardInfo(resolve_entry(url, s.url, allowed_hosts), s.samples, s.bytes, s.sha256)
            for s in parse_manifest(doc, redact(url))]


def resolve(spec: str | Sequence[str], *, opener=None, hf_token: str | bool | None = None,
            allowed_hosts: Sequence[str] = (), stores: Stores | None = None) -> list[ShardInfo]:
    """Turn a spec into the shard list; every form but plain lists may do I/O (once). ``allowed_hosts``: hosts
    besides its own that a remote manifest may name shards on (see `io.urls.resolve_entry`); ``stores``: the
    object stores' settings beside the environment's."""
    if not isinstance(spec, str):
        return [ShardInfo(u) for s in spec for u in braceexpand.braceexpand(s)]
    if is_store_url(spec):
        return _resolve_store(spec, stores or DEFAULT_STORES, allowed_hosts)
    if spec.startswith("hf://"):
        if spec.endswith(".json"):
            url, data = read_hf_file(spec, hf_token)  # relative shard URLs: same repo, same commit
            return _from_manifest(url, data, allowed_hosts)
        return [ShardInfo(u) for u in list_hf(spec, hf_token)]
    if spec.endswith(".json"):
        if "://" in spec:
            with (opener or open_url)(spec) as f:
                data = f.read()
        else:
            with open(spec, "rb") as f:
                data = f.read()
        return _from_manifest(spec, data, allowed_hosts)
    urls = list(braceexpand.braceexpand(spec))
    if "://" not in spec and any(c in spec for c in "*?["):
        urls = sorted(p for u in urls for p in glob.glob(u))
    return [ShardInfo(u) for u in urls]


def _resolve_store(spec: str, stores: Stores, allowed_hosts: Sequence[str]) -> list[ShardInfo]:
    """A manifest in a bucket (one GET), or a brace pattern of keys where globs are matched against one listing
    per fixed prefix (one LIST, paged); plain keys are taken as named, with no request."""
    if spec.endswith(".json"):
        with open_url(spec, stores=stores) as f:
            return _from_manifest(spec, f.read(), allowed_hosts)
    urls = list(braceexpand.braceexpand(spec))
    if not any(has_glob(u) for u in urls):
        return [ShardInfo(u) for u in urls]
    out, listed = [], {}
    for u in urls:
        if not has_glob(u):
            out.append(ShardInfo(u))
            continue
        prefix = fixed_prefix(u)
        if prefix not in listed:
            listed[prefix] = list(list_objects(prefix, stores))
        out += [ShardInfo(url, bytes=size) for url, size, _ in listed[prefix] if glob_match(url, u)]
    return sorted(out, key=lambda s: s.url)


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


__all__ = ["cached_resolve", "resolve", "shards"]
