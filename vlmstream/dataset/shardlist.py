"""Resolving a shard spec into its list of shards, once: a brace pattern (local or URL), a list, a local glob, a
manifest (``index.json``: local, over HTTP, on the Hub or in a bucket), ``hf://`` patterns and bucket listings.

Here, below the stages, so that the packer reads webdataset inputs through the same resolver as ``vs.shards``
(which adds the listing cache and the epoch order) and ``vlmstream inspect``.
"""

from __future__ import annotations

import glob
import json
from typing import Sequence

import braceexpand

from ..errors import FormatError, redact
from ..io.hub import list_hf, read_hf_file
from ..io.patterns import fixed_prefix, glob_match, has_glob
from ..io.store import DEFAULT_STORES, Stores, is_store_url, list_objects
from ..io.urls import open_url, resolve_entry
from .format import ShardInfo, parse_manifest


def from_manifest(url: str, data: bytes, allowed_hosts: Sequence[str] = ()) -> list[ShardInfo]:
    """The shards a manifest's bytes list, each URL resolved against the manifest's own (``resolve_entry``)."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{redact(url)}: invalid manifest JSON: {e}") from None
    return [ShardInfo(resolve_entry(url, s.url, allowed_hosts), s.samples, s.bytes, s.sha256)
            for s in parse_manifest(doc, redact(url))]


def resolve(spec: str | Sequence[str], *, opener=None, hf_token: str | bool | None = None,
            allowed_hosts: Sequence[str] = (), stores: Stores | None = None) -> list[ShardInfo]:
    """Turn a spec into the shard list; every form but plain lists may do I/O (once). ``allowed_hosts``: hosts
    besides its own that a remote manifest may name shards on (see `io.urls.resolve_entry`); ``stores``: the
    object stores' settings beside the environment's."""
    if not isinstance(spec, str):
        return [ShardInfo(u) for s in spec for u in braceexpand.braceexpand(s)]
    if is_store_url(spec):
        return _resolve_store(spec, stores or DEFAULT_STORES, allowed_hosts)
    if spec.startswith("hf://"):
        if spec.endswith(".json"):
            url, data = read_hf_file(spec, hf_token)  # relative shard URLs: same repo, same commit
            return from_manifest(url, data, allowed_hosts)
        return [ShardInfo(u) for u in list_hf(spec, hf_token)]
    if spec.endswith(".json"):
        if "://" in spec:
            with (opener or open_url)(spec) as f:
                data = f.read()
        else:
            with open(spec, "rb") as f:
                data = f.read()
        return from_manifest(spec, data, allowed_hosts)
    urls = list(braceexpand.braceexpand(spec))
    if "://" not in spec and any(c in spec for c in "*?["):
        urls = sorted(p for u in urls for p in glob.glob(u))
    return [ShardInfo(u) for u in urls]


def _resolve_store(spec: str, stores: Stores, allowed_hosts: Sequence[str]) -> list[ShardInfo]:
    """A manifest in a bucket (one GET), or a brace pattern of keys where globs are matched against one listing
    per fixed prefix (one LIST, paged); plain keys are taken as named, with no request."""
    if spec.endswith(".json"):
        with open_url(spec, stores=stores) as f:
            return from_manifest(spec, f.read(), allowed_hosts)
    urls = list(braceexpand.braceexpand(spec))
    if not any(has_glob(u) for u in urls):
        return [ShardInfo(u) for u in urls]
    out, listed = [], {}
    for u in urls:
        if not has_glob(u):
            out.append(ShardInfo(u))
            continue
        prefix = fixed_prefix(u)
        if prefix not in listed:
            listed[prefix] = list(list_objects(prefix, stores))
        out += [ShardInfo(url, bytes=size) for url, size, _ in listed[prefix] if glob_match(url, u)]
    return sorted(out, key=lambda s: s.url)


__all__ = ["from_manifest", "resolve"]
