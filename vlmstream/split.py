"""Who reads what: the maths of splitting shards over ranks and workers, as pure functions.

Shard i of an epoch's order goes to rank ``i % world_size``; of that rank's shards, every ``num_workers``-th
goes to one worker. Strided slices compose, so the (rank, worker) slots partition the epoch exactly once,
and every rank can compute every other rank's share (for equal per-rank counts) without talking to it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, TypeVar

import numpy as np

from .errors import redact
from .pipeline import Context

T = TypeVar("T")

PAD = "pad"  # ranks with fewer samples repeat some of theirs up to the largest count
DROP = "drop"  # ranks with more samples stop at the smallest count
POLICIES = (PAD, DROP)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of n items in an epoch: the same on every rank and worker, different each epoch."""
    if not shuffle:
        return list(range(n))
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(n).tolist()


def strided(items: Sequence[T], index: int, count: int) -> list[T]:
    """Items index, index+count, ...: one of `count` disjoint slices that together cover `items`."""
    if not 0 <= index < count:
        raise ValueError(f"index {index} out of range for {count} parts")
    return list(items[index::count])


def slot_items(items: Sequence[T], rank: int, world_size: int, worker: int, num_workers: int) -> list[T]:
    """What one (rank, worker) slot reads: split by node, then by worker."""
    return strided(strided(items, rank, world_size), worker, num_workers)


def check_enough_shards(num_shards: int, world_size: int, num_workers: int) -> None:
    """A slot with no shard would idle silently and skew DDP; say so instead."""
    slots = world_size * num_workers
    if num_shards < slots:
        raise ValueError(
            f"{num_shards} shards for {world_size} ranks x {num_workers} workers = {slots} readers: some would "
            f"get nothing. Use fewer workers, more (smaller) shards, or sample-level splitting "
            f"(split_by_worker(samples=True))"
        )


@dataclass(frozen=True)
class SampleSlice:
    """Read one shard, keep samples whose index % step == offset (sample-level splitting)."""

    shard: int
    offset: int
    step: int


def sample_slices(num_shards: int, slot: int, num_slots: int) -> list[SampleSlice]:
    """Sample-level split for fewer shards than slots: each shard is read by several slots, each keeping
    every m-th sample. With at least as many shards as slots this degrades to whole shards (step 1)."""
    if num_shards >= num_slots:
        return [SampleSlice(s, 0, 1) for s in range(slot, num_shards, num_slots)]
    shard = slot % num_shards
    readers = [s for s in range(num_slots) if s % num_shards == shard]
    return [SampleSlice(shard, readers.index(slot), len(readers))]


def equal_quota(counts: Sequence[int], policy: str) -> int:
    """The number of samples every rank yields so that DDP ranks take the same number of steps."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
    if not counts:
        return 0
    return max(counts) if policy == PAD else min(counts)


def split_quota(quota: int, counts: Sequence[int]) -> list[int]:
    """Share a rank's quota among its workers in proportion to what each holds, exactly summing to quota.

    With DROP (quota <= sum) no worker gets more than it holds; with PAD the surplus goes where samples are.
    """
    total = sum(counts)
    if total == 0:
        if quota:
            raise ValueError(f"cannot yield {quota} samples from no samples")
        return [0] * len(counts)
    shares = [quota * c // total for c in counts]
    # Hand out the rounding remainder, largest fractional part first, ties to the lower index.
    order = sorted(range(len(counts)), key=lambda i: (-(quota * counts[i] % total), i))
    for i in order[: quota - sum(shares)]:
        shares[i] += 1
    return shares


# --------------------------------------------------------------------------------------------------- stages


def _compose(item: dict[str, Any], part: SampleSlice) -> dict[str, Any]:
    """Narrow an item's sample filter: keep index % step == offset, then every part.step-th of those."""
    off, step = item.get("sample_offset", 0), item.get("sample_step", 1)
    return {**item, "sample_offset": off + part.offset * step, "sample_step": step * part.step}


def _split(items: list[dict[str, Any]], part: int, parts: int, samples: bool, what: str) -> list[dict[str, Any]]:
    if items and items[0].get("resumed"):  # the rest of an epoch resumed on another topology: may run short
        return strided(items, part, parts)
    if len(items) >= parts or not samples:
        if len(items) < parts:
            raise ValueError(
                f"{len(items)} shards for {parts} {what}: some would get nothing. Use fewer {what}, more "
                f"(smaller) shards, or sample-level splitting (samples=True)"
            )
        return strided(items, part, parts)
    return [_compose(items[s.shard], s) for s in sample_slices(len(items), part, parts)]


def _known_samples(items: Sequence[dict[str, Any]]) -> list[int]:
    counts = [it.get("samples") for it in items]
    if any(c is None for c in counts):
        raise ValueError("equal per-rank counts need each shard's sample count: give the shards as a manifest")
    return [c // it.get("sample_step", 1) + (it.get("sample_offset", 0) < c % it.get("sample_step", 1))
            for c, it in zip(counts, items)]


def _finite(it: Iterator[dict[str, Any]]) -> tuple[list[dict[str, Any]] | None, Iterator[dict[str, Any]]]:
    """The whole shard list, or (None, the stream) when the source is resampled and endless."""
    it = iter(it)
    first = next(it, None)
    if first is None:
        return [], iter(())
    if first.get("resampled"):
        return None, itertools.chain([first], it)
    return [first, *it], iter(())


def _pad(items: list[dict[str, Any]], quota: int) -> list[dict[str, Any]]:
    """Append repeats of these shards (marked "padding") until they hold at least `quota` samples."""
    have = sum(_known_samples(items))
    out = list(items)
    k = 0
    while have < quota and items:
        extra = {**items[k % len(items)], "padding": True}
        out.append(extra)
        have += _known_samples([extra])[0]
        k += 1
    return out


class split_by_node:
    """Keep this rank's shards. Rank and world size come from the pipeline; given here, the pipeline adopts them.

    ``equalize="pad"|"drop"`` makes every rank yield the same number of samples (needs a manifest's counts):
    ranks with fewer repeat samples ("pad"), or ranks with more stop early ("drop"); counted in the stats.
    ``samples=True`` allows fewer shards than ranks: such shards are read by several ranks, each keeping
    every n-th sample.
    """

    def __init__(self, rank: int | None = None, world_size: int | None = None, *,
                 equalize: str | None = None, samples: bool = False):
        if equalize is not None:
            equal_quota([], equalize)  # validates the policy name
        if (rank is None) != (world_size is None):
            raise ValueError(f"split_by_node: give rank and world_size together (got rank={rank}, "
                             f"world_size={world_size})")
        if rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"split_by_node: rank {rank} out of range for world_size {world_size}")
        self.rank, self.world_size, self.equalize, self.samples = rank, world_size, equalize, samples
        self.ctx = Context() if rank is None else Context(rank=rank, world_size=world_size)

    def declared_topology(self) -> tuple[int, int] | None:
        """Rank and world size given here: the pipeline adopts them for every stage and for its checkpoints."""
        return None if self.rank is None else (self.rank, self.world_size)

    def bind(self, ctx: Context) -> None:
        self.ctx = ctx

    def where(self) -> tuple[int, int]:
        return self.ctx.rank, self.ctx.world_size

    def __call__(self, it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        items, endless = _finite(it)
        if items is None:  # resampled: every slot draws on its own, nothing to split
            yield from endless
            return
        rank, world = self.where()
        mine = _split(items, rank, world, self.samples, "ranks")
        if self.equalize is not None and not (items and items[0].get("resumed")):
            totals = [sum(_known_samples(_split(items, r, world, self.samples, "ranks"))) for r in range(world)]
            quota = equal_quota(totals, self.equalize)
            total = sum(_known_samples(mine))
            mine = [{**m, "quota": quota, "slot_total": total} for m in _pad(mine, quota)]
        yield from ({**m, "node_split": True} for m in mine)


class split_by_worker:
    """Keep this DataLoader worker's shards (of this rank's). ``samples=True`` as in split_by_node."""

    def __init__(self, *, samples: bool = False):
        self.samples = samples
        self.ctx = Context()

    def bind(self, ctx: Context) -> None:
        self.ctx = ctx

    def __call__(self, it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        items, endless = _finite(it)
        if items is None:
            yield from endless
            return
        w, n = self.ctx.worker, self.ctx.num_workers
        # The node stage's padding is for a rank read by one worker; with several, each pads its own share.
        real = [i for i in items if not i.get("padding")]
        mine = _split(real, w, n, self.samples, "workers of this rank")
        if real and "quota" in real[0]:
            # Shares in proportion to real samples: each is >= what the worker holds when padding, <= when dropping.
            per_worker = [sum(_known_samples(_split(real, k, n, self.samples, "workers"))) for k in range(n)]
            quota = split_quota(real[0]["quota"], per_worker)[w]
            total = sum(_known_samples(mine))
            mine = [{**m, "quota": quota, "slot_total": total} for m in _pad(mine, quota)]
        yield from ({**m, "worker_split": True} for m in mine)


class take:
    """Stop after n items per rank, shared evenly among DataLoader workers (e.g. batches per epoch in
    resampled, endless mode, so that every rank takes the same number of steps)."""

    def __init__(self, n: int):
        self.n = n
        self.ctx = Context()

    def bind(self, ctx: Context) -> None:
        self.ctx = ctx

    def __call__(self, it: Iterator[Any]) -> Iterator[Any]:
        w, workers = self.ctx.worker, self.ctx.num_workers
        share = self.n // workers + (w < self.n % workers)
        for i, x in enumerate(it):
            if i >= share:
                return
            yield x


@dataclass
class QuotaStats:
    padded: int = 0  # samples yielded a second time so that this slot reaches its quota
    dropped: int = 0  # samples of this slot's shards left out so that it stops at its quota
    unread: int = 0  # samples of this slot's shards lost to errors skipped under on_error (not in `dropped`)


@dataclass
class SlotCursor:
    """How far a slot got: the resume point a checkpoint records (small: a few numbers, a key and a URL)."""

    item: int = 0  # items of the slot's list finished
    index: int | None = None  # __index__ of the last sample yielded from the current item
    offset: int | None = None  # that sample's __offset__
    key: str | None = None  # its __key__: checked where the resumed reader meets it again
    url: str | None = None  # its shard, redacted: checked against the item the resumed slot holds there
    count: int = 0  # samples yielded so far (the quota counts these)
    real: int = 0  # of which not padding

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resume_items(items: Iterator[dict[str, Any]], cursor: SlotCursor) -> Iterator[dict[str, Any]]:
    """Skip the items a slot finished, and start its current item just after the last sample it yielded:
    at that sample's byte offset (a seek or a Range request), not from the start of the shard."""
    for k, item in enumerate(items):
        if k < cursor.item:
            continue
        if k == cursor.item and cursor.index is not None:
            if redact(item["url"]) != cursor.url:  # never read at an offset that belongs to another shard
                raise ValueError(f"checkpoint: the slot's item {k} is {redact(item['url'])}, but its cursor is in "
                                 f"{cursor.url}: the state does not fit these shards")
            item = {**item, "skip_through": cursor.index, "skip_key": cursor.key}
            compressed = item["url"].endswith((".gz", ".tgz"))  # offsets are uncompressed: re-read and skip
            if "refs" not in item and not compressed:
                item.update(start_offset=cursor.offset, start_index=cursor.index)
        yield item


def slot_samples(items: Iterator[dict[str, Any]], read: Any, stats: QuotaStats | None = None,
                 cursor: SlotCursor | None = None) -> Iterator[Any]:
    """Samples of the shard items this slot holds: each item's sample filter applied, and the slot's
    quota (equal per-rank counts) enforced. `read(item)` yields the samples of one shard item.
    `cursor` is kept up to date before each sample is yielded (and says where to resume)."""
    stats = stats if stats is not None else QuotaStats()
    cursor = cursor if cursor is not None else SlotCursor()
    quota = total = None
    for item in items:
        quota, total = item.get("quota"), item.get("slot_total")
        if quota is not None and cursor.count >= quota:
            break  # the shards left are never opened
        off, step, padding = item.get("sample_offset", 0), item.get("sample_step", 1), item.get("padding", False)
        samples = read(item)
        try:
            for sample in samples:
                if step > 1 and sample["__index__"] % step != off:
                    continue
                cursor.index, cursor.offset = sample["__index__"], sample["__offset__"]
                cursor.key, cursor.url = sample.get("__key__"), sample.get("__url__")
                cursor.count += 1
                cursor.real += not padding
                stats.padded += padding
                yield sample
                if quota is not None and cursor.count >= quota:
                    break
        finally:
            close = getattr(samples, "close", None)
            if close is not None:
                close()
        cursor.item += 1
        cursor.index = cursor.offset = cursor.key = cursor.url = None
    if quota is not None and total is not None:
        stats.dropped += max(0, total - cursor.real - stats.unread)  # from the manifest, never silent
