"""vlmstream.writer: deterministic tar shards, read back by tarfile, GNU tar and webdataset."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import subprocess
import tarfile

import pytest

from conftest import FullDisk, Vqa
from vlmstream.dataset.format import Conversation, ShardInfo, sample_key, sample_members, write_manifest
from vlmstream.dataset.writer import ShardWriter, closed_size, sample_bytes, tar_member


def _samples(vqa: Vqa, n: int = 20):
    """(key, members) of easy-VQA conversation samples."""
    out = []
    for k, i in enumerate(vqa.ids[:n]):
        q, a = vqa.qas[i][0]
        conv = Conversation([{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}],
                            ["0.png"], {"id": i})
        out.append((sample_key(k), sample_members(conv, [vqa.png[i]])))
    return out


def _write(folder, samples, **kw):
    with ShardWriter(str(folder), **kw) as w:
        for key, members in samples:
            w.write(key, members)
    return w.shards


def test_headers_are_fixed_and_blocks_aligned():
    data = tar_member("000000001.json", b"{}")
    assert len(data) == 1024
    info = tarfile.TarInfo.frombuf(data[:512], "utf-8", "surrogateescape")
    assert (info.name, info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname) == (
        "000000001.json", 2, 0, 0o644, 0, 0, "", "")
    assert data[:512][257:263] == b"ustar\x00"  # plain ustar: no pax header for a short ASCII name


def test_same_bytes_as_tarfile_writes(vqa, tmp_path):
    """Our headers are tarfile's own for the same fields, and the archive is padded the same way."""
    samples = _samples(vqa, 5)
    (info,) = _write(tmp_path, samples)
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.PAX_FORMAT) as t:
        for key, members in samples:
            for ext, data in members:
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
                t.addfile(ti, io.BytesIO(data))
    assert (tmp_path / info.url).read_bytes() == ref.getvalue()


def test_shards_split_by_count_and_are_described_exactly(vqa, tmp_path):
    shards = _write(tmp_path, _samples(vqa, 20), maxcount=6, prefix="vqa", job=2)
    assert [s.url for s in shards] == [f"vqa-j0002-{n:06d}.tar" for n in range(4)]
    assert [s.samples for s in shards] == [6, 6, 6, 2]
    for s in shards:
        data = (tmp_path / s.url).read_bytes()
        assert (s.bytes, s.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert len(data) % 10240 == 0
    assert sorted(os.listdir(tmp_path)) == [s.url for s in shards]  # no temporary file left, no empty shard


def test_maxsize_is_a_bound_on_the_file_size(vqa, tmp_path):
    samples = _samples(vqa, 20)
    one = len(sample_bytes(*samples[0]))
    maxsize = closed_size(4 * one) + 1
    shards = _write(tmp_path, samples, maxsize=maxsize)
    assert all(s.bytes <= maxsize for s in shards)
    assert sum(s.samples for s in shards) == 20 and len(shards) < 20
    # Each shard is full: one more sample would have pushed it past maxsize.
    sizes = [len(sample_bytes(*s)) for s in samples]
    start = 0
    for s in shards[:-1]:
        assert closed_size(sum(sizes[start:start + s.samples + 1])) > maxsize
        start += s.samples


def test_a_sample_larger_than_maxsize_is_written_alone(vqa, tmp_path):
    shards = _write(tmp_path, _samples(vqa, 3), maxsize=100)
    assert [s.samples for s in shards] == [1, 1, 1]


def test_nothing_written_means_no_shard(tmp_path):
    assert _write(tmp_path, []) == [] and os.listdir(tmp_path) == []


def test_two_writers_write_the_same_bytes(vqa, tmp_path):
    a = _write(tmp_path / "a", _samples(vqa), maxcount=7)
    b = _write(tmp_path / "b", _samples(vqa), maxcount=7)
    assert a == b


def test_webdataset_and_gnu_tar_read_it(vqa, tmp_path):
    import webdataset as wds

    samples = _samples(vqa, 12)
    shards = _write(tmp_path, samples, maxcount=5)
    urls = [str(tmp_path / s.url) for s in shards]
    read = list(wds.WebDataset(urls, shardshuffle=False))
    assert [(r["__key__"], r["json"], r["0.png"]) for r in read] == [(k, m[0][1], m[1][1]) for k, m in samples]
    listing = []
    for url in urls:
        listing += subprocess.run(["tar", "-tf", url], capture_output=True, text=True, check=True).stdout.split()
    assert listing == [f"{k}.{ext}" for k, m in samples for ext, _ in m]
    png = subprocess.run(["tar", "-xOf", urls[0], "000000001.0.png"], capture_output=True, check=True).stdout
    assert png == vqa.png[vqa.ids[1]]


def test_long_and_non_ascii_names_get_pax_headers(tmp_path):
    key = "dir/" + "x" * 120 + "-ключ"
    shards = _write(tmp_path, [(key, [("txt", b"hello")])])
    path = str(tmp_path / shards[0].url)
    with tarfile.open(path) as t:
        assert t.getnames() == [f"{key}.txt"]
    listed = subprocess.run(["tar", "-tf", path], capture_output=True, check=True).stdout.decode()
    assert listed == f"{key}.txt\n"


@pytest.mark.parametrize("key, members", [
    ("a.b", [("txt", b"")]), ("", [("txt", b"")]), ("k", []), ("k", [("txt", b""), ("txt", b"")]),
])
def test_bad_samples_are_refused(key, members, tmp_path):
    with pytest.raises(ValueError):
        with ShardWriter(str(tmp_path)) as w:
            w.write(key, members)


def test_an_error_drops_only_the_unfinished_shard(vqa, tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path), maxcount=4) as w:
            for key, members in _samples(vqa, 6):
                w.write(key, members)
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == ["shard-000000.tar"]
    assert [s.samples for s in w.shards] == [4]


def test_a_full_disk_leaves_no_temporary_file(vqa, tmp_path, monkeypatch):
    """Writing fails with ENOSPC midway through the second shard; closing the file then fails too (its buffer
    cannot be flushed), and the temporary file must still go: only the finished shard stays."""
    from vlmstream.dataset import writer

    samples = _samples(vqa, 8)
    one_shard = closed_size(sum(len(sample_bytes(*s)) for s in samples[:4]))
    monkeypatch.setattr(writer, "open", FullDisk(one_shard + 3000).open, raising=False)
    with pytest.raises(OSError) as e:
        _write(tmp_path, samples, maxcount=4)
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == ["shard-000000.tar"]


def test_write_manifest_on_a_full_disk_keeps_the_old_one(tmp_path, monkeypatch):
    from vlmstream.dataset import format as F

    path = str(tmp_path / "index.json")
    write_manifest(path, [ShardInfo("a.tar", 1, 10240, "0" * 64)])
    before = (tmp_path / "index.json").read_text()
    monkeypatch.setattr(F, "open", FullDisk(100).open, raising=False)
    with pytest.raises(OSError):
        write_manifest(path, [ShardInfo(f"{n}.tar", 1, 10240, "1" * 64) for n in range(10)])
    assert os.listdir(tmp_path) == ["index.json"]  # no index.json.tmpPID
    assert (tmp_path / "index.json").read_text() == before
