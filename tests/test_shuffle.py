"""The shuffle buffer: a permutation, bounded, seeded by (seed, epoch, rank, worker)."""

import random

import pytest
from hypothesis import given, strategies as st

import vlmstream as vs
from vlmstream.core.stage import Context
from vlmstream.stages.shuffle import buffer_shuffle


@given(st.integers(0, 300), st.integers(1, 50), st.data())
def test_output_is_a_permutation(n, bufsize, data):
    initial = data.draw(st.integers(1, bufsize))
    assert sorted(buffer_shuffle(iter(range(n)), bufsize, initial, random.Random(0))) == list(range(n))


def test_never_holds_more_than_bufsize():
    pulled = []

    def source():
        for i in range(1000):
            pulled.append(i)
            yield i

    for k, x in enumerate(buffer_shuffle(source(), 50, 10, random.Random(0))):
        assert len(pulled) - k <= 50 + 1  # taken minus given back: what sits in the buffer
    assert k == 999


def test_initial_controls_time_to_first_item():
    pulled = []

    def source():
        for i in range(100):
            pulled.append(i)
            yield i

    next(buffer_shuffle(source(), 50, 4, random.Random(0)))
    assert len(pulled) <= 5


def test_seeded_by_epoch_rank_worker_and_mixes():
    def run(**ctx):
        st = vs.shuffle(100)
        st.bind(Context(**ctx))
        return list(st(iter(range(1000))))

    base = run(seed=1)
    assert base == run(seed=1)
    for other in (run(seed=2), run(seed=1, epoch=1), run(seed=1, rank=1), run(seed=1, worker=1)):
        assert other != base and sorted(other) == sorted(base)
    displacement = sum(abs(i - x) for i, x in enumerate(base)) / len(base)
    assert displacement > 20  # a buffer of 100 moves items by tens of places on average


def test_bad_sizes_fail_early():
    with pytest.raises(ValueError, match="initial"):
        vs.shuffle(10, initial=20)
