"""`vlmstream inspect SHARDS`: what a dataset holds, whether its shards match their manifest, and a contact sheet.

Shards are listed with `vs.shards`' resolver and read with `vs.fetch`'s opener and the tar reader, so local paths,
brace patterns, manifests, http(s):// and hf:// all work; every byte goes through a sha256 while it streams (the
shard is read once). Images are measured from their headers (no pixel decoding), except the few drawn on the
contact sheet: each with the tile grid `vs.ImageTiles` would cut it into, beside its conversation.
"""

from __future__ import annotations

import array
import hashlib
import io
import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Sequence

from ..dataset.format import EMPTY_CAPTION, IMAGE_PLACEHOLDER, conversation_from_sample, is_image_ext
from ..errors import FormatError
from ..stages.tiles import grid_of, num_tiles, tiled_size

EXAMPLES = 5  # problems of one kind listed by name; the rest are counted


class HashingReader:
    """``read()`` through a sha256, counting bytes; ``drain()`` reads what the tar reader left (the padding)."""

    def __init__(self, f: BinaryIO, hash: bool = True):
        self.f, self.sha256, self.bytes = f, hashlib.sha256() if hash else None, 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        if self.sha256 is not None:
            self.sha256.update(b)
        self.bytes += len(b)
        return b

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class Numbers:
    """Values of one measure; summarised as count, min, mean, median, p95, max."""

    def __init__(self) -> None:
        self.values = array.array("d")

    def add(self, x: float) -> None:
        self.values.append(x)

    def summary(self) -> dict[str, float] | None:
        if not self.values:
            return None
        import numpy as np

        v = np.frombuffer(self.values, dtype=np.float64)
        return {"count": int(v.size), "min": float(v.min()), "mean": float(v.mean()),
                "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)), "max": float(v.max())}


@dataclass
class ShardCheck:
    url: str
    samples: int = 0
    bytes: int = 0
    sha256: str | None = None
    expected_samples: int | None = None
    expected_bytes: int | None = None
    expected_sha256: str | None = None
    error: str | None = None

    def problems(self) -> list[str]:
        name = self.url
        if self.error:
            return [f"{name}: {self.error}"]
        out = []
        if self.expected_samples is not None and self.samples != self.expected_samples:
            out.append(f"{name}: {self.samples} samples, the manifest says {self.expected_samples}")
        if self.expected_bytes is not None and self.bytes != self.expected_bytes:
            out.append(f"{name}: {self.bytes} bytes, the manifest says {self.expected_bytes}")
        if self.sha256 and self.expected_sha256 and self.sha256 != self.expected_sha256:
            out.append(f"{name}: sha256 {self.sha256[:16]}... does not match the manifest's {self.expected_sha256[:16]}...")
        return out


@dataclass
class Shape:
    """What the samples hold, accumulated one sample at a time."""

    tile: int = 512
    max_side: int = 2048
    samples: int = 0
    extensions: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)  # conversation / caption / empty caption / not a conversation
    image_formats: Counter = field(default_factory=Counter)
    image_modes: Counter = field(default_factory=Counter)
    image_sizes: Counter = field(default_factory=Counter)
    grids: Counter = field(default_factory=Counter)
    bad: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    numbers: dict[str, Numbers] = field(default_factory=dict)

    def num(self, name: str, x: float) -> None:
        self.numbers.setdefault(name, Numbers()).add(x)

    def problem(self, kind: str, where: str) -> None:
        self.bad[kind] += 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < EXAMPLES:
            ex.append(where)

    def add(self, sample: dict[str, Any], tok: Any = None) -> None:
        self.samples += 1
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        members = [k for k in sample if not k.startswith("__")]
        self.extensions.update(members)
        self.num("bytes_per_sample", sum(len(sample[k]) for k in members if isinstance(sample[k], bytes)))
        grids = {}
        for k in members:
            if not is_image_ext(k):
                continue
            info = image_info(sample[k])
            if info is None:
                self.problem("unreadable image", f"{where} member {k}")
                continue
            (w, h), mode, fmt = info
            grid = grid_of(*tiled_size(w, h, self.tile, self.max_side), self.tile)
            grids[k] = grid
            self.image_formats[fmt] += 1
            self.image_modes[mode] += 1
            self.image_sizes[f"{w}x{h}"] += 1
            self.grids[f"{grid[0]}x{grid[1]}"] += 1
            self.num("image_width", w)
            self.num("image_height", h)
            self.num("tiles_per_image", num_tiles(grid))
        try:
            conv = conversation_from_sample(sample)
        except FormatError as e:
            if e.reason == EMPTY_CAPTION:  # skipped and counted by vs.tokenize, not a bad conversation
                self.kinds["empty caption"] += 1
                return
            self.kinds["not a conversation"] += 1
            self.problem("not a conversation", f"{where}: {str(e).split(': ', 1)[-1][:120]}")
            return
        self.kinds["conversation" if "json" in sample and "messages" in _json(sample["json"]) else "caption"] += 1
        msgs = conv.messages
        self.num("turns_per_sample", len(msgs))
        self.num("answers_per_sample", sum(m["role"] == "assistant" for m in msgs))
        self.num("images_per_sample", len(conv.images))
        self.num("text_chars_per_sample", sum(len(m["content"].replace(IMAGE_PLACEHOLDER, "")) for m in msgs))
        if tok is not None and all(e in grids for e in conv.images):
            g = [grids[e] for e in conv.images]
            try:
                enc = tok.encode(msgs, g)
            except (FormatError, ValueError) as e:
                self.problem("cannot tokenize", f"{where}: {e}")
                return
            self.num("tokens_per_sample", len(enc.input_ids))
            self.num("image_tokens_per_sample", sum(num_tiles(x) for x in g) * tok.image_token_length)
            self.num("answer_tokens_per_sample", sum(enc.target))


def _json(raw: Any) -> Any:
    try:
        return json.loads(raw) if isinstance(raw, (bytes, str)) else raw
    except (ValueError, UnicodeDecodeError):
        return {}


def image_info(data: bytes) -> tuple[tuple[int, int], str, str] | None:
    """((width, height) as displayed, mode, format) from the image's header, without decoding its pixels."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if im.format in ("JPEG", "TIFF", "WEBP", "PNG") and im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            w, h = h, w
        return (w, h), im.mode, im.format or "?"
    except Exception:
        return None


@dataclass
class Inspection:
    spec: Any
    shards: list[ShardCheck]
    shape: Shape
    picked: list[dict[str, Any]]  # samples for the contact sheet, as read (bytes)
    verified: bool

    @property
    def problems(self) -> list[str]:
        out = [p for s in self.shards for p in s.problems()]
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        sh = self.shape
        return {
            "spec": self.spec, "shards": len(self.shards), "samples": sh.samples,
            "bytes": sum(s.bytes for s in self.shards),
            "extensions": dict(sh.extensions.most_common()), "kinds": dict(sh.kinds),
            "empty_captions": sh.kinds["empty caption"],
            "image_formats": dict(sh.image_formats.most_common()), "image_modes": dict(sh.image_modes.most_common()),
            "image_sizes": dict(sh.image_sizes.most_common(10)), "distinct_image_sizes": len(sh.image_sizes),
            "tile_grids": {"tile": sh.tile, "max_side": sh.max_side, **dict(sh.grids.most_common())},
            "numbers": {k: v.summary() for k, v in sh.numbers.items()},
            "sample_problems": {k: {"count": n, "examples": sh.examples.get(k, [])} for k, n in sh.bad.items()},
            "checks": {"verified": self.verified, "manifest": any(s.expected_sha256 for s in self.shards),
                       "problems": self.problems, "ok": self.ok},
            "per_shard": [s.__dict__ for s in self.shards],
        }

    def text(self) -> str:
        d = self.as_dict()
        sh = self.shape
        lines = [f"{d['samples']:,} samples in {d['shards']:,} shards, {d['bytes'] / 1e6:,.1f} MB "
                 f"({d['bytes'] / max(1, d['samples']) / 1e3:,.1f} KB a sample)"]
        lines.append("members: " + _counts(d["extensions"]))
        if d["kinds"]:
            lines.append("samples: " + _counts(d["kinds"]))
        if d["empty_captions"]:
            lines.append(f"empty captions: {d['empty_captions']:,} (vs.tokenize skips and counts them; "
                         "vlmstream pack rejects them)")
        if d["image_formats"]:
            lines.append("images: " + _counts(d["image_formats"]) + "; modes " + _counts(d["image_modes"]))
            lines.append(f"image sizes ({d['distinct_image_sizes']:,} distinct): " + _counts(d["image_sizes"]))
            lines.append(f"tile grids (tile {sh.tile}, max_side {sh.max_side}): "
                         + _counts({k: v for k, v in d["tile_grids"].items() if k not in ("tile", "max_side")}))
        labels = {"turns_per_sample": "turns per sample", "answers_per_sample": "answers per sample",
                  "images_per_sample": "images per sample", "text_chars_per_sample": "text chars per sample",
                  "tokens_per_sample": "tokens per sample", "image_tokens_per_sample": "image tokens per sample",
                  "answer_tokens_per_sample": "answer tokens per sample", "image_width": "image width",
                  "image_height": "image height", "tiles_per_image": "tiles per image (global view included)",
                  "bytes_per_sample": "bytes per sample"}
        width = max(len(v) for v in labels.values())
        lines.append(f"{'':<{width}}  {'min':>8} {'mean':>9} {'median':>8} {'p95':>8} {'max':>8}")
        for k, label in labels.items():
            s = d["numbers"].get(k)
            if s:
                lines.append(f"{label:<{width}}  {_n(s['min']):>8} {s['mean']:>9,.1f} {_n(s['p50']):>8} "
                             f"{_n(s['p95']):>8} {_n(s['max']):>8}")
        for kind, v in d["sample_problems"].items():
            lines.append(f"{kind}: {v['count']:,} samples, e.g. " + "; ".join(v["examples"][:3]))
        c = d["checks"]
        if not c["verified"]:
            lines.append("shards: sha256 not checked (--no-verify)")
        elif not c["manifest"]:
            lines.append("shards: read whole (no manifest to check sha256 and counts against; sha256 in --json)")
        elif c["ok"]:
            lines.append(f"shards: all {d['shards']:,} match the manifest (sha256, samples, bytes)")
        for p in c["problems"]:
            lines.append(f"PROBLEM {p}")
        return "\n".join(lines)


def _n(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def _counts(d: dict[str, int], top: int = 8) -> str:
    items = list(d.items())
    s = ", ".join(f"{k} {v:,}" for k, v in items[:top])
    return s + (f", ... ({len(items) - top} more)" if len(items) > top else "")


def inspect_shards(spec: str | Sequence[str], *, tokenizer: Any = None, tile: int = 512, max_side: int = 2048,
                   pick: int = 0, first: bool = False, seed: int = 0, max_shards: int | None = None,
                   verify: bool = True, progress: bool | None = None, hf_token: str | bool | None = None
                   ) -> Inspection:
    """Read every shard once: the dataset's shape, each shard checked against its manifest entry, and ``pick``
    samples kept for a contact sheet (a seeded reservoir sample, or the first ones with ``first=True``)."""
    from ..errors import redact, redact_spec
    from ..io.http import FetchOptions, HTTPClient, TransferStats
    from ..io.tar import read_tar_samples
    from ..io.urls import open_url
    from ..progress import bar
    from ..stages.shards import resolve

    specs = resolve(spec, hf_token=hf_token)
    if max_shards is not None:
        specs = specs[:max_shards]
    if not specs:
        raise ValueError(f"no shards found for {redact_spec(spec)!r}")
    shape = Shape(tile=tile, max_side=max_side)
    rng = random.Random(seed)
    picked: list[dict[str, Any]] = []
    checks = []
    client = HTTPClient(FetchOptions(), TransferStats())  # one keep-alive connection per host for all the shards
    total = sum(s.bytes for s in specs) if all(s.bytes for s in specs) else None
    with bar(total=total or len(specs), desc="inspect", unit="B" if total else "shard", unit_scale=bool(total),
             enabled=progress) as pb:
        for spec_ in specs:
            shown = redact(spec_.url)  # what the report and the samples' __url__ show
            chk = ShardCheck(shown, expected_samples=spec_.samples, expected_bytes=spec_.bytes,
                             expected_sha256=spec_.sha256)
            checks.append(chk)
            try:
                with open_url(spec_.url, client=client, hf_token=hf_token) as f:
                    r = HashingReader(f, verify)
                    for sample in read_tar_samples(r, shown):
                        shape.add(sample, tokenizer)
                        chk.samples += 1
                        if pick:
                            seen = shape.samples
                            if len(picked) < pick:
                                picked.append(sample)
                            elif not first:
                                j = rng.randrange(seen)
                                if j < pick:
                                    picked[j] = sample
                    r.drain()
                    chk.bytes = r.bytes
                    if verify:
                        chk.sha256 = r.sha256.hexdigest()
            except Exception as e:  # a bad shard is reported, and the others are still read
                chk.error = f"{type(e).__name__}: {e}"
            pb.update(chk.bytes if total else 1)
            pb.set_postfix(samples=shape.samples, refresh=False)
    if not first:
        picked.sort(key=lambda s: (s["__url__"], s["__index__"]))
    return Inspection(redact_spec(spec), checks, shape, picked, verify)


# ------------------------------------------------------------------------------------------------ contact sheet

ROLE_COLORS = {"system": (110, 110, 110), "user": (20, 70, 170), "assistant": (20, 120, 50)}
GRID_COLOR = (255, 40, 40)
FRAME_COLOR = (255, 170, 0)


@dataclass(frozen=True)
class SheetLayout:
    columns: int = 2
    cell: int = 256  # side of the square where a sample's images are drawn
    text_width: int = 420
    font_size: int = 14
    pad: int = 12

    @property
    def line_h(self) -> int:
        return int(self.font_size * 1.4)

    @property
    def cell_w(self) -> int:
        return self.pad * 3 + self.cell + self.text_width

    @property
    def cell_h(self) -> int:
        return self.pad * 2 + self.line_h * 3 + self.cell  # header line, images, two label lines

    @property
    def title_h(self) -> int:
        return self.pad * 2 + self.line_h * 2

    def size(self, n: int) -> tuple[int, int]:
        """The sheet's (width, height) for n samples."""
        cols = max(1, min(self.columns, n))
        rows = max(1, math.ceil(n / cols))
        return cols * self.cell_w, self.title_h + rows * self.cell_h


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap by rendered width; words longer than a line are cut."""
    out: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            cand = f"{line} {word}" if line else word
            if font.getlength(cand) <= width:
                line = cand
                continue
            if line:
                out.append(line)
            while font.getlength(word) > width and len(word) > 1:
                k = max(1, int(len(word) * width / font.getlength(word)))
                out.append(word[:k])
                word = word[k:]
            line = word
        out.append(line)
    return out


def draw_tiled(im: Any, box: tuple[int, int, int, int], grid: tuple[int, int], draw: Any, canvas: Any) -> None:
    """Paste the image scaled into box (x, y, w, h), then draw its tile grid over it."""
    from PIL import Image

    x, y, bw, bh = box
    w, h = im.size
    scale = min(bw / w, bh / h)
    dw, dh = max(1, round(w * scale)), max(1, round(h * scale))
    im = im.resize((dw, dh), Image.NEAREST if scale >= 2 else Image.BILINEAR)
    ox, oy = x + (bw - dw) // 2, y + (bh - dh) // 2
    canvas.paste(im, (ox, oy))
    rows, cols = grid
    for j in range(1, cols):
        gx = ox + round(j * dw / cols)
        draw.line([(gx, oy), (gx, oy + dh - 1)], fill=GRID_COLOR, width=2)
    for i in range(1, rows):
        gy = oy + round(i * dh / rows)
        draw.line([(ox, gy), (ox + dw - 1, gy)], fill=GRID_COLOR, width=2)
    draw.rectangle([ox, oy, ox + dw - 1, oy + dh - 1], outline=GRID_COLOR if (rows, cols) != (1, 1) else FRAME_COLOR,
                   width=2)


def contact_sheet(samples: Sequence[dict[str, Any]], *, tile: int = 512, max_side: int = 2048,
                  layout: SheetLayout = SheetLayout(), title: str = "", fonts: Sequence[str] | None = None) -> Any:
    """A PIL image: per sample its images with the tile grid drawn over them, beside its conversation.

    ``fonts``: font files for the characters Pillow's default font lacks (CJK, emoji, ...), tried in order for
    each; None: Noto Sans CJK and Noto Color Emoji where installed (`fonts.find_fonts`). Characters no font has
    show as boxes, with one warning line."""
    from PIL import Image, ImageDraw

    from ..stages.decode import open_image
    from .fonts import SheetFont, find_fonts, warn_missing

    L = layout
    n = len(samples)
    W, H = L.size(n)
    cols = max(1, min(L.columns, n))
    sheet = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    fonts = find_fonts() if fonts is None else fonts
    font, small = SheetFont(L.font_size, fonts), SheetFont(max(8, L.font_size - 2), fonts)
    font.draw(sheet, (L.pad, L.pad), title or "vlmstream contact sheet", fill=(0, 0, 0))
    small.draw(sheet, (L.pad, L.pad + L.line_h), f"{n} samples; tile grids of vs.ImageTiles(tile={tile}, "
               f"max_side={max_side}): red lines cut the tiles, a global view is added unless the grid is 1x1",
               fill=(90, 90, 90))
    for i, s in enumerate(samples):
        cx, cy = (i % cols) * L.cell_w, L.title_h + (i // cols) * L.cell_h
        d.rectangle([cx + 2, cy + 2, cx + L.cell_w - 3, cy + L.cell_h - 3], outline=(215, 215, 215))
        where = f"{s.get('__key__', '?')}  {os.path.basename(str(s.get('__url__', '?')))} #{s.get('__index__', '?')}"
        font.draw(sheet, (cx + L.pad, cy + L.pad), where, fill=(0, 0, 0))
        try:
            conv = conversation_from_sample(s)
            messages, images = conv.messages, conv.images
        except FormatError as e:
            messages, images = [{"role": "system", "content": f"(not a conversation: {e})"}], sorted(
                k for k in s if not k.startswith("__") and is_image_ext(k))
        top = cy + L.pad + L.line_h
        labels = []
        k = max(1, len(images))
        gap = 6
        each = (L.cell - gap * (k - 1)) // k
        for j, ext in enumerate(images):
            try:
                im = open_image(s[ext])
            except Exception as e:
                labels.append(f"{ext}: unreadable ({type(e).__name__})")
                continue
            tw, th = tiled_size(im.width, im.height, tile, max_side)
            grid = grid_of(tw, th, tile)
            draw_tiled(im, (cx + L.pad, top + j * (each + gap), L.cell, each), grid, d, sheet)
            glob = " + global" if grid != (1, 1) else ""
            labels.append(f"{ext} {im.width}x{im.height} -> {grid[0]}x{grid[1]} tiles{glob}")
        for j, text in enumerate(_fit_lines(labels, small, L.cell + L.pad, 2)):
            small.draw(sheet, (cx + L.pad, top + L.cell + 4 + j * L.line_h), text, fill=(60, 60, 60))
        # the conversation, wrapped beside the images
        tx, ty = cx + L.pad * 2 + L.cell, top
        bottom = cy + L.cell_h - L.pad - L.line_h
        img_no = 0
        for m in messages:
            content = m["content"]
            while IMAGE_PLACEHOLDER in content:
                content = content.replace(IMAGE_PLACEHOLDER, f"[image {img_no}]", 1)
                img_no += 1
            lines = _wrap(f"{m['role']}: {content}", font, L.text_width)
            for line in lines:
                if ty > bottom:
                    font.draw(sheet, (tx, ty), "...", fill=(0, 0, 0))
                    break
                font.draw(sheet, (tx, ty), line, fill=ROLE_COLORS.get(m["role"], (0, 0, 0)))
                ty += L.line_h
            else:
                continue
            break
    warn_missing([font, small])
    return sheet


def _fit_lines(labels: list[str], font: Any, width: int, n: int) -> list[str]:
    text = "; ".join(labels)
    return _wrap(text, font, width)[:n]


def write_contact_sheet(path: str, samples: Sequence[dict[str, Any]], **kw: Any) -> tuple[int, int]:
    sheet = contact_sheet(samples, **kw)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    return sheet.size


__all__ = ["Inspection", "SheetLayout", "contact_sheet", "image_info", "inspect_shards", "write_contact_sheet"]
