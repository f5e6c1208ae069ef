"""Benchmark the tar reader against plain reads and webdataset, on shards of real photos, in one process.

    python tools/bench_tar.py [--workdir /tmp/vlmstream-bench] [--shards 8] [--per-shard 1000] [--rounds 3] [--json]

The corpus (~60 KB JPEGs cut from scikit-image's photos, each with a small JSON conversation) is built once and
cached under --workdir. Each round times, in turn: (a) plain 1 MiB reads of the shard files (the I/O limit),
(b) webdataset's ``tarfile_to_samples`` fed ``{"url": path}`` dicts (it opens them with ``open(path, "rb")``),
(c) vlmstream's ``tar_samples`` stage fed streams from ``open(path, "rb")`` too (the headline ratio compares
these two), and (d) "vlmstream+buf", the same with a 1 MiB buffer (``--big-buffer``). The shards are read once
before timing, so every timed run reads from the page cache. The best round of each reader is reported.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import time
import warnings
from multiprocessing import Pool
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlmstream.stages.read import tar_samples# noqa: E402

TARGET_JPEG_BYTES = 60_000
SIZE = (640, 480)
WORDS = "the a cat sits on red blue mat near window light sky rocket coffee cup face person stars galaxy".split()


# ------------------------------------------------------------------------------------------------ corpus


def _photos() -> list[np.ndarray]:
    import skimage.data as data

    warnings.simplefilter("ignore")
    names = ["astronaut", "coffee", "rocket", "chelsea", "immunohistochemistry", "hubble_deep_field", "retina",
             "stereo_motorcycle", "colorwheel", "camera", "grass", "gravel", "brick", "moon", "cell"]
    out = []
    for name in names:
        try:
            img = getattr(data, name)()
        except Exception:  # a photo scikit-image would have to download: skip it
            continue
        img = img[0] if isinstance(img, tuple) else img
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    return out


def _jpeg(rng: np.random.Generator, photos: list[np.ndarray]) -> bytes:
    """A random crop of a random photo, resized to 640x480, at the JPEG quality that lands near 60 KB."""
    from PIL import Image

    src = photos[rng.integers(len(photos))]
    h, w = src.shape[:2]
    ch = int(min(h, w * 3 / 4) * rng.uniform(0.5, 1.0))
    cw = int(ch * 4 / 3)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = Image.fromarray(src[y : y + ch, x : x + cw]).resize(SIZE, Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    lo, hi, best = 10, 98, b""
    for _ in range(5):  # bisect the quality
        q = (lo + hi) // 2
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=q)
        best = buf.getvalue()
        if abs(len(best) - TARGET_JPEG_BYTES) < TARGET_JPEG_BYTES * 0.05:
            break
        lo, hi = (q, hi) if len(best) < TARGET_JPEG_BYTES else (lo, q)
    return best


def _conversation(rng: np.random.Generator) -> bytes:
    answer = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 40))))
    doc = {"messages": [{"role": "user", "content": "<image>\nDescribe this picture."},
                        {"role": "assistant", "content": answer}], "images": ["0.jpg"]}
    return json.dumps(doc).encode()


def _write_shard(job: tuple[str, int, int]) -> None:
    path, shard, per_shard = job
    rng = np.random.default_rng(shard)
    photos = _photos()
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w") as tf:
        for i in range(per_shard):
            key = f"{shard:04d}{i:06d}"
            for ext, data in (("0.jpg", _jpeg(rng, photos)), ("json", _conversation(rng))):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 1700000000, 0o644
                tf.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def build_corpus(workdir: str, shards: int, per_shard: int) -> list[str]:
    """Shard paths, building the missing shards (two processes) the first time."""
    folder = os.path.join(workdir, f"corpus-{shards}x{per_shard}")
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"shard-{i:06d}.tar") for i in range(shards)]
    todo = [(p, i, per_shard) for i, p in enumerate(paths) if not os.path.exists(p)]
    if todo:
        print(f"building {len(todo)} shards under {folder} (once) ...", file=sys.stderr)
        with Pool(min(2, len(todo))) as pool:
            pool.map(_write_shard, todo)
    return paths


# ----------------------------------------------------------------------------------------------- readers


def read_plain(paths: list[str]) -> int:
    """Read the bytes and nothing else; returns the sample count the corpus holds (set by the caller)."""
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
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
    ap.add_argument("--workdir", default="/tmp/vlmstream-bench")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--big-buffer", type=int, default=1 << 20, help="buffer size of open() for row (d)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = ap.parse_args()

    paths = build_corpus(args.workdir, args.shards, args.per_shard)
    total_bytes = sum(os.path.getsize(p) for p in paths)
    samples = args.shards * args.per_shard
    read_plain(paths)  # warm the page cache

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
        "big_buffer": args.big_buffer, "python": platform.python_version(), "cpus": os.cpu_count(),
        "readers": rows, "vlmstream_over_webdataset": round(ratio, 2),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{samples} samples in {args.shards} shards, {total_bytes / 1e6:.0f} MB, page cache warm, "
          f"best of {args.rounds} rounds, Python {platform.python_version()}, {os.cpu_count()} CPUs")
    print(f"{'reader':<14} {'samples/s':>10} {'MB/s':>8} {'median s':>9}")
    for name, r in rows.items():
        print(f"{name:<14} {r['samples_per_s']:>10,.0f} {r['mb_per_s']:>8,.0f} {r['median_s']:>9.3f}")
    print(f"vlmstream / webdataset: {ratio:.2f}x")


if __name__ == "__main__":
    main()
