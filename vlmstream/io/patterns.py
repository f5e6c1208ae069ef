"""Glob patterns over slash-separated names (object keys, repo paths), matched as local paths are: "*", "?" and
"[...]" within one path segment, never across "/"."""

from __future__ import annotations

import fnmatch

GLOB_CHARS = "*?["


def has_glob(pattern: str) -> bool:
    return any(c in pattern for c in GLOB_CHARS)


def glob_match(path: str, pattern: str) -> bool:
    parts, pats = path.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(fnmatch.fnmatchcase(a, p) for a, p in zip(parts, pats))


def fixed_prefix(pattern: str) -> str:
    """The part of a pattern before its first glob character: what a listing can be narrowed to."""
    cut = min((pattern.index(c) for c in GLOB_CHARS if c in pattern), default=len(pattern))
    return pattern[:cut]


__all__ = ["GLOB_CHARS", "fixed_prefix", "glob_match", "has_glob"]
