"""Who reads what: the maths of splitting shards over ranks and workers, as pure functions.

Shard i of an epoch's order goes to rank ``i % world_size``; of that rank's shards, every ``num_workers``-th
goes to one worker. Strided slices compose, so the (rank, worker) slots partition the epoch exactly once,
and every rank can compute every other rank's share (for equal per-rank counts) without talking to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

import numpy as np

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
