"""`vs.ImageTiles`: nanoVLM's image scheme, so that a nanoVLM-style model takes our images as they are.

Resize so both sides are multiples of the tile size (the long side capped at, or taken to, ``max_side``),
cut into a grid of tiles in row-major order, and prepend one global view (the whole image resized to one
tile) unless the grid is 1x1. The tokenizer then writes one marker plus ``image_token_length`` image tokens
per tile, in the same order: ``<|global_image|>`` for the global view (or the only tile), ``<row_i_col_j>``
for the others.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from .decode import pixels


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


class ImageTiles:
    """The transform for `vs.decode`: PIL image -> Tiles. ``output="uint8"`` ships 4x fewer bytes between
    processes; normalise on the device with `vs.to_unit_float`.

    ``view``: how the global view is made. ``"pillow"`` resizes the resized image to one tile with ``resample``;
    ``"torch"`` resizes its float pixels with torch's antialiased bilinear filter, as nanoVLM's processor does
    (torchvision's tensor resize), bit for bit (float output only). nanoVLM decodes JPEGs whole: ``draft=False``
    to match its pixels, ``draft=True`` (the default) lets large JPEGs decode at a reduced scale that still
    covers the resized size, several times faster.
    """

    def __init__(self, tile: int = 512, max_side: int = 2048, *, to_max_side: bool = True, rounding: str = "exact",
                 view: str = "pillow", resample: int = Image.BICUBIC, output: str = "float", draft: bool = True):
        tiled_size(tile, tile, tile, max_side, rounding=rounding)  # validates tile, max_side and rounding
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be float or uint8, not {output!r}")
        if view not in ("pillow", "torch"):
            raise ValueError(f"view must be pillow or torch, not {view!r}")
        if view == "torch" and output != "float":
            raise ValueError("view='torch' makes the global view from float pixels: it needs output='float'")
        self.tile, self.max_side, self.to_max_side, self.rounding = tile, max_side, to_max_side, rounding
        self.view, self.resample, self.output, self.draft = view, resample, output, draft

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        return tiled_size(width, height, self.tile, self.max_side, self.to_max_side, self.rounding)

    def grid_for(self, width: int, height: int) -> tuple[int, int]:
        """The grid an image of this size becomes: what `vs.decode` reads from the header to tile lazily."""
        return grid_of(*self.size_for(width, height), self.tile)

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """JPEGs may decode at reduced scale as long as they still cover the resized size."""
        return self.size_for(width, height) if self.draft else None

    def __call__(self, im: Image.Image) -> Tiles:
        w, h = self.size_for(*im.size)
        resized = im if im.size == (w, h) else im.resize((w, h), self.resample)
        grid = grid_of(w, h, self.tile)
        if self.view == "torch":
            return Tiles(self._float_with_torch_view(resized, grid), grid)
        view = resized.resize((self.tile, self.tile), self.resample) if grid != (1, 1) else None
        out = self.assemble(resized, view)
        if self.output == "float":
            out = out.float().div_(255.0)
        return Tiles(out, grid)

    def _float_with_torch_view(self, resized: Image.Image, grid: tuple[int, int]) -> torch.Tensor:
        """Tiles as float, the global view resized from the whole image's float pixels (contiguous [1, 3, H, W],
        as torchvision's ToTensor lays them out: the kernel's sums depend on the layout)."""
        tiles = self.assemble(resized, None).float().div_(255.0)
        if grid == (1, 1):
            return tiles
        whole = pixels(resized)[:, :3].contiguous().float().div_(255.0)
        view = torch.nn.functional.interpolate(whole, size=(self.tile, self.tile), mode="bilinear",
                                               align_corners=False, antialias=True)
        return torch.cat([view, tiles])

    def assemble(self, resized: Image.Image, view: Image.Image | None) -> torch.Tensor:
        """[n, 3, tile, tile] uint8: the global view (if any), then the tiles of the resized image, row-major.
        Each copied once, from Pillow's memory straight to its planar place: numpy's copies and a concatenation
        took a quarter of a 1024x1024 image's 20 ms."""
        t = self.tile
        rows, cols = resized.height // t, resized.width // t
        out = torch.empty((rows * cols + (view is not None), 3, t, t), dtype=torch.uint8)
        src = pixels(resized)[0, :3].reshape(3, rows, t, cols, t)  # a view: no copy yet
        out[-rows * cols:].view(rows, cols, 3, t, t).copy_(src.permute(1, 3, 0, 2, 4))
        if view is not None:
            out[0].copy_(pixels(view)[0, :3])
        return out


def to_unit_float(x: torch.Tensor, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1], on the device (move first: 4x fewer bytes cross the bus)."""
    if device is not None:
        x = x.to(device, non_blocking=True)
    return x.to(dtype).div_(255.0)
