"""Who reads what: the maths of splitting shards over ranks and workers and of sharing counts, as pure functions.

Shard i of an epoch's order goes to rank ``i % world_size``; of that rank's shards, every ``num_workers``-th
goes to one worker. Strided slices compose, so the (rank, worker) slots partition the epoch exactly once,
and every rank can compute every other rank's share (for equal per-rank counts) without talking to it.
Tested apart from any I/O (tests/test_partition.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
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


def kept(samples: int, offset: int, step: int) -> int:
    """How many of a shard's ``samples`` indexes i have i % step == offset."""
    return samples // step + (offset < samples % step)


def equal_quota(counts: Sequence[int], policy: str) -> int:
    """The number of samples every rank yields so that DDP ranks take the same number of steps."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
    if not counts:
        return 0
    return max(counts) if policy == PAD else min(counts)


def shares(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` shared in proportion to ``weights``, exactly: floors, then the remainder one by one to the
    largest fractional parts (ties to the lower index). Integer weights (samples a worker holds) and float
    weights (proportions) alike, computed in exact fractions, so the shares always sum to ``total``.

    With integer weights no share exceeds its weight when ``total`` does not exceed their sum (a rank dropping
    samples never asks a worker for more than it holds); a zero weight gets nothing unless all are zero."""
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    exact = [Fraction(w) for w in weights]
    whole = sum(exact)
    if whole == 0:
        if total:
            raise ValueError(f"cannot share {total} by weights {list(weights)} that sum to 0")
        return [0] * len(weights)
    parts = [total * w / whole for w in exact]
    out = [math.floor(p) for p in parts]
    order = sorted(range(len(parts)), key=lambda i: (-(parts[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


__all__ = ["DROP", "PAD", "POLICIES", "SampleSlice", "check_enough_shards", "epoch_order", "equal_quota", "kept",
           "sample_slices", "shares", "slot_items", "strided"]
