"""The splitting maths (core/partition.py), apart from any I/O."""

import pytest
from hypothesis import given, strategies as st

from vlmstream.core.partition import (DROP, PAD, check_enough_shards, epoch_order, equal_quota, sample_slices, shares,
                                      slot_items)


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
def test_shares_sum_exactly_and_never_overdraw_on_drop(counts, quota):
    if sum(counts) == 0:
        return
    got = shares(quota, counts)
    assert sum(got) == quota
    if quota <= sum(counts):
        assert all(s <= c for s, c in zip(got, counts))
