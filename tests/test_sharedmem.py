"""Batches leave DataLoader workers in one shared-memory segment each, recycled once the user frees them."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

import vlmstream as vs
from vlmstream.sharedmem import KEEP_FREE, Returns, SegmentPool


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

    monkeypatch.setattr("vlmstream.loader.Returns", spy)
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


@pytest.mark.parametrize("context", ["spawn"])
def test_return_pipes_travel_to_spawned_workers(context):
    loader = vs.Loader(_batches(4), num_workers=2, multiprocessing_context=context)
    assert sorted(int(b["i"]) for b in loader) == [0, 0, 1, 1, 2, 2, 3, 3]
