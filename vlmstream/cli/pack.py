"""`vlmstream pack`: the packer's command line (dataset/build.py does the work; tools/pack_shards.py is this too).

    vlmstream pack INPUT [INPUT ...] --output DIR [options]
    vlmstream pack merge DIR/index.j*.json --output DIR/index.json
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Sequence

from ..dataset.records import FORMAT_ALIASES, FORMATS, MAX_IMAGE_BYTES

def parse_args(argv: list[str], prog: str = "vlmstream pack") -> argparse.Namespace:
    from ..dataset import build

    ap = argparse.ArgumentParser(prog=prog, description=build.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="INPUT",
                    help="JSON/JSONL/Parquet files, image folders, or webdataset shards: .tar/.tar.gz/.tgz files, "
                         "brace patterns and globs of them, or a manifest (index.json), local or at a URL "
                         "(http(s)://, hf://, s3:// ...)")
    ap.add_argument("--output", "-o", required=True, metavar="DIR",
                    help="an empty (or new) folder, local, in an object store (s3://BUCKET/PREFIX, gs://, az://) or "
                         "in a Hub dataset repo (hf://datasets/ORG/NAME/PATH); with --job-index, the folder all "
                         "the jobs write into")
    ap.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting of the object store beside the environment's, as obstore names it (repeat it)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the pack DIR holds (a job: its own part of one); without it, the tool refuses")
    ap.add_argument("--format", choices=(*FORMATS, *FORMAT_ALIASES),
                    help="input schema (default: detected per input; wds is webdataset)")
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
    args.format = FORMAT_ALIASES.get(args.format, args.format)
    args.storage_options = storage_options(ap, args.storage_option)
    return args


def storage_options(ap: argparse.ArgumentParser, pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            ap.error(f"--storage-option takes KEY=VALUE, got {pair.split('=')[0]!r}...")
        out[key] = value
    return out


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def merge_main(argv: list[str], prog: str = "vlmstream pack") -> dict[str, Any]:
    from ..dataset.output import merge

    ap = argparse.ArgumentParser(prog=f"{prog} merge", description="Join job manifests into one.")
    ap.add_argument("manifests", nargs="+", metavar="MANIFEST")
    ap.add_argument("--output", "-o", required=True, metavar="PATH", help="the merged manifest, e.g. DIR/index.json")
    ap.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting of the object store beside the environment's (repeat it)")
    args = ap.parse_args(argv)
    doc = merge(args.manifests, args.output, storage_options(ap, args.storage_option))
    print(f"{prog} merge: {doc['samples']} samples, {doc['num_shards']} shards, {doc['bytes']} bytes -> "
          f"{args.output}")
    return doc


def main(argv: Sequence[str] | None = None, prog: str = "vlmstream pack") -> int:
    """Run the packer; returns the exit status (0, or 1 with a message on stderr, 130 when interrupted)."""
    from ..dataset.build import pack
    from ..dataset.output import PackError
    from ..errors import FormatError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["merge"]:
            merge_main(argv[1:], prog)
        else:
            doc = pack(parse_args(argv, prog))
            empty = doc["packing"]["empty_captions"]
            print(f"{prog}: {doc['samples']} samples, {doc['num_shards']} shards, {doc['bytes']} bytes, "
                  f"{doc['rejects']} rejects{f' ({empty} empty captions)' if empty else ''}, {doc['seconds']:.1f} s "
                  f"({doc['samples'] / max(doc['seconds'], 1e-9):.0f} samples/s) -> {doc['path']}")
    except (PackError, FormatError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except BrokenProcessPool:
        print(f"{prog}: error: a worker process died (out of memory?); try fewer --workers", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
