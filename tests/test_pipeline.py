"""The chain from shard list to samples: exactly once over HTTP, across ranks and real DataLoader workers."""

import os
from collections import Counter

import pytest
import torch

import vlmstream as vs
from servers import Nginx
from vlmstream.dataset.format import write_manifest
from vlmstream.core.stage import Context
from vlmstream.dataset.writer import ShardWriter

# 11 shards of uneven sizes: 5..15 samples
COUNTS = [5 + (i * 7) % 11 for i in range(11)]


def make_shards(folder, counts):
    infos = []
    key = 0
    for i, n in enumerate(counts):
        w = ShardWriter(str(folder), prefix=f"part{i:02d}", maxcount=10**6)
        for _ in range(n):
            w.write(f"{key:06d}", [("txt", f"sample {key}".encode()), ("cls", str(i).encode())])
            key += 1
        infos += w.close()
    write_manifest(str(folder / "index.json"), infos)
    return key


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    total = make_shards(root, COUNTS)
    srv = Nginx(str(root))
    yield srv, total, root
    srv.close()


def chain(url, rank, world, **kw):
    return vs.Pipeline(
        vs.shards(url, seed=3, listing_cache=kw.pop("listing_cache", None)),
        vs.split_by_node(rank, world, equalize=kw.pop("equalize", None), samples=kw.get("samples", False)),
        vs.split_by_worker(samples=kw.pop("samples", False)),
        vs.fetch(prefetch=1),
        vs.tar_samples(),
        **kw,
    )


def keys_of(pipe, workers, epoch=0):
    loader = vs.Loader(pipe, num_workers=workers, epoch=epoch)
    return [s["__key__"] for s in loader]


@pytest.mark.parametrize("workers", [3, 4])
def test_exactly_once_over_http_for_2_ranks_and_request_counts(served, tmp_path, workers):
    srv, total, _ = served
    start = srv.requests()
    url = f"{srv.url}/index.json"
    pipes = [chain(url, r, 2, listing_cache=str(tmp_path / "listing")) for r in range(2)]  # one machine, 2 ranks
    keys = [k for p in pipes for k in keys_of(p, workers)]
    assert Counter(keys) == Counter(f"{i:06d}" for i in range(total))
    got = srv.requests() - start
    assert got["/index.json"] == 1
    assert all(got[f"/part{i:02d}-000000.tar"] == 1 for i in range(len(COUNTS)))
    assert sum(got.values()) == 1 + len(COUNTS)


def test_epochs_reorder_shards_and_stay_exactly_once(served):
    srv, total, _ = served
    pipe = chain(f"{srv.url}/index.json", 0, 1)
    e0, e1 = keys_of(pipe, 2, epoch=0), keys_of(pipe, 2, epoch=1)
    assert sorted(e0) == sorted(e1) == [f"{i:06d}" for i in range(total)]
    assert e0 != e1


@pytest.mark.parametrize("policy", ["pad", "drop"])
def test_equal_per_rank_counts_on_uneven_shards(served, policy):
    srv, total, root = served
    per_rank = []
    stats = []
    for r in range(3):
        pipe = chain(str(root / "index.json"), r, 3, equalize=policy)
        got = []
        for w in range(2):  # run each worker slot in-process to read its stage stats
            got += list(pipe.iterate(Context(r, 3, w, 2, seed=0)))
            stats.append(pipe.stages[4].stats)
        per_rank.append(got)
    sizes = {len(k) for k in per_rank}
    assert len(sizes) == 1, [len(k) for k in per_rank]
    keys = [s["__key__"] for k in per_rank for s in k]
    distinct = set(keys)
    if policy == "pad":
        assert distinct == {f"{i:06d}" for i in range(total)}
        assert sum(s.padded for s in stats) == len(keys) - total > 0
    else:
        assert len(distinct) == len(keys)
        assert sum(s.dropped for s in stats) == total - len(keys) > 0


def test_fewer_shards_than_readers(served):
    srv, total, root = served
    few = [str(root / f"part{i:02d}-000000.tar") for i in range(3)]
    with pytest.raises(ValueError, match="3 shards for 4 ranks"):
        list(vs.Pipeline(vs.shards(few), vs.split_by_node(1, 4), vs.fetch(), vs.tar_samples()))
    keys = []
    for r in range(4):
        pipe = vs.Pipeline(vs.shards(few), vs.split_by_node(r, 4, samples=True), vs.split_by_worker(samples=True),
                           vs.fetch(), vs.tar_samples())
        for w in range(2):
            keys += [s["__key__"] for s in pipe.iterate(Context(r, 4, w, 2))]
    assert sorted(keys) == [f"{i:06d}" for i in range(sum(COUNTS[:3]))]


def test_resampled_mode_gives_every_rank_the_same_number_of_batches(served):
    srv, _, root = served
    counts = []
    for r in range(2):
        pipe = vs.Pipeline(vs.shards(str(root / "index.json"), resample=True), vs.split_by_node(r, 2),
                           vs.split_by_worker(), vs.fetch(), vs.tar_samples(), vs.batch(4), vs.take(13))
        counts.append(sum(1 for _ in vs.Loader(pipe, num_workers=2)))
    assert counts == [13, 13]


def test_shuffle_decode_batch_through_workers(served):
    srv, total, _ = served
    pipe = vs.Pipeline(vs.shards(f"{srv.url}/index.json"), vs.split_by_node(0, 1), vs.split_by_worker(), vs.fetch(),
                       vs.tar_samples(), vs.shuffle(20, initial=5), vs.decode(), vs.batch(8))
    batches = list(vs.Loader(pipe, num_workers=2))
    texts = [t for b in batches for t in b["txt"]]
    assert sorted(texts) == sorted(f"sample {i}" for i in range(total))
    assert texts != [f"sample {i}" for i in range(total)]
    assert all(isinstance(b["__key__"], list) for b in batches)


def test_a_plain_torch_dataloader_works_too(served):
    srv, total, root = served
    pipe = chain(str(root / "index.json"), 0, 1)
    dl = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=2)
    assert len([s for s in dl]) == total
