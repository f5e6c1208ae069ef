"""`make demo`: pack easy-VQA into shards with tools/pack_shards.py, then stream them back and report samples/s.

Run from the repository root: `python tools/demo.py [--workdir out/demo]`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time

import easy_vqa
from PIL import Image

import vlmstream as vs
from vlmstream.format import read_manifest
from vlmstream.tar import read_tar_samples


def write_llava_jsonl(path: str) -> int:
    """easy-VQA as LLaVA records: one record per image, its questions as successive turns."""
    questions, answers, image_ids = easy_vqa.get_train_questions()
    image_paths = easy_vqa.get_train_image_paths()
    turns: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in zip(questions, answers, image_ids):
        turns.setdefault(i, []).append((q, a))
    with open(path, "w") as f:
        for i in sorted(turns):
            conv = []
            for t, (q, a) in enumerate(turns[i]):
                conv.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + q})
                conv.append({"from": "gpt", "value": a})
            f.write(json.dumps({"id": f"easyvqa-{i}", "image": image_paths[i], "conversations": conv}) + "\n")
    return len(turns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="out/demo")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    records = os.path.join(args.workdir, "easyvqa_llava.jsonl")
    shards = os.path.join(args.workdir, "shards")

    n = write_llava_jsonl(records)
    print(f"[1/2] wrote {n} easy-VQA records as LLaVA JSONL: {records}")
    cmd = [sys.executable, "tools/pack_shards.py", records, "--output", shards, "--maxcount", "500"]
    print("      $ " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True)

    doc, infos = read_manifest(os.path.join(shards, "index.json"))
    print(f"[2/2] streaming {doc['samples']} samples from {len(infos)} shards back, decoding images and turns")
    t0 = time.perf_counter()
    count = turns = pixels = 0
    for info in infos:
        url = os.path.join(shards, info.url)
        with open(url, "rb") as stream:
            for sample in read_tar_samples(stream, url):
                conv = vs.conversation_from_sample(sample)
                for ext in conv.images:
                    with Image.open(io.BytesIO(sample[ext])) as im:
                        pixels += im.convert("RGB").size[0]
                turns += len(conv.messages)
                count += 1
    dt = time.perf_counter() - t0
    assert count == doc["samples"], f"streamed {count} samples, manifest says {doc['samples']}"
    print(f"      {count} samples, {turns} turns in {dt:.2f}s: {count / dt:,.0f} samples/s (one process)")
    first = next(read_tar_samples(open(os.path.join(shards, infos[0].url), "rb"), infos[0].url))
    conv = vs.conversation_from_sample(first)
    print(f"      first sample {first['__key__']}: {conv.messages[:2]}")


if __name__ == "__main__":
    main()
