"""Checkpoints that do not fit the data: a changed shard list, a tampered state, an explicit topology.

A state names what it was taken on (the shard lists' fingerprint), carries a digest over itself, and every
place it points at (cursor, references) is checked against the shard list and the shard's own bytes before a
sample is delivered: a resume either continues exactly or refuses with a clear error, never silently.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections import Counter

import pytest

import vlmstream as vs
from vlmstream.core.checkpoint import seal
from vlmstream.dataset.format import read_manifest, write_manifest
from vlmstream.dataset.writer import ShardWriter

PER_SHARD, SHARDS = 10, 8


def write_corpus(root: str, keys: list[int], maxcount: int = PER_SHARD, manifest: bool = True) -> str:
    w = ShardWriter(root, maxcount=maxcount)
    for i in keys:
        w.write(f"{i:06d}", [("txt", f"sample {i}".encode()), ("json", json.dumps({"i": i}).encode())])
    infos = w.close()
    if manifest:
        write_manifest(os.path.join(root, "index.json"), infos)
    return os.path.join(root, "index.json")


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(str(tmp_path / "ds"), list(range(SHARDS * PER_SHARD)))


def loader(spec, *, rank=None, world=None, pipe_rank=None, pipe_world=None, workers=2, shuffle_buf=6):
    node = vs.split_by_node() if rank is None else vs.split_by_node(rank=rank, world_size=world)
    pipe = vs.Pipeline(vs.shards(spec, seed=4), node, vs.split_by_worker(), vs.fetch(prefetch=1), vs.tar_samples(),
                       vs.shuffle(shuffle_buf, initial=min(3, shuffle_buf)), vs.batch(2), rank=pipe_rank, world_size=pipe_world)
    return vs.Loader(pipe, num_workers=workers)


def stop_after(ld: vs.Loader, n: int) -> tuple[list[str], dict]:
    it = iter(ld)
    keys = [k for _ in range(n) for k in next(it)["__key__"]]
    state = json.loads(json.dumps(ld.state_dict()))
    it.close()
    return keys, state


def keys_of(ld: vs.Loader) -> list[str]:
    return [k for b in ld for k in b["__key__"]]


ALL = Counter(f"{i:06d}" for i in range(SHARDS * PER_SHARD))


def test_a_plain_resume_still_continues_exactly(corpus):
    full = keys_of(loader(corpus, pipe_rank=0, pipe_world=1))
    first, state = stop_after(loader(corpus, pipe_rank=0, pipe_world=1), 5)
    fresh = loader(corpus, pipe_rank=0, pipe_world=1)
    fresh.load_state_dict(state)
    assert first + keys_of(fresh) == full


# ------------------------------------------------------------------------------- the shard list changed


def _rewrite_manifest(path: str, change) -> None:
    doc, infos = read_manifest(path)
    write_manifest(path, change(infos))


@pytest.mark.parametrize("change", ["reordered", "added", "repacked"])
def test_resume_on_a_changed_shard_list_is_refused(tmp_path, corpus, change):
    _, state = stop_after(loader(corpus, pipe_rank=0, pipe_world=1), 4)
    root = os.path.dirname(corpus)
    if change == "reordered":
        _rewrite_manifest(corpus, lambda infos: infos[::-1])
    elif change == "added":
        extra = write_corpus(str(tmp_path / "more"), list(range(1000, 1020)))
        _, more = read_manifest(extra)
        for s in more:
            shutil.copy(os.path.join(os.path.dirname(extra), s.url), os.path.join(root, "x" + s.url))
            s.url = "x" + s.url
        _rewrite_manifest(corpus, lambda infos: infos + more)
    else:  # the same names, other content: packed again with another shard size
        for name in os.listdir(root):
            os.remove(os.path.join(root, name))
        write_corpus(root, list(range(SHARDS * PER_SHARD))[::-1], maxcount=PER_SHARD)
    fresh = loader(corpus, pipe_rank=0, pipe_world=1)
    with pytest.raises(ValueError, match="shard list"):
        fresh.load_state_dict(state)


def test_a_shard_repacked_in_place_without_a_manifest_is_detected_where_it_is_read(tmp_path):
    root = str(tmp_path / "ds")
    write_corpus(root, list(range(SHARDS * PER_SHARD)), manifest=False)
    spec = os.path.join(root, "shard-*.tar")
    _, state = stop_after(loader(spec, pipe_rank=0, pipe_world=1, shuffle_buf=1), 3)
    for name in os.listdir(root):
        os.remove(os.path.join(root, name))
    keys = list(range(SHARDS * PER_SHARD))
    write_corpus(root, keys[1:] + keys[:1], manifest=False)  # same names and sizes, every key moved by one
    fresh = loader(spec, pipe_rank=0, pipe_world=1, shuffle_buf=1)
    fresh.load_state_dict(state)
    with pytest.raises(Exception, match="changed since the checkpoint"):
        keys_of(fresh)


# ------------------------------------------------------------------------------------- a tampered state


def _slot_with_refs(state: dict) -> dict:
    return next(w for w in state["workers"].values() if w["stages"][5]["refs"])


def test_an_edited_state_fails_its_digest(corpus):
    _, state = stop_after(loader(corpus, pipe_rank=0, pipe_world=1), 4)
    bad = copy.deepcopy(state)
    bad["workers"]["0"]["stages"][4]["item"] += 1
    with pytest.raises(ValueError, match="digest"):
        loader(corpus, pipe_rank=0, pipe_world=1).load_state_dict(bad)
    del bad["digest"]
    with pytest.raises(ValueError, match="digest"):
        loader(corpus, pipe_rank=0, pipe_world=1).load_state_dict(bad)


def test_a_cursor_out_of_bounds_is_refused_even_with_a_fresh_digest(corpus):
    _, state = stop_after(loader(corpus, pipe_rank=0, pipe_world=1), 4)
    for edit, value in (("item", 99), ("index", PER_SHARD + 3), ("offset", 7)):
        bad = copy.deepcopy(state)
        cursor = bad["workers"]["0"]["stages"][4]
        if edit != "item" and cursor["index"] is None:
            cursor = bad["workers"]["1"]["stages"][4]
        cursor[edit] = value
        with pytest.raises(ValueError, match="cursor"):
            loader(corpus, pipe_rank=0, pipe_world=1).load_state_dict(seal(bad))


def test_an_edited_reference_is_refused_even_with_a_fresh_digest(corpus):
    _, state = stop_after(loader(corpus, pipe_rank=0, pipe_world=1), 4)
    # An index out of the shard's range: refused when the state is loaded.
    bad = copy.deepcopy(state)
    _slot_with_refs(bad)["stages"][5]["refs"][0][2] = PER_SHARD + 5
    with pytest.raises(ValueError, match="reference"):
        loader(corpus, pipe_rank=0, pipe_world=1).load_state_dict(seal(bad))
    # A URL that is not in the shard list: never opened.
    bad = copy.deepcopy(state)
    _slot_with_refs(bad)["stages"][5]["urls"][0][1] = "/etc/passwd"
    with pytest.raises(ValueError, match="not in the shard list"):
        loader(corpus, pipe_rank=0, pipe_world=1).load_state_dict(seal(bad))
    # An index in range but another sample's: its key does not match where it is read.
    bad = copy.deepcopy(state)
    ref = _slot_with_refs(bad)["stages"][5]["refs"][0]
    ref[2] = (ref[2] + 1) % PER_SHARD
    fresh = loader(corpus, pipe_rank=0, pipe_world=1)
    fresh.load_state_dict(seal(bad))
    with pytest.raises(Exception, match="changed since the checkpoint"):
        keys_of(fresh)


# ------------------------------------------------------------------------------- an explicit topology


@pytest.mark.parametrize("pipe_too", [False, True])
def test_explicit_rank_and_world_size_resume_on_another_topology(corpus, pipe_too):
    delivered, states = [], []
    for rank, n in ((0, 2), (1, 4)):  # 2 ranks x 2 workers, split_by_node(rank=r, world_size=2)
        kw = dict(pipe_rank=rank, pipe_world=2) if pipe_too else {}
        got, state = stop_after(loader(corpus, rank=rank, world=2, **kw), n)
        assert (state["rank"], state["world_size"]) == (rank, 2)
        delivered += got
        states.append(state)
    after = []
    for rank in range(1):  # 1 rank x 3 workers
        kw = dict(pipe_rank=rank, pipe_world=1) if pipe_too else {}
        fresh = loader(corpus, rank=rank, world=1, workers=3, **kw)
        fresh.load_state_dict(states)
        after += keys_of(fresh)
    assert set(delivered).isdisjoint(after)
    assert Counter(delivered) + Counter(after) == ALL


def test_a_split_rank_that_contradicts_the_pipeline_is_refused():
    with pytest.raises(ValueError, match="rank"):
        vs.Pipeline(vs.shards(["a.tar", "b.tar"]), vs.split_by_node(rank=1, world_size=2), rank=0, world_size=2)


@pytest.mark.parametrize("then", [(1, 3), (2, 1)])
def test_a_checkpoint_taken_after_a_topology_change_resumes_exactly_once(corpus, then):
    """The rest of an epoch resumed on another topology is a plan, not the epoch's order: a checkpoint taken
    during it must carry the plan, so that resuming it (same or yet another topology) stays exactly once."""
    delivered, states = [], []
    for rank, n in ((0, 2), (1, 3)):  # 2 ranks x 2 workers
        got, state = stop_after(loader(corpus, pipe_rank=rank, pipe_world=2), n)
        delivered += got
        states.append(state)
    middle = []
    for rank in range(2):  # resumed on 2 ranks x 1 worker, each stopped again after a few batches
        ld = loader(corpus, pipe_rank=rank, pipe_world=2, workers=1)
        ld.load_state_dict(states)
        got, state = stop_after(ld, 2 + rank)
        delivered += got
        middle.append(state)
    world, workers = then
    after = []
    for rank in range(world):
        ld = loader(corpus, pipe_rank=rank, pipe_world=world, workers=workers)
        ld.load_state_dict(middle if (world, workers) != (2, 1) else middle[rank])
        after += keys_of(ld)
    assert Counter(delivered) + Counter(after) == ALL
