"""vs.batch: whole batches made in the pipeline, equal to default_collate's, with each row copied as it arrives."""

import weakref

import pytest
import torch

import vlmstream as vs
from vlmstream.stages.batch import Rows, default_collate


def _samples(n: int, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        hwc = torch.arange(4 * 5 * 3, dtype=torch.uint8).reshape(4, 5, 3) + i
        out.append({"__key__": f"k{i}", "img": hwc.permute(2, 0, 1),  # a channel-interleaved view, as vs.Resize gives
                    "emb": torch.full((2,), float(i)), "n": i, "score": i / 2, "json": {"id": i}, "txt": f"t{i}"})
    return out


def _same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)  # the same keys in the same order
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


def test_batches_equal_default_collate_of_their_samples():
    samples = _samples(10)
    batches = list(vs.batch(4)(iter(samples)))
    assert [len(b["__key__"]) for b in batches] == [4, 4, 2]
    for b, start in zip(batches, (0, 4, 8)):
        _same(b, default_collate(samples[start:start + 4]))
    assert batches[0]["img"].shape == (4, 3, 4, 5) and batches[2]["n"].tolist() == [8, 9]
    assert all(b["img"].is_contiguous() and b["emb"].is_contiguous() for b in batches)  # interleaved views made planar


def test_partial_false_drops_and_counts_the_last_rows():
    stage = vs.batch(4, partial=False)
    assert [len(b["__key__"]) for b in stage(iter(_samples(10)))] == [4, 4]
    assert stage.dropped == 2


def test_a_member_that_stops_fitting_falls_back_to_default_collate():
    samples = _samples(4)
    samples[2]["img"] = torch.zeros(3, 8, 8, dtype=torch.uint8)  # another shape: the batch keeps a list
    samples[3]["emb"] = "not a tensor"
    b, = vs.batch(4)(iter(samples))
    want = default_collate(samples)
    _same(b, want)
    assert isinstance(b["img"], list) and isinstance(b["emb"], list) and isinstance(b["n"], torch.Tensor)


def test_a_missing_member_is_an_error_as_in_default_collate():
    samples = _samples(3)
    del samples[1]["emb"]
    with pytest.raises(KeyError):
        default_collate(samples)
    with pytest.raises(KeyError):
        list(vs.batch(3)(iter(samples)))


def test_each_sample_is_let_go_as_soon_as_the_next_is_asked_for():
    """The row is copied on arrival, so the memory of one sample's image is free for the next one's."""
    refs: list[weakref.ref] = []
    alive_at_next: list[bool] = []

    def source():
        for i in range(9):
            s = _samples(1, i)[0]
            if refs:
                alive_at_next.append(refs[-1]() is not None)
            refs.append(weakref.ref(s["img"]))
            yield s
            s = None

    batches = list(vs.batch(4)(source()))
    assert alive_at_next == [False] * 8
    _same(batches[1], default_collate(_samples(4, 4)))


def test_rows_are_made_in_the_memory_the_stage_is_given():
    made = []

    def empty(shape, dtype):
        made.append((shape, dtype))
        return torch.empty(shape, dtype=dtype)

    rows = Rows(3, _samples(1)[0], empty)
    for s in _samples(3):
        rows.add(s)
    b = rows.finish()
    assert ((3, 3, 4, 5), torch.uint8) in made and ((3, 2), torch.float32) in made
    _same(b, default_collate(_samples(3)))


def test_user_collate_and_tokenized_samples_keep_their_own_path():
    seen = []
    b, = vs.batch(2, collate=lambda xs: seen.append(len(xs)) or "mine")(iter(_samples(2)))
    assert b == "mine" and seen == [2]
    tok = [{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([-100, 2]), "images": [], "__pad_id__": 0,
            "__key__": str(i)} for i in range(2)]
    b, = vs.batch(2)(iter(tok))
    assert b["input_ids"].tolist() == [[1, 2], [1, 2]] and b["attention_mask"].tolist() == [[1, 1], [1, 1]]


def test_non_dict_samples_are_batched_by_default_collate():
    samples = [(torch.full((2,), i), i) for i in range(3)]
    b, = vs.batch(3)(iter(samples))
    _same(b[0], torch.stack([s[0] for s in samples]))
    assert b[1].tolist() == [0, 1, 2]
