"""The contact sheet's text: CJK and emoji drawn from fonts that have them (Noto, installed by `make test`'s
system-deps), each character of a mixed line from the first font with its glyph; Pillow's default font and one
warning line where none is installed."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image, ImageChops

from vlmstream.cli import fonts as sheet_fonts
from vlmstream.cli import main as cli
from vlmstream.cli.inspect import contact_sheet
from vlmstream.dataset.format import write_manifest
from vlmstream.dataset.writer import ShardWriter


def found(word):
    return next((p for p in sheet_fonts.find_fonts() if word in p), None)


CJK, EMOJI = found("CJK"), found("Emoji")
needs_fonts = pytest.mark.skipif(not (CJK and EMOJI), reason="Noto Sans CJK or Noto Color Emoji not installed "
                                 "(apt-get install fonts-noto-cjk fonts-noto-color-emoji: `make system-deps`)")


def png():
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


def sheet_of(caption, **kw):
    sample = {"__key__": "000000", "__url__": "s.tar", "__index__": 0, "png": png(), "txt": caption.encode()}
    return contact_sheet([sample], tile=32, max_side=64, **kw)


def differ(a, b):
    return ImageChops.difference(a, b).getbbox() is not None


def yellow(im):
    """Pixels of an emoji face's yellow: no text colour of the sheet comes near it."""
    a = np.asarray(im, dtype=np.int32)
    return int(((a[..., 0] > 200) & (a[..., 1] > 150) & (a[..., 2] < 100)).sum())


@needs_fonts
def test_cjk_and_emoji_captions_draw_their_glyphs_not_boxes(caplog):
    with caplog.at_level(logging.WARNING, logger="vlmstream"):
        cat, text = sheet_of("中"), sheet_of("文")
        smile, kitten = sheet_of("😀"), sheet_of("🐱")
    assert differ(cat, text)  # two ideographs: two glyphs (a font without them draws one box for both)
    assert differ(smile, kitten) and yellow(smile) > 20 and yellow(cat) == 0  # the emoji, in colour
    assert caplog.records == []
    plain = sheet_of("a plain caption")
    assert not differ(plain, sheet_of("a plain caption", fonts=[]))  # Latin text looks as it did


@needs_fonts
def test_a_mixed_line_takes_each_glyph_from_a_font_that_has_it():
    font = sheet_fonts.SheetFont(14)
    default, cjk, emoji = font.faces
    runs = font.runs("a cat 猫 😺👍🏽 ok")
    assert [(face, text) for face, text in runs] == [(default, "a cat "), (cjk, "猫"), (default, " "),
                                                      (emoji, "😺👍🏽"), (default, " ok")]
    assert emoji.scale < 1 and font.missing == set()  # the colour bitmaps drawn at 109 px, scaled to the line
    mixed, other = sheet_of("cat 猫 😺 dog"), sheet_of("cat 犬 🐶 dog")
    assert differ(mixed, other) and yellow(mixed) > 20


def test_without_the_fonts_the_default_font_draws_and_one_line_warns(monkeypatch, caplog):
    monkeypatch.setattr(sheet_fonts, "FALLBACK_FONTS", (("No Such Font Family", ("/nonexistent/font.ttf",)),))
    assert sheet_fonts.find_fonts() == []  # fc-match's stand-in for an unknown family is not taken
    with caplog.at_level(logging.WARNING, logger="vlmstream"):
        plain = sheet_of("a plain caption")
        assert caplog.records == []
        cat, text = sheet_of("中 😀"), sheet_of("文 🐱")
    assert not differ(cat, text)  # boxes, as Pillow's default font has no such glyphs
    assert plain.size == cat.size
    assert len(caplog.records) == 2  # one line for each sheet
    message = caplog.records[0].getMessage()
    assert "no font has glyphs for 2 characters" in message and "中 😀" in message
    assert "fonts-noto-cjk" in message and "--font" in message


@needs_fonts
def test_inspect_font_option(tmp_path, capsys, caplog):
    w = ShardWriter(str(tmp_path), prefix="s", maxcount=10)
    w.write("000000", [("png", png()), ("txt", "一只猫 🐱".encode())])
    write_manifest(str(tmp_path / "index.json"), w.close())
    sheet = tmp_path / "sheet.png"
    argv = ["inspect", str(tmp_path / "index.json"), "--sheet", str(sheet), "--tile", "32", "--max-side", "64"]
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--font", str(tmp_path / "missing.ttf")])
    assert e.value.code == 2 and "no font file" in capsys.readouterr().err and not sheet.exists()
    with caplog.at_level(logging.WARNING, logger="vlmstream"):
        assert cli.main(argv + ["--font", CJK]) == 0  # CJK only: the cat's emoji shows as a box, and is named
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "no font has glyphs for 1 characters of its text (🐱)" in messages[0]
    assert sheet.exists()
