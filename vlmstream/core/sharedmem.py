"""Shared memory for batches leaving DataLoader workers: one segment per batch, recycled, sent by reference.

A tensor leaving a DataLoader worker travels through shared memory: torch moves each storage into a new segment
and the training process maps it, one file-descriptor handoff per storage. Both halves are expensive here. New
shared pages: the kernel allocates and zeroes each 4 KiB page on first touch (8 ms to stack a batch of 32 images
of 3x224x224 into a new segment on the 2-core benchmark machine, 0.6 ms into ordinary memory). The handoff: with
fork, multiprocessing passes each descriptor over a fresh authenticated connection to a listener thread in the
worker, then the training process maps and later unmaps the segment (about 0.5 ms of the training process's CPU
and 1.7 ms of the worker's per batch, measured). So a worker copies all of a batch's tensors into one segment,
and under `vs.Loader`:

- the training process keeps the segments it has seen mapped, so a batch travels as its segment's number plus
  each tensor's place (offset, dtype, shape): the descriptor crosses once per segment, not once per batch;
- it hands a segment back to its worker once the last tensor of the batch is freed (a finalizer on the object
  the batch's tensors view the segment through, a pipe per worker); the worker refills it instead of asking the
  kernel for new pages. A batch the user keeps is never overwritten: only freed segments come back.

Under a plain torch DataLoader (no way back) every batch still leaves in one segment of its own, as views.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import os
import threading
import weakref
from multiprocessing.connection import Connection
from typing import Any, Iterator

import numpy as np
import torch

ALIGN = 64  # bytes: every tensor in a segment starts on a cache line (and on any dtype's alignment)
HEADROOM = 4  # a recycled segment is 1/HEADROOM larger than the batch it was made for
KEEP_FREE = 2  # free segments a worker keeps for reuse (in a steady stream one comes back as each batch is made)
MAX_IN_FLIGHT = 64  # segments a worker remembers as out: the rest are forgotten (freed when the user frees them)
SHM_KEY = "__shm__"  # the batch's shipment: where its tensors are in which segment (removed by vs.Loader)

Path = tuple  # keys and indexes from a batch's root to one of its tensors


def _round(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _packable(t: torch.Tensor) -> bool:
    """Dense CPU tensors; anything else (sparse, quantized, on a device) travels the way torch sends it."""
    return t.layout == torch.strided and t.device.type == "cpu" and not t.is_quantized


def find_tensors(batch: Any) -> list[tuple[Path, torch.Tensor]]:
    """(path, tensor) for every packable tensor of a batch, through dicts, lists and tuples, in one walk;
    metadata keys (``__*``) are not entered. Leaves are passed over without building their paths: a batch's
    conversations can hold hundreds of strings."""
    if isinstance(batch, torch.Tensor):
        return [((), batch)] if _packable(batch) else []
    found: list[tuple[Path, torch.Tensor]] = []
    todo: list[tuple[Path, Any]] = [((), batch)]
    while todo:
        path, x = todo.pop()
        if isinstance(x, dict):
            items: Any = ((k, v) for k, v in x.items() if not (isinstance(k, str) and k.startswith("__")))
        elif isinstance(x, (list, tuple)):
            items = enumerate(x)
        else:
            continue
        for k, v in items:
            if isinstance(v, torch.Tensor):
                if _packable(v):
                    found.append((path + (k,), v))
            elif isinstance(v, (dict, list, tuple)):
                todo.append((path + (k,), v))
    return found


def put(root: Any, values: list[tuple[Path, Any]]) -> Any:
    """A copy of ``root`` with each value at its path: only the dicts, lists and tuples on those paths are new
    (namedtuples and dict subclasses keep their type); the batch a stage yielded is left as it was."""
    if len(values) == 1 and not values[0][0]:
        return values[0][1]
    by_key: dict[Any, list[tuple[Path, Any]]] = {}
    for path, value in values:
        by_key.setdefault(path[0], []).append((path[1:], value))
    new = list(root) if isinstance(root, tuple) else copy.copy(root)
    for k, below in by_key.items():
        new[k] = put(root[k], below)
    if isinstance(root, tuple):
        return root._make(new) if hasattr(root, "_make") else type(root)(new)
    return new


def _layout(found: list[tuple[Path, torch.Tensor]], placed: dict[int, int], start: int
            ) -> tuple[dict[int, tuple[torch.Tensor, int]], int]:
    """Offsets from ``start`` for the distinct tensors not already placed (a tensor met twice is placed once),
    and the end of the last."""
    copies: dict[int, tuple[torch.Tensor, int]] = {}
    end = start
    for _, t in found:
        if id(t) not in placed and id(t) not in copies:
            copies[id(t)] = (t, end)
            end += _round(t.nbytes)
    return copies, end


def _copy(segment: torch.UntypedStorage, copies: dict[int, tuple[torch.Tensor, int]]) -> None:
    with torch.no_grad():
        for t, offset in copies.values():
            torch.empty(0, dtype=t.dtype).set_(segment, offset // t.element_size(), t.shape).copy_(t)


class _Arena:
    """The segment reserved for the batch being made, and the spans handed out in it (byte offset, size)."""

    def __init__(self, slot: int, segment: torch.UntypedStorage):
        self.slot, self.segment, self.used = slot, segment, 0
        self.spans: list[tuple[int, int]] = []


class SegmentPool:
    """A worker's segments: refilled when the training process gives them back through ``returns`` (a pipe's
    reading end), new ones otherwise. Without ``returns`` every batch gets a new segment (still one per batch).

    With ``returns``, the pipeline's last stage can make its output tensors in place (`empty`): the next batch
    reserves a segment the size of the last one shipped, and what was made in it leaves without a copy.
    """

    def __init__(self, returns: Connection | None = None):
        self.returns = returns
        self.segments: dict[int, torch.UntypedStorage] = {}  # slot -> segment, in flight or free
        self.free: list[int] = []
        self.next_slot = 0
        self.allocated = 0  # segments asked of the kernel (what recycling saves)
        self.sent: set[int] = set()  # slots whose segment the training process has (sent once, by descriptor)
        self.retired: list[int] = []  # slots dropped here, not yet told to the training process
        self.arena: _Arena | None = None  # the segment the batch being made is placed in, if any
        self.expected = 0  # bytes of the last batch shipped: what the next one reserves

    def _collect(self) -> None:
        if self.returns is None:
            return
        try:
            while self.returns.poll():
                slot = int.from_bytes(self.returns.recv_bytes(), "little")
                if slot in self.segments:
                    self.free.append(slot)
        except (EOFError, OSError):  # the training process is gone or stopped giving back
            self.returns = None

    def _drop(self, slot: int) -> None:
        self.segments.pop(slot, None)
        if slot in self.free:
            self.free.remove(slot)
        if slot in self.sent:
            self.sent.discard(slot)
            self.retired.append(slot)

    def take(self, nbytes: int) -> tuple[int, torch.UntypedStorage]:
        """A segment of at least ``nbytes`` (at most twice that: a small batch does not pin a big segment), and
        its slot (-1: not recycled)."""
        self._collect()
        fits = [s for s in self.free if nbytes <= self.segments[s].nbytes() <= 2 * nbytes]
        if fits:
            slot = min(fits, key=lambda s: self.segments[s].nbytes())
            self.free.remove(slot)
            return slot, self.segments[slot]
        self.allocated += 1
        if self.returns is None:
            return -1, torch.UntypedStorage._new_shared(nbytes)
        # recycled: room for a batch a quarter larger than this one, so that batches of varying size (a VLM batch's
        # tiles) are made in place in it, not copied into yet another segment whose pages the kernel must zero
        segment = torch.UntypedStorage._new_shared(_round(nbytes + nbytes // HEADROOM))
        while len(self.free) >= KEEP_FREE:  # none fitted: let the oldest free one go
            self._drop(self.free.pop(0))
        if len(self.segments) - len(self.free) >= MAX_IN_FLIGHT:  # the user keeps batches: stop tracking one
            self._drop(next(s for s in self.segments if s not in self.free))
        slot, self.next_slot = self.next_slot, self.next_slot + 1
        self.segments[slot] = segment
        return slot, segment

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor for the batch being made, in the segment it will leave in when it fits the
        reservation (the last batch's size); in ordinary memory otherwise (it is then copied when shipped)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self.arena is None and self.expected and self.returns is not None:
            slot, segment = self.take(self.expected)
            self.arena = _Arena(slot, segment) if slot >= 0 else None
        arena = self.arena
        if arena is None or arena.used + nbytes > arena.segment.nbytes():
            return torch.empty(shape, dtype=dtype)
        offset, arena.used = arena.used, arena.used + _round(nbytes)
        arena.spans.append((offset, nbytes))
        return torch.empty(0, dtype=dtype).set_(arena.segment, offset // dtype.itemsize, shape)

    def _in_place(self, found: list[tuple[Path, torch.Tensor]], arena: _Arena) -> dict[int, int] | None:
        """Each tensor's offset in the arena when every span handed out there is one of the batch's tensors,
        contiguous and whole; None otherwise (something else holds arena memory: the arena is given up, never
        refilled, freed once its last view is)."""
        base = arena.segment.data_ptr()
        offsets = {id(t): t.data_ptr() - base for _, t in found
                   if t.untyped_storage().data_ptr() == base and t.is_contiguous()}
        covered = {(offsets[id(t)], t.nbytes) for _, t in found if id(t) in offsets}
        if all(span in covered for span in arena.spans):
            return offsets
        self._drop(arena.slot)
        return None

    def _fill(self, found: list[tuple[Path, torch.Tensor]]) -> tuple[int, torch.UntypedStorage, dict[int, int]] | None:
        """One segment holding each distinct tensor: its slot, the segment and each tensor's byte offset (by the
        tensor's id); None when there are no bytes to place. What was made in the arena stays there and the rest
        is copied after it; without an arena, or when the rest does not fit, everything goes to another segment."""
        arena, self.arena = self.arena, None
        placed = self._in_place(found, arena) if arena is not None else None
        if arena is not None and placed is not None:
            copies, end = _layout(found, placed, arena.used)
            if end <= arena.segment.nbytes():
                _copy(arena.segment, copies)
                self.expected = end
                return arena.slot, arena.segment, {**placed, **{k: off for k, (_, off) in copies.items()}}
            self._drop(arena.slot)  # too small for this batch: its tensors are copied with the rest
        copies, total = _layout(found, {}, 0)
        if total == 0:
            return None
        slot, segment = self.take(total)
        _copy(segment, copies)
        self.expected = total
        return slot, segment, {k: off for k, (_, off) in copies.items()}

    def pack(self, batch: Any) -> tuple[Any, int]:
        """The batch with its tensors replaced by views of one segment (metadata keys, ``__*``, left alone), and
        the segment's slot (-1: none to give back)."""
        found = find_tensors(batch)
        filled = self._fill(found)
        if filled is None:
            return batch, -1
        slot, segment, offsets = filled
        views: dict[int, torch.Tensor] = {}
        for _, t in found:
            if id(t) not in views:
                view = torch.empty(0, dtype=t.dtype).set_(segment, offsets[id(t)] // t.element_size(), t.shape)
                views[id(t)] = view.requires_grad_() if t.requires_grad else view
        return put(batch, [(path, views[id(t)]) for path, t in found]), slot

    def by_reference(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with its tensors in one recycled segment and, in their places, None: ``SHM_KEY`` says where
        each one is. The segment itself rides along the first time only (torch passes its descriptor)."""
        found = find_tensors(batch)
        filled = self._fill(found)
        if filled is None:
            return batch
        slot, segment, offsets = filled
        places = [(path, offsets[id(t)], t.dtype, tuple(t.shape), t.requires_grad) for path, t in found]
        batch = put(batch, [(path, None) for path, _ in found])
        new = slot not in self.sent
        self.sent.add(slot)
        batch[SHM_KEY] = (slot, segment if new else None, self.retired, places)
        self.retired = []
        return batch

    def ship(self, it: Iterator[Any]) -> Iterator[Any]:
        """Each output in one segment: by reference where it can come back (a dict, under vs.Loader), as views
        of a segment of its own otherwise."""
        for x in it:
            if self.returns is not None and isinstance(x, dict):
                yield self.by_reference(x)
            else:
                x, slot = self.pack(x)
                self.segments.pop(slot, None)  # nowhere to say which segment: not recycled
                yield x


class Returns:
    """The training process's side: the segments each worker has sent, a pipe per worker to give them back.

    `unpack` rebuilds a batch's tensors as views of its segment through one object per batch; a finalizer on that
    object gives the segment back when the last of them is freed (it may run in any thread)."""

    def __init__(self, workers: int, context: Any = None):
        ctx = multiprocessing.get_context(context) if context is None or isinstance(context, str) else context
        pairs = [ctx.Pipe(duplex=False) for _ in range(workers)]
        self.readers = [r for r, _ in pairs]  # travel into the workers with the pipeline
        self.writers = [w for _, w in pairs]
        for w in self.writers:
            os.set_blocking(w.fileno(), False)  # a full pipe (a stuck worker) never blocks training
        self.mapped: list[dict[int, np.ndarray]] = [{} for _ in range(workers)]  # worker -> slot -> its bytes
        self.lock = threading.Lock()
        self.given_back = 0

    def close_readers(self) -> None:
        """Once the workers started: they hold their own ends; a worker gone then means a broken pipe here."""
        for r in self.readers:
            r.close()

    def unpack(self, batch: dict[str, Any], worker: int) -> dict[str, Any]:
        shipment = batch.pop(SHM_KEY, None)
        if shipment is None:
            return batch
        slot, segment, retired, places = shipment
        mapped = self.mapped[worker]
        for s in retired:  # dropped by the worker: batches still alive keep their memory through their views
            mapped.pop(s, None)
        if segment is not None:
            mapped[slot] = torch.empty(0, dtype=torch.uint8).set_(segment).numpy()
        owner = mapped[slot].view()  # this batch's own handle on the segment: its tensors keep it alive
        tensors = []
        for path, offset, dtype, shape, requires_grad in places:
            n = math.prod(shape)
            t = torch.frombuffer(owner, dtype=dtype, count=n, offset=offset).view(shape) if n else \
                torch.empty(shape, dtype=dtype)
            tensors.append((path, t.requires_grad_() if requires_grad else t))
        weakref.finalize(owner, self._give_back, worker, slot)
        return put(batch, tensors)

    def _give_back(self, worker: int, slot: int) -> None:
        with self.lock:
            try:
                self.writers[worker].send_bytes(slot.to_bytes(8, "little"))  # one 12-byte write: atomic
                self.given_back += 1
            except (BlockingIOError, BrokenPipeError, OSError, ValueError):
                pass  # the worker ended (or stopped reading): the segment is simply freed


__all__ = ["Returns", "SegmentPool", "find_tensors", "put"]
