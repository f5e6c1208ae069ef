"""Shard URLs: `open_url` turns one into a binary stream, whatever its scheme (a local path, file://, http(s)://,
hf://, or only if allowed pipe:); `resolve_entry` resolves a manifest's entry against the manifest, keeping a
remote manifest's entries on its own origin."""

from __future__ import annotations

import io
import os
import posixpath
import subprocess
import threading
from typing import BinaryIO, Sequence
from urllib.parse import SplitResult, urljoin, urlsplit

from ..errors import FetchError, FormatError, redact
from .http import FetchOptions, HTTPClient, HTTPStream
from .hub import hf_resolve_url, hf_url, parse_hf_url
from .store import DEFAULT_STORES, ObjectURL, Stores, is_store_url, signed_request


def open_url(url: str, *, client: HTTPClient | None = None, allow_pipe: bool = False, hf_token: str | bool | None = None,
             buffer_size: int = 1 << 20, start: int = 0, cancel: threading.Event | None = None,
             stores: Stores | None = None) -> BinaryIO:
    """Open a shard for reading from byte `start`: a local path, file://, http(s)://, hf://, an object store
    (s3://, gs://, az://, abfs://, through ``stores``: settings beside the environment's) or (only if allowed)
    pipe:. ``buffer_size=0``: unbuffered, where each ``readinto`` fills its buffer but at the end of the stream or
    (HTTP) just before an error; ``cancel`` ends an HTTP stream's wait for a retry."""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise FetchError(f"{redact(url)[:40]!r}: pipe: URLs run shell commands; pass allow_pipe=True to use them",
                             reason="pipe_refused")
        if start:
            raise FetchError(f"{redact(url)[:40]!r}: a pipe: stream cannot start at byte {start}", reason="pipe_refused")
        # buffered even for buffer_size=0: a pipe's raw reads are short, and a BufferedReader's fill the buffer
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, bufsize=buffer_size or io.DEFAULT_BUFFER_SIZE)
        return proc.stdout
    if is_store_url(url):  # signed HTTP requests: the same transfers, retries and resumes as http(s)
        stores = stores or DEFAULT_STORES
        stream = HTTPStream(url, client or HTTPClient(FetchOptions()), None, start, cancel,
                            signer=lambda: signed_request(url, stores))
        return io.BufferedReader(stream, buffer_size) if buffer_size else stream
    headers = None
    if url.startswith("hf://"):
        url, token = hf_resolve_url(url, hf_token)
        headers = {"Authorization": f"Bearer {token}"} if token else None
    if url.startswith(("http://", "https://")):
        client = client or HTTPClient(FetchOptions())
        stream = HTTPStream(url, client, headers, start, cancel)
        return io.BufferedReader(stream, buffer_size) if buffer_size else stream
    path = url[7:] if url.startswith("file://") else url
    try:
        f = open(path, "rb", buffering=buffer_size)
    except OSError as e:
        raise FetchError(f"{redact(path)}: {e.strerror}", reason="not_found" if isinstance(e, FileNotFoundError) else "io_error"
                         ) from None
    if start:
        f.seek(start)
    return f


# ----------------------------------------------------------------------------------------- manifest entries


def _is_url(s: str) -> bool:
    return "://" in s


def _is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "hf://")) or is_store_url(url)


def resolve_entry(base: str, rel: str, allowed_hosts: Sequence[str] = ()) -> str:
    """Resolve a manifest's shard URL against the manifest's own location.

    A local manifest is the user's own file: a relative path resolves against its folder, and an absolute path
    or URL is taken as it is. A remote one (http(s), hf://, an object store) is someone else's: its entries
    resolve as URLs, and must stay on its origin (scheme, host, port; for hf://, its repo at its commit; in a
    store, its bucket) or on a host (a bucket: "s3://other-bucket") in ``allowed_hosts``. Never a local file or
    another scheme: a remote list must not make us read the user's files, nor send their credentials elsewhere.
    """
    if not _is_remote(base):
        if _is_url(rel) or os.path.isabs(rel):
            return rel
        if _is_url(base):
            scheme, rest = base.split("://", 1)
            return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), rel))}"
        return os.path.normpath(os.path.join(os.path.dirname(base), rel))
    if base.startswith("hf://"):
        url = _join_hf(base, rel)
    elif is_store_url(base):
        url = _join_store(base, rel)
    else:
        url = _join_http(base, rel)
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


def _join_store(base: str, rel: str) -> str | None:
    """A key relative to a manifest in a bucket, kept inside the bucket; an absolute URL as it is."""
    if _is_url(rel):
        return rel
    b = ObjectURL.parse(base)
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(b.key), rel)).lstrip("/")
    if joined == ".." or joined.startswith("../"):
        return None
    return str(b.with_key(joined))


def _store_origin(url: str) -> tuple[str, str, str | None] | None:
    try:
        return ObjectURL.parse(url).origin if is_store_url(url) else None
    except ValueError:
        return None


def _http_origin(parts: SplitResult) -> tuple[str, str, int] | None:
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _same_origin(base: str, url: str) -> bool:
    try:
        if base.startswith("hf://"):
            return url.startswith("hf://") and parse_hf_url(url)[:3] == parse_hf_url(base)[:3]
        if is_store_url(base):
            return _store_origin(url) is not None and _store_origin(url) == _store_origin(base)
        origin = _http_origin(urlsplit(base))
        return origin is not None and _http_origin(urlsplit(url)) == origin
    except ValueError:
        return False


def _allowed(url: str, allowed_hosts: Sequence[str]) -> bool:
    """Whether an http(s) URL is on a host the user allowed: "host" (any port), "host:port" or "scheme://host[:port]";
    an object's, in a bucket the user allowed: "s3://bucket"."""
    if is_store_url(url):
        mine = _store_origin(url)
        return mine is not None and any(_store_origin(f"{a.rstrip('/')}/") == mine for a in allowed_hosts
                                        if is_store_url(a))
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
    if is_store_url(base):
        scheme, bucket, account = ObjectURL.parse(base).origin
        return f"{scheme}://{bucket}" + (f" of account {account}" if account else "")
    if base.startswith("hf://"):
        repo_type, repo_id, revision, _ = parse_hf_url(base)
        return f"{repo_type} {repo_id} at {revision or 'main'}"
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.hostname}:{_http_origin(parts)[2]}"
