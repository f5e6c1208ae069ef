"""vs.presets.nanovlm against nanoVLM's own data path (../shared/nanovlm, run by tests/nanovlm_ref.py in its own
process): the same records packed by `vlmstream pack` and streamed through the preset give nanoVLM's tokens,
labels, attention masks, padding and tile pixels, bit for bit, one sample at a time, in batches and packed."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vlmstream as vs
from conftest import run_pack
from vlmstream.core.stage import Context
from vlmstream.stages.tiles import tiled_size
from vlmstream.stages.tokenize import train_bpe

HERE = os.path.dirname(os.path.abspath(__file__))
NANOVLM = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "nanovlm"))
NANOVLM_ENV = os.path.join(sys.prefix, "nanovlm")  # make test installs transformers 4.x and torchvision there

WORDS = ("what color is the shape circle square triangle red blue green yes no how many does image contain "
         "describe picture left right above below caf\u00e9 na\u00efve \u65e5\u672c 3 42 7.5 , . ? ! ( ) ' -").split()


def needs_nanovlm() -> None:
    if not os.path.isdir(os.path.join(NANOVLM, "data")):
        pytest.skip(f"nanoVLM's source is not at {NANOVLM} (../shared/nanovlm beside the checkout)")
    if not os.path.isdir(os.path.join(NANOVLM_ENV, "deps", "transformers")):
        pytest.skip(f"nanoVLM's dependencies are not installed in {NANOVLM_ENV} (make test installs them)")


def text(rng: random.Random, lo: int = 1, hi: int = 12) -> str:
    s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    return rng.choice(["", " ", "\n"]) + s + rng.choice(["", "?", " ", ".\nok"])


def image_bytes(rng: random.Random, kind: str, size: tuple[int, int]) -> bytes:
    """One image of a kind a real dataset holds; smooth with noise, so that resizing has something to do."""
    w, h = size
    g = np.random.default_rng(rng.randrange(1 << 30))
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
    arr = np.clip(base + g.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    out = io.BytesIO()
    if kind == "jpeg":
        im.save(out, "JPEG", quality=90)
    elif kind == "cmyk":
        im.convert("CMYK").save(out, "JPEG", quality=90)
    elif kind == "grey":
        im.convert("L").save(out, "PNG")
    elif kind == "palette":
        im.quantize(64).save(out, "PNG")
    elif kind == "palette_alpha":
        p = im.quantize(64)
        p.info["transparency"] = 0
        p.save(out, "PNG", transparency=0)
    elif kind == "rgba":
        im.putalpha(Image.fromarray(g.integers(0, 256, (h, w), dtype=np.uint8)))
        im.save(out, "PNG")
    elif kind == "la":
        la = im.convert("L")
        la.putalpha(Image.fromarray(g.integers(0, 256, (h, w), dtype=np.uint8)))
        la.save(out, "PNG")
    else:
        im.save(out, "PNG")
    return out.getvalue()


KINDS = ("jpeg", "png", "grey", "palette", "palette_alpha", "rgba", "la", "cmyk")


def make_records(folder: str, n: int, seed: int, sizes: list[tuple[int, int]], large: tuple[int, int]) -> list[dict]:
    """ShareGPT records (1-3 images before the first question, 1-4 turns, a system prompt on some, one without
    images) for `vlmstream pack`, and the same records as nanoVLM's dataset holds them (images, texts)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    records = []
    for i in range(n):
        n_images = 0 if i == n - 1 else 1 + i % 3
        names = []
        for j in range(n_images):
            kind = KINDS[(i + j) % len(KINDS)]
            size = large if kind == "jpeg" and i % 4 == 0 else rng.choice(sizes)
            name = f"images/{i}-{j}.{'jpg' if kind in ('jpeg', 'cmyk') else 'png'}"
            with open(os.path.join(folder, name), "wb") as f:
                f.write(image_bytes(rng, kind, size))
            names.append(name)
        texts = [{"user": text(rng), "assistant": text(rng, 1, 20)} for _ in range(1 + (i * 7) % 4)]
        system = text(rng, 3, 8) if i % 3 == 1 else None
        records.append({"key": f"{i:09d}", "images": [os.path.join(folder, p) for p in names], "texts": texts,
                        "system": system, "names": names})
    with open(os.path.join(folder, "records.json"), "w") as f:
        rows = []
        for r in records:
            messages = [{"role": "system", "content": r["system"]}] if r["system"] else []
            for k, t in enumerate(r["texts"]):
                messages += [{"role": "user", "content": "<image>" * len(r["names"]) * (k == 0) + t["user"]},
                             {"role": "assistant", "content": t["assistant"]}]
            rows.append({"messages": messages, "images": r["names"]})
        json.dump(rows, f, ensure_ascii=False)
    return records


def hf_tokenizer(folder: str, records: list[dict]) -> str:
    """A small BPE trained on the records, saved as transformers loads it (nanoVLM's AutoTokenizer)."""
    texts = [t[k] for r in records for t in r["texts"] for k in ("user", "assistant")] + [" ".join(WORDS)] * 20
    os.makedirs(folder, exist_ok=True)
    train_bpe(texts, vocab_size=600, path=os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                   "bos_token": "<|im_start|>", "unk_token": "<|endoftext|>", "model_max_length": 1 << 16}, f)
    return folder


def stream(index: str, preset: vs.presets.Preset) -> list[dict]:
    pipe = vs.Pipeline(vs.shards(index, shuffle=False), vs.fetch(), vs.tar_samples(), *preset, rank=0, world_size=1)
    return list(pipe.iterate(Context()))


def nanovlm_reference(tmp: str, records: list[dict], tok: str, tile: int, max_side: int, run: int, seq_len: int,
                      batches: list[list[str]], rows: list[list[str]], packed_batches: list[list[str]]) -> dict:
    spec = {"nanovlm": NANOVLM, "deps": os.path.join(NANOVLM_ENV, "deps"),
            "torchvision": os.path.join(NANOVLM_ENV, "torchvision"), "tokenizer": tok, "tile": tile,
            "max_side": max_side, "image_token_length": run, "seq_len": seq_len, "batches": batches, "rows": rows,
            "packed_batches": packed_batches,
            "records": [{k: r[k] for k in ("key", "images", "texts", "system")} for r in records]}
    with open(os.path.join(tmp, "spec.json"), "w") as f:
        json.dump(spec, f)
    out = os.path.join(tmp, "nanovlm.pt")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "nanovlm_ref.py"), os.path.join(tmp, "spec.json"), out],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def assert_same_batch(ours: dict, theirs: dict, what: str) -> None:
    for k in ("input_ids", "attention_mask", "labels"):
        assert ours[k].dtype == theirs[k].dtype == torch.long, (what, k)
        assert torch.equal(ours[k], theirs[k]), (what, k)
    assert len(ours["images"]) == len(theirs["images"]), what
    for i, (a, b) in enumerate(zip(ours["images"], theirs["images"])):
        assert len(a) == len(b), (what, i)
        for x, y in zip(a, b):
            assert x.dtype == y.dtype == torch.float32 and torch.equal(x, y), (what, i)


CONFIGS = {  # tile, max_side, image tokens a tile, seq_len, rounding; grids 1x1 (tile == max_side) to 4x4
    "4x4": (32, 128, 4, 640, "nanovlm"),
    "2x2": (32, 64, 4, 512, "exact"),
    "1x1": (32, 32, 4, 384, "exact"),
    "defaults": (512, 2048, 64, 4096, "exact"),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_preset_gives_nanovlms_batches_bit_for_bit(config, tmp_path):
    needs_nanovlm()
    tile, max_side, run, seq_len, rounding = CONFIGS[config]
    n = 4 if config == "defaults" else 16
    sizes = [(w, h) for w, h in ((20, 50), (64, 40), (100, 100), (187, 187), (150, 90), (33, 200), (273, 364))
             if rounding == "nanovlm" or tiled_size(w, h, tile, max_side) == tiled_size(w, h, tile, max_side,
                                                                                       rounding="nanovlm")]
    records = make_records(str(tmp_path / "data"), n, seed=len(config), sizes=sizes, large=(900, 700))
    assert run_pack([str(tmp_path / "data" / "records.json")], str(tmp_path / "shards"), "--maxcount", "5") == 0
    tok = hf_tokenizer(str(tmp_path / "tok"), records)
    index = str(tmp_path / "shards" / "index.json")
    kw = dict(tile=tile, max_side=max_side, image_token_length=run, seq_len=seq_len, rounding=rounding)

    plain = stream(index, vs.presets.nanovlm(os.path.join(tok, "tokenizer.json"), batch_size=3, pack=False, **kw))
    packed_preset = vs.presets.nanovlm(os.path.join(tok, "tokenizer.json"), batch_size=2, pack_buffer=6, **kw)
    packed = stream(index, packed_preset)
    ref = nanovlm_reference(str(tmp_path), records, tok, tile, max_side, run, seq_len,
                            batches=[b["__key__"] for b in plain],
                            rows=[row.split("+") for b in packed for row in b["__key__"]],
                            packed_batches=[b["__key__"] for b in packed])

    assert len(packed_preset.tokenizer) == ref["vocab"] and packed_preset.tokenizer.pad_id == ref["pad_token_id"]
    assert sum(len(b["__key__"]) for b in plain) == n  # nothing dropped: every record compared
    assert sorted(k for b in packed for row in b["__key__"] for k in row.split("+")) == [r["key"] for r in records]
    for i, (ours, theirs) in enumerate(zip(plain, ref["batches"], strict=True)):
        assert_same_batch(ours, theirs, f"batch {i}")
        assert ours["input_ids"].shape[1] == seq_len  # padded to nanoVLM's fixed length, on the left
    for i, (ours, theirs) in enumerate(zip(packed, ref["packed_batches"], strict=True)):
        assert_same_batch(ours, theirs, f"packed batch {i}")
        sep = (ours["input_ids"] == packed_preset.tokenizer.pad_id) & (ours["attention_mask"] == 0)
        assert int(sep.sum()) >= sum(len(row.split("+")) for row in ours["__key__"])  # a pad after every sample
    multi = next(r for r in records if len(r["images"]) > 1)
    sample = next(b for b in plain if multi["key"] in b["__key__"])
    row = sample["input_ids"][sample["__key__"].index(multi["key"])]
    assert "<image: 1>" in packed_preset.tokenizer.tok.decode(row.tolist(), skip_special_tokens=False)


def test_default_rounding_differs_from_nanovlms_only_where_its_float_formula_errs(tmp_path):
    """A 273x364 image: 128 * 273 / 364 is 96 exactly, 3 tiles; nanoVLM's float formula gets 96.00000000000001
    and takes 4 tiles, stretching the image. The default keeps the right grid; rounding="nanovlm" follows it."""
    tok = train_bpe(["describe the image", "a square"], vocab_size=300)
    im = image_bytes(random.Random(0), "png", (273, 364))
    sample = {"__key__": "a", "0.png": im,
              "json": json.dumps({"messages": [{"role": "user", "content": "<image>describe the image"},
                                               {"role": "assistant", "content": "a square"}],
                                  "images": ["0.png"]}).encode()}
    grids = {}
    for rounding in ("exact", "nanovlm"):
        preset = vs.presets.nanovlm(tok, batch_size=1, tile=32, max_side=128, image_token_length=4, seq_len=512,
                                    pack=False, rounding=rounding)
        decoded = preset.stages[0].decode_sample(sample)
        grids[rounding] = decoded["0.png"].grid
    assert grids == {"exact": (4, 3), "nanovlm": (4, 4)}


def test_nanovlm_labels_train_the_newline_and_label_several_images():
    tok = train_bpe(["what is it", "a dog"], vocab_size=300)
    nano = vs.presets.nanovlm_tokenizer(tok, image_token_length=2)
    plain = vs.ChatTokenizer(train_bpe(["what is it", "a dog"], vocab_size=300), image_token_length=2)
    messages = [{"role": "user", "content": "<image><image>what is it"}, {"role": "assistant", "content": "a dog"}]
    a, b = nano.encode(messages, [(1, 1), (1, 1)]), plain.encode(messages, [(1, 1), (1, 1)])
    text = nano.tok.decode(a.input_ids, skip_special_tokens=False)
    assert "<image: 0>" in text and "<image: 1>" in text and "<image:" not in plain.tok.decode(b.input_ids)
    trained = [i for i, t in zip(a.input_ids, a.target) if t]
    assert nano.tok.decode(trained[-2:], skip_special_tokens=False).endswith("<|im_end|>\n")
    assert plain.tok.decode([i for i, t in zip(b.input_ids, b.target) if t][-1:],
                            skip_special_tokens=False) == "<|im_end|>"
    one = nano.encode([{"role": "user", "content": "<image>what is it"}, {"role": "assistant", "content": "a dog"}],
                      [(1, 1)])
    assert "<image:" not in nano.tok.decode(one.input_ids, skip_special_tokens=False)  # one image: no label
    assert nano.pad_id == nano.tok.token_to_id("<|im_end|>")


def test_rgba_drops_alpha_under_the_preset_and_lies_on_white_by_default():
    im = Image.new("RGBA", (8, 8), (10, 20, 30, 0))  # fully transparent dark pixels
    buf = io.BytesIO()
    im.save(buf, "PNG")
    white = vs.decode("uint8").decode_sample({"__key__": "a", "0.png": buf.getvalue()})["0.png"]
    kept = vs.decode("uint8", rgb="pillow").decode_sample({"__key__": "a", "0.png": buf.getvalue()})["0.png"]
    assert white[:, 0, 0].tolist() == [255, 255, 255] and kept[:, 0, 0].tolist() == [10, 20, 30]
    with pytest.raises(ValueError, match="rgb"):
        vs.decode("uint8", rgb="black")
