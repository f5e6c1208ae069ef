"""The shard cache (vlmstream/cache.py): what is verified when, what is a miss, what is cleaned, and that
processes sharing one cache folder never trip over each other."""

from __future__ import annotations

import gc
import hashlib
import multiprocessing as mp
import os
import random
import signal
import time
import traceback

import pytest

import vlmstream as vs
from servers import fault_server, no_sleep
from vlmstream.errors import FetchError
from vlmstream.io.cache import ShardCache
from vlmstream.io.http import FetchOptions
from vlmstream.dataset.format import ShardInfo, write_manifest
from vlmstream.dataset.writer import ShardWriter

SHARDS, PER_SHARD = 4, 6
SHAPES = ["circle", "triangle", "rectangle"]


def caption(i: int) -> bytes:
    return f"{chr(65 + i % 26)} {SHAPES[i % 3]}".encode()


def payload(i: int, size: int = 2000) -> bytes:
    return random.Random(i).randbytes(size)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """SHARDS shards of caption samples (``txt`` "C rectangle", a random ``bin``), with a manifest."""
    root = tmp_path_factory.mktemp("cache_corpus")
    w = ShardWriter(str(root), maxcount=PER_SHARD)
    for i in range(SHARDS * PER_SHARD):
        w.write(f"{i:06d}", [("txt", caption(i)), ("bin", payload(i))])
    infos = w.close()
    write_manifest(str(root / "index.json"), infos)
    expected = {f"{i:06d}": caption(i) for i in range(SHARDS * PER_SHARD)}
    return root, infos, expected


def opts() -> FetchOptions:
    return FetchOptions(sleep=no_sleep, retries=2)


def run_pass(spec, cache_dir, *, prefetch=1, on_error="raise", cache_bytes=1 << 30):
    """One pass of shards -> fetch(cache) -> tar_samples: ({key: caption}, the fetch stage)."""
    stage = vs.fetch(prefetch=prefetch, cache=str(cache_dir), cache_bytes=cache_bytes, options=opts(),
                     on_error=on_error)
    pipe = vs.Pipeline(vs.shards(spec, shuffle=False), stage, vs.tar_samples(on_error=on_error))
    return {s["__key__"]: s["txt"] for s in pipe}, stage


def failing_pass(spec, cache_dir, **kw) -> FetchError:
    """The FetchError of a pass that must fail, its traceback dropped: the stages' generators it holds (a
    read-ahead thread with them) are then collected, as in a run that moves on."""
    try:
        run_pass(spec, cache_dir, **kw)
    except FetchError as e:
        e.__traceback__ = None
        error = e
    else:
        pytest.fail("the pass raised no FetchError")
    gc.collect()
    return error


def specs(url: str, infos) -> dict[str, object]:
    return {"manifest": f"{url}/index.json", "no manifest": [f"{url}/{s.url}" for s in infos]}


def partials(folder) -> list[str]:
    return [n for n in os.listdir(folder) if ".part" in n]


# ------------------------------------------------------------------------------------------- integrity


@pytest.mark.parametrize("kind", ["manifest", "no manifest"])
def test_same_size_tampering_of_a_cached_shard_is_detected_and_the_shard_fetched_again(corpus, tmp_path, kind):
    # Found by the record's inode and mtime, with or without a manifest: the bytes are not hashed on open.
    root, infos, expected = corpus
    cache_dir = tmp_path / "c"
    with fault_server(str(root)) as (url, _):
        spec = specs(url, infos)[kind]
        assert run_pass(spec, cache_dir)[0] == expected
        path = ShardCache(str(cache_dir), 1 << 30).path(f"{url}/{infos[0].url}")
        with open(path, "rb") as f:
            data = f.read()
        at = data.index(b"C rectangle") + 1
        with open(path, "r+b") as f:  # in place: same size, same inode
            f.seek(at)
            f.write(b"X")
        assert os.path.getsize(path) == len(data)
        got, stage = run_pass(spec, cache_dir)
        assert got == expected  # "C rectangle", not "CXrectangle"
        assert stage.stats.requests == 1 and stage.stats.cache_hits == SHARDS - 1
        with open(path, "rb") as f:
            assert f.read() == data  # stored again, correct
        got, stage = run_pass(spec, cache_dir)
        assert got == expected and stage.stats.requests == 0 and stage.stats.cache_hits == SHARDS


@pytest.mark.parametrize("kind", ["manifest", "no manifest"])
def test_a_truncated_cached_shard_is_fetched_again_not_failed_every_epoch(corpus, tmp_path, kind):
    root, infos, expected = corpus
    cache_dir = tmp_path / "c"
    with fault_server(str(root)) as (url, _):
        spec = specs(url, infos)[kind]
        run_pass(spec, cache_dir)
        path = ShardCache(str(cache_dir), 1 << 30).path(f"{url}/{infos[2].url}")
        os.truncate(path, infos[2].bytes // 2)
        for epoch in range(2):
            got, stage = run_pass(spec, cache_dir)
            assert got == expected
            assert stage.stats.requests == (1 if epoch == 0 else 0)
        assert os.path.getsize(path) == infos[2].bytes


def test_prefetch_0_fills_the_cache_on_the_first_pass(corpus, tmp_path):
    # The tar reader reads the padding after the end-of-archive block, so the tee reaches the stream's end.
    root, infos, expected = corpus
    with fault_server(str(root)) as (url, plan):
        got, first = run_pass(f"{url}/index.json", tmp_path / "c", prefetch=0)
        assert got == expected and first.stats.requests == SHARDS
        got, second = run_pass(f"{url}/index.json", tmp_path / "c", prefetch=0)
    assert got == expected
    assert second.stats.requests == 0 and second.stats.cache_hits == SHARDS
    assert sorted(p for p, *_ in plan.log if p.endswith(".tar")) == [f"/{s.url}" for s in infos]  # each once


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_shard_not_matching_the_manifest_sha256_is_never_cached(corpus, tmp_path, prefetch):
    root, infos, expected = corpus
    cache_dir = tmp_path / "c"
    with fault_server(str(root)) as (url, _):
        # absolute shard URLs carrying a credential; shard 1's sha256 is not that of its bytes
        shards = [ShardInfo(f"{url}/{s.url}?token=SECRET", s.samples, s.bytes, "0" * 64 if k == 1 else s.sha256)
                  for k, s in enumerate(infos)]
        write_manifest(str(tmp_path / "index.json"), shards)
        spec = str(tmp_path / "index.json")
        error = failing_pass(spec, cache_dir, prefetch=prefetch)
        assert error.reason == "checksum"
        assert f"{infos[1].url}?token=***" in str(error) and "SECRET" not in str(error) and "sha256" in str(error)
        cache = ShardCache(str(cache_dir), 1 << 30)
        assert not os.path.exists(cache.path(shards[1].url)) and partials(cache_dir) == []

        got, stage = run_pass(spec, cache_dir, prefetch=prefetch, on_error="skip")
        assert stage.stats.skipped == {"checksum": 1}
        assert {k: v for k, v in expected.items() if int(k) // PER_SHARD != 1}.items() <= got.items()
        got, stage = run_pass(spec, cache_dir, prefetch=prefetch, on_error="skip")
        assert stage.stats.requests == 1 and stage.stats.cache_hits == SHARDS - 1  # the bad one, again
        assert not os.path.exists(cache.path(shards[1].url)) and partials(cache_dir) == []


# ------------------------------------------------------------------------------------------ concurrency


def _hammer(folder: str, items: list[dict], bound: int, passes: int, seed: int, errors) -> None:
    """Passes over the shards in random orders, reading each whole (checked) or abandoning it early."""
    rng = random.Random(seed)
    try:
        for p in range(passes):
            stage = vs.fetch(prefetch=p % 2, cache=folder, cache_bytes=bound, options=FetchOptions(chunk=16 << 10))
            check = {i["url"]: i["check"] for i in items}
            for item in stage(iter(rng.sample(items, len(items)))):
                with item.stream as f:
                    if rng.random() < 0.15:
                        f.read(5000)
                        continue
                    data = f.read()
                assert hashlib.sha256(data).hexdigest() == check[item.task.url], item.task.url
    except BaseException:
        errors.put(traceback.format_exc())
        errors.close()
        errors.join_thread()  # sent before the process ends
        os._exit(1)


def test_processes_sharing_one_cache_folder_under_a_tight_bound_raise_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    items = []
    for k in range(10):
        data = random.Random(k).randbytes(20_000 + 3_000 * k)
        (src / f"s{k}.tar").write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        items.append({"url": f"file://{src}/s{k}.tar", "check": sha, "bytes": len(data), "sha256": sha})
    bare = [{"url": i["url"], "check": i["check"]} for i in items]  # as without a manifest: nothing known
    folder = str(tmp_path / "c")
    bound = 80_000  # about 3 of the 10 shards
    ctx = mp.get_context("fork")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(folder, items if k % 2 else bare, bound, 40, k, errors))
             for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, found[0]
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert partials(folder) == []
    sizes = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".tar"))
    assert sizes <= bound


# ----------------------------------------------------------------------------------------------- partials


def _download_and_stall(folder: str, url: str, started) -> None:
    stage = vs.fetch(prefetch=0, cache=folder, options=FetchOptions(chunk=16 << 10))
    item = next(stage(iter([{"url": url}])))
    item.stream.read(200_000)
    started.set()
    time.sleep(120)  # killed before it ends


def test_a_killed_downloads_partial_file_counts_in_the_bound_and_is_removed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.tar").write_bytes(random.Random(0).randbytes(1_000_000))
    size = 100_000
    for k in range(4):
        (src / f"s{k}.tar").write_bytes(random.Random(k + 1).randbytes(size))
    folder = str(tmp_path / "c")
    ctx = mp.get_context("fork")
    started = ctx.Event()
    proc = ctx.Process(target=_download_and_stall, args=(folder, f"file://{src}/big.tar", started))
    proc.start()
    try:
        assert started.wait(60)
        [part] = partials(folder)
        part_size = os.path.getsize(os.path.join(folder, part))
        assert part_size >= 100_000
        # a download alive elsewhere: its partial file counts, so fewer whole shards fit
        bound = part_size + 2 * size + size // 2
        stage = vs.fetch(prefetch=0, cache=folder, cache_bytes=bound)
        for item in stage(iter([{"url": f"file://{src}/s{k}.tar"} for k in range(4)])):
            with item.stream as f:
                f.read()
        on_disk = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if ".meta" not in n)
        assert on_disk <= bound
        assert partials(folder) == [part]  # alive: kept
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    # another host's partial files: kept while fresh, removed once not written to for STALE_PARTIAL_S
    from vlmstream.io import cache as cache_module

    other = "0" * 8 if cache_module._HOST != "0" * 8 else "1" * 8
    fresh, old = (os.path.join(folder, f"{'a' * 64}.tar.part.{other}.{pid}.0") for pid in (1, 2))
    for p in (fresh, old):
        with open(p, "wb") as f:
            f.write(b"x" * 1000)
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    ShardCache(folder, bound)  # a new cache (a new run) cleans up on start
    assert partials(folder) == [os.path.basename(fresh)]
