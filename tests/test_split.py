"""The split stages over fake shards: every sample exactly once, equal per-rank counts, counted differences."""

from hypothesis import given, strategies as st

from vlmstream.core.partition import DROP, PAD
from vlmstream.core.stage import Context, ShardTask
from vlmstream.stages.read import QuotaStats, slot_samples
from vlmstream.stages.split import split_by_node, split_by_worker



def _epoch(counts, world, workers, node_kw=None, worker_kw=None):
    """Run shards -> split_by_node -> split_by_worker -> slot_samples for every slot, on fake shards whose
    samples are (shard, index): what each rank yields."""
    items = [ShardTask(f"s{i}", shard=i, samples=c, num_shards=len(counts)) for i, c in enumerate(counts)]

    def read(item):
        return ({"__index__": k, "__offset__": k, "key": (item.shard, k)} for k in range(item.samples))

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
