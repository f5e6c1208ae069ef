"""ImageTiles: nanoVLM's sizes, tile order and global view."""

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from PIL import Image

import vlmstream as vs
from vlmstream.stages.tiles import cut_tiles, num_tiles, tiled_size


@given(st.integers(1, 5000), st.integers(1, 5000), st.sampled_from([32, 256, 512]), st.integers(1, 8), st.booleans())
def test_sizes_are_tile_multiples_within_max_side(w, h, tile, k, to_max):
    max_side = tile * k
    tw, th = tiled_size(w, h, tile, max_side, to_max)
    assert tw % tile == 0 and th % tile == 0 and tile <= min(tw, th) and max(tw, th) <= max_side
    if to_max:
        assert max(tw, th) == max_side
    assert (tw >= th) == (w >= h) or tw == th


def test_nanovlm_examples():
    # nanoVLM's config (resize_to_max_side_len=True) is the default: the long side goes to max_side
    assert tiled_size(640, 480, 512, 2048) == (2048, 1536)
    assert vs.ImageTiles(512, 2048).size_for(640, 480) == (2048, 1536)  # 4x3 tiles + a global view: 13
    assert tiled_size(64, 64, 512, 2048) == (2048, 2048)
    assert tiled_size(640, 480, 512, 2048, to_max_side=False) == (1024, 1024)  # rounded up, short follows
    assert tiled_size(64, 64, 512, 2048, to_max_side=False) == (512, 512)  # never below one tile
    assert tiled_size(4000, 3000, 512, 2048, to_max_side=False) == (2048, 1536)
    with pytest.raises(ValueError, match="multiple of tile"):
        vs.ImageTiles(tile=512, max_side=1000)


def test_nanovlm_rounding_only_when_asked():
    # nanoVLM's float formula: 1536 / 1092 * 1092 / 512 = 3.0000000000000004 -> a 4th tile row, past max_side
    assert tiled_size(1092, 1092, 512, 2048, to_max_side=False) == (1536, 1536)
    assert tiled_size(1092, 1092, 512, 2048, to_max_side=False, rounding="nanovlm") == (1536, 2048)
    assert vs.ImageTiles(512, 2048, to_max_side=False, rounding="nanovlm").size_for(1092, 1092) == (1536, 2048)
    with pytest.raises(ValueError, match="rounding"):
        vs.ImageTiles(rounding="float")


def test_torch_view_is_torchs_bilinear_of_the_float_image():
    arr = np.random.default_rng(3).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    t = vs.ImageTiles(tile=32, max_side=96, view="torch", draft=False)(Image.fromarray(arr))
    whole = torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div(255)[None]
    view = torch.nn.functional.interpolate(whole, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    assert t.grid == (2, 3) and torch.equal(t.pixels[0], view[0])
    assert torch.equal(t.pixels[1:], vs.ImageTiles(tile=32, max_side=96)(Image.fromarray(arr)).pixels[1:])
    with pytest.raises(ValueError, match="output='float'"):
        vs.ImageTiles(view="torch", output="uint8")


def test_tiles_are_row_major_crops_after_a_global_view():
    arr = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    t = vs.ImageTiles(tile=32, max_side=96, output="uint8", kernel="pillow")(Image.fromarray(arr))
    assert t.grid == (2, 3) and t.pixels.shape == (7, 3, 32, 32) and t.pixels.dtype == torch.uint8
    for k in range(6):
        r, c = divmod(k, 3)
        assert torch.equal(t.pixels[1 + k], torch.from_numpy(arr[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32]).permute(2, 0, 1))
    glob = np.asarray(Image.fromarray(arr).resize((32, 32), Image.BICUBIC))
    assert torch.equal(t.pixels[0], torch.from_numpy(glob).permute(2, 0, 1))
    assert num_tiles(t.grid) == 7 and num_tiles((1, 1)) == 1


def test_one_tile_has_no_global_view_and_float_is_unit_range():
    t = vs.ImageTiles(tile=64, max_side=128, to_max_side=False)(Image.new("RGB", (50, 40), (255, 0, 0)))
    assert t.grid == (1, 1) and t.pixels.shape == (1, 3, 64, 64) and not t.has_global
    assert t.pixels.dtype == torch.float32 and t.pixels[0, 0].min() == 1.0 and t.pixels[0, 1].max() == 0.0


def test_uint8_normalised_on_the_device_equals_float_output():
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    u = vs.ImageTiles(tile=32, max_side=64, output="uint8")(im).pixels
    f = vs.ImageTiles(tile=32, max_side=64)(im).pixels
    assert torch.equal(vs.to_unit_float(u, "cpu"), f)


def test_cut_tiles_inverse():
    a = np.arange(4 * 6 * 3).reshape(4, 6, 3)
    t = cut_tiles(a, 2)
    assert t.shape == (6, 3, 2, 2) and (t[4].transpose(1, 2, 0) == a[2:4, 2:4]).all()


def test_draft_decoding_for_tiles_covers_the_target(tmp_path):
    import io

    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((2048, 1536)).save(buf, "JPEG")
    tiles = vs.ImageTiles(tile=256, max_side=512, output="uint8")
    sample = vs.decode(tiles).decode_sample({"__key__": "a", "0.jpg": buf.getvalue()})
    full = vs.decode(vs.ImageTiles(tile=256, max_side=512, output="uint8", draft=False)).decode_sample(
        {"__key__": "a", "0.jpg": buf.getvalue()})
    assert sample["0.jpg"].grid == full["0.jpg"].grid == (2, 2)
    assert (sample["0.jpg"].pixels.float() - full["0.jpg"].pixels.float()).abs().mean() < 3


def pillow_tiles(im: Image.Image, tile: int, wh: tuple[int, int], view_from: Image.Image) -> np.ndarray:
    """The global view (Pillow's bicubic of `view_from`) then the tiles of Pillow's bicubic resize to wh."""
    resized = im.resize(wh, Image.BICUBIC)
    return np.concatenate([np.asarray((view_from or resized).resize((tile, tile), Image.BICUBIC)).transpose(2, 0, 1)[None],
                           cut_tiles(np.asarray(resized), tile)])


def test_tiles_of_a_resized_image_are_its_crops_and_its_global_view():
    # upscaled (nanoVLM's default takes the long side to max_side): the view is made from the decoded image,
    # which has fewer pixels; downscaled: from the resized image
    small = Image.fromarray(np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    large = Image.fromarray(np.random.default_rng(3).integers(0, 256, (150, 210, 3), dtype=np.uint8))
    for im, view_from in ((small, small), (large, None)):
        for output in ("uint8", "float"):
            t = vs.ImageTiles(tile=32, max_side=96, output=output, kernel="pillow")
            w, h = t.size_for(*im.size)
            want = torch.from_numpy(pillow_tiles(im, 32, (w, h), view_from))
            got = t(im).pixels
            assert (w, h) == (96, 96) and got.shape == (10, 3, 32, 32) and got.is_contiguous()
            assert torch.equal(got, want if output == "uint8" else want.float().div(255)), (im.size, output)


def test_torchs_kernels_agree_with_pillows():
    # kernel="auto": torch's antialiased uint8 bicubic where it is vectorised, within 2 levels of Pillow's
    from vlmstream.stages.decode import _FAST_UINT8_RESIZE

    photo = np.asarray(Image.fromarray(__import__("skimage").data.astronaut()).resize((640, 480)))
    for arr in (photo, np.random.default_rng(4).integers(0, 256, (50, 70, 3), dtype=np.uint8)):
        im = Image.fromarray(arr)
        for tile, max_side in ((32, 96), (128, 512)):
            auto = vs.ImageTiles(tile=tile, max_side=max_side, output="uint8")(im).pixels
            exact = vs.ImageTiles(tile=tile, max_side=max_side, output="uint8", kernel="pillow")(im).pixels
            diff = (auto.int() - exact.int()).abs()
            assert auto.shape == exact.shape and diff.max() <= 2 and diff.float().mean() < 0.01
            assert torch.equal(vs.ImageTiles(tile=tile, max_side=max_side)(im).pixels, auto.float().div(255))
            if not _FAST_UINT8_RESIZE:
                assert torch.equal(auto, exact)
    with pytest.raises(ValueError, match="kernel"):
        vs.ImageTiles(kernel="simd")


def test_tiles_made_in_given_memory():
    im = Image.fromarray(np.random.default_rng(5).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    made = []

    def empty(shape, dtype):
        made.append(torch.full(shape, 7, dtype=dtype))
        return made[-1]

    for kw in ({"output": "uint8"}, {"output": "float"}, {"view": "torch"}):
        t = vs.ImageTiles(tile=32, max_side=96, **kw)
        got = t.tiles(im, empty)
        assert got.pixels.data_ptr() == made[-1].data_ptr() and torch.equal(got.pixels, t(im).pixels)
        assert got.grid == t.grid_for(*im.size) == (3, 3)
