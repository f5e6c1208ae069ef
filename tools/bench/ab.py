"""Compare two commits on the 224 job (and resume), in alternating runs: what a change did, on a machine too noisy
for one run.

    python tools/bench/ab.py 408efd9 HEAD [--pairs 3] [--rounds 2] [--contenders vlmstream limit] [--resume 100]

Each commit is checked out once into a temporary git worktree; then each commit's own copy of the 224 job's tool
(tools/bench/pipeline.py, or tools/bench_pipeline.py in commits from before the tools moved) runs with --json,
``--pairs`` times for each commit, the commits alternating, all on the same corpus (``--workdir``). A run
interleaves its contenders round by round, so the decode limit, measured beside vlmstream in the same run, is the
yardstick for that run's machine speed: the figure to compare is vlmstream / limit per round. On the 2-core
benchmark machine the same commit's rates move by 3-8% between runs; this ratio much less.

``--resume K`` also runs each commit's resume tool (tools/bench/resume.py, or tools/bench_resume.py) after each
of its 224 runs: seconds from `load_state_dict` to the first batch after K batches, against replaying.
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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Where each tool lives in a commit: now, then before the move into tools/bench/.
SCRIPTS = {"pipeline": ("tools/bench/pipeline.py", "tools/bench_pipeline.py"),
           "resume": ("tools/bench/resume.py", "tools/bench_resume.py")}


def git(*argv: str) -> str:
    return subprocess.run(["git", "-C", ROOT, *argv], check=True, capture_output=True, text=True).stdout.strip()


def script(tree: str, tool: str) -> str:
    """The commit's own copy of a benchmark tool, wherever that commit keeps it."""
    for rel in SCRIPTS[tool]:
        if os.path.isfile(os.path.join(tree, rel)):
            return os.path.join(tree, rel)
    raise SystemExit(f"{tree}: no {' or '.join(SCRIPTS[tool])}")


def run(tree: str, tool: str, *argv: str) -> dict[str, Any]:
    """One run of a commit's tool, in its worktree (it puts that worktree's vlmstream first on sys.path)."""
    cmd = [sys.executable, script(tree, tool), "--json", *argv]
    out = subprocess.run(cmd, cwd=tree, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out[out.index("{"):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("commits", nargs=2, help="the commit before and the commit after")
    ap.add_argument("--pairs", type=int, default=2, help="runs of each commit, alternating")
    ap.add_argument("--rounds", type=int, default=3, help="rounds in each run")
    ap.add_argument("--contenders", nargs="+", default=["vlmstream", "limit"])
    ap.add_argument("--resume", type=int, default=0, metavar="K",
                    help="also time resuming after K batches, after each 224 run (0: not)")
    ap.add_argument("--workdir", default="/tmp/vlmstream-bench")
    ap.add_argument("--out", metavar="PATH", help="also write every run's figures here (JSON)")
    args = ap.parse_args()
    if "limit" not in args.contenders:
        raise SystemExit("ab.py compares vlmstream / limit: keep limit among --contenders")
    shas = [git("rev-parse", "--short", c) for c in args.commits]
    runs: dict[str, list[dict[str, Any]]] = {sha: [] for sha in shas}
    with tempfile.TemporaryDirectory(prefix="vlmstream-ab-") as tmp:
        trees = [os.path.join(tmp, sha) for sha in shas]
        for sha, tree in zip(shas, trees):
            git("worktree", "add", "--detach", tree, sha)
        try:
            for p in range(args.pairs):
                for sha, tree in zip(shas, trees):
                    one = {"224": run(tree, "pipeline", "--workdir", args.workdir, "--rounds", str(args.rounds),
                                      "--contenders", *args.contenders)}
                    line = f"vlmstream / limit {one['224']['vlmstream_over_limit']['per_round']}"
                    if args.resume:
                        one["resume"] = run(tree, "resume", "--workdir", args.workdir, "--batches", str(args.resume))
                        line += f", resume {one['resume']['resume_to_first_batch_s']} s"
                    runs[sha].append(one)
                    print(f"pair {p + 1} {sha}: {line}", file=sys.stderr, flush=True)
        finally:
            for tree in trees:
                git("worktree", "remove", "--force", tree)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"commits": dict(zip(args.commits, shas)), "args": vars(args), "runs": runs}, f, indent=1)
    report(args, shas, runs)


def report(args: argparse.Namespace, shas: list[str], runs: dict[str, list[dict[str, Any]]]) -> None:
    print(f"{args.pairs} runs of {args.rounds} rounds per commit, alternating; means over all rounds:")
    ratio: dict[str, list[float]] = {}
    for sha in shas:
        r = ratio[sha] = [x for one in runs[sha] for x in one["224"]["vlmstream_over_limit"]["per_round"]]
        rates: dict[str, list[float]] = {}
        for one in runs[sha]:
            for name, row in one["224"]["rows"].items():
                rates.setdefault(name, []).extend(row["runs_samples_per_s"])
        means = ", ".join(f"{name} {statistics.mean(v):,.0f}/s" for name, v in rates.items())
        print(f"  {sha}: vlmstream / limit {statistics.mean(r):.3f}x (median {statistics.median(r):.3f}x, "
              f"{min(r):.3f}-{max(r):.3f}); {means}")
        if args.resume:
            res = [one["resume"] for one in runs[sha]]
            seconds = {k: [x[k] for x in res] for k in ("resume_to_first_batch_s", "replay_to_same_batch_s",
                                                         "fresh_time_to_first_batch_s")}
            print(f"  {sha}: resume to the first batch {seconds['resume_to_first_batch_s']} s, replay "
                  f"{seconds['replay_to_same_batch_s']} s, fresh start {seconds['fresh_time_to_first_batch_s']} s")
    before, after = (statistics.mean(ratio[s]) for s in shas)
    print(f"  change: {after / before - 1:+.1%} in vlmstream / limit")


if __name__ == "__main__":
    main()
