"""`vs.ImageTiles`: nanoVLM's image scheme, so that a nanoVLM-style model takes our images as they are.

Resize so both sides are multiples of the tile size (the long side capped at, or taken to, ``max_side``),
cut into a grid of tiles in row-major order, and prepend one global view (the whole image resized to one
tile) unless the grid is 1x1. The tokenizer then writes one marker plus ``image_token_length`` image tokens
per tile, in the same order: ``<|global_image|>`` for the global view (or the only tile), ``<row_i_col_j>``
for the others.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image

from .decode import _FAST_UINT8_RESIZE, pixels


class Tiles(NamedTuple):
    """One image's tiles ([n, 3, tile, tile], float in [0, 1] or uint8) and its grid (rows, cols)."""

    pixels: torch.Tensor
    grid: tuple[int, int]

    @property
    def has_global(self) -> bool:
        return self.grid != (1, 1)


def tiled_size(width: int, height: int, tile: int, max_side: int, to_max_side: bool = True,
               rounding: str = "exact") -> tuple[int, int]:
    """The (width, height) an image is resized to: multiples of `tile`, long side <= max_side.

    ``to_max_side=True`` (nanoVLM's ``resize_to_max_side_len``, on in its config) scales the long side to
    max_side, upscaling small images; ``False`` only rounds it up to a tile multiple, never past max_side.
    ``rounding="exact"`` scales the short side in integers; ``"nanovlm"`` repeats nanoVLM's floating-point
    formula, which can round a side up by a whole tile (a square 1092 px image to 1536x2048 with
    ``to_max_side=False``): use it only to reproduce nanoVLM's own batches.
    """
    if max_side < tile or max_side % tile:
        raise ValueError(f"max_side ({max_side}) must be a positive multiple of tile ({tile})")
    if rounding not in ("exact", "nanovlm"):
        raise ValueError(f"rounding must be exact or nanovlm, not {rounding!r}")
    long, short = max(width, height), min(width, height)
    target_long = max_side if to_max_side else min(max_side, math.ceil(long / tile) * tile)
    if rounding == "exact":
        target_short = max(tile, -(-short * target_long // (long * tile)) * tile)
    else:
        target_short = max(tile, math.ceil(short * (target_long / long) / tile) * tile)
    return (target_long, target_short) if width >= height else (target_short, target_long)


def grid_of(width: int, height: int, tile: int) -> tuple[int, int]:
    return height // tile, width // tile


def num_tiles(grid: tuple[int, int]) -> int:
    """Tiles an image of this grid becomes, the global view included."""
    rows, cols = grid
    return 1 if (rows, cols) == (1, 1) else 1 + rows * cols


def cut_tiles(arr: np.ndarray, tile: int) -> np.ndarray:
    """[H, W, 3] with H, W multiples of tile -> [rows * cols, 3, tile, tile], row-major."""
    h, w, c = arr.shape
    rows, cols = h // tile, w // tile
    t = arr.reshape(rows, tile, cols, tile, c).transpose(0, 2, 4, 1, 3)
    return t.reshape(rows * cols, c, tile, tile)


RESAMPLE_MODES = {Image.BILINEAR: "bilinear", Image.BICUBIC: "bicubic"}  # torch's antialiased kernels of Pillow's filters
Empty = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def _chw(x: Image.Image | torch.Tensor) -> torch.Tensor:
    """[3, H, W] uint8 of an RGB image or of a [1, 3, H, W] tensor: a view, no copy (channel-interleaved)."""
    return pixels(x)[0, :3] if isinstance(x, Image.Image) else x[0, :3]


def _size(x: Image.Image | torch.Tensor) -> tuple[int, int]:
    return x.size if isinstance(x, Image.Image) else (x.shape[-1], x.shape[-2])


class ImageTiles:
    """The transform for `vs.decode`: PIL image -> Tiles. ``output="uint8"`` ships 4x fewer bytes between
    processes; normalise on the device with `vs.to_unit_float`.

    ``kernel``: who resizes. ``"auto"`` (the default): torch's antialiased uint8 kernels of the same filter
    (``resample`` bicubic or bilinear) on CPUs where they are vectorised (AVX2, AVX-512), Pillow's elsewhere.
    They agree with Pillow within 2 levels of 255 on a few pixels in ten thousand, and on the benchmark machine
    take 3.3 ms for a 640x480 photo to 2048x1536 where Pillow takes 27 (docs/BENCHMARKS.md, the VLM job).
    ``"pillow"``: Pillow's resize, bit for bit what Pillow, torchvision on PIL images and nanoVLM give.

    ``view``: how the global view is made. ``"pillow"`` resizes the whole picture to one tile with ``resample``,
    from whichever of the decoded image and the resized one has fewer pixels (the decoded photo when it was
    upscaled to the grid, as nanoVLM's default ``resize_to_max_side_len`` does to most photos: 5x fewer pixels
    to filter than 2048x1536, and one resampling instead of two; the resized image when the photo was larger).
    ``"torch"`` resizes the resized image's float pixels with torch's antialiased bilinear filter, as nanoVLM's
    processor does (torchvision's tensor resize), bit for bit (float output only). nanoVLM decodes JPEGs whole:
    ``draft=False`` to match its pixels, ``draft=True`` (the default) lets large JPEGs decode at a reduced scale
    that still covers the resized size, several times faster.

    `tiles(im, empty)` makes the output tensor with ``empty(shape, dtype)`` (memory the caller recycles, such as
    the batch's shared-memory segment); calling the transform makes it with ``torch.empty``.
    """

    def __init__(self, tile: int = 512, max_side: int = 2048, *, to_max_side: bool = True, rounding: str = "exact",
                 view: str = "pillow", resample: int = Image.BICUBIC, output: str = "float", draft: bool = True,
                 kernel: str = "auto"):
        tiled_size(tile, tile, tile, max_side, rounding=rounding)  # validates tile, max_side and rounding
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be float or uint8, not {output!r}")
        if view not in ("pillow", "torch"):
            raise ValueError(f"view must be pillow or torch, not {view!r}")
        if view == "torch" and output != "float":
            raise ValueError("view='torch' makes the global view from float pixels: it needs output='float'")
        if kernel not in ("auto", "pillow"):
            raise ValueError(f"kernel must be auto or pillow, not {kernel!r}")
        self.tile, self.max_side, self.to_max_side, self.rounding = tile, max_side, to_max_side, rounding
        self.view, self.resample, self.output, self.draft, self.kernel = view, resample, output, draft, kernel
        self.dtype = torch.float32 if output == "float" else torch.uint8
        self._torch = kernel == "auto" and resample in RESAMPLE_MODES and _FAST_UINT8_RESIZE

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        return tiled_size(width, height, self.tile, self.max_side, self.to_max_side, self.rounding)

    def grid_for(self, width: int, height: int) -> tuple[int, int]:
        """The (rows, cols) grid of an image of this size (as displayed), known without decoding it: what
        `vs.decode(lazy=True)` reads from the header."""
        return grid_of(*self.size_for(width, height), self.tile)

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """JPEGs may decode at reduced scale as long as they still cover the resized size."""
        return self.size_for(width, height) if self.draft else None

    def __call__(self, im: Image.Image) -> Tiles:
        return self.tiles(im)

    def tiles(self, im: Image.Image, empty: Empty | None = None) -> Tiles:
        """The image's tiles, the output tensor made by ``empty(shape, dtype)`` if given."""
        resized = self.resize(im)
        grid = grid_of(*_size(resized), self.tile)
        if self.view == "torch":
            return Tiles(self._float_with_torch_view(resized, grid, empty), grid)
        return Tiles(self.assemble(resized, self.global_view(im, resized), empty), grid)

    def _resize(self, x: Image.Image | torch.Tensor, wh: tuple[int, int]) -> Image.Image | torch.Tensor:
        if _size(x) == wh:
            return x
        if self._torch and (not isinstance(x, Image.Image) or x.mode == "RGB"):
            src = pixels(x)[:, :3] if isinstance(x, Image.Image) else x
            return torch.nn.functional.interpolate(src, size=(wh[1], wh[0]), mode=RESAMPLE_MODES[self.resample],
                                                   antialias=True, align_corners=False)
        return x.resize(wh, self.resample)

    def resize(self, im: Image.Image) -> Image.Image | torch.Tensor:
        """The image resized to its grid: a PIL image (Pillow's kernel) or a [1, 3, H, W] uint8 tensor (torch's,
        channel-interleaved), or the image itself when it has the grid's size already."""
        return self._resize(im, self.size_for(*im.size))

    def global_view(self, im: Image.Image, resized: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor | None:
        """The whole picture resized to one tile (``view="pillow"``), from the decoded or the resized image,
        whichever has fewer pixels; None for a 1x1 grid."""
        w, h = _size(resized)
        if (w, h) == (self.tile, self.tile):
            return None
        src = im if im.width * im.height < w * h else resized
        return self._resize(src, (self.tile, self.tile))

    def _empty(self, n: int, dtype: torch.dtype, empty: Empty | None) -> torch.Tensor:
        shape = (n, 3, self.tile, self.tile)
        return empty(shape, dtype) if empty is not None else torch.empty(shape, dtype=dtype)

    def assemble(self, resized: Image.Image | torch.Tensor, view: Image.Image | torch.Tensor | None,
                 empty: Empty | None = None) -> torch.Tensor:
        """[n, 3, tile, tile] of the output's dtype: the global view (if any), then the tiles of the resized
        image, row-major. Each copied once, from the resized pixels straight to its planar place (float: converted
        in that copy, then divided by 255 in place): numpy's copies and a concatenation took a quarter of a
        1024x1024 image's 20 ms."""
        t = self.tile
        src = _chw(resized)
        rows, cols = src.shape[1] // t, src.shape[2] // t
        out = self._empty(rows * cols + (view is not None), self.dtype, empty)
        out[-rows * cols:].view(rows, cols, 3, t, t).copy_(src.reshape(3, rows, t, cols, t).permute(1, 3, 0, 2, 4))
        if view is not None:
            out[0].copy_(_chw(view))
        if self.output == "float":
            out.div_(255.0)
        return out

    def _float_with_torch_view(self, resized: Image.Image | torch.Tensor, grid: tuple[int, int],
                               empty: Empty | None) -> torch.Tensor:
        """Tiles as float, the global view resized from the whole image's float pixels (contiguous [1, 3, H, W],
        as torchvision's ToTensor lays them out: the kernel's sums depend on the layout)."""
        if grid == (1, 1):
            return self.assemble(resized, None, empty)
        t = self.tile
        out = self._empty(1 + grid[0] * grid[1], torch.float32, empty)
        whole = _chw(resized)[None].contiguous().float().div_(255.0)
        view = torch.nn.functional.interpolate(whole, size=(t, t), mode="bilinear", align_corners=False,
                                               antialias=True)
        out[0].copy_(view[0])
        out[1:].view(*grid, 3, t, t).copy_(whole[0].view(3, grid[0], t, grid[1], t).permute(1, 3, 0, 2, 4))
        return out


def to_unit_float(x: torch.Tensor, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1], on the device (move first: 4x fewer bytes cross the bus)."""
    if device is not None:
        x = x.to(device, non_blocking=True)
    return x.to(dtype).div_(255.0)
