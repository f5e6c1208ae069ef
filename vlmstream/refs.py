"""Samples by reference: what a checkpoint keeps of a buffered sample instead of its bytes.

A reference is (source, url, offset, index): the stream the sample came from (None outside `vs.mix`), its
shard, the byte offset of its first tar header and its position in the shard. Lists of references are stored
with a table of URLs, so that a shuffle buffer of thousands of samples costs kilobytes.

URLs are stored redacted (no userinfo, no ``token=``-like query values): a checkpoint never holds credentials.
On restore, `url_resolver` maps them back through the pipeline's resolved shard lists.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Mapping, Sequence

from .errors import redact

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
        refs.append([table.setdefault((source, redact(url)), len(table)), offset, index])
    return {"urls": [list(k) for k in table], "refs": refs}


def decode_refs(state: Mapping[str, Any], resolve: Callable[[Any, str], str] | None = None) -> list[Ref]:
    """References from a state; ``resolve(source, url)`` (see `url_resolver`) gives back the URLs to open."""
    urls = [tuple(u) for u in state["urls"]]
    if resolve is not None:
        urls = [(source, resolve(source, url)) for source, url in urls]
    return [(*urls[u], offset, index) for u, offset, index in state["refs"]]


def url_resolver(pipe: Any) -> Callable[[Any, str], str]:
    """(source, URL as a state stores it) -> the URL to open, from the resolved shard lists of ``pipe`` (and
    of each stream of a `vs.mix` in it). URLs not in a list are returned as they are."""
    tables: dict[Any, dict[str, str | None]] = {None: _table(pipe)}
    for stage in pipe.stages:
        for name, stream in (getattr(stage, "streams", None) or {}).items():
            tables[name] = _table(stream.pipeline)

    def resolve(source: Any, url: str) -> str:
        table = tables.get(source, {})
        if url not in table:
            return url
        full = table[url]
        if full is None:
            raise ValueError(f"{url}: several shards of the list have this URL once credentials are removed; "
                             "the checkpoint cannot tell them apart (keep tokens in fetch(headers=...))")
        return full

    return resolve


def _table(pipe: Any) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for stage in pipe.stages:
        for spec in getattr(stage, "specs", None) or ():
            shown = redact(spec.url)
            out[shown] = spec.url if out.get(shown, spec.url) == spec.url else None  # None: ambiguous
    return out


def rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def rng_from(state: Sequence) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng
