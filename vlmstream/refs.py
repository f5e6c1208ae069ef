"""Samples by reference: what a checkpoint keeps of a buffered sample instead of its bytes.

A reference is (source, url, offset, index): the stream the sample came from (None outside `vs.mix`), its
shard, the byte offset of its first tar header and its position in the shard. Lists of references are stored
with a table of URLs, so that a shuffle buffer of thousands of samples costs kilobytes.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

Ref = tuple  # (source: str | None, url: str, offset: int, index: int)


def ref_of(sample: Mapping[str, Any]) -> Ref:
    try:
        return (sample.get("__source__"), sample["__url__"], sample["__offset__"], sample["__index__"])
    except KeyError as e:
        raise ValueError(f"sample {sample.get('__key__', '?')!r} has no provenance ({e.args[0]}): a resumable "
                         "pipeline keeps the keys tar_samples adds (__url__, __offset__, __index__)") from None


def encode_refs(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Samples -> {"urls": [(source, url), ...], "refs": [[url number, offset, index], ...]} (JSON-able)."""
    table: dict[tuple, int] = {}
    refs = []
    for s in samples:
        source, url, offset, index = ref_of(s)
        refs.append([table.setdefault((source, url), len(table)), offset, index])
    return {"urls": [list(k) for k in table], "refs": refs}


def decode_refs(state: Mapping[str, Any]) -> list[Ref]:
    urls = [tuple(u) for u in state["urls"]]
    return [(*urls[u], offset, index) for u, offset, index in state["refs"]]


def rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def rng_from(state: Sequence) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng
