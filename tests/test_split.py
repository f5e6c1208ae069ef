"""The splitting maths, apart from any I/O."""

import pytest
from hypothesis import given, strategies as st

from vlmstream.split import (
    DROP, PAD, check_enough_shards, epoch_order, equal_quota, sample_slices, slot_items, split_quota,
)


def test_epoch_order_is_a_permutation_that_changes_with_epoch_and_seed():
    a, b, c = epoch_order(100, 0, 0), epoch_order(100, 0, 1), epoch_order(100, 1, 0)
    assert sorted(a) == list(range(100))
    assert a == epoch_order(100, 0, 0)
    assert a != b and a != c
    assert epoch_order(5, 0, 0, shuffle=False) == [0, 1, 2, 3, 4]


@given(st.integers(0, 200), st.integers(1, 9), st.integers(1, 9), st.integers(0, 3))
def test_slots_cover_every_item_exactly_once(n, world, workers, epoch):
    order = epoch_order(n, 7, epoch)
    seen = [i for r in range(world) for w in range(workers) for i in slot_items(order, r, world, w, workers)]
    assert sorted(seen) == list(range(n))


def test_slot_sizes_differ_by_at_most_one():
    sizes = [len(slot_items(range(103), r, 4, w, 3)) for r in range(4) for w in range(3)]
    assert max(sizes) - min(sizes) <= 1


def test_too_few_shards_is_a_clear_error():
    check_enough_shards(8, 2, 4)
    with pytest.raises(ValueError, match="7 shards for 2 ranks x 4 workers"):
        check_enough_shards(7, 2, 4)


@given(st.integers(1, 20), st.integers(1, 30), st.integers(1, 50))
def test_sample_slices_cover_every_sample_once(num_shards, num_slots, per_shard):
    seen = []
    for slot in range(num_slots):
        for s in sample_slices(num_shards, slot, num_slots):
            seen += [(s.shard, k) for k in range(per_shard) if k % s.step == s.offset]
    assert sorted(seen) == [(s, k) for s in range(num_shards) for k in range(per_shard)]


def test_equal_quota_policies():
    assert equal_quota([10, 7, 12], PAD) == 12
    assert equal_quota([10, 7, 12], DROP) == 7
    with pytest.raises(ValueError, match="unknown policy"):
        equal_quota([1], "average")


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=8), st.integers(0, 3000))
def test_split_quota_sums_exactly_and_never_overdraws_on_drop(counts, quota):
    if sum(counts) == 0:
        return
    shares = split_quota(quota, counts)
    assert sum(shares) == quota
    if quota <= sum(counts):
        assert all(s <= c for s, c in zip(shares, counts))


# --------------------------------------------------------------------- property: the stages themselves


def _epoch(counts, world, workers, node_kw=None, worker_kw=None):
    """Run shards -> split_by_node -> split_by_worker -> slot_samples for every slot, on fake shards whose
    samples are (shard, index): what each rank yields."""
    from vlmstream.pipeline import Context
    from vlmstream.split import QuotaStats, slot_samples, split_by_node, split_by_worker

    items = [{"url": f"s{i}", "shard": i, "samples": c, "num_shards": len(counts)} for i, c in enumerate(counts)]

    def read(item):
        return ({"__index__": k, "__offset__": k, "key": (item["shard"], k)} for k in range(item["samples"]))

    per_rank, stats = [], []
    for r in range(world):
        got = []
        for w in range(workers):
            ctx = Context(r, world, w, workers)
            node, worker = split_by_node(**(node_kw or {})), split_by_worker(**(worker_kw or {}))
            node.bind(ctx)
            worker.bind(ctx)
            st = QuotaStats()
            got += [s["key"] for s in slot_samples(worker(node(iter(items))), read, st)]
            stats.append(st)
        per_rank.append(got)
    return per_rank, stats


@given(st.lists(st.integers(0, 12), min_size=1, max_size=20), st.integers(1, 4), st.integers(1, 4))
def test_split_stages_deliver_every_sample_exactly_once(counts, world, workers):
    samples = len(counts) < world * workers
    kw = {"samples": samples}
    per_rank, _ = _epoch(counts, world, workers, kw, kw)
    got = [k for r in per_rank for k in r]
    assert sorted(got) == [(s, k) for s, c in enumerate(counts) for k in range(c)]


@given(st.lists(st.integers(1, 12), min_size=4, max_size=16), st.integers(1, 4), st.integers(1, 2),
       st.sampled_from([PAD, DROP]))
def test_equalized_ranks_yield_the_same_count_and_count_the_difference(counts, world, workers, policy):
    if len(counts) < world * workers:
        return
    per_rank, stats = _epoch(counts, world, workers, {"equalize": policy})
    sizes = {len(r) for r in per_rank}
    assert len(sizes) == 1
    got = [k for r in per_rank for k in r]
    everything = {(s, k) for s, c in enumerate(counts) for k in range(c)}
    if policy == PAD:
        assert set(got) == everything and sum(s.padded for s in stats) == len(got) - len(everything)
    else:
        assert len(set(got)) == len(got) and sum(s.dropped for s in stats) == len(everything) - len(got)
