"""What the benchmark tools share, one of each: the corpora, the VLM job's tokenizer, CPU times, the corpus options.

The photo corpus (the 224 job, the tar reader, resume, the batch stage): 640x480 JPEGs of about 55 KB, random
crops and flips of scikit-image's photos at the JPEG quality bisected towards 60 KB, each with a ~250-byte JSON
conversation; shards of plain tar written once under ``--workdir`` and reused by every tool (and by both
commits of tools/bench/ab.py, so the generator must not change: the same seeds give the same bytes).

The VLM corpus: the same photos with multi-turn conversations in vlmstream's format (docs/FORMAT.md) drawn from
easy-VQA's questions, written with `ShardWriter` plus an ``index.json`` manifest; its tokenizer is a byte-level
BPE trained once on easy-VQA's questions and answers, loaded through the library's `ChatTokenizer.load`.

The measuring primitives a user's `vlmstream bench` needs as well (PeakRSS, decode_limit, machine, draw) are
the library's (vlmstream/cli/bench.py); stage timings come from the pipeline's own telemetry (`Pipeline.stats()`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import sys
import tarfile
import warnings
from multiprocessing import Pool
from typing import Any, NamedTuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # the checkout's vlmstream, also when a test imports this module
    sys.path.insert(0, ROOT)

from vlmstream.dataset.format import Conversation, ShardInfo, sample_key, sample_members, write_manifest  # noqa: E402
from vlmstream.dataset.writer import ShardWriter, sample_bytes  # noqa: E402
from vlmstream.io.tar import read_tar_samples  # noqa: E402

TARGET_JPEG_BYTES = 60_000
SIZE = (640, 480)
IMAGE_KEY = "0.jpg"
WORDS = "the a cat sits on red blue mat near window light sky rocket coffee cup face person stars galaxy".split()
SYSTEM = "You are a helpful assistant. Answer each question about the picture in one or two words."


def corpus_arguments(ap: argparse.ArgumentParser, shards: int = 8, per_shard: int = 1000, rounds: int = 3) -> None:
    """The options every tool takes: where the corpus is, its size, the rounds, JSON output."""
    ap.add_argument("--workdir", default="/tmp/vlmstream-bench", help="where the corpus is built (once) and kept")
    ap.add_argument("--shards", type=int, default=shards)
    ap.add_argument("--per-shard", type=int, default=per_shard)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")


# ------------------------------------------------------------------------------------------------ photos


def photos() -> list[np.ndarray]:
    """scikit-image's bundled photos as RGB arrays (any it would have to download is skipped)."""
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


def jpeg(rng: np.random.Generator, pictures: list[np.ndarray]) -> bytes:
    """A random crop of a random photo, resized to 640x480, at the JPEG quality that lands near 60 KB."""
    from PIL import Image

    src = pictures[rng.integers(len(pictures))]
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


def _caption(rng: np.random.Generator) -> bytes:
    answer = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 40))))
    doc = {"messages": [{"role": "user", "content": "<image>\nDescribe this picture."},
                        {"role": "assistant", "content": answer}], "images": [IMAGE_KEY]}
    return json.dumps(doc).encode()


def _write_shard(job: tuple[str, int, int]) -> None:
    path, shard, per_shard = job
    rng = np.random.default_rng(shard)
    pictures = photos()
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w") as tf:
        for i in range(per_shard):
            key = f"{shard:04d}{i:06d}"
            for ext, data in ((IMAGE_KEY, jpeg(rng, pictures)), ("json", _caption(rng))):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 1700000000, 0o644
                tf.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def build_corpus(workdir: str, shards: int, per_shard: int) -> list[str]:
    """The photo corpus's shard paths, building the missing shards (two processes) the first time."""
    folder = os.path.join(workdir, f"corpus-{shards}x{per_shard}")
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"shard-{i:06d}.tar") for i in range(shards)]
    todo = [(p, i, per_shard) for i, p in enumerate(paths) if not os.path.exists(p)]
    if todo:
        print(f"building {len(todo)} shards under {folder} (once) ...", file=sys.stderr)
        with Pool(min(2, len(todo))) as pool:
            pool.map(_write_shard, todo)
    return paths


def read_all(paths: list[str]) -> None:
    """Every byte of the files in 1 MiB reads and nothing else: warms the page cache (tar.py times it as the
    I/O limit)."""
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass


def write_manifests(paths: list[str], repeat: int) -> tuple[str, str]:
    """index.json over the shards, and index-x{repeat}.json listing them `repeat` times (10N shards, same files)."""
    folder = os.path.dirname(paths[0])
    one, many = "index.json", f"index-x{repeat}.json"
    newest = max(os.path.getmtime(p) for p in paths)
    if all(os.path.exists(os.path.join(folder, m)) and os.path.getmtime(os.path.join(folder, m)) > newest
           for m in (one, many)):
        return one, many
    infos = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            n = sum(1 for _ in read_tar_samples(f, p))
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        infos.append(ShardInfo(os.path.basename(p), n, os.path.getsize(p), h.hexdigest()))
    write_manifest(os.path.join(folder, one), infos)
    write_manifest(os.path.join(folder, many), infos * repeat)
    return one, many


def write_parquet(paths: list[str], folder: str | None = None) -> list[str]:
    """The corpus as Parquet, one file per shard (the same samples: key, JPEG bytes, JSON text), written once
    (into `folder`, by default the shards' folder's name + "-parquet"): what Hugging Face datasets streams in the
    224 job."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = folder or os.path.dirname(paths[0]) + "-parquet"
    os.makedirs(folder, exist_ok=True)
    out = []
    for p in paths:
        dst = os.path.join(folder, os.path.basename(p)[:-4] + ".parquet")
        if not os.path.exists(dst) or os.path.getmtime(dst) < os.path.getmtime(p):
            rows: dict[str, list[Any]] = {"key": [], "jpg": [], "json": []}
            with open(p, "rb") as f:
                for s in read_tar_samples(f, p):
                    rows["key"].append(s["__key__"])
                    rows["jpg"].append(s[IMAGE_KEY])
                    rows["json"].append(s["json"].decode())
            pq.write_table(pa.table(rows), dst + ".tmp", row_group_size=100)
            os.replace(dst + ".tmp", dst)
        out.append(dst)
    return out


# -------------------------------------------------------------------------------------------- VLM corpus


def _easyvqa_turns() -> list[list[tuple[str, str]]]:
    """easy-VQA's (question, answer) pairs, grouped by the image they were asked about."""
    import easy_vqa

    questions, answers, ids = easy_vqa.get_train_questions()
    by_image: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in zip(questions, answers, ids):
        by_image.setdefault(i, []).append((q, a))
    return [by_image[i] for i in sorted(by_image)]


_WORKER: dict[str, Any] = {}


def _init_worker() -> None:
    _WORKER["photos"] = photos()
    _WORKER["turns"] = _easyvqa_turns()


def _conversation(rng: np.random.Generator, turns: list[list[tuple[str, str]]]) -> Conversation:
    """One <image> in the first user turn, 2-6 question/answer turns; a quarter open with a system turn."""
    qa = turns[rng.integers(len(turns))]
    n = int(min(len(qa), rng.integers(2, 7)))
    picked = [qa[j] for j in sorted(rng.choice(len(qa), size=n, replace=False))]
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.25 else []
    for t, (q, a) in enumerate(picked):
        messages += [{"role": "user", "content": ("<image>\n" if t == 0 else "") + q},
                     {"role": "assistant", "content": a}]
    return Conversation(messages, [IMAGE_KEY])


def _multi_conversation(rng: np.random.Generator, turns: list[list[tuple[str, str]]], multi: float) -> Conversation:
    """FineVision-like: 1 image, or 2-3 for a share ``multi`` of the samples, all before the first question (where
    nanoVLM puts them), then 2-6 question/answer turns; no system turn (nanoVLM's dataset format has none)."""
    k = int(rng.integers(2, 4)) if rng.random() < multi else 1
    qa = turns[rng.integers(len(turns))]
    n = int(min(len(qa), rng.integers(2, 7)))
    picked = [qa[j] for j in sorted(rng.choice(len(qa), size=n, replace=False))]
    messages = []
    for t, (q, a) in enumerate(picked):
        messages += [{"role": "user", "content": ("<image>" * k if t == 0 else "") + q},
                     {"role": "assistant", "content": a}]
    return Conversation(messages, [f"{i}.jpg" for i in range(k)])


def _encode_sample(job: tuple[int, float]) -> bytes:
    """One sample's tar bytes; seeded by its index, so the corpus is the same whatever the process count."""
    index, multi = job
    if not multi:  # the corpus of earlier runs, byte for byte
        rng = np.random.default_rng([4, index])
        conv = _conversation(rng, _WORKER["turns"])
    else:
        rng = np.random.default_rng([5, index])
        conv = _multi_conversation(rng, _WORKER["turns"], multi)
    return sample_bytes(sample_key(index), sample_members(conv, [jpeg(rng, _WORKER["photos"]) for _ in conv.images]))


def vlm_corpus_folder(workdir: str, shards: int, per_shard: int, multi: float = 0.0) -> str:
    return os.path.join(workdir, f"vlm-{shards}x{per_shard}" + (f"-multi{round(100 * multi)}" if multi else ""))


def build_vlm_corpus(workdir: str, shards: int, per_shard: int, multi: float = 0.0) -> str:
    """The VLM corpus's manifest path, building the shards (two processes encode, one writes) the first time.

    ``multi=0``: one photo a sample, a quarter of the conversations opening with a system turn (the corpus of
    earlier runs). ``multi > 0``: a share ``multi`` of the samples holds 2-3 photos, every image before the first
    question and no system turn: samples nanoVLM's dataset format can hold as they are (`write_vlm_parquet`)."""
    folder = vlm_corpus_folder(workdir, shards, per_shard, multi)
    index = os.path.join(folder, "index.json")
    if os.path.exists(index):
        return index
    print(f"building {shards} shards under {folder} (once) ...", file=sys.stderr)
    jobs = [(i, multi) for i in range(shards * per_shard)]
    with Pool(2, initializer=_init_worker) as pool, ShardWriter(folder, maxcount=per_shard) as w:
        for data in pool.imap(_encode_sample, jobs, chunksize=16):
            w.write_encoded(data)
    write_manifest(index, w.shards)
    return index


def vlm_shard_paths(index: str) -> list[str]:
    folder = os.path.dirname(index)
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".tar")]


def write_vlm_parquet(index: str) -> list[str]:
    """The VLM corpus as Parquet in FineVision's columns (``images``: a list of images, ``texts``: a list of
    {user, assistant}; plus ``key``), one file per shard, written once with Hugging Face datasets' own writer:
    what nanoVLM's VQADataset reads through ``load_dataset(..., streaming=True)``. The ``<image>`` placeholders
    leave the text: nanoVLM puts every image's tokens before the first question itself."""
    from datasets import Dataset, Features, Image, List, Value

    features = Features({"key": Value("string"), "images": List(Image()),
                         "texts": List({"user": Value("string"), "assistant": Value("string")})})
    folder = os.path.dirname(index) + "-parquet"
    os.makedirs(folder, exist_ok=True)
    out = []
    for p in vlm_shard_paths(index):
        dst = os.path.join(folder, os.path.basename(p)[:-4] + ".parquet")
        if not os.path.exists(dst) or os.path.getmtime(dst) < os.path.getmtime(p):
            rows: dict[str, list[Any]] = {"key": [], "images": [], "texts": []}
            with open(p, "rb") as f:
                for s in read_tar_samples(f, p):
                    doc = json.loads(s["json"])
                    msgs = doc["messages"]
                    if any(m["role"] == "system" for m in msgs) or any("<image>" in m["content"] for m in msgs[1:]):
                        raise ValueError(f"{s['__key__']}: not in nanoVLM's format (build the corpus with multi > 0)")
                    texts = [{"user": u["content"].replace("<image>", ""), "assistant": a["content"]}
                             for u, a in zip(msgs[::2], msgs[1::2])]
                    rows["key"].append(s["__key__"])
                    rows["images"].append([{"bytes": s[k], "path": None} for k in doc["images"]])
                    rows["texts"].append(texts)
            Dataset.from_dict(rows, features=features).to_parquet(dst + ".tmp")
            os.replace(dst + ".tmp", dst)
        out.append(dst)
    return out


def vlm_tokenizer(workdir: str, image_token_length: int = 64) -> Any:
    """The VLM job's ChatTokenizer: the easy-VQA BPE (1,000 tokens, trained once and kept under workdir)."""
    from vlmstream.stages.tokenize import ChatTokenizer, train_bpe

    path = os.path.join(workdir, "easyvqa-bpe-1000.json")
    if not os.path.exists(path):
        import easy_vqa

        questions, answers, _ = easy_vqa.get_train_questions()
        os.makedirs(workdir, exist_ok=True)
        train_bpe(questions + answers, vocab_size=1000, path=path + ".tmp")
        os.replace(path + ".tmp", path)
    return ChatTokenizer.load(path, image_token_length=image_token_length)


# ------------------------------------------------------------------------------------------------ timing


class CPU(NamedTuple):
    """CPU seconds so far: user and system of this process and its children that have been waited for
    (DataLoader workers count once the loader has joined them), and this process's own (user + system)."""

    user: float
    system: float
    own: float

    @property
    def total(self) -> float:
        return self.user + self.system


def cpu_times() -> CPU:
    """The CPU clock of the benchmarks: subtract two readings around a run."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return CPU(me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime, me.ru_utime + me.ru_stime)
