"""Fonts for text beyond Western European: Greek, Cyrillic, Arabic, Hebrew, Chinese/Japanese/Korean.

reportlab's built-in fonts only encode WinAnsi (cp1252), so anything else used to be faxed as
``?``.  The fonts that cover the rest ship with the package (``fonts/``), because a fresh machine
has no system fonts to borrow and PyPI has no well-kept font package for them:

- DejaVu Sans Mono Bold, DejaVu Sans, DejaVu Sans Bold (Bitstream Vera licence): Latin, Greek,
  Cyrillic, Arabic, Hebrew and many symbols;
- WenQuanYi Micro Hei (Apache-2.0): Chinese, Japanese kana, Korean hangul.  It has TrueType
  outlines, which reportlab can embed; the Noto CJK fonts on PyPI are CFF-based and it cannot.

Each character is drawn in the first font of a chain that has a glyph for it; a character no
font has is drawn as ``?`` and reported by `undrawable` so the sender is told.  Right-to-left
lines are shaped (Arabic letters joined, arabic-reshaper) and put in visual order (python-bidi)
before drawing, because reportlab draws glyphs strictly left to right.
"""

from __future__ import annotations

import logging
import threading
import unicodedata
from collections.abc import Iterable
from importlib import resources

import arabic_reshaper
from bidi import get_display
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen.canvas import Canvas

__all__ = ["MONO", "SANS", "BOLD", "Run", "draw_line", "line_width", "runs", "split_width",
           "undrawable", "visual"]

log = logging.getLogger(__name__)

# (reportlab name, file in fonts/, sub-font index for collections)
_FONT_FILES: dict[str, tuple[str, int]] = {
    "FaxgwMono-Bold": ("DejaVuSansMono-Bold.ttf", 0),
    "FaxgwSans": ("DejaVuSans.ttf", 0),
    "FaxgwSans-Bold": ("DejaVuSans-Bold.ttf", 0),
    "FaxgwCJK": ("wqy-microhei.ttc", 0),
}
# Chains, first choice first.  The mono chain keeps text bodies in columns where it can.
MONO: tuple[str, ...] = ("FaxgwMono-Bold", "FaxgwSans-Bold", "FaxgwCJK")
SANS: tuple[str, ...] = ("FaxgwSans", "FaxgwCJK")
BOLD: tuple[str, ...] = ("FaxgwSans-Bold", "FaxgwCJK")
MISSING = "?"

Run = tuple[str, str]  # (font name, text)
_ARABIC = ((0x0600, 0x06FF), (0x0750, 0x077F), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF))

_lock = threading.Lock()
_cmaps: dict[str, frozenset[int]] = {}


def _load() -> dict[str, frozenset[int]]:
    """Register the fonts with reportlab once per process and remember what each can draw."""
    if _cmaps:
        return _cmaps
    with _lock:
        if not _cmaps:
            folder = resources.files("gateway.documents") / "fonts"
            loaded: dict[str, frozenset[int]] = {}
            for name, (filename, index) in _FONT_FILES.items():
                with resources.as_file(folder / filename) as path:
                    font = TTFont(name, str(path), subfontIndex=index)
                pdfmetrics.registerFont(font)
                # charToGlyph: reportlab's cmap of the font (code point -> glyph id).  The
                # tests fail if it goes away (test_convert: the glyph checks).
                codes = frozenset(font.face.charToGlyph)
                if name == MONO[0]:  # its Arabic is unjoined and cramped: use DejaVu Sans's
                    codes = frozenset(c for c in codes if not any(lo <= c <= hi
                                                                  for lo, hi in _ARABIC))
                loaded[name] = codes
            _cmaps.update(loaded)
    return _cmaps


def _invisible(char: str) -> bool:
    return char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Mn", "Zl", "Zp")


def undrawable(text: str, chain: tuple[str, ...] = MONO) -> list[str]:
    """Distinct characters of ``text`` that no font in ``chain`` can draw, in order of
    appearance."""
    cmaps = _load()
    seen: dict[str, None] = {}
    for char in text:
        if char in seen or _invisible(char):
            continue
        if not any(ord(char) in cmaps[font] for font in chain):
            seen[char] = None
    return list(seen)


def runs(text: str, chain: tuple[str, ...]) -> list[Run]:
    """Split a line into runs, each in the first font of ``chain`` that has its glyphs."""
    cmaps = _load()
    out: list[Run] = []
    for char in text:
        code = ord(char)
        font = next((f for f in chain if code in cmaps[f]), None)
        if font is None:
            if unicodedata.category(char) in ("Cc", "Cf", "Mn"):
                continue  # a mark or format character no font has: nothing to see
            font, char = chain[0], MISSING
        if out and out[-1][0] == font:
            out[-1] = (font, out[-1][1] + char)
        else:
            out.append((font, char))
    return out


def line_width(text: str, chain: tuple[str, ...], size: float) -> float:
    return sum(pdfmetrics.stringWidth(t, f, size) for f, t in runs(text, chain))


_RTL = frozenset({"R", "AL"})


def visual(line: str) -> tuple[str, bool]:
    """(the line in drawing order, whether it reads right to left).

    Lines without right-to-left characters come back unchanged.  Arabic is shaped first so
    that letters take their joined forms, then the whole line is reordered by the Unicode
    bidirectional algorithm; the base direction is that of the first strong character.
    """
    if not any(unicodedata.bidirectional(c) in _RTL for c in line):
        return line, False
    rtl = next((unicodedata.bidirectional(c) in _RTL for c in line
                if unicodedata.bidirectional(c) in ("L", "R", "AL")), False)
    return get_display(arabic_reshaper.reshape(line)), rtl


def draw_line(canvas: Canvas, x: float, y: float, line: str, chain: tuple[str, ...],
              size: float, right: float | None = None) -> None:
    """Draw one logical line; right-to-left lines are set flush against ``right`` if given."""
    shown, rtl = visual(line)
    parts = runs(shown, chain)
    if rtl and right is not None:
        x = right - sum(pdfmetrics.stringWidth(t, f, size) for f, t in parts)
    for font, text in parts:
        canvas.setFont(font, size)
        canvas.drawString(x, y, text)
        x += pdfmetrics.stringWidth(text, font, size)


def split_width(text: str, chain: tuple[str, ...], size: float, max_w: float) -> list[str]:
    """Wrap at spaces to ``max_w`` points; a word wider than the line (or CJK) breaks anywhere."""
    lines: list[str] = []
    current = ""
    for word in _words(text):
        candidate = current + word
        if not current or line_width(candidate, chain, size) <= max_w:
            current = candidate
        else:
            lines.append(current.rstrip())
            current = word.lstrip()
        while len(current) > 1 and line_width(current, chain, size) > max_w:
            low, high = 1, len(current) - 1  # the longest prefix that fits, by bisection
            while low < high:
                mid = (low + high + 1) // 2
                if line_width(current[:mid], chain, size) <= max_w:
                    low = mid
                else:
                    high = mid - 1
            lines.append(current[:low])
            current = current[low:]
    if current.strip() or not lines:
        lines.append(current.rstrip())
    return lines


def _words(text: str) -> Iterable[str]:
    """Words with their leading space; every wide (CJK) character is a word of its own."""
    word = ""
    for char in text:
        if char == " " and word.strip():
            yield word
            word = ""
        if unicodedata.east_asian_width(char) in ("W", "F"):
            if word:
                yield word
            yield char
            word = ""
        else:
            word += char
    if word:
        yield word
