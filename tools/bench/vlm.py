"""Benchmark the VLM job (issue 4): photo JPEGs with multi-turn conversations -> tiles -> tokens -> packed batches.

    python tools/bench/vlm.py [--workdir /tmp/vlmstream-bench] [--shards 4] [--per-shard 250] [--rounds 3]
                              [--workers 2] [--output float|uint8] [--prefix] [--breakdown N] [--json]

The corpus and the tokenizer are tools/bench/common.py's: the photo generator's 640x480 JPEGs, each with a
multi-turn conversation in vlmstream's format (docs/FORMAT.md) of 2-6 question/answer turns drawn from easy-VQA
(a quarter of the samples open with a system turn), written once under --workdir with an ``index.json``; a
byte-level BPE (1,000 tokens) trained on easy-VQA's questions and answers, as a ChatTokenizer with
``image_token_length=64``.

The job, exactly as a user writes it:

    vs.shards(index.json), vs.split_by_node(0, 1), vs.split_by_worker(), vs.fetch(), vs.tar_samples(),
    vs.decode(vs.ImageTiles(tile=512, max_side=1024)), vs.tokenize(tok, max_len=4096),
    vs.pack(4096, max_images=18), vs.batch(8)

A 640x480 photo becomes a 1024x1024 image (2x2 tiles of 512) plus a global view: 5 tiles, 5 x (1 marker + 64
image tokens) = 325 tokens. Once, before the rounds: the pack fill for buffer sizes from 16 to 512 samples on the
corpus's real token counts (images not decoded: their grids come from the JPEG headers), with the tile memory each
buffer holds. Then each round measures, in this order:

  stages    one pass over the corpus in this process (no DataLoader), with the pipeline's own telemetry: a stage's
            own time is the time in its ``next()`` minus its upstream's (``Pipeline.stats()``); the source
            stages, shards..fetch, count as one (fetch reads ahead in a thread). CPU time of the whole pass too.
  breakdown decode's own steps (JPEG decode, resize to the tile grid, global view, cutting tiles, to tensor) timed
            apart on the first N samples, in CPU time (``--breakdown 0`` skips it).
  prefix    only with ``--prefix``: the chain cut after tar_samples, decode, tokenize, pack and batch, each run
            over the whole corpus; differences of consecutive prefixes are the stages' costs. A cross-check of the
            timers that is blind to stages cheaper than the run-to-run noise of the decode (4 more passes a round).
  loader    end to end through ``vs.Loader(pipe, num_workers=W)``: from building the loader to the last batch,
            with the CPU time of this process and its (joined) workers.

Throughput figures count what the emitted batches hold: samples (packed keys), input tokens (attention mask),
image tokens (``<|image|>`` ids; the tiles' markers are counted apart), batches, and the pack fill (tokens per
4096-token row, separators included). Medians over rounds are reported, and the best rates beside them; the
peak RSS is of the whole run, this process and its workers together.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]  # the checkout's vlmstream; tools/

import torch  # noqa: E402

import vlmstream as vs  # noqa: E402
import vlmstream.core.loader  # noqa: E402,F401  (all modules loaded now: edits to the tree mid-run cannot mix versions)
from bench.common import IMAGE_KEY, build_vlm_corpus, corpus_arguments, cpu_times, read_all, vlm_tokenizer  # noqa: E402
from vlmstream.cli.bench import PeakRSS, machine, machine_line  # noqa: E402
from vlmstream.stages.tokenize import ChatTokenizer  # noqa: E402

SEQ_LEN, MAX_IMAGES, BATCH, TILE, MAX_SIDE, RUN = 4096, 18, 8, 512, 1024, 64
STAGES = ("source", "tar_samples", "decode", "tokenize", "pack", "batch")  # source: shards, splits, fetch
SOURCE = 4  # the pipeline's first four stages make up "source"


# ------------------------------------------------------------------------------------------------- chain


def stages(index: str, tok: ChatTokenizer, output: str) -> list[Callable[[Iterator[Any]], Iterator[Any]]]:
    """The VLM job's stages; the first four make up the 'source' group."""
    return [vs.shards(index, seed=0), vs.split_by_node(0, 1), vs.split_by_worker(), vs.fetch(), vs.tar_samples(),
            vs.decode(vs.ImageTiles(tile=TILE, max_side=MAX_SIDE, output=output)), vs.tokenize(tok, max_len=SEQ_LEN),
            vs.pack(SEQ_LEN, max_images=MAX_IMAGES), vs.batch(BATCH)]


class Counts:
    """What the emitted batches hold."""

    def __init__(self, tok: ChatTokenizer):
        self.image_id = tok.image_token_id
        self.markers = torch.tensor(sorted({tok.tok.token_to_id(tok.global_image_token)}
                                           | {tok.tok.token_to_id(tok.tile_marker(r, c)) for r in range(1, 9)
                                              for c in range(1, 9)}))
        self.samples = self.batches = self.rows = self.tokens = self.image_tokens = self.marker_tokens = 0
        self.positions = self.tiles = 0

    def add(self, b: dict[str, Any]) -> None:
        ids = b["input_ids"]
        self.batches += 1
        self.rows += ids.shape[0]
        self.positions += ids.numel()
        self.samples += sum(k.count("+") + 1 for k in b["__key__"])
        self.tokens += int(b["attention_mask"].sum())
        self.image_tokens += int((ids == self.image_id).sum())
        self.marker_tokens += int(torch.isin(ids, self.markers).sum())
        self.tiles += sum(t.shape[0] for row in b["images"] for t in row)

    def rates(self, seconds: float) -> dict[str, float]:
        return {"seconds": seconds, "samples_per_s": self.samples / seconds, "tokens_per_s": self.tokens / seconds,
                "image_tokens_per_s": self.image_tokens / seconds, "batches_per_s": self.batches / seconds}

    def totals(self) -> dict[str, Any]:
        return {"samples": self.samples, "batches": self.batches, "rows": self.rows, "tokens": self.tokens,
                "image_tokens": self.image_tokens, "marker_tokens": self.marker_tokens, "tiles": self.tiles,
                "padded_positions": self.positions, "fill": self.tokens / (self.rows * SEQ_LEN)}


def run_stages(index: str, tok: ChatTokenizer, output: str) -> dict[str, Any]:
    """One in-process pass with the pipeline's telemetry on: each stage's own seconds and items out."""
    chain = stages(index, tok, output)
    pipe = vs.Pipeline(*chain, rank=0, world_size=1, telemetry=True)
    counts = Counts(tok)
    t0, c0 = time.perf_counter(), time.process_time()
    for b in pipe:
        counts.add(b)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rep = pipe.stats().stages
    own = [sum(x.own_s for x in rep[:SOURCE])] + [x.own_s for x in rep[SOURCE:]]
    items = [rep[SOURCE - 1].items_out] + [x.items_out for x in rep[SOURCE:]]
    pack = chain[7]
    return {"wall_s": wall, "cpu_s": cpu, "stage_s": dict(zip(STAGES, own)), "items": dict(zip(STAGES, items)),
            "pack_fill": pack.stats.fill, "pack_samples": pack.stats.samples, "counts": counts.totals(),
            "rates": counts.rates(wall)}


def run_prefixes(index: str, tok: ChatTokenizer, output: str) -> dict[str, float]:
    """Wall seconds of the chain cut after each stage from tar_samples on, in-process."""
    out = {}
    for cut in range(5, 10):  # stages[:5] ends with tar_samples ... stages[:9] with batch
        pipe = vs.Pipeline(*stages(index, tok, output)[:cut], rank=0, world_size=1)
        t0 = time.perf_counter()
        n = sum(1 for _ in pipe)
        out[STAGES[cut - 4]] = time.perf_counter() - t0
        if not n:
            raise SystemExit(f"prefix up to {STAGES[cut - 4]} yielded nothing")
    return out


def run_loader(index: str, tok: ChatTokenizer, output: str, workers: int) -> dict[str, Any]:
    counts = Counts(tok)
    t0, c0 = time.perf_counter(), cpu_times()
    first = None
    for b in vs.Loader(vs.Pipeline(*stages(index, tok, output), rank=0, world_size=1), num_workers=workers):
        first = first or time.perf_counter() - t0
        counts.add(b)
    wall = time.perf_counter() - t0
    cpu = cpu_times().total - c0.total  # the workers have been joined: their CPU is counted
    return {"wall_s": wall, "cpu_s": cpu, "first_batch_s": first, "counts": counts.totals(), "rates": counts.rates(wall)}


def decode_breakdown(index: str, tok: ChatTokenizer, output: str, n: int) -> dict[str, float]:
    """Where decode's time goes: ImageTiles' steps, one by one, over the first n samples (CPU ms per sample).

    The same calls as ``decode(ImageTiles(...))`` makes (vlmstream.stages.tiles), timed apart; their sum should come
    close to the decode stage's own time.
    """
    from vlmstream.stages.decode import open_image

    tiles = vs.ImageTiles(tile=TILE, max_side=MAX_SIDE, output=output)
    raw = []
    for s in vs.Pipeline(*stages(index, tok, output)[:5], rank=0, world_size=1):
        raw.append(s[IMAGE_KEY])
        if len(raw) == n:
            break
    steps = dict.fromkeys(("jpeg_decode", "resize_to_grid", "global_view", "assemble", "to_float"), 0.0)
    P = time.process_time  # CPU time: less at the mercy of other processes than the wall clock
    for data in raw:
        t0 = P()
        im = open_image(data, tiles.draft_size)
        im.load()  # Pillow decodes lazily
        t1 = P()
        w, h = tiles.size_for(*im.size)
        resized = im if im.size == (w, h) else im.resize((w, h), tiles.resample)
        t2 = P()
        view = resized.resize((TILE, TILE), tiles.resample) if (w, h) != (TILE, TILE) else None
        t3 = P()
        pixels = tiles.assemble(resized, view)
        t4 = P()
        if output == "float":
            pixels = pixels.float().div_(255.0)
        t5 = P()
        for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            steps[k] += v
    return {k: 1000 * v / len(raw) for k, v in steps.items()}


def pack_fill_by_buffer(index: str, tok: ChatTokenizer, output: str, buffers: list[int]) -> dict[str, Any]:
    """vs.pack's fill for each ``buffer`` size, on the corpus's real token counts, and the tiles the buffer holds.

    Images are not decoded: each gets the grid ImageTiles gives its size (read from the JPEG header) and an
    empty pixel tensor, so the token counts are exact and the pass takes seconds.
    """
    import io

    from PIL import Image

    from vlmstream.stages.tiles import Tiles, grid_of, num_tiles

    tiles, tk = vs.ImageTiles(tile=TILE, max_side=MAX_SIDE), vs.tokenize(tok, max_len=SEQ_LEN)
    toks, nbytes = [], []
    for s in vs.Pipeline(*stages(index, tok, output)[:5], rank=0, world_size=1):
        d, n = dict(s), 0
        for ext in json.loads(s["json"])["images"]:
            grid = grid_of(*tiles.size_for(*Image.open(io.BytesIO(s[ext])).size), TILE)
            d[ext] = Tiles(torch.empty(num_tiles(grid), 0), grid)
            n += num_tiles(grid) * 3 * TILE * TILE * (4 if output == "float" else 1)
        out = tk.encode_sample(d)
        if out is not None:
            toks.append(out)
            nbytes.append(n)
    mean_bytes = sum(nbytes) / len(nbytes)
    rows = {}
    for b in buffers:
        p = vs.pack(SEQ_LEN, max_images=MAX_IMAGES, buffer=b)
        sequences = sum(1 for _ in p(iter(toks)))
        rows[str(b)] = {"fill": p.stats.fill, "sequences": sequences, "buffer_mb": min(b, len(toks)) * mean_bytes / 1e6}
    return {"samples": len(toks), "mean_tokens": sum(len(t["input_ids"]) for t in toks) / len(toks),
            "tile_mb_per_sample": mean_bytes / 1e6, "by_buffer": rows}


# -------------------------------------------------------------------------------------------------- main


def summarize(rounds: list[dict[str, Any]], samples: int) -> dict[str, Any]:
    med, best = statistics.median, min
    st = [r["stages"] for r in rounds]
    stage_med = {s: med(r["stage_s"][s] for r in st) for s in STAGES}
    total = sum(stage_med.values())
    out: dict[str, Any] = {
        "in_process": {
            "wall_s": {"median": med(r["wall_s"] for r in st), "best": best(r["wall_s"] for r in st)},
            "cpu_ms_per_sample": 1000 * med(r["cpu_s"] for r in st) / samples,
            "stage_s": stage_med,
            "stage_share": {s: v / total for s, v in stage_med.items()},
            "stage_ms_per_sample": {s: 1000 * v / samples for s, v in stage_med.items()},
            "best_rates": {k: (max if k != "seconds" else min)(r["rates"][k] for r in st) for k in st[0]["rates"]},
            "all_wall_s": [r["wall_s"] for r in st],
            "counts": st[0]["counts"], "pack_fill": st[0]["pack_fill"],
            "rates": {k: med(r["rates"][k] for r in st) for k in st[0]["rates"]},
        }
    }
    if all("breakdown" in r for r in rounds):
        out["decode_breakdown_ms"] = {k: med(r["breakdown"][k] for r in rounds) for k in rounds[0]["breakdown"]}
    if all("prefix" in r for r in rounds):
        pre = {s: med(r["prefix"][s] for r in rounds) for s in STAGES[1:]}
        diffs = {"tar_samples": pre["tar_samples"]}
        for a, b in zip(STAGES[1:], STAGES[2:]):
            diffs[b] = pre[b] - pre[a]
        out["prefix"] = {"cumulative_s": pre, "stage_s": diffs,
                         "stage_share": {s: v / pre["batch"] for s, v in diffs.items()},
                         "all_rounds": [r["prefix"] for r in rounds]}
    if all("loader" in r for r in rounds):
        ld = [r["loader"] for r in rounds]
        out["loader"] = {
            "wall_s": {"median": med(r["wall_s"] for r in ld), "best": best(r["wall_s"] for r in ld)},
            "first_batch_s": med(r["first_batch_s"] for r in ld),
            "cpu_ms_per_sample": 1000 * med(r["cpu_s"] for r in ld) / samples,
            "all_wall_s": [r["wall_s"] for r in ld],
            "rates": {k: med(r["rates"][k] for r in ld) for k in ld[0]["rates"]},
            "best_rates": {k: (max if k != "seconds" else min)(r["rates"][k] for r in ld) for k in ld[0]["rates"]},
            "counts": ld[0]["counts"],
        }
    return out


def print_summary(res: dict[str, Any]) -> None:
    c = res["in_process"]["counts"]
    print(f"{res['samples']} samples in {res['shards']} shards ({res['bytes'] / 1e6:.0f} MB), tiles as "
          f"{res['output']}, {res['rounds']} rounds (medians); {machine_line(res['machine'])}")
    print(f"per batch: {c['rows'] / c['batches']:.2f} rows, {c['samples'] / c['batches']:.1f} samples, "
          f"{c['tokens'] / c['batches']:.0f} tokens ({c['image_tokens'] / c['tokens']:.1%} image tokens, "
          f"{c['marker_tokens'] / c['tokens']:.1%} tile markers), {c['tiles'] / c['batches']:.0f} tiles; "
          f"pack fill {c['fill']:.1%}")
    rows = [("in-process (0 workers)", res["in_process"])]
    if "loader" in res:
        rows.append((f"vs.Loader({res['workers']} workers)", res["loader"]))
    print(f"{'median (best)':<24} {'samples/s':>14} {'tokens/s':>16} {'image tok/s':>16} {'batches/s':>12} "
          f"{'CPU ms/sample':>14}")
    for name, x in rows:
        r, b = x["rates"], x["best_rates"]
        print(f"{name:<24} {r['samples_per_s']:>6.1f} ({b['samples_per_s']:>5.1f}) {r['tokens_per_s']:>7,.0f} "
              f"({b['tokens_per_s']:>6,.0f}) {r['image_tokens_per_s']:>7,.0f} ({b['image_tokens_per_s']:>6,.0f}) "
              f"{r['batches_per_s']:>5.3f} ({b['batches_per_s']:.3f}) {x['cpu_ms_per_sample']:>14.1f}")
    ip = res["in_process"]
    print(f"{'stage':<12} {'wall s':>8} {'share':>7} {'ms/sample':>10}" + (f" {'prefix s':>9} {'share':>7}"
                                                                           if "prefix" in res else ""))
    for s in STAGES:
        line = f"{s:<12} {ip['stage_s'][s]:>8.2f} {ip['stage_share'][s]:>7.1%} {ip['stage_ms_per_sample'][s]:>10.3f}"
        if "prefix" in res and s in res["prefix"]["stage_s"]:
            line += f" {res['prefix']['stage_s'][s]:>9.2f} {res['prefix']['stage_share'][s]:>7.1%}"
        print(line)
    if "decode_breakdown_ms" in res:
        print("decode, CPU ms per sample: " + ", ".join(f"{k} {v:.1f}" for k, v in res["decode_breakdown_ms"].items()))
    f = res["pack_fill_by_buffer"]
    print(f"pack buffer -> fill (tiles held, MB; {f['tile_mb_per_sample']:.1f} MB a sample): " + ", ".join(
        f"{b}: {r['fill']:.1%} ({r['buffer_mb']:,.0f})" for b, r in f["by_buffer"].items()))
    print(f"peak RSS (this process and its workers): {res['peak_rss_mib']:,.0f} MiB")


def run_round(index: str, tok: ChatTokenizer, args: argparse.Namespace, r: int, samples: int) -> dict[str, Any]:
    """One round: the stages in one process, the decode breakdown, the prefixes, the loader (as asked)."""
    one: dict[str, Any] = {"stages": run_stages(index, tok, args.output)}
    if args.breakdown:
        one["breakdown"] = decode_breakdown(index, tok, args.output, args.breakdown)
    if args.prefix:
        one["prefix"] = run_prefixes(index, tok, args.output)
    if not args.no_loader:
        one["loader"] = run_loader(index, tok, args.output, args.workers)
    got = one["stages"]["counts"]["samples"]
    if got != samples:
        raise SystemExit(f"round {r}: {got} samples in batches, expected {samples}")
    print(f"round {r + 1}/{args.rounds}: in-process {one['stages']['wall_s']:.1f} s"
          + (f", loader {one['loader']['wall_s']:.1f} s" if "loader" in one else ""), file=sys.stderr)
    return one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    corpus_arguments(ap, shards=4, per_shard=250)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--output", choices=("float", "uint8"), default="float", help="ImageTiles output")
    ap.add_argument("--prefix", action="store_true", help="also time the chain's prefixes (4 more passes a round)")
    ap.add_argument("--no-prefix", dest="prefix", action="store_false", help="do not (the default)")
    ap.add_argument("--no-loader", action="store_true", help="skip the DataLoader run")
    ap.add_argument("--breakdown", type=int, default=50, metavar="N",
                    help="time ImageTiles' steps apart on the first N samples each round (0: skip)")
    args = ap.parse_args()

    index = build_vlm_corpus(args.workdir, args.shards, args.per_shard)
    tok = vlm_tokenizer(args.workdir, RUN)
    folder = os.path.dirname(index)
    shard_paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".tar")]
    read_all(shard_paths)  # warm the page cache
    samples = args.shards * args.per_shard

    fill = pack_fill_by_buffer(index, tok, args.output, [16, 32, 64, 128, 256, 512])
    rounds, loads, started_on = [], [os.getloadavg()[0]], machine()
    with PeakRSS() as rss:
        for r in range(args.rounds):
            rounds.append(run_round(index, tok, args, r, samples))
            loads.append(os.getloadavg()[0])

    res = {"samples": samples, "shards": args.shards, "bytes": sum(os.path.getsize(p) for p in shard_paths),
           "rounds": args.rounds, "workers": args.workers, "output": args.output, "machine": started_on,
           **summarize(rounds, samples), "pack_fill_by_buffer": fill, "peak_rss_mib": rss.peak_kb / 1024,
           "load_avg": loads}
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print_summary(res)


if __name__ == "__main__":
    main()
