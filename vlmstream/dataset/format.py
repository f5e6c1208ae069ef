"""The shard format: sample schema, manifest and shard names (docs/FORMAT.md is the prose of this file).

A sample is a group of tar members sharing a key. A conversation sample has a ``json`` member holding the
turns and the ordered image references, and one member per image (``KEY.0.jpg``, ``KEY.1.png``, ...).
img2dataset-style caption samples (``KEY.jpg`` + ``KEY.txt``) are read as they are, with no conversion.

What the packer (``tools/pack_shards.py``) writes, exactly:

- key: ``sample_key(i)``, the record's global index over all inputs in the order given, nine digits; records
  that were rejected keep their index, so keys can have gaps but never depend on how the pack was split.
- members, in this order: ``KEY.json`` (``encode_conversation``: UTF-8, sorted keys, no whitespace), then
  ``KEY.0.<ext>``, ``KEY.1.<ext>``, ... in placeholder order, ``ext`` from the format sniffed in the bytes
  (``PIL_FORMAT_EXT``), never from the input file name.
- ``meta``: ``source`` (the input path as given to the packer), ``position`` (0-based record index in that
  input), ``line`` (1-based line number, JSONL inputs only), then the record's own fields that are not part
  of the conversation (``id``, dataset ``source``, ...). A record field whose name collides with one of
  ``META_PROVENANCE`` is stored as ``record_<name>``.
  An image folder's samples carry ``file``, the image's path relative to the folder; a webdataset shard's
  carry ``tar_key``, the sample's key in the shard (``source`` is the shard's redacted URL, ``position`` the
  sample's rank in it).
- images: the input bytes unchanged, unless ``--max-side N`` and the long side exceeds N: then the image is
  turned by its EXIF orientation, downscaled to a long side of N and re-encoded, as PNG (RGBA) if it has
  alpha, else as JPEG (L or RGB, ``--jpeg-quality``).
- order: samples follow their output position, the global index itself or, with ``--shuffle --seed S``, its
  seeded permutation; each shard holds consecutive positions.
- tar headers: ustar (pax only where a name needs it), mtime 0, uid/gid 0, empty uname/gname, mode 0o644;
  the archive ends with two zero blocks, padded to a multiple of 10240 bytes like tarfile and GNU tar.
- shard names: ``shard_name(prefix, n, job, pack_id(shards))``, e.g. ``shard-3fa9c2e1-000000.tar``.
- ``rejects.jsonl`` (``rejects_name``): one JSON object per record not packed, in input order:
  ``{"source", "position", "line" (JSONL only), "tar_key" (webdataset shards only), "index", "reason"}``; an
  empty or blank caption's reason is ``EMPTY_CAPTION``.
- the manifest's informative ``packing`` key: ``inputs`` (``path``, detected ``format``, ``records``),
  ``records`` (all inputs), ``rejects``, ``empty_captions`` (of the rejects), ``shuffle_seed``, ``max_side``; a
  job's manifest adds ``job``, ``num_jobs`` and ``positions`` (the ``[start, stop)`` of output positions it
  packed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError, redact

FORMAT_NAME = "vlmstream-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "index.json"
IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")
# Extensions that hold encoded images, by the name of their last dotted part ("0.jpg" -> "jpg").
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
# Pillow's format name -> the extension we store it under.
# MPO is how Pillow names camera JPEGs that carry extra (multi-picture) frames: a JPEG file to any decoder.
PIL_FORMAT_EXT = {
    "JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif", "GIF": "gif",
}


# The reason of a caption sample whose caption is empty or blank (img2dataset writes an empty .txt for a missing
# caption): nothing to learn from, but not broken data either, so tokenize and inspect count it apart from errors
# and the packer rejects it under this name.
EMPTY_CAPTION = "empty_caption"
# Keys the packer puts in ``meta`` to say where a sample came from; a record's own fields never override them.
META_PROVENANCE = ("source", "position", "line", "tar_key")
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # archives are padded to whole records of 20 blocks, as tarfile and GNU tar do


@dataclass
class Conversation:
    """Turns plus the image members they refer to, in placeholder order."""

    messages: list[dict[str, str]]
    images: list[str] = field(default_factory=list)  # member extensions, e.g. ["0.jpg", "1.png"]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": self.messages, "images": self.images}
        if self.meta:
            out["meta"] = self.meta
        return out


def is_image_ext(ext: str) -> bool:
    return ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


def validate_conversation(conv: Conversation) -> None:
    """Raise FormatError unless the turns are well formed and placeholders match images one to one."""
    if not conv.messages:
        raise FormatError("empty conversation")
    placeholders = 0
    for i, m in enumerate(conv.messages):
        if not isinstance(m, Mapping) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise FormatError(f"turn {i}: expected {{'role', 'content'}}, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise FormatError(f"turn {i}: unknown role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise FormatError(f"turn {i}: content must be a string")
        placeholders += m["content"].count(IMAGE_PLACEHOLDER)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in conv.messages):
        raise FormatError("no assistant answer")
    if placeholders != len(conv.images):
        raise FormatError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(conv.images)} images",
                          reason="placeholder_mismatch")
    if len(set(conv.images)) != len(conv.images):
        raise FormatError(f"duplicate image references {conv.images}")


def encode_conversation(conv: Conversation) -> bytes:
    """The ``json`` member's bytes: one canonical encoding, so that equal conversations give equal shards."""
    return json.dumps(conv.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sample_key(index: int) -> str:
    """``000000042``: the key of the record with this global index."""
    if index < 0:
        raise ValueError(f"negative sample index {index}")
    return f"{index:09d}"


def image_member(index: int, pil_format: str) -> str:
    """``1.png``: the member extension of a conversation's index-th image, named after its real format."""
    try:
        return f"{index}.{PIL_FORMAT_EXT[pil_format]}"
    except KeyError:
        raise FormatError(f"unsupported image format {pil_format!r} (supported: {sorted(PIL_FORMAT_EXT)})") from None


def sample_members(conv: Conversation, images: list[bytes]) -> list[tuple[str, bytes]]:
    """The members of a conversation sample, in their tar order: ``json`` first, then the images in order."""
    if len(images) != len(conv.images):
        raise FormatError(f"{len(conv.images)} image references but {len(images)} images")
    return [("json", encode_conversation(conv)), *zip(conv.images, images)]


def conversation_from_sample(sample: Mapping[str, Any]) -> Conversation:
    """Read a streamed sample's conversation: our ``json`` schema, or an img2dataset caption sample.

    A caption sample (one image member, a ``txt`` caption) becomes a user turn holding only the image and an
    assistant turn holding the caption; its optional ``json`` metadata lands in ``meta``. A caption sample whose
    caption is empty or blank raises FormatError with reason ``EMPTY_CAPTION``: callers that stream LAION-style
    data (``vs.tokenize``, ``vlmstream inspect``) count it instead of treating it as an error.
    """
    where = f"{redact(str(sample.get('__url__', '?')))}: sample {sample.get('__key__', '?')!r}"
    raw = sample.get("json")
    doc = None
    if raw is not None:
        try:
            doc = json.loads(raw) if isinstance(raw, (bytes, bytearray, str)) else raw
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{where}: invalid json member: {e}",
                              reason="invalid_utf8" if isinstance(e, UnicodeDecodeError) else "invalid_json") from None
    if isinstance(doc, Mapping) and "messages" in doc:
        conv = Conversation(list(doc["messages"]), list(doc.get("images", [])), dict(doc.get("meta", {})))
        missing = [e for e in conv.images if e not in sample]
        if missing:
            raise FormatError(f"{where}: image members {missing} referenced but not in the sample",
                              reason="missing_image")
    else:
        images = sorted(k for k in sample if not k.startswith("__") and is_image_ext(k))
        if len(images) != 1 or "txt" not in sample:
            raise FormatError(f"{where}: neither a conversation (json with messages) nor a caption (image + txt)",
                              reason="bad_conversation")
        try:
            caption = _text(sample["txt"])
        except UnicodeDecodeError as e:
            raise FormatError(f"{where}: txt is not UTF-8: {e}", reason="invalid_utf8") from None
        if not caption.strip():
            raise FormatError(f"{where}: empty caption", reason=EMPTY_CAPTION)
        conv = Conversation(
            [{"role": "user", "content": IMAGE_PLACEHOLDER}, {"role": "assistant", "content": caption.strip()}],
            images,
            dict(doc) if isinstance(doc, Mapping) else {},
        )
    try:
        validate_conversation(conv)
    except FormatError as e:
        raise FormatError(f"{where}: {e}", reason=e.reason) from None
    return conv


def _text(v: bytes | str) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else v


# ---------------------------------------------------------------------------------------------- shard names


def shard_name(prefix: str, index: int, job: int | None = None, pack: str | None = None) -> str:
    """``prefix-000042.tar``; ``prefix-j0003-000042.tar`` for job 3 of a multi-job pack; with the pack id
    (``pack_id``) before the number, as the packer names them: ``prefix-3fa9c2e1-000042.tar``."""
    job_part = "" if job is None else f"-j{job:04d}"
    pack_part = "" if pack is None else f"-{pack}"
    return f"{prefix}{job_part}{pack_part}-{index:06d}.tar"


def pack_id(shards: Iterable[ShardInfo]) -> str:
    """Eight hex digits of a digest of the shards' sha256s, in order: the packer puts it in shard names, so a
    pack written over an older one does not take the name of a shard with other bytes (short of a one in 2**32
    clash; the old manifest stays true until the new one replaces it), while packing the same inputs again
    gives the same names and bytes."""
    return hashlib.sha256(" ".join(s.sha256 for s in shards).encode()).hexdigest()[:8]


def job_manifest_name(job: int) -> str:
    return f"index.j{job:04d}.json"


def rejects_name(job: int | None = None) -> str:
    """``rejects.jsonl``, or ``rejects.j0003.jsonl`` for job 3: one JSON line per record that was not packed."""
    return "rejects.jsonl" if job is None else f"rejects.j{job:04d}.jsonl"


# ------------------------------------------------------------------------------------------------ manifest


@dataclass
class ShardInfo:
    """One shard of a list: a manifest's entry (all fields known) or a listed URL (the rest None)."""

    url: str  # in a manifest: relative to the manifest's own location, or absolute
    samples: int | None = None
    bytes: int | None = None
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256}


def manifest_json(shards: Iterable[ShardInfo], **meta: Any) -> dict[str, Any]:
    shards = list(shards)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "samples": sum(s.samples for s in shards),
        "bytes": sum(s.bytes for s in shards),
        "num_shards": len(shards),
        **meta,
        "shards": [s.to_json() for s in shards],
    }


def write_manifest(path: str, shards: Iterable[ShardInfo], **meta: Any) -> dict[str, Any]:
    """Write atomically (temp file + rename) so a reader never sees half a manifest; on an error (a full
    disk, say) the temporary file is removed, not left beside the manifest."""
    doc = manifest_json(shards, **meta)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return doc


def parse_manifest(doc: Mapping[str, Any], where: str = "manifest") -> list[ShardInfo]:
    """Validate a manifest document and return its shards."""
    if doc.get("format") != FORMAT_NAME:
        raise FormatError(f"{where}: not a {FORMAT_NAME} manifest (format={doc.get('format')!r})")
    if doc.get("version") != FORMAT_VERSION:
        raise FormatError(f"{where}: manifest version {doc.get('version')!r}, this vlmstream reads {FORMAT_VERSION}")
    try:
        shards = [ShardInfo(s["url"], int(s["samples"]), int(s["bytes"]), s["sha256"]) for s in doc["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{where}: bad shard entry: {e!r}") from None
    if sum(s.samples for s in shards) != doc.get("samples"):
        raise FormatError(f"{where}: total samples {doc.get('samples')} != sum over shards")
    return shards


def read_manifest(path: str) -> tuple[dict[str, Any], list[ShardInfo]]:
    with open(path) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: invalid JSON: {e}") from None
    return doc, parse_manifest(doc, path)


def merge_manifests(paths: list[str], out_path: str) -> dict[str, Any]:
    """Join job manifests into one; shard URLs are rewritten relative to ``out_path``'s folder."""
    out_dir = os.path.dirname(os.path.abspath(out_path))
    shards: list[ShardInfo] = []
    seen: dict[str, str] = {}
    for p in paths:
        _, part = read_manifest(p)
        base = os.path.dirname(os.path.abspath(p))
        for s in part:
            url = s.url if "://" in s.url else os.path.relpath(os.path.join(base, s.url), out_dir)
            if url in seen:
                raise FormatError(f"{p}: shard {url} is already listed by {seen[url]}")
            seen[url] = p
            shards.append(ShardInfo(url, s.samples, s.bytes, s.sha256))
    return write_manifest(out_path, shards, merged_from=[os.path.relpath(p, out_dir) for p in paths])
