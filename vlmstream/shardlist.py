"""`vs.shards(spec)`: resolve a shard list once, then hand each epoch's order to the rest of the chain.

Specs: a brace pattern (`shard-{000000..000127}.tar`, local or URL), a list, a local glob, a manifest
(`index.json`, local or over HTTP) or `hf://datasets/ORG/NAME[@REV]/PATTERN` (through huggingface_hub).
Resolution happens once, where the pipeline is built; DataLoader workers get the resolved list with the
pipeline and never list again. Ranks on one machine share one listing through an on-disk cache.
"""

from __future__ import annotations

import fcntl
import fnmatch
import glob
import hashlib
import json
import os
import posixpath
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence
from urllib.parse import SplitResult, quote, unquote, urljoin, urlsplit

import braceexpand

from .errors import redact, redact_spec
from .format import FormatError, parse_manifest
from .pipeline import Context
from .split import epoch_order


@dataclass(frozen=True)
class ShardSpec:
    url: str
    samples: int | None = None  # known from a manifest
    sha256: str | None = None
    bytes: int | None = None


def _is_url(s: str) -> bool:
    return "://" in s


def _is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "hf://"))


def _join(base: str, rel: str, allowed_hosts: Sequence[str] = ()) -> str:
    """Resolve a manifest's shard URL against the manifest's own location.

    A local manifest is the user's own file: a relative path resolves against its folder, and an absolute path
    or URL is taken as it is. A remote one (http(s), hf://) is someone else's: its entries resolve as URLs,
    and must stay on its origin (scheme, host, port; for hf://, its repo at its commit) or on a host in
    ``allowed_hosts``. Never a local file or another scheme: a remote list must not make us read the user's
    files, nor send their credentials elsewhere.
    """
    if not _is_remote(base):
        if _is_url(rel) or os.path.isabs(rel):
            return rel
        if _is_url(base):
            scheme, rest = base.split("://", 1)
            return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), rel))}"
        return os.path.normpath(os.path.join(os.path.dirname(base), rel))
    url = _join_hf(base, rel) if base.startswith("hf://") else _join_http(base, rel)
    if url is None or not (_same_origin(base, url) or _allowed(url, allowed_hosts)):
        raise FormatError(f"{redact(base)}: shard entry {redact(rel)!r} resolves outside the manifest's origin "
                          f"({_origin_text(base)}); a remote manifest may name shards on its own origin only, "
                          "or on hosts given in allowed_hosts=[...]", reason="outside_origin")
    return url


def _join_http(base: str, rel: str) -> str | None:
    try:
        url = urljoin(base, rel)
        return url if urlsplit(url).scheme in ("http", "https") else None
    except ValueError:  # e.g. an unbalanced "[" in a host
        return None


def _join_hf(base: str, rel: str) -> str | None:
    """A path relative to an hf:// manifest, kept inside its repo at its commit; an absolute URL as it is."""
    if _is_url(rel):
        return rel
    repo_type, repo_id, revision, path = parse_hf_url(base)
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), rel)).lstrip("/")
    if joined == ".." or joined.startswith("../"):
        return None
    return hf_url(repo_type, repo_id, revision, joined)


def _http_origin(parts: SplitResult) -> tuple[str, str, int] | None:
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _same_origin(base: str, url: str) -> bool:
    try:
        if base.startswith("hf://"):
            return url.startswith("hf://") and parse_hf_url(url)[:3] == parse_hf_url(base)[:3]
        origin = _http_origin(urlsplit(base))
        return origin is not None and _http_origin(urlsplit(url)) == origin
    except ValueError:
        return False


def _allowed(url: str, allowed_hosts: Sequence[str]) -> bool:
    """Whether an http(s) URL is on a host the user allowed: "host" (any port), "host:port" or "scheme://host[:port]"."""
    try:
        target = _http_origin(urlsplit(url))
    except ValueError:
        return False
    if target is None:
        return False
    for entry in allowed_hosts:
        p = urlsplit(entry if "://" in entry else f"//{entry}")
        if (p.hostname == target[1] and (p.port is None or p.port == target[2])
                and (not p.scheme or p.scheme == target[0])):
            return True
    return False


def _origin_text(base: str) -> str:
    if base.startswith("hf://"):
        repo_type, repo_id, revision, _ = parse_hf_url(base)
        return f"{repo_type} {repo_id} at {revision or 'main'}"
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.hostname}:{_http_origin(parts)[2]}"


# After "@": a revision is one path segment (percent-encode a "/" in it), except the Hub's special refs.
_HF_NAME_REV = re.compile(r"([^/@]+)(?:@(refs/(?:convert/[\w.-]+|pr/\d+)|[^/]+))?/(.+)")


def parse_hf_url(url: str) -> tuple[str, str, str | None, str]:
    """hf://datasets/ORG/NAME[@REV]/PATH -> (repo_type, repo_id, revision, path).

    REV is a branch, tag or commit, percent-encoded where it holds a "/" (``@refs%2Fpr%2F1``); the Hub's
    special refs ``refs/pr/N`` and ``refs/convert/NAME`` may also be written as they are.
    """
    rest = url[len("hf://"):]
    kind, _, rest = rest.partition("/")
    if kind not in ("datasets", "models", "spaces"):
        raise ValueError(f"{url}: expected hf://datasets/ORG/NAME/PATH")
    org, _, rest = rest.partition("/")
    m = _HF_NAME_REV.fullmatch(rest)
    if not org or m is None:
        raise ValueError(f"{url}: expected hf://{kind}/ORG/NAME/PATH")
    name, revision, path = m.groups()
    return kind[:-1], f"{org}/{name}", unquote(revision) if revision else None, path


def hf_url(repo_type: str, repo_id: str, revision: str | None, path: str) -> str:
    """The inverse of parse_hf_url."""
    at = f"@{quote(revision, safe='')}" if revision else ""
    return f"hf://{repo_type}s/{repo_id}{at}/{path}"


def _read_manifest_bytes(url: str, opener) -> bytes:
    if _is_url(url):
        with opener(url) as f:
            return f.read()
    with open(url, "rb") as f:
        return f.read()


def _from_manifest(url: str, data: bytes, allowed_hosts: Sequence[str] = ()) -> list[ShardSpec]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{redact(url)}: invalid manifest JSON: {e}") from None
    return [ShardSpec(_join(url, s.url, allowed_hosts), s.samples, s.sha256, s.bytes)
            for s in parse_manifest(doc, redact(url))]


def pin_hf_revision(repo_type: str, repo_id: str, revision: str | None, token: str | bool | None) -> str:
    """The commit a revision (a branch, a tag, None: main) names now. Shard URLs carry it instead of the name,
    so every rank, worker and epoch reads the same files even if someone pushes to the branch mid-run."""
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import HfApi

    sha = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, token=token).sha
    if not sha:
        raise FormatError(f"hf://{repo_type}s/{repo_id}: the Hub named no commit for revision {revision or 'main'!r}")
    return sha


def _list_hf(url: str, token: str | bool | None) -> list[ShardSpec]:
    from huggingface_hub import HfApi

    repo_type, repo_id, revision, pattern = parse_hf_url(url)
    revision = pin_hf_revision(repo_type, repo_id, revision, token)
    files = set(HfApi().list_repo_files(repo_id, repo_type=repo_type, revision=revision, token=token))
    wanted = set(braceexpand.braceexpand(pattern))
    missing = sorted(w for w in wanted if w not in files and not any(c in w for c in "*?["))
    if missing:  # a name given in full (not a glob) must exist: never drop a shard silently
        raise FileNotFoundError(f"{url}: {len(missing)} named file(s) not in the repo, e.g. {missing[0]!r}")
    picked = sorted(f for f in files if f in wanted or any(_glob_match(f, w) for w in wanted))
    return [ShardSpec(hf_url(repo_type, repo_id, revision, f)) for f in picked]


def _glob_match(path: str, pattern: str) -> bool:
    """Glob as for local paths: "*", "?" and "[...]" match within one path segment, never across "/"."""
    parts, pats = path.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(fnmatch.fnmatchcase(a, p) for a, p in zip(parts, pats))


def resolve(spec: str | Sequence[str], *, opener=None, hf_token: str | bool | None = None,
            allowed_hosts: Sequence[str] = ()) -> list[ShardSpec]:
    """Turn a spec into the shard list; every form but plain lists may do I/O (once). ``allowed_hosts``: hosts
    besides its own that a remote manifest may name shards on (see `_join`)."""
    if not isinstance(spec, str):
        return [ShardSpec(u) for s in spec for u in braceexpand.braceexpand(s)]
    if spec.startswith("hf://"):
        if spec.endswith(".json"):
            from huggingface_hub import hf_hub_download

            repo_type, repo_id, revision, path = parse_hf_url(spec)
            revision = pin_hf_revision(repo_type, repo_id, revision, hf_token)
            local = hf_hub_download(repo_id, path, repo_type=repo_type, revision=revision, token=hf_token)
            with open(local, "rb") as f:  # relative shard URLs: same repo, same commit
                return _from_manifest(hf_url(repo_type, repo_id, revision, path), f.read(), allowed_hosts)
        return _list_hf(spec, hf_token)
    if spec.endswith(".json"):
        if opener is None:
            from .fetch import open_url as opener
        return _from_manifest(spec, _read_manifest_bytes(spec, opener), allowed_hosts)
    urls = list(braceexpand.braceexpand(spec))
    if not _is_url(spec) and any(c in spec for c in "*?["):
        urls = sorted(p for u in urls for p in glob.glob(u))
    return [ShardSpec(u) for u in urls]


def cached_resolve(spec: str | Sequence[str], cache_dir: str, ttl: float, **kwargs: Any) -> list[ShardSpec]:
    """Resolve through an on-disk cache shared by the processes of one machine.

    The first process to take the lock lists and writes the result atomically; the others wait on the lock
    and read it, so one machine makes one listing request however many ranks it runs.
    """
    os.makedirs(cache_dir, exist_ok=True)
    allowed = sorted(kwargs.get("allowed_hosts") or ())
    key = hashlib.sha256(json.dumps([spec, allowed] if allowed else spec, sort_keys=True).encode()).hexdigest()[:32]
    path = os.path.join(cache_dir, f"shards-{key}.json")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.exists(path) and time.time() - os.path.getmtime(path) < ttl:
                with open(path) as f:
                    return [ShardSpec(**d) for d in json.load(f)]
            out = resolve(spec, **kwargs)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump([s.__dict__ for s in out], f)
            os.replace(tmp, path)
            return out
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class shards:
    """The source stage: yields one dict per shard, in this epoch's order.

    Each item is ``{"url", "shard" (index in the resolved list), "samples", "sha256", "bytes", "num_shards"}``;
    ``samples``, ``sha256`` and ``bytes`` come from a manifest (None without one): `fetch` checks its cache by them.
    ``shuffle`` reorders shards each epoch from (seed, epoch); the seed defaults to the pipeline's.
    ``listing_cache``: a folder where ranks of one machine share the listing for ``listing_ttl`` seconds.
    ``resample=True``: endless; each (rank, worker) draws shards at random with replacement, seeded by
    (seed, epoch, rank, worker). For step-based training: end each epoch with ``vs.take(batches)``.
    ``allowed_hosts``: hosts besides its own that a remote manifest may name shards on ("host", "host:port"
    or "https://host"); a shard anywhere else is refused when the list is resolved.
    """

    def __init__(
        self,
        spec: str | Sequence[str],
        *,
        shuffle: bool = True,
        seed: int | None = None,
        listing_cache: str | None = None,
        listing_ttl: float = 3600.0,
        hf_token: str | bool | None = None,
        resample: bool = False,
        allowed_hosts: Sequence[str] = (),
    ):
        if listing_cache is not None:
            self.specs = cached_resolve(spec, listing_cache, listing_ttl, hf_token=hf_token, allowed_hosts=allowed_hosts)
        else:
            self.specs = resolve(spec, hf_token=hf_token, allowed_hosts=allowed_hosts)
        if not self.specs:
            raise ValueError(f"no shards found for {redact_spec(spec)!r}")
        self.shuffle, self.seed, self.resample = shuffle, seed, resample
        self.ctx = Context()

    def __len__(self) -> int:
        return len(self.specs)

    def bind(self, ctx: Context) -> None:
        self.ctx = ctx

    def __call__(self, _: Iterator[Any] | None = None) -> Iterator[dict[str, Any]]:
        c = self.ctx
        seed = c.seed if self.seed is None else self.seed
        n = len(self.specs)
        if self.resample:
            rng = random.Random(f"vlmstream.resample/{seed}/{c.epoch}/{c.rank}/{c.worker}")
            while True:
                yield {**self.item(rng.randrange(n)), "resampled": True}
        for i in epoch_order(n, seed, c.epoch, self.shuffle):
            yield self.item(i)

    def item(self, i: int) -> dict[str, Any]:
        """The item of shard ``i`` of the resolved list, as this stage yields it."""
        s = self.specs[i]
        return {"url": s.url, "shard": i, "samples": s.samples, "sha256": s.sha256, "bytes": s.bytes,
                "num_shards": len(self.specs)}
