"""Benchmark the tar reader against plain reads and webdataset, on shards of real photos, in one process.

    python tools/bench/tar.py [--workdir /tmp/vlmstream-bench] [--shards 8] [--per-shard 1000] [--rounds 3] [--json]

The corpus is tools/bench/common.py's photo corpus (~55 KB JPEGs with a small JSON conversation), built once
under --workdir. Each round times, in turn: (a) plain 1 MiB reads of the shard files (the I/O limit),
(b) webdataset's ``tarfile_to_samples`` fed ``{"url": path}`` dicts (it opens them with ``open(path, "rb")``),
(c) vlmstream's ``tar_samples`` stage fed streams from ``open(path, "rb")`` too (the headline ratio compares
these two), and (d) "vlmstream+buf", the same with a 1 MiB buffer (``--big-buffer``). The shards are read once
before timing, so every timed run reads from the page cache. The best round of each reader is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]  # the checkout's vlmstream; tools/

from bench.common import build_corpus, corpus_arguments, read_all  # noqa: E402
from vlmstream.cli.bench import machine, machine_line  # noqa: E402
from vlmstream.stages.read import tar_samples  # noqa: E402


# ----------------------------------------------------------------------------------------------- readers


def read_plain(paths: list[str]) -> int:
    """Read the bytes and nothing else; -1: no sample count (the caller knows the corpus's)."""
    read_all(paths)
    return -1


def read_webdataset(paths: list[str]) -> int:
    import webdataset as wds

    n = 0
    for _ in wds.tarfile_to_samples()([{"url": p} for p in paths]):
        n += 1
    return n


def read_vlmstream(paths: list[str], buffering: int) -> int:
    stage = tar_samples()
    n = 0
    for _ in stage({"url": p, "stream": open(p, "rb", buffering=buffering)} for p in paths):
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    corpus_arguments(ap)
    ap.add_argument("--big-buffer", type=int, default=1 << 20, help="buffer size of open() for row (d)")
    args = ap.parse_args()

    paths = build_corpus(args.workdir, args.shards, args.per_shard)
    started_on = machine()  # the load average before the runs
    total_bytes = sum(os.path.getsize(p) for p in paths)
    samples = args.shards * args.per_shard
    read_all(paths)  # warm the page cache

    readers: dict[str, Callable[[], int]] = {
        "plain read": lambda: read_plain(paths),
        "webdataset": lambda: read_webdataset(paths),
        "vlmstream": lambda: read_vlmstream(paths, -1),
        "vlmstream+buf": lambda: read_vlmstream(paths, args.big_buffer),
    }
    times: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(args.rounds):
        for name, fn in readers.items():  # alternate the readers within each round
            t0 = time.perf_counter()
            n = fn()
            times[name].append(time.perf_counter() - t0)
            if n not in (-1, samples):
                raise SystemExit(f"{name} read {n} samples, expected {samples}")

    rows = {}
    for name, ts in times.items():
        best = min(ts)
        rows[name] = {"samples_per_s": round(samples / best), "mb_per_s": round(total_bytes / best / 1e6, 1),
                      "best_s": round(best, 4), "median_s": round(statistics.median(ts), 4)}
    ratio = rows["vlmstream"]["samples_per_s"] / rows["webdataset"]["samples_per_s"]
    result = {
        "samples": samples, "shards": args.shards, "bytes": total_bytes, "rounds": args.rounds,
        "big_buffer": args.big_buffer, "machine": started_on,
        "readers": rows, "vlmstream_over_webdataset": round(ratio, 2),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{samples} samples in {args.shards} shards, {total_bytes / 1e6:.0f} MB, page cache warm, "
          f"best of {args.rounds} rounds; {machine_line(result['machine'])}")
    print(f"{'reader':<14} {'samples/s':>10} {'MB/s':>8} {'median s':>9}")
    for name, r in rows.items():
        print(f"{name:<14} {r['samples_per_s']:>10,.0f} {r['mb_per_s']:>8,.0f} {r['median_s']:>9.3f}")
    print(f"vlmstream / webdataset: {ratio:.2f}x")


if __name__ == "__main__":
    main()
