"""Exact mid-epoch resumption: same topology byte for byte; another topology exactly once."""

import json
from collections import Counter

import pytest
import torch

import vlmstream as vs
from vlm_data import chat_tokenizer, write_easyvqa_shards


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return write_easyvqa_shards(str(tmp_path_factory.mktemp("vqa")), n_images=48, maxcount=6)  # 8 shards


def vlm_loader(index, tok, workers=2, rank=0, world=1, lazy=False):
    pipe = vs.Pipeline(
        vs.shards(index, seed=5), vs.split_by_node(), vs.split_by_worker(), vs.fetch(prefetch=1), vs.tar_samples(),
        vs.shuffle(10, initial=4), vs.decode(vs.ImageTiles(32, 64, output="uint8"), lazy=lazy),
        vs.tokenize(tok, max_len=1024),
        vs.pack(1024, max_images=2, buffer=5), vs.batch(2), rank=rank, world_size=world, seed=1)
    return vs.Loader(pipe, num_workers=workers)


def as_bytes(batch):
    """Everything a batch holds, as comparable plain data."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = (v.dtype, tuple(v.shape), v.numpy().tobytes())
        elif k == "images":
            out[k] = [[(t.dtype, tuple(t.shape), t.numpy().tobytes()) for t in row] for row in v]
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer(image_token_length=16)


@pytest.fixture(scope="module")
def uninterrupted(vqa, tok):
    return [as_bytes(b) for b in vlm_loader(vqa, tok)]


@pytest.mark.parametrize("stop_after", [1, 4, 7])
def test_resumed_run_yields_exactly_the_uninterrupted_batches(vqa, tok, uninterrupted, stop_after):
    assert len(uninterrupted) > stop_after + 2
    loader = vlm_loader(vqa, tok)
    it = iter(loader)
    first = [as_bytes(next(it)) for _ in range(stop_after)]
    state = json.loads(json.dumps(loader.state_dict()))  # JSON-serialisable
    it.close()
    assert first == uninterrupted[:stop_after]
    assert len(json.dumps(state)) < 64_000  # kilobytes: buffers are references

    fresh = vlm_loader(vqa, tok)  # a new pipeline, as in a new process
    fresh.load_state_dict(state)
    rest = [as_bytes(b) for b in fresh]
    assert rest == uninterrupted[stop_after:]
    assert fresh.epoch == 1  # the epoch ended normally


def test_state_is_versioned_and_checked(vqa, tok):
    loader = vlm_loader(vqa, tok, workers=0)
    next(iter(loader))
    state = loader.state_dict()
    assert state["version"] == 2 and state["workers"]["0"]["version"] == 2
    with pytest.raises(ValueError, match="version"):
        loader.load_state_dict({**state, "version": 99})


def simple_loader(index, rank, world, workers):
    pipe = vs.Pipeline(vs.shards(index, seed=2), vs.split_by_node(), vs.split_by_worker(), vs.fetch(), vs.tar_samples(),
                       vs.shuffle(8, initial=3), vs.batch(3), rank=rank, world_size=world)
    return vs.Loader(pipe, num_workers=workers)


@pytest.mark.parametrize("new_world,new_workers", [(3, 1), (1, 4)])
def test_another_topology_delivers_every_remaining_sample_exactly_once(vqa, new_world, new_workers):
    delivered, states = [], []
    for rank, stop in ((0, 3), (1, 5)):  # 2 ranks x 2 workers, stopped at different points
        loader = simple_loader(vqa, rank, 2, 2)
        it = iter(loader)
        for _ in range(stop):
            delivered += next(it)["__key__"]
        states.append(json.loads(json.dumps(loader.state_dict())))
        it.close()
    after = []
    for rank in range(new_world):
        loader = simple_loader(vqa, rank, new_world, new_workers)
        loader.load_state_dict(states)
        after += [k for b in loader for k in b["__key__"]]
    everything = Counter(delivered) + Counter(after)
    assert set(delivered).isdisjoint(after)
    assert everything == Counter(f"{i:06d}" for i in range(48))


def test_lazy_tiles_give_the_same_batches_and_resume_exactly(vqa, tok, uninterrupted):
    assert [as_bytes(b) for b in vlm_loader(vqa, tok, lazy=True)] == uninterrupted
    loader = vlm_loader(vqa, tok, lazy=True)
    it = iter(loader)
    first = [as_bytes(next(it)) for _ in range(4)]
    state = json.loads(json.dumps(loader.state_dict()))
    it.close()
    fresh = vlm_loader(vqa, tok, lazy=True)
    fresh.load_state_dict(state)
    assert first + [as_bytes(b) for b in fresh] == uninterrupted


def test_resume_with_mixing_shuffle_tiles_tokenize_and_pack(tmp_path):
    """The issue's case: workers, shuffle, mixing and packing all on; every stop point resumes exactly."""
    a = write_easyvqa_shards(str(tmp_path / "a"), n_images=24, maxcount=6)
    b = write_easyvqa_shards(str(tmp_path / "b"), n_images=16, maxcount=4)
    tok = chat_tokenizer(image_token_length=16)

    def make():
        def stream(name, index, **w):
            return vs.Stream(name, vs.shards(index), vs.split_by_node(), vs.split_by_worker(), vs.fetch(),
                             vs.tar_samples(), **w)
        pipe = vs.Pipeline(
            vs.mix([stream("a", a, proportion=0.6), stream("b", b, proportion=0.4)], epoch_size=40),
            vs.shuffle(6, initial=3), vs.decode(vs.ImageTiles(32, 64, output="uint8")), vs.tokenize(tok, max_len=1024),
            vs.pack(1024, max_images=2, buffer=4), vs.batch(2), rank=0, world_size=1, seed=3)
        return vs.Loader(pipe, num_workers=2)

    full = [as_bytes(x) for x in make()]
    assert len(full) >= 6
    for stop in (1, len(full) // 2, len(full) - 1):
        loader = make()
        it = iter(loader)
        assert [as_bytes(next(it)) for _ in range(stop)] == full[:stop]
        state = json.loads(json.dumps(loader.state_dict()))
        it.close()
        fresh = make()
        fresh.load_state_dict(state)
        assert [as_bytes(x) for x in fresh] == full[stop:], stop
