"""Benchmark the batch stage's row-by-row collation in one process: decode(Resize(224)) -> batch(32).

    python tools/bench/batch.py [--workdir /tmp/vlmstream-bench] [--samples 256] [--rounds 30]

The samples (640x480 photo JPEGs with a JSON conversation, tools/bench/common.py's corpus) are read into memory
first; each round decodes them to [3, 224, 224] uint8 tensors and batches them, in turn:

  rows        vs.batch(32): each sample's tensors copied into their rows as it arrives (vlmstream.stages.batch.Rows)
  at_the_end  vs.default_collate of the same 32 samples once all are there (what vs.batch did before)
  limit       the same decode and resize in a bare loop, each image made planar with .contiguous(), no batches

Both batch variants stack into one reused buffer, as in a DataLoader worker under vs.Loader, where a batch is made
in a recycled shared-memory segment (fresh memory each batch would cost both the same page faults).

CPU time per sample, the 25th percentile and median of the rounds (this machine's noise is a few per cent).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]  # the checkout's vlmstream; tools/

import torch  # noqa: E402

import vlmstream as vs  # noqa: E402
from bench.common import IMAGE_KEY, build_corpus  # noqa: E402
from vlmstream.io.tar import read_tar_samples  # noqa: E402
from vlmstream.stages.decode import open_image  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/vlmstream-bench")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    path = build_corpus(args.workdir, 8, 1000)[0]
    with open(path, "rb") as f:
        samples = list(read_tar_samples(f, path))[: args.samples]
    resize = vs.Resize(224)

    buffers: dict[tuple, torch.Tensor] = {}

    def reused(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if (shape, dtype) not in buffers:
            buffers[shape, dtype] = torch.empty(shape, dtype=dtype)
        return buffers[shape, dtype]

    def chain(stage: vs.batch) -> None:
        stage.empty = reused  # what bind() gives the last stage in a vs.Loader worker
        for _ in stage(vs.decode(resize)(iter(samples))):
            pass

    def limit() -> None:
        for s in samples:
            resize(open_image(s[IMAGE_KEY], resize.draft_size())).contiguous()

    at_the_end = vs.batch(32, collate=lambda xs: vs.default_collate(xs, reused))
    runs = {"rows": lambda: chain(vs.batch(32)), "at_the_end": lambda: chain(at_the_end), "limit": limit}
    ms: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            t0 = time.process_time()
            run()
            ms[name].append((time.process_time() - t0) / len(samples) * 1e3)
    res = {}
    for name, xs in ms.items():
        xs.sort()
        res[name] = {"p25_ms": round(xs[len(xs) // 4], 4), "median_ms": round(xs[len(xs) // 2], 4)}
    if args.json:
        print(json.dumps(res))
        return
    print(f"{len(samples)} samples, {args.rounds} rounds, CPU ms a sample (25th percentile, median):")
    for name, r in res.items():
        print(f"  {name:<11} {r['p25_ms']:.3f}  {r['median_ms']:.3f}")


if __name__ == "__main__":
    main()
