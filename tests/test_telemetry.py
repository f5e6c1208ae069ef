"""Per-stage telemetry: exact counts on a known chain, merged over DataLoader workers, the bottleneck named,
stage stats surfaced, and the off switch."""

import time
from dataclasses import dataclass

import pytest

import vlmstream as vs
from vlmstream.dataset.format import write_manifest
from vlmstream.core.telemetry import Report, merge
from vlmstream.dataset.writer import ShardWriter

COUNTS = [7, 5, 9, 3]  # samples per shard


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("tele")
    infos, key, payload = [], 0, 0
    for i, n in enumerate(COUNTS):
        w = ShardWriter(str(root), prefix=f"s{i}", maxcount=10**6)
        for _ in range(n):
            txt, cls = f"sample {key}".encode(), str(key % 3).encode()
            w.write(f"{key:06d}", [("txt", txt), ("cls", cls)])
            payload += len(txt) + len(cls)
            key += 1
        infos += w.close()
    write_manifest(str(root / "index.json"), infos)
    return str(root / "index.json"), key, payload


def evens(it):
    for s in it:
        if int(s["__key__"]) % 2 == 0:
            yield s


@dataclass
class SkipStats:
    seen: int = 0
    skipped: int = 0


class skip_threes:
    """A stage with its own stats object, as the library's stages have (fetch.stats, tokenize.stats ...)."""

    def __init__(self):
        self.stats = SkipStats()

    def __call__(self, it):
        self.stats = SkipStats()
        for s in it:
            self.stats.seen += 1
            if s["cls"] == b"0":
                self.stats.skipped += 1
                continue
            yield s


def slow(it):
    for s in it:
        time.sleep(0.004)
        yield s


def chain(index, *more, telemetry=True):
    return vs.Pipeline(vs.shards(index, shuffle=False), vs.split_by_node(0, 1), vs.split_by_worker(),
                       vs.fetch(prefetch=0), vs.tar_samples(), *more, telemetry=telemetry)


def test_counts_in_and_out_per_stage_are_exact(ds):
    index, total, payload = ds
    pipe = chain(index, evens, vs.batch(4))
    out = list(pipe)
    r = pipe.stats()
    n_even = (total + 1) // 2
    assert [s.name for s in r.stages] == ["shards", "split_by_node", "split_by_worker", "fetch", "tar_samples",
                                          "evens", "batch"]
    assert [(s.items_in, s.items_out) for s in r.stages] == [
        (0, 4), (4, 4), (4, 4), (4, 4), (4, total), (total, n_even), (n_even, len(out))]
    assert len(out) == -(-n_even // 4)
    assert r.stage("tar_samples").bytes == payload and r.bytes == payload
    assert r.stage("fetch").stats["shards"] == 4  # the stage's own stats object, as numbers
    assert all(s.own_s >= 0 and s.wait_s >= 0 for s in r.stages)
    # own times add up to the time spent in the last stage's next(): nothing counted twice
    assert sum(s.own_s for s in r.stages) == pytest.approx(r.stages[-1].own_s + r.stages[-1].wait_s, rel=1e-6)
    assert r.slots == 1


def test_merged_across_two_workers_with_stage_stats_and_skips(ds):
    index, total, payload = ds
    loader = vs.Loader(chain(index, skip_threes(), vs.batch(3)), num_workers=2)
    batches = list(loader)
    assert all("__stats__" not in b and "__state__" not in b for b in batches)
    r = loader.stats()
    assert r.slots == 2
    kept = sum(len(b["__key__"]) for b in batches)
    threes = sum(1 for k in range(total) if k % 3 == 0)
    assert kept == total - threes
    assert r.stage("shards").items_out == 2 * len(COUNTS)  # each worker lists the epoch, then keeps its share
    assert r.stage("split_by_worker").items_out == len(COUNTS)
    assert r.stage("tar_samples").items_out == total and r.bytes == payload
    sk = r.stage("skip_threes")
    assert (sk.items_in, sk.items_out, sk.skipped) == (total, kept, threes)
    assert sk.stats == {"seen": total, "skipped": threes}  # summed over the workers
    assert r.stage("batch").items_out == len(batches)
    assert r.loader["batches"] == len(batches) and r.loader["first_batch_s"] > 0
    assert 0 <= r.loader["wait_s"] <= r.loader["wall_s"]
    assert f"{threes:,} skipped" in r.summary()
    # all_ranks without torch.distributed: this rank alone
    assert loader.stats(all_ranks=True).as_dict()["stages"] == r.as_dict()["stages"]


def test_the_bottleneck_is_named(ds):
    index, total, _ = ds
    loader = vs.Loader(chain(index, slow, vs.batch(4)), num_workers=2)
    list(loader)
    r = loader.stats()
    assert r.bottleneck().name == "slow"
    assert r.stage("slow").own_s >= 0.004 * total * 0.9
    line = r.summary()
    assert "bottleneck: slow" in line and "\n" not in line
    assert "slow" in r.table()


def test_telemetry_off(ds):
    index, total, _ = ds
    pipe = chain(index, vs.batch(4), telemetry=False)
    loader = vs.Loader(pipe, num_workers=2)
    assert sum(len(b["__key__"]) for b in loader) == total
    assert loader.stats().stages == [] and "no telemetry" in loader.stats().summary()
    assert pipe.with_stages(vs.take(1)).telemetry is False
    from vlmstream.core.loader import _Workers  # what each DataLoader worker runs: its batches go out bare

    got = list(_Workers(pipe, {}, None, None))
    assert got and all("__stats__" not in x for x in got)


def test_merge_keeps_settings_and_derives_fill():
    a = {"names": ["pack"], "stages": [[2, 1.0, 0, {"sequences": 2, "tokens": 150, "seq_len": 100}]],
         "wall_s": 1.0, "state_s": 0.0}
    b = {"names": ["pack"], "stages": [[1, 0.5, 0, {"sequences": 1, "tokens": 50, "seq_len": 100}]],
         "wall_s": 2.0, "state_s": 0.1}
    r = Report.from_raw(merge([a, b]))
    assert r.stages[0].stats == {"sequences": 3, "tokens": 200, "seq_len": 100, "fill": pytest.approx(200 / 300)}
    assert (r.slots, r.wall_s, r.stages[0].items_out) == (2, 2.0, 3)
    with pytest.raises(ValueError, match="different pipelines"):
        merge([a, {**b, "names": ["batch"]}])


def test_errors_skipped_by_a_library_stage_are_surfaced(tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    w = ShardWriter(str(tmp_path), maxcount=100)
    for i in range(6):
        w.write(f"{i:06d}", [("png", buf.getvalue() if i % 3 else b"not an image"), ("txt", b"x")])
    infos = w.close()
    write_manifest(str(tmp_path / "index.json"), infos)
    pipe = chain(str(tmp_path / "index.json"), vs.decode("uint8", on_error="skip"))
    assert len(list(pipe)) == 4
    r = pipe.stats()
    d = r.stage("decode")
    assert (d.items_in, d.items_out, d.skipped) == (6, 4, 2)
    assert d.stats["skipped"] == {"corrupt_image": 2} and "errors" not in d.stats  # numbers only, no messages
    assert "2 skipped" in r.summary()


def test_ranks_merge_sums_counts_and_keeps_the_longest_wall():
    def rank(items, wall, wait):
        return {"names": ["tar_samples", "batch"], "stages": [[items, 1.0, 10, None], [items // 2, 2.0, 0, None]],
                "wall_s": wall, "state_s": 0.0, "slots": 2,
                "loader": {"ranks": 1, "batches": items // 2, "wall_s": wall, "wait_s": wait, "first_batch_s": 0.5,
                           "workers": 2}}

    r = Report.from_raw(merge([rank(100, 10.0, 1.0), rank(60, 8.0, 4.0)]))
    assert (r.slots, r.stage("tar_samples").items_out, r.bytes, r.wall_s) == (4, 160, 20, 10.0)
    assert r.loader["ranks"] == 2 and r.loader["wall_s"] == 10.0 and r.loader["batches"] == 80
    assert "in 10.0 s" in r.summary() and "waited on data 28% of its time" in r.summary()  # 5 s of 18 s
