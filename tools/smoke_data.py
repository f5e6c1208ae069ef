"""easy-VQA for the smoke training: records -> shards (tools/pack_shards.py) and a small BPE.

    python tools/smoke_data.py out/smoke/data            # prepare only: train/, test/, tokenizer.json, info.json

`prepare(root)` writes, under root (the folder nginx then serves):

    train/index.json, train/shard-*.tar   the easy-VQA train split, one sample per image, its questions as turns
    test/index.json,  test/shard-*.tar    the test split, the same way (held out: only evaluated)
    tokenizer.json                        a byte-level BPE trained on the train questions and answers
    info.json                             counts and the majority answer of the train split (the baseline)

It is idempotent: a second call with the same settings reuses what is there.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile

import easy_vqa

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROLES = ["system", "user", "assistant"]


def easyvqa_split(split: str) -> tuple[list[str], list[str], list[int], list[str]]:
    """(questions, answers, image ids, image paths) of easy-VQA's train or test split."""
    if split == "train":
        return (*easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths())
    if split == "test":
        return (*easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())
    raise ValueError(f"split must be train or test, not {split!r}")


def write_llava_jsonl(path: str, split: str = "train", limit: int | None = None,
                      questions_per_record: int | None = None) -> int:
    """easy-VQA as LLaVA records: an image with its questions as successive turns, in records of at most
    `questions_per_record` questions (None: one record per image); the first `limit` images only.
    Returns the number of records."""
    questions, answers, image_ids, image_paths = easyvqa_split(split)
    turns: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in zip(questions, answers, image_ids):
        turns.setdefault(i, []).append((q, a))
    n = 0
    with open(path, "w") as f:
        for i in sorted(turns)[:limit]:
            step = questions_per_record or len(turns[i])
            for part, first in enumerate(range(0, len(turns[i]), step)):
                conv = []
                for t, (q, a) in enumerate(turns[i][first:first + step]):
                    conv.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + q})
                    conv.append({"from": "gpt", "value": a})
                record = {"id": f"easyvqa-{split}-{i}-{part}", "image": image_paths[i], "conversations": conv}
                f.write(json.dumps(record) + "\n")
                n += 1
    return n


def prepare(root: str, *, maxcount: int = 250, vocab_size: int = 600, questions_per_record: int | None = 4,
            train_images: int | None = None, test_images: int | None = None, workers: int = 2,
            quiet: bool = False) -> dict:
    """Pack both splits and train the tokenizer under `root`; returns info.json's content."""
    from vlmstream.stages.tokenize import train_bpe

    settings = {"maxcount": maxcount, "vocab_size": vocab_size, "questions_per_record": questions_per_record,
                "train_images": train_images,
                "test_images": test_images, "version": 2}
    info_path = os.path.join(root, "info.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if info.get("settings") == settings:
            return info
    os.makedirs(root, exist_ok=True)
    info = {"settings": settings}
    for split, limit in (("train", train_images), ("test", test_images)):
        out = os.path.join(root, split)
        shutil.rmtree(out, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            records = os.path.join(tmp, f"easyvqa_{split}.jsonl")
            n = write_llava_jsonl(records, split, limit, questions_per_record if split == "train" else None)
            images = os.path.commonpath(list(easyvqa_split(split)[3].values()))  # the records name these files
            cmd = [sys.executable, os.path.join(TOOLS, "pack_shards.py"), records, "--output", out,
                   "--image-root", images, "--maxcount", str(maxcount), "--workers", str(workers),
                   "--shuffle", "--seed", "0"]
            if not quiet:
                print("  $ " + " ".join(["python", *cmd[1:]]), flush=True)
            done = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None)
            if done.returncode:
                raise RuntimeError(f"pack_shards failed ({done.returncode}): {(done.stdout or b'').decode(errors='replace')}")
        questions, answers, image_ids, _ = easyvqa_split(split)
        kept = set(sorted(set(image_ids))[:limit])
        info[split] = {"images": len(kept), "records": n, "questions": sum(i in kept for i in image_ids)}
        if split == "train":
            counts = collections.Counter(a for a, i in zip(answers, image_ids) if i in kept)
            info["majority_answer"] = counts.most_common(1)[0][0]
            # The chat template's role names too, so that each is one token (as in any chat model's tokenizer).
            texts = [q for q, i in zip(questions, image_ids) if i in kept] + easy_vqa.get_answers() + ROLES
    train_bpe(texts, vocab_size=vocab_size, path=os.path.join(root, "tokenizer.json"))
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default="out/smoke/data")
    ap.add_argument("--maxcount", type=int, default=250)
    ap.add_argument("--vocab-size", type=int, default=600)
    ap.add_argument("--train-images", type=int, default=None)
    ap.add_argument("--test-images", type=int, default=None)
    args = ap.parse_args(argv)
    info = prepare(args.root, maxcount=args.maxcount, vocab_size=args.vocab_size, train_images=args.train_images,
                   test_images=args.test_images)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
