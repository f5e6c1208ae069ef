"""Shared VLM test data: a BPE trained offline on easy-VQA's text, and easy-VQA samples as the tokenizer sees them."""

from __future__ import annotations

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
