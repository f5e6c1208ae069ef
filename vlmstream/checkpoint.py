"""Checkpoints: what a state says, how it is checked before it is trusted, and samples kept by reference.

A state is only as good as its fit to the data it is resumed on. Three checks, so that a resume either
continues exactly or refuses with a clear error, never silently delivers wrong data:

- **What it was taken on**: `fingerprint` hashes the resolved shard lists (URLs as shown, sample counts,
  sizes, sha256 from the manifest). A resume on a list that was reordered, extended or repacked is refused.
- **That it is intact**: `seal` adds a digest over the whole state; `unseal` refuses a state edited or cut.
- **Where it points**: every cursor and reference is checked against the shard list (an URL not in it is
  never opened; indexes and offsets within the shard's manifest counts), and each carries the key of its
  sample, compared where the sample is read again: a shard changed in place under the same name is caught
  there (`TarSamples` raises ``changed``).

A reference is (source, url, offset, index, key): the stream the sample came from (None outside `vs.mix`),
its shard, the byte offset of its first tar header, its position in the shard and its key. Lists of
references are stored with a table of URLs, so that a shuffle buffer of thousands of samples costs
kilobytes. URLs are stored redacted (no credentials); `ShardIndex` maps them back to the pipeline's own list.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any, Iterator, Mapping, Sequence

from .errors import redact

STATE_VERSION = 2  # of a slot's state and of the Loader's
BLOCK = 512  # tar headers start on 512-byte blocks

Ref = tuple  # (source: str | None, url: str, offset: int, index: int, key: str)


# ------------------------------------------------------------------------------------------------ references


def ref_of(sample: Mapping[str, Any]) -> Ref:
    try:
        return (sample.get("__source__"), sample["__url__"], sample["__offset__"], sample["__index__"],
                sample["__key__"])
    except KeyError as e:
        raise ValueError(f"sample {sample.get('__key__', '?')!r} has no provenance ({e.args[0]}): a resumable "
                         "pipeline keeps the keys tar_samples adds (__url__, __offset__, __index__)") from None


def encode_refs(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Samples -> {"urls": [(source, url), ...], "refs": [[url number, offset, index, key], ...]} (JSON-able)."""
    table: dict[tuple, int] = {}
    refs = []
    for s in samples:
        source, url, offset, index, key = ref_of(s)
        refs.append([table.setdefault((source, redact(url)), len(table)), offset, index, key])
    return {"urls": [list(k) for k in table], "refs": refs}


def decode_refs(state: Mapping[str, Any], shards: "ShardIndex") -> list[Ref]:
    """The references of a state, each checked against the shard list, with the URLs to open."""
    try:
        urls = [(source, shards.url(source, url)) for source, url in state["urls"]]
        refs = [(*urls[u], offset, index, key) for u, offset, index, key in state["refs"]]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        if isinstance(e, ValueError) and str(e).startswith("checkpoint"):
            raise
        raise ValueError(f"checkpoint: malformed sample references ({type(e).__name__}: {e})") from None
    for source, url, offset, index, key in refs:
        shards.check(source, url, offset, index, key, "reference")
    return refs


class ShardIndex:
    """The pipeline's resolved shard lists by (source, URL as a state shows it): what a state may point at."""

    def __init__(self, pipe: Any):
        self.specs: dict[tuple[Any, str], Any] = {}
        self.ambiguous: set[tuple[Any, str]] = set()
        for source, specs in shard_lists(pipe):
            for spec in specs:
                shown = (source, redact(spec.url))
                if shown in self.specs and self.specs[shown].url != spec.url:
                    self.ambiguous.add(shown)
                self.specs[shown] = spec

    def url(self, source: Any, shown: str) -> str:
        """The URL to open for a URL as a state stores it (redacted)."""
        if (source, shown) in self.ambiguous:
            raise ValueError(f"checkpoint: {shown}: several shards of the list have this URL once credentials are "
                             "removed; the checkpoint cannot tell them apart (keep tokens in fetch(headers=...))")
        spec = self.specs.get((source, shown))
        if spec is None:
            where = "" if source is None else f" of stream {source!r}"
            raise ValueError(f"checkpoint: {shown} is not in the shard list{where}: the state was taken on other data "
                             "or altered")
        return spec.url

    def spec(self, source: Any, url: str) -> Any:
        return self.specs.get((source, redact(url)))

    def check(self, source: Any, url: str, offset: Any, index: Any, key: Any, what: str) -> None:
        """A place in a shard, within the bounds the manifest gives (where it gives them)."""
        spec = self.spec(source, url)
        if spec is None:
            raise ValueError(f"checkpoint: {redact(url)} is not in the shard list")
        samples, size = getattr(spec, "samples", None), getattr(spec, "bytes", None)
        ok = (_natural(offset) and offset % BLOCK == 0 and _natural(index) and isinstance(key, str)
              and (samples is None or index < samples)
              and (size is None or _compressed(url) or offset < size))
        if not ok:
            raise ValueError(f"checkpoint: {what} to {redact(url)} out of bounds: offset {offset!r}, index {index!r}, "
                             f"key {key!r} (the shard has {samples if samples is not None else '?'} samples, "
                             f"{size if size is not None else '?'} bytes)")


def shard_lists(pipe: Any, source: Any = None) -> Iterator[tuple[Any, Sequence[Any]]]:
    """(source, resolved shard list) of every source stage in ``pipe``, streams of a `vs.mix` included."""
    for stage in pipe.stages:
        specs = getattr(stage, "specs", None)
        if specs is not None:
            yield source, specs
        for name, stream in (getattr(stage, "streams", None) or {}).items():
            yield from shard_lists(stream.pipeline, name)


def _natural(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _compressed(url: str) -> bool:
    """Offsets count uncompressed bytes: a gzip shard's size says nothing about them."""
    return url.endswith((".gz", ".tgz"))


# ---------------------------------------------------------------------------------------------------- cursor


def check_cursor(cursor: Any, items: Sequence[Mapping[str, Any]], shards: ShardIndex, where: str) -> None:
    """A slot's cursor against the shard items that slot holds: in range, on the same shard, within it."""
    fields = ("item", "index", "offset", "key", "url", "count", "real")
    if not isinstance(cursor, Mapping) or set(cursor) != set(fields):
        raise ValueError(f"checkpoint: {where}: malformed cursor {cursor!r:.200}")
    item, index = cursor["item"], cursor["index"]
    if not (_natural(item) and item <= len(items) and _natural(cursor["count"]) and _natural(cursor["real"])):
        raise ValueError(f"checkpoint: {where}: cursor at item {item!r} of {len(items)} (or bad counts): the state "
                         "does not fit this slot's shards")
    if index is None:
        if any(cursor[k] is not None for k in ("offset", "key", "url")):
            raise ValueError(f"checkpoint: {where}: malformed cursor {dict(cursor)!r:.200}")
        return
    if item == len(items) or redact(items[item]["url"]) != cursor["url"]:
        found = redact(items[item]["url"]) if item < len(items) else "no shard"
        raise ValueError(f"checkpoint: {where}: the cursor is in {cursor['url']} but this slot's item {item} is "
                         f"{found}: the state does not fit these shards")
    shards.check(None, items[item]["url"], cursor["offset"], index, cursor["key"], "cursor")


# ------------------------------------------------------------------------------------------------------ plans

def encode_plan(items: Sequence[Mapping[str, Any]], source: Any) -> list[Any]:
    """The rest of an epoch resumed on another topology, JSON-able and small: a shard read whole is its number
    in the source's list; anything else (a shard read from a resume point, samples by reference) a dict with
    its URL redacted."""
    out: list[Any] = []
    for item in items:
        plain = {k: v for k, v in item.items() if k != "resumed"}
        shard = item.get("shard")
        if shard is not None and hasattr(source, "item") and plain == source.item(shard):
            out.append(shard)
        else:
            out.append({**plain, "url": redact(item["url"])})
    return out


def decode_plan(doc: Any, source: Any, shards: ShardIndex) -> list[dict[str, Any]]:
    """Plan items from `encode_plan`'s form, each checked against the shard list."""
    if not isinstance(doc, list):
        raise ValueError("checkpoint: malformed plan")
    n = len(getattr(source, "specs", ()))
    items = []
    for x in doc:
        if _natural(x):
            if x >= n:
                raise ValueError(f"checkpoint: plan names shard {x} of {n}")
            items.append({**source.item(x), "resumed": True})
            continue
        if not isinstance(x, Mapping) or not isinstance(x.get("url"), str):
            raise ValueError(f"checkpoint: malformed plan item {x!r:.200}")
        item = {**x, "url": shards.url(None, x["url"]), "resumed": True}
        if "refs" in item:
            refs = item["refs"]
            if not isinstance(refs, list) or not refs or not all(isinstance(r, list) and len(r) == 2 for r in refs):
                raise ValueError(f"checkpoint: malformed plan item {x!r:.200}")
            shards.check(None, item["url"], item.get("start_offset"), item.get("start_index"), refs[0][1], "plan item")
        elif "skip_through" in item:
            shards.check(None, item["url"], item.get("start_offset", 0), item["skip_through"], item.get("skip_key"),
                         "plan item")
        items.append(item)
    return items


# --------------------------------------------------------------------------------------------- the whole state


def fingerprint(pipe: Any) -> str:
    """What a state was taken on: a hash of the pipeline's resolved shard lists (URLs as shown, counts, sizes,
    checksums, in order)."""
    doc = [[source, [[redact(s.url), getattr(s, "samples", None), getattr(s, "bytes", None),
                      getattr(s, "sha256", None)] for s in specs]] for source, specs in shard_lists(pipe)]
    return hashlib.sha256(_canonical(doc)).hexdigest()


def seal(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state with a digest over everything else in it."""
    body = {k: v for k, v in state.items() if k != "digest"}
    return {**body, "digest": hashlib.sha256(_canonical(body)).hexdigest()}


def unseal(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state without its digest, once the digest matches (an edited, cut or unsealed state is refused)."""
    body = {k: v for k, v in state.items() if k != "digest"}
    try:
        digest = hashlib.sha256(_canonical(body)).hexdigest()
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint: the state is not plain JSON data ({e}): its digest cannot be checked") from None
    if state.get("digest") != digest:
        raise ValueError("checkpoint: the state's digest does not match its content: it was edited, truncated or "
                         "not made by Loader.state_dict()")
    return body


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


# ------------------------------------------------------------------------------------------- random generators


def rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def rng_from(state: Sequence) -> random.Random:
    rng = random.Random()
    try:
        rng.setstate((state[0], tuple(state[1]), state[2]))
    except (TypeError, ValueError, IndexError) as e:
        raise ValueError(f"checkpoint: malformed random generator state ({e})") from None
    return rng
