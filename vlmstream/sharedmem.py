"""Shared memory for batches leaving DataLoader workers: one segment per batch, recycled.

A tensor leaving a DataLoader worker travels through shared memory: torch moves each storage into a new segment
and the training process maps it, one file-descriptor handoff per storage. New shared pages are the expensive
part: the kernel allocates and zeroes each 4 KiB page on first touch. Measured on the 2-core benchmark machine:
8 ms to stack a batch of 32 images of 3x224x224 into a new segment, 0.6 ms into ordinary memory, i.e. 0.23 ms a
sample, a seventh of the 224 job's CPU time. So a worker copies all of a batch's tensors into one segment (one
segment however many tensors: a VLM batch has one per image; torch still passes a descriptor per tensor, which
is cheap), and under `vs.Loader` the training process hands a segment back to its worker once the last tensor
viewing it is freed; the worker refills it instead of asking the kernel for new pages. A batch the user keeps is
never overwritten: only freed segments come back.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import weakref
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterator

import torch

ALIGN = 64  # bytes: every tensor in a segment starts on a cache line (and on any dtype's alignment)
KEEP_FREE = 2  # free segments a worker keeps for reuse (in a steady stream one comes back as each batch is made)
MAX_IN_FLIGHT = 64  # segments a worker remembers as out: the rest are forgotten (freed when the user frees them)


def _round(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _packable(t: torch.Tensor) -> bool:
    """Dense CPU tensors; anything else (sparse, quantized, on a device) travels the way torch sends it."""
    return t.layout == torch.strided and t.device.type == "cpu" and not t.is_quantized


def _map(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """The batch with ``fn`` applied to its packable tensors, through dicts, lists and tuples; metadata keys
    (``__*``) are left as they are."""
    if isinstance(x, torch.Tensor):
        return fn(x) if _packable(x) else x
    if isinstance(x, dict):
        return {k: v if isinstance(k, str) and k.startswith("__") else _map(v, fn) for k, v in x.items()}
    if isinstance(x, list):
        return [_map(v, fn) for v in x]
    if isinstance(x, tuple):
        return tuple(_map(v, fn) for v in x)
    return x


def _tensors(x: Any) -> list[torch.Tensor]:
    """The packable tensors of a batch, each once, in the order met."""
    found: dict[int, torch.Tensor] = {}
    _map(x, lambda t: found.setdefault(id(t), t))
    return list(found.values())


class SegmentPool:
    """A worker's segments: refilled when the training process gives them back through ``returns`` (a pipe's
    reading end), new ones otherwise. Without ``returns`` every batch gets a new segment (still one per batch)."""

    def __init__(self, returns: Connection | None = None):
        self.returns = returns
        self.segments: dict[int, torch.UntypedStorage] = {}  # slot -> segment, in flight or free
        self.free: list[int] = []
        self.next_slot = 0
        self.allocated = 0  # segments asked of the kernel (what recycling saves)

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
        segment = torch.UntypedStorage._new_shared(nbytes)
        if self.returns is None:
            return -1, segment
        while len(self.free) >= KEEP_FREE:  # none fitted: let the oldest free one go
            del self.segments[self.free.pop(0)]
        if len(self.segments) - len(self.free) >= MAX_IN_FLIGHT:  # the user keeps batches: stop tracking one
            oldest = next(s for s in self.segments if s not in self.free)
            del self.segments[oldest]
        slot, self.next_slot = self.next_slot, self.next_slot + 1
        self.segments[slot] = segment
        return slot, segment

    def pack(self, batch: Any) -> tuple[Any, int]:
        """The batch with its tensors copied into one segment (metadata keys, ``__*``, left alone), and the
        segment's slot (-1: none to give back)."""
        unique = _tensors(batch)
        total = sum(_round(t.nbytes) for t in unique)
        if not unique or total == 0:
            return batch, -1
        slot, segment = self.take(total)
        views, offset = {}, 0
        with torch.no_grad():
            for t in unique:
                view = torch.empty(0, dtype=t.dtype).set_(segment, offset // t.element_size(), t.shape)
                view.copy_(t)
                views[id(t)] = view.requires_grad_() if t.requires_grad else view
                offset += _round(t.nbytes)
        return _map(batch, lambda t: views[id(t)]), slot

    def ship(self, it: Iterator[Any]) -> Iterator[Any]:
        """Each output packed; dicts carry their slot as ``__shm__`` when it is to be given back."""
        for x in it:
            x, slot = self.pack(x)
            if slot >= 0 and isinstance(x, dict):
                x["__shm__"] = slot
            elif slot >= 0:  # nowhere to say which segment: not recycled
                self.segments.pop(slot, None)
            yield x


class Returns:
    """The training process's side: a pipe per worker; `track` gives a batch's segment back to its worker when
    the last tensor viewing it is freed (a finalizer on the segment, which may run in any thread)."""

    def __init__(self, workers: int, context: Any = None):
        ctx = multiprocessing.get_context(context) if context is None or isinstance(context, str) else context
        pairs = [ctx.Pipe(duplex=False) for _ in range(workers)]
        self.readers = [r for r, _ in pairs]  # travel into the workers with the pipeline
        self.writers = [w for _, w in pairs]
        for w in self.writers:
            os.set_blocking(w.fileno(), False)  # a full pipe (a stuck worker) never blocks training
        self.lock = threading.Lock()
        self.given_back = 0

    def close_readers(self) -> None:
        """Once the workers started: they hold their own ends; a worker gone then means a broken pipe here."""
        for r in self.readers:
            r.close()

    def track(self, batch: dict[str, Any], worker: int) -> None:
        slot = batch.pop("__shm__", None)
        if slot is None:
            return
        tensors = _tensors(batch)
        if tensors:
            weakref.finalize(tensors[0].untyped_storage(), self._give_back, worker, slot)

    def _give_back(self, worker: int, slot: int) -> None:
        with self.lock:
            try:
                self.writers[worker].send_bytes(slot.to_bytes(8, "little"))  # one 12-byte write: atomic
                self.given_back += 1
            except (BlockingIOError, BrokenPipeError, OSError, ValueError):
                pass  # the worker ended (or stopped reading): the segment is simply freed


__all__ = ["Returns", "SegmentPool"]
