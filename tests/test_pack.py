"""Packing: the budget maths apart, then the stage on tokenized samples."""

import json

import pytest
import torch
from hypothesis import given, strategies as st

import vlmstream as vs
from vlmstream.stages.pack import concat, pack_bins
from vlmstream.stages.tokenize import IGNORE


@given(st.lists(st.tuples(st.integers(1, 100), st.integers(0, 4)), max_size=60), st.integers(100, 300), st.integers(4, 10))
def test_bins_respect_both_budgets_and_hold_every_item_once(items, seq_len, max_images):
    lengths, images = [n for n, _ in items], [k for _, k in items]
    bins = pack_bins(lengths, images, seq_len, max_images)
    assert sorted(i for b in bins for i in b) == list(range(len(items)))
    for b in bins:
        assert sum(lengths[i] for i in b) + len(b) - 1 <= seq_len
        assert sum(images[i] for i in b) <= max_images
        assert b == sorted(b)


def test_first_fit_decreasing_fills_well():
    lengths = [60, 40, 70, 30, 50, 50, 20, 80]
    bins = pack_bins(lengths, [0] * 8, 101, None)
    assert len(bins) == 4  # 400 tokens + separators in 4 bins of 101: optimal


def test_too_large_an_item_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds one sequence"):
        pack_bins([10, 200], [0, 0], 100, None)


def fake(key, n, images=0):
    ids = torch.arange(n) + 1000
    labels = torch.full((n,), IGNORE)
    labels[n // 2: n - 1] = ids[n // 2 + 1:]
    return {"__key__": key, "input_ids": ids, "labels": labels, "images": [torch.zeros(1, 3, 2, 2)] * images, "__pad_id__": 0}


def test_concat_keeps_samples_apart():
    a, b = fake("a", 5, 1), fake("b", 3, 2)
    p = concat([a, b], sep_id=7)
    assert p["input_ids"].tolist() == [1000, 1001, 1002, 1003, 1004, 7, 1000, 1001, 1002]
    assert p["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert p["sequence_id"].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert p["labels"][5] == IGNORE and len(p["images"]) == 3 and p["__keys__"] == ["a", "b"]


def test_stage_packs_everything_exactly_once_under_budget():
    samples = [fake(f"{i:03d}", 10 + (i * 37) % 90, i % 3) for i in range(200)]
    stage = vs.pack(256, max_images=5, buffer=32)
    out = list(stage(iter(samples)))
    keys = [k for p in out for k in p["__keys__"]]
    assert sorted(keys) == sorted(s["__key__"] for s in samples)
    assert all(len(p["input_ids"]) <= 256 and len(p["images"]) <= 5 for p in out)
    assert stage.stats.samples == 200 and stage.stats.fill > 0.8
    batch = vs.batch(4, pad_to=256)(iter(out))
    first = next(batch)
    assert first["input_ids"].shape == first["position_ids"].shape == (4, 256)


@given(st.lists(st.tuples(st.integers(1, 120), st.integers(0, 3)), max_size=80), st.integers(120, 400),
       st.integers(3, 8), st.integers(1, 40))
def test_the_stage_packs_every_sample_exactly_once_under_both_budgets(items, seq_len, max_images, buffer):
    samples = [fake(f"{i:03d}", n, k) for i, (n, k) in enumerate(items)]
    stage = vs.pack(seq_len, max_images=max_images, buffer=buffer)
    out = list(stage(iter(samples)))
    assert sorted(k for p in out for k in p["__keys__"]) == sorted(s["__key__"] for s in samples)
    for p in out:
        assert len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"]) <= seq_len
        assert len(p["images"]) <= max_images


def _sourced(samples, pulled):
    for s in samples:
        pulled.append(s["__key__"])
        yield s


def test_the_first_sequence_comes_after_the_first_plan_not_a_whole_buffer():
    samples = [fake(f"{i:03d}", 10 + (i * 37) % 90, i % 3) for i in range(200)]
    for first, most in ((4, 4), (None, 64)):
        pulled: list[str] = []
        next(vs.pack(100, buffer=64, first=first)(_sourced(samples, pulled)))
        assert len(pulled) == most
    pulled = []
    stage = vs.pack(256, max_images=5, buffer=64)  # the default: the first plan over 32 samples
    out = [next(it := stage(_sourced(samples, pulled)))]
    assert len(pulled) == 32
    out += list(it)
    assert sorted(k for p in out for k in p["__keys__"]) == sorted(s["__key__"] for s in samples)
    assert stage.stats.fill > 0.8


def test_a_resumed_pack_keeps_its_place_in_the_ramp():
    samples = [{**fake(f"{i:03d}", 10 + (i * 37) % 90, i % 3), "__url__": "s.tar", "__offset__": i, "__index__": i}
               for i in range(200)]
    by_key = {s["__key__"]: s for s in samples}
    whole = [p["__keys__"] for p in vs.pack(256, max_images=5, buffer=64, first=4)(iter(samples))]
    for stop in (1, 3, 6, 12):
        pulled: list[str] = []
        stage = vs.pack(256, max_images=5, buffer=64, first=4)
        it = stage(_sourced(samples, pulled))
        head = [next(it)["__keys__"] for _ in range(stop)]
        state = json.loads(json.dumps(stage.state_dict()))
        fresh = vs.pack(256, max_images=5, buffer=64, first=4)
        fresh.load_state_dict(state, [by_key[r[3]] for r in state["refs"]])
        tail = [p["__keys__"] for p in fresh(iter(samples[len(pulled):]))]
        assert head + tail == whole, stop
