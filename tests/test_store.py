"""Object stores (vlmstream/io/store.py) against real emulators on loopback (tests/stores.py): moto's S3, Azurite,
fake-gcs-server. Shard lists, reading with every guarantee HTTP has (one GET per shard, faults retried and
resumed, exactly once over ranks and workers), resume by reference, the pack tool writing there, the YAML
streams form, and no credential anywhere in what is produced."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

import vlmstream as vs
from servers import Fault, FaultPlan
from stores import setenv, unique_key
from vlmstream.core.stage import Context
from vlmstream.dataset.format import write_manifest
from vlmstream.dataset.writer import ShardWriter
from vlmstream.errors import FetchError
from vlmstream.io.http import FetchOptions, HTTPClient
from vlmstream.io.store import DEFAULT_STORES, put_bytes
from vlmstream.io.urls import open_url

obstore = pytest.importorskip("obstore")

SHARDS, PER_SHARD = 12, 20


def payload(i: int) -> bytes:
    return random.Random(i).randbytes(800 + i % 1500)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Shards + manifest on local disk: what every store gets a copy of."""
    root = tmp_path_factory.mktemp("corpus")
    w = ShardWriter(str(root), maxcount=PER_SHARD)
    for i in range(SHARDS * PER_SHARD):
        w.write(f"{i:06d}", [("txt", payload(i)), ("json", json.dumps({"i": i}).encode())])
    write_manifest(str(root / "index.json"), w.close())
    return {name: (root / name).read_bytes() for name in os.listdir(root)}


def upload(server, corpus, prefix: str) -> tuple[str, str]:
    bucket = server.make_bucket()
    for name, data in corpus.items():
        server.put(bucket, f"{prefix}/{name}", data)
    return bucket, server.url(bucket, prefix)


def keys_of(loader) -> list[str]:
    return [k for b in loader for k in b["__key__"]]


def chain(spec, *, workers_rank=None, prefetch=2, **fetch_kw):
    return vs.Pipeline(vs.shards(spec, seed=3), vs.split_by_node(), vs.split_by_worker(),
                       vs.fetch(prefetch=prefetch, **fetch_kw), vs.tar_samples(), vs.batch(8),
                       **(workers_rank or {"rank": 0, "world_size": 1}))


ALL = Counter(f"{i:06d}" for i in range(SHARDS * PER_SHARD))


# -------------------------------------------------------------------------------------------- shard lists


def test_manifest_glob_and_brace_lists_in_a_bucket_cost_one_request_each(s3_server, corpus, monkeypatch):
    bucket, base = upload(s3_server, corpus, unique_key().strip("/"))
    with s3_server.proxy() as proxy:
        setenv(monkeypatch, proxy.env)
        for spec, requests in ((f"{base}/index.json", 1), (f"{base}/shard-*.tar", 1),
                               (f"{base}/shard-{{000000..000011}}.tar", 0)):
            mark = proxy.mark()
            specs = vs.shards(spec).specs
            assert [s.url for s in specs] == [f"{base}/shard-{k:06d}.tar" for k in range(SHARDS)], spec
            assert len(proxy.since(mark)) == requests, (spec, proxy.since(mark))
        assert vs.shards(f"{base}/index.json").specs[0].samples == PER_SHARD  # counts from the manifest
        assert vs.shards(f"{base}/shard-*.tar").specs[0].bytes == len(corpus["shard-000000.tar"])  # sizes listed


def test_the_ranks_of_a_machine_share_one_listing_of_a_bucket(s3_server, corpus, monkeypatch, tmp_path):
    bucket, base = upload(s3_server, corpus, unique_key().strip("/"))
    with s3_server.proxy() as proxy:
        setenv(monkeypatch, proxy.env)
        mark = proxy.mark()
        lists = [vs.shards(f"{base}/shard-*.tar", listing_cache=str(tmp_path)).specs for _rank in range(4)]
        assert len(proxy.since(mark)) == 1 and all(ls == lists[0] for ls in lists) and len(lists[0]) == SHARDS
        assert base.split("://")[1] not in " ".join(os.listdir(tmp_path))  # named by hash, never by the spec


def test_a_manifest_in_a_bucket_names_shards_in_its_bucket_only(s3_server, corpus, monkeypatch, tmp_path):
    setenv(monkeypatch, s3_server.env)
    bucket, base = upload(s3_server, corpus, unique_key().strip("/"))
    other = s3_server.make_bucket()
    doc = json.loads(corpus["index.json"])
    doc["shards"][0]["url"] = f"s3://{other}/stolen.tar"
    put_bytes(s3_server.url(bucket, "evil/index.json"), json.dumps(doc).encode(), DEFAULT_STORES)
    with pytest.raises(vs.FormatError, match="outside the manifest's origin"):
        vs.shards(s3_server.url(bucket, "evil/index.json"))
    doc["shards"][0]["url"] = "../../../etc/passwd"
    put_bytes(s3_server.url(bucket, "evil/index.json"), json.dumps(doc).encode(), DEFAULT_STORES)
    with pytest.raises(vs.FormatError, match="outside the manifest's origin"):
        vs.shards(s3_server.url(bucket, "evil/index.json"))
    doc["shards"][0]["url"] = f"s3://{other}/stolen.tar"
    put_bytes(s3_server.url(bucket, "evil/index.json"), json.dumps(doc).encode(), DEFAULT_STORES)
    allowed = vs.shards(s3_server.url(bucket, "evil/index.json"), allowed_hosts=[f"s3://{other}"], shuffle=False)
    assert allowed.specs[0].url == f"s3://{other}/stolen.tar" and len(allowed.specs) == SHARDS


# ------------------------------------------------------------------------------------------------ reading


def test_each_shard_is_one_get_and_every_sample_arrives_once_through_forkserver_workers(s3_server, corpus,
                                                                                        monkeypatch):
    bucket, base = upload(s3_server, corpus, unique_key().strip("/"))
    with s3_server.proxy() as proxy:
        setenv(monkeypatch, proxy.env)
        loader = vs.Loader(chain(f"{base}/index.json"), num_workers=2)
        assert loader.kwargs["multiprocessing_context"] == "forkserver"  # obstore's runtime does not survive fork
        mark = proxy.mark()
        assert Counter(keys_of(loader)) == ALL
        gets = proxy.counts("GET", since=mark)
        assert all(gets[s3_server.object_path(bucket, f"{base.split('/', 3)[3]}/shard-{k:06d}.tar")] == 1
                   for k in range(SHARDS)), gets
        assert sum(gets.values()) == SHARDS  # the list was resolved once, before the workers


def _faults(paths: list[str], seed: int = 0) -> tuple[dict, int]:
    rng = random.Random(seed)
    faults, n = {}, 0
    for k, path in enumerate(paths):
        kind = k % 6
        if kind == 0:
            faults[(path, 0)] = Fault(cut_at=rng.randrange(100, 8000))
            faults[(path, 1)] = Fault(cut_at=rng.randrange(100, 4000))
            n += 2
        elif kind == 1:
            for j in range(3):
                faults[(path, j)] = Fault(status=503)  # SlowDown
            n += 3
        elif kind == 2:
            faults[(path, 0)] = Fault(status=429, retry_after="0")
            faults[(path, 1)] = Fault(cut_at=rng.randrange(100, 8000))
            n += 2
        elif kind == 3:
            faults[(path, 0)] = Fault(stall=0.6)
            n += 1
        elif kind == 4:
            faults[(path, 0)] = Fault(short_by=rng.randrange(5000, 15000))  # inside the samples, not the tail
            n += 1
        else:
            faults[(path, 0)] = Fault(cut_at=rng.randrange(100, 8000))
            faults[(path, 1)] = Fault(ignore_range=True)
            n += 2
    return faults, n


def test_exactly_once_from_2_ranks_x_3_workers_through_20_faults(s3_server, corpus, monkeypatch):
    if getattr(s3_server, "real", False):
        pytest.skip("faults are injected by a proxy on loopback")
    bucket, base = upload(s3_server, corpus, unique_key().strip("/"))
    prefix = base.split("/", 3)[3]
    paths = [s3_server.object_path(bucket, f"{prefix}/shard-{k:06d}.tar") for k in range(SHARDS)]
    faults, injected = _faults(paths)
    assert injected >= 20
    opts = FetchOptions(read_timeout=0.3, retries=6, backoff=0.01, max_backoff=0.05)
    with s3_server.proxy(FaultPlan(dict(faults))) as proxy:
        setenv(monkeypatch, proxy.env)
        keys = []
        for rank in range(2):
            pipe = chain(f"{base}/index.json", workers_rank={"rank": rank, "world_size": 2}, options=opts)
            keys += keys_of(vs.Loader(pipe, num_workers=3))
        assert Counter(keys) == ALL  # every sample exactly once, whatever broke
        fired = [r for r in proxy.plan.log if r[0] in paths]
        by_path = Counter(path for path, _, _ in fired)
        for path in paths:  # one GET a shard, plus at most one for each fault it took: nothing read twice
            assert 1 <= by_path[path] <= 1 + sum(1 for (p, _) in faults if p == path), (path, by_path[path])
        assert sum(by_path.values()) >= SHARDS + 20  # the faults did fire


def test_a_broken_transfer_resumes_by_range_and_a_changed_object_is_an_error(s3_server, corpus, monkeypatch):
    bucket, base = upload(s3_server, corpus, unique_key().strip("/"))
    prefix = base.split("/", 3)[3]
    path = s3_server.object_path(bucket, f"{prefix}/shard-000001.tar")
    with s3_server.proxy(FaultPlan({(path, 0): Fault(cut_at=3000)})) as proxy:
        setenv(monkeypatch, proxy.env)
        with open_url(f"{base}/shard-000001.tar") as f:
            assert f.read() == corpus["shard-000001.tar"]
        assert [(start, status) for p, start, status in proxy.plan.log if p == path] == [(0, 200), (3000, 206)]
        with open_url(f"{base}/shard-000002.tar", buffer_size=0) as f:
            first = f.read(4096)
            put_bytes(f"{base}/shard-000002.tar", b"x" * len(corpus["shard-000002.tar"]), DEFAULT_STORES)
            f._drop()  # the connection breaks: the stream goes on with a Range request, which sees the new ETag
            with pytest.raises(FetchError, match="changed while it was read") as e:
                f.read()
        assert first == corpus["shard-000002.tar"][:4096] and e.value.reason == "changed"


def test_resume_by_reference_continues_exactly(s3_server, corpus, monkeypatch):
    setenv(monkeypatch, s3_server.env)
    bucket, base = upload(s3_server, corpus, unique_key().strip("/"))

    def make():
        return vs.Loader(vs.Pipeline(vs.shards(f"{base}/index.json", seed=2), vs.split_by_node(),
                                     vs.split_by_worker(), vs.fetch(), vs.tar_samples(), vs.shuffle(15, initial=5),
                                     vs.batch(4), rank=0, world_size=1), num_workers=2)

    full = keys_of(make())
    loader = make()
    it = iter(loader)
    head = [k for _ in range(9) for k in next(it)["__key__"]]
    state = json.loads(json.dumps(loader.state_dict()))
    it.close()
    assert all(u[1].startswith("s3://") for w in state["workers"].values() for u in w["stages"][5]["urls"])
    fresh = make()
    fresh.load_state_dict(state)
    assert head + keys_of(fresh) == full


def test_the_shard_cache_serves_a_store_s_shards_the_next_epoch(s3_server, corpus, monkeypatch, tmp_path):
    bucket, base = upload(s3_server, corpus, unique_key().strip("/"))
    with s3_server.proxy() as proxy:
        setenv(monkeypatch, proxy.env)
        pipe = chain(f"{base}/index.json", cache=str(tmp_path / "cache"))
        first = Counter(k for b in pipe.iterate(Context(epoch=0)) for k in b["__key__"])
        mark = proxy.mark()
        second = Counter(k for b in pipe.iterate(Context(epoch=1)) for k in b["__key__"])
        assert first == second == ALL
        assert proxy.counts("GET", since=mark).total() == 0 and pipe.stages[3].stats.cache_hits == SHARDS


@pytest.mark.parametrize("server", ["azure_server", "gcs_server"])
def test_azure_and_gcs_lists_and_reads(server, corpus, monkeypatch, request):
    srv = request.getfixturevalue(server)
    setenv(monkeypatch, srv.env)
    bucket, base = upload(srv, corpus, unique_key().strip("/"))
    for spec in (f"{base}/index.json", f"{base}/shard-*.tar"):
        pipe = chain(spec)
        assert Counter(s for b in pipe.iterate(Context()) for s in b["__key__"]) == ALL, spec


# -------------------------------------------------------------------------------------------------- secrets


def test_no_credential_in_errors_logs_stats_or_state(s3_server, corpus, monkeypatch, caplog):
    if getattr(s3_server, "real", False):
        pytest.skip("the secret is the emulator's")
    bucket, base = upload(s3_server, corpus, unique_key().strip("/"))
    secret = "s3cr3t-AbCdEf-0123456789"
    prefix = base.split("/", 3)[3]
    path = s3_server.object_path(bucket, f"{prefix}/shard-000003.tar")
    plan = FaultPlan({(path, n): Fault(status=503) for n in range(100)})
    with s3_server.proxy(plan) as proxy:
        setenv(monkeypatch, {**proxy.env, "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": "tok-" + secret})
        produced = []
        opts = FetchOptions(retries=2, backoff=0.01)
        pipe = vs.Pipeline(vs.shards(f"{base}/index.json", seed=1), vs.fetch(on_error="warn", options=opts),
                           vs.tar_samples(), vs.batch(8), rank=0, world_size=1)
        loader = vs.Loader(pipe, num_workers=0)
        with caplog.at_level(logging.DEBUG):
            it = iter(loader)
            produced.append(json.dumps(next(it)["__url__"]))
            produced.append(json.dumps(loader.state_dict()))
            produced += [json.dumps(b["__url__"]) for b in it]
        produced += [str(loader.stats().as_dict()), caplog.text, repr(pipe.stages[1].opts)]
        with pytest.raises(FetchError) as e:
            with open_url(f"{base}/shard-000003.tar", client=HTTPClient(opts)) as f:
                f.read()
        produced.append(str(e.value))
        signed = [r.query for r in proxy.log if "X-Amz-Signature" in r.query][0]
        signature = signed.split("X-Amz-Signature=")[1].split("&")[0]
        text = "\n".join(produced)
        assert "warn" in caplog.text.lower() or "skipped" in caplog.text  # the warn policy logged the shard
        assert secret not in text and signature not in text and "X-Amz-Credential=test" not in text


def test_without_obstore_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "obstore", None)
    with pytest.raises(ImportError, match=r"pip install 'vlmstream\[stores\]'"):
        vs.shards("s3://bucket/ds/shard-*.tar")


def test_a_worker_forked_after_the_store_was_used_says_so_instead_of_hanging(s3_server, corpus, monkeypatch):
    setenv(monkeypatch, s3_server.env)
    bucket, base = upload(s3_server, corpus, unique_key().strip("/"))
    code = f"""
import os, sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
import vlmstream as vs
from vlmstream.io.urls import open_url
vs.shards({base + '/index.json'!r})  # uses the store client in this process
pid = os.fork()
if pid == 0:
    try:
        open_url({base + '/shard-000000.tar'!r}).read()
        os._exit(3)
    except RuntimeError as e:
        os._exit(0 if "forkserver" in str(e) else 4)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# -------------------------------------------------------------------------------------------------- writing


def _stored(server, bucket: str, prefix: str) -> dict[str, bytes]:
    from vlmstream.io.store import list_objects, read_bytes

    base = server.url(bucket, prefix) + "/"
    return {url[len(base):]: read_bytes(url, DEFAULT_STORES) for url, _, _ in list_objects(base, DEFAULT_STORES)}


@pytest.mark.parametrize("server", ["s3_server", "azure_server"])
def test_a_pack_written_to_a_store_is_the_local_pack_and_streams_back(server, llava_json, tmp_path, monkeypatch,
                                                                    request):
    from conftest import run_pack, shard_bytes

    srv = request.getfixturevalue(server)
    setenv(monkeypatch, srv.env)
    bucket = srv.make_bucket()
    local = str(tmp_path / "local")
    assert run_pack(llava_json.inputs, local, "--maxcount", "7") == 0
    assert run_pack(llava_json.inputs, srv.url(bucket, "ds"), "--maxcount", "7") == 0
    assert _stored(srv, bucket, "ds") == shard_bytes(local)  # byte for byte, the manifest and rejects too
    pipe = vs.Pipeline(vs.shards(srv.url(bucket, "ds/index.json")), vs.fetch(), vs.tar_samples(), rank=0,
                       world_size=1)
    remote = {s["__key__"]: s["json"] for s in pipe.iterate(Context())}
    pipe = vs.Pipeline(vs.shards(f"{local}/index.json"), vs.fetch(), vs.tar_samples(), rank=0, world_size=1)
    assert remote == {s["__key__"]: s["json"] for s in pipe.iterate(Context())} and remote


def test_an_interrupted_pack_to_a_store_leaves_the_old_pack_whole_and_no_partial_object(s3_server, llava_json,
                                                                                        monkeypatch):
    from conftest import run_pack

    from vlmstream.dataset import output
    from vlmstream.dataset.writer import ShardWriter

    setenv(monkeypatch, s3_server.env)
    bucket = s3_server.make_bucket()
    url = s3_server.url(bucket, "ds")
    assert run_pack(llava_json.inputs, url, "--maxcount", "10") == 0
    old = _stored(s3_server, bucket, "ds")
    real, written = ShardWriter.write_encoded, []

    def failing(self, data):
        written.append(1)
        if len(written) == 40:  # a few shards are uploaded into the staging prefix by then
            raise OSError("the machine went away")
        real(self, data)

    monkeypatch.setattr(ShardWriter, "write_encoded", failing)
    monkeypatch.setattr(output.StoreStaging, "discard", lambda self: None)  # as if killed: nothing cleaned up
    assert run_pack(llava_json.inputs, url, "--maxcount", "7", "--overwrite") == 1
    now = _stored(s3_server, bucket, "ds")
    assert {k: v for k, v in now.items() if not k.startswith(".pack-staging-")} == old  # the old pack, whole
    assert any(k.startswith(".pack-staging-") for k in now)  # what the interrupted run had uploaded
    monkeypatch.undo()
    setenv(monkeypatch, s3_server.env)
    assert run_pack(llava_json.inputs, url, "--maxcount", "7", "--overwrite") == 0
    after = _stored(s3_server, bucket, "ds")
    assert not any(k.startswith(".pack-staging-") for k in after)  # the next run cleaned it
    doc = json.loads(after["index.json"])
    assert sorted(after) == sorted(["index.json", "rejects.jsonl", *(s["url"] for s in doc["shards"])])


def test_jobs_pack_into_a_store_and_merge_there(s3_server, llava_json, monkeypatch):
    from conftest import run_pack

    from vlmstream.cli.pack import main as pack_main

    setenv(monkeypatch, s3_server.env)
    bucket = s3_server.make_bucket()
    url = s3_server.url(bucket, "ds")
    for job in (0, 1):
        assert run_pack(llava_json.inputs, url, "--maxcount", "5", "--job-index", str(job), "--num-jobs", "2") == 0
    assert pack_main(["merge", f"{url}/index.j*.json", "--output", f"{url}/index.json"]) == 0
    pipe = vs.Pipeline(vs.shards(f"{url}/index.json"), vs.fetch(), vs.tar_samples(), rank=0, world_size=1)
    keys = [s["__key__"] for s in pipe.iterate(Context())]
    assert len(keys) == len(set(keys)) == len(llava_json.expected)


def test_the_foundry_form_of_streams_runs_against_the_store(s3_server, corpus, monkeypatch, tmp_path):
    setenv(monkeypatch, s3_server.env)
    bucket = s3_server.make_bucket()
    for split in ("train", "val"):
        for name, data in corpus.items():
            s3_server.put(bucket, f"vqa/{split}/{name}", data)
    cfg = {
        "streams": {
            "vqa": {"local": str(tmp_path / "cache"), "remote": s3_server.url(bucket, "vqa"), "repeat": 1.0,
                    "split": "train"},
            "again": {"remote": s3_server.url(bucket, "vqa"), "split": "val", "repeat": 0.5},
        },
        "pipeline": [{"batch": {"n": 8}}],
        "loader": {"num_workers": 2},
    }
    loader = vs.from_config(cfg)
    got = Counter((src, k) for b in loader for src, k in zip(b["__source__"], b["__key__"]))
    assert Counter(src for src, _ in got.elements()) == {"vqa": SHARDS * PER_SHARD, "again": SHARDS * PER_SHARD // 2}
    assert len({k for src, k in got if src == "vqa"}) == SHARDS * PER_SHARD  # repeat 1.0: each sample once
    assert len(os.listdir(tmp_path / "cache")) > 0  # `local`: the stream's cache folder


def test_inspect_reads_a_store(s3_server, corpus, monkeypatch, capsys):
    from vlmstream.cli.main import main

    setenv(monkeypatch, s3_server.env)
    bucket, base = upload(s3_server, corpus, unique_key().strip("/"))
    assert main(["inspect", f"{base}/index.json", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == SHARDS * PER_SHARD and out["checks"]["ok"] and out["checks"]["verified"]


def test_bench_reads_a_store(s3_server, llava_json, monkeypatch, tmp_path, capsys):
    from conftest import run_pack
    from vlmstream.cli.main import main

    setenv(monkeypatch, s3_server.env)
    bucket = s3_server.make_bucket()
    assert run_pack(llava_json.inputs, s3_server.url(bucket, "ds"), "--maxcount", "7") == 0
    out = tmp_path / "bench"
    assert main(["bench", s3_server.url(bucket, "ds/index.json"), "--out", str(out), "--workers", "1", "--batch", "4",
                 "--size", "32"]) == 0
    capsys.readouterr()
    res = json.loads((out / "bench.json").read_text())
    assert res["samples"] == len(llava_json.expected) == res["loader"]["samples"] > 0
    text_only = sum(1 for e in llava_json.expected if not e.images)
    assert res["stages"]["no_image"] == text_only > 0 and "samples have no image" in (out / "bench.md").read_text()
    assert s3_server.env.get("AWS_SECRET_ACCESS_KEY", "no-secret") not in (out / "bench.md").read_text()
