"""The streaming tar reader: same samples as webdataset on every layout, loud errors, provenance, speed-free."""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import subprocess
import tarfile

import pytest
import webdataset as wds
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from webdataset.tariterators import group_by_keys, tar_file_expander

from vlmstream.errors import TarError

from vlmstream.io.tar import iter_members, read_tar_samples, split_key

from vlmstream.stages.read import tar_samples

URL = "mem://shard.tar"
PROVENANCE = ("__offset__", "__index__")


# ----------------------------------------------------------------------------------------------- helpers


def ours(data: bytes, url: str = URL, stream=None) -> tuple[list[dict], Exception | None]:
    """Samples read before the first error, and that error (provenance keys dropped for comparison)."""
    out = []
    try:
        for s in read_tar_samples(stream or io.BytesIO(data), url):
            out.append({k: v for k, v in s.items() if k not in PROVENANCE})
    except Exception as e:  # noqa: BLE001 - the test compares who raises
        return out, e
    return out, None


def theirs(data: bytes, url: str = URL) -> tuple[list[dict], Exception | None]:
    """webdataset 1.0.2's tarfile_samples, minus url_opener (we hand it the stream)."""
    out = []
    try:
        for s in group_by_keys(tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])):
            out.append(s)
    except Exception as e:  # noqa: BLE001
        return out, e
    return out, None


def assert_same_as_webdataset(data: bytes, **kw) -> list[dict]:
    got, err = ours(data, **kw)
    want, want_err = theirs(data)
    assert got == want
    assert (err is None) == (want_err is None), (err, want_err)
    if err is not None:
        assert isinstance(err, TarError), err
    return got


def add(tf: tarfile.TarFile, name: str, data: bytes = b"", type: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = type, link, 1700000000
    if type in (tarfile.REGTYPE, tarfile.AREGTYPE) or data:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


def make_tar(members: list[tuple], format: int = tarfile.PAX_FORMAT, **kw) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format, **kw) as tf:
        for m in members:
            add(tf, *m)
    return buf.getvalue()


class Trickle:
    """A non-seekable stream that returns short reads of varying sizes, like a socket."""

    def __init__(self, data: bytes, step: int = 7):
        self.f, self.step, self.n = io.BytesIO(data), step, 0
        self.closed = False
        self.largest_read = 0

    def read(self, n: int = -1) -> bytes:
        self.largest_read = max(self.largest_read, n)
        self.n += 1
        if n is None or n < 0:
            return self.f.read()
        return self.f.read(min(n, 1 + (self.n * self.step) % 1000))

    def close(self) -> None:
        self.closed = True


def sample_members(n: int = 3, size: int = 700) -> list[tuple]:
    return [m for i in range(n) for m in ((f"s{i}.json", b'{"i": %d}' % i), (f"s{i}.jpg", bytes([i]) * size))]


# ----------------------------------------------------------------------------------- property: layouts

DIRS = st.sampled_from(["", "", "d/", "a/b/", "x.y/", "__meta__/", "A.B/c/", "é/", "n\nl/", "l" * 90 + "/"])
BASES = st.sampled_from(["k", "k", "k2", "K", "k.v", ".hid", "__k__", "__", "_", "a b", "n\nl", "q" * 60, "", "\udcffz"])
EXTS = st.sampled_from([None, "jpg", "JPG", "0.jpg", "0.JPG", "json", "tar.gz", "", "Txt", "__key__", "j/"])
DATA = st.one_of(st.just(b""), st.binary(max_size=40), st.sampled_from([b"x" * 511, b"y" * 512, b"z" * 513]))


@st.composite
def entries(draw):
    name = draw(DIRS) + draw(BASES) + ("" if (e := draw(EXTS)) is None else "." + e)
    kind = draw(st.sampled_from(["file"] * 6 + ["dir", "olddir", "symlink", "hardlink", "fifo"]))
    if kind == "file":
        return (name, draw(DATA))
    if kind == "dir":
        return (name, b"", tarfile.DIRTYPE)
    if kind == "olddir":  # V7: a regular-file type with a trailing slash means a directory
        return (name.rstrip("/") + "/", b"", tarfile.AREGTYPE)
    if kind == "fifo":
        return (name, b"", tarfile.FIFOTYPE)
    return (name, b"", tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE, "target.jpg")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.lists(entries(), max_size=12),
    format=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
    gz=st.booleans(),
    trickle=st.booleans(),
)
def test_grouping_matches_webdataset(layout, format, gz, trickle):
    try:
        data = make_tar(layout, format)
    except ValueError:  # ustar cannot hold this name
        assume(False)
    if gz:
        data = gzip.compress(data)
    want, want_err = theirs(data)
    got, err = ours(data, stream=Trickle(data) if trickle else None)
    if isinstance(err, TarError) and "appears again" in str(err):
        # A key seen earlier in the shard: webdataset makes a second sample with it (half of each); we refuse it,
        # keeping every sample before it.
        assert got == want[: len(got)]
        if len(want) > len(got):
            assert want[len(got)]["__key__"] in {s["__key__"] for s in got}
        else:  # webdataset raised inside that very sample (a duplicate extension in it)
            assert want_err is not None
        return
    assert got == want
    assert (err is None) == (want_err is None), (err, want_err)
    if err is not None:
        assert isinstance(err, TarError) and re.search("duplicate|reserved", str(err))


@settings(max_examples=500)
@given(st.text(alphabet="ab./_\nA\u00e9", max_size=12))
def test_split_key_is_webdatasets_regex(name):
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    assert split_key(name) == (m.groups() if m else None)


# ----------------------------------------------------------------------------------------- writers


def test_webdataset_tarwriter_and_shardwriter(tmp_path):
    samples = [
        {"__key__": f"dir/k{i:03d}", "jpg": os.urandom(100 + 300 * i), "json": {"i": i}, "txt": "caption " * i}
        for i in range(12)
    ]
    with wds.TarWriter(str(tmp_path / "one.tar")) as w:
        for s in samples:
            w.write(s)
    with wds.ShardWriter(str(tmp_path / "sh-%03d.tar"), maxcount=5) as w:
        for s in samples:
            w.write(s)
    paths = [tmp_path / "one.tar"] + sorted(tmp_path.glob("sh-*.tar"))
    assert len(paths) == 4
    for p in paths:
        got = assert_same_as_webdataset(p.read_bytes())
        assert got and all(s["jpg"] == samples[int(s["__key__"][-3:])]["jpg"] for s in got)
    # the stage over all shards equals webdataset's own pipeline over the same urls
    stage = tar_samples()
    got = [{k: v for k, v in s.items() if k not in PROVENANCE}
           for s in stage({"url": str(p), "stream": open(p, "rb")} for p in paths)]
    assert got == list(wds.tarfile_to_samples()([{"url": str(p)} for p in paths]))


def _tree(root) -> list[str]:
    """Files and directories with long names, dots in directories, a symlink and a meta folder."""
    long_dir = "d" * 70 + "/" + "e" * 60
    files = {
        "s/0001.jpg": b"j" * 700, "s/0001.json": b"{}", "s/0002.JPG": b"J" * 10, "s/0002.txt": b"",
        f"{long_dir}/0003.jpg": b"long" * 200, f"{long_dir}/0003.txt": b"t",
        f"{long_dir}/{'k' * 110}.txt": b"very long", "v.1/x.y.z": b"dots", "__meta__/info.json": b"{}",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "s/0001.link").symlink_to("0001.jpg")
    (root / "empty.dir").mkdir()
    return sorted(os.listdir(root))


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar", "oldgnu"])
@pytest.mark.parametrize("gz", [False, True])
def test_gnu_tar_shards(tmp_path, fmt, gz):
    src = tmp_path / "src"
    src.mkdir()
    top = _tree(src)
    out = tmp_path / ("x.tar.gz" if gz else "x.tar")
    cmd = ["tar", "--sort=name", f"--format={fmt}", "-C", str(src), "-czf" if gz else "-cf", str(out), *top]
    if fmt == "ustar":  # ustar cannot hold the 110-character file name: leave it out
        cmd.insert(1, "--exclude=" + "k" * 110 + ".txt")
    subprocess.run(cmd, check=True, capture_output=True)
    got = assert_same_as_webdataset(out.read_bytes())
    long_dir = "d" * 70 + "/" + "e" * 60
    keys = [s["__key__"] for s in got]
    assert {"s/0001", "s/0002", f"{long_dir}/0003", "v.1/x"} <= set(keys)
    assert (f"{long_dir}/{'k' * 110}" in keys) == (fmt != "ustar")


def test_tarfile_gzip_and_multi_member_gzip():
    plain = make_tar(sample_members(4))
    want = assert_same_as_webdataset(plain)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for m in sample_members(4):
            add(tf, *m)
    assert assert_same_as_webdataset(buf.getvalue()) == want
    cut = 3000  # two gzip members (bgzip-style): tarfile cannot read this, we can
    assert ours(gzip.compress(plain[:cut]) + gzip.compress(plain[cut:]))[0] == want


# ---------------------------------------------------------------------------------------- odd headers


def _rechecksum(block: bytearray, signed: bool = False) -> None:
    block[148:156] = b" " * 8
    total = sum(b - 256 if signed and b > 127 else b for b in block)
    block[148:156] = b"%06o\0 " % total


def test_base256_size_and_signed_checksum():
    data = bytearray(make_tar([("a.txt", b"hello"), ("\xe9.txt", b"x")], format=tarfile.GNU_FORMAT))
    first = bytearray(data[:512])
    first[124:136] = b"\x80" + (5).to_bytes(11, "big")  # GNU base-256 size
    _rechecksum(first)
    second = bytearray(data[1024:1536])  # a non-ASCII name: signed and unsigned sums differ
    _rechecksum(second, signed=True)
    data[:512], data[1024:1536] = first, second
    got = assert_same_as_webdataset(bytes(data))
    assert got == [{"__key__": "a", "__url__": URL, "txt": b"hello"}, {"__key__": "\xe9", "__url__": URL, "txt": b"x"}]


def test_pax_size_overrides_header_size():
    info = tarfile.TarInfo("big.bin")
    info.size, info.pax_headers = 700, {"size": "700", "path": "p/q.bin"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info, io.BytesIO(b"v" * 700))
        add(tf, "after.txt", b"a")
    data = bytearray(buf.getvalue())
    member = bytearray(data[1024:1536])  # the ustar header after the pax header and its data block
    member[124:136] = b"%011o\0" % 0
    _rechecksum(member)
    data[1024:1536] = member
    got = assert_same_as_webdataset(bytes(data))
    assert [s["__key__"] for s in got] == ["p/q", "after"] and got[0]["bin"] == b"v" * 700


def test_pax_global_header_and_unknown_member_type():
    members = [("a.txt", b"1"), ("vol.hdr", b"data of an unknown type" * 30, b"Z"), ("b.txt", b"2")]
    data = make_tar(members, format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"})
    got = assert_same_as_webdataset(data)
    assert [s["__key__"] for s in got] == ["a", "b"]
    renamed = make_tar(members[:1], format=tarfile.PAX_FORMAT, pax_headers={"path": "g.json"})
    assert assert_same_as_webdataset(renamed)[0]["__key__"] == "g"  # tarfile applies a global path: so do we
    members_offsets = [o for _, _, o in iter_members(io.BytesIO(data), URL)]
    assert members_offsets == [m.offset for m in tarfile.open(fileobj=io.BytesIO(data)) if m.isreg()]


def test_end_of_archive_only_and_empty_file():
    assert ours(bytes(10240)) == ([], None)
    with pytest.raises(TarError, match=r"mem://shard.tar: offset 0: empty file"):
        list(read_tar_samples(io.BytesIO(b""), URL))


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture
def shard():
    data = make_tar(sample_members(3), format=tarfile.USTAR_FORMAT)
    infos = list(tarfile.open(fileobj=io.BytesIO(data)))
    return data, infos


def test_truncated_in_header(shard):
    data, infos = shard
    at = infos[4].offset
    with pytest.raises(TarError, match=rf"^{URL}: offset {at}: truncated header"):
        list(read_tar_samples(io.BytesIO(data[: at + 100]), URL))
    got, err = ours(data[: at + 100])
    assert [s["__key__"] for s in got] == ["s0"] and err is not None  # samples before the cut are kept


def test_truncated_in_data(shard):
    data, infos = shard
    at = infos[3].offset
    with pytest.raises(TarError, match=rf"^{URL}: offset {at}: truncated member 's1.jpg' \(10 of 700 bytes\)"):
        list(read_tar_samples(io.BytesIO(data[: infos[3].offset_data + 10]), URL))


def test_truncated_at_member_boundary_and_in_padding(shard):
    data, infos = shard
    with pytest.raises(TarError, match=rf"offset {infos[2].offset}: stream ends without the end-of-archive"):
        list(read_tar_samples(io.BytesIO(data[: infos[2].offset]), URL))
    with pytest.raises(TarError, match="end-of-archive"):
        list(read_tar_samples(io.BytesIO(data[: infos[1].offset_data + 700 + 5]), URL))


def test_garbage_in_header(shard):
    data, infos = shard
    at = infos[2].offset
    bad = bytearray(data)
    bad[at + 10 : at + 30] = b"\xffgarbage\x00" * 2 + b"\x01\x02"
    # tarfile (so webdataset) stops here silently after sample s0; we refuse to lose the rest of the shard
    with pytest.raises(TarError, match=rf"^{URL}: offset {at}: bad header checksum"):
        list(read_tar_samples(io.BytesIO(bytes(bad)), URL))


def test_corrupt_and_truncated_gzip(shard):
    data, _ = shard
    gz = gzip.compress(data)
    with pytest.raises(TarError, match=rf"^{URL}: offset \d+: corrupt or truncated gzip"):
        list(read_tar_samples(io.BytesIO(gz[: len(gz) // 2]), URL))
    bad = bytearray(gz)
    bad[len(gz) // 2 : len(gz) // 2 + 8] = b"\x00garbage"
    with pytest.raises(TarError, match=URL):
        list(read_tar_samples(io.BytesIO(bytes(bad)), URL))


def test_other_compressions_are_named():
    import bz2

    for size in (1, 100):  # shorter and longer than one block
        with pytest.raises(TarError, match="bzip2"):
            list(read_tar_samples(io.BytesIO(bz2.compress(make_tar(sample_members(size)))), URL))


def test_duplicate_extension_names_key():
    data = make_tar([("dir/k.jpg", b"1"), ("dir/k.JPG", b"2")])
    with pytest.raises(TarError, match=r"offset 1024: key 'dir/k': extension 'jpg' is a duplicate"):
        list(read_tar_samples(io.BytesIO(data), URL))
    assert_same_as_webdataset(data)  # webdataset raises too


@pytest.mark.parametrize("ext", ["__key__", "__url__", "__offset__", "__index__", "__bad__"])
def test_reserved_extensions_raise(ext):
    data = make_tar([("k.jpg", b"1"), (f"k.{ext}", b"2")])
    with pytest.raises(TarError, match=f"key 'k': extension '{ext}' is a reserved name"):
        list(read_tar_samples(io.BytesIO(data), URL))


def test_max_member_bytes():
    data = make_tar([("a.txt", b"small"), ("b.jpg", b"x" * 5000)])
    stream = Trickle(data, step=4096)
    with pytest.raises(TarError, match=r"offset 1024: key 'b': member 'b.jpg' is 5000 bytes, over max_member_bytes=4096"):
        list(read_tar_samples(stream, URL, max_member_bytes=4096))
    assert stream.largest_read < 5000  # refused before reading it
    assert len(list(read_tar_samples(io.BytesIO(data), URL, max_member_bytes=5000))) == 2


# ------------------------------------------------------------------------------------------ provenance


@pytest.mark.parametrize("format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_offset_seeks_to_the_samples_first_header(format):
    names = [("d/" + "x" * 120 + f"{i}.json", b"{}") for i in range(3)] + sample_members(3)
    if format == tarfile.USTAR_FORMAT:
        names = sample_members(3)
    data = make_tar([("dir/", b"", tarfile.DIRTYPE), ("__meta__", b"m")] + names, format=format)
    f = io.BytesIO(data)
    samples = list(read_tar_samples(f, URL))
    assert [s["__index__"] for s in samples] == list(range(len(samples)))
    for s in samples:
        f.seek(s["__offset__"])
        name, _, offset = next(iter_members(f, URL))
        assert offset == 0 and split_key(name)[0] == s["__key__"]
    long = [s for s in samples if len(s["__key__"]) > 100]
    assert len(long) == (0 if format == tarfile.USTAR_FORMAT else 3)


def test_errors_after_a_resume_name_offsets_from_the_shards_start():
    data = bytearray(make_tar(sample_members(6)))
    samples = list(read_tar_samples(io.BytesIO(bytes(data)), URL))
    start, bad = samples[2], samples[4]["__offset__"]
    data[bad + 10] ^= 0xFF  # a bad header checksum at an offset counted from the start
    stream = io.BytesIO(bytes(data))
    stream.seek(start["__offset__"])
    item = {"url": URL, "stream": stream, "start_offset": start["__offset__"], "start_index": start["__index__"]}
    got = []
    with pytest.raises(TarError, match=f"offset {bad}: bad header checksum"):
        for s in tar_samples().read(item):
            got.append(s["__key__"])
    assert got == [samples[2]["__key__"]]  # sample 3 might have had more members: open at the break


def test_offset_is_in_the_uncompressed_stream():
    data = make_tar(sample_members(3))
    samples = list(read_tar_samples(io.BytesIO(gzip.compress(data)), URL))
    assert [s["__offset__"] for s in samples] == [s["__offset__"] for s in read_tar_samples(io.BytesIO(data), URL)]


# ------------------------------------------------------------------------------------------------ stage


def test_stage_closes_streams():
    data = make_tar(sample_members(3))
    streams = [Trickle(data) for _ in range(3)]
    out = list(tar_samples()({"url": f"u{i}", "stream": s} for i, s in enumerate(streams)))
    assert len(out) == 9 and [s["__url__"] for s in out[::3]] == ["u0", "u1", "u2"]
    assert all(s.closed for s in streams)

    early = Trickle(data)
    it = tar_samples()(iter([{"url": "u", "stream": early}]))
    next(it)
    it.close()
    assert early.closed

    broken = Trickle(data[:1000])
    with pytest.raises(TarError):
        list(tar_samples()([{"url": "u", "stream": broken}]))
    assert broken.closed


def test_stage_needs_a_stream():
    with pytest.raises(TarError, match="fetch"):
        list(tar_samples()([{"url": "u"}]))


def test_stage_applies_the_split_stages_sample_slice():
    data = make_tar(sample_members(5))
    items = [{"url": "u", "stream": io.BytesIO(data), "sample_offset": 1, "sample_step": 2}]
    assert [s["__index__"] for s in tar_samples()(iter(items))] == [1, 3]


def test_samples_never_span_shards(tmp_path):
    (tmp_path / "a.tar").write_bytes(make_tar([("k.jpg", b"1")]))
    (tmp_path / "b.tar").write_bytes(make_tar([("k.txt", b"2")]))
    paths = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    got = [{k: v for k, v in s.items() if k not in PROVENANCE}
           for s in tar_samples()({"url": p, "stream": open(p, "rb")} for p in paths)]
    assert got == list(wds.tarfile_to_samples()([{"url": p} for p in paths]))
    assert [s["__key__"] for s in got] == ["k", "k"]


# ------------------------------------------------------------------------- property: broken shards


def _shard(n: int, sizes: list[int]) -> tuple[bytes, list[dict]]:
    members = [m for i in range(n) for m in ((f"k{i:03d}.json", b'{"i": %d}' % i), (f"k{i:03d}.jpg", bytes([i]) * sizes[i % len(sizes)]))]
    data = make_tar(members, format=tarfile.USTAR_FORMAT)
    return data, ours(data)[0]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 8), sizes=st.lists(st.integers(0, 1500), min_size=1, max_size=4), cut=st.floats(0, 1),
       gz=st.booleans(), trickle=st.booleans())
def test_a_truncated_shard_yields_a_prefix_then_errors_or_skips(n, sizes, cut, gz, trickle):
    """Wherever a shard is cut, what comes out is an exact prefix of its samples, then a TarError (raise) or a
    count of the samples lost (skip): never a partial or altered sample, never another exception."""
    data, full = _shard(n, sizes)
    if gz:
        data = gzip.compress(data)
    cut = int(len(data) * cut)
    part = data[:cut]
    got, err = ours(part, stream=Trickle(part) if trickle else None)
    assert got == full[: len(got)]
    assert err is None or isinstance(err, TarError), err
    if err is None:
        assert got == full  # only the archive's zero padding was cut
    stage = tar_samples(on_error="skip")
    item = {"url": URL, "stream": Trickle(part) if trickle else io.BytesIO(part), "samples": n}
    skipped = [{k: v for k, v in s.items() if k not in PROVENANCE} for s in stage([item])]
    assert skipped == got
    assert stage.stats.samples_lost == n - len(got)
    assert sum(stage.stats.skipped.values()) == (err is not None)
    if err is not None:
        assert set(stage.stats.skipped) <= {"truncated", "bad_header"}, stage.stats.skipped


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 6), at=st.floats(0, 1), garbage=st.binary(min_size=1, max_size=64))
def test_garbage_anywhere_never_raises_anything_but_a_tar_error(n, at, garbage):
    """Bytes overwritten anywhere: raise mode raises only TarError; skip mode never raises, counts what it
    skipped, and yields each index at most once, in order."""
    data, full = _shard(n, [700])
    pos = int((len(data) - 1) * at)
    bad = data[:pos] + garbage + data[pos + len(garbage):]
    got, err = ours(bad[: len(data)])
    assert err is None or isinstance(err, TarError), repr(err)
    stage = tar_samples(on_error="skip", max_member_bytes=1 << 20)
    out = list(stage([{"url": URL, "stream": io.BytesIO(bad[: len(data)]), "samples": n}]))
    indexes = [s["__index__"] for s in out]
    assert indexes == sorted(set(indexes))
    assert (sum(stage.stats.skipped.values()) > 0) or err is None
