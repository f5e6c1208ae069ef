"""`vs.pack(seq_len, max_images=...)`: several tokenized samples per sequence, under a token and image budget.

The maths (`pack_bins`) is a pure function: first-fit decreasing over a buffer of samples, the bin sizes
counting a separator between samples, each bin holding at most `max_images` images (as nanoVLM's balanced
knapsack does, so that no sequence brings more vision-encoder work than the GPU was sized for). The least
filled bin is carried over to the next buffer instead of being emitted half empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..core.checkpoint import encode_refs
from .decode import materialize
from .tokenize import IGNORE


def pack_bins(lengths: Sequence[int], images: Sequence[int], seq_len: int, max_images: int | None,
              sep: int = 1) -> list[list[int]]:
    """Group item indexes into bins: sum(lengths) + sep * (items - 1) <= seq_len, sum(images) <= max_images.

    First-fit decreasing by length; each bin's items keep their arrival order (earlier first).
    """
    cap_img = max_images if max_images is not None else float("inf")
    for i, (n, k) in enumerate(zip(lengths, images)):
        if n > seq_len or k > cap_img:
            raise ValueError(f"item {i} ({n} tokens, {k} images) exceeds one sequence ({seq_len} tokens, "
                             f"{max_images} images): tokenize with max_len <= seq_len")
    bins: list[list[int]] = []
    used: list[int] = []
    imgs: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b in range(len(bins)):
            if used[b] + sep + lengths[i] <= seq_len and imgs[b] + images[i] <= cap_img:
                bins[b].append(i)
                used[b] += sep + lengths[i]
                imgs[b] += images[i]
                break
        else:
            bins.append([i])
            used.append(lengths[i])
            imgs.append(images[i])
    return [sorted(b) for b in bins]


def concat(samples: Sequence[dict[str, Any]], sep_id: int, *, trailing_sep: bool = False,
           attend_sep: bool = True) -> dict[str, Any]:
    """One packed sequence: ids and labels joined by a separator (label -100), positions restarting per
    sample, a sequence id per sample (the separator belongs to the sample before it), images in order.
    ``trailing_sep``: the last sample is followed by a separator too. ``attend_sep=False``: the separators get
    attention mask 0 (an ``attention_mask`` member the batch stage takes as it is)."""
    ids, labels, pos, seq, mask = [], [], [], [], []
    for j, s in enumerate(samples):
        n = len(s["input_ids"])
        ids.append(s["input_ids"])
        labels.append(s["labels"])
        pos.append(torch.arange(n))
        seq.append(torch.full((n,), j))
        mask.append(torch.ones(n, dtype=torch.long))
        if trailing_sep or j < len(samples) - 1:
            ids.append(torch.tensor([sep_id]))
            labels.append(torch.tensor([IGNORE]))
            pos.append(torch.tensor([n]))
            seq.append(torch.tensor([j]))
            mask.append(torch.tensor([int(attend_sep)]))
    out = {
        "__key__": "+".join(s["__key__"] for s in samples),
        "__keys__": [s["__key__"] for s in samples],
        "input_ids": torch.cat(ids),
        "labels": torch.cat(labels),
        "position_ids": torch.cat(pos),
        "sequence_id": torch.cat(seq),
        "images": [im for s in samples for im in s["images"]],
        "__pad_id__": samples[0]["__pad_id__"],
    }
    if not attend_sep:
        out["attention_mask"] = torch.cat(mask)
    return out


@dataclass
class PackStats:
    samples: int = 0
    sequences: int = 0
    tokens: int = 0  # tokens in emitted sequences, separators included

    @property
    def fill(self) -> float:
        """Mean share of seq_len used by the emitted sequences."""
        return self.tokens / (self.sequences * self.seq_len) if self.sequences else 0.0

    seq_len: int = 0


class pack:
    """The stage. ``buffer``: samples considered together (more: fuller sequences, more memory).
    ``first``: the first plan of a pass is made over this many samples, each next one over twice as many up to
    ``buffer``, so the first sequence comes after a few samples are read and tokenized, not a whole buffer
    (``None``: every plan over ``buffer``).
    ``sep_id``: the separator token (default: the tokenizer's pad id carried by each sample).
    ``trailing_sep`` / ``attend_sep``: nanoVLM follows every sample with a pad token its attention mask leaves
    out (``trailing_sep=True, attend_sep=False``); by default samples are joined by one attended separator.
    The buffer only plans, so it holds lazily decoded images (`LazyTiles`: their grid, their compressed bytes);
    their pixels are made as a sequence is emitted. A sample whose image then fails to decode leaves its
    sequence under decode's ``on_error`` (counted there), or raises.

    Its state is the samples waiting to be packed and the bins planned but not yet emitted, as references.
    """

    def __init__(self, seq_len: int, max_images: int | None = None, *, buffer: int = 256, first: int | None = 32,
                 sep_id: int | None = None, min_fill: float = 0.9, trailing_sep: bool = False,
                 attend_sep: bool = True):
        self.seq_len, self.max_images, self.buffer, self.sep_id, self.min_fill = seq_len, max_images, buffer, sep_id, min_fill
        self.first = min(first, buffer) if first else buffer
        self.limit = self.first  # samples the next plan waits for
        self.trailing_sep, self.attend_sep = trailing_sep, attend_sep
        self.pending: list[dict[str, Any]] = []  # waiting for a plan (the carried-over bin among them)
        self.ready: list[list[dict[str, Any]]] = []  # planned bins, emitted in order
        self._resume: tuple[list, list, int] | None = None
        self.stats = PackStats(seq_len=seq_len)
        self.empty: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None

    def bind(self, ctx: Any) -> None:
        """Given the shipping memory (a `vs.batch` after it that keeps its rows' tensors, in a DataLoader worker),
        lazy images are made straight into the segment the batch leaves in: no copy on the way out."""
        self.empty = ctx.memory.empty if ctx.memory is not None else None

    def _plan(self, final: bool) -> None:
        """Move the pending samples into planned bins, keeping the least-filled bin back unless final."""
        items = self.pending
        lengths = [len(s["input_ids"]) + self.trailing_sep for s in items]  # a trailing separator is the sample's
        bins = pack_bins(lengths, [len(s["images"]) for s in items], self.seq_len, self.max_images,
                         sep=int(not self.trailing_sep))
        bins.sort(key=lambda b: b[0])  # emit in arrival order of each bin's first sample
        carry: list[dict[str, Any]] = []
        if not final:
            fill = [sum(lengths[i] for i in b) + (len(b) - 1) * (not self.trailing_sep) for b in bins]
            worst = min(range(len(bins)), key=lambda b: (fill[b], -b))
            if fill[worst] < self.min_fill * self.seq_len:
                carry = [items[i] for i in bins.pop(worst)]
        self.ready.extend([items[i] for i in b] for b in bins)
        self.pending = carry

    def _drain(self) -> Iterator[dict[str, Any]]:
        while self.ready:
            group = [m for m in (materialize(s, self.empty) for s in self.ready.pop(0)) if m is not None]
            if not group:  # every sample of the bin failed to decode, skipped under decode's on_error
                continue
            out = concat(group, self.sep_id if self.sep_id is not None else group[0]["__pad_id__"],
                         trailing_sep=self.trailing_sep, attend_sep=self.attend_sep)
            self.stats.samples += len(group)
            self.stats.sequences += 1
            self.stats.tokens += len(out["input_ids"])
            yield out

    def __call__(self, it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        self.stats = PackStats(seq_len=self.seq_len)
        self.pending, self.ready, self.limit = self._resume or ([], [], self.first)
        self._resume = None
        return self._run(it)

    def _run(self, it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        yield from self._drain()
        for s in it:
            self.pending.append(s)
            if len(self.pending) >= self.limit:
                self._plan(final=False)
                self.limit = min(2 * self.limit, self.buffer)
                yield from self._drain()
        if self.pending:
            self._plan(final=True)
            yield from self._drain()

    def state_dict(self) -> dict[str, Any]:
        flat = [*self.pending, *(s for b in self.ready for s in b)]
        return {"pending": len(self.pending), "bins": [len(b) for b in self.ready], "limit": self.limit,
                **encode_refs(flat)}

    def load_state_dict(self, state: dict[str, Any], samples: list[Any] | None = None) -> None:
        """`samples`: the samples fetched again from ``state``'s references (pending first, then the bins)."""
        samples = list(samples or [])
        n = state["pending"]
        pending, rest, ready = samples[:n], samples[n:], []
        for size in state["bins"]:
            ready.append(rest[:size])
            rest = rest[size:]
        self._resume = (pending, ready, max(1, min(int(state.get("limit", self.buffer)), self.buffer)))
