"""Text of the contact sheet in a chain of fonts, so that CJK and emoji captions show their glyphs.

Pillow's default font has Latin letters only: anything else comes out as empty boxes. The sheet draws each run
of characters with the first font of its chain that has their glyphs: Pillow's default font first (the sheet's
look), then the fonts given, or by default Noto Sans CJK and Noto Color Emoji where installed (Debian's
``fonts-noto-cjk`` and ``fonts-noto-color-emoji``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import unicodedata
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger("vlmstream")

# The fonts searched for, by family: the first of its files that exists (Debian and Ubuntu, Fedora, Arch), else
# the file fontconfig's fc-match gives for the family, where that is the family.
FALLBACK_FONTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Noto Sans CJK", ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
                       "/usr/share/fonts/google-noto-sans-cjk-fonts/NotoSansCJK-Regular.ttc",
                       "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
                       "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc")),
    ("Noto Color Emoji", ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
                          "/usr/share/fonts/google-noto-color-emoji-fonts/NotoColorEmoji.ttf",
                          "/usr/share/fonts/noto/NotoColorEmoji.ttf")),
)
INSTALL_HINT = "install fonts-noto-cjk and fonts-noto-color-emoji (Debian, Ubuntu) or pass --font"

_UNMAPPED = "\U0010FFFD"  # a private-use code point no font maps: a font draws its "missing glyph" box for it
_BITMAP_SIZE = 109  # the one size of Noto Color Emoji's bitmaps (CBDT): drawn at it, then scaled to the line


def _fc_match(family: str) -> str | None:
    if shutil.which("fc-match") is None:
        return None
    try:
        out = subprocess.run(["fc-match", "-f", "%{family}\t%{file}", family], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    got, _, path = out.partition("\t")
    return path if got.startswith(family) and os.path.isfile(path) else None  # not a stand-in such as DejaVu


def find_fonts() -> list[str]:
    """The font files the sheet falls back on by default: one per family of `FALLBACK_FONTS` that is installed."""
    found = []
    for family, paths in FALLBACK_FONTS:
        path = next((p for p in paths if os.path.isfile(p)), None) or _fc_match(family)
        if path:
            found.append(path)
    return found


def default_font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        return ImageFont.load_default()


def _attaches(ch: str) -> bool:
    """Drawn with the character before it: combining marks, joiners, variation selectors, skin tones."""
    return unicodedata.category(ch) in ("Mn", "Me", "Cf") or "\U0001F3FB" <= ch <= "\U0001F3FF"


class _Face:
    """One font of the chain, and which characters it has a glyph for."""

    def __init__(self, font: Any, scale: float = 1.0):
        self.font, self.scale = font, scale  # scale < 1: a bitmap font drawn at its own size, scaled down
        self.vector = isinstance(font, ImageFont.FreeTypeFont)
        self.ascent = font.getmetrics()[0] if self.vector else 0
        self._has: dict[str, bool] = {}
        self._missing = self._look(_UNMAPPED)

    @classmethod
    def load(cls, path: str, size: int) -> _Face:
        try:
            return cls(ImageFont.truetype(path, size))
        except OSError as e:
            if "invalid pixel size" not in str(e):
                raise ValueError(f"font {path!r} cannot be opened: {e}") from None
        return cls(ImageFont.truetype(path, _BITMAP_SIZE), size / _BITMAP_SIZE)  # a colour bitmap font

    def _look(self, ch: str) -> tuple[Any, ...]:
        """What the font draws for ch: box, advance and pixels (its missing-glyph box for what it lacks)."""
        box = self.font.getbbox(ch)
        im = Image.new("L", (max(1, box[2] - box[0]), max(1, box[3] - box[1])))
        ImageDraw.Draw(im).text((-box[0], -box[1]), ch, font=self.font, fill=255)
        return box, self.font.getlength(ch), im.tobytes()

    def has(self, ch: str) -> bool:
        if ch not in self._has:
            self._has[ch] = self._look(ch) != self._missing
        return self._has[ch]

    def length(self, text: str) -> float:
        return self.font.getlength(text) * self.scale

    def draw(self, canvas: Image.Image, x: float, y: int, baseline: int, text: str, fill: Any) -> None:
        if self.scale == 1.0:
            if self.vector:
                ImageDraw.Draw(canvas).text((x, baseline), text, font=self.font, fill=fill, anchor="ls")
            else:  # a bitmap font without anchors: by its top left corner
                ImageDraw.Draw(canvas).text((x, y), text, font=self.font, fill=fill)
            return
        left, top, right, bottom = self.font.getbbox(text, anchor="ls")
        im = Image.new("RGBA", (max(1, right - left), max(1, bottom - top)))
        ImageDraw.Draw(im).text((-left, -top), text, font=self.font, anchor="ls", embedded_color=True)
        s = self.scale
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.LANCZOS)
        canvas.paste(im, (round(x + left * s), round(baseline + top * s)), im)


class SheetFont:
    """Text in a chain of fonts, each run of characters drawn with the first font that has their glyphs:
    Pillow's default font, then `paths` (font files; None: `find_fonts()`). What no font has is drawn by the
    first (a box) and remembered in `missing`."""

    def __init__(self, size: int, paths: Sequence[str] | None = None):
        paths = find_fonts() if paths is None else paths
        self.faces = [_Face(default_font(size))] + [_Face.load(p, size) for p in paths]
        self.missing: set[str] = set()

    def runs(self, text: str) -> list[tuple[_Face, str]]:
        """text cut into (face, characters) runs, each character in the first face that has it."""
        out: list[tuple[_Face, str]] = []
        for ch in text:
            if out and _attaches(ch):
                out[-1] = (out[-1][0], out[-1][1] + ch)
                continue
            face = next((f for f in self.faces if f.has(ch)), None)
            if face is None:
                if not unicodedata.category(ch).startswith("C"):  # a control character has no glyph anywhere
                    self.missing.add(ch)
                face = self.faces[0]
            if out and out[-1][0] is face:
                out[-1] = (face, out[-1][1] + ch)
            else:
                out.append((face, ch))
        return out

    def getlength(self, text: str) -> float:
        return sum(face.length(run) for face, run in self.runs(text))

    def draw(self, canvas: Image.Image, xy: tuple[float, int], text: str, fill: Any) -> None:
        """Draw text with its top-left corner at xy, as ImageDraw.text draws it with the first font alone."""
        x, y = xy
        baseline = y + self.faces[0].ascent  # every run on the first font's baseline
        for face, run in self.runs(text):
            face.draw(canvas, x, y, baseline, run, fill)
            x += face.length(run)


def warn_missing(fonts: Sequence[SheetFont]) -> None:
    """One warning line for the characters of a sheet that no font had: they show as boxes."""
    missing = sorted(set().union(*(f.missing for f in fonts)))
    if missing:
        shown = " ".join(missing[:12]) + (" ..." if len(missing) > 12 else "")
        log.warning("contact sheet: no font has glyphs for %d characters of its text (%s): they show as boxes; %s",
                    len(missing), shown, INSTALL_HINT)
