"""`vs.shuffle(bufsize)`: a sample shuffle buffer, seeded by (seed, epoch, rank, worker)."""

from __future__ import annotations

import random
from typing import Any, Iterator

from ..core.checkpoint import encode_refs, rng_from, rng_state
from ..core.stage import Context

_END = object()


def buffer_shuffle(items: Iterator[Any], bufsize: int, initial: int, rng: random.Random,
                   buf: list[Any] | None = None, reshuffle: bool = True) -> Iterator[Any]:
    """Yield items in a shuffled order using at most `bufsize` items of memory.

    Starts yielding once `initial` items are buffered (smaller: faster first batch, weaker early mixing).
    `buf` (kept by the caller, so that a checkpoint can read it) may start non-empty when resuming;
    ``reshuffle=False`` when resuming a buffer that was already being drained (it was shuffled then).
    """
    if bufsize < 1 or not 1 <= initial <= bufsize:
        raise ValueError(f"need 1 <= initial ({initial}) <= bufsize ({bufsize})")
    it = iter(items)
    buf = [] if buf is None else buf
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
    if reshuffle:
        rng.shuffle(buf)
    while buf:  # pop as we go: what is still in `buf` is never what was yielded
        yield buf.pop()


class shuffle:
    """The stage. ``seed`` defaults to the pipeline's; the stream differs per epoch, rank and worker.

    Its state is the buffer, as references (a checkpoint stays small), and the random generator.
    """

    def __init__(self, bufsize: int, initial: int | None = None, seed: int | None = None):
        self.bufsize = bufsize
        self.initial = bufsize if initial is None else initial
        self.seed = seed
        self.ctx = Context()
        if bufsize < 1 or not 1 <= self.initial <= bufsize:  # fail here, not later in a worker
            raise ValueError(f"need 1 <= initial ({self.initial}) <= bufsize ({bufsize})")
        self.buf: list[Any] = []
        self.rand = random.Random(0)
        self.draining = False  # upstream ended: the buffer was shuffled once and is being emptied
        self._resume: tuple[list[Any], random.Random, bool] | None = None

    def bind(self, ctx: Context) -> None:
        self.ctx = ctx

    def rng(self) -> random.Random:
        c = self.ctx
        seed = c.seed if self.seed is None else self.seed
        return random.Random(f"vlmstream.shuffle/{seed}/{c.epoch}/{c.rank}/{c.worker}")

    def __call__(self, it: Iterator[Any]) -> Iterator[Any]:
        self.buf, self.rand, self.draining = self._resume or ([], self.rng(), False)
        self._resume = None
        if self.draining:
            return buffer_shuffle(iter(()), self.bufsize, self.initial, self.rand, self.buf, reshuffle=False)
        return buffer_shuffle(self._watch_end(it), self.bufsize, self.initial, self.rand, self.buf)

    def _watch_end(self, it: Iterator[Any]) -> Iterator[Any]:
        yield from it
        self.draining = True

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self.rand), "draining": self.draining, **encode_refs(self.buf)}

    def load_state_dict(self, state: dict[str, Any], samples: list[Any] | None = None) -> None:
        """`samples`: the buffered samples fetched again from ``state``'s references, in order."""
        self._resume = (list(samples or []), rng_from(state["rng"]), state["draining"])
