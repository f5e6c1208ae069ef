"""Shard lists: resolved once, from every spec form; ranks on one machine share one listing."""

import json
import multiprocessing as mp
import os

import pytest

import vlmstream as vs
from servers import Nginx, fault_server
from vlmstream.dataset.format import ShardInfo, manifest_json, write_manifest
from vlmstream.errors import FormatError
from vlmstream.core.stage import Context
from vlmstream.dataset.shardlist import from_manifest
from vlmstream.stages.shards import resolve


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
    assert sorted(i.shard for i in e0) == list(range(5)) and [i.shard for i in e0] != [i.shard for i in e1]
    assert {i.samples for i in e0} == {10, 11, 12, 13, 14} and e0[0].num_shards == 5
    plain = vs.shards(str(folder / "sub" / "index.json"), shuffle=False)
    assert [i.shard for i in plain()] == list(range(5))


def test_the_list_travels_with_the_pipeline_into_workers(folder, monkeypatch):
    import pickle

    src = vs.shards(str(folder / "sub" / "index.json"))
    monkeypatch.setattr("vlmstream.stages.shards.resolve", lambda *a, **k: pytest.fail("workers must not list again"))
    copy = pickle.loads(pickle.dumps(src))
    assert [s.url for s in copy.specs] == [s.url for s in src.specs]


# ------------------------------------------------------------------------------- what a manifest may name


def manifest_bytes(*urls: str) -> bytes:
    return json.dumps(manifest_json([ShardInfo(u, 1, 1, "0" * 64) for u in urls])).encode()


REMOTE = "http://127.0.0.1:8000/ds/index.json"
SHA = "a" * 40


@pytest.mark.parametrize("entry", [
    "//127.0.0.1:9000/x.tar",  # another port is another origin
    "http://127.0.0.1:9000/x.tar?token=SECRET",
    "https://127.0.0.1:8000/x.tar",  # another scheme is another origin
    "http://localhost:8000/x.tar",
    "file:///etc/passwd",
    "pipe:cat /etc/passwd",
    "hf://datasets/org/other/x.tar",
    "localhost:8000/x.tar",  # a URL of scheme "localhost", as urljoin reads it
    "http://[::1/x.tar",
])
def test_a_remote_manifest_may_not_name_shards_off_its_origin(entry):
    with pytest.raises(FormatError, match=r"index.json: shard entry .* resolves outside the manifest's origin "
                                          r"\(http://127.0.0.1:8000\)") as e:
        from_manifest(REMOTE, manifest_bytes("shard-0.tar", entry))
    assert "SECRET" not in str(e.value) and e.value.reason == "outside_origin"


def test_a_remote_manifest_resolves_its_entries_as_urls_on_its_own_origin():
    entries = ["shard-0.tar", "../../127.0.0.1:9000/x.tar", "/abs/path/x.tar", "sub/../y.tar?v=1",
               "http://127.0.0.1:8000/z.tar", "http://127.0.0.1:80/other-port.tar"]
    urls = [s.url for s in from_manifest(REMOTE, manifest_bytes(*entries[:5]))]
    assert urls == ["http://127.0.0.1:8000/ds/shard-0.tar", "http://127.0.0.1:8000/127.0.0.1:9000/x.tar",
                    "http://127.0.0.1:8000/abs/path/x.tar", "http://127.0.0.1:8000/ds/y.tar?v=1",
                    "http://127.0.0.1:8000/z.tar"]
    with pytest.raises(FormatError, match="other-port.tar"):
        from_manifest(REMOTE, manifest_bytes(entries[-1]))


def test_hosts_the_user_allows_by_name():
    data = manifest_bytes("http://127.0.0.1:9000/a.tar", "https://cdn.example.com/b.tar")
    for allowed in (["127.0.0.1:9000", "cdn.example.com"], ["127.0.0.1", "https://cdn.example.com"]):
        assert [s.url for s in from_manifest(REMOTE, data, allowed)] == ["http://127.0.0.1:9000/a.tar",
                                                                          "https://cdn.example.com/b.tar"]
    for allowed in (["127.0.0.1:9001", "cdn.example.com"], ["127.0.0.1", "http://cdn.example.com"], []):
        with pytest.raises(FormatError, match="allowed_hosts"):
            from_manifest(REMOTE, data, allowed)
    with pytest.raises(FormatError):  # never a local file, whatever is allowed
        from_manifest(REMOTE, manifest_bytes("file:///etc/passwd"), ["127.0.0.1", ""])


def test_an_hf_manifest_names_files_of_its_own_repo_at_its_commit():
    base = f"hf://datasets/org/ds@{SHA}/sub/index.json"
    got = [s.url for s in from_manifest(base, manifest_bytes("a.tar", "../b.tar", "/c.tar"))]
    assert got == [f"hf://datasets/org/ds@{SHA}/sub/a.tar", f"hf://datasets/org/ds@{SHA}/b.tar",
                   f"hf://datasets/org/ds@{SHA}/c.tar"]
    for entry in ("../../x.tar", "../../../other/ds/x.tar", "hf://datasets/org/other/x.tar", "hf://datasets/org/ds/x.tar",
                  "http://127.0.0.1:8000/x.tar", "file:///etc/passwd"):
        with pytest.raises(FormatError, match="outside the manifest's origin"):
            from_manifest(base, manifest_bytes(entry))


def test_a_local_manifest_is_the_users_own_absolute_paths_and_urls_kept(tmp_path):
    (tmp_path / "index.json").write_bytes(manifest_bytes("a.tar", "/data/b.tar", "http://127.0.0.1:9000/c.tar"))
    assert [s.url for s in resolve(str(tmp_path / "index.json"))] == [str(tmp_path / "a.tar"), "/data/b.tar",
                                                                      "http://127.0.0.1:9000/c.tar"]


def test_a_hostile_manifest_over_http_is_refused_when_the_list_is_built(folder, tmp_path):
    (tmp_path / "index.json").write_bytes(manifest_bytes("shard-0.tar", "../../127.0.0.1:1/x.tar", "/etc/passwd",
                                                         "//127.0.0.1:1/y.tar?sig=SECRET"))
    with fault_server(str(tmp_path)) as (url, plan):
        with pytest.raises(FormatError, match=r"index.json: shard entry '//127.0.0.1:1/y.tar\?sig=\*\*\*' resolves "):
            vs.shards(f"{url}/index.json")
        src = vs.shards(f"{url}/index.json", allowed_hosts=["127.0.0.1:1"])
    assert [s.url for s in src.specs] == [f"{url}/shard-0.tar", f"{url}/127.0.0.1:1/x.tar", f"{url}/etc/passwd",
                                          "http://127.0.0.1:1/y.tar?sig=SECRET"]
