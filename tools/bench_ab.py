"""Compare two commits on the 224 job, in alternating runs: what a change did, on a machine too noisy for one run.

    python tools/bench_ab.py c3fd211 HEAD [--pairs 2] [--rounds 3] [--contenders vlmstream limit]

Each commit is checked out once into a temporary git worktree; then `tools/bench_pipeline.py --json` (each
commit's own) runs ``--pairs`` times for each, the commits alternating, all on the same corpus (``--workdir``).
A run interleaves its contenders round by round, so the decode limit, measured beside vlmstream in the same
run, is the yardstick for that run's machine speed: the figure to compare is vlmstream / limit per round.
On the 2-core benchmark machine the same commit's rates move by 3-8% between runs; this ratio much less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git(*argv: str) -> str:
    return subprocess.run(["git", "-C", ROOT, *argv], check=True, capture_output=True, text=True).stdout.strip()


def run(tree: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.join(tree, "tools", "bench_pipeline.py"), "--json", "--workdir", args.workdir,
           "--rounds", str(args.rounds), "--contenders", *args.contenders]
    out = subprocess.run(cmd, cwd=tree, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("commits", nargs=2, help="the commit before and the commit after")
    ap.add_argument("--pairs", type=int, default=2, help="runs of each commit, alternating")
    ap.add_argument("--rounds", type=int, default=3, help="rounds in each run")
    ap.add_argument("--contenders", nargs="+", default=["vlmstream", "limit"])
    ap.add_argument("--workdir", default="/tmp/vlmstream-bench")
    args = ap.parse_args()
    if "limit" not in args.contenders:
        raise SystemExit("bench_ab compares vlmstream / limit: keep limit among --contenders")
    shas = [git("rev-parse", "--short", c) for c in args.commits]
    with tempfile.TemporaryDirectory(prefix="vlmstream-ab-") as tmp:
        trees = [os.path.join(tmp, sha) for sha in shas]
        for sha, tree in zip(shas, trees):
            git("worktree", "add", "--detach", tree, sha)
        try:
            per_round: dict[str, list[float]] = {sha: [] for sha in shas}
            rates: dict[str, dict[str, list[float]]] = {sha: {} for sha in shas}
            for p in range(args.pairs):
                for sha, tree in zip(shas, trees):
                    res = run(tree, args)
                    per_round[sha] += res["vlmstream_over_limit"]["per_round"]
                    for name, row in res["rows"].items():
                        rates[sha].setdefault(name, []).extend(row["runs_samples_per_s"])
                    print(f"pair {p + 1} {sha}: vlmstream / limit {res['vlmstream_over_limit']['per_round']}",
                          file=sys.stderr, flush=True)
        finally:
            for tree in trees:
                git("worktree", "remove", "--force", tree)
    print(f"{args.pairs} runs of {args.rounds} rounds per commit, alternating; means over all rounds:")
    for sha in shas:
        r = per_round[sha]
        means = ", ".join(f"{name} {statistics.mean(v):,.0f}/s" for name, v in rates[sha].items())
        print(f"  {sha}: vlmstream / limit {statistics.mean(r):.3f}x (median {statistics.median(r):.3f}x, "
              f"{min(r):.3f}-{max(r):.3f}); {means}")
    before, after = (statistics.mean(per_round[s]) for s in shas)
    print(f"  change: {after / before - 1:+.1%} in vlmstream / limit")


if __name__ == "__main__":
    main()
