"""Error policies: what a stage does with bad input, ``on_error="raise" | "skip" | "warn"``.

One mechanism for every stage that meets bad input (`fetch`, `tar_samples`, `decode`, `tokenize`):

- ``"raise"`` (the default): the error propagates; its message names the shard (URL, credentials redacted),
  the sample key and byte offset where known, and the reason.
- ``"skip"``: the bad shard or sample is left out and counted in the stage's ``stats``: ``skipped[reason]``
  (events), ``samples_lost`` (samples, from the manifest's counts where a shard is cut short),
  ``unknown_losses`` (shards cut short whose sample count is not known) and ``errors`` (the last messages).
- ``"warn"``: as "skip", plus one WARNING line on the ``vlmstream`` logger naming shard, key and reason.

The exceptions every layer raises live here too, each with the ``reason`` a skip is counted under. docs/ERRORS.md
describes the policies, the reasons and the security rules. This module imports only the standard library (the
pack tool uses the format errors without torch).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Sequence
from urllib.parse import unquote_plus, urlsplit, urlunsplit

POLICIES = ("raise", "skip", "warn")
KEEP_ERRORS = 8  # messages kept in ``stats.errors``
log = logging.getLogger("vlmstream")

# A query parameter whose name says it carries a secret: signed URLs (S3's X-Amz-Signature, X-Amz-Credential,
# X-Amz-Security-Token; GCS's X-Goog-Signature, X-Goog-Credential; Azure SAS's sig), api_key, access_token ...
_SECRET_NAMES = r"[^=&\s'\"]*(?:token|sig|key|secret|passw|pwd|credential|auth)[^=&\s'\"]*|x-(?:amz|goog)-[^=&\s'\"]*"
_SECRET_NAME = re.compile(rf"(?i){_SECRET_NAMES}")
_SECRET_TEXT = (  # in text holding URLs (a pipe: command, a command line), rather than one URL
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/\s@'\"]*@"), r"\1"),
    (re.compile(rf"(?i)([?&;#](?:{_SECRET_NAMES})=)[^&;#\s'\"]*"), r"\1***"),
    (re.compile(r"(?i)(authorization:\s*(?:bearer|basic|token)?\s*)[^\s'\"]+"), r"\1***"),
)


def _redact_params(text: str) -> str:
    """``a=1&X-Goog-Signature=abc`` -> ``a=1&X-Goog-Signature=***``: the value of each secret-named parameter."""
    parts = text.split("&")
    for i, part in enumerate(parts):
        name, eq, _ = part.partition("=")
        if eq and _SECRET_NAME.fullmatch(unquote_plus(name)):
            parts[i] = f"{name}=***"
    return "&".join(parts)


def redact_text(text: str) -> str:
    """Text holding URLs (a ``pipe:`` command, a command line) with their userinfo, secret-named query values
    and ``Authorization:`` values replaced."""
    for pattern, repl in _SECRET_TEXT:
        text = pattern.sub(repl, text)
    return text


def redact(url: str) -> str:
    """The URL with credentials removed, fit for logs, errors, stats and state dicts: userinfo, and the value
    of each query (or fragment) parameter whose name holds token, sig, key, secret, password, credential or
    auth, or starts with x-amz- / x-goog-. A ``pipe:`` command (or a URL that does not parse) is redacted as
    text."""
    if url.startswith("pipe:"):
        return redact_text(url)
    if "@" not in url and "=" not in url:  # the common case: nothing to hide, nothing to parse
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced "[" in the host
        return redact_text(url)
    netloc = parts.netloc.rsplit("@", 1)[-1] if "@" in parts.netloc else parts.netloc
    return urlunsplit((parts.scheme, netloc, parts.path, _redact_params(parts.query), _redact_params(parts.fragment)))


def redact_spec(spec: str | Sequence[str]) -> str | list[str]:
    """A shard spec (a URL or pattern, or a list of them) as reports and errors show it."""
    return redact(spec) if isinstance(spec, str) else [redact(s) for s in spec]


class Reasoned:
    """Mixed into vlmstream's errors: ``reason`` is the short key a skip is counted under."""

    reason = "error"

    def __init__(self, *args: Any, reason: str | None = None):
        super().__init__(*args)
        if reason is not None:
            self.reason = reason  # an instance attribute: survives pickling (DataLoader workers)


class FormatError(Reasoned, ValueError):
    """A sample, record or manifest that breaks the format; the message says what and where, ``reason`` the
    short key it is counted under when skipped (e.g. "placeholder_mismatch", "invalid_json")."""


class TarError(FormatError):
    """A shard that is not a readable tar (or breaks the grouping rules); the message names URL, offset, reason.
    ``reason`` "changed": the shard no longer holds what a checkpoint recorded (never skipped)."""


class FetchError(Reasoned, IOError):
    """A shard could not be read; the message names the (redacted) URL and what happened.

    ``reason``: "retries_exhausted", "http_error" (a status that is not retried), "changed" (ETag), "bad_range",
    "redirects", "redirect_refused" (to a scheme other than http(s)), "bad_url" (cannot be a request),
    "bad_response" (an answer http.client cannot read), "bad_certificate", "not_found", "io_error",
    "checksum" (a shard read into the cache does not match the manifest), "cancelled" (its reader closed it
    while a retry waited), or "pipe_refused" (never skipped: a set-up error).
    """


class DecodeError(Reasoned, ValueError):
    """A member could not be decoded; the message names shard, key, member and reason. ``reason``:
    "corrupt_image", "decompression_bomb", "corrupt_gzip", "invalid_json", "invalid_utf8", "unpickle_failed",
    "decode_failed"."""


def reason_of(exc: BaseException, default: str = "error") -> str:
    return getattr(exc, "reason", None) or default


def check_policy(on_error: str) -> str:
    if on_error not in POLICIES:
        raise ValueError(f"on_error must be one of {POLICIES}, not {on_error!r}")
    return on_error


@dataclass
class ErrorCounts:
    """What a stage skipped under ``on_error="skip"`` or ``"warn"`` (a base of each stage's stats)."""

    skipped: dict[str, int] = field(default_factory=dict)  # reason -> events (a shard cut short counts once)
    samples_lost: int = 0  # samples left out, counted from the manifest where a shard is cut short
    unknown_losses: int = 0  # shards cut short whose remaining sample count is not known (no manifest)
    errors: list[str] = field(default_factory=list)  # the last KEEP_ERRORS messages


def handle(policy: str, exc: BaseException, stats: ErrorCounts, stage: str, lost: int | None = 1,
           note: str = "") -> None:
    """Apply ``policy`` to ``exc``: raise it, or count it in ``stats`` (and log it for "warn").

    ``lost``: samples this costs (None: not known); ``note`` is appended to the kept message.
    """
    if policy == "raise":
        raise exc
    reason = reason_of(exc)
    stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
    if lost is None:
        stats.unknown_losses += 1
    else:
        stats.samples_lost += lost
    message = f"{exc}{note}"
    stats.errors.append(message)
    del stats.errors[:-KEEP_ERRORS]
    if policy == "warn":
        log.warning("%s skipped (%s): %s", stage, reason, message)


__all__ = ["DecodeError", "ErrorCounts", "FetchError", "FormatError", "POLICIES", "Reasoned", "TarError",
           "check_policy", "handle", "log", "reason_of", "redact", "redact_spec", "redact_text"]
