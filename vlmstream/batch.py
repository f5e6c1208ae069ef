"""`vs.batch(n)`: group samples into batches inside the worker, so that workers ship whole batches."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch


def default_collate(samples: Sequence[Any]) -> Any:
    """Stack tensors of equal shape and numbers; keep anything else as a list (per key for dicts)."""
    first = samples[0]
    if isinstance(first, dict):
        return {k: default_collate([s[k] for s in samples]) for k in first}
    if isinstance(first, tuple):
        return tuple(default_collate(list(col)) for col in zip(*samples))
    if isinstance(first, torch.Tensor) and all(isinstance(s, torch.Tensor) and s.shape == first.shape for s in samples):
        return torch.stack(list(samples))
    if isinstance(first, (int, float)) and not isinstance(first, bool) and all(type(s) is type(first) for s in samples):
        return torch.tensor(samples)
    return list(samples)


class batch:
    """The stage. ``partial=False`` drops a last, smaller batch (counted in ``dropped``)."""

    def __init__(self, n: int, collate: Callable[[Sequence[Any]], Any] | None = None, partial: bool = True):
        if n < 1:
            raise ValueError(f"batch size must be >= 1, not {n}")
        self.n, self.collate, self.partial = n, collate or default_collate, partial
        self.dropped = 0

    def __call__(self, it: Iterator[Any]) -> Iterator[Any]:
        buf: list[Any] = []
        for x in it:
            buf.append(x)
            if len(buf) == self.n:
                yield self.collate(buf)
                buf = []
        if buf:
            if self.partial:
                yield self.collate(buf)
            else:
                self.dropped += len(buf)
