"""Write samples into WebDataset tar shards, byte for byte the same every time.

Tar headers are built from fixed fields (see ``format``'s docstring), so equal samples in equal order give
equal shards whatever the machine, clock or user. Bytes and sha256 are counted while writing, so closing a
shard costs no second read, and a shard becomes visible under its name only once it is complete.

    with ShardWriter("out", maxcount=1000) as w:
        for i, (conv, images) in enumerate(conversations):
            w.write(sample_key(i), sample_members(conv, images))
    write_manifest("out/index.json", w.shards)
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from typing import BinaryIO, Callable, Sequence

from .format import TAR_BLOCK, TAR_RECORD, ShardInfo, shard_name

_END = bytes(2 * TAR_BLOCK)  # end-of-archive marker: two zero blocks


def tar_member(name: str, data: bytes) -> bytes:
    """One regular-file member: header with fixed owner, mode and mtime, then the data padded to a block."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    # PAX_FORMAT writes a plain ustar header and adds a pax header only when a field does not fit ustar.
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return header + data + bytes(-len(data) % TAR_BLOCK)


def sample_bytes(key: str, members: Sequence[tuple[str, bytes]]) -> bytes:
    """The tar bytes of one sample: members ``KEY.EXT`` in the order given."""
    if not key or "." in key.rsplit("/", 1)[-1]:
        raise ValueError(f"bad sample key {key!r}: must be non-empty, with no dot in its last path part")
    exts = [ext for ext, _ in members]
    if not members or len(set(exts)) != len(exts) or not all(exts):
        raise ValueError(f"sample {key}: need one or more members with distinct, non-empty extensions, got {exts}")
    return b"".join(tar_member(f"{key}.{ext}", data) for ext, data in members)


def closed_size(size: int) -> int:
    """The file size of an archive whose members take ``size`` bytes, once closed."""
    return -(-(size + len(_END)) // TAR_RECORD) * TAR_RECORD


class ShardWriter:
    """Write samples to ``out_dir/PREFIX-NNNNNN.tar`` (``PREFIX-jJJJJ-NNNNNN.tar`` for a job), in order.

    A shard closes when it holds ``maxcount`` samples, or before a sample would make its file larger than
    ``maxsize`` bytes; a sample larger than ``maxsize`` on its own gets a shard of its own rather than being
    dropped. ``close()`` returns the ``ShardInfo`` of every shard written, URLs relative to ``out_dir``.
    ``on_shard(path, info)`` is called as each shard is finished (the packer uploads it then, and frees the disk).
    """

    def __init__(
        self, out_dir: str, prefix: str = "shard", maxcount: int = 10000, maxsize: int = 10**9, job: int | None = None,
        on_shard: Callable[[str, ShardInfo], None] | None = None,
    ) -> None:
        if maxcount < 1 or maxsize < 1:
            raise ValueError(f"maxcount and maxsize must be positive, got {maxcount}, {maxsize}")
        self.out_dir, self.prefix, self.job, self.on_shard = out_dir, prefix, job, on_shard
        self.maxcount, self.maxsize = maxcount, maxsize
        self.shards: list[ShardInfo] = []
        self.samples = 0  # written so far, over all shards
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._count = self._size = 0
        os.makedirs(out_dir, exist_ok=True)

    def write(self, key: str, members: Sequence[tuple[str, bytes]]) -> None:
        """Append one sample; its members are written as ``KEY.EXT`` in the order given."""
        self.write_encoded(sample_bytes(key, members))

    def write_encoded(self, data: bytes) -> None:
        """Append one sample already encoded by ``sample_bytes`` (in a worker process, say)."""
        if self._file is not None and (
            self._count >= self.maxcount or closed_size(self._size + len(data)) > self.maxsize
        ):
            self._close_shard()
        if self._file is None:
            self._open_shard()
        assert self._file is not None
        self._file.write(data)
        self._hash.update(data)
        self._count += 1
        self._size += len(data)
        self.samples += 1

    def close(self) -> list[ShardInfo]:
        """Finish the open shard, if any; return all shards written."""
        if self._file is not None:
            self._close_shard()
        return list(self.shards)

    def abort(self) -> None:
        """Drop the unfinished shard (its temporary file); shards already closed stay.

        The file is removed even when closing it fails, as it does on a full disk (closing flushes the buffer)."""
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except OSError:
                pass
            finally:
                os.remove(f.name)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _name(self) -> str:
        return shard_name(self.prefix, len(self.shards), self.job)

    def _open_shard(self) -> None:
        self._file = open(os.path.join(self.out_dir, self._name() + ".tmp"), "wb")
        self._hash = hashlib.sha256()
        self._count = self._size = 0

    def _close_shard(self) -> None:
        assert self._file is not None
        tail = bytes(closed_size(self._size) - self._size)
        self._file.write(tail)
        self._hash.update(tail)
        self._file.close()
        name = self._name()
        os.replace(self._file.name, os.path.join(self.out_dir, name))
        info = ShardInfo(name, self._count, self._size + len(tail), self._hash.hexdigest())
        self.shards.append(info)
        self._file = None
        if self.on_shard is not None:
            self.on_shard(os.path.join(self.out_dir, name), info)
