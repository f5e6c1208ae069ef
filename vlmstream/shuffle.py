"""`vs.shuffle(bufsize)`: a sample shuffle buffer, seeded by (seed, epoch, rank, worker)."""

from __future__ import annotations

import random
from typing import Any, Iterator

from .pipeline import Context

_END = object()


def buffer_shuffle(items: Iterator[Any], bufsize: int, initial: int, rng: random.Random) -> Iterator[Any]:
    """Yield items in a shuffled order using at most `bufsize` items of memory.

    Starts yielding once `initial` items are buffered (smaller: faster first batch, weaker early mixing).
    """
    if bufsize < 1 or not 1 <= initial <= bufsize:
        raise ValueError(f"need 1 <= initial ({initial}) <= bufsize ({bufsize})")
    it = iter(items)
    buf: list[Any] = []
    for x in it:
        buf.append(x)
        if len(buf) < bufsize:  # growing: take two, give one, until the buffer is full
            nxt = next(it, _END)
            if nxt is not _END:
                buf.append(nxt)
        if len(buf) >= initial:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class shuffle:
    """The stage. ``seed`` defaults to the pipeline's; the stream differs per epoch, rank and worker."""

    def __init__(self, bufsize: int, initial: int | None = None, seed: int | None = None):
        self.bufsize = bufsize
        self.initial = bufsize if initial is None else initial
        self.seed = seed
        self.ctx = Context()
        if bufsize < 1 or not 1 <= self.initial <= bufsize:  # fail here, not later in a worker
            raise ValueError(f"need 1 <= initial ({self.initial}) <= bufsize ({bufsize})")

    def bind(self, ctx: Context) -> None:
        self.ctx = ctx

    def rng(self) -> random.Random:
        c = self.ctx
        seed = c.seed if self.seed is None else self.seed
        return random.Random(f"vlmstream.shuffle/{seed}/{c.epoch}/{c.rank}/{c.worker}")

    def __call__(self, it: Iterator[Any]) -> Iterator[Any]:
        return buffer_shuffle(it, self.bufsize, self.initial, self.rng())
