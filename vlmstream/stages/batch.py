"""`vs.batch(n)`: group samples into batches inside the worker, so that workers ship whole batches."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch

from .decode import materialize


def vlm_collate(samples: Sequence[dict[str, Any]], padding: str = "left", pad_to: int | None = None) -> dict[str, Any]:
    """The batch contract of a nanoVLM-style loop: input_ids, attention_mask, labels [B, L] int64, padded
    (left by default, as nanoVLM; or right) to the longest row or `pad_to`; images as list[B] of list of
    [n_tiles, 3, H, W]; position_ids / sequence_id too when the samples were packed. A sample's own
    ``attention_mask`` (a packed sequence whose separators are left out) is taken as it is; 1 otherwise."""
    if padding not in ("left", "right"):
        raise ValueError(f"padding must be left or right, not {padding!r}")
    lengths = [len(s["input_ids"]) for s in samples]
    width = pad_to or max(lengths)
    if max(lengths) > width:
        raise ValueError(f"a row of {max(lengths)} tokens does not fit pad_to={width}")
    b = len(samples)
    out = {
        "input_ids": torch.full((b, width), samples[0]["__pad_id__"], dtype=torch.long),
        "attention_mask": torch.zeros((b, width), dtype=torch.long),
        "labels": torch.full((b, width), -100, dtype=torch.long),
    }
    packed = "position_ids" in samples[0]
    if packed:
        out["position_ids"] = torch.zeros((b, width), dtype=torch.long)
        out["sequence_id"] = torch.full((b, width), -1, dtype=torch.long)
    for i, (s, n) in enumerate(zip(samples, lengths)):
        cols = slice(width - n, width) if padding == "left" else slice(0, n)
        out["input_ids"][i, cols] = s["input_ids"]
        out["attention_mask"][i, cols] = s["attention_mask"] if "attention_mask" in s else 1
        out["labels"][i, cols] = s["labels"]
        if packed:
            out["position_ids"][i, cols] = s["position_ids"]
            out["sequence_id"][i, cols] = s["sequence_id"]
    out["images"] = [list(s["images"]) for s in samples]
    out["__key__"] = [s["__key__"] for s in samples]
    return out


def _is_meta(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("__")


Empty = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def _stackable(x: Any) -> bool:
    """A tensor that can be copied into a batch made with out= / copy_ (which record no gradients)."""
    return isinstance(x, torch.Tensor) and x.layout == torch.strided and x.device.type == "cpu" and not x.requires_grad


def _batch_memory(empty: Empty | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return empty(shape, dtype) if empty is not None else torch.empty(shape, dtype=dtype)


def default_collate(samples: Sequence[Any], empty: Empty | None = None) -> Any:
    """Stack tensors of equal shape and numbers; keep anything else as a list (per key for dicts).

    Metadata keys (``__key__``, ``__url__``, ``__offset__``, ``__index__``: any starting with "__") stay plain
    lists: they are for Python code. ``empty(shape, dtype)`` gives the memory stacked tensors go to: in a
    DataLoader worker under vs.Loader, the recycled shared-memory segment the batch leaves in
    (vlmstream/sharedmem.py), which spares a copy and fresh pages; ordinary memory otherwise.
    """
    first = samples[0]
    if isinstance(first, dict):
        return {k: [s[k] for s in samples] if _is_meta(k) else default_collate([s[k] for s in samples], empty)
                for k in first}
    if isinstance(first, tuple):
        return tuple(default_collate(list(col), empty) for col in zip(*samples))
    if isinstance(first, torch.Tensor) and all(isinstance(s, torch.Tensor) and s.shape == first.shape for s in samples):
        if not all(_stackable(s) and s.dtype == first.dtype for s in samples):
            return torch.stack(list(samples))
        out = _batch_memory(empty, (len(samples), *first.shape), first.dtype)
        if all(s.is_contiguous() for s in samples):
            return torch.stack(list(samples), out=out)
        for row, s in zip(out, samples):  # channel-interleaved images (vs.Resize): made planar in this one copy,
            row.copy_(s)  # at the speed of .contiguous(); torch.stack copies such views slower
        return out
    if isinstance(first, (int, float)) and not isinstance(first, bool) and all(type(s) is type(first) for s in samples):
        return torch.tensor(samples)
    return list(samples)


class Rows:
    """A batch of dict samples in the making, as `default_collate` would make it from them.

    Each top-level tensor member is copied into its row of the batch's tensor as its sample arrives, and let go:
    the copy reads an image still in the cache, and the memory it frees is where the next sample's image is made.
    Copying all the rows at the end, from 32 images of 224x224 that together overflow a 2 MB L2 cache, cost
    0.02-0.06 ms more a sample in one process on the benchmark machine (tools/bench/batch.py). A member that
    stops fitting (another shape or dtype, not a tensor) falls back to `default_collate`, with the rows copied
    so far as its values.
    """

    def __init__(self, n: int, first: dict[str, Any], empty: Empty | None = None):
        self.n, self.empty, self.keys = n, empty, list(first)
        self.stacks: dict[str, torch.Tensor] = {k: _batch_memory(empty, (n, *v.shape), v.dtype)
                                                for k, v in first.items() if not _is_meta(k) and _stackable(v)}
        self.rest: list[dict[str, Any]] = []  # each sample without its stacked members

    @property
    def count(self) -> int:
        return len(self.rest)

    def add(self, sample: dict[str, Any]) -> None:
        i, rest = len(self.rest), dict(sample)
        for k in list(self.stacks):
            x, out = rest.get(k), self.stacks[k]
            if _stackable(x) and x.shape == out.shape[1:] and x.dtype == out.dtype:
                out[i].copy_(x)
                del rest[k]
            else:
                for j, r in enumerate(self.rest):
                    r[k] = out[j]
                del self.stacks[k]
        self.rest.append(rest)

    def finish(self) -> dict[str, Any]:
        n, others = self.count, default_collate(self.rest, self.empty)
        stacks = {k: out if n == self.n else out[:n] for k, out in self.stacks.items()}
        return {k: stacks[k] if k in stacks else others[k] for k in self.keys}


class batch:
    """The stage. Tokenized samples (with ``input_ids``) become the VLM batch contract (`vlm_collate`, with
    ``padding`` and ``pad_to``); anything else goes through your ``collate``, or `default_collate` (dict samples
    row by row as they arrive, `Rows`). ``partial=False`` drops a last, smaller batch (counted in ``dropped``)."""

    def __init__(self, n: int, collate: Callable[[Sequence[Any]], Any] | None = None, partial: bool = True, *,
                 padding: str = "left", pad_to: int | None = None):
        if n < 1:
            raise ValueError(f"batch size must be >= 1, not {n}")
        self.n, self.user_collate, self.partial = n, collate, partial
        self.padding, self.pad_to = padding, pad_to
        self.dropped = 0
        self.empty: Empty | None = None

    @property
    def passes_tensors(self) -> bool:
        """Tokenized rows' tensors (their images) go into the batch as they are: the stage before may make them in
        the shipping memory (`vs.pack` does, for lazy images)."""
        return self.user_collate is None

    def bind(self, ctx: Any) -> None:
        """As the last stage in a DataLoader worker, stack straight into the memory the batch leaves in."""
        self.empty = ctx.memory.empty if ctx.memory is not None else None

    def collate(self, samples: Sequence[Any]) -> Any:
        if isinstance(samples[0], dict) and "images" in samples[0]:  # lazy tiles (decode(lazy=True)): made now
            samples = [m for m in map(materialize, samples) if m is not None]
            if not samples:
                return None
        if self.user_collate is not None:
            return self.user_collate(samples)
        if isinstance(samples[0], dict) and "input_ids" in samples[0] and "__pad_id__" in samples[0]:
            return vlm_collate(samples, self.padding, self.pad_to)
        return default_collate(samples, self.empty)

    def _collated(self, samples: Sequence[Any]) -> Iterator[Any]:
        out = self.collate(samples)
        if out is not None:  # None: every sample's image failed to decode, skipped under decode's on_error
            yield out

    def _collates_by_rows(self, first: Any) -> bool:
        return (self.user_collate is None and isinstance(first, dict)
                and not ("input_ids" in first and "__pad_id__" in first))

    def __call__(self, it: Iterator[Any]) -> Iterator[Any]:
        buf: list[Any] = []
        rows: Rows | None = None
        for x in it:
            if rows is None and not buf and self._collates_by_rows(x):
                rows = Rows(self.n, x, self.empty)
            if rows is not None:
                rows.add(x)
                x = None  # hold no tensor of the sample: the memory it frees is where the next one is made
                if rows.count == self.n:
                    yield rows.finish()
                    rows = None
                continue
            buf.append(x)
            if len(buf) == self.n:
                yield from self._collated(buf)
                buf = []
        left = rows.count if rows is not None else len(buf)
        if left:
            if not self.partial:
                self.dropped += left
            elif rows is not None:
                yield rows.finish()
            else:
                yield from self._collated(buf)
