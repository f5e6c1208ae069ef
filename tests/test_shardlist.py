"""Shard lists: resolved once, from every spec form; ranks on one machine share one listing."""

import json
import multiprocessing as mp
import os

import pytest

import vlmstream as vs
from servers import Nginx
from vlmstream.format import FormatError, ShardInfo, write_manifest
from vlmstream.pipeline import Context
from vlmstream.shardlist import resolve


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("list")
    for i in range(5):
        (root / f"shard-{i:06d}.tar").write_bytes(b"x" * (i + 1))
    sub = root / "sub"
    sub.mkdir()
    write_manifest(str(sub / "index.json"), [ShardInfo(f"../shard-{i:06d}.tar", 10 + i, i + 1, "0" * 64) for i in range(5)])
    return root


def test_brace_list_glob(folder):
    assert [s.url for s in resolve(f"{folder}/shard-{{000000..000002}}.tar")] == [f"{folder}/shard-{i:06d}.tar" for i in range(3)]
    assert [s.url for s in resolve(["a-{0..1}.tar", "b.tar"])] == ["a-0.tar", "a-1.tar", "b.tar"]
    assert [s.url for s in resolve(f"{folder}/shard-*.tar")] == [f"{folder}/shard-{i:06d}.tar" for i in range(5)]
    assert [s.url for s in resolve("https://h/x-{00..02}.tar")] == [f"https://h/x-{i:02d}.tar" for i in range(3)]


def test_manifest_urls_are_relative_to_the_manifest(folder):
    specs = resolve(str(folder / "sub" / "index.json"))
    assert [s.url for s in specs] == [str(folder / f"shard-{i:06d}.tar") for i in range(5)]
    assert [s.samples for s in specs] == [10, 11, 12, 13, 14]


def test_bad_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(FormatError, match="index.json: not a vlmstream-shards manifest"):
        resolve(str(tmp_path / "index.json"))
    with pytest.raises(ValueError, match="no shards found"):
        vs.shards(str(tmp_path / "nothing-*.tar"))


def _resolve_in_process(url, cache, out):
    out.put([s.url for s in vs.shards(url, listing_cache=cache).specs])


def test_ranks_on_one_machine_share_one_manifest_request(folder, tmp_path):
    srv = Nginx(str(folder))
    try:
        url = f"{srv.url}/sub/index.json"
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        procs = [ctx.Process(target=_resolve_in_process, args=(url, str(tmp_path / "cache"), q)) for _ in range(4)]
        for p in procs:
            p.start()
        results = [q.get(timeout=30) for _ in procs]
        for p in procs:
            p.join()
        assert all(r == [f"{srv.url}/shard-{i:06d}.tar" for i in range(5)] for r in results)
        assert srv.requests()["/sub/index.json"] == 1
    finally:
        srv.close()


def test_items_carry_counts_and_epoch_order(folder):
    src = vs.shards(str(folder / "sub" / "index.json"), seed=0)
    src.bind(Context(epoch=0))
    e0 = list(src())
    src.bind(Context(epoch=1))
    e1 = list(src())
    assert sorted(i["shard"] for i in e0) == list(range(5)) and [i["shard"] for i in e0] != [i["shard"] for i in e1]
    assert {i["samples"] for i in e0} == {10, 11, 12, 13, 14} and e0[0]["num_shards"] == 5
    plain = vs.shards(str(folder / "sub" / "index.json"), shuffle=False)
    assert [i["shard"] for i in plain()] == list(range(5))


def test_the_list_travels_with_the_pipeline_into_workers(folder, monkeypatch):
    import pickle

    src = vs.shards(str(folder / "sub" / "index.json"))
    monkeypatch.setattr("vlmstream.shardlist.resolve", lambda *a, **k: pytest.fail("workers must not list again"))
    copy = pickle.loads(pickle.dumps(src))
    assert [s.url for s in copy.specs] == [s.url for s in src.specs]
