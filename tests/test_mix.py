"""vs.mix: exact targets over every (rank, worker) slot, proportions, stop strategies, restarts, state, YAML."""

import json
import pathlib
from collections import Counter

import pytest
import torch
import yaml

import vlmstream as vs
from vlmstream.dataset.format import write_manifest
from vlmstream.core.partition import shares
from vlmstream.stages.mix import stream_epoch
from vlmstream.core.stage import Context
from vlmstream.dataset.writer import ShardWriter

# Shard sizes per stream: uneven, so that slots hold different amounts.
SIZES = {"a": [10, 7, 9, 12, 5, 8], "b": [5, 5, 6, 4], "c": [3, 4, 3, 2, 5]}
SLOTS = [(r, w) for r in range(2) for w in range(2)]  # 2 ranks x 2 workers


def make_stream_shards(root, name, counts):
    """Shards `NAME-SS-NNNNNN.tar` with keys `NAME.SS.KKKK`; returns the manifest path."""
    folder = root / name
    infos = []
    for i, n in enumerate(counts):
        w = ShardWriter(str(folder), prefix=f"{name}-{i:02d}", maxcount=10**6)
        for k in range(n):
            w.write(f"{name}_{i:02d}_{k:04d}", [("txt", f"{name} {i} {k}".encode())])
        infos += w.close()
    write_manifest(str(folder / "index.json"), infos)
    return str(folder / "index.json")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return {name: make_stream_shards(root, name, counts) for name, counts in SIZES.items()}


def stream(name, spec, **weights):
    return vs.Stream(name, vs.shards(spec), vs.split_by_node(), vs.split_by_worker(), vs.fetch(prefetch=0),
                     vs.tar_samples(), **weights)


def run_slots(mix, slots=SLOTS, world=2, workers=2, seed=0, epoch=0):
    """Run every slot in-process; returns {(rank, worker): samples} and {(rank, worker): its stats and targets}."""
    pipe = vs.Pipeline(mix)
    out, stats = {}, {}
    for r, w in slots:
        out[r, w] = list(pipe.iterate(Context(r, world, w, workers, seed=seed, epoch=epoch)))
        stats[r, w] = {**json.loads(json.dumps(mix.stats[epoch])), "targets": mix.slot_targets}
    return out, stats


def sources(samples):
    return [s["__source__"] for s in samples]


def test_deterministic_for_a_seed_and_tagged(data):
    def names(seed):
        m = vs.mix([stream(n, data[n], proportion=p) for n, p in (("a", 2), ("b", 1), ("c", 1))], seed=seed)
        return [(s["__source__"], s["__key__"]) for s in vs.Pipeline(m).iterate(Context(0, 2, 1, 2))]

    first = names(7)
    assert first == names(7)
    assert first != names(8)
    assert all(key.startswith(src + "_") for src, key in first)  # __source__ is the stream the sample came from


@pytest.mark.parametrize("kind", ["choose", "repeat", "epoch_size", "sizes"])
def test_exact_targets_summed_over_2_ranks_x_2_workers(data, kind):
    if kind == "choose":
        m = vs.mix([stream("a", data["a"], choose=70), stream("b", data["b"], choose=5),
                    stream("c", data["c"], choose=0)])
        want = {"a": 70, "b": 5, "c": 0}
    elif kind == "repeat":
        m = vs.mix([stream("a", data["a"], repeat=1), stream("b", data["b"], repeat=2.5),
                    stream("c", data["c"], repeat=0.5)])
        want = {"a": 51, "b": 50, "c": 9}  # 8.5 rounds up
    elif kind == "epoch_size":
        m = vs.mix([stream(n, data[n], proportion=p) for n, p in (("a", 0.5), ("b", 0.3), ("c", 0.2))], epoch_size=101)
        want = dict(zip("abc", shares(101, [0.5, 0.3, 0.2])))
        assert want == {"a": 51, "b": 30, "c": 20}  # 50.5, 30.3, 20.2: the half goes to a
    else:  # no weights, an epoch size: shared in proportion to the streams' sizes (51, 20, 17)
        m = vs.mix([stream(n, data[n]) for n in "abc"], epoch_size=88)
        want = {"a": 51, "b": 20, "c": 17}
    assert m.targets == want
    got, stats = run_slots(m)
    assert Counter(s for samples in got.values() for s in sources(samples)) == +Counter(want)
    for slot, samples in got.items():  # each slot met its own share exactly
        assert stats[slot]["drawn"] == stats[slot]["targets"] == {n: sources(samples).count(n) for n in "abc"}
    totals = [len(s) for s in got.values()]
    assert sum(totals) == sum(want.values())
    if kind == "repeat":  # repeat=1: shares follow what each slot holds, so every sample of `a` is read exactly once
        keys = [s["__key__"] for samples in got.values() for s in samples if s["__source__"] == "a"]
        assert len(keys) == len(set(keys)) == 51
        assert all(st["passes"]["a"] == 1 for st in stats.values())
        assert sum(st["passes"]["b"] for st in stats.values()) >= 4 * 2  # 2.5 passes: restarted in every slot


def listed_stream(name, spec, **weights):
    """The stream's shards given as a list of files: no manifest, so no sample counts."""
    folder = spec.rsplit("/", 1)[0]
    tars = sorted(str(p) for p in pathlib.Path(folder).glob("*.tar"))
    return vs.Stream(name, vs.shards(tars), vs.split_by_node(), vs.split_by_worker(), vs.fetch(prefetch=0),
                     vs.tar_samples(), **weights)


def test_shares_are_split_evenly_where_counts_are_unknown(data):
    m = vs.mix([listed_stream("b", data["b"], choose=10)])
    assert [m.slot_shares(Context(r, 2, w, 2)) for r, w in SLOTS] == [{"b": 3}, {"b": 3}, {"b": 2}, {"b": 2}]
    got, _ = run_slots(m)
    assert [len(v) for v in got.values()] == [3, 3, 2, 2]


def test_no_weights_reads_every_sample_exactly_once(data):
    m = vs.mix([stream(n, data[n]) for n in "abc"])
    assert m.targets is None
    got, stats = run_slots(m)
    keys = [s["__key__"] for samples in got.values() for s in samples]
    assert len(keys) == len(set(keys)) == sum(map(sum, SIZES.values()))
    assert all(p == 1 for st in stats.values() for p in st["passes"].values())


# Critical value of the chi-square distribution with 2 degrees of freedom at p = 0.001: the upper-tail quantile
# -2 ln(0.001) = 13.8155 (for 2 degrees of freedom the tail is exp(-x/2)). A fair draw exceeds it one time in 1000.
CHI2_DF2_P001 = 13.8155


def chi_square(counts, proportions):
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, proportions))


def test_long_run_matches_the_proportions(data):
    props = [0.5, 0.3, 0.2]
    m = vs.mix([stream(n, data[n], proportion=p) for n, p in zip("abc", props)], stop="endless", seed=11)
    it = vs.Pipeline(m).iterate(Context(1, 2, 0, 2))
    drawn = Counter(next(it)["__source__"] for _ in range(20_000))
    stat = chi_square([drawn[n] for n in "abc"], props)
    assert stat < CHI2_DF2_P001, (drawn, stat)
    # The restarts counted: each pass of a slot's part of a stream holds a few dozen samples at most.
    assert all(m.stats[0]["passes"][n] > 20_000 * p / 60 for n, p in zip("abc", props))


def test_exact_targets_are_interleaved_not_concatenated(data):
    m = vs.mix([stream(n, data[n], choose=k) for n, k in (("a", 2000), ("b", 1200), ("c", 800))], seed=3)
    names = sources(vs.Pipeline(m).iterate(Context()))
    assert Counter(names) == {"a": 2000, "b": 1200, "c": 800}
    half = Counter(names[:2000])  # drawn in proportion to what is left: the first half is already in proportion
    assert chi_square([half[n] for n in "abc"], [0.5, 0.3, 0.2]) < CHI2_DF2_P001


def test_first_exhausted_stops_at_the_first_stream_that_runs_out(data):
    m = vs.mix([stream(n, data[n], proportion=p) for n, p in (("a", 1), ("b", 1), ("c", 1))], stop="first_exhausted")
    got = list(vs.Pipeline(m).iterate(Context()))
    drawn = Counter(sources(got))
    ran_out = [n for n in "abc" if drawn[n] == sum(SIZES[n])]
    assert len(ran_out) == 1 and m.exhausted == set(ran_out)
    assert all(drawn[n] < sum(SIZES[n]) for n in "abc" if n not in ran_out)
    assert m.stats[0]["passes"] == {"a": 1, "b": 1, "c": 1}


def test_all_exhausted_restarts_until_every_stream_ran_out_once(data):
    m = vs.mix([stream(n, data[n], proportion=p) for n, p in (("a", 1), ("b", 1), ("c", 1))])
    got, stats = run_slots(m, slots=[(0, 0)], world=1, workers=1)
    drawn, passes = Counter(sources(got[0, 0])), stats[0, 0]["passes"]
    assert m.exhausted == {"a", "b", "c"}
    assert all(drawn[n] >= sum(SIZES[n]) for n in "abc")
    assert passes["a"] == 1 and drawn["a"] == sum(SIZES["a"])  # the largest ran out last, once
    assert passes["c"] > 1 and passes["b"] > 1  # the smaller ones were restarted
    keys_c = [s["__key__"] for s in got[0, 0] if s["__source__"] == "c"]
    assert set(keys_c) == {f"c_{i:02d}_{k:04d}" for i, n in enumerate(SIZES["c"]) for k in range(n)}


def test_a_restarted_stream_counts_its_pass_and_reshuffles(data):
    m = vs.mix([stream("c", data["c"], choose=3 * 17)])
    keys = [s["__key__"] for s in vs.Pipeline(m).iterate(Context(seed=5))]
    assert m.stats[0]["passes"] == {"c": 3}
    passes = [keys[i * 17:(i + 1) * 17] for i in range(3)]
    assert all(sorted(p) == sorted(passes[0]) for p in passes)  # each pass reads the whole stream once
    shard_order = [list(dict.fromkeys(k.split("_")[1] for k in p)) for p in passes]
    assert len({tuple(o) for o in shard_order}) == 3, shard_order  # a new shard order every pass
    # Pass 0 reads what the stream alone reads in this epoch; pass p runs as epoch e + p * 2**32.
    alone = vs.Pipeline(*m.streams["c"].pipeline.stages)
    assert [s["__key__"] for s in alone.iterate(Context(seed=5))] == passes[0]
    assert [s["__key__"] for s in alone.iterate(Context(seed=5, epoch=stream_epoch(0, 2)))] == passes[2]


def test_epochs_differ_and_are_counted_apart(data):
    m = vs.mix([stream(n, data[n], choose=20) for n in "ab"])
    e0 = [s["__key__"] for s in vs.Pipeline(m).iterate(Context(epoch=0))]
    e1 = [s["__key__"] for s in vs.Pipeline(m).iterate(Context(epoch=1))]
    assert e0 != e1 and sorted(m.stats) == [0, 1]
    assert m.stats[0]["drawn"] == m.stats[1]["drawn"] == {"a": 20, "b": 20}


def test_bad_arguments_give_clear_errors(data):
    with pytest.raises(ValueError, match="at most one of proportion, repeat, choose"):
        stream("a", data["a"], proportion=0.5, choose=10)
    with pytest.raises(ValueError, match="choose must be an integer"):
        stream("a", data["a"], choose=2.5)
    with pytest.raises(ValueError, match="proportion must be a finite number"):
        stream("a", data["a"], proportion=-1)
    with pytest.raises(ValueError, match="stream 'l': repeat=2 needs the stream's sample count.*manifest"):
        vs.mix([listed_stream("l", data["a"], repeat=2)])
    with pytest.raises(ValueError, match="stream 'l': no weight .* needs the stream's sample count"):
        vs.mix([listed_stream("l", data["a"]), stream("b", data["b"], choose=3)])
    with pytest.raises(ValueError, match="cannot be mixed"):
        vs.mix([stream("a", data["a"], proportion=1), stream("b", data["b"], choose=3)])
    with pytest.raises(ValueError, match=r"streams \['b'\] have no proportion"):
        vs.mix([stream("a", data["a"], proportion=1), stream("b", data["b"])])
    with pytest.raises(ValueError, match="epoch_size applies to proportions"):
        vs.mix([stream("a", data["a"], choose=3)], epoch_size=10)
    with pytest.raises(ValueError, match="stop='endless' applies to proportions without epoch_size"):
        vs.mix([stream("a", data["a"], proportion=1)], epoch_size=10, stop="endless")
    with pytest.raises(ValueError, match="unknown stop 'first'"):
        vs.mix([stream("a", data["a"], proportion=1)], stop="first")
    with pytest.raises(ValueError, match=r"unique: \['a'\]"):
        vs.mix([stream("a", data["a"]), stream("a", data["b"])])
    with pytest.raises(ValueError, match="non-empty list of vs.Stream"):
        vs.mix([])


def drawn(samples):
    return [(s["__source__"], s["__key__"]) for s in samples]


@pytest.mark.parametrize("mode", ["exact", "endless"])
def test_state_round_trips_and_continues_exactly(data, mode):
    """Stopped after any sample, a mix restored from its JSON state (in fresh objects, as in a new process)
    continues with exactly the samples an uninterrupted run gives: the draw order, and each stream's reader
    from its cursor, across pass ends and restarts."""
    def make():
        if mode == "exact":
            return vs.mix([stream(n, data[n], choose=k) for n, k in (("a", 300), ("b", 160), ("c", 100))])
        return vs.mix([stream(n, data[n], proportion=p) for n, p in (("a", 3), ("b", 2), ("c", 1))], stop="endless")

    ctx = Context(1, 2, 1, 2, seed=4, epoch=2)
    it = vs.Pipeline(make()).iterate(ctx)
    reference = drawn(it) if mode == "exact" else drawn(next(it) for _ in range(200))  # this slot's epoch
    n = len(reference)
    for k in range(n + 1) if mode == "exact" else range(0, n, 7):  # every stop point of the exact epoch
        m = make()
        it = vs.Pipeline(m).iterate(ctx)
        head = drawn(next(it) for _ in range(k))
        state = json.loads(json.dumps(m.state_dict()))  # JSON-ready
        assert state["epoch"] == 2 and state["slot"] == [1, 1] and sum(state["drawn"].values()) == k
        restored = make()
        restored.load_state_dict(state)
        assert restored.rng.getstate() == m.rng.getstate() and restored.drawn == m.drawn
        assert restored.passes == m.passes and restored.slot_targets == m.slot_targets
        it = vs.Pipeline(restored).iterate(ctx)
        assert head + drawn(next(it) for _ in range(n - k)) == reference, k
        if mode == "exact":
            assert next(it, None) is None and restored.drawn == restored.slot_targets
    assert set(state["streams"]) == {"a", "b", "c"} and state["streams"]["a"]["stages"][4]["offset"] is not None


def test_loader_checkpoint_of_a_mix_resumes_exactly_through_workers(data):
    def make():
        streams = [stream(n, data[n], choose=k) for n, k in (("a", 60), ("b", 30), ("c", 20))]
        return vs.Pipeline(vs.mix(streams), vs.batch(4), seed=1, rank=0, world_size=1)

    reference = [b["__key__"] for b in vs.Loader(make(), num_workers=2)]
    loader = vs.Loader(make(), num_workers=2)
    it = iter(loader)
    head = [next(it)["__key__"] for _ in range(9)]
    state = json.loads(json.dumps(loader.state_dict()))
    del it
    resumed = vs.Loader(make(), num_workers=2)
    resumed.load_state_dict(state)
    assert head + [b["__key__"] for b in resumed] == reference


def test_yaml_streams_build_and_run(data):
    cfg = {
        "seed": 1,
        "streams": [{"name": "a", "shards": data["a"], "proportion": 3},
                    {"name": "b", "remote": data["b"], "proportion": 1}],
        "mix": {"epoch_size": 40},
        "pipeline": [{"decode": {}}, {"batch": {"n": 4}}],
    }
    pipe = vs.from_config(cfg)
    assert isinstance(pipe.stages[0], vs.mix) and pipe.stages[0].targets == {"a": 30, "b": 10}
    batches = [b for r, w in SLOTS for b in pipe.iterate(Context(r, 2, w, 2, seed=1))]
    got = Counter(src for b in batches for src in b["__source__"])
    assert got == {"a": 30, "b": 10}
    assert all(t.startswith(src) for b in batches for src, t in zip(b["__source__"], b["txt"]))
    # Through real DataLoader workers (the mix is copied into each): the worker slots' shares sum to the targets.
    got = Counter(src for b in vs.Loader(pipe, num_workers=2) for src in b["__source__"])
    assert got == {"a": 30, "b": 10}

    with pytest.raises(ValueError, match="remove \\['shards'\\]"):
        vs.from_config({**cfg, "pipeline": [{"shards": {"spec": data["a"]}}]})
    with pytest.raises(ValueError, match="give one of 'shards' or 'remote'"):
        vs.from_config({**cfg, "streams": [{"name": "a", "shards": data["a"], "remote": data["a"]}]})
    with pytest.raises(ValueError, match="unknown keys \\['weight'\\]"):
        vs.from_config({**cfg, "streams": [{"name": "a", "shards": data["a"], "weight": 1}]})
    with pytest.raises(ValueError, match="'mix:' needs a top-level 'streams:'"):
        vs.from_config({"mix": {"epoch_size": 3}, "pipeline": []})


def test_the_shipped_mixture_config_runs_through_loader_workers(tmp_path):
    from vlm_data import chat_tokenizer, write_easyvqa_shards

    paths = {n: write_easyvqa_shards(str(tmp_path / n), n_images=20, maxcount=5) for n in ("vqa", "captions", "chat")}
    chat_tokenizer().save(str(tmp_path / "tokenizer.json"))
    with open("configs/mixture.yaml") as f:
        cfg = yaml.safe_load(f)
    assert [s["name"] for s in cfg["streams"]] == ["vqa", "captions", "chat"]
    cfg["streams"][1]["cache"] = str(tmp_path / "cache")
    cfg["mix"]["epoch_size"] = 30  # the shipped 100000 is for real data
    loader = vs.from_config(cfg, tokenizer=str(tmp_path / "tokenizer.json"), **paths)
    assert loader.pipeline.stages[0].targets == {"vqa": 15, "captions": 9, "chat": 6}
    loader.num_workers = 2  # this machine has 2 cores
    batches = list(loader)
    assert batches and all(b["input_ids"].dtype == torch.int64 and b["input_ids"].shape[0] <= 8 for b in batches)


@pytest.mark.parametrize("where", ["after the mix", "in the streams"])
def test_loader_checkpoint_with_decode_groups_resumes_exactly(data, where):
    """vs.decode holds up to a group of samples back; a checkpoint refers to them, in or after a mix."""
    def make():
        extra = (lambda: (vs.decode(group=8),)) if where == "in the streams" else (lambda: ())
        streams = [vs.Stream(n, vs.shards(data[n]), vs.split_by_node(), vs.split_by_worker(), vs.fetch(prefetch=0),
                             vs.tar_samples(), *extra(), choose=k) for n, k in (("a", 60), ("b", 30), ("c", 20))]
        after = (vs.decode(group=8),) if where == "after the mix" else ()
        return vs.Pipeline(vs.mix(streams), *after, vs.batch(3), seed=1, rank=0, world_size=1)

    reference = [(b["__key__"], b["txt"]) for b in vs.Loader(make(), num_workers=2)]
    assert all(isinstance(t, str) for _, txt in reference for t in txt)  # decoded
    loader = vs.Loader(make(), num_workers=2)
    it = iter(loader)
    head = [(b["__key__"], b["txt"]) for b in (next(it) for _ in range(7))]  # 21 samples: inside a group of 8
    state = json.loads(json.dumps(loader.state_dict()))
    del it
    resumed = vs.Loader(make(), num_workers=2)
    resumed.load_state_dict(state)
    assert head + [(b["__key__"], b["txt"]) for b in resumed] == reference


def test_streams_sharing_a_stateful_stage_are_refused(data):
    shared = vs.decode(group=8)  # holds a group of samples back: a checkpoint reads it per stream
    streams = [vs.Stream(n, vs.shards(data[n]), vs.split_by_node(), vs.split_by_worker(), vs.fetch(prefetch=0),
                         vs.tar_samples(), shared) for n in ("a", "b")]
    with pytest.raises(ValueError, match="streams 'a' and 'b' share one decode stage"):
        vs.mix(streams)


def test_a_stream_with_its_own_rank_is_refused(data):
    with pytest.raises(ValueError, match="rank and world size come from the pipeline"):
        vs.Stream("a", vs.shards(data["a"]), vs.split_by_node(rank=1, world_size=2), vs.split_by_worker(),
                  vs.fetch(), vs.tar_samples())
