"""`vs.split_by_node()`, `vs.split_by_worker()`, `vs.take(n)`: each slot's share of the epoch's shard tasks.

Thin stages around the pure maths of `core/partition.py`: rank r keeps every world_size-th task from r, worker
w every num_workers-th of those; with fewer shards than readers (``samples=True``) a shard is shared by
several readers, each keeping every n-th sample. ``equalize`` gives every rank the same sample count, each rank
computing every other rank's share from the manifest's counts, without communicating.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterator, Sequence

from ..core.partition import equal_quota, kept, sample_slices, shares, strided
from ..core.stage import Context, ShardTask


def _narrowed(task: ShardTask, offset: int, step: int) -> ShardTask:
    """Narrow a task's sample filter: keep index % step == offset, then every step-th of those."""
    return dataclasses.replace(task, sample_offset=task.sample_offset + offset * task.sample_step,
                               sample_step=task.sample_step * step)


def _split(tasks: list[ShardTask], part: int, parts: int, samples: bool, what: str) -> list[ShardTask]:
    if tasks and tasks[0].resumed:  # the rest of an epoch resumed on another topology: may run short
        return strided(tasks, part, parts)
    if len(tasks) >= parts or not samples:
        if len(tasks) < parts:
            raise ValueError(
                f"{len(tasks)} shards for {parts} {what}: some would get nothing. Use fewer {what}, more "
                f"(smaller) shards, or sample-level splitting (samples=True)"
            )
        return strided(tasks, part, parts)
    return [_narrowed(tasks[s.shard], s.offset, s.step) for s in sample_slices(len(tasks), part, parts)]


def known_samples(tasks: Sequence[ShardTask]) -> list[int]:
    """The samples each task keeps (its filter applied to the manifest's count)."""
    if any(t.samples is None for t in tasks):
        raise ValueError("equal per-rank counts need each shard's sample count: give the shards as a manifest")
    return [kept(t.samples, t.sample_offset, t.sample_step) for t in tasks]


def _finite(it: Iterator[ShardTask]) -> tuple[list[ShardTask] | None, Iterator[ShardTask]]:
    """The whole shard list, or (None, the stream) when the source is resampled and endless."""
    it = iter(it)
    first = next(it, None)
    if first is None:
        return [], iter(())
    if first.resampled:
        return None, itertools.chain([first], it)
    return [first, *it], iter(())


def _padded(tasks: list[ShardTask], quota: int) -> list[ShardTask]:
    """Append repeats of these shards (marked padding) until they hold at least `quota` samples."""
    have = sum(known_samples(tasks))
    out = list(tasks)
    k = 0
    while have < quota and tasks:
        extra = dataclasses.replace(tasks[k % len(tasks)], padding=True)
        out.append(extra)
        have += known_samples([extra])[0]
        k += 1
    return out


def _with_quota(mine: list[ShardTask], quota: int) -> list[ShardTask]:
    total = sum(known_samples(mine))
    return [dataclasses.replace(t, quota=quota, slot_total=total) for t in _padded(mine, quota)]


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

    def __call__(self, it: Iterator[ShardTask]) -> Iterator[ShardTask]:
        tasks, endless = _finite(it)
        if tasks is None:  # resampled: every slot draws on its own, nothing to split
            yield from endless
            return
        rank, world = self.ctx.rank, self.ctx.world_size
        mine = _split(tasks, rank, world, self.samples, "ranks")
        if self.equalize is not None and not (tasks and tasks[0].resumed):
            totals = [sum(known_samples(_split(tasks, r, world, self.samples, "ranks"))) for r in range(world)]
            mine = _with_quota(mine, equal_quota(totals, self.equalize))
        yield from mine


class split_by_worker:
    """Keep this DataLoader worker's shards (of this rank's). ``samples=True`` as in split_by_node."""

    def __init__(self, *, samples: bool = False):
        self.samples = samples
        self.ctx = Context()

    def bind(self, ctx: Context) -> None:
        self.ctx = ctx

    def __call__(self, it: Iterator[ShardTask]) -> Iterator[ShardTask]:
        tasks, endless = _finite(it)
        if tasks is None:
            yield from endless
            return
        w, n = self.ctx.worker, self.ctx.num_workers
        # The node stage's padding is for a rank read by one worker; with several, each pads its own share.
        real = [t for t in tasks if not t.padding]
        mine = _split(real, w, n, self.samples, "workers of this rank")
        if real and real[0].quota is not None:
            # Shares in proportion to real samples: each is >= what the worker holds when padding, <= when dropping.
            per_worker = [sum(known_samples(_split(real, k, n, self.samples, "workers"))) for k in range(n)]
            mine = _with_quota(mine, shares(real[0].quota, per_worker)[w])
        yield from (dataclasses.replace(t, worker_split=True) for t in mine)


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


__all__ = ["known_samples", "split_by_node", "split_by_worker", "take"]
