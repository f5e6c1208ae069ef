"""Shared VLM test data: a BPE trained offline on easy-VQA's text, and easy-VQA samples as the tokenizer sees them."""

from __future__ import annotations

import dataclasses
import functools
import io

import easy_vqa

from vlmstream.stages.tokenize import ChatTokenizer, train_bpe


@functools.lru_cache(maxsize=None)
def easyvqa_bpe_json() -> str:
    """The trained tokenizer as JSON text (each test builds its own ChatTokenizer from it)."""
    questions, answers, _ = easy_vqa.get_train_questions()
    return train_bpe(questions + answers, vocab_size=1000).to_str()


def chat_tokenizer(**kw) -> ChatTokenizer:
    from tokenizers import Tokenizer

    return ChatTokenizer(Tokenizer.from_str(easyvqa_bpe_json()), **kw)


def easyvqa_conversations(n_images: int = 20):
    """(messages, png bytes) per image: its questions as successive turns."""
    questions, answers, ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    turns: dict[int, list] = {}
    for q, a, i in zip(questions, answers, ids):
        turns.setdefault(i, []).append((q, a))
    out = []
    for i in sorted(turns)[:n_images]:
        msgs = []
        for t, (q, a) in enumerate(turns[i]):
            msgs += [{"role": "user", "content": ("<image>\n" if t == 0 else "") + q}, {"role": "assistant", "content": a}]
        with open(paths[i], "rb") as f:
            out.append((msgs, f.read()))
    return out


def write_easyvqa_shards(root: str, n_images: int = 40, maxcount: int = 10) -> str:
    """easy-VQA conversations packed as vlmstream shards under `root`; returns the manifest's path."""
    import json
    import os

    from vlmstream.dataset.format import write_manifest
    from vlmstream.dataset.writer import ShardWriter

    w = ShardWriter(root, maxcount=maxcount)
    for i, (msgs, png) in enumerate(easyvqa_conversations(n_images)):
        w.write(f"{i:06d}", [("json", json.dumps({"messages": msgs, "images": ["0.png"]}).encode()), ("0.png", png)])
    path = os.path.join(root, "index.json")
    write_manifest(path, w.close())
    return path


@dataclasses.dataclass
class CaptionSample:
    """One sample of an img2dataset-shaped shard, as written."""

    key: str
    caption: str  # the txt member's text, as written (may be empty or blank)
    jpg: bytes
    meta: dict  # the json member


def img2dataset_samples(n_images: int = 24) -> list[CaptionSample]:
    """easy-VQA images as JPEG, captioned with their answers; every 5th caption empty and every 7th blank, as
    img2dataset writes a missing caption (an empty txt), some with the trailing newline of a text file."""
    import hashlib

    from PIL import Image

    _, answers, ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    words: dict[int, list[str]] = {}
    for a, i in zip(answers, ids):
        words.setdefault(i, []).append(a)
    out = []
    for n, i in enumerate(sorted(words)[:n_images]):
        buf = io.BytesIO()
        with Image.open(paths[i]) as im:
            im.convert("RGB").save(buf, "JPEG", quality=90)
        jpg = buf.getvalue()
        caption = "" if n % 5 == 3 else " \n" if n % 7 == 4 else " ".join(words[i][:3]) + ("\n" if n % 2 else "")
        key = f"{n // 10:05d}{n % 10:04d}"
        meta = {"url": f"https://example.com/img/{i}.jpg", "key": key, "status": "success", "error_message": None,
                "width": 64, "height": 64, "original_width": 64, "original_height": 64, "exif": "{}",
                "sha256": hashlib.sha256(jpg).hexdigest(), "caption": caption}
        out.append(CaptionSample(key, caption, jpg, meta))
    return out


def write_img2dataset_shards(root: str, samples: list[CaptionSample], per_shard: int = 10) -> list[str]:
    """img2dataset's output layout, written with Python's tarfile (no parquet, no stats files): NNNNN.tar holding
    KEY.jpg, KEY.json, KEY.txt per sample, in the sorted member order webdataset's TarWriter gives. Returns the
    shards' paths."""
    import json
    import os
    import tarfile

    paths = []
    for start in range(0, len(samples), per_shard):
        path = os.path.join(root, f"{start // per_shard:05d}.tar")
        with tarfile.open(path, "w") as tf:
            for s in samples[start:start + per_shard]:
                for ext, data in (("jpg", s.jpg), ("json", json.dumps(s.meta).encode()), ("txt", s.caption.encode())):
                    info = tarfile.TarInfo(f"{s.key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
