"""The packer: image-text records (LLaVA, ShareGPT, FineVision, captions, image folders, Parquet, webdataset shards
such as img2dataset's) into WebDataset shards, behind `vlmstream pack` and tools/pack_shards.py (the same code,
the same bytes).

    vlmstream pack INPUT [INPUT ...] --output DIR [options]
    vlmstream pack merge DIR/index.j*.json --output DIR/index.json

Writes DIR/shard-IIIIIIII-NNNNNN.tar (IIIIIIII: the pack id, a digest of the shards' bytes), DIR/index.json
(the manifest) and DIR/rejects.jsonl (one line per record that was not packed, with the reason). The same
inputs and options give byte-identical files whatever --workers.

DIR is empty or new, or --overwrite replaces the pack it holds. A run writes into a staging folder inside DIR
(.pack-staging-*) and publishes at the end: the new shards, named apart from any older pack's, then index.json
by one rename that switches readers from the old pack to the new one, then the old files go. So DIR holds the
old pack or the new one at every instant; a run that fails or is interrupted leaves DIR as it was (one killed
leaves its staging folder, which the next run removes), and once a run is done DIR/*.tar lists its shards only.

Image paths are relative to --image-root (default: the input's folder) and are read only when they resolve,
symlinks included, inside it (--allow-outside-root lifts this) and name a regular file of at most
--max-image-bytes; a record naming any other path (a device, a FIFO, a folder) is a reject. An image
folder's .txt captions are read under the same rules.

Webdataset shards (.tar, .tar.gz, .tgz; a brace pattern or glob of them; a manifest; local, http(s)://, hf://
or in a bucket) are read as vs.tar_samples reads them: each shard is an input, each sample a record. A caption
sample gives its image members (by extension), its caption (.txt, else the json's "caption") and its json
fields (img2dataset's url, key, width, height, status, exif, ...) as meta; a sample holding a conversation json
("messages") is taken as it is; other members (.cls, .npy, ...) are left out. An empty or blank caption is the
reject "empty_caption". --shuffle and --num-jobs need every shard's sample count first: a manifest gives them,
else each shard is read once more to count them; a plain pack reads each shard once.

Record i (numbered over all inputs in the order given) has output position pos(i): i itself, or with
--shuffle a seeded permutation of the records. Job J of N packs the positions p with p * N // total == J, so N
machines under any scheduler pack disjoint parts whose union is everything, and `merge` joins their manifests.
The jobs write into one DIR at the same time, each its own files (shard-jJJJJ-IIIIIIII-NNNNNN.tar,
index.jJJJJ.json, rejects.jJJJJ.jsonl). Job J needs --overwrite where DIR holds job J's files of an earlier
pack or a finished pack's index.json; it then removes only job J's old files, and keeps those that index.json
names until `merge` has replaced index.json and removed them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import struct
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import replace
from functools import partial
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import redact
from ..progress import bar
from .format import EMPTY_CAPTION, rejects_name
from .output import Folder, PackError, check_output, open_folder, publish, start_staging
from .records import Input, Record, convert_batch, count_records, open_inputs, read_records
from .writer import ShardWriter

BATCH = 32  # records per round trip to a worker process
BUCKET_FLUSH_BYTES = 64 << 20  # shuffle: converted samples held in memory before they are spilled to buckets


# ------------------------------------------------------------------------------------- the pure maths

_ROUNDS = 6
_U64 = 0xFFFFFFFFFFFFFFFF


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a fixed, well-mixing bijection."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shuffled_positions(indices: Sequence[int] | np.ndarray, total: int, seed: int) -> np.ndarray:
    """Output positions of records ``indices`` under the seeded permutation of ``range(total)``.

    A Feistel network over the smallest power of 4 covering ``total``, with cycle walking back into range:
    a bijection computed one index at a time (no table of ``total`` entries), from integer arithmetic only,
    so every machine of a multi-job pack agrees on it whatever its numpy or Python version. Seeds are taken
    modulo 2**64.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= total):
        raise ValueError(f"indices must lie in [0, {total})")
    if total <= 1:
        return idx.copy()
    half = np.uint64(((total - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << int(half)) - 1)
    keys = _mix64(_mix64(np.array([seed & _U64], dtype=np.uint64)) + np.arange(_ROUNDS, dtype=np.uint64))

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << half) | right

    y = encrypt(idx.astype(np.uint64))
    out = y >= np.uint64(total)
    while out.any():  # cycle walking: re-encrypt until inside [0, total); stays a bijection of [0, total)
        y[out] = encrypt(y[out])
        out = y >= np.uint64(total)
    return y.astype(np.int64)


def shuffled_position(index: int, total: int, seed: int) -> int:
    """``shuffled_positions`` for one record."""
    return int(shuffled_positions([index], total, seed)[0])


def job_of(position: int, total: int, num_jobs: int) -> int:
    """The job that packs output position ``position``: contiguous, near-equal slices of the output order."""
    return position * num_jobs // total


def job_positions(job: int, num_jobs: int, total: int) -> range:
    """The output positions job ``job`` of ``num_jobs`` packs: exactly those with ``job_of(p) == job``."""
    if not 0 <= job < num_jobs:
        raise ValueError(f"job {job} out of range for {num_jobs} jobs")
    return range(-(-job * total // num_jobs), -(-(job + 1) * total // num_jobs))


class Positions:
    """pos(i) for increasing i, computed a block at a time: O(block) memory whatever the record count."""

    BLOCK = 1 << 16

    def __init__(self, total: int, seed: int | None) -> None:
        self.total, self.seed = total, seed
        self._start, self._block = -1, np.empty(0, dtype=np.int64)

    def __call__(self, index: int) -> int:
        if self.seed is None:
            return index
        if not self._start <= index < self._start + len(self._block):
            self._start = index - index % self.BLOCK
            stop = min(self._start + self.BLOCK, self.total)
            self._block = shuffled_positions(np.arange(self._start, stop), self.total, self.seed)
        return int(self._block[index - self._start])


# ------------------------------------------------------------------------------------- processing


def worker_pool(workers: int) -> ProcessPoolExecutor | None:
    """A process pool, or None for one worker (everything then runs in this process).

    A worker that dies (out of memory, say) breaks the pool with an error instead of hanging it. The workers
    start here, before any thread exists (pyarrow's, tqdm's), so that forking is safe: fork starts them at
    once with the modules already imported. Elsewhere than Linux, spawn as the platform wants.
    """
    if workers <= 1:
        return None
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context)
    pool.submit(int).result()  # the pool forks all its workers on its first task
    return pool


def ordered_map(
    fn: Callable[[list], list], items: Iterable[Any], pool: ProcessPoolExecutor | None, workers: int
) -> Iterator[Any]:
    """``fn`` over batches of ``items``, results flattened in input order.

    At most ``2 * workers`` batches are in flight (``Pool.imap`` would read the whole input ahead), and
    the order of results never depends on which worker finishes first: the output is the same for any N.
    """
    batches = iter(lambda it=iter(items): list(islice(it, BATCH)), [])
    if pool is None:
        for batch in batches:
            yield from fn(batch)
        return
    pending: deque = deque()
    for batch in batches:
        pending.append(pool.submit(fn, batch))
        if len(pending) >= 2 * workers:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


class Buckets:
    """Shuffle with bounded memory: spill encoded samples to temporary files by output position, then read
    back one bucket (``span`` consecutive positions) at a time, sorted by position.

    A bucket file is a run of (position, length) little-endian uint64 pairs, each followed by its bytes.
    """

    _HEAD = struct.Struct("<QQ")

    def __init__(self, folder: str, start: int, span: int) -> None:
        self.folder, self.start, self.span = folder, start, span
        self._buffers: dict[int, list[bytes]] = {}
        self._buffered = 0

    def add(self, position: int, data: bytes) -> None:
        self._buffers.setdefault((position - self.start) // self.span, []).append(
            self._HEAD.pack(position, len(data)) + data
        )
        self._buffered += len(data)
        if self._buffered > BUCKET_FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        for bucket, blobs in self._buffers.items():
            with open(self._path(bucket), "ab") as f:
                f.writelines(blobs)
        self._buffers, self._buffered = {}, 0

    def sorted_samples(self, num_positions: int) -> Iterator[bytes]:
        """Every sample added, in position order; each bucket file is removed once read."""
        self.flush()
        for bucket in range(-(-num_positions // self.span)):
            path = self._path(bucket)
            if not os.path.exists(path):
                continue
            items = []
            with open(path, "rb") as f:
                while head := f.read(self._HEAD.size):
                    position, size = self._HEAD.unpack(head)
                    items.append((position, f.read(size)))
            os.remove(path)
            items.sort(key=lambda item: item[0])
            for _, data in items:
                yield data

    def _path(self, bucket: int) -> str:
        return os.path.join(self.folder, f"bucket-{bucket:08d}.bin")

def job_records(
    inputs: list[Input], share: range | None, seed: int | None, allow_outside_root: bool = False,
    counts: list[int] | None = None,
) -> Iterator[Record]:
    """The records whose output position lies in ``share`` (None: every record), in input order, each with its
    global index. ``counts`` gets each input's record count as it is passed: an input not counted beforehand (a
    webdataset shard, where neither --shuffle nor jobs need the counts first) is counted as it is read, once.
    """
    if share is None and seed is not None:
        raise ValueError("a shuffle needs every input's count first")
    pos = Positions(sum(inp.count for inp in inputs) if seed is not None else 0, seed)
    counts = [] if counts is None else counts
    offset = 0
    for inp in inputs:
        ours = share is None or seed is not None or inp.count is None or (
            offset < share.stop and offset + inp.count > share.start)
        n = inp.count or 0
        if ours:
            want = None if share is None else (lambda p, offset=offset: pos(offset + p) in share)
            for rec in read_records(inp, want, allow_outside_root):
                rec.index = offset + rec.position
                n = max(n, rec.position + 1)
                yield rec
        counts.append(n)
        offset += n


def pack(args: argparse.Namespace) -> dict[str, Any]:
    """Pack ``args.inputs`` (the options of `vlmstream pack`, cli/pack.py); returns the manifest written, with
    ``path``, ``rejects`` and ``seconds`` added."""
    t0 = time.monotonic()
    out = open_folder(args.output, getattr(args, "storage_options", None))
    check_output(out, args.job_index, args.overwrite)
    pool = worker_pool(args.workers)
    try:
        return _pack(args, out, pool, t0)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # after an error, what is queued is no longer wanted


def _pack(args: argparse.Namespace, out: Folder, pool: ProcessPoolExecutor | None, t0: float) -> dict[str, Any]:
    job = args.job_index  # None: a single-job pack, named without a job part
    inputs = [inp for p in args.inputs for inp in open_inputs(p, args.format, args.image_root)]
    seed = args.seed if args.shuffle else None
    if seed is not None or job is not None:  # positions and shares need every count: shards not counted are read
        with bar(inputs, desc="count", unit="inputs") as counting:
            inputs = [inp if inp.count is not None else replace(inp, count=count_records(inp)) for inp in counting]
    known = all(inp.count is not None for inp in inputs)
    total = sum(inp.count for inp in inputs) if known else None  # None: shards counted as they are packed
    share = job_positions(job or 0, args.num_jobs or 1, total) if known else None
    pos = Positions(total or 0, seed)
    convert = partial(convert_batch, max_side=args.max_side, jpeg_quality=args.jpeg_quality,
                      max_image_bytes=args.max_image_bytes, allow_outside_root=args.allow_outside_root)
    staging = start_staging(out, job)
    try:  # whatever happens (an error, Ctrl-C), the staging area goes; a finished pack has left it first
        rejects = empty_captions = 0
        counts: list[int] = []  # each input's records, known once it is read
        with open(os.path.join(staging.path, rejects_name(job)), "w", encoding="utf-8") as rej, \
                ShardWriter(staging.path, args.prefix, args.maxcount, args.maxsize, job,
                            on_shard=staging.shard_done) as writer, \
                closing(ordered_map(convert, job_records(inputs, share, seed, args.allow_outside_root, counts),
                                    pool, args.workers)) as results, \
                bar(total=len(share) if share is not None else None, desc="pack", unit="samples") as pb:
            buckets = None
            if args.shuffle:
                os.mkdir(os.path.join(staging.path, "buckets"))
                buckets = Buckets(os.path.join(staging.path, "buckets"), share.start, args.bucket_size)
            for index, data, reject in results:
                pb.update(1)
                if reject is not None:
                    rejects += 1
                    empty_captions += reject["reason"] == EMPTY_CAPTION
                    rej.write(json.dumps(reject) + "\n")
                    if args.strict:
                        raise PackError(f"--strict: bad record in {_where(reject)}: {reject['reason']}")
                elif buckets is not None:
                    buckets.add(pos(index), data)
                else:
                    writer.write_encoded(data)
            for data in buckets.sorted_samples(len(share)) if buckets else ():
                writer.write_encoded(data)
        packing: dict[str, Any] = {
            "inputs": [{"path": redact(i.path), "format": i.format, "records": n} for i, n in zip(inputs, counts)],
            "records": sum(counts),
            "rejects": rejects,
            "empty_captions": empty_captions,  # of the rejects
            "shuffle_seed": seed,
            "max_side": args.max_side,
        }
        if job is not None:
            assert share is not None
            packing.update(job=job, num_jobs=args.num_jobs, positions=[share.start, share.stop])
        manifest, doc = publish(out, staging, job, args.prefix, writer.shards, packing)
    finally:
        staging.discard()
    seconds = time.monotonic() - t0
    return {**doc, "path": manifest, "rejects": rejects, "seconds": seconds}


def _where(reject: dict[str, Any]) -> str:
    line = f" (line {reject['line']})" if "line" in reject else ""
    return f"{reject['source']} at position {reject['position']}{line}"
