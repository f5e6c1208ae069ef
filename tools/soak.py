"""Soak: a few hundred thousand samples through the full VLM chain with faults switched on, memory and open
file descriptors sampled over time.

    python tools/soak.py [--workdir /tmp/vlmstream-soak] [--shards 75] [--per-shard 1000] [--epochs 4]
                         [--workers 2] [--fault-rate 0.3] [--interval 5] [--json soak.json]
                         [--cache DIR [--cache-bytes N]]

The corpus (built once under --workdir): --shards shards of --per-shard conversation samples, each a 32x32 JPEG
(a pool of 64 drawn shapes) and a one- or two-turn chat; every 5000th sample's JPEG is cut short (bad data), and
a BPE tokenizer trained on the texts. A fault-injecting HTTP server (tests/servers.py's, in its own process so
its memory is not counted) serves the folder on loopback; each shard request is faulted with probability
--fault-rate: a connection reset at a random offset, a 500/502/503, a 429 with Retry-After, a body shorter than
its Content-Length, a stall past the read timeout, or (on a Range request) the whole body again.

The chain, through vs.Loader(num_workers=--workers), one pass per epoch:

    shards(URL/index.json) -> split_by_node -> split_by_worker -> fetch(prefetch=2, retries[, cache]) ->
    tar_samples(on_error="skip") -> shuffle(1000) -> decode(ImageTiles(32, 64), on_error="skip") ->
    tokenize(max_len=256, on_error="skip") -> pack(256, max_images=8) -> batch(8)

With --cache, fetch keeps shards in that folder under a bound (default: a third of the corpus), so shards are
evicted and fetched again while others are read from disk. Several soaks run at once with the same --cache
share the folder, its bound and its evictions (each has its own server port, so their shard URLs, and so
their entries, differ: each evicts the other's).

Every epoch is checked: each good sample delivered exactly once, each bad one counted as skipped. A thread samples
every --interval seconds the resident memory (VmRSS) and open descriptors of this process and of its DataLoader
workers (the server process left out), the shared-memory descriptors of batches in flight counted apart from
the rest (sockets, pipes, files). The summary gives the ranges and the mean over each third of the run.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import random
import re
import sys
import threading
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # servers.py: the fault-injecting server
sys.path.insert(0, os.path.dirname(HERE))  # the vlmstream of this checkout

from servers import Fault, FaultPlan, fault_server  # noqa: E402

KINDS = ("reset", "5xx", "429", "short", "stall", "ignore_range")
BAD_EVERY = 5000
QUESTIONS = ["what shape is this?", "what color is the shape?", "is there a circle?", "how many shapes?",
             "is the shape on the left?", "describe the image."]
ANSWERS = ["a circle", "red", "yes", "no", "one", "a blue square", "a green triangle on the right"]


# ------------------------------------------------------------------------------------------------ corpus


def build(root: str, shards: int, per_shard: int) -> tuple[int, set[str]]:
    """Shards + manifest + tokenizer in root (reused when present). -> (samples, bad keys)."""
    total = shards * per_shard
    bad = {f"{i:09d}" for i in range(BAD_EVERY - 1, total, BAD_EVERY)}
    if os.path.exists(os.path.join(root, "tokenizer.json")):
        return total, bad
    from PIL import Image, ImageDraw

    from vlmstream.dataset.format import write_manifest
    from vlmstream.stages.tokenize import train_bpe
    from vlmstream.dataset.writer import ShardWriter
    os.makedirs(root, exist_ok=True)
    rng = random.Random(0)
    pool = []
    for k in range(64):
        im = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(im)
        x, y = rng.randrange(4, 20), rng.randrange(4, 20)
        d.ellipse((x, y, x + 10, y + 10), fill=tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        pool.append(buf.getvalue())
    w = ShardWriter(root, maxcount=per_shard)
    for i in range(total):
        key = f"{i:09d}"
        msgs = [{"role": "user", "content": "<image>\n" + QUESTIONS[i % 6]}, {"role": "assistant", "content": ANSWERS[i % 7]}]
        if i % 3 == 0:
            msgs += [{"role": "user", "content": QUESTIONS[(i + 1) % 6]}, {"role": "assistant", "content": ANSWERS[(i + 2) % 7]}]
        image = pool[i % 64]
        if key in bad:
            image = image[: len(image) // 3]  # a truncated JPEG: decode skips it and counts it
        w.write(key, [("json", json.dumps({"messages": msgs, "images": ["0.jpg"]}).encode()), ("0.jpg", image)])
    write_manifest(os.path.join(root, "index.json"), w.close())
    train_bpe(QUESTIONS + ANSWERS, vocab_size=400, path=os.path.join(root, "tokenizer.json"))
    return total, bad


# ------------------------------------------------------------------------------------------------ server


class RandomFaults(FaultPlan):
    """Each shard request faulted with probability `rate`; counts by kind in a shared array."""

    def __init__(self, root: str, rate: float, counts, seed: int = 0):
        super().__init__()
        self.root, self.rate, self.shared, self.rng = root, rate, counts, random.Random(seed)

    def next(self, path: str, range_header: str | None = None) -> Fault | None:
        with self.lock:
            self.counts[path] += 1
            self.log.clear()  # the soak makes thousands of requests: keep no log
            if not path.endswith(".tar") or self.rng.random() >= self.rate:
                return None
            size = os.path.getsize(os.path.join(self.root, path.lstrip("/")))
            m = re.match(r"bytes=(\d+)-", range_header or "")
            size -= int(m.group(1)) if m else 0  # the body this answer sends: faults land inside it
            kind = self.rng.choices(KINDS, weights=(35, 25, 10, 15, 5, 10))[0]
            if kind == "ignore_range" and not range_header:
                kind = "reset"
            fault = {
                "reset": lambda: Fault(cut_at=self.rng.randrange(1, size)),
                "5xx": lambda: Fault(status=self.rng.choice((500, 502, 503))),
                "429": lambda: Fault(status=429, retry_after="0"),
                "short": lambda: Fault(short_by=self.rng.randrange(1, size)),
                "stall": lambda: Fault(stall=1.5),
                "ignore_range": lambda: Fault(ignore_range=True),
            }[kind]()
        with self.shared.get_lock():
            self.shared[KINDS.index(kind)] += 1
        return fault


def serve(root: str, rate: float, counts, port_q) -> None:
    with fault_server(root, RandomFaults(root, rate, counts)) as (url, _):
        port_q.put(url)
        while True:
            time.sleep(3600)


# ----------------------------------------------------------------------------------------------- sampling


def _proc(pid: int) -> tuple[float, int, int] | None:
    """(RSS in MB, open descriptors, of which shared memory) of a process, None if it is gone.

    Shared-memory descriptors (torch's /dev/shm files, unlinked once mapped) carry the tensors of batches in
    flight between a worker and the main process: their number follows the queue depth. The others (sockets,
    pipes, shard files) are where a leak would show."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
        fds = shm = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            fds += 1
            shm += target.startswith(("/dev/shm/", "/memfd:")) or "torch_" in target
        return rss, fds, shm
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return None


def _children(pid: int, skip: set[int]) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in skip:
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return out


class Sampler(threading.Thread):
    def __init__(self, interval: float, skip: set[int]):
        super().__init__(daemon=True)
        self.interval, self.skip = interval, skip
        self.samples: list[dict] = []
        self.delivered = 0
        self.epoch = 0
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def take(self) -> None:
        me = _proc(os.getpid())
        workers = [p for p in (_proc(c) for c in _children(os.getpid(), self.skip)) if p]
        self.samples.append({
            "t": round(time.perf_counter() - self.t0, 2), "epoch": self.epoch, "samples": self.delivered,
            "main_rss_mb": round(me[0], 1), "main_fds": me[1] - me[2], "main_shm_fds": me[2],
            "workers": len(workers), "workers_rss_mb": round(sum(w[0] for w in workers), 1),
            "workers_fds": sum(w[1] - w[2] for w in workers), "workers_shm_fds": sum(w[2] for w in workers),
            "threads": threading.active_count(),
        })

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.take()


# --------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/vlmstream-soak")
    ap.add_argument("--shards", type=int, default=75)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fault-rate", type=float, default=0.3)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--json", default=None, help="write the summary and every sample of the time series here")
    ap.add_argument("--cache", default=None, help="fetch's shard cache folder (may be shared by several soaks)")
    ap.add_argument("--cache-bytes", type=int, default=None, help="its bound (default: a third of the corpus)")
    args = ap.parse_args(argv)

    root = os.path.join(args.workdir, f"corpus-{args.shards}x{args.per_shard}")
    os.makedirs(root, exist_ok=True)
    ctx = mp.get_context("fork")  # before torch is imported: the server process stays small
    counts, port_q = ctx.Array("l", len(KINDS)), ctx.Queue()
    server = ctx.Process(target=serve, args=(root, args.fault_rate, counts, port_q), daemon=True)
    server.start()
    url = port_q.get(timeout=30)
    total, bad = build(root, args.shards, args.per_shard)

    import vlmstream as vs
    from vlmstream.io.http import FetchOptions

    tok = vs.ChatTokenizer.from_file(os.path.join(root, "tokenizer.json"), image_token_length=16)
    opts = FetchOptions(read_timeout=1.0, retries=10, backoff=0.01, max_backoff=0.1)
    cache = {}
    if args.cache:
        corpus_bytes = sum(os.path.getsize(os.path.join(root, n)) for n in os.listdir(root) if n.endswith(".tar"))
        cache = {"cache": args.cache, "cache_bytes": args.cache_bytes or corpus_bytes // 3}
    pipe = vs.Pipeline(
        vs.shards(f"{url}/index.json", seed=0), vs.split_by_node(), vs.split_by_worker(),
        vs.fetch(prefetch=2, options=opts, **cache), vs.tar_samples(on_error="skip"), vs.shuffle(1000, initial=100),
        vs.decode(vs.ImageTiles(32, 64, output="uint8"), on_error="skip"),
        vs.tokenize(tok, max_len=256, on_error="skip"), vs.pack(256, max_images=8, buffer=64), vs.batch(8),
        rank=0, world_size=1)
    loader = vs.Loader(pipe, num_workers=args.workers)
    sampler = Sampler(args.interval, {server.pid})
    sampler.start()
    epochs = []
    faults_before = [0] * len(KINDS)
    for epoch in range(args.epochs):
        sampler.epoch = epoch
        t0 = time.perf_counter()
        keys: Counter = Counter()
        for b in loader:
            got = [k for seq in b["__key__"] for k in seq.split("+")]  # a packed sequence's keys, joined by "+"
            keys.update(got)
            sampler.delivered += len(got)
        secs = time.perf_counter() - t0
        sampler.take()
        report = loader.stats()
        st = {s.name: s.stats or {} for s in report.stages}
        injected = list(counts)
        dup = sum(1 for c in keys.values() if c > 1)
        missing = total - len(keys) - len(bad)
        epochs.append({
            "epoch": epoch, "seconds": round(secs, 1), "samples": sum(keys.values()),
            "samples_per_s": round(sum(keys.values()) / secs), "duplicates": dup, "missing": missing,
            "bad_delivered": len(bad & set(keys)),
            "faults": {k: injected[i] - faults_before[i] for i, k in enumerate(KINDS)},
            "retries": st["fetch"].get("retries"), "resumed": st["fetch"].get("resumed"),
            "requests": st["fetch"].get("requests"), "cache_hits": st["fetch"].get("cache_hits"),
            "stalls": st["fetch"].get("stalls"), "decode_skipped": st["decode"].get("skipped", {}),
            "main_rss_mb": sampler.samples[-1]["main_rss_mb"], "main_fds": sampler.samples[-1]["main_fds"],
        })
        faults_before = injected
        mine = [x for x in sampler.samples if x["epoch"] == epoch and x["workers"]]
        for k in ("main_rss_mb", "main_fds", "main_shm_fds", "workers_rss_mb", "workers_fds", "workers_shm_fds"):
            epochs[-1][f"max_{k}"] = max((x[k] for x in mine), default=None)
        print(json.dumps(epochs[-1]), flush=True)
        assert dup == 0 and missing == 0 and not epochs[-1]["bad_delivered"], epochs[-1]
    sampler.stop.set()
    server.kill()

    series = sampler.samples
    warm = [s for s in series if s["epoch"] >= 1] or series  # from the second epoch: caches and pools warm
    busy = [s for s in series if s["workers"]]
    thirds = [busy[: len(busy) // 3], busy[len(busy) // 3: 2 * len(busy) // 3], busy[2 * len(busy) // 3:]]
    summary = {
        "samples": sum(e["samples"] for e in epochs), "epochs": args.epochs, "workers": args.workers,
        "seconds": round(sum(e["seconds"] for e in epochs), 1),
        "faults": {k: sum(e["faults"][k] for e in epochs) for k in KINDS},
        "retries": sum(e["retries"] or 0 for e in epochs), "resumed": sum(e["resumed"] or 0 for e in epochs),
        "cache_hits": sum(e["cache_hits"] or 0 for e in epochs), "cache": cache or None,
        "decode_skipped": sum(sum(e["decode_skipped"].values()) for e in epochs),
        "main_rss_mb": {"after_epoch_0": epochs[0]["main_rss_mb"], "min": min(s["main_rss_mb"] for s in warm),
                        "max": max(s["main_rss_mb"] for s in warm), "end": series[-1]["main_rss_mb"]},
        "main_fds": {"min": min(s["main_fds"] for s in warm), "max": max(s["main_fds"] for s in warm)},
        "main_shm_fds": {"min": min(s["main_shm_fds"] for s in warm), "max": max(s["main_shm_fds"] for s in warm)},
        "workers_rss_mb": {"min": min(s["workers_rss_mb"] for s in busy), "max": max(s["workers_rss_mb"] for s in busy)},
        "workers_fds": {"min": min(s["workers_fds"] for s in busy), "max": max(s["workers_fds"] for s in busy)},
        "workers_shm_fds": {"min": min(s["workers_shm_fds"] for s in busy),
                            "max": max(s["workers_shm_fds"] for s in busy)},
        "threads": {"min": min(s["threads"] for s in series), "max": max(s["threads"] for s in series)},
        "thirds_mean": {k: [round(sum(s[k] for s in t) / max(1, len(t)), 1) for t in thirds]
                        for k in ("main_rss_mb", "main_fds", "main_shm_fds", "workers_rss_mb", "workers_fds",
                                  "workers_shm_fds")},
        "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()}",
        "args": vars(args),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "epochs": epochs, "series": series}, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
