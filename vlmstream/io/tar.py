"""The streaming tar reader behind ``vs.tar_samples()``: shard bytes -> (name, data, offset) -> samples.

A pure parser and grouping, no policy: errors are raised (``TarError``), a bad sample can be yielded as a
``BadSample`` for the stage to count (stages/read.py applies ``on_error``, the split's filters and resumes).

Why not ``tarfile``: in stream mode it builds a TarInfo object per member through several layers of pure Python
(webdataset reads about 6x fewer samples per second than this module, docs/BENCHMARKS.md), and it stops silently
at a bad header after the first member, losing the rest of the shard. This module parses the 512-byte headers itself, reads a member's padding
together with the next header, and raises ``TarError`` naming the URL and byte offset instead of stopping.

Name rules follow Python's ``tarfile`` (ustar prefix, GNU longname, pax path and size, global pax headers);
grouping follows webdataset 1.0.2's ``tar_file_iterator`` + ``group_by_keys``. Deliberate differences from
webdataset, each one raising where webdataset would silently lose or alter data:

- a bad checksum, a truncated header or member, or a stream that ends without the end-of-archive block raises
  (tarfile raises only at offset 0 and silently stops later);
- sparse members (GNU ``S`` type, ``GNU.sparse.*`` pax records) raise (tarfile expands them);
- a global pax header that sets ``size`` raises (tarfile applies it to every later member's length);
- a key that appears again later in the same shard (the members of one sample are not adjacent) raises
  (webdataset yields a second sample with the same key, half of each);
- the extensions ``__offset__``, ``__index__`` (our provenance keys) and ``__bad__`` raise (webdataset silently
  drops a sample whose ``__bad__`` member is non-empty); ``__key__`` and ``__url__`` raise in both;
- bzip2 / xz / zstd shards raise with the compression named (tarfile reads bzip2 and xz); gzip is read;
- the mode, uid, gid, mtime and device fields are not parsed (tarfile rejects non-octal text there; the
  header checksum still covers them).

And one where tarfile raises and we do not: a global pax header followed by the end of the archive (an empty
archive written by ``tarfile`` with ``pax_headers=``) reads as no members. As in tarfile and POSIX, links,
devices, directories and fifos (types 1-6) have no data blocks whatever their size field says; unknown types
have their data skipped.
"""

from __future__ import annotations

import gzip
import re
import zlib
from typing import Any, Callable, Iterable, Iterator, Protocol
from zlib import adler32

from ..errors import TarError, redact

BLOCK = 512
_ZEROS = bytes(BLOCK)
_SKIP_CHUNK = 1 << 20
_CHECKSUM_FIELDS: dict[bytes, tuple[int | None, int]] = {}

# Type flags (byte 156 of a header), as ints.
_REGULAR = (ord("0"), 0, ord("7"))  # file, old-style file, contiguous file
_NO_DATA = tuple(map(ord, "123456"))  # hard link, symlink, char/block device, directory, fifo: no data blocks
_LONGNAME, _LONGLINK, _SPARSE = ord("L"), ord("K"), ord("S")
_PAX, _PAX_SOLARIS, _PAX_GLOBAL = ord("x"), ord("X"), ord("g")
_EXTENSIONS = (_LONGNAME, _LONGLINK, _PAX, _PAX_SOLARIS, _PAX_GLOBAL)

_COMPRESSION_MAGIC = ((b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")  # "LENGTH KEY=VALUE\n", as POSIX and tarfile read it

# webdataset's rules: the key is everything before the first dot of the last path segment.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
# Sample keys we set ourselves, plus webdataset's "__bad__" marker: a member may not use them as extensions.
_RESERVED = ("__key__", "__url__", "__offset__", "__index__", "__bad__")


class Readable(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...


Sample = dict[str, Any]
_MAX_SIZE = 1 << 40  # a size field above this is garbage, whatever max_member_bytes says


class Oversized:
    """In place of a member's data: the member was over max_member_bytes and was skipped unread."""

    def __init__(self, message: str):
        self.message = message


class BadSample:
    """A sample that breaks the rules (duplicate or reserved extension, a key seen earlier in the shard, a
    member over the size limit), yielded instead of raised under ``on_error="skip"``: the reader counts it."""

    def __init__(self, sample: Sample, error: TarError):
        self.error = error
        self.key, self.index, self.offset = sample["__key__"], sample["__index__"], sample["__offset__"]

    def __getitem__(self, name: str) -> Any:  # the provenance keys, as a sample has them
        return {"__key__": self.key, "__index__": self.index, "__offset__": self.offset}[name]


# ------------------------------------------------------------------------------------------------- members


def iter_members(
    stream: Readable, url: str, *, max_member_bytes: int | None = None, skip_oversize: bool = False,
    base_offset: int = 0,
) -> Iterator[tuple[str, bytes, int]]:
    """Yield ``(name, data, offset)`` for each regular member, reading ``stream`` front to back (no seek).

    ``offset`` is where the member's first header (a GNU longname or pax header, if any) starts in the
    uncompressed tar stream; ``base_offset`` is where ``stream`` starts in it (a shard opened mid-way to
    resume), so that offsets, in samples and in errors alike, always count from the shard's start.
    Gzip-compressed shards are detected from their first bytes and decompressed.
    A member, or an extended header, over ``max_member_bytes`` raises before it is read; with
    ``skip_oversize`` a regular member over it is passed over in chunks (never held whole) and yielded
    with an ``Oversized`` value in place of its data. Reading stops at the end-of-archive block: the padding
    after it is left to whoever owns the stream (the shard cache reads it, to keep the whole shard).
    """
    read = stream.read
    head = _read(read, BLOCK)
    unzipped = None
    if head[:2] == b"\x1f\x8b":
        unzipped = gzip.GzipFile(fileobj=_Prefixed(head, stream), mode="rb")
        read = unzipped.read
    try:
        if unzipped is not None:
            head = _read(read, BLOCK)
        yield from _members(read, head, url, max_member_bytes, skip_oversize, base_offset)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # only the gzip layer raises these
        if unzipped is None:
            raise
        raise TarError(f"{url}: offset {unzipped.tell()}: corrupt or truncated gzip stream: {e}",
                       reason="truncated") from None
    finally:
        if unzipped is not None:
            unzipped.close()  # releases the decompressor; leaves `stream` open


def _members(
    read: Callable[[int], bytes], head: bytes, url: str, limit: int | None, skip_oversize: bool = False,
    base_offset: int = 0,
) -> Iterator[tuple[str, bytes, int]]:
    pos = base_offset  # offset of `head` in the tar stream
    start = pos  # offset of the first header of the current member's chain
    chain: list[tuple[int, Any]] = []  # pending (type, value) of L / K / x headers for the next member
    global_pax: dict[str, str] = {}
    while True:
        if len(head) != BLOCK:
            raise _short_header(url, pos, head)
        stored, field_sum = _checksum_field(head[148:156])
        if stored != (adler32(head[:256]) & 0xFFFF) + (adler32(head[256:]) & 0xFFFF) - 2 - field_sum + 256:
            if head == _ZEROS:  # end-of-archive; like tarfile we stop at the first zero block
                if chain:
                    raise TarError(f"{url}: offset {pos}: end-of-archive block right after an extended header",
                                   reason="bad_header")
                return
            if stored is None or stored != _signed_checksum(head):  # some old tars sum signed bytes
                raise TarError(f"{url}: offset {pos}: bad header checksum{_compression_hint(head, pos)}",
                               reason="unsupported" if _compression_hint(head, pos) else "bad_header")
        try:
            size = _number(head[124:136])
        except ValueError:
            raise TarError(f"{url}: offset {pos}: invalid size field {head[124:136]!r}", reason="bad_header") from None
        if size > _MAX_SIZE:  # garbage in the field: never ask the stream (or the allocator) for that much
            raise TarError(f"{url}: offset {pos}: implausible size field {size}", reason="bad_header")
        flag = head[156]

        if flag in _EXTENSIONS:
            if size < 0 or (limit is not None and size > limit):
                raise TarError(f"{url}: offset {pos}: extended header size {size} (max_member_bytes={limit})",
                               reason="member_too_large")
            if not chain and flag != _PAX_GLOBAL:
                start = pos
            padded = size + (-size % BLOCK)
            buf = _read(read, padded + BLOCK)
            if len(buf) < padded:
                raise TarError(f"{url}: offset {pos}: truncated extended header ({len(buf)} of {padded} bytes)",
                               reason="truncated")
            head = buf[padded:]
            payload = buf[:padded]  # tarfile reads the padding too, so do we
            if flag == _PAX_GLOBAL:
                _parse_pax(payload, global_pax, url, pos)
                if "size" in global_pax:
                    raise TarError(f"{url}: offset {pos}: global pax header sets 'size' (unsupported)", reason="unsupported")
            elif flag == _PAX or flag == _PAX_SOLARIS:
                chain.append((_PAX, _parse_pax(payload, dict(global_pax), url, pos)))
            else:  # L or K
                chain.append((flag, _nts(payload)))
            pos += BLOCK + padded
            continue

        raw_name = head[:100]
        nul = raw_name.find(0)
        if nul >= 0:
            raw_name = raw_name[:nul]
        if not chain:
            start = pos
        if flag in _NO_DATA or (flag == 0 and raw_name.endswith(b"/")):  # old tars mark directories so
            data_size = 0
        elif flag == _SPARSE:
            raise TarError(f"{url}: offset {start}: sparse member {_nts(raw_name)!r} (unsupported)", reason="unsupported")
        else:
            name = raw_name.decode("utf-8", "surrogateescape")
            if head[345]:  # ustar prefix; tarfile applies it whatever the magic says
                name = _nts(head[345:500]) + "/" + name
            if chain or global_pax:
                name, size = _resolve(name, size, chain, global_pax)
            if size < 0:
                raise TarError(f"{url}: offset {start}: member {name!r} has negative size {size}", reason="bad_header")
            if flag in _REGULAR:
                if limit is not None and size > limit:
                    k = split_key(name)
                    why = (f"{url}: offset {start}: {f'key {k[0]!r}: ' if k else ''}member {name!r} is {size} bytes, "
                           f"over max_member_bytes={limit}")
                    if not skip_oversize:
                        raise TarError(why, reason="member_too_large")
                    padded = size + (-size % BLOCK)  # skipped in chunks, never held whole
                    if not _skip(read, padded):
                        raise TarError(f"{url}: offset {start}: truncated member {name!r}", reason="truncated")
                    yield name, Oversized(why), start
                    chain = []
                    pos += BLOCK + padded
                    head = _read(read, BLOCK)
                    continue
                data = read(size)
                if len(data) != size:
                    data = _read_more(read, data, size)
                    if len(data) != size:
                        raise TarError(
                            f"{url}: offset {start}: truncated member {name!r} ({len(data)} of {size} bytes)",
                            reason="truncated",
                        )
                yield name, data, start
                chain = []
                pad = -size % BLOCK
                pos += BLOCK + size + pad
                head = read(pad + BLOCK)  # the padding and the next header in one call
                if len(head) != pad + BLOCK:
                    head = _read_more(read, head, pad + BLOCK)
                if pad:
                    head = head[pad:]
                continue
            data_size = size  # an unknown type: skip its data, as tarfile does
        chain = []
        padded = data_size + (-data_size % BLOCK)
        if padded and not _skip(read, padded):
            raise TarError(f"{url}: offset {start}: truncated data of a non-file member", reason="truncated")
        pos += BLOCK + padded
        head = _read(read, BLOCK)


def _resolve(name: str, size: int, chain: list[tuple[int, Any]], global_pax: dict[str, str]) -> tuple[str, int]:
    """Apply global pax records, then the member's own extended headers, the way tarfile does.

    tarfile patches the member innermost header first, so the first header of a chain has the last word.
    """
    if "path" in global_pax:
        name = global_pax["path"].rstrip("/")
    for flag, value in reversed(chain):
        if flag == _LONGNAME:
            name = value
        elif flag == _PAX:
            if "path" in value:
                name = value["path"].rstrip("/")
            if "size" in value:
                try:
                    size = int(value["size"])
                except ValueError:
                    size = 0  # tarfile's fallback
    return name, size


def _parse_pax(buf: bytes, into: dict[str, str], url: str, pos: int) -> dict[str, str]:
    """Read "LENGTH KEY=VALUE\\n" records into ``into`` until one does not parse (the padding)."""
    i = 0
    while (m := _PAX_RECORD.match(buf, i)) is not None:
        length = int(m.group(1))
        if length == 0:
            raise TarError(f"{url}: offset {pos}: pax record of length 0", reason="bad_header")
        key = m.group(2).decode("utf-8", "surrogateescape")
        if key.startswith("GNU.sparse."):
            raise TarError(f"{url}: offset {pos}: sparse member (pax {key}) (unsupported)", reason="unsupported")
        into[key] = buf[m.end(2) + 1 : i + length - 1].decode("utf-8", "surrogateescape")
        i += length
    return into


def _number(field: bytes) -> int:
    """A numeric header field: octal text up to the first NUL, or GNU base-256 (first byte 0x80 / 0xff)."""
    try:  # the usual case; int() accepts exactly the texts the general rule below accepts, or fewer
        return int(field.partition(b"\0")[0], 8)
    except ValueError:
        pass
    lead = field[0]
    if lead == 0x80 or lead == 0xFF:
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if lead == 0xFF else n
    return int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)


def _checksum_field(field: bytes) -> tuple[int | None, int]:
    """(value, byte sum) of a checksum field, memoised: a shard's headers share a few thousand values."""
    known = _CHECKSUM_FIELDS.get(field)
    if known is None:
        try:
            known = (_number(field), sum(field))
        except ValueError:
            known = (None, sum(field))
        if len(_CHECKSUM_FIELDS) >= 1 << 16:
            _CHECKSUM_FIELDS.clear()
        _CHECKSUM_FIELDS[field] = known
    return known


def _signed_checksum(head: bytes) -> int:
    rest = head[:148] + head[156:]
    return sum(rest) + 256 - 256 * sum(1 for b in rest if b > 127)


def _nts(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _short_header(url: str, pos: int, head: bytes) -> TarError:
    if head:
        hint = _compression_hint(head, pos)
        return TarError(f"{url}: offset {pos}: truncated header ({len(head)} of {BLOCK} bytes){hint}",
                        reason="unsupported" if hint else "truncated")
    if pos == 0:
        return TarError(f"{url}: offset 0: empty file", reason="truncated")
    return TarError(f"{url}: offset {pos}: stream ends without the end-of-archive block (truncated shard?)",
                    reason="truncated")


def _compression_hint(head: bytes, pos: int) -> str:
    for magic, kind in _COMPRESSION_MAGIC:
        if pos == 0 and head.startswith(magic):
            return f" (looks {kind}-compressed; only plain and gzip tar shards are supported)"
    return ""


def _read(read: Callable[[int], bytes], n: int) -> bytes:
    """Read ``n`` bytes, fewer only at the end of the stream (sockets and pipes return short reads)."""
    data = read(n)
    return data if len(data) == n else _read_more(read, data, n)


def _read_more(read: Callable[[int], bytes], data: bytes, n: int) -> bytes:
    """Complete a short read of ``n`` bytes that returned ``data``."""
    parts = [data]
    got = len(data)
    while data and got < n:
        data = read(n - got)
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _skip(read: Callable[[int], bytes], n: int) -> bool:
    while n > 0:
        chunk = read(min(n, _SKIP_CHUNK))
        if not chunk:
            return False
        n -= len(chunk)
    return True


class _Prefixed:
    """Replays bytes already read (to sniff the compression) before the rest of the stream: no seek needed."""

    def __init__(self, head: bytes, stream: Readable):
        self._head = head
        self._stream = stream

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(n)
        if n is None or n < 0:
            out, self._head = self._head + self._stream.read(), b""
        else:
            out, self._head = self._head[:n], self._head[n:]
        return out


# ------------------------------------------------------------------------------------------------- samples


def split_key(name: str) -> tuple[str, str] | None:
    """``dir/key.0.JPG`` -> ``("dir/key", "0.JPG")``: webdataset's ``base_plus_ext``, None where it finds no key.

    The common case is a plain split (key = up to the first dot of the last path segment); names starting
    with a dot after the last slash, or holding a newline (which the regex's ``.`` does not cross), go
    through the regex itself so the result is always identical.
    """
    if "\n" not in name:
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        if dot < 0:
            return None
        if dot > slash + 1:
            return name[:dot], name[dot + 1 :]
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else None


def group_samples(members: Iterable[tuple[str, bytes, int]], url: str, first_index: int = 0, *,
                  bad: str = "raise") -> Iterator[Sample]:
    """Group one shard's members into samples by webdataset's rules: a new sample whenever the key changes.

    Each sample has ``__key__``, ``__url__``, one bytes value per (lowercased) extension, and its provenance:
    ``__offset__`` (the tar offset of its first member's header) and ``__index__`` (its rank in the shard).
    A stream opened mid-shard (at a sample's offset, to resume) gives that sample's index as ``first_index``.

    A sample that breaks the rules raises ``TarError``: a duplicate extension, a reserved extension, a member
    over the size limit (an ``Oversized`` value), or a key that appears again later in the shard (the members
    of one sample are not adjacent; webdataset would silently make two samples with one key). With
    ``bad="yield"`` it is yielded as a ``BadSample`` instead (its index still counts) and grouping goes on.
    """
    sample: Sample | None = None
    error: TarError | None = None
    key = None
    index = first_index
    seen: set[str] = set()  # keys of this shard so far (from the resume point when opened mid-shard)
    for name, data, offset in members:
        if name.startswith("__") and (("/" not in name and name.endswith("__")) or _META.match(name)):
            continue  # webdataset skips __meta__ members
        split = split_key(name)
        if split is None:
            continue
        member_key, ext = split
        ext = ext.lower()
        if sample is None or member_key != key:
            if sample is not None:
                yield sample if error is None else BadSample(sample, error)
            key = member_key
            sample = {"__key__": key, "__url__": url, "__offset__": offset, "__index__": index}
            error = None
            index += 1
            if key in seen:
                error = TarError(f"{url}: offset {offset}: key {key!r} appears again in the shard (the members of "
                                 f"one sample are not adjacent)", reason="repeated_key")
                if bad == "raise":
                    raise error
            seen.add(key)
        if ext not in sample and error is None and type(data) is bytes and ext != "__bad__":
            sample[ext] = data  # the usual case, tested first
            continue
        if error is not None:
            continue  # the rest of a bad sample
        if type(data) is Oversized:
            error = TarError(data.message, reason="member_too_large")
        elif ext in sample or ext == "__bad__":
            reserved = ext in _RESERVED
            why = "a reserved name" if reserved else "a duplicate in the sample"
            error = TarError(f"{url}: offset {offset}: key {key!r}: extension {ext!r} is {why} (member {name!r})",
                             reason="reserved_extension" if reserved else "duplicate_extension")
        else:
            sample[ext] = data  # bytes-like data of another type (bytearray, memoryview)
            continue
        if bad == "raise":
            raise error
    if sample is not None:
        yield sample if error is None else BadSample(sample, error)


def read_tar_samples(stream: Readable, url: str, *, max_member_bytes: int | None = None, base_offset: int = 0,
                     first_index: int = 0) -> Iterator[Sample]:
    """The samples of one shard read from ``stream`` (left open: the caller owns it); ``url`` is shown redacted
    in errors and in each sample's ``__url__``."""
    url = redact(url)
    members = iter_members(stream, url, max_member_bytes=max_member_bytes, base_offset=base_offset)
    return group_samples(members, url, first_index)
