"""decode: only what is asked, any image mode to RGB, EXIF orientation, draft JPEG decoding, clear errors."""

import io
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

import vlmstream as vs
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
    out = vs.decode(image=None, json=True, txt=False).decode_sample(s)
    assert out["0.jpg"] == s["0.jpg"] and out["json"] == {"a": 1} and out["txt"] == b"hi" and out["cls"] == b"3"
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
