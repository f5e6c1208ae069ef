"""Pack image-text records (LLaVA, ShareGPT, FineVision, captions, image folders, Parquet) into WebDataset shards.

    python tools/pack_shards.py INPUT [INPUT ...] --output DIR [options]
    python tools/pack_shards.py merge DIR/index.j*.json --output DIR/index.json

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
import re
import shutil
import struct
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from functools import partial
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

# The vlmstream of the checkout this file is in, as the other tools do: the tool and the library it packs with
# are one version, even where another vlmstream is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlmstream.format import (
    MANIFEST_NAME,
    FormatError,
    ShardInfo,
    job_manifest_name,
    merge_manifests,
    pack_id,
    read_manifest,
    rejects_name,
    shard_name,
    write_manifest,
)
from vlmstream.records import FORMATS, MAX_IMAGE_BYTES, Input, Record, convert_batch, open_input, read_records
from vlmstream.writer import ShardWriter

BATCH = 32  # records per round trip to a worker process
BUCKET_FLUSH_BYTES = 64 << 20  # shuffle: converted samples held in memory before they are spilled to buckets


class PackError(Exception):
    """A reason to stop packing, said to the user as is."""


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


def progress(total: int, desc: str):
    """A samples/s bar on stderr, only when a person watches it."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="samples", disable=not sys.stderr.isatty(), smoothing=0.1)


def job_records(
    inputs: list[Input], share: range, seed: int | None, allow_outside_root: bool = False
) -> Iterator[Record]:
    """The records whose output position lies in ``share``, in input order, each with its global index."""
    total = sum(inp.count for inp in inputs)
    pos = Positions(total, seed)
    offset = 0
    for inp in inputs:
        if seed is not None or (offset < share.stop and offset + inp.count > share.start):  # else: none of ours
            for rec in read_records(inp, lambda p, offset=offset: pos(offset + p) in share, allow_outside_root):
                rec.index = offset + rec.position
                yield rec
        offset += inp.count


# ------------------------------------------------------------------------------------- the output folder
#
# A run writes everything into a staging folder of its own inside the output, then publishes: its shards are
# renamed into the output under names that no older pack's shards have (``pack_id`` is in them), then its
# rejects file, then its manifest, by one rename that switches readers from the old pack to the new one; only
# then are the old pack's files removed. So at every instant the output's manifest names shards that are there
# with the bytes it says, a failed or interrupted run leaves only its staging folder (removed on the way out,
# or by the next run when the process was killed), and a finished one leaves exactly its own files.
#
# A single-job pack owns the whole folder. Job J of a multi-job pack owns only job J's files, since the other
# jobs write into the same folder at the same time; and it removes none of the shards that index.json (the
# merged manifest readers use) names: `merge` removes those once it has replaced index.json.

STAGING = ".pack-staging-"  # + "jJJJJ-" for a job, then a random part: a run's files until it publishes
OLD_STAGING = ".pack-tmp-"  # the shuffle buckets' folder of earlier versions of this tool
_JOB_FILE = re.compile(r"(?:index\.j(\d{4})\.json|rejects\.j(\d{4})\.jsonl|.+-j(\d{4})-(?:[0-9a-f]{8}-)?\d{6}\.tar)"
                       r"(?:\.tmp\d*)?")


def _staging_prefix(job: int | None) -> str:
    return STAGING if job is None else f"{STAGING}j{job:04d}-"


def _own_staging(name: str, job: int | None) -> bool:
    """Whether ``name`` is a staging folder of a run of the same kind (a single-job pack, or job J): one that
    was killed, since only one such run writes into a folder at a time."""
    if job is not None:
        return name.startswith(_staging_prefix(job))
    return name.startswith(OLD_STAGING) or (name.startswith(STAGING) and not re.match(r"j\d{4}-", name[len(STAGING):]))


def _job_of_file(name: str) -> int | None:
    """The job whose manifest, rejects file or shard (or a temporary file of one) ``name`` is, if any."""
    m = _JOB_FILE.fullmatch(name)
    return None if m is None else int(next(g for g in m.groups() if g is not None))


def _is_pack_file(name: str) -> bool:
    """A file a pack run writes into its output folder, or a leftover of one (temporary files included)."""
    return (name.endswith((".tar", ".tar.tmp")) or _job_of_file(name) is not None
            or name.startswith((STAGING, OLD_STAGING)) or re.fullmatch(r"index\.json\.tmp\d*", name) is not None)


def check_output(out: str, job: int | None, overwrite: bool) -> None:
    """Refuse to pack over what is in ``out`` unless ``overwrite``: for a single-job pack, anything but the
    staging folder of a killed run; for job J, job J's files of an earlier pack, or a finished pack (index.json)."""
    if not os.path.exists(out) or overwrite:
        return
    names = sorted(n for n in os.listdir(out) if not _own_staging(n, job))
    if job is None and names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise PackError(f"{out} is not empty ({shown}): pass --overwrite to replace what is there with the new "
                        "pack, or choose an empty folder")
    if job is not None:
        found = [n for n in names if n == MANIFEST_NAME or _job_of_file(n) == job]
        if found:
            raise PackError(f"{out} holds {found[0]} of an earlier pack: pass --overwrite to replace job {job}'s "
                            "part of it (what the other jobs wrote is left to them), or choose an empty folder")


def start_staging(out: str, job: int | None) -> str:
    """Create ``out`` if need be, remove the staging folders that killed runs of the same kind left there, and
    return a new, empty one."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if _own_staging(name, job):
            _remove(os.path.join(out, name))
    return tempfile.mkdtemp(prefix=_staging_prefix(job), dir=out)


def publish(out: str, staging: str, job: int | None, prefix: str, shards: list[ShardInfo],
            packing: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Move a finished pack from ``staging`` into ``out`` (see the comment above); returns the manifest's path
    and content."""
    pack = pack_id(shards)
    named = [ShardInfo(shard_name(prefix, n, job, pack), s.samples, s.bytes, s.sha256) for n, s in enumerate(shards)]
    manifest = MANIFEST_NAME if job is None else job_manifest_name(job)
    doc = write_manifest(os.path.join(staging, manifest), named, packing=packing)
    moved = []  # shards put in the output so far, taken back if the switch does not happen
    try:
        for s, final in zip(shards, named):
            target = os.path.join(out, final.url)
            if not os.path.exists(target):  # one that exists has this name, so these very bytes
                moved.append(target)
            os.replace(os.path.join(staging, s.url), target)
        os.replace(os.path.join(staging, rejects_name(job)), os.path.join(out, rejects_name(job)))
        os.replace(os.path.join(staging, manifest), os.path.join(out, manifest))  # the switch to the new pack
    except BaseException:
        for path in moved:
            _remove(path)
        raise
    keep = {manifest, rejects_name(job), *(s.url for s in named)}
    keep.add(os.path.basename(staging))  # removed by the caller, once this returns
    if job is None:  # every pack file but the new ones; job manifests first, before the shards they name
        old = sorted((n for n in os.listdir(out) if n not in keep and _is_pack_file(n)),
                     key=lambda n: not n.endswith(".json"))
    else:  # job J's files only, and none that the merged manifest still names
        keep |= _local_shards(os.path.join(out, MANIFEST_NAME))
        old = [n for n in os.listdir(out) if n not in keep and (_job_of_file(n) == job or _own_staging(n, job))]
    for name in old:
        _remove(os.path.join(out, name))
    return os.path.join(out, manifest), doc


def _local_shards(manifest: str) -> set[str]:
    """The shards in the manifest's own folder that it names (none if it is missing or unreadable)."""
    try:
        _, shards = read_manifest(manifest)
    except (OSError, ValueError):  # FormatError is a ValueError
        return set()
    return {s.url for s in shards if "/" not in s.url and "://" not in s.url}


def _is_single_job_pack(manifest: str) -> bool:
    """Whether the manifest is one a single-job pack wrote (its rejects file is then ``rejects.jsonl``)."""
    try:
        with open(manifest) as f:
            packing = json.load(f).get("packing")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(packing, dict) and "job" not in packing


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


# ------------------------------------------------------------------------------------- packing


def pack(args: argparse.Namespace) -> dict[str, Any]:
    """Pack ``args.inputs`` (parsed by ``parse_args``); returns the manifest written."""
    t0 = time.monotonic()
    check_output(args.output, args.job_index, args.overwrite)
    pool = worker_pool(args.workers)
    try:
        return _pack(args, pool, t0)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # after an error, what is queued is no longer wanted


def _pack(args: argparse.Namespace, pool: ProcessPoolExecutor | None, t0: float) -> dict[str, Any]:
    job = args.job_index  # None: a single-job pack, named without a job part
    inputs = [open_input(p, args.format, args.image_root) for p in args.inputs]
    total = sum(inp.count for inp in inputs)
    share = job_positions(job or 0, args.num_jobs or 1, total)
    seed = args.seed if args.shuffle else None
    pos = Positions(total, seed)
    convert = partial(convert_batch, max_side=args.max_side, jpeg_quality=args.jpeg_quality,
                      max_image_bytes=args.max_image_bytes, allow_outside_root=args.allow_outside_root)
    staging = start_staging(args.output, job)
    try:  # whatever happens (an error, Ctrl-C), the staging folder goes; a finished pack has left it first
        rejects = 0
        with open(os.path.join(staging, rejects_name(job)), "w", encoding="utf-8") as rej, \
                ShardWriter(staging, args.prefix, args.maxcount, args.maxsize, job) as writer, \
                closing(ordered_map(convert, job_records(inputs, share, seed, args.allow_outside_root), pool,
                                    args.workers)) as results, \
                progress(len(share), "pack") as bar:
            buckets = None
            if args.shuffle:
                os.mkdir(os.path.join(staging, "buckets"))
                buckets = Buckets(os.path.join(staging, "buckets"), share.start, args.bucket_size)
            for index, data, reject in results:
                bar.update(1)
                if reject is not None:
                    rejects += 1
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
            "inputs": [{"path": i.path, "format": i.format, "records": i.count} for i in inputs],
            "records": total,
            "rejects": rejects,
            "shuffle_seed": seed,
            "max_side": args.max_side,
        }
        if job is not None:
            packing.update(job=job, num_jobs=args.num_jobs, positions=[share.start, share.stop])
        manifest, doc = publish(args.output, staging, job, args.prefix, writer.shards, packing)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.monotonic() - t0
    print(
        f"pack_shards: {doc['samples']} samples, {doc['num_shards']} shards, {doc['bytes']} bytes, "
        f"{rejects} rejects, {seconds:.1f} s ({doc['samples'] / max(seconds, 1e-9):.0f} samples/s) -> {manifest}"
    )
    return doc


def _where(reject: dict[str, Any]) -> str:
    line = f" (line {reject['line']})" if "line" in reject else ""
    return f"{reject['source']} at position {reject['position']}{line}"


# ------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="pack_shards.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help="JSON/JSONL/Parquet files or image folders")
    ap.add_argument("--output", "-o", required=True, metavar="DIR",
                    help="an empty (or new) folder; with --job-index, the folder all the jobs write into")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the pack DIR holds (a job: its own part of one); without it, the tool refuses")
    ap.add_argument("--format", choices=FORMATS, help="input schema (default: detected per input)")
    ap.add_argument("--image-root", metavar="DIR",
                    help="base of relative image paths, and the folder images must lie in (default: the input's "
                         "folder)")
    ap.add_argument("--allow-outside-root", action="store_true",
                    help="also read images whose path resolves (symlinks included) outside the image root")
    ap.add_argument("--max-image-bytes", type=float, default=MAX_IMAGE_BYTES, metavar="N",
                    help=f"reject images larger than N bytes (default: {MAX_IMAGE_BYTES >> 20} MiB)")
    ap.add_argument("--prefix", default="shard", help="shard name prefix (default: shard)")
    ap.add_argument("--maxcount", type=int, default=10000, help="samples per shard at most (default: 10000)")
    ap.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most (default: 1e9)")
    ap.add_argument("--max-side", type=int, metavar="N", help="downscale and re-encode images longer than N px")
    ap.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of re-encoded images (default: 90)")
    ap.add_argument("--workers", type=int, default=_cores(), help="processes reading images (default: all cores)")
    ap.add_argument("--shuffle", action="store_true", help="shuffle records across shards (needs --seed)")
    ap.add_argument("--seed", type=int, help="seed of --shuffle")
    ap.add_argument("--bucket-size", type=int, default=1024, metavar="N",
                    help="--shuffle: output positions per temporary bucket, bounds memory (default: 1024)")
    ap.add_argument("--job-index", type=int, metavar="J", help="this job's index, with --num-jobs")
    ap.add_argument("--num-jobs", type=int, metavar="N", help="number of jobs sharing the pack")
    ap.add_argument("--strict", action="store_true", help="stop at the first bad record instead of rejecting it")
    args = ap.parse_args(argv)
    if args.shuffle and args.seed is None:
        ap.error("--shuffle needs --seed, so that the order can be made again")
    if (args.job_index is None) != (args.num_jobs is None):
        ap.error("--job-index and --num-jobs go together")
    if args.num_jobs is not None and not (args.num_jobs >= 1 and 0 <= args.job_index < args.num_jobs):
        ap.error(f"need 0 <= --job-index < --num-jobs, got {args.job_index} and {args.num_jobs}")
    for name in ("maxcount", "maxsize", "workers", "bucket_size", "max_side", "max_image_bytes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 1 <= args.jpeg_quality <= 100:
        ap.error("--jpeg-quality must lie in 1..100")
    args.maxsize, args.max_image_bytes = int(args.maxsize), int(args.max_image_bytes)
    return args


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def merge_main(argv: list[str]) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="pack_shards.py merge", description="Join job manifests into one.")
    ap.add_argument("manifests", nargs="+", metavar="MANIFEST")
    ap.add_argument("--output", "-o", required=True, metavar="PATH", help="the merged manifest, e.g. DIR/index.json")
    args = ap.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.output))
    old_shards, old_single = _local_shards(args.output), _is_single_job_pack(args.output)
    doc = merge_manifests(args.manifests, args.output)
    # The pack the manifest replaced goes: its shards that neither the new manifest nor a job manifest beside
    # it names (a job's are its own), and a single-job pack's rejects file.
    live = {s["url"] for s in doc["shards"]}
    for name in os.listdir(folder):
        if _job_of_file(name) is not None and name.endswith(".json"):
            live |= _local_shards(os.path.join(folder, name))
    for name in sorted(old_shards - live):
        _remove(os.path.join(folder, name))
    if old_single:
        _remove(os.path.join(folder, rejects_name()))
    print(f"pack_shards merge: {doc['samples']} samples, {doc['num_shards']} shards, {doc['bytes']} bytes -> "
          f"{args.output}")
    return doc


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status (0, or 1 with a message on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["merge"]:
            merge_main(argv[1:])
        else:
            pack(parse_args(argv))
    except (PackError, FormatError, OSError) as e:
        print(f"pack_shards: error: {e}", file=sys.stderr)
        return 1
    except BrokenProcessPool:
        print("pack_shards: error: a worker process died (out of memory?); try fewer --workers", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pack_shards: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
