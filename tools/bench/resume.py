"""How fast a resume is: time from `load_state_dict` to the first batch, against replaying to the same point.

The 224 job's corpus (640x480 photo JPEGs, tools/bench/common.py) through shards -> split -> fetch -> tar ->
shuffle(2000) -> decode(Resize(224)) -> batch(32) with 2 DataLoader workers, local shards. A run is stopped
after K batches and its loader state saved; then, in this process, a fresh Loader
  - resumes from the state (load_state_dict, then the first batch), and
  - the naive way: starts the epoch again and throws away K batches (what a loader without state must do).
Both are timed to their first useful batch; the state's size is reported too.

    python tools/bench/resume.py [--batches 100] [--workdir /tmp/vlmstream-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]  # the checkout's vlmstream; tools/

import vlmstream as vs  # noqa: E402
from bench.common import build_corpus  # noqa: E402


def loader_for(paths: list[str]) -> vs.Loader:
    pipe = vs.Pipeline(vs.shards(paths, seed=0), vs.split_by_node(0, 1), vs.split_by_worker(), vs.fetch(),
                       vs.tar_samples(), vs.shuffle(2000, initial=500), vs.decode(vs.Resize(224)), vs.batch(32))
    return vs.Loader(pipe, num_workers=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/vlmstream-bench")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=100, help="K: batches delivered before the checkpoint")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    paths = build_corpus(args.workdir, args.shards, args.per_shard)

    loader = loader_for(paths)
    it = iter(loader)
    t0 = time.perf_counter()
    first = next(it)
    fresh_first = time.perf_counter() - t0
    for _ in range(args.batches - 1):
        next(it)
    steady = (args.batches - 1) / (time.perf_counter() - t0 - fresh_first)
    following = next(it)["__key__"]
    t0 = time.perf_counter()
    state = json.dumps(loader.state_dict())  # as it would be written beside a checkpoint (K+1 batches in)
    save_s = time.perf_counter() - t0
    it.close()
    del first

    t0 = time.perf_counter()
    resumed = loader_for(paths)
    resumed.load_state_dict(json.loads(state))
    rit = iter(resumed)
    got = next(rit)
    resume_s = time.perf_counter() - t0
    rit.close()

    t0 = time.perf_counter()
    replay = iter(loader_for(paths))
    for _ in range(args.batches + 1):
        next(replay)
    after_replay = next(replay)
    replay_s = time.perf_counter() - t0
    replay.close()
    assert after_replay["__key__"] == got["__key__"], "resume and replay disagree"
    del following

    res = {
        "batches_before_checkpoint": args.batches + 1,
        "state_bytes": len(state),
        "state_save_ms": round(save_s * 1000, 2),
        "fresh_time_to_first_batch_s": round(fresh_first, 2),
        "resume_to_first_batch_s": round(resume_s, 2),
        "replay_to_same_batch_s": round(replay_s, 2),
        "speedup_vs_replay": round(replay_s / resume_s, 1),
        "steady_batches_per_s": round(steady, 1),
    }
    if args.json:
        print(json.dumps(res, indent=1))
        return
    for k, v in res.items():
        print(f"{k:32s} {v}")


if __name__ == "__main__":
    main()
