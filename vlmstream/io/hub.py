"""hf:// on the Hugging Face Hub: parse and build hf:// URLs, pin a revision to its commit, list a repo, and turn a
file's URL into the Hub's resolve URL with the token to send. Through huggingface_hub, so the endpoint
(``HF_ENDPOINT``) and the token (``HF_TOKEN``, the token file) are its own."""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

import braceexpand

from ..errors import FormatError
from .patterns import glob_match, has_glob

# After "@": a revision is one path segment (percent-encode a "/" in it), except the Hub's special refs.
_HF_NAME_REV = re.compile(r"([^/@]+)(?:@(refs/(?:convert/[\w.-]+|pr/\d+)|[^/]+))?/(.+)")
_COMMIT = re.compile(r"[0-9a-f]{40}")


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


def pin_hf_revision(repo_type: str, repo_id: str, revision: str | None, token: str | bool | None) -> str:
    """The commit a revision (a branch, a tag, None: main) names now. Shard URLs carry it instead of the name,
    so every rank, worker and epoch reads the same files even if someone pushes to the branch mid-run."""
    if revision is not None and _COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi

    sha = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, token=token).sha
    if not sha:
        raise FormatError(f"hf://{repo_type}s/{repo_id}: the Hub named no commit for revision {revision or 'main'!r}")
    return sha


def list_hf(url: str, token: str | bool | None) -> list[str]:
    """The hf:// URLs of the files a pattern names (braces, and globs within one path segment), at the commit
    the revision names now. A name given in full must exist: a shard is never dropped silently."""
    from huggingface_hub import HfApi

    repo_type, repo_id, revision, pattern = parse_hf_url(url)
    revision = pin_hf_revision(repo_type, repo_id, revision, token)
    files = set(HfApi().list_repo_files(repo_id, repo_type=repo_type, revision=revision, token=token))
    wanted = set(braceexpand.braceexpand(pattern))
    missing = sorted(w for w in wanted if w not in files and not has_glob(w))
    if missing:
        raise FileNotFoundError(f"{url}: {len(missing)} named file(s) not in the repo, e.g. {missing[0]!r}")
    picked = sorted(f for f in files if f in wanted or any(glob_match(f, w) for w in wanted))
    return [hf_url(repo_type, repo_id, revision, f) for f in picked]


def read_hf_file(url: str, token: str | bool | None) -> tuple[str, bytes]:
    """(the file's hf:// URL pinned to the commit its revision names, its bytes): a manifest, read once."""
    from huggingface_hub import hf_hub_download

    repo_type, repo_id, revision, path = parse_hf_url(url)
    revision = pin_hf_revision(repo_type, repo_id, revision, token)
    local = hf_hub_download(repo_id, path, repo_type=repo_type, revision=revision, token=token)
    with open(local, "rb") as f:
        return hf_url(repo_type, repo_id, revision, path), f.read()


def hf_resolve_url(url: str, token: str | bool | None = None) -> tuple[str, str | None]:
    """hf://datasets/ORG/NAME[@REV]/PATH -> the Hub's resolve URL and the token to send (never logged).

    Both as huggingface_hub's own downloads: the endpoint from ``HF_ENDPOINT``; the token a string, none for
    False, else the user's (``HF_TOKEN``, the token file; True requires one; ``HF_HUB_DISABLE_IMPLICIT_TOKEN``).
    """
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import get_token_to_send

    repo_type, repo_id, revision, path = parse_hf_url(url)
    return hf_hub_url(repo_id, path, repo_type=repo_type, revision=revision), (get_token_to_send(token) or None)


__all__ = ["hf_resolve_url", "hf_url", "list_hf", "parse_hf_url", "pin_hf_revision", "read_hf_file"]
