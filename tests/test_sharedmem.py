"""Batches leave DataLoader workers in one shared-memory segment each, recycled once the user frees them."""

from __future__ import annotations

import gc
import multiprocessing
from collections import namedtuple

import numpy as np
import pytest
import torch

import vlmstream as vs
from vlmstream.core.sharedmem import KEEP_FREE, Returns, SHM_KEY, SegmentPool, find_tensors, put


def test_pack_puts_every_tensor_of_a_batch_in_one_segment_and_leaves_metadata_alone():
    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    batch = {"input_ids": torch.arange(10), "mask": torch.ones(3, 5, dtype=torch.bool),
             "images": [[torch.full((2, 3, 4, 4), 7, dtype=torch.uint8)], [torch.zeros(1, 3, 4, 4, dtype=torch.uint8)]],
             "cols": base.t(),  # not contiguous
             "__key__": ["a", "b"], "__meta__": torch.tensor([1, 2])}
    packed, slot = SegmentPool().pack(batch)
    assert slot == -1  # no way back without a Loader: a new segment each time
    tensors = [packed["input_ids"], packed["mask"], packed["images"][0][0], packed["images"][1][0], packed["cols"]]
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(storages) == 1 and all(t.is_shared() for t in tensors)
    assert all(t.data_ptr() % 64 == 0 for t in tensors)
    assert torch.equal(packed["cols"], base.t()) and torch.equal(packed["input_ids"], torch.arange(10))
    assert torch.equal(packed["images"][0][0], batch["images"][0][0]) and packed["mask"].all()
    assert packed["__key__"] == ["a", "b"] and packed["__meta__"] is batch["__meta__"]


def test_pack_leaves_sparse_tensors_alone_and_keeps_requires_grad():
    sparse = torch.eye(3).to_sparse()
    weight = torch.ones(2, 2, requires_grad=True)
    packed, _ = SegmentPool().pack({"s": sparse, "w": weight, "x": torch.arange(4)})
    assert packed["s"] is sparse
    assert packed["w"].requires_grad and packed["w"].is_leaf and packed["w"].is_shared()
    assert packed["w"].untyped_storage().data_ptr() == packed["x"].untyped_storage().data_ptr()


def test_a_segment_given_back_is_refilled_and_sizes_must_fit():
    reader, writer = multiprocessing.Pipe(duplex=False)
    pool = SegmentPool(reader)
    slot, seg = pool.take(1000)
    assert pool.allocated == 1 and slot == 0
    assert pool.take(1000)[0] == 1  # slot 0 is still out
    writer.send_bytes((0).to_bytes(8, "little"))
    assert pool.take(3000)[0] == 2  # too big for slot 0: a new one
    assert pool.take(900) == (0, seg) and pool.allocated == 3  # fits (no more than twice the need): refilled
    writer.send_bytes((0).to_bytes(8, "little"))
    assert pool.take(100)[0] == 3  # slot 0 is 10x too big for 100 bytes: not pinned by a small batch
    for s in (1, 2, 3):
        writer.send_bytes(s.to_bytes(8, "little"))
    pool.take(10 ** 6)
    assert len(pool.free) <= KEEP_FREE


Pair = namedtuple("Pair", "image label")


def test_find_tensors_gives_paths_through_dicts_lists_and_tuples_and_put_rebuilds_tuples():
    a, b, c = torch.zeros(2), torch.ones(3), torch.full((1,), 5)
    batch = {"x": a, "pairs": [Pair(b, 1)], "t": (c, "s"), "__meta__": torch.ones(1), "json": [{"k": ["v", 1]}]}
    found = {path: id(t) for path, t in find_tensors(batch)}
    assert found == {("x",): id(a), ("pairs", 0, 0): id(b), ("t", 0): id(c)}  # metadata keys are not entered
    out = put(batch, [(("pairs", 0, 0), None), (("t", 0), "here")])
    assert type(out["pairs"][0]) is Pair and out["pairs"][0] == Pair(None, 1) and out["t"] == ("here", "s")
    assert batch["pairs"][0].image is b and batch["t"][0] is c  # the batch given is left as it was
    assert out["json"] is batch["json"]  # what is off the paths is shared, not copied
    assert find_tensors(torch.ones(1))[0][0] == () and put(torch.ones(1), [((), 5)]) == 5


def _round_trip(pool: SegmentPool, returns: Returns, batch: dict) -> tuple[dict, tuple]:
    shipped = pool.by_reference(batch)
    shipment = shipped[SHM_KEY]
    return returns.unpack(shipped, 0), shipment


def test_by_reference_the_segment_travels_once_and_tensors_come_back_whole():
    returns = Returns(1)
    pool = SegmentPool(returns.readers[0])

    def make(i: int) -> dict:
        return {"x": torch.full((4, 3), i, dtype=torch.bfloat16), "w": torch.ones(2, requires_grad=True),
                "empty": torch.zeros(0, 5), "images": [[torch.full((2, 3, 4, 4), i, dtype=torch.uint8)]],
                "pair": (torch.tensor([i]), "label"), "__key__": ["a"]}

    out, shipment = _round_trip(pool, returns, make(1))
    assert shipment[1] is not None  # the first batch of a slot carries its segment (a descriptor)
    assert SHM_KEY not in out and out["__key__"] == ["a"] and out["pair"][1] == "label"
    assert out["x"].dtype == torch.bfloat16 and (out["x"] == 1).all() and out["empty"].shape == (0, 5)
    assert out["w"].requires_grad and out["w"].is_leaf and (out["images"][0][0] == 1).all()
    assert int(out["pair"][0]) == 1
    slot = shipment[0]
    del out
    gc.collect()
    assert returns.given_back == 1  # the last tensor freed: the segment went back to its worker
    out, shipment = _round_trip(pool, returns, make(2))
    assert shipment[0] == slot and shipment[1] is None  # refilled, and sent by its number alone
    assert (out["x"] == 2).all() and (out["images"][0][0] == 2).all() and int(out["pair"][0]) == 2
    assert pool.allocated == 1


def test_by_reference_never_gives_back_a_segment_while_a_view_lives():
    returns = Returns(1)
    pool = SegmentPool(returns.readers[0])
    out, _ = _round_trip(pool, returns, {"x": torch.arange(6)})
    view = out["x"][2:]
    array = out["x"].numpy()
    del out
    gc.collect()
    assert returns.given_back == 0
    del view
    gc.collect()
    assert returns.given_back == 0 and array[3] == 3
    del array
    gc.collect()
    assert returns.given_back == 1


def test_segments_a_worker_drops_are_dropped_by_the_training_process_too():
    returns = Returns(1)
    pool = SegmentPool(returns.readers[0])
    kept = [_round_trip(pool, returns, {"x": torch.zeros(100 * 4 ** i)})[0] for i in range(KEEP_FREE + 3)]
    assert len(returns.mapped[0]) == KEEP_FREE + 3
    del kept
    gc.collect()  # all given back; the next, bigger batch fits none of them: the worker lets the oldest go
    _round_trip(pool, returns, {"x": torch.zeros(10 ** 6)})
    assert len(returns.mapped[0]) == len(pool.segments) and len(pool.free) <= KEEP_FREE


def test_the_last_stage_makes_the_next_batch_in_the_segment_it_leaves_in():
    returns = Returns(1)
    pool = SegmentPool(returns.readers[0])
    assert pool.empty((4, 8), torch.float32).untyped_storage().nbytes() == 128  # nothing shipped yet: ordinary
    _round_trip(pool, returns, {"x": torch.zeros(4, 8), "y": torch.zeros(2)})
    gc.collect()  # given back
    made = pool.empty((4, 8), torch.float32)
    made.fill_(3)
    (segment_slot, segment), = pool.segments.items()
    assert made.untyped_storage().data_ptr() == segment.data_ptr()  # made in place, in the recycled segment
    out, shipment = _round_trip(pool, returns, {"x": made, "y": torch.ones(2)})  # y is copied after it
    offsets = {path: offset for path, offset, *_ in shipment[3]}
    assert shipment[0] == segment_slot and offsets == {("x",): 0, ("y",): 128}
    assert (out["x"] == 3).all() and (out["y"] == 1).all()
    assert pool.allocated == 1


def test_a_batch_somewhat_larger_than_the_last_is_still_made_in_place():
    # VLM batches vary in size with their tiles: a recycled segment has room for a quarter more than its batch
    returns = Returns(1)
    pool = SegmentPool(returns.readers[0])
    _round_trip(pool, returns, {"x": torch.zeros(1000)})
    gc.collect()
    (slot, segment), = pool.segments.items()
    bigger = pool.empty((1200,), torch.float32)
    bigger.fill_(5)
    assert bigger.untyped_storage().data_ptr() == segment.data_ptr()  # made in place, in the recycled segment
    out, shipment = _round_trip(pool, returns, {"x": bigger})
    assert shipment[0] == slot and (out["x"] == 5).all() and pool.allocated == 1


def test_memory_made_in_place_but_not_shipped_is_never_refilled():
    returns = Returns(1)
    pool = SegmentPool(returns.readers[0])
    _round_trip(pool, returns, {"x": torch.zeros(128)})
    gc.collect()
    held = pool.empty((64,), torch.float32)  # made for a batch that some later stage keeps back
    held.fill_(7)
    for i in range(5):  # the batches shipped meanwhile, each freed at once: their segments are refilled
        _round_trip(pool, returns, {"x": torch.full((64,), float(i))})
        gc.collect()
    assert (held == 7).all() and returns.given_back == 6


def test_vs_batch_in_workers_stacks_in_place_and_kept_batches_stay_intact():
    kept, seen = None, 0
    for b in vs.Loader(vs.Pipeline(Samples(200), vs.batch(8), telemetry=False), num_workers=2):
        first = int(b["x"][0, 0, 0])
        assert all(int(b["x"][r, 0, 0]) == first + r for r in range(b["x"].shape[0])) and (b["i"] == b["x"][:, 0, 0]).all()
        seen += b["x"].shape[0]
        if kept is None:
            kept, kept_first = b, first
    assert seen == 400 and all(int(kept["x"][r, 5, 5]) == kept_first + r for r in range(8))


def test_vs_batch_in_workers_lays_out_channel_interleaved_views_planar():
    seen = 0
    for b in vs.Loader(vs.Pipeline(Samples(100, interleaved=True), vs.batch(8), telemetry=False), num_workers=2):
        x = b["x"]
        assert x.is_contiguous() and x.shape[1:] == (3, 16, 16)
        want = torch.stack([_interleaved(int(i)).contiguous() for i in b["i"]])
        assert torch.equal(x, want)
        seen += x.shape[0]
    assert seen == 200


def _interleaved(i: int) -> torch.Tensor:
    """A [3, 16, 16] view of [16, 16, 3] memory, as vs.Resize gives images, each channel different."""
    return (torch.arange(16 * 16 * 3, dtype=torch.int32).reshape(16, 16, 3) + i).permute(2, 0, 1)


class Samples:
    """A stage making n samples (module level: spawned workers import it)."""

    def __init__(self, n: int, interleaved: bool = False):
        self.n, self.interleaved = n, interleaved

    def __call__(self, it):
        for i in range(self.n):
            x = _interleaved(i) if self.interleaved else torch.full((16, 16), i, dtype=torch.int32)
            yield {"x": x, "i": i, "__key__": str(i)}


class Source:
    """A stage that makes n batches (module level: spawned workers import it)."""

    def __init__(self, n: int, rows: int = 8):
        self.n, self.rows = n, rows

    def __call__(self, it):
        for i in range(self.n):
            yield {"x": torch.full((self.rows, 64, 64), i, dtype=torch.int32), "i": torch.tensor([i]),
                   "__key__": [f"{i}-{r}" for r in range(self.rows)]}


def _batches(n: int) -> vs.Pipeline:
    return vs.Pipeline(Source(n), telemetry=False)


def test_loader_recycles_segments_and_never_overwrites_a_batch_the_user_keeps(monkeypatch):
    made: list[Returns] = []
    real = Returns

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr("vlmstream.core.loader.Returns", spy)
    kept, view, kept_i, seen = None, None, -1, []
    for b in vs.Loader(_batches(60), num_workers=2):
        assert "__shm__" not in b
        i = int(b["i"])
        seen.append(i)
        assert (b["x"] == i).all()
        if kept is None:
            kept, view, kept_i = b, b["x"][3], i  # the batch and a view into it outlive many later batches
    assert kept is not None and int(kept["i"]) == kept_i and (kept["x"] == kept_i).all() and (view == kept_i).all()
    assert sorted(seen) == sorted(list(range(60)) * 2)  # each of the 2 workers runs the whole source
    assert made and made[0].given_back > 50  # freed batches went back to their workers


def test_pinned_or_plain_dataloader_batches_carry_no_segment_key():
    for b in vs.Loader(_batches(3), num_workers=1, pin_memory=torch.cuda.is_available()):
        assert "__shm__" not in b and (b["x"] == int(b["i"])).all()
    dl = torch.utils.data.DataLoader(_batches(3), batch_size=None, num_workers=1)
    out = list(dl)
    assert [int(b["i"]) for b in out] == [0, 1, 2] and all("__shm__" not in b for b in out)
    assert all(b["x"].is_shared() for b in out)


class Arrays:
    def __call__(self, it):
        yield {"a": np.arange(3), "t": torch.arange(3)}


def test_loader_hands_batches_over_as_the_pipeline_made_them():
    (b,) = list(vs.Loader(vs.Pipeline(Arrays(), telemetry=False), num_workers=1))
    assert isinstance(b["a"], np.ndarray) and torch.equal(b["t"], torch.arange(3))  # no torch default_convert


@pytest.mark.parametrize("context", ["spawn"])
def test_return_pipes_travel_to_spawned_workers(context):
    loader = vs.Loader(_batches(4), num_workers=2, multiprocessing_context=context)
    assert sorted(int(b["i"]) for b in loader) == [0, 0, 1, 1, 2, 2, 3, 3]
