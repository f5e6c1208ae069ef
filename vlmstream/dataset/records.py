"""Read the image-text schemas people already have and turn each record into a sample.

Two steps, split so that the cheap one runs once in the main process and the costly one in worker processes:

1. ``read_records(inp)`` walks an input (JSON array, JSONL, image folder, Parquet, a webdataset shard) and yields
   one ``Record`` per input record, in input order: the turns as a ``Conversation`` (images still unnamed) and
   the image sources (file paths, or bytes embedded in Parquet or a shard), or the reason the record is bad.
   Nothing is skipped silently.
2. ``convert(record)`` reads and checks the images, names them after their real format and returns the
   sample's tar members, or a reject saying why not.

The chat schemas differ mostly by field names, so they share one parser driven by ``CHAT_FIELDS``.
"""

from __future__ import annotations

import codecs
import functools
import io
import json
import math
import os
import stat
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import braceexpand

from ..errors import FormatError, TarError, redact
from ..io.tar import BadSample, group_samples, iter_members
from ..io.urls import open_url
from .format import (
    EMPTY_CAPTION,
    FORMAT_NAME,
    IMAGE_EXTS,
    IMAGE_PLACEHOLDER,
    META_PROVENANCE,
    Conversation,
    image_member,
    is_image_ext,
    sample_key,
    sample_members,
    validate_conversation,
)
from .shardlist import resolve
from .writer import sample_bytes

SCHEMAS = ("llava", "sharegpt", "finevision", "caption")  # record schemas of JSON / JSONL inputs
FORMATS = (*SCHEMAS, "folder", "parquet", "webdataset")  # what --format can name
FORMAT_ALIASES = {"wds": "webdataset"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # names of webdataset shards, told by their extension
PARQUET_BATCH_ROWS = 64  # rows per Parquet read: bounds memory when rows embed large images
MAX_IMAGE_BYTES = 256 << 20  # bytes of one image at most, by default: far above any photo, far below memory
MAX_CAPTION_BYTES = 16 << 20  # bytes of an image folder's caption file at most: far above any caption

# chat schema -> (turn list fields tried in order, image field); turns may be {role, content} or {from, value}.
CHAT_FIELDS = {
    "llava": (("conversations",), "image"),
    "sharegpt": (("messages", "conversations"), "images"),
}
# schema -> the fields of which a record needs at least one; a record with none is of an unknown schema
REQUIRED_FIELDS = {
    "llava": ("conversations",),
    "sharegpt": ("messages", "conversations"),
    "finevision": ("texts",),
    "caption": ("caption",),
}
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Record:
    """One input record, read but not converted: small to send to a worker process."""

    source: str  # the input path as given
    position: int  # 0-based record index in that input
    line: int | None = None  # 1-based line number (JSONL)
    conversation: Conversation | None = None  # turns and meta; ``images`` is filled by ``convert``
    images: list[str | bytes] = field(default_factory=list)  # file paths, or encoded bytes from Parquet
    error: str | None = None  # why the record cannot be packed, found while reading it
    index: int = 0  # global index over all inputs (the sample key), set by the caller
    image_root: str | None = None  # the folder its image paths were resolved against, and must stay in
    tar_key: str | None = None  # a webdataset shard's sample: its key there

    def reject(self, reason: str) -> dict[str, Any]:
        """The line ``rejects.jsonl`` gets for this record."""
        out: dict[str, Any] = {"source": self.source, "position": self.position}
        if self.line is not None:
            out["line"] = self.line
        if self.tar_key is not None:
            out["tar_key"] = self.tar_key
        out.update(index=self.index, reason=reason)
        return out


@dataclass(frozen=True)
class Input:
    """An input file or folder, or one webdataset shard, its detected format and its record count."""

    path: str  # a webdataset shard's URL as it is read (``redact`` it to show it)
    format: str  # one of FORMATS
    image_root: str | None  # relative image paths are resolved against this folder; None for shards
    count: int | None  # None: a shard not counted yet (counted by reading it: ``count_records``)


# ---------------------------------------------------------------------------------------- record -> turns


def schema_of(rec: Mapping[str, Any]) -> str | None:
    """Which schema a record's keys say it is in, or None."""
    if "texts" in rec:
        return "finevision"
    if "messages" in rec or ("conversations" in rec and "images" in rec):
        return "sharegpt"
    if "conversations" in rec:
        return "llava"
    if "caption" in rec and "image" in rec:
        return "caption"
    return None


def parse_record(rec: Any, schema: str) -> tuple[list[dict[str, str]], list[Any], set[str]]:
    """Turns, image references (paths as written) and the fields used, of one record in ``schema``."""
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}, expected one of {SCHEMAS}")
    if not isinstance(rec, dict):
        raise FormatError(f"record is a JSON {type(rec).__name__}, not an object")
    if not any(k in rec for k in REQUIRED_FIELDS[schema]):
        need = " or ".join(map(repr, REQUIRED_FIELDS[schema]))
        raise FormatError(f"unknown schema: keys {sorted(map(str, rec))}, a {schema} record needs {need}")
    if schema in CHAT_FIELDS:
        turn_fields, image_field = CHAT_FIELDS[schema]
        turns_key = next(k for k in turn_fields if k in rec)
        messages = _chat_turns(rec[turns_key])
        used = {turns_key, image_field}
        if schema == "sharegpt" and isinstance(rec.get("system"), str):  # LLaMA-Factory's system prompt column
            used.add("system")
            if rec["system"]:
                messages.insert(0, {"role": "system", "content": rec["system"]})
        return messages, _image_list(rec.get(image_field)), used
    if schema == "finevision":
        return _finevision_turns(rec), _image_list(rec.get("images")), {"texts", "images"}
    if schema == "caption":
        caption = rec.get("caption")
        if not isinstance(caption, str):
            raise FormatError("caption must be a string")
        if not caption.strip():  # a reject named apart: LAION-style data has many, and they are not broken records
            raise FormatError(EMPTY_CAPTION, reason=EMPTY_CAPTION)
        messages = [{"role": "user", "content": IMAGE_PLACEHOLDER}, {"role": "assistant", "content": caption.strip()}]
        return messages, _image_list(rec.get("image")), {"image", "caption"}


def _chat_turns(turns: Any) -> list[dict[str, str]]:
    if not isinstance(turns, list):
        raise FormatError(f"turns must be a list, got {type(turns).__name__}")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise FormatError(f"turn {i} is not an object")
        role, content = t.get("role", t.get("from")), t.get("content", t.get("value"))
        if role not in ROLE_NAMES:
            raise FormatError(f"turn {i}: unknown role {role!r}")
        if not isinstance(content, str):
            raise FormatError(f"turn {i}: content must be a string")
        out.append({"role": ROLE_NAMES[role], "content": content})
    return out


def _finevision_turns(rec: Mapping[str, Any]) -> list[dict[str, str]]:
    """FineVision texts have no placeholders: the images go first in the first user turn (as nanoVLM does)."""
    texts = rec.get("texts")
    if not isinstance(texts, list):
        raise FormatError("texts must be a list of {user, assistant}")
    messages = []
    for i, t in enumerate(texts):
        if not isinstance(t, dict) or not isinstance(t.get("user"), str) or not isinstance(t.get("assistant"), str):
            raise FormatError(f"texts[{i}]: expected string user and assistant")
        messages += [{"role": "user", "content": t["user"]}, {"role": "assistant", "content": t["assistant"]}]
    images = rec.get("images") or []
    if messages and isinstance(images, list):
        messages[0]["content"] = IMAGE_PLACEHOLDER * len(images) + messages[0]["content"]
    return messages


def _image_list(value: Any) -> list[Any]:
    """Image references: absent, one, or a list; each a path, bytes, or a {bytes, path} struct (Parquet)."""
    if value is None:
        return []
    refs = value if isinstance(value, list) else [value]
    for i, ref in enumerate(refs):
        ok = (isinstance(ref, str) and ref) or isinstance(ref, bytes)
        ok = ok or (isinstance(ref, dict) and (isinstance(ref.get("bytes"), bytes) or isinstance(ref.get("path"), str)))
        if not ok:
            raise FormatError(f"image {i}: expected a path, got {ref!r:.60}")
    return refs


def _resolve(ref: Any, root: str) -> str | bytes:
    if isinstance(ref, dict):
        ref = ref["bytes"] if isinstance(ref.get("bytes"), bytes) else ref["path"]
    return ref if isinstance(ref, bytes) else os.path.join(root, ref)


def make_record(
    raw: Any, schema: str, source: str, position: int, root: str, line: int | None = None
) -> Record:
    """A Record from one parsed input record; schema problems become the record's error, not an exception."""
    rec = Record(source, position, line, image_root=root)
    try:
        messages, refs, used = parse_record(raw, schema)
        meta: dict[str, Any] = {"source": source, "position": position}
        if line is not None:
            meta["line"] = line
        for k, v in raw.items():
            if k not in used:
                meta[f"record_{k}" if k in META_PROVENANCE else str(k)] = plain_json(v)
        rec.conversation = Conversation(messages, [], meta)
        rec.images = [_resolve(r, root) for r in refs]
    except FormatError as e:
        rec.error = str(e)
    return rec


def plain_json(v: Any) -> Any:
    """A value JSON can hold exactly: NaN and infinities become null, other non-JSON types their str()."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): plain_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain_json(x) for x in v]
    return str(v)


# ------------------------------------------------------------------------------------------ input files


def open_inputs(spec: str, fmt: str | None = None, image_root: str | None = None) -> list[Input]:
    """The inputs one INPUT names: itself (``open_input``), or webdataset shards, one Input per shard in the
    order listed, where ``fmt`` is "webdataset" (or "wds") or, with no ``fmt``, where ``spec`` is a URL, a
    manifest (``index.json``) or names tar files (``.tar``, ``.tar.gz``, ``.tgz``; brace patterns and globs too).
    A shard's count comes from its manifest, or is left to ``count_records``: reading a shard costs a pass."""
    fmt = FORMAT_ALIASES.get(fmt, fmt) if fmt else fmt
    if fmt != "webdataset" and not (fmt is None and _is_webdataset_spec(spec)):
        return [open_input(spec, fmt, image_root)]
    shards = resolve(spec)  # brace patterns, globs, manifests, hf://, buckets: as vs.shards reads them
    if not shards:
        raise FormatError(f"{redact(spec)}: no shards found")
    for s in shards:
        if fmt is None and not s.url.lower().endswith(TAR_SUFFIXES):
            raise FormatError(f"{redact(s.url)}: not a webdataset shard ({', '.join(TAR_SUFFIXES)}); "
                              "--format webdataset reads it as one")
        if "://" not in s.url and not os.path.isfile(s.url):
            raise FormatError(f"{s.url}: no such file")
    return [Input(s.url, "webdataset", None, s.samples) for s in shards]


def _is_webdataset_spec(spec: str) -> bool:
    """A URL (the packer reads only shards and manifests remotely), tar names (every name of a brace pattern),
    or a local vlmstream manifest."""
    if "://" in spec or all(name.lower().endswith(TAR_SUFFIXES) for name in braceexpand.braceexpand(spec)):
        return True
    return spec.endswith(".json") and os.path.isfile(spec) and _is_manifest(spec)


def _is_manifest(path: str) -> bool:
    """Whether a JSON file is a vlmstream manifest rather than records: told from its first line where that is a
    whole JSON value (JSONL, or a manifest on one line), else from the whole file (an indented manifest; a JSON
    array of records is told from its first character)."""
    if _is_json_array(path):
        return False
    with open(path, "rb") as f:
        first = f.readline()
        try:
            doc = json.loads(first)
        except (UnicodeDecodeError, json.JSONDecodeError):
            f.seek(0)
            try:
                doc = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError):
                return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT_NAME


def open_input(path: str, fmt: str | None = None, image_root: str | None = None) -> Input:
    """Detect an input's format (``fmt`` if given; else folder, ``.parquet``, then the keys of the first JSON
    record) and count its records, so that global indices and job shares are known before packing."""
    fmt = FORMAT_ALIASES.get(fmt, fmt) if fmt else fmt
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}, expected one of {FORMATS}")
    if fmt == "webdataset":
        return Input(path, "webdataset", None, None)
    if path.lower().endswith(TAR_SUFFIXES) and fmt is not None:
        raise FormatError(f"{path}: a tar file (webdataset shards), but --format {fmt} names another format; "
                          "leave --format out or name --format webdataset")
    if os.path.isdir(path):
        if fmt not in (None, "folder"):
            raise FormatError(f"{path}: a folder, but --format {fmt} names a file format")
        return Input(path, "folder", path, len(_folder_images(path)))  # captions' images are beside them
    if not os.path.isfile(path):
        raise FormatError(f"{path}: no such file or folder")
    root = image_root if image_root is not None else os.path.dirname(path)
    if fmt == "parquet" or (fmt in (None, "finevision") and path.endswith(".parquet")):
        return Input(path, "parquet", root, _parquet_file(path).metadata.num_rows)
    if fmt == "folder":
        raise FormatError(f"{path}: --format folder needs a folder")
    count, schema, first_keys = _count_json(path), fmt, None
    if schema is None:
        with closing(_json_items(path)) as items:
            for _, _, raw in items:  # the first record of a known schema decides; others before it are rejects
                if isinstance(raw, dict):
                    schema, first_keys = schema_of(raw), first_keys or sorted(raw)
                    if schema is not None:
                        break
    if schema is None and count:
        raise FormatError(
            f"{path}: no record in a known schema (first record's keys: {first_keys}); name it with --format"
        )
    return Input(path, schema or "llava", root, count)  # an empty file has no records to read in any schema


def read_records(
    inp: Input, want: Callable[[int], bool] | None = None, allow_outside_root: bool = False
) -> Iterator[Record]:
    """Yield a Record per input record in order; positions ``want`` rejects are skipped before any parsing.
    An image folder's caption files are read as ``convert`` reads images (``allow_outside_root`` likewise)."""
    want = want or (lambda _: True)
    if inp.format == "folder":
        yield from _read_folder(inp, want, allow_outside_root)
    elif inp.format == "webdataset":
        yield from _read_webdataset(inp, want)
    elif inp.format == "parquet":
        yield from _read_parquet(inp, want)
    else:
        for position, line, raw in _json_items(inp.path, want):
            if isinstance(raw, _Bad):
                yield Record(inp.path, position, line, error=raw.reason)
            else:
                yield make_record(raw, inp.format, inp.path, position, inp.image_root, line)


@dataclass
class _Bad:
    reason: str


def _is_json_array(path: str) -> bool:
    """A JSON array or JSONL? Told by the first character, whatever the file's extension."""
    with open(path, "rb") as f:
        return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def _count_json(path: str) -> int:
    """Records in a JSON array (parsed) or JSONL file (non-blank lines, not parsed)."""
    if _is_json_array(path):
        return sum(1 for _ in _json_array(path))
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _json_items(path: str, want: Callable[[int], bool] | None = None) -> Iterator[tuple[int, int | None, Any]]:
    """(position, line or None, parsed record or _Bad) of a JSON array or JSONL file; positions ``want``
    rejects are not yielded (nor parsed, in JSONL)."""
    if _is_json_array(path):
        yield from ((i, None, raw) for i, raw in enumerate(_json_array(path)) if want is None or want(i))
        return
    position = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if want is None or want(position):
                yield position, number, _json_line(line)
            position += 1


def _json_line(line: bytes) -> Any:
    try:
        return json.loads(line.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        return _Bad(f"invalid UTF-8: {e}")
    except json.JSONDecodeError as e:
        return _Bad(f"invalid JSON: {e}")


def _json_array(path: str, chunk: int = 1 << 20) -> Iterator[Any]:
    """The elements of a top-level JSON array, parsed one at a time: a 1 GB LLaVA file is never held whole.

    The bytes are decoded here, not by a text-mode file, so that a byte that is not UTF-8 is reported with the
    file, line and byte offset where it lies instead of as a bare UnicodeDecodeError.
    """
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        buf, pos, eof, count = "", 0, False, 0
        raw = f.read(3)  # a UTF-8 byte order mark is skipped, as "utf-8-sig" does
        offset = 3 if raw == codecs.BOM_UTF8 else 0  # file offset of raw[0]: bytes read but not yet decoded
        raw = b"" if offset else raw
        lines = 0  # newlines in the bytes before raw

        def more() -> None:
            nonlocal buf, pos, eof, raw, offset, lines
            data = f.read(max(chunk, len(buf) - pos))  # grows geometrically for an element larger than a chunk
            eof = not data
            raw += data
            try:
                text, used = codecs.utf_8_decode(raw, "strict", eof)  # a character cut by the chunk waits
            except UnicodeDecodeError as e:
                line = lines + raw.count(b"\n", 0, e.start) + 1
                raise FormatError(
                    f"{path}: invalid UTF-8 at line {line}, byte {offset + e.start}: {e.reason}"
                ) from None
            lines += raw.count(b"\n", 0, used)
            offset += used
            raw = raw[used:]
            buf, pos = buf[pos:] + text, 0

        def next_char() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof:
                    return buf[pos] if pos < len(buf) else ""
                more()

        def fail(what: str) -> FormatError:
            return FormatError(f"{path}: invalid JSON array at element {count}: {what}")

        if next_char() != "[":
            raise fail("expected '['")
        pos += 1
        if next_char() == "]":
            return
        while True:
            next_char()
            try:
                value, end = decoder.raw_decode(buf, pos)
                # A number followed by nothing, or by what could continue it, may go on in the next chunk.
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                complete = eof or (end < len(buf) and not (number and buf[end] in "0123456789.eE+-"))
            except json.JSONDecodeError as e:
                if eof:
                    raise fail(str(e)) from None
                complete = False
            if not complete:
                more()
                continue
            pos = end
            yield value
            count += 1
            c = next_char()
            if c == "]":
                return
            if c != ",":
                raise fail(f"expected ',' or ']', got {c!r}" if c else "unexpected end of file")
            pos += 1


# ------------------------------------------------------------------------------------------ image folder


def _folder_images(path: str) -> list[str]:
    """Image files under ``path`` (by extension), as sorted relative POSIX paths."""
    found = []
    for dirpath, _, files in os.walk(path):
        rel = os.path.relpath(dirpath, path)
        for name in files:
            if "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTS:
                found.append(name if rel == "." else os.path.join(rel, name).replace(os.sep, "/"))
    return sorted(found)


def _read_folder(inp: Input, want: Callable[[int], bool], allow_outside_root: bool = False) -> Iterator[Record]:
    root = None if allow_outside_root else inp.image_root
    for position, rel in enumerate(_folder_images(inp.path)):
        if not want(position):
            continue
        txt = os.path.join(inp.path, rel.rsplit(".", 1)[0] + ".txt")
        try:
            caption = _read_regular_file(txt, MAX_CAPTION_BYTES, root, "caption").decode("utf-8-sig")
        except FileNotFoundError:
            yield Record(inp.path, position, error=f"{rel}: no caption file {os.path.basename(txt)}")
            continue
        except FormatError as e:
            yield Record(inp.path, position, error=f"{rel}: {e}")
            continue
        except UnicodeDecodeError as e:
            yield Record(inp.path, position, error=f"{rel}: unreadable caption: {e}")
            continue
        raw = {"image": rel, "caption": caption, "file": rel}
        yield make_record(raw, "caption", inp.path, position, inp.image_root)


# ------------------------------------------------------------------------------------------------ parquet


def _parquet_file(path: str):
    import pyarrow.parquet as pq  # only Parquet inputs need pyarrow

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise FormatError(f"{path}: not a Parquet file: {e}") from None
    missing = {"images", "texts"} - set(pf.schema_arrow.names)
    if missing:
        raise FormatError(f"{path}: Parquet without the FineVision columns {sorted(missing)}")
    return pf


def _read_parquet(inp: Input, want: Callable[[int], bool]) -> Iterator[Record]:
    """FineVision rows: ``images`` list<struct{bytes, path}>, ``texts`` list<struct{user, assistant}>, other
    columns to meta. Read ``PARQUET_BATCH_ROWS`` rows at a time, never the whole file."""
    start = 0
    for batch in _parquet_file(inp.path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
        wanted = [i for i in range(batch.num_rows) if want(start + i)]
        if wanted:
            for i, row in zip(wanted, batch.take(wanted).to_pylist()):
                yield make_record(row, "finevision", inp.path, start + i, inp.image_root)
        start += batch.num_rows


# ------------------------------------------------------------------------------------ webdataset shards


def _shard_samples(url: str) -> Iterator[dict[str, Any] | BadSample | _Bad]:
    """A shard's samples, grouped by webdataset's rules (io/tar.py), bad ones included as ``BadSample``; where
    the shard breaks (a bad header, a truncated member or gzip stream), one ``_Bad`` stands for the rest of it.
    A shard that cannot be fetched (missing, HTTP errors after the retries) raises: the pack stops."""
    shown = redact(url)
    with open_url(url) as f:
        try:
            yield from group_samples(iter_members(f, shown), shown, bad="yield")
        except TarError as e:
            yield _Bad(f"the rest of the shard is unreadable: {e}")


def count_records(inp: Input) -> int:
    """The records of a shard not counted yet (``Input.count`` None): its samples, by reading it."""
    if inp.count is not None:
        return inp.count
    with closing(_shard_samples(inp.path)) as samples:
        return sum(1 for _ in samples)


def _read_webdataset(inp: Input, want: Callable[[int], bool]) -> Iterator[Record]:
    """One Record per sample of the shard (``webdataset_record``), its position the sample's rank in the shard;
    a shard that holds another number of samples than it was counted with is an error, since the global
    indices of every later input were computed from that count."""
    source = redact(inp.path)
    read = 0
    with closing(_shard_samples(inp.path)) as samples:
        for position, sample in enumerate(samples):
            read = position + 1
            if not want(position):
                continue
            if isinstance(sample, _Bad):
                yield Record(source, position, error=sample.reason)
            elif isinstance(sample, BadSample):
                yield Record(source, position, error=str(sample.error), tar_key=sample.key)
            else:
                yield webdataset_record(sample, source, position)
    if inp.count is not None and read != inp.count:
        raise FormatError(f"{source}: {read} samples, but {inp.count} when it was counted (by its manifest or a "
                          "first reading): the shard changed, or does not match its manifest")


def webdataset_record(sample: Mapping[str, Any], source: str, position: int) -> Record:
    """A Record from one webdataset sample: our conversation JSON (a ``json`` member with ``messages`` and the
    image members it names) as it is, else a caption sample: every image member in tar order (by extension,
    ``is_image_ext``), the caption from ``txt`` or else from the ``json`` member's ``caption``, the ``json``'s
    other fields (img2dataset's url, key, width, height, status, exif, ...) into ``meta``. Other members
    (``.cls``, ``.npy``, ...) are not carried over."""
    key = str(sample["__key__"])
    rec = Record(source, position, tar_key=key)
    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    try:
        doc = _json_member(members.get("json"))
        if doc is not None and "messages" in doc:
            messages = doc["messages"]
            if not isinstance(messages, list):
                raise FormatError(f"json messages must be a list, got {type(messages).__name__}")
            images = doc.get("images", [])
            if not isinstance(images, list) or not all(isinstance(e, str) for e in images):
                raise FormatError("json images must be a list of member names")
            missing = [e for e in images if e not in members]
            if missing:
                raise FormatError(f"image members {missing} referenced but not in the sample")
            old_meta = doc.get("meta")
            fields = {**(old_meta if isinstance(old_meta, dict) else {}),
                      **{k: v for k, v in doc.items() if k not in ("messages", "images", "meta")}}
            rec.images = [members[e] for e in images]
        else:
            images = [k for k in members if is_image_ext(k)]
            if not images:
                raise FormatError(f"no image member (members: {sorted(members)})")
            caption, fields = _caption(members, doc or {})
            messages = [{"role": "user", "content": IMAGE_PLACEHOLDER * len(images)},
                        {"role": "assistant", "content": caption.strip()}]
            rec.images = [members[e] for e in images]
        meta: dict[str, Any] = {"source": source, "position": position, "tar_key": key}
        for k, v in fields.items():
            meta[f"record_{k}" if k in META_PROVENANCE else str(k)] = plain_json(v)
        rec.conversation = Conversation(messages, [], meta)
    except FormatError as e:
        rec.error, rec.images = str(e), []
    return rec


def _json_member(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError as e:
        raise FormatError(f"json member is not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"invalid json member: {e}") from None
    if not isinstance(doc, dict):
        raise FormatError(f"json member is a JSON {type(doc).__name__}, not an object")
    return doc


def _caption(members: Mapping[str, bytes], doc: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(caption, the json fields left for meta): the ``txt`` member, else the json's ``caption``. An empty or
    blank one (img2dataset's empty txt, a null caption) is the reject ``EMPTY_CAPTION``. The json's caption
    stays in meta only where it differs from the caption taken (img2dataset writes the same text to both)."""
    if "txt" in members:
        try:
            caption = members["txt"].decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise FormatError(f"txt member is not UTF-8: {e}") from None
    elif "caption" in doc:
        caption = doc["caption"] if doc["caption"] is not None else ""
        if not isinstance(caption, str):
            raise FormatError(f"json caption is a JSON {type(caption).__name__}, not a string")
    else:
        raise FormatError(f"no caption: neither a txt member nor a json caption (members: {sorted(members)})")
    if not caption.strip():
        raise FormatError(EMPTY_CAPTION, reason=EMPTY_CAPTION)
    same = isinstance(doc.get("caption"), str) and doc["caption"].strip() == caption.strip()
    return caption, {k: v for k, v in doc.items() if not (k == "caption" and same)}


# ----------------------------------------------------------------------------------- record -> sample


def read_image_file(path: str, max_bytes: int = MAX_IMAGE_BYTES, root: str | None = None) -> bytes:
    """The bytes of an image file: a regular file of at most ``max_bytes`` bytes and, when ``root`` is given,
    one whose real path (symlinks resolved) lies under ``root``'s; anything else is a FormatError.

    Input records name their images, and a record can name anything: /dev/zero would be read until memory
    runs out, a FIFO would block the packer forever, and ``../`` or a symlink would reach files nobody chose
    to pack. So the file is opened without blocking, checked with fstat (the file opened, not a path that
    could change), and read no further than one byte past the limit.
    """
    try:
        return _read_regular_file(path, max_bytes, root, "image", "--max-image-bytes")
    except FileNotFoundError:
        raise FormatError(f"missing image {path}") from None


def _read_regular_file(
    path: str, max_bytes: int, root: str | None, what: str, option: str | None = None
) -> bytes:
    """``read_image_file`` for any file an input names: ``what`` it is and the ``option`` that sets
    ``max_bytes`` are for the messages; FileNotFoundError is left to the caller, which knows what a missing
    file means."""
    if "\0" in path:
        raise FormatError(f"bad {what} path {path!r}: a NUL character")
    opened = path
    if root is not None:
        opened, real_root = os.path.realpath(path), _realpath(root)
        if os.path.commonpath([opened, real_root]) != real_root:
            raise FormatError(f"{what} {path} is outside the image root {real_root} (it resolves to {opened}; "
                              "--allow-outside-root reads it)")
    try:  # without blocking: a FIFO opens at once (and is then refused) instead of waiting for a writer
        fd = os.open(opened, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise FormatError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{what} {path} is not a regular file but a {_file_kind(st.st_mode)}")
        if st.st_size > max_bytes:
            raise FormatError(_too_large(f"{what} {path}", max_bytes, st.st_size, option))
        data = _read_at_most(fd, max_bytes + 1, st.st_size)
    except OSError as e:
        raise FormatError(f"cannot read {what} {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # longer than fstat said: growing, or a size the kernel does not know (/proc)
        raise FormatError(_too_large(f"{what} {path} is", max_bytes, None, option))
    return data


def _read_at_most(fd: int, limit: int, size_hint: int) -> bytes:
    """Up to ``limit`` bytes of ``fd``; the first read asks for one byte more than ``size_hint``, so a file of
    the size fstat gave takes one read and one to see its end."""
    parts, total, want = [], 0, min(size_hint + 1, limit)
    while total < limit:
        part = os.read(fd, min(want, limit - total))
        if not part:
            break
        parts.append(part)
        total += len(part)
        want = 1 << 20
    return b"".join(parts)


@functools.lru_cache(maxsize=64)
def _realpath(folder: str) -> str:
    """A root's real path, resolved once per worker rather than once per image."""
    return os.path.realpath(folder)


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")]
    return next((name for test, name in kinds if test(mode)), f"file of mode {mode:o}")


def _too_large(what: str, max_bytes: int, size: int | None = None, option: str | None = None) -> str:
    known = f" is {size} bytes," if size is not None else ""
    return f"{what}{known} more than the {max_bytes} bytes allowed" + (f" ({option})" if option else "")


def load_image(
    src: str | bytes, max_side: int | None = None, jpeg_quality: int = 90, max_bytes: int = MAX_IMAGE_BYTES,
    root: str | None = None,
) -> tuple[str, bytes]:
    """(Pillow format, bytes) of a fully decoded, supported image: the original bytes, or a downscaled
    re-encoding when ``max_side`` is set and the long side exceeds it. A path is read by ``read_image_file``
    (``max_bytes``, ``root``); embedded bytes are held to ``max_bytes`` too."""
    from PIL import Image

    name = src if isinstance(src, str) else "embedded image"
    if isinstance(src, str):
        data = read_image_file(src, max_bytes, root)
    elif len(src) > max_bytes:
        raise FormatError(_too_large(name, max_bytes, len(src), "--max-image-bytes"))
    else:
        data = src
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            image_member(0, fmt)  # raises on a format we do not store
            im.load()  # decode it all: a truncated or corrupt file is found here, not in training
            if max_side is not None and max(im.size) > max_side:
                return shrink(im, max_side, jpeg_quality)
    except FormatError as e:
        raise FormatError(f"{name}: {e}") from None
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, EOFError, ...)
        raise FormatError(f"unreadable image {name}: {type(e).__name__}: {e}") from None
    return fmt, data


def shrink(im, max_side: int, jpeg_quality: int = 90) -> tuple[str, bytes]:
    """Downscale so the long side is ``max_side`` and re-encode: PNG if the image has alpha, else JPEG.

    The EXIF orientation is applied first, since the re-encoding does not carry the EXIF tag over.
    """
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    alpha = "A" in im.getbands() or "transparency" in im.info
    im = im.convert("RGBA" if alpha else "L" if im.mode in ("1", "L") else "RGB")
    w, h = im.size
    scale = max_side / max(w, h)
    im = im.resize((max(1, min(max_side, round(w * scale))), max(1, min(max_side, round(h * scale)))), Image.LANCZOS)
    out = io.BytesIO()
    if alpha:
        im.save(out, "PNG")
        return "PNG", out.getvalue()
    im.save(out, "JPEG", quality=jpeg_quality)
    return "JPEG", out.getvalue()


def convert(
    rec: Record, max_side: int | None = None, jpeg_quality: int = 90, max_image_bytes: int = MAX_IMAGE_BYTES,
    allow_outside_root: bool = False,
) -> tuple[int, list[tuple[str, bytes]] | None, dict[str, Any] | None]:
    """(index, tar members, None) for a good record, (index, None, reject line) for a bad one.

    Image files must lie under the record's ``image_root`` unless ``allow_outside_root``; no image may
    exceed ``max_image_bytes`` (see ``read_image_file``)."""
    try:
        if rec.error is not None:
            raise FormatError(rec.error)
        assert rec.conversation is not None
        messages, meta = rec.conversation.messages, rec.conversation.meta
        # Check the turns before reading any image: provisional distinct names stand in for the images.
        validate_conversation(Conversation(messages, [str(i) for i in range(len(rec.images))], meta))
        root = None if allow_outside_root else rec.image_root
        loaded = [load_image(src, max_side, jpeg_quality, max_image_bytes, root) for src in rec.images]
        conv = Conversation(messages, [image_member(i, fmt) for i, (fmt, _) in enumerate(loaded)], meta)
        return rec.index, sample_members(conv, [data for _, data in loaded]), None
    except FormatError as e:
        return rec.index, None, rec.reject(str(e))
    except UnicodeEncodeError as e:  # a lone surrogate escaped in the input JSON cannot become UTF-8
        return rec.index, None, rec.reject(f"text is not valid Unicode: {e}")


def convert_batch(
    recs: list[Record], max_side: int | None = None, jpeg_quality: int = 90, max_image_bytes: int = MAX_IMAGE_BYTES,
    allow_outside_root: bool = False,
) -> list[tuple[int, bytes | None, dict[str, Any] | None]]:
    """``convert`` over a list, each sample encoded as tar bytes (``writer.sample_bytes``): the work a worker
    process does, one round trip per batch, leaving the main process only to write bytes in order."""
    out = []
    for rec in recs:
        index, members, reject = convert(rec, max_side, jpeg_quality, max_image_bytes, allow_outside_root)
        out.append((index, None if members is None else sample_bytes(sample_key(index), members), reject))
    return out
