"""decode: only what is asked, any image mode to RGB, EXIF orientation, draft JPEG decoding, clear errors."""

import gc
import gzip
import io
import json
import pickle
import sys
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

import vlmstream as vs
from vlmstream.io.tar import read_tar_samples
from vlmstream.stages.decode import open_image, pixels, to_uint8


def jpeg(arr, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo():
    return skdata.astronaut()  # 512x512 RGB


def test_only_what_is_asked_is_decoded(photo):
    s = {"__key__": "k", "0.jpg": jpeg(photo), "json": b'{"a": 1}', "txt": b"hi", "cls": b"3"}
    out = vs.decode(image=None, json=True, txt=False, others=False).decode_sample(s)
    assert out["0.jpg"] == s["0.jpg"] and out["json"] == {"a": 1} and out["txt"] == b"hi" and out["cls"] == b"3"
    assert vs.decode(image=None).decode_sample(s)["cls"] == 3  # others=True by default, as webdataset's decode
    out = vs.decode("uint8").decode_sample(s)
    assert out["0.jpg"].dtype == torch.uint8 and out["0.jpg"].shape == (3, 512, 512) and out["txt"] == "hi"
    f = vs.decode("float").decode_sample(s)["0.jpg"]
    assert f.dtype == torch.float32 and 0 <= f.min() and f.max() <= 1
    assert isinstance(vs.decode("pil").decode_sample(s)["0.jpg"], Image.Image)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_any_mode_becomes_rgb(photo, mode):
    im = Image.fromarray(photo)
    if mode == "I;16":
        im = Image.fromarray((np.asarray(im.convert("L"), dtype=np.uint16) * 257))
    else:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, "TIFF" if mode in ("CMYK", "I;16") else "PNG")
    out = open_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (512, 512)
    if mode == "I;16":  # 16-bit scaled down, not clipped
        assert abs(np.asarray(out).mean() - np.asarray(Image.fromarray(photo).convert("L")).mean()) < 2


def test_exif_orientation_is_applied():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im = open_image(jpeg(arr, exif=exif.tobytes()))
    assert im.size == (40, 80)
    top = np.asarray(im)[:40].mean()
    assert top > 200  # the white left half is now on top


def test_draft_decoding_matches_full_decoding_up_to_resampling_noise(photo):
    big = np.asarray(Image.fromarray(photo).resize((640, 480)))
    data = jpeg(big)
    fast = vs.Resize(224)(open_image(data, draft=(224, 224))).float()
    full = vs.Resize(224, draft=False)(open_image(data)).float()
    assert fast.shape == full.shape == (3, 224, 224)
    assert (fast - full).abs().mean() < 4  # out of 255
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (224, 224))
    assert im.size == (320, 240)  # libjpeg scaled by 1/2 while decoding


def test_errors_name_shard_key_and_member(photo):
    s = {"__key__": "000042", "__url__": "http://h/s-000003.tar", "0.jpg": jpeg(photo)[:500], "json": b"{"}
    with pytest.raises(vs.DecodeError, match=r"s-000003.tar: sample '000042' member '0.jpg'"):
        vs.decode().decode_sample(s)
    with pytest.raises(vs.DecodeError, match=r"member 'json': JSONDecodeError"):
        vs.decode(image=None).decode_sample(s)


def png_claiming(width, height):
    """A tiny PNG whose header claims another size (IHDR patched, CRC fixed)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    b[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    b[29:33] = zlib.crc32(bytes(b[12:29])).to_bytes(4, "big")
    return bytes(b)


@pytest.mark.parametrize("side,limit", [(100_000, None), (100_000, 10**12), (5000, 10**6)])
def test_decompression_bomb_is_refused_before_decoding(side, limit):
    kw = {} if limit is None else {"max_pixels": limit}
    with pytest.raises(vs.DecodeError, match="exceeds the limit"):
        vs.decode(**kw).decode_sample({"__key__": "b", "png": png_claiming(side, side)})


def test_tensor_images_come_from_pillows_memory_equal_to_a_numpy_copy(photo, monkeypatch):
    decode_module = sys.modules["vlmstream.stages.decode"]
    assert decode_module._ARROW  # the pinned Pillow and pyarrow export pixels without a copy: that path is tested
    im = Image.fromarray(photo)
    want = torch.from_numpy(photo).permute(2, 0, 1)
    got = to_uint8(im)
    assert got.shape == (3, 512, 512) and torch.equal(got, want)
    fast = vs.Resize(224)(im)
    wide = Image.new("RGB", (2048, Image.core.get_block_size() // (2048 * 4) + 2), (9, 8, 7))  # in two blocks
    monkeypatch.setattr(decode_module, "_ARROW", False)
    assert torch.equal(vs.Resize(224)(im), fast)  # the numpy copy resizes to the same pixels
    monkeypatch.undo()
    with pytest.raises(ValueError):
        decode_module._arrow_pixels(wide)
    assert torch.equal(pixels(wide)[0, :3], torch.from_numpy(np.asarray(wide)).permute(2, 0, 1))  # numpy fallback


def test_resized_images_are_views_that_the_batch_lays_out_planar(photo):
    images = [vs.Resize(32)(Image.fromarray(np.roll(photo, k, axis=1))) for k in range(3)]
    assert not images[0].is_contiguous()  # channel-interleaved, as the resize wrote it
    b = vs.batch(3).collate([{"img": x} for x in images])["img"]
    assert b.is_contiguous() and torch.equal(b, torch.stack([x.contiguous() for x in images]))


# ---------------------------------------------------------------------------------- members as webdataset has them


def png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def npz(**arrays):
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def torch_saved(x):
    buf = io.BytesIO()
    torch.save(x, buf)
    return buf.getvalue()


def tar_of(path, key, members):
    """One sample's members, written as a shard at path (`members`: extension -> bytes)."""
    with tarfile.open(path, "w") as tf:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def same(a, b):
    """Equal values of equal types: arrays by dtype, shape and content, images by mode, size and pixels."""
    if isinstance(a, Image.Image) and isinstance(b, Image.Image):  # a JpegImageFile or an Image.Image
        return (a.mode, a.size) == (b.mode, b.size) and a.tobytes() == b.tobytes()
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def ours_of(path, **kw):
    """The members of the shard's one sample as our tar reader and vs.decode("pil") give them."""
    with open(path, "rb") as f:
        (raw,) = list(read_tar_samples(f, path))
    return {k: v for k, v in vs.decode("pil", **kw).decode_sample(raw).items() if not k.startswith("__")}


def both_decoders(path, **kw):
    """The shard's one sample: our members (`ours_of`) and the sample webdataset's decode("pil") gives."""
    import webdataset as wds

    (theirs,) = list(wds.WebDataset(path, shardshuffle=False, empty_check=False).decode("pil"))
    return ours_of(path, **kw), theirs


def test_every_member_kind_decodes_as_webdatasets_decoder(tmp_path, photo):
    from webdataset import tenbin

    grid, labels = np.arange(12, dtype=np.float32).reshape(3, 4), np.array([3, 1, 2], np.int64)
    members = {
        "txt": "a caption".encode(), "text": "日本語".encode(), "transcript": b"hello\n",
        "json": b'{"a": [1, 2]}', "jsn": b"[true, null]",
        "cls": b"7", "cls2": b" 12\n", "index": b"3", "inx": b"4", "id": b"123456789",
        "npy": npy(grid), "npz": npz(grid=grid, labels=labels), "ten": bytes(tenbin.encode_buffer([grid, labels])),
        "tb": bytes(tenbin.encode_buffer([np.zeros((2, 0, 3), np.uint8), np.float16([1.5])])),
        "txt.gz": gzip.compress("gzipped 文字".encode()), "json.gz": gzip.compress(b'{"b": 2}'),
        "cls.gz": gzip.compress(b"5"), "npy.gz": gzip.compress(npy(labels)), "jpg.gz": gzip.compress(jpeg(photo)),
        "bin.gz": gzip.compress(b"\x00\x01"), "gz": gzip.compress(b"bare") + gzip.compress(b" and two members"),
        "png": png(photo[:64, :48]), "weird": b"as is",
    }
    ours, theirs = both_decoders(tar_of(tmp_path / "kinds.tar", "s", members))
    assert ours.keys() == {k for k in theirs if not k.startswith("__")} == set(members)
    for k in members:
        assert same(ours[k], theirs[k]), k
    assert ours["txt.gz"] == "gzipped 文字" and ours["gz"] == b"bare and two members"  # webdataset's keys, unzipped
    assert ours["cls"] == 7 and isinstance(ours["npz"], dict) and ours["ten"][0].dtype == np.float32


def test_pickled_members_are_where_we_deliberately_differ_from_webdataset(tmp_path):
    obj, tensor = {"a": [1, 2]}, torch.arange(4)
    members = {"pyd": pickle.dumps(obj), "pickle": pickle.dumps(obj), "pkl": pickle.dumps(obj),
               "pth": torch_saved(tensor), "pyd.gz": gzip.compress(pickle.dumps(obj))}
    path = tar_of(tmp_path / "pickles.tar", "s", members)
    ours, theirs = both_decoders(path)
    assert theirs["pyd"] == theirs["pickle"] == theirs["pkl"] == theirs["pyd.gz"] == obj
    assert torch.equal(theirs["pth"], tensor)
    assert ours == {**members, "pyd.gz": pickle.dumps(obj)}  # never unpickled: bytes (a .gz one unzipped)
    unsafe, theirs = both_decoders(path, unsafe_pickle=True)
    assert all(same(unsafe[k], theirs[k]) for k in members)


def test_msgpack_members_decode_where_msgpack_is_installed(tmp_path, monkeypatch):
    msgpack = pytest.importorskip("msgpack", reason="msgpack is not installed: `pip install -e .[test]` brings it")
    value = {"caption": "a cat", "boxes": [[1, 2, 3, 4]], "score": 0.5, "raw": b"\x00\xff"}
    members = {"mp": msgpack.packb(value), "msg": msgpack.packb([1, "two"]), "mp.gz": gzip.compress(msgpack.packb(3))}
    path = tar_of(tmp_path / "mp.tar", "s", members)
    ours, theirs = both_decoders(path)
    assert all(same(ours[k], theirs[k]) for k in members) and ours["mp"] == value
    monkeypatch.setitem(sys.modules, "msgpack", None)  # not installed: the members stay bytes
    assert ours_of(path) == {**members, "mp.gz": msgpack.packb(3)}


def test_tenbin_reader_refuses_what_does_not_fit():
    from webdataset import tenbin

    from vlmstream.stages.decode import read_tenbin

    good = bytes(tenbin.encode_buffer([np.arange(6, dtype=np.int32).reshape(2, 3)]))
    assert same(read_tenbin(good), tenbin.decode_buffer(good)) and read_tenbin(b"") == []
    bad_dims = bytearray(good)
    bad_dims[16 + 24:16 + 32] = (5).to_bytes(8, "little")  # dims (5, 3): 60 bytes claimed, 24 there
    cases = {"no chunk starts at byte 0": b"x" * 80, "past the member's end": good[:-60],
             "not header and data pairs": good[:80], "does not fit": bytes(bad_dims),
             "unsupported dtype": good.replace(b"i4\x00", b"O8\x00", 1)}
    for message, data in cases.items():
        with pytest.raises(ValueError, match=message):
            read_tenbin(data)
        with pytest.raises(vs.DecodeError, match=rf"member 'ten': ValueError: tenbin: .*{message}") as e:
            vs.decode().decode_sample({"__key__": "k", "ten": data})
        assert e.value.reason == "decode_failed"


def test_gzip_bombs_are_refused_at_max_member_bytes():
    bomb = gzip.compress(b"\x00" * (8 << 20), compresslevel=9)  # 8 MiB from 8 KiB
    assert len(bomb) < 16 << 10
    s = {"__key__": "k", "__url__": "http://h/s-1.tar", "txt.gz": bomb}
    with pytest.raises(vs.DecodeError, match=r"s-1.tar: sample 'k' member 'txt.gz': .*max_member_bytes=1048576") as e:
        vs.decode(max_member_bytes=1 << 20).decode_sample(s)
    assert e.value.reason == "decompression_bomb"
    assert len(vs.decode(max_member_bytes=8 << 20).decode_sample(s)["txt.gz"]) == 8 << 20  # at the limit: fine
    assert len(vs.decode(max_member_bytes=None).decode_sample(s)["txt.gz"]) == 8 << 20
    zipped = npz(zeros=np.zeros(1 << 20, np.uint8))  # npz members inflate too
    with pytest.raises(vs.DecodeError, match=r"member 'npz': .*exceed max_member_bytes=65536") as e:
        vs.decode(max_member_bytes=1 << 16).decode_sample({"__key__": "k", "npz": zipped})
    assert e.value.reason == "decompression_bomb"
    stage = vs.decode(max_member_bytes=1 << 20, on_error="skip")
    assert list(stage(iter([s, {"__key__": "ok", "txt.gz": gzip.compress(b"fine")}]))) == [
        {"__key__": "ok", "txt.gz": "fine"}]
    assert stage.stats.skipped == {"decompression_bomb": 1}


def test_broken_gzip_members_and_what_they_hold_have_precise_reasons(photo):
    good = gzip.compress(b'{"a": 1}')
    crc = bytearray(good)
    crc[-8] ^= 0xFF
    cases = [("json.gz", b"not gzip", "corrupt_gzip"), ("json.gz", good[:-6], "corrupt_gzip"),
             ("json.gz", bytes(crc), "corrupt_gzip"), ("json.gz", gzip.compress(b"{"), "invalid_json"),
             ("txt.gz", gzip.compress(b"\xff"), "invalid_utf8"),
             ("jpg.gz", gzip.compress(jpeg(photo)[:300]), "corrupt_image"),
             ("npy", npy(np.array([{"a": 1}], dtype=object)), "decode_failed"),  # an object array is a pickle
             ("cls", b"seven", "decode_failed")]
    stage = vs.decode(on_error="skip")
    for ext, data, reason in cases:
        with pytest.raises(vs.DecodeError, match=rf"member '{ext}'") as e:
            vs.decode().decode_sample({"__key__": "k", ext: data})
        assert e.value.reason == reason, (ext, e.value)
    assert list(stage(iter([{"__key__": str(i), ext: data} for i, (ext, data, _) in enumerate(cases)]))) == []
    assert stage.stats.skipped == {"corrupt_gzip": 3, "invalid_json": 1, "invalid_utf8": 1, "corrupt_image": 1,
                                   "decode_failed": 2}


def test_flags_choose_what_is_decoded_inside_gzip_too():
    s = {"__key__": "k", "json.gz": gzip.compress(b"[1]"), "jsn": b"[2]", "text": b"t", "cls.gz": gzip.compress(b"4")}
    assert vs.decode(json=False, txt=False, others=False).decode_sample(s) == {
        "__key__": "k", "json.gz": b"[1]", "jsn": b"[2]", "text": b"t", "cls.gz": b"4"}  # unzipped, not decoded
    assert vs.decode().decode_sample(s) == {"__key__": "k", "json.gz": [1], "jsn": [2], "text": "t", "cls.gz": 4}


# ------------------------------------------------------------------------------------------- decoding in groups


@pytest.fixture(scope="module")
def vqa_index(tmp_path_factory):
    from vlm_data import write_easyvqa_shards

    return write_easyvqa_shards(str(tmp_path_factory.mktemp("vqa")), n_images=30, maxcount=10)  # 3 shards


def _samples_of(index):
    pipe = vs.Pipeline(vs.shards(index), vs.split_by_node(0, 1), vs.split_by_worker(), vs.fetch(), vs.tar_samples())
    return list(pipe)


def _plain(sample):
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in sample.items()}


def test_decoding_in_groups_gives_what_sample_by_sample_gives(vqa_index):
    samples = _samples_of(vqa_index)
    samples[5] = {**samples[5], "0.png": b"not an image"}  # skipped, in the middle of the first group
    samples[12] = {**samples[12], "json": b"{"}
    grouped, single = vs.decode("uint8", on_error="skip"), vs.decode("uint8", on_error="skip", group=1)
    got, want = [_plain(s) for s in grouped(iter(samples))], [_plain(s) for s in single(iter(samples))]
    assert got == want and len(got) == len(samples) - 2
    assert [list(s) for s in got] == [list(s) for s in samples if s["__key__"] not in ("000005", "000012")]
    assert grouped.stats.skipped == single.stats.skipped == {"corrupt_image": 1, "invalid_json": 1}
    assert grouped.stats.samples == single.stats.samples == len(samples) - 2


def test_samples_without_a_place_in_a_shard_are_decoded_one_at_a_time(vqa_index):
    stage = vs.decode("uint8")
    seen = []

    def source():
        for s in _samples_of(vqa_index)[:4]:
            seen.append(s["__key__"])
            yield {k: v for k, v in s.items() if k not in ("__url__", "__offset__", "__index__")}

    for out in stage(source()):
        assert seen[-1] == out["__key__"] and stage.state_dict() == {}  # nothing held back


def _loader(index, group):
    pipe = vs.Pipeline(vs.shards(index), vs.split_by_node(0, 1), vs.split_by_worker(), vs.fetch(), vs.tar_samples(),
                       vs.decode("uint8", group=group), vs.batch(3))
    return vs.Loader(pipe, num_workers=0)


def test_a_checkpoint_inside_a_group_refers_to_its_samples_and_resumes_exactly(vqa_index):
    import json

    whole = [_plain(b) for b in _loader(vqa_index, 8)]
    assert whole == [_plain(b) for b in _loader(vqa_index, 1)]
    loader = _loader(vqa_index, 8)
    it = iter(loader)
    first = [_plain(next(it)) for _ in range(2)]  # 6 samples out of the first group of 8
    state = json.loads(json.dumps(loader.state_dict()))
    it.close()
    held = [st for st in state["workers"]["0"]["stages"] if isinstance(st, dict) and "refs" in st and "rng" not in st]
    assert [len(st["refs"]) for st in held] == [2]
    fresh = _loader(vqa_index, 8)
    fresh.load_state_dict(state)
    assert first + [_plain(b) for b in fresh] == whole


def test_images_are_decoded_back_to_back_up_to_a_bound_of_memory(vqa_index):
    calls = []

    class Sized:  # a transform whose output holds n bytes
        def __init__(self, n):
            self.n = n

        def __call__(self, im):
            calls.append(im.size)
            return torch.empty(self.n, dtype=torch.uint8)

    samples = _samples_of(vqa_index)[:8]
    for n, decoded_at_each_yield in ((1024, [8] * 8), (5 << 20, list(range(1, 9)))):  # 8 KB together; 40 MB
        calls.clear()
        assert [len(calls) for _ in vs.decode(Sized(n))(iter(samples))] == decoded_at_each_yield


# ------------------------------------------------------------------------------------------------ lazy tiles


def test_lazy_tiles_have_the_eager_grid_and_pixels_rotated_and_drafted_too(photo):
    from vlmstream.stages.decode import LazyTiles

    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait
    Image.fromarray(photo[:, :300]).save(rotated, "JPEG", exif=exif)
    for data in (jpeg(photo), rotated.getvalue(), png(photo[:200])):
        tiles = vs.ImageTiles(64, 256, output="uint8")
        eager = vs.decode(tiles).decode_sample({"__key__": "a", "0.jpg": data})["0.jpg"]
        lazy = vs.decode(tiles, lazy=True).decode_sample({"__key__": "a", "0.jpg": data})["0.jpg"]
        assert isinstance(lazy, LazyTiles) and lazy.grid == eager.grid and lazy.has_global == eager.has_global
        assert torch.equal(lazy.pixels, eager.pixels)
    with pytest.raises(ValueError, match="lazy=True needs"):
        vs.decode(vs.Resize(224), lazy=True)


def _vlm_chain(samples, on_error, tok):
    return vs.Pipeline(lambda _: iter(samples), vs.decode(vs.ImageTiles(32, 64), lazy=True, on_error=on_error),
                       vs.tokenize(tok, 1024), vs.pack(1024, buffer=8), vs.batch(2))


def test_the_pack_buffer_holds_compressed_images_and_a_corrupt_one_is_handled_where_it_is_made(photo):
    from vlm_data import chat_tokenizer

    tok = chat_tokenizer(image_token_length=4)
    conv = json.dumps({"messages": [{"role": "user", "content": "<image>what?"},
                                    {"role": "assistant", "content": "yes"}], "images": ["0.jpg"]}).encode()
    good = jpeg(photo)
    broken = good[: len(good) // 3]  # the header reads; the pixels do not
    samples = [{"__key__": f"{i:03d}", "__url__": "http://h/s.tar", "json": conv, "0.jpg": broken if i == 5 else good}
               for i in range(10)]
    pipe = _vlm_chain(samples, "skip", tok)
    made = []
    pack_stage = pipe.stages[3]
    original = pack_stage._drain

    def watched():
        held = [*pack_stage.pending, *(s for b in pack_stage.ready for s in b)]  # the buffer, as it plans
        made.append(sum(isinstance(im, torch.Tensor) for s in held for im in s["images"]))
        yield from original()

    pack_stage._drain = watched
    keys = [k for b in pipe for row in b["__key__"] for k in row.split("+")]
    assert sorted(keys) == [f"{i:03d}" for i in range(10) if i != 5] and made and not any(made)
    decode = pipe.stages[1]
    assert decode.stats.skipped == {"corrupt_image": 1} and decode.stats.samples_lost == 1
    assert "sample '005' member '0.jpg'" in decode.stats.errors[0]
    with pytest.raises(vs.DecodeError, match="http://h/s.tar: sample '005' member '0.jpg'"):
        list(_vlm_chain(samples, "raise", tok))


def test_lazy_tiles_are_made_in_the_segment_the_batch_leaves_in_and_ship_as_the_eager_ones(photo):
    from vlm_data import chat_tokenizer

    from vlmstream.core.sharedmem import SHM_KEY, Returns, SegmentPool
    from vlmstream.core.stage import Context

    tok = chat_tokenizer(image_token_length=4)
    conv = json.dumps({"messages": [{"role": "user", "content": "<image>what?"},
                                    {"role": "assistant", "content": "yes"}], "images": ["0.jpg"]}).encode()
    samples = [{"__key__": f"{i:03d}", "json": conv, "0.jpg": jpeg(photo)} for i in range(12)]

    def chain(lazy: bool) -> vs.Pipeline:  # a sample a row, two rows a batch: six batches
        return vs.Pipeline(lambda _: iter(samples), vs.decode(vs.ImageTiles(32, 64), lazy=lazy),
                           vs.tokenize(tok, 64), vs.pack(64, buffer=4), vs.batch(2))

    eager, lazy = chain(False), chain(True)
    returns = Returns(1)
    pool = SegmentPool(returns.readers[0])
    in_segment = []
    for want, got in zip(eager, lazy.iterate(Context(), memory=pool)):
        images = [t for row in got["images"] for t in row]
        segments = {s.data_ptr() for s in pool.segments.values()}
        in_segment.append(all(t.untyped_storage().data_ptr() in segments for t in images))
        shipped = returns.unpack(pool.by_reference(got), 0)
        assert SHM_KEY not in shipped and shipped["__key__"] == want["__key__"]
        assert all(torch.equal(a, b) for ra, rb in zip(shipped["images"], want["images"]) for a, b in zip(ra, rb))
        del got, shipped, images
        gc.collect()  # the segment goes back: the next batch is made in it
    assert len(in_segment) >= 3 and not in_segment[0] and all(in_segment[1:])  # the first one sizes the segment
    assert not vs.batch(2, collate=list).passes_tensors  # a collate of its own may copy: pack is not given memory
