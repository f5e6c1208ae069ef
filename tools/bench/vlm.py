"""Benchmark the VLM job at steady state (issue 22): photos with multi-turn conversations -> tiles -> tokens -> packed
batches, against its decode limit and nanoVLM's own data path.

    python tools/bench/vlm.py [--workdir /tmp/vlmstream-bench] [--shards 8] [--per-shard 250] [--multi 0.25]
                              [--rounds 1] [--workers 2] [--outputs uint8 float] [--contenders ...] [--json]

The corpus (tools/bench/common.py, built once under --workdir): 640x480 photo JPEGs with easy-VQA conversations of
2-6 question/answer turns; a share --multi of the samples holds 2-3 photos, every image before the first question
(FineVision's shape, which nanoVLM's dataset format holds as it is), no system turns. The same samples are written
as Parquet in FineVision's columns (``images``: a list of images, ``texts``: a list of {user, assistant}) for
nanoVLM. The tokenizer: a byte-level BPE (1,000 tokens) trained on easy-VQA, also saved in Hugging Face's format.

The job, as a user writes it (nanoVLM's sizes: tiles of 512, the long side taken to 2048, so a 640x480 photo
becomes 2048x1536, 4x3 tiles plus a global view: 13 tiles, 13 x 65 = 845 tokens):

    vs.shards(index.json), vs.split_by_node(0, 1), vs.split_by_worker(), vs.fetch(), vs.tar_samples(),
    vs.decode(vs.ImageTiles(512, 2048, output=uint8|float), lazy=True), vs.tokenize(tok, max_len=4096),
    vs.pack(4096, max_images=18, buffer=--pack-buffer), vs.batch(8)

Contenders, each run in a process of its own below this one (so that each has its own peak RSS, per process),
rounds interleaved with their order rotating:

  vlmstream     the job through ``vs.Loader(pipe, num_workers=W)`` for W = --workers (and 1: ``vlmstream_w1``),
                tiles as each of --outputs. Timed from building the loader to its last batch; CPU time of the
                process and its (joined) workers; the per-stage telemetry of the workers (``loader.stats()``).
  preset        ``vs.presets.nanovlm(tokenizer, batch_size=8)``: the batches nanoVLM's code makes, bit for bit
                (float tiles, Pillow's resize, torch's view), through vs.Loader(W).
  nanovlm       nanoVLM's own data path (../shared/nanovlm, tools/bench/nanovlm_run.py): its VQADataset over
                Hugging Face datasets streaming the Parquet files, its image processor and tokenizer set-up with its
                config's defaults, its ConstantLengthDataset packing, its VQACollator, a torch DataLoader with W
                workers. Skipped with a note when ../shared/nanovlm or its environment is absent.
  limit         the decode limit: W forked processes, each with its share of the images of the first
                --limit-samples samples in memory, running the simplest loop of Pillow calls that makes the same
                tiles and global view: Image.open, draft and convert as the job does, one resize to the grid, one
                resize to the global view (from the same source as the job's), np.asarray, the copy into a new
                [n, 3, 512, 512] tensor (float: divided by 255). Timed from the moment all have their images.
  limit_vs      the same loop calling vlmstream's own transform (open_image + ImageTiles: torch's resize
                kernels), as the 224 job's limit does: the pipeline's own overhead beyond its transform.

Once per output, in a process of its own: ImageTiles' steps timed apart on --breakdown images (CPU time), with
torch's kernels and with Pillow's, and the pack fill for buffers of 16 to 512 samples from the corpus's token counts
(grids from the JPEG headers: nothing decoded).

Throughput counts what the batches hold: samples (packed keys), tokens (attention mask), image tokens
(``<|image|>`` ids), tiles; the pack fill is tokens per 4096-token row. Ratios: by wall time (samples/s, best over
best and medians) and by CPU time per sample (medians), which moves much less on a shared machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.dirname(HERE)]  # the checkout's vlmstream; tools/

import torch  # noqa: E402

import vlmstream as vs  # noqa: E402
import vlmstream.core.loader  # noqa: E402,F401  (all modules loaded now: edits to the tree mid-run cannot mix versions)
from bench.common import (build_vlm_corpus, corpus_arguments, cpu_times, read_all, vlm_shard_paths,  # noqa: E402
                          vlm_tokenizer, write_vlm_parquet)
from vlmstream.cli.bench import _proc_kb, descendants, machine, machine_line, timed_in_forks  # noqa: E402
from vlmstream.stages.tokenize import ChatTokenizer  # noqa: E402

SEQ_LEN, MAX_IMAGES, BATCH, TILE, MAX_SIDE, RUN = 4096, 18, 8, 512, 2048, 64
PACK_BUFFER = 256  # samples, as the nanoVLM preset: with decode(lazy=True) it holds compressed images, not tiles
NANOVLM = os.path.normpath(os.path.join(ROOT, "..", "shared", "nanovlm"))
CONTENDERS = ("vlmstream", "vlmstream_w1", "preset", "nanovlm", "limit", "limit_w1", "limit_vs")
RESULT = "@@vlm-bench@@ "  # a child's last line: its figures as JSON


# ------------------------------------------------------------------------------------------------- chain


def reader(index: str) -> list[Any]:
    return [vs.shards(index, seed=0), vs.split_by_node(0, 1), vs.split_by_worker(), vs.fetch(), vs.tar_samples()]


def stages(index: str, tok: ChatTokenizer, output: str, pack_buffer: int = PACK_BUFFER) -> list[Callable[[Iterator[Any]], Iterator[Any]]]:
    """The VLM job's stages; the first five read (shards .. tar_samples)."""
    tiles = vs.ImageTiles(tile=TILE, max_side=MAX_SIDE, output=output)
    return [*reader(index), vs.decode(tiles, lazy=True),  # pixels made as pack emits a sequence
            vs.tokenize(tok, max_len=SEQ_LEN), vs.pack(SEQ_LEN, max_images=MAX_IMAGES, buffer=pack_buffer),
            vs.batch(BATCH)]


def preset_stages(index: str, hf_tok: str, pack_buffer: int) -> tuple[list[Any], ChatTokenizer]:
    nano = vs.presets.nanovlm(os.path.join(hf_tok, "tokenizer.json"), batch_size=BATCH, seq_len=SEQ_LEN, tile=TILE,
                              max_side=MAX_SIDE, image_token_length=RUN, pack_buffer=pack_buffer)
    return [*reader(index), *nano], nano.tokenizer


def hf_tokenizer(workdir: str) -> str:
    """The job's BPE saved as transformers loads it (nanoVLM's AutoTokenizer): tokenizer.json and its config."""
    vlm_tokenizer(workdir, RUN)  # trains it the first time
    folder = os.path.join(workdir, "easyvqa-bpe-1000-hf")
    if not os.path.exists(os.path.join(folder, "tokenizer_config.json")):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(workdir, "easyvqa-bpe-1000.json"), "rb") as f, \
                open(os.path.join(folder, "tokenizer.json"), "wb") as g:
            g.write(f.read())
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                       "bos_token": "<|im_start|>", "unk_token": "<|endoftext|>", "model_max_length": 1 << 16}, f)
    return folder


class Counts:
    """What the emitted batches hold."""

    def __init__(self, tok: ChatTokenizer):
        self.image_id = tok.image_token_id
        self.samples = self.batches = self.rows = self.tokens = self.image_tokens = self.tiles = 0
        self.tile_dtype = ""

    def add(self, b: dict[str, Any]) -> None:
        ids = b["input_ids"]
        self.batches += 1
        self.rows += ids.shape[0]
        self.samples += sum(k.count("+") + 1 for k in b["__key__"])
        self.tokens += int(b["attention_mask"].sum())
        self.image_tokens += int((ids == self.image_id).sum())
        self.tiles += sum(t.shape[0] for row in b["images"] for t in row)
        if not self.tile_dtype:
            self.tile_dtype = next((str(t.dtype) for row in b["images"] for t in row), "")

    def totals(self) -> dict[str, Any]:
        return {"samples": self.samples, "batches": self.batches, "rows": self.rows, "tokens": self.tokens,
                "image_tokens": self.image_tokens, "tiles": self.tiles, "tile_dtype": self.tile_dtype,
                "fill": self.tokens / (self.rows * SEQ_LEN) if self.rows else 0.0}


# ------------------------------------------------------------------------------------- runs (in a child)


def time_loader(make: Callable[[], Any], tok: ChatTokenizer) -> dict[str, Any]:
    """From building the loader to its last batch: wall, CPU of this process and its joined workers, counts."""
    counts = Counts(tok)
    c0, t0 = cpu_times(), time.perf_counter()
    loader = make()
    first = None
    for b in loader:
        if first is None:
            first = time.perf_counter() - t0
        counts.add(b)
        del b  # the batch's segment goes back to its worker
    wall = time.perf_counter() - t0
    c1 = cpu_times()
    out = {"wall_s": wall, "cpu_s": c1.total - c0.total, "main_cpu_s": c1.own - c0.own, "first_batch_s": first,
           "counts": counts.totals()}
    if isinstance(loader, vs.Loader):
        out["report"] = loader.stats().as_dict()
    return out


def run_vlmstream(spec: dict[str, Any]) -> dict[str, Any]:
    index, w = spec["index"], spec["workers"]
    if spec["kind"] == "preset":
        chain, tok = preset_stages(index, hf_tokenizer(spec["workdir"]), spec["pack_buffer"])
    else:
        tok = vlm_tokenizer(spec["workdir"], RUN)
        chain = stages(index, tok, spec["output"], spec["pack_buffer"])
    kw = {"prefetch_factor": spec["prefetch"]} if spec.get("prefetch") and w else {}
    return time_loader(lambda: vs.Loader(vs.Pipeline(*chain, rank=0, world_size=1), num_workers=w, **kw), tok)


def sample_images(index: str, n: int) -> list[bytes]:
    """The image bytes of the first n samples of the corpus, in member order."""
    import itertools

    from vlmstream.dataset.format import is_image_ext

    out = []
    for s in itertools.islice(vs.Pipeline(*reader(index), rank=0, world_size=1), n):
        out += [s[k] for k in sorted(s) if not k.startswith("__") and is_image_ext(k)]
    return out


def pillow_tiles(data: bytes, tiles: vs.ImageTiles) -> torch.Tensor:
    """The decode limit's loop body: the same tiles and global view as ImageTiles, in the simplest Pillow calls."""
    import numpy as np
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG":
        im.draft("RGB", tiles.size_for(*im.size))  # as the job (no effect when the photo is upscaled)
    im = im.convert("RGB")
    w, h = tiles.size_for(*im.size)
    resized = im.resize((w, h), Image.BICUBIC)
    view = (im if im.width * im.height < w * h else resized).resize((TILE, TILE), Image.BICUBIC)  # the job's source
    rows, cols = h // TILE, w // TILE
    out = torch.empty((1 + rows * cols, 3, TILE, TILE), dtype=tiles.dtype)
    grid = torch.from_numpy(np.asarray(resized)).view(rows, TILE, cols, TILE, 3).permute(0, 2, 4, 1, 3)
    out[1:].view(rows, cols, 3, TILE, TILE).copy_(grid)
    out[0].copy_(torch.from_numpy(np.asarray(view)).permute(2, 0, 1))
    if tiles.output == "float":
        out.div_(255.0)
    return out


def _limit_worker(images: list[bytes], kind: str, output: str, ready: Any, go: Any, done: Any) -> None:
    import warnings

    from vlmstream.stages.decode import open_image

    warnings.simplefilter("ignore")  # np.asarray of a PIL image is read-only: torch says so once
    torch.set_num_threads(1)  # as in a DataLoader worker
    tiles = vs.ImageTiles(TILE, MAX_SIDE, output=output)
    if kind == "limit":
        make = lambda data: pillow_tiles(data, tiles)  # noqa: E731
    else:
        make = lambda data: tiles(open_image(data, tiles.draft_size)).pixels  # noqa: E731
    make(images[0])  # warm: the first call loads code
    ready.put(len(images))
    go.wait()
    c0 = time.process_time()
    for data in images:
        make(data)
    done.put(time.process_time() - c0)


def run_limit(spec: dict[str, Any]) -> dict[str, Any]:
    """W forked processes, each timing its share of the images (loaded before the clock starts)."""
    images, w = sample_images(spec["index"], spec["limit_samples"]), spec["workers"]
    wall, cpus = timed_in_forks(_limit_worker, [(images[i::w], spec["kind"], spec["output"]) for i in range(w)])
    return {"wall_s": wall, "cpu_s": sum(cpus), "images": len(images),
            "counts": {"samples": spec["limit_samples"], "tiles": None}}


def run_breakdown(spec: dict[str, Any]) -> dict[str, Any]:
    """ImageTiles' steps one by one on the first images, CPU ms per image: with torch's kernels (the job) and
    with Pillow's (the limit's calls)."""
    from vlmstream.stages.decode import open_image

    torch.set_num_threads(1)
    images = sample_images(spec["index"], spec["samples"])
    out = {}
    for kernel in ("auto", "pillow"):
        tiles = vs.ImageTiles(TILE, MAX_SIDE, output=spec["output"], kernel=kernel)
        steps = dict.fromkeys(("jpeg_decode", "resize_to_grid", "global_view", "assemble"), 0.0)
        P = time.process_time
        for data in images[:2] + images:  # two to warm up, then all timed
            t0 = P()
            im = open_image(data, tiles.draft_size)
            im.load()
            t1 = P()
            resized = tiles.resize(im)
            t2 = P()
            view = tiles.global_view(im, resized)
            t3 = P()
            tiles.assemble(resized, view)
            t4 = P()
            for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                steps[k] += v
        n = len(images) + 2
        out[kernel] = {k: 1000 * v / n for k, v in steps.items()}
    return {"images": len(images), "samples": spec["samples"], "ms_per_image": out}


def pack_fill_by_buffer(spec: dict[str, Any]) -> dict[str, Any]:
    """vs.pack's fill for each ``buffer`` size, on the corpus's real token counts, and the tiles a buffer holds.

    Images are not decoded: each gets the grid ImageTiles gives its size (read from the JPEG header) and an
    empty pixel tensor, so the token counts are exact and the pass takes seconds.
    """
    from PIL import Image

    from vlmstream.stages.tiles import Tiles, num_tiles

    tok = vlm_tokenizer(spec["workdir"], RUN)
    tiles, tk = vs.ImageTiles(tile=TILE, max_side=MAX_SIDE), vs.tokenize(tok, max_len=SEQ_LEN)
    toks, images = [], []
    for s in vs.Pipeline(*reader(spec["index"]), rank=0, world_size=1):
        d, n = dict(s), 0
        for ext in json.loads(s["json"])["images"]:
            grid = tiles.grid_for(*Image.open(io.BytesIO(s[ext])).size)
            d[ext] = Tiles(torch.empty(num_tiles(grid), 0), grid)
            n += num_tiles(grid)
        out = tk.encode_sample(d)
        if out is not None:
            toks.append(out)
            images.append(n)
    tile_mb = {"uint8": 3 * TILE * TILE / 1e6, "float": 4 * 3 * TILE * TILE / 1e6}
    mean_tiles = sum(images) / len(images)
    rows = {}
    for b in spec["buffers"]:
        p = vs.pack(SEQ_LEN, max_images=MAX_IMAGES, buffer=b)
        sequences = sum(1 for _ in p(iter(toks)))
        rows[str(b)] = {"fill": p.stats.fill, "sequences": sequences,
                        "buffer_mb": {k: min(b, len(toks)) * mean_tiles * v for k, v in tile_mb.items()}}
    return {"samples": len(toks), "mean_tokens": sum(len(t["input_ids"]) for t in toks) / len(toks),
            "mean_images": sum(len(t["images"]) for t in toks) / len(toks), "mean_tiles": mean_tiles,
            "tile_mb_per_sample": {k: mean_tiles * v for k, v in tile_mb.items()}, "by_buffer": rows}


def child(spec: dict[str, Any]) -> None:
    kind = spec["kind"]
    if kind in ("vlmstream", "preset"):
        out = run_vlmstream(spec)
    elif kind in ("limit", "limit_vs"):
        out = run_limit(spec)
    elif kind == "breakdown":
        out = run_breakdown(spec)
    elif kind == "fill":
        out = pack_fill_by_buffer(spec)
    else:
        raise SystemExit(f"unknown child kind {kind!r}")
    print(RESULT + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------- runs (parent)


class TreeRSS(threading.Thread):
    """Peak resident memory of a process and of each process below it, sampled every `period` seconds from
    /proc: the high-water mark (VmHWM) of each process, with its role (main, worker: a child of main, other)."""

    def __init__(self, pid: int, period: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.period, self.stop_event = pid, period, threading.Event()
        self.hwm_kb: dict[int, int] = {}
        self.role: dict[int, str] = {pid: "main"}
        self.peak_sum_kb = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            kids = descendants(self.pid)
            direct = set(_children(self.pid))
            total = 0
            for p in [self.pid, *kids]:
                self.role.setdefault(p, "worker" if p in direct else "other")
                rss = _proc_kb(p, "status", "VmRSS")
                total += rss
                self.hwm_kb[p] = max(self.hwm_kb.get(p, 0), _proc_kb(p, "status", "VmHWM"), rss)
            self.peak_sum_kb = max(self.peak_sum_kb, total)
            self.stop_event.wait(self.period)

    def result(self) -> dict[str, Any]:
        mib = lambda kb: round(kb / 1024)  # noqa: E731
        return {"main_mib": mib(self.hwm_kb.get(self.pid, 0)),
                "workers_mib": [mib(v) for p, v in sorted(self.hwm_kb.items()) if self.role.get(p) == "worker"],
                "others_mib": [mib(v) for p, v in sorted(self.hwm_kb.items()) if self.role.get(p) == "other"],
                "peak_sum_mib": mib(self.peak_sum_kb)}


def _children(pid: int) -> list[int]:
    from vlmstream.cli.bench import _children as kids

    return kids(pid)


def run_child(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """A child process's figures (its last line), with the peak RSS of it and each of its processes."""
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    rss = TreeRSS(proc.pid)
    rss.start()
    out, _ = proc.communicate()
    rss.stop_event.set()
    rss.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv[:2])} exited with status {proc.returncode}")
    line = [x for x in out.splitlines() if x.startswith(RESULT)]
    if not line:
        raise RuntimeError(f"{' '.join(argv[:2])} printed no result")
    return {**json.loads(line[-1][len(RESULT):]), "rss": rss.result()}


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    return run_child([os.path.abspath(__file__), "--child", json.dumps(spec)])


# --------------------------------------------------------------------------------------------- nanoVLM


def nanovlm_env() -> dict[str, str] | str:
    """Where nanoVLM's source and its environment are (make test installs them under .venv/nanovlm: transformers
    4.x, torchvision's pure-Python transforms, and a Hugging Face datasets that works with the hub client
    transformers 4 pins); a string saying what is missing otherwise."""
    if not os.path.isdir(os.path.join(NANOVLM, "data")):
        return f"nanoVLM's source is not at {NANOVLM} (../shared/nanovlm beside the checkout)"
    found: dict[str, str] = {"nanovlm": NANOVLM}
    for part, probe in (("deps", "transformers"), ("torchvision", "torchvision"), ("datasets", "datasets")):
        for env in (os.path.join(sys.prefix, "nanovlm"), os.path.join(ROOT, ".venv", "nanovlm")):
            if os.path.isdir(os.path.join(env, part, probe)):
                found[part] = os.path.join(env, part)
                break
        else:
            return (f"nanoVLM's environment lacks {part} (make test installs it under .venv/nanovlm/{part})")
    return found


def run_nanovlm(spec: dict[str, Any]) -> dict[str, Any]:
    return run_child([os.path.join(HERE, "nanovlm_run.py"), json.dumps(spec)])


# ------------------------------------------------------------------------------------------------- rounds


def contender_specs(args: argparse.Namespace, index: str, parquet: list[str] | None, env: Any) -> dict[str, dict[str, Any]]:
    base = {"index": index, "workdir": args.workdir, "pack_buffer": args.pack_buffer, "prefetch": args.prefetch}
    specs: dict[str, dict[str, Any]] = {}
    for out in args.outputs:
        for w, name in ((args.workers, "vlmstream"), (1, "vlmstream_w1")):
            if name in args.contenders:
                specs[f"vlmstream_{out}_w{w}"] = {**base, "kind": "vlmstream", "output": out, "workers": w}
        for kind, w in (("limit", args.workers), ("limit_w1", 1), ("limit_vs", args.workers)):
            if kind in args.contenders:
                specs[f"{kind.split('_w')[0]}_{out}_w{w}"] = {**base, "kind": kind.split("_w")[0], "output": out,
                                                              "workers": w, "limit_samples": args.limit_samples}
    if "preset" in args.contenders:
        specs[f"preset_w{args.workers}"] = {**base, "kind": "preset", "output": "float", "workers": args.workers}
    if "nanovlm" in args.contenders and parquet and isinstance(env, dict):
        specs[f"nanovlm_w{args.workers}"] = {"kind": "nanovlm", "env": env, "files": parquet,
                                             "tokenizer": hf_tokenizer(args.workdir), "workers": args.workers,
                                             "batch_size": BATCH, "seq_len": SEQ_LEN, "tile": TILE,
                                             "max_side": MAX_SIDE, "image_token_length": RUN,
                                             "num_of_sequences": args.nanovlm_sequences,
                                             "queue_size": args.nanovlm_queue}
    return specs


def run_rounds(args: argparse.Namespace, specs: dict[str, dict[str, Any]], expect: int) -> dict[str, list[dict[str, Any]]]:
    names = list(specs)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            spec = specs[name]
            load = os.getloadavg()[0]
            out = run_nanovlm(spec) if spec["kind"] == "nanovlm" else spawn(spec)
            out["load_before"] = load
            got = out["counts"]["samples"]
            if spec["kind"] in ("vlmstream", "preset") and got != expect:
                raise SystemExit(f"{name}: {got} samples in batches, expected {expect}")
            runs[name].append(out)
            print(f"round {r + 1}/{args.rounds} {name:<20} {got / out['wall_s']:7.1f} samples/s in {out['wall_s']:6.1f} s, "
                  f"{1e3 * out['cpu_s'] / got:6.1f} CPU ms/sample"
                  + (f", first batch {out['first_batch_s']:.2f} s" if out.get("first_batch_s") else "")
                  + f"; peak RSS MiB main {out['rss']['main_mib']:,}, workers {out['rss']['workers_mib']}",
                  file=sys.stderr, flush=True)
    return runs


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    med = statistics.median
    rows: dict[str, Any] = {}
    for name, rs in runs.items():
        if not rs:
            continue
        n = [x["counts"]["samples"] for x in rs]
        rate = [k / x["wall_s"] for k, x in zip(n, rs)]
        row: dict[str, Any] = {"runs": len(rs), "samples": n[0], "samples_per_s": med(rate), "best_samples_per_s": max(rate),
                               "all_samples_per_s": rate,
                               "cpu_ms_per_sample": med(1e3 * x["cpu_s"] / k for k, x in zip(n, rs)),
                               "rss": max((x["rss"] for x in rs), key=lambda r: r["peak_sum_mib"])}
        c = rs[0]["counts"]
        if c.get("tokens"):
            row.update(counts=c, tokens_per_s=med(x["counts"]["tokens"] / x["wall_s"] for x in rs),
                       image_tokens_per_s=med(x["counts"]["image_tokens"] / x["wall_s"] for x in rs),
                       batches_per_s=med(x["counts"]["batches"] / x["wall_s"] for x in rs),
                       first_batch_s=med(x["first_batch_s"] for x in rs), fill=c["fill"])
        if "main_cpu_s" in rs[0]:
            row["main_cpu_ms_per_sample"] = med(1e3 * x["main_cpu_s"] / k for k, x in zip(n, rs))
        if "report" in rs[0]:
            row["stages"] = stage_times([x["report"] for x in rs], n[0], [x["cpu_s"] - x.get("main_cpu_s", 0) for x in rs])
        if "images" in rs[0]:
            row["cpu_ms_per_image"] = med(1e3 * x["cpu_s"] / x["images"] for x in rs)
        rows[name] = row
    return rows


def stage_times(reports: list[dict[str, Any]], samples: int, worker_cpu: list[float]) -> dict[str, Any]:
    """The workers' time per stage (own time, summed over workers), ms a sample, medians over rounds; the source
    stages (shards .. fetch) as one; "ship" is the rest of the workers' CPU time (the batch copied into shared
    memory and sent, the DataLoader's worker loop, checkpoint snapshots)."""
    per: dict[str, list[float]] = {}
    for rep, cpu in zip(reports, worker_cpu):
        own: dict[str, float] = {}
        for s in rep["stages"]:
            name = "source" if s["name"] in ("shards", "split_by_node", "split_by_worker", "fetch") else s["name"]
            own[name] = own.get(name, 0.0) + s["own_s"]
        own["ship"] = max(0.0, cpu - sum(own.values()))
        for k, v in own.items():
            per.setdefault(k, []).append(1e3 * v / samples)
    return {k: statistics.median(v) for k, v in per.items()}


def ratios(rows: dict[str, Any], workers: int, outputs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def pair(a: str, b: str, key: str) -> None:
        if a in rows and b in rows:
            x, y = rows[a], rows[b]
            out[key] = {"by_cpu_time": y["cpu_ms_per_sample"] / x["cpu_ms_per_sample"],
                        "by_wall": x["samples_per_s"] / y["samples_per_s"],
                        "best_over_best": x["best_samples_per_s"] / y["best_samples_per_s"]}
            if "tokens_per_s" in x and "tokens_per_s" in y:
                out[key]["tokens_per_s"] = x["tokens_per_s"] / y["tokens_per_s"]

    w = workers
    for o in outputs:
        pair(f"vlmstream_{o}_w{w}", f"limit_{o}_w{w}", f"vlmstream_{o}/limit")
        pair(f"vlmstream_{o}_w{w}", f"limit_vs_{o}_w{w}", f"vlmstream_{o}/limit_vs")
        pair(f"vlmstream_{o}_w{w}", f"vlmstream_{o}_w1", f"vlmstream_{o}: {w} workers/1")
        pair(f"limit_{o}_w{w}", f"limit_{o}_w1", f"limit_{o}: {w} processes/1")
        pair(f"vlmstream_{o}_w{w}", f"nanovlm_w{w}", f"vlmstream_{o}/nanovlm")
    pair(f"preset_w{w}", f"nanovlm_w{w}", "preset/nanovlm")
    return out


def print_summary(res: dict[str, Any]) -> None:
    print(f"{res['samples']} samples ({res['images']} images) in {res['shards']} shards ({res['bytes'] / 1e6:.0f} MB); "
          f"{res['rounds']} rounds (medians); {machine_line(res['machine'])}")
    print(f"{'contender':<20} {'samples/s':>9} {'tokens/s':>9} {'img tok/s':>9} {'CPU ms/s':>9} {'1st batch':>9} "
          f"{'fill':>6}  peak RSS MiB (main; workers)")
    for name, r in res["rows"].items():
        tok = f"{r['tokens_per_s']:>9,.0f} {r['image_tokens_per_s']:>9,.0f}" if "tokens_per_s" in r else f"{'':>9} {'':>9}"
        fb = f"{r['first_batch_s']:>9.2f}" if "first_batch_s" in r else f"{'':>9}"
        fill = f"{r['fill']:>6.1%}" if "fill" in r else f"{'':>6}"
        print(f"{name:<20} {r['samples_per_s']:>9.1f} {tok} {r['cpu_ms_per_sample']:>9.1f} {fb} {fill}  "
              f"{r['rss']['main_mib']:,}; {r['rss']['workers_mib']}")
    for k, x in res["ratios"].items():
        print(f"{k}: {x['by_cpu_time']:.2f}x by CPU time, {x['by_wall']:.2f}x by wall"
              + (f", {x['tokens_per_s']:.2f}x tokens/s" if "tokens_per_s" in x else ""))
    for name, r in res["rows"].items():
        if "stages" in r:
            print(f"{name} workers, ms/sample: " + ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()))
    for out, b in res.get("breakdown", {}).items():
        for kernel, steps in b["ms_per_image"].items():
            print(f"ImageTiles({out}, kernel={kernel}) CPU ms/image: " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))
    f = res.get("pack_fill_by_buffer")
    if f:
        print(f"pack buffer -> fill (float tiles held, MB): " + ", ".join(
            f"{b}: {r['fill']:.1%} ({r['buffer_mb']['float']:,.0f})" for b, r in f["by_buffer"].items()))
    if res.get("nanovlm_note"):
        print(f"nanoVLM: {res['nanovlm_note']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    corpus_arguments(ap, shards=8, per_shard=250, rounds=1)
    ap.add_argument("--multi", type=float, default=0.25, help="share of samples with 2-3 photos")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--outputs", nargs="+", choices=("uint8", "float"), default=["uint8", "float"])
    ap.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    ap.add_argument("--pack-buffer", type=int, default=PACK_BUFFER, help="vs.pack's buffer (samples)")
    ap.add_argument("--prefetch", type=int, help="the DataLoader's prefetch_factor (default: vs.Loader's, 2)")
    ap.add_argument("--limit-samples", type=int, default=500, help="samples whose images the limits decode")
    ap.add_argument("--breakdown", type=int, default=100, metavar="N",
                    help="time ImageTiles' steps apart on the images of the first N samples (0: skip)")
    ap.add_argument("--nanovlm-sequences", type=int, default=BATCH,
                    help="nanoVLM's ConstantLengthDataset num_of_sequences (train.py: 4 x batch size)")
    ap.add_argument("--nanovlm-queue", type=int, default=2, help="its queue_size (train.py: 8)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    index = build_vlm_corpus(args.workdir, args.shards, args.per_shard, args.multi)
    paths = vlm_shard_paths(index)
    env = nanovlm_env()
    parquet = None
    if "nanovlm" in args.contenders and isinstance(env, dict):
        parquet = write_vlm_parquet(index)
    hf_tokenizer(args.workdir)
    read_all(paths + (parquet or []))  # warm the page cache
    expect = args.shards * args.per_shard
    started_on = machine()
    base = {"index": index, "workdir": args.workdir}
    fill = spawn({**base, "kind": "fill", "buffers": [16, 32, 64, 128, 256, 512]})
    specs = contender_specs(args, index, parquet, env)
    runs = run_rounds(args, specs, expect)
    breakdown = {}
    if args.breakdown:
        for out in args.outputs:
            breakdown[out] = spawn({**base, "kind": "breakdown", "output": out, "samples": args.breakdown})
    rows = summarize(runs)
    res = {"samples": expect, "images": round(fill["mean_images"] * fill["samples"]), "shards": args.shards,
           "bytes": sum(os.path.getsize(p) for p in paths), "multi": args.multi, "rounds": args.rounds,
           "workers": args.workers, "outputs": args.outputs, "pack_buffer": args.pack_buffer,
           "limit_samples": args.limit_samples, "machine": started_on, "rows": rows,
           "ratios": ratios(rows, args.workers, args.outputs), "breakdown": breakdown, "pack_fill_by_buffer": fill,
           "nanovlm": {"num_of_sequences": args.nanovlm_sequences, "queue_size": args.nanovlm_queue},
           "load_avg_end": os.getloadavg()[0]}
    if not isinstance(env, dict):
        res["nanovlm_note"] = f"not run: {env}"
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print_summary(res)


if __name__ == "__main__":
    main()
