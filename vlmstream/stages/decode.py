"""`vs.decode(...)`: turn a sample's bytes into images, JSON and text, only where asked.

An image transform says what an image becomes (a PIL image, a uint8 or float tensor, tiles) and, through
``draft_size``, how small a JPEG may be decoded: Pillow's draft mode lets libjpeg scale by 1/2, 1/4 or 1/8
while decoding, which is several times faster when the target is much smaller than the photo.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import math
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Union

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageOps

from ..core.checkpoint import encode_refs
from ..dataset.format import is_image_ext
from ..errors import DecodeError, ErrorCounts, check_policy, handle, redact

PICKLE_EXTS = ("pyd", "pickle", "pkl")  # pickle.loads: runs code from the shard; only with unsafe_pickle=True
TORCH_EXTS = ("pth", "pt")  # torch.load(weights_only=False): the same
JSON_EXTS = ("json", "jsn")  # decoded with json=True
TEXT_EXTS = ("txt", "text", "transcript")  # decoded with txt=True


class ImageTransform(Protocol):
    def __call__(self, im: Image.Image) -> Any: ...


Draft = Union[tuple[int, int], Callable[[int, int], Optional[tuple[int, int]]], None]


RGB_MODES = ("white", "pillow")  # how other modes become RGB: see open_image


def open_image(data: bytes, draft: Draft = None, max_pixels: int | None = None, rgb: str = "white") -> Image.Image:
    """Decode to an RGB image: EXIF orientation applied, any mode converted, draft-decoded if allowed.

    ``draft``: the smallest (w, h) the caller will use, or a function of the stored (w, h) giving it; JPEGs
    then decode at the largest 1/2^k scale that still covers it. ``max_pixels``: refuse larger images before
    decoding them (decompression bombs). ``rgb``: ``"white"`` lays transparent pixels on white (what a viewer
    shows; a logo on a transparent background stays visible) and scales 16-bit and float images to 8 bits;
    ``"pillow"`` is Pillow's own ``convert("RGB")``, which drops alpha (transparent pixels keep whatever colour
    they hold) and clips 16-bit values: what nanoVLM, torchvision and HF datasets' loaders do.
    """
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # Pillow's own, stricter-than-ours global limit
        raise DecodeError(f"image exceeds the limit of decodable pixels: {e}", reason="decompression_bomb") from None
    if max_pixels is not None and im.width * im.height > max_pixels:
        raise DecodeError(f"image of {im.width}x{im.height} pixels exceeds the limit of {max_pixels}",
                          reason="decompression_bomb")
    orientation = im.getexif().get(0x0112, 1) if im.format in ("JPEG", "TIFF", "WEBP", "PNG") else 1
    if callable(draft) and im.format == "JPEG":
        sw, sh = (im.height, im.width) if orientation in (5, 6, 7, 8) else im.size  # as displayed
        draft = draft(sw, sh)
    if draft is not None and im.format == "JPEG":
        w, h = draft
        if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: the stored image is transposed
            w, h = h, w
        im.draft("RGB", (w, h))
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode != "RGB":
        im = _to_rgb(im) if rgb == "white" else im.convert("RGB")
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def image_size(data: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """An image's (width, height) as displayed (EXIF rotations applied), from its header alone; refuses what
    `open_image` would refuse before decoding (an unreadable header, a decompression bomb)."""
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image exceeds the limit of decodable pixels: {e}", reason="decompression_bomb") from None
    if max_pixels is not None and im.width * im.height > max_pixels:
        raise DecodeError(f"image of {im.width}x{im.height} pixels exceeds the limit of {max_pixels}",
                          reason="decompression_bomb")
    orientation = im.getexif().get(0x0112, 1) if im.format in ("JPEG", "TIFF", "WEBP", "PNG") else 1
    return (im.height, im.width) if orientation in (5, 6, 7, 8) else im.size


class LazyTiles:
    """An image's tiles, not made yet: the grid (read from the image's header) is all that tokenizing and
    packing need, so a buffer that only plans holds the compressed bytes, not megabytes of pixels. ``pixels``
    makes them (the same as the eager decode would have); `materialize` does so for a sample when it leaves the
    last buffer. A failure then is handled by the decode stage's ``on_error``, through ``fail``."""

    __slots__ = ("grid", "_make", "_fail")

    def __init__(self, grid: tuple[int, int], make: Callable[[Any], Any], fail: Callable[[DecodeError], None]):
        self.grid, self._make, self._fail = grid, make, fail

    @property
    def has_global(self) -> bool:
        return self.grid != (1, 1)

    @property
    def pixels(self) -> torch.Tensor:
        return self.make()

    def make(self, empty: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None) -> torch.Tensor:
        """The pixels, in a tensor made by ``empty(shape, dtype)`` when given (the shared memory the batch leaves
        the worker in: no copy on the way out) and the image transform takes one (`ImageTiles.tiles`)."""
        return self._make(empty).pixels

    def fail(self, error: DecodeError) -> None:
        self._fail(error)


def materialize(sample: dict[str, Any], empty: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None
                ) -> dict[str, Any] | None:
    """A tokenized sample with its lazy ``images`` made into tensors (by ``empty`` where given); None where one
    fails and decode's ``on_error`` skips it (counted in decode's stats), which raises under "raise"."""
    images = sample.get("images")
    if not images or not any(isinstance(x, LazyTiles) for x in images):
        return sample
    made = []
    for x in images:
        if not isinstance(x, LazyTiles):
            made.append(x)
            continue
        try:
            made.append(x.make(empty))
        except DecodeError as e:
            x.fail(e)
            return None
    return {**sample, "images": made}


def _arrow_pixels(im: Image.Image) -> torch.Tensor:
    w, h = im.size
    flat = torch.from_dlpack(pa.array(im).values)  # Pillow's own pixel memory (Arrow export), not a copy
    if flat.numel() != w * h * 4:
        raise ValueError(f"{flat.numel()} bytes for {w}x{h} pixels")
    return flat.view(1, h, w, 4).permute(0, 3, 1, 2)


def _numpy_pixels(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)


def _probe_arrow() -> bool:
    try:
        im = Image.new("RGB", (3, 2), (1, 2, 3))
        return torch.equal(_arrow_pixels(im)[:, :3], _numpy_pixels(im))
    except Exception:  # Pillow < 11.2 (no Arrow export), a pyarrow without DLPack
        return False


_ARROW = _probe_arrow()


def pixels(im: Image.Image) -> torch.Tensor:
    """An RGB image as a [1, C, H, W] uint8 channels-last tensor, C = 3 or 4 (the 4th channel meaningless).

    Pillow keeps RGB pixels 4 bytes apart; its Arrow export gives that memory as it is, no copy. Half the cost of
    resizing a 320x240 photo to 224x224 (130 of 265 us, measured) went to numpy's copy of it (Pillow packing 4
    bytes to 3, then copying twice) and to torch unpacking 3 to 4 again. A copy through numpy where the export
    is not there, or where an image does not sit in one block of Pillow's memory.
    """
    if _ARROW and im.mode == "RGB":
        try:
            return _arrow_pixels(im)
        except ValueError:  # held in several blocks (a large image)
            pass
    return _numpy_pixels(im)


def to_uint8(im: Image.Image) -> torch.Tensor:
    """[3, H, W] uint8 (4x less traffic between processes than float; normalise on the device): a view of the
    decoded pixels, channel-interleaved as torchvision's ``pil_to_tensor`` gives them. The batch stage lays each
    one out planar as it copies it into the batch, so no pass over the image is spent doing so before."""
    return pixels(im)[0, :3]


def to_float(im: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [0, 1]."""
    return to_uint8(im).float().div_(255.0)


def _has_fast_uint8_resize() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    except (AttributeError, RuntimeError):
        return False


# torch's antialiased bilinear resize of uint8 images has AVX2/AVX-512 kernels: on a 320x240 -> 224x224 RGB
# photo it takes about a third of Pillow's time and agrees with Pillow to within one level of 255.
_FAST_UINT8_RESIZE = _has_fast_uint8_resize()


def _resize_rgb_tensor(im: Image.Image, wh: tuple[int, int]) -> torch.Tensor:
    """An RGB image resized to wh with torch's bilinear (antialiased): a [3, h, w] uint8 view of channel-interleaved
    memory, as the kernel writes it. Laying it out planar costs a pass over the image (about 45 us at 224x224
    here); the batch stage makes that pass as it copies the image into the batch, not once more after it."""
    out = torch.nn.functional.interpolate(pixels(im), size=(wh[1], wh[0]), mode="bilinear", antialias=True,
                                          align_corners=False)
    return out[0, :3]


class Resize:
    """Resize to exactly (size, size) or (w, h); output "pil", "uint8" or "float".

    Tensor outputs of RGB images with the default bilinear filter are resized by torch on CPUs with AVX2 (or
    AVX-512) kernels, several times faster than Pillow and equal to it within one level; elsewhere by Pillow.
    """

    def __init__(self, size: int | tuple[int, int], output: str = "uint8", resample=Image.BILINEAR, draft: bool = True):
        self.wh = (size, size) if isinstance(size, int) else tuple(size)
        if output not in ("pil", "uint8", "float"):
            raise ValueError(f"output must be pil, uint8 or float, not {output!r}")
        self.output, self.resample, self.draft = output, resample, draft

    def draft_size(self, width: int = 0, height: int = 0) -> tuple[int, int] | None:
        return self.wh if self.draft else None  # the same whatever the stored size

    def __call__(self, im: Image.Image) -> Any:
        if (im.size != self.wh and self.output != "pil" and self.resample == Image.BILINEAR and im.mode == "RGB"
                and _FAST_UINT8_RESIZE):
            x = _resize_rgb_tensor(im, self.wh)
            return x if self.output == "uint8" else x.float().div_(255.0)
        if im.size != self.wh:
            im = im.resize(self.wh, self.resample, reducing_gap=None)
        return {"pil": lambda x: x, "uint8": to_uint8, "float": to_float}[self.output](im)


_OUTPUTS: dict[str, Callable[[Image.Image], Any]] = {"pil": lambda im: im, "uint8": to_uint8, "float": to_float}


@dataclass
class DecodeStats(ErrorCounts):
    samples: int = 0  # samples decoded; ``skipped`` counts those left out under on_error, by reason


def _reason(e: Exception, key: str) -> str:
    key = key[:-3] if key.endswith(".gz") else key  # a gzipped member failed as what it holds
    ext = key.rsplit(".", 1)[-1].lower()
    if isinstance(e, DecodeError):
        return e.reason
    if isinstance(e, UnicodeDecodeError):
        return "invalid_utf8"
    if isinstance(e, json.JSONDecodeError):
        return "invalid_json"
    if ext in PICKLE_EXTS or ext in TORCH_EXTS:
        return "unpickle_failed"
    if is_image_ext(key):
        return "corrupt_image"
    return "decode_failed"


_PROVENANCE = {"__url__", "__offset__", "__index__"}  # what tar_samples adds: a sample's place, for checkpoints
IMAGE_RUN_BYTES = 4 << 20  # decoded back to back before being passed on: 27 images of 3x224x224 uint8


def _nbytes(x: Any) -> int:
    """Memory a decoded image holds: tensors, tiles, PIL images (4 bytes a pixel), lists of them."""
    if isinstance(x, torch.Tensor):
        return x.nbytes
    if isinstance(x, Image.Image):
        return x.width * x.height * 4
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    return 0


# ---------------------------------------------------------------------------- members other than images, json, txt
# What webdataset's default decoder does with them, where it can be done without running code from the shard.


def gunzip(data: bytes, limit: int | None) -> bytes:
    """A gzip member's bytes, decompressed 1 MiB at a time: a small member that inflates to gigabytes (a gzip
    bomb) is refused as soon as it passes `limit` bytes, never held whole. Several gzip members in a row are
    one stream, as the gzip tool and webdataset read them."""
    out, size = [], 0
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            while chunk := f.read(1 << 20):
                size += len(chunk)
                if limit is not None and size > limit:
                    raise DecodeError(f"decompresses to more than max_member_bytes={limit}",
                                      reason="decompression_bomb")
                out.append(chunk)
    except (OSError, EOFError, zlib.error) as e:  # not gzip, a bad CRC or length, cut short
        raise DecodeError(f"not a whole gzip stream: {type(e).__name__}: {e}", reason="corrupt_gzip") from None
    return b"".join(out)


def _int(data: bytes, limit: int | None) -> int:
    return int(data)  # as webdataset: ASCII digits, surrounding whitespace allowed


def _npy(data: bytes, limit: int | None) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)  # object arrays are pickles: refused


def _npz(data: bytes, limit: int | None) -> dict[str, Any]:
    """A dict of arrays, as webdataset's; its zip members may be compressed, so their sizes are bounded first."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        size = sum(info.file_size for info in z.infolist())  # zipfile reads no more than these sizes
    if limit is not None and size > limit:
        raise DecodeError(f"npz arrays of {size} bytes exceed max_member_bytes={limit}", reason="decompression_bomb")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return dict(z)


def _msgpack(data: bytes, limit: int | None) -> Any:
    try:
        import msgpack
    except ImportError:  # an optional package: without it the member stays bytes (docs/PIPELINE.md)
        return data
    return msgpack.unpackb(data)  # webdataset's call: plain values, never objects of the shard's choosing


TENBIN_MAGIC = b"~TenBin~"
TENBIN_DTYPES = {b"f2": "<f2", b"f4": "<f4", b"f8": "<f8", b"i1": "i1", b"i2": "<i2", b"i4": "<i4", b"i8": "<i8",
                 b"u1": "u1", b"u2": "<u2", b"u8": "<u8"}  # the dtypes webdataset's tenbin writes


def read_tenbin(data: bytes, limit: int | None = None) -> list[np.ndarray]:
    """The arrays of webdataset's tenbin format (`.ten`, `.tb` members), as read-only views of `data`.

    The format is a run of chunks (8 bytes ``~TenBin~``, an int64 length, the bytes padded to 64), two per array:
    a header of int64s (dtype code such as ``f4``, an 8-byte name, rank, dims), then the array's bytes.
    Little-endian, as webdataset writes it on every machine it runs on. Any mismatch is an error.
    """
    view, chunks, pos = memoryview(data), [], 0
    while pos < len(data):
        if bytes(view[pos:pos + 8]) != TENBIN_MAGIC or pos + 16 > len(data):
            raise ValueError(f"tenbin: no chunk starts at byte {pos}")
        (n,) = struct.unpack_from("<q", data, pos + 8)
        if n < 0 or pos + 16 + n > len(data):
            raise ValueError(f"tenbin: the chunk at byte {pos} claims {n} bytes, past the member's end")
        chunks.append(view[pos + 16:pos + 16 + n])
        pos += 16 + -(-n // 64) * 64
    if len(chunks) % 2:
        raise ValueError(f"tenbin: {len(chunks)} chunks, not header and data pairs")
    arrays = []
    for i in range(0, len(chunks), 2):
        head, body = chunks[i], chunks[i + 1]
        if len(head) < 24 or len(head) % 8:
            raise ValueError(f"tenbin: array {i // 2}: a header of {len(head)} bytes")
        code, (rank, *shape) = bytes(head[:8]).rstrip(b"\0"), np.frombuffer(head[16:], "<i8").tolist()
        if code not in TENBIN_DTYPES:
            raise ValueError(f"tenbin: array {i // 2}: unsupported dtype {code!r}")
        dtype = np.dtype(TENBIN_DTYPES[code])
        if rank != len(shape) or min(shape, default=0) < 0 or math.prod(shape) * dtype.itemsize != len(body):
            raise ValueError(f"tenbin: array {i // 2}: shape {shape} of {code.decode()} does not fit {len(body)} bytes")
        arrays.append(np.frombuffer(body, dtype).reshape(shape))
    return arrays


# extension -> decoder(bytes, max_member_bytes), for decode(others=True): cls and the like to int (webdataset's
# "cls cls2 index inx id"), npy/npz with numpy (never allow_pickle), msgpack where installed, tenbin.
OTHER_DECODERS: dict[str, Callable[[bytes, Optional[int]], Any]] = {
    **dict.fromkeys(("cls", "cls2", "index", "inx", "id"), _int),
    "npy": _npy, "npz": _npz, "mp": _msgpack, "msg": _msgpack, "ten": read_tenbin, "tb": read_tenbin,
}


class decode:
    """The stage: decode image members with ``image`` ("pil", "uint8", "float" or a transform such as
    ``Resize(224)`` / ``ImageTiles(...)``), ``json`` (and ``jsn``) members to objects and ``txt`` (``text``,
    ``transcript``) members to str; with ``others``, the members webdataset's decoder also decodes where that is
    safe (`OTHER_DECODERS`: ``cls`` and the like to int, ``npy``/``npz`` arrays, msgpack, tenbin).

    Only what is named is decoded (``image=None`` leaves images as bytes, ``others=False`` those members); the
    rest pass through as bytes. A ``.gz`` member (``txt.gz``) is gunzipped and decoded as what it holds, under
    its own name, as webdataset does; it may inflate to ``max_member_bytes`` at most. Pickled members
    (``.pyd``, ``.pickle``, ``.pkl``, ``.pth``, ``.pt``) are never unpickled, since unpickling runs code chosen by
    whoever wrote the shard, unless ``unsafe_pickle=True`` is given by name. ``max_pixels`` refuses decompression
    bombs before decoding. ``rgb``: how images in other modes become RGB ("white": transparency on white, 16-bit
    scaled; "pillow": Pillow's convert, as nanoVLM; see `open_image`). ``lazy=True`` (with `ImageTiles`): images
    become `LazyTiles`, their grid read from the header (enough to tokenize and pack), their pixels made when the
    pack or batch stage emits the sample, so that a pack buffer holds compressed bytes, not tiles; a corrupt image
    whose header reads is then found there and handled by this stage's ``on_error``. ``on_error``: "raise" a
    `DecodeError`
    naming shard, key, member and reason, or "skip" the sample (and "warn": also log it), counted in
    ``stats.skipped`` by reason.

    Samples are decoded ``group`` at a time: first the JSON and text of all of them, then their images back to
    back (as many as fit in 4 MB of output: big tile stacks go one at a time), so that each kind of work runs with
    its code and data still in the cache. Decoding an image evicts what the small Python work after it needs
    (`json.loads` of a conversation: 3 us in a loop of its own, 15-17 us right after an image), and the other way
    round: the 224 job ran 4-6% faster with groups of 8 than sample by sample (`tools/bench/ab.py`,
    docs/BENCHMARKS.md). The samples of a group not yet passed on are part of the stage's checkpoint state, by
    reference, like a shuffle buffer's; samples without a place in a shard (``__url__``, ``__offset__``,
    ``__index__``) are decoded one at a time. ``group=1``: always one at a time.
    """

    def __init__(self, image: str | ImageTransform | None = "pil", *, json: bool = True, txt: bool = True,
                 max_pixels: int | None = 178_956_970, on_error: str = "raise", unsafe_pickle: bool = False,
                 group: int = 8, rgb: str = "white",
                 others: bool = True, max_member_bytes: int | None = 1 << 30, lazy: bool = False):
        if group < 1:
            raise ValueError(f"group must be >= 1, not {group}")
        if rgb not in RGB_MODES:
            raise ValueError(f"rgb must be one of {RGB_MODES}, not {rgb!r}")
        self.rgb = rgb
        if isinstance(image, str):
            if image not in _OUTPUTS:
                raise ValueError(f"image must be one of {sorted(_OUTPUTS)} or a transform, not {image!r}")
            image = _OUTPUTS[image]
        self.image, self.json, self.txt, self.max_pixels = image, json, txt, max_pixels
        self.draft = getattr(image, "draft_size", None)  # (w, h) of the stored image -> smallest usable size
        grid_for = getattr(image, "grid_for", None)  # (w, h) -> the tile grid, known without decoding
        if lazy and grid_for is None:
            raise ValueError("lazy=True needs an image transform that knows its grid from the image's size "
                             "(vs.ImageTiles)")
        self.grid_for = grid_for if lazy else None
        self.on_error = check_policy(on_error)
        self.unsafe_pickle = unsafe_pickle is True
        self.group = group
        self.others, self.max_member_bytes = others, max_member_bytes
        self.stats = DecodeStats()
        self.pending: list[tuple[Any, dict[str, Any]]] = []  # read, not yet passed on: a checkpoint refers to them
        self._resume: list[Any] = []  # samples of a checkpoint's group, fetched again: decoded first
        if image is not None:  # Pillow imports its format plugins on first use: here, in the process that builds the
            Image.preinit()  # pipeline, DataLoader workers inherit them instead of importing them again on their first
            Image.init()  # image of every epoch (about 0.1 s each, measured)

    def _member(self, key: str, value: bytes, sample: Mapping[str, Any] | None = None) -> Any:
        if ("." + key).endswith(".gz"):  # webdataset's test, case and all: "txt.gz" holds a "txt"
            key, value = key[:-3], gunzip(value, self.max_member_bytes)
        ext = key.rsplit(".", 1)[-1]
        if self.image is not None and is_image_ext(key):
            if self.grid_for is not None:
                return self._lazy(sample or {}, key, value, self.grid_for(*image_size(value, self.max_pixels)))
            return self.image(open_image(value, self.draft, self.max_pixels, self.rgb))
        if self.json and ext in JSON_EXTS:
            return json.loads(value)
        if self.txt and ext in TEXT_EXTS:
            return value.decode("utf-8")
        if self.others and ext in OTHER_DECODERS:
            return OTHER_DECODERS[ext](value, self.max_member_bytes)
        if self.unsafe_pickle:
            if ext.lower() in PICKLE_EXTS:
                return pickle.loads(value)
            if ext.lower() in TORCH_EXTS:
                return torch.load(io.BytesIO(value), weights_only=False)
        return value

    def _decode_into(self, out: dict[str, Any], sample: Mapping[str, Any], images: bool | None = None) -> None:
        """Decode `sample`'s members into `out`: its images (``images=True``), all the others (False) or all."""
        for key, value in sample.items():
            if key.startswith("__") or not isinstance(value, (bytes, bytearray)):
                continue
            if images is not None and (self.image is not None and is_image_ext(key)) != images:
                continue
            try:
                out[key] = self._member(key, value, sample)
            except Exception as e:
                raise self._error(sample, key, e) from None

    def _error(self, sample: Mapping[str, Any], key: str, e: Exception) -> DecodeError:
        return DecodeError(f"{redact(str(sample.get('__url__', '?')))}: sample {sample.get('__key__', '?')!r} "
                           f"member {key!r}: {type(e).__name__}: {e}", reason=_reason(e, key))

    def _lazy(self, sample: Mapping[str, Any], key: str, value: bytes, grid: tuple[int, int]) -> LazyTiles:
        """Tiles made when asked for, as the eager decode makes them; errors name the sample as its would."""
        image, draft, max_pixels, rgb, stats = self.image, self.draft, self.max_pixels, self.rgb, self.stats
        where = {k: sample[k] for k in ("__url__", "__key__") if k in sample}

        def make(empty: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None) -> Any:
            try:
                im = open_image(value, draft, max_pixels, rgb)
                tiles = image.tiles(im, empty) if empty is not None and hasattr(image, "tiles") else image(im)
            except Exception as e:
                raise self._error(where, key, e) from None
            if tiles.grid != grid:  # the tokens were laid out for the header's grid: a mismatch would misalign them
                raise self._error(where, key, ValueError(f"decoded to a {tiles.grid} grid, its header said {grid}"))
            return tiles

        def fail(e: DecodeError) -> None:
            handle(self.on_error, e, stats, "decode")

        return LazyTiles(grid, make, fail)

    def decode_sample(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(sample)
        self._decode_into(out, sample)
        return out

    map_sample = decode_sample  # one sample in, one out: how a resumed pipeline rebuilds buffered samples

    def _decode_others(self, samples: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
        """(sample, out) with all but the images decoded into out; the failed ones left out under on_error."""
        outs = []
        for sample in samples:
            out = dict(sample)
            try:
                self._decode_into(out, sample, images=False)
            except DecodeError as e:
                handle(self.on_error, e, self.stats, "decode")
                continue
            outs.append((sample, out))
        return outs

    def _decode_images(self, pending: list[tuple[Any, dict[str, Any]]]) -> int:
        """Decode the images of the first samples of `pending` back to back, until their output reaches
        `IMAGE_RUN_BYTES` (tile stacks of 16 MB go one at a time); how many were decoded. Failed ones leave
        `pending` under on_error."""
        done = held = 0
        while done < len(pending) and held < IMAGE_RUN_BYTES:
            sample, out = pending[done]
            try:
                self._decode_into(out, sample, images=True)
            except DecodeError as e:
                handle(self.on_error, e, self.stats, "decode")
                del pending[done]
                continue
            held += sum(_nbytes(out[k]) for k in sample if not k.startswith("__") and is_image_ext(k))
            done += 1
        return done

    def __call__(self, it: Iterator[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
        self.stats = DecodeStats()
        it, resumed, self._resume = iter(it), self._resume, []
        while True:
            samples, resumed = resumed[:self.group], resumed[self.group:]
            if not samples:
                samples = list(itertools.islice(it, 1))
                if not samples:
                    return
            if isinstance(samples[0], Mapping) and _PROVENANCE <= samples[0].keys():  # a checkpoint can refer to it
                samples += itertools.islice(it, self.group - len(samples))
            self.pending = self._decode_others(samples)  # (sample, out): a checkpoint refers to the samples
            del samples
            ready = 0  # of pending, how many have their images decoded
            while self.pending:
                ready = ready or self._decode_images(self.pending)
                if not ready:
                    continue
                sample, out = self.pending.pop(0)
                ready -= 1
                self.stats.samples += 1
                yield out
                out = sample = None  # hold no image longer than the stage must

    def state_dict(self) -> dict[str, Any]:
        return encode_refs([sample for sample, _ in self.pending]) if self.pending else {}

    def load_state_dict(self, state: Mapping[str, Any], samples: list[Any] | None = None) -> None:
        """`samples`: the decoded-but-not-passed-on samples of the checkpoint, fetched again from its references."""
        self._resume = list(samples or [])
