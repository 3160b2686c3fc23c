"""Turn what senders attach (scans, photos, text, PDFs, office files) into fax-ready PDF pages.

Pure and CPU-bound: callers run these functions in a worker thread or process, never on the
event loop.  Fax providers rasterise what we send at about 204x196 dpi in black and white, and
the field notes list what breaks there: min-is-black TIFFs that come out as negatives, pages
cut off because they are Legal or landscape, fillable forms whose values vanish, encrypted
PDFs.  So every page leaves here portrait, no larger than the chosen paper, with forms baked
into the page content, and images no sharper than a fax can show (which also keeps the PDF
small enough to upload and fetch quickly).

Every limit is explicit (``Limits``) and every failure a sender can fix raises
``ConvertError`` whose text is one plain ASCII line meant for the sender's bounce.

Library choices: Pillow decodes images and writes each prepared page image with its PDF
writer, which stores bilevel images as CCITT G4 (tiny) and grayscale as JPEG; pypdf, which the
gateway already uses, places those images on paper-sized pages and normalises PDFs; reportlab
typesets text with the built-in fonts; pypdfium2 renders thumbnails.
"""

from __future__ import annotations

import gc
import io
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError
from pypdf import PageObject, PdfReader, PdfWriter
from pypdf.errors import PyPdfError
from pypdf.generic import (
    ArrayObject,
    DecodedStreamObject,
    DictionaryObject,
    IndirectObject,
    NameObject,
    NumberObject,
    PdfObject,
    RectangleObject,
    StreamObject,
)

if TYPE_CHECKING:
    from reportlab.pdfgen.canvas import Canvas

# reportlab and fonts.py (with the shaping libraries) are imported by what typesets text (text
# pages, the cover page): a worker that has only faxed PDFs and images never loads them
# (~60 ms of CPU and ~12 MB at a worker's first task).

__all__ = [
    "PAPER",
    "ConvertError",
    "Limits",
    "cover_page",
    "image_to_pdf",
    "merge_pdfs",
    "normalize_pdf",
    "text_to_pdf",
]

log = logging.getLogger(__name__)

# A PDF transformation matrix (a b c d e f): x' = a*x + c*y + e, y' = b*x + d*y + f.
Matrix = tuple[float, float, float, float, float, float]

PAPER: dict[str, tuple[float, float]] = {"letter": (612, 792), "a4": (595.28, 841.89)}

# Fine fax resolution.  Pixels beyond this are invisible at the far end and only make the PDF
# bigger, so images are downsampled to it (square pixels at the higher of the two).
FAX_DPI = 204
# White border kept around images: fax machines cannot print to the edge and providers stamp a
# header line across the top.
IMAGE_MARGIN_PT = 18.0
# Scanners write their real resolution; anything outside this range is a placeholder (JFIF
# aspect-only densities of 1, bogus 0 or huge values) and 72 dpi is assumed instead.
PLAUSIBLE_DPI = (36.0, 2400.0)
# Downsampled bilevel scans are re-thresholded on the dark side of middle grey so thin strokes
# survive the reduction.
BILEVEL_THRESHOLD = 160
# Allowed input formats: restricting Image.open to these keeps Pillow away from plugins that
# shell out (EPS runs Ghostscript) or that nobody faxes.
IMAGE_FORMATS = ("TIFF", "JPEG", "PNG", "GIF", "BMP", "WEBP")  # JPEG covers MPO
MULTI_PAGE_FORMATS = frozenset({"TIFF", "GIF"})  # MPO/APNG/WebP extra frames are not pages

TEXT_FONT = "Courier-Bold"  # monospace keeps legacy reports' columns; bold survives fax
TEXT_SIZE_PT = 11.0
TEXT_LEADING_PT = 13.0
TEXT_MARGIN_X_PT = 32.0  # 80 columns fit on A4 at 11 pt
TEXT_MARGIN_Y_PT = 40.0
TAB_SIZE = 8
HEADER_FONT = "Helvetica-Bold"

# Reduced page images held before they are encoded into a PDF part (image_to_pdf).
PREPARED_BYTES = 48 * 1024 * 1024
MAX_ANNOTATIONS_PER_PAGE = 2000
MAX_COVER_NOTE_CHARS = 5000
FIT_TOLERANCE_PT = 1.0

# What pypdf raises on damaged or hostile files besides its own errors; it has no single base.
_PDF_ERRORS: tuple[type[BaseException], ...] = (
    PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError,
    RecursionError, ArithmeticError, AssertionError,
)
_IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, EOFError,
    SyntaxError, IndexError, KeyError, TypeError, ZeroDivisionError,
)


_LABEL_JUNK = re.compile(r"[^\x20-\x7e]")
_TEXT_TRANSLATE = str.maketrans({
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2212": "-", "\u2043": "-",
    "\u2002": " ", "\u2003": " ", "\u2009": " ", "\u200a": " ", "\u202f": " ", "\u2007": " ",
    "\u200b": "", "\u200c": "", "\u200d": "", "\ufeff": "", "\u00ad": "",
    "\u2024": ".", "\u2215": "/", "\u2044": "/", "\u2236": ":", "\u02bc": "'", "\u2032": "'",
    "\u2033": '"', "\u2264": "<=", "\u2265": ">=", "\u2260": "!=", "\u2192": "->",
    "\u2190": "<-", "\u21d2": "=>", "\u2713": "v", "\u2714": "v",
})
# Characters the built-in fonts can draw: reportlab encodes them with WinAnsiEncoding.
_CP1252 = frozenset(
    bytes(b for b in range(0x20, 0x100) if b != 0x7f).decode("cp1252", errors="ignore")
)


class ConvertError(ValueError):
    """A document cannot be made into fax pages; ``str(err)`` is one ASCII line for the sender."""


@dataclass(frozen=True)
class Limits:
    """Work bounds for one conversion, so one hostile or absurd attachment cannot exhaust the
    worker: pages per document, decoded pixels per image frame (the decompression-bomb guard,
    checked from the header before any pixel is decoded) and characters of text."""

    max_pages: int = 200
    max_image_pixels: int = 60_000_000
    max_text_chars: int = 200_000


# --------------------------------------------------------------------------- shared helpers


def _label(name: str | None) -> str:
    """The file name as the sender will see it in the bounce: one ASCII line, bounded."""
    text = _LABEL_JUNK.sub("?", " ".join((name or "").split()))[:80]
    return text or "the attachment"


def _paper(paper: str) -> tuple[float, float]:
    try:
        return PAPER[paper.lower()]
    except KeyError:
        raise ValueError(f"unknown paper {paper!r}; expected one of {sorted(PAPER)}") from None


def _too_many_pages(label: str, pages: int, limits: Limits) -> ConvertError:
    return ConvertError(f"{label} has {pages} pages; at most {limits.max_pages} pages per fax")


def _num(value: float) -> str:
    """A PDF number without exponent or float noise."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _cm(matrix: Matrix) -> str:
    return " ".join(_num(v) for v in matrix) + " cm"


def _indirect(writer: PdfWriter, obj: PdfObject) -> IndirectObject:
    """`obj` as an indirect object of `writer`: its own reference if it is one already, else
    a new one through pypdf's public `clone` (an object whose `indirect_reference` is None is
    registered in the writer it is cloned into; PdfWriter has no public add_object)."""
    ref = getattr(obj, "indirect_reference", None)  # a new object has none yet
    if ref is not None and ref.pdf is writer:
        return ref
    obj.indirect_reference = None
    ref = obj.clone(writer).indirect_reference
    assert ref is not None, "pypdf's clone did not register the object"
    return ref


def _new_stream(writer: PdfWriter, data: bytes) -> IndirectObject:
    stream = DecodedStreamObject()
    stream.set_data(data)
    return _indirect(writer, stream)


def _wrap_contents(writer: PdfWriter, page: PageObject, before: bytes,
                   after: bytes) -> None:
    """Put streams around a page's content without decoding or editing the original streams,
    which may be large and may be shared with other pages."""
    old = page.get("/Contents")
    refs: list[IndirectObject] = []
    if old is not None:
        obj = old.get_object()
        items = list(obj) if isinstance(obj, ArrayObject) else [old]
        for item in items:
            refs.append(item if isinstance(item, IndirectObject)
                        else _indirect(writer, item.get_object()))
    contents = ArrayObject([_new_stream(writer, before), *refs, _new_stream(writer, after)])
    page[NameObject("/Contents")] = contents


# --------------------------------------------------------------------------- images


def image_to_pdf(data: bytes, name: str, paper: str, limits: Limits) -> tuple[bytes, int]:
    """Make every frame of a scan or photo one fax page; returns (PDF bytes, page count).

    Bilevel input stays bilevel and is stored CCITT G4, so a full scanned page costs tens of
    kilobytes; anything else becomes 8-bit grayscale JPEG, because colour is lost on a fax and
    the provider's own halftoning of grayscale beats ours.  Images are never cropped or
    enlarged past their own size, rotated to portrait when that shows them bigger, and reduced
    to fax resolution.
    """
    paper_w, paper_h = _paper(paper)
    label = _label(name)
    # Frame by frame: decoded, reduced to fax resolution, and once the reduced pages held
    # reach PREPARED_BYTES, encoded into a PDF part and let go. Memory is then one frame being
    # decoded plus PREPARED_BYTES plus the compressed parts, whatever the number of frames
    # (300 fax-resolution grey pages held at once were over a gigabyte).
    prepared: list[tuple[Image.Image, float, float]] = []
    held = 0
    parts: list[bytes] = []
    pages = 0
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            frames = getattr(im, "n_frames", 1) if im.format in MULTI_PAGE_FORMATS else 1
            if frames > limits.max_pages:
                raise _too_many_pages(label, frames, limits)
            for index, frame in enumerate(ImageSequence.Iterator(im)):
                if index >= frames:
                    break
                width, height = frame.size  # from the header: nothing decoded yet
                if width * height > limits.max_image_pixels:
                    raise ConvertError(
                        f"{label} is too large an image ({width} x {height} pixels); at most "
                        f"{limits.max_image_pixels // 1_000_000} megapixels")
                page = _prepare_frame(frame, paper_w, paper_h)
                prepared.append(page)
                held += _held_bytes(page[0])
                pages += 1
                if held >= PREPARED_BYTES:
                    parts.append(_place_images(prepared, paper_w, paper_h))
                    prepared, held = [], 0
                    # pypdf's objects hold reference cycles that keep each part's pages
                    # alive until the cyclic collector runs: without this the bound is not
                    # one (150 grey pages peaked at 415 MB; with it, 165 MB).
                    gc.collect()
    except ConvertError:
        raise
    except Image.DecompressionBombError as exc:
        raise ConvertError(f"{label} is too large an image; at most "
                           f"{limits.max_image_pixels // 1_000_000} megapixels") from exc
    except _IMAGE_ERRORS as exc:
        log.info("unreadable image %s: %s: %s", label, type(exc).__name__, exc)
        raise ConvertError(f"{label} could not be read as an image") from exc
    if prepared:
        parts.append(_place_images(prepared, paper_w, paper_h))
    if not parts:
        raise ConvertError(f"{label} could not be read as an image")
    return merge_pdfs(parts), pages


def _held_bytes(im: Image.Image) -> int:
    """What a prepared page costs in memory: 1 bit a pixel bilevel, 8 grey."""
    return (im.width * im.height + 7) // 8 if im.mode == "1" else im.width * im.height


def _dpi(im: Image.Image) -> tuple[float, float]:
    dpi = im.info.get("dpi")
    try:
        x, y = float(dpi[0]), float(dpi[1])  # type: ignore[index]
    except (TypeError, ValueError, IndexError):
        return 72.0, 72.0
    low, high = PLAUSIBLE_DPI
    if not (low <= x <= high and low <= y <= high) or max(x, y) / min(x, y) > 4:
        return 72.0, 72.0
    return x, y


def _fit(width_pt: float, height_pt: float, area_w: float, area_h: float) -> float:
    """Scale factor to show a box inside the area, never enlarging it."""
    return min(1.0, area_w / width_pt, area_h / height_pt)


def _prepare_frame(frame: Image.Image, paper_w: float, paper_h: float
                   ) -> tuple[Image.Image, float, float]:
    """Decode one frame into a fax-ready "1" or "L" image and the size, in points, to draw it."""
    area_w, area_h = paper_w - 2 * IMAGE_MARGIN_PT, paper_h - 2 * IMAGE_MARGIN_PT
    dpi_x, dpi_y = _dpi(frame)
    if frame.format in ("JPEG", "MPO"):
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale straight to grayscale: a 12 MP photo
        # then costs a fraction of the time and memory.  The requested size is what the
        # frame could occupy on the page at fax resolution, in either orientation.
        long_px = math.ceil(max(area_w, area_h) / 72 * FAX_DPI)
        short_px = math.ceil(min(area_w, area_h) / 72 * FAX_DPI)
        w, h = frame.size
        box = (long_px, short_px) if w >= h else (short_px, long_px)
        scale = min(1.0, box[0] / w, box[1] / h)
        before = frame.size
        frame.draft("L", (max(1, int(w * scale)), max(1, int(h * scale))))
        if frame.size != before:
            dpi_x *= frame.size[0] / before[0]
            dpi_y *= frame.size[1] / before[1]
    transposed = ImageOps.exif_transpose(frame)
    im = transposed if transposed is not None else frame.copy()
    if im.size != frame.size and im.size == frame.size[::-1]:
        dpi_x, dpi_y = dpi_y, dpi_x
    im = _to_fax_mode(im)

    width_pt, height_pt = im.width / dpi_x * 72, im.height / dpi_y * 72
    if _fit(height_pt, width_pt, area_w, area_h) > _fit(width_pt, height_pt, area_w, area_h) \
            * 1.001:
        # ROTATE_90 is counter-clockwise: the top of a landscape page ends up on the left, as
        # printers lay landscape out on portrait paper.
        im = im.transpose(Image.Transpose.ROTATE_90)
        width_pt, height_pt = height_pt, width_pt
    scale = _fit(width_pt, height_pt, area_w, area_h)
    draw_w, draw_h = width_pt * scale, height_pt * scale

    want_w = max(1, math.ceil(draw_w / 72 * FAX_DPI))
    want_h = max(1, math.ceil(draw_h / 72 * FAX_DPI))
    if im.width > want_w * 1.1 or im.height > want_h * 1.1:
        size = (min(im.width, want_w), min(im.height, want_h))
        if im.mode == "1":
            gray = im.convert("L").resize(size, Image.Resampling.BOX)
            im = gray.point(lambda v: 255 if v >= BILEVEL_THRESHOLD else 0, mode="1")
        else:
            im = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return im, draw_w, draw_h


def _to_fax_mode(im: Image.Image) -> Image.Image:
    """Bilevel images as mode "1", everything else as 8-bit grayscale on white."""
    if im.mode == "1":
        return im
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        low, high = cast(tuple[float, float], im.getextrema())
        span = float(high) - float(low) or 1.0
        offset = float(low)
        im = im.convert("I").convert("F").point(lambda v: (v - offset) * 255.0 / span)
        im = im.convert("L")
    elif im.mode == "P" and "transparency" not in im.info:
        im = im.convert("RGB").convert("L")
    elif im.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        rgba = im.convert("RGBA")
        page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        page.alpha_composite(rgba)
        im = page.convert("L")
    elif im.mode != "L":
        im = im.convert("RGB").convert("L")
    # Scanners often store bilevel pages as 8-bit; G4 keeps those a tenth of the size.
    colors = im.getcolors(2)
    if colors is not None and {value for _, value in colors} <= {0, 255}:
        return im.point(lambda v: 255 if v >= 128 else 0, mode="1")
    return im


def _place_images(prepared: list[tuple[Image.Image, float, float]], paper_w: float,
                  paper_h: float) -> bytes:
    """Encode the page images with Pillow's PDF writer (G4 for "1", JPEG for "L"), then give
    each page the paper's size with its image centred across and aligned to the top margin."""
    buf = io.BytesIO()
    first, *rest = (im for im, _, _ in prepared)
    # No JPEG quality option: Pillow would hand it to the TIFF encoder of G4 pages too, which
    # rejects it; its default (75) is ample for an 8-bit page that is faxed in black and white.
    first.save(buf, "PDF", save_all=True, append_images=rest, resolution=72.0, title=None)
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(buf.getvalue())))
    for page, (_, draw_w, draw_h) in zip(writer.pages, prepared, strict=True):
        x = (paper_w - draw_w) / 2
        y = paper_h - IMAGE_MARGIN_PT - draw_h
        content = f"q {_cm((draw_w, 0, 0, draw_h, x, y))} /image Do Q\n".encode()
        page[NameObject("/Contents")] = _new_stream(writer, content)
        page.mediabox = RectangleObject((0, 0, paper_w, paper_h))
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


# --------------------------------------------------------------------------- text


def _clean_text(text: str) -> str:
    """NFC, a few look-alikes mapped to what every font has, control characters dropped."""
    text = unicodedata.normalize("NFC", text).translate(_TEXT_TRANSLATE)
    return "".join(c for c in text if c in "\n\f\t" or not _is_control(c))


def _needs_unicode(text: str) -> bool:
    """True when the text has characters the built-in (WinAnsi) fonts cannot draw."""
    return any(c not in _CP1252 and c not in "\n\f\t" for c in text)


def _columns(text: str) -> int:
    """Width in monospace columns: CJK characters take two, combining marks none."""
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F")
               else 0 if unicodedata.combining(c) else 1 for c in text)


def _is_control(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Cf")


def _wrap_line(line: str, cols: int, width: Callable[[str], int] = len) -> Iterator[str]:
    """Break at the last space that leaves at least half a line, else hard at the column."""
    while width(line) > cols:
        fit = cols
        if width is not len:  # the most characters that fit in ``cols`` columns
            fit, used = 0, 0
            for char in line:
                used += width(char)
                if used > cols:
                    break
                fit += 1
            fit = max(fit, 1)
        cut = line.rfind(" ", 0, fit + 1)
        if cut < fit // 2:
            yield line[:fit]
            line = line[fit:]
        else:
            yield line[:cut]
            line = line[cut + 1:]
    yield line


def _layout_text(text: str, cols: int, rows: int, max_pages: int,
                 width: Callable[[str], int] = len) -> list[list[str]]:
    pages: list[list[str]] = [[]]
    for number, sheet in enumerate(text.split("\f")):
        if number and pages[-1]:
            pages.append([])  # a form feed starts a page, but never leaves one blank
        for raw in sheet.split("\n"):
            for line in _wrap_line(raw.expandtabs(TAB_SIZE).rstrip(), cols, width):
                if len(pages[-1]) >= rows:
                    pages.append([])
                if len(pages) > max_pages:
                    raise ConvertError(f"The message text runs to more than {max_pages} pages; "
                                       f"at most {max_pages} pages per fax")
                pages[-1].append(line)
    for page in pages:
        while page and not page[-1].strip():
            page.pop()
    return [page for page in pages if page]


def text_to_pdf(text: str, paper: str, limits: Limits, title: str | None = None
                ) -> tuple[bytes, int]:
    """Typeset a plain-text body (legacy systems' reports, ERP notices) as fax pages.

    Monospace so that column layouts survive, 11 pt bold so that it stays legible at fax
    resolution, 80 columns on A4; form feeds start pages as they did on the line printer.
    With a title every page carries it and "Page i of N", so loose fax pages can be put back
    in order.  Returns (PDF bytes, page count).
    """
    from reportlab.pdfbase.pdfmetrics import stringWidth
    from reportlab.pdfgen.canvas import Canvas

    from gateway.documents import fonts

    paper_w, paper_h = _paper(paper)
    if len(text) > limits.max_text_chars:
        raise ConvertError(f"The message text is too long to fax ({len(text)} characters; at "
                           f"most {limits.max_text_chars})")
    body = _clean_text(text.replace("\r\n", "\n").replace("\r", "\n").replace("\v", "\n"))
    wide = _needs_unicode(body)  # beyond WinAnsi: the shipped fonts (fonts.py) draw it
    char_w = stringWidth("M", TEXT_FONT, TEXT_SIZE_PT)
    cols = int((paper_w - 2 * TEXT_MARGIN_X_PT) / char_w)
    rows = int((paper_h - 2 * TEXT_MARGIN_Y_PT) / TEXT_LEADING_PT)
    header = _title_line(title) if title else ""
    if header:
        rows -= 2
    pages = _layout_text(body, cols, rows, limits.max_pages, _columns if wide else len)
    if not pages:
        raise ConvertError("The message has no text to fax")

    buf = io.BytesIO()
    canvas = Canvas(buf, pagesize=(paper_w, paper_h), invariant=True, pageCompression=1)
    canvas.setTitle(header or "Fax")
    top = paper_h - TEXT_MARGIN_Y_PT - TEXT_SIZE_PT
    for number, lines in enumerate(pages, start=1):
        y = top
        if header:
            _draw_header(canvas, header, f"Page {number} of {len(pages)}", paper_w, y)
            y -= 2 * TEXT_LEADING_PT
        if wide:
            for line in lines:
                fonts.draw_line(canvas, TEXT_MARGIN_X_PT, y, line, fonts.MONO, TEXT_SIZE_PT,
                                right=paper_w - TEXT_MARGIN_X_PT)
                y -= TEXT_LEADING_PT
        else:
            body_text = canvas.beginText(TEXT_MARGIN_X_PT, y)
            body_text.setFont(TEXT_FONT, TEXT_SIZE_PT, TEXT_LEADING_PT)
            for line in lines:
                body_text.textLine(line)
            canvas.drawText(body_text)
        canvas.showPage()
    canvas.save()
    return buf.getvalue(), len(pages)


def _title_line(text: str, max_chars: int = 200) -> str:
    """One line of a title or cover field: cleaned, kept in full script (drawn by fonts.py)."""
    return _clean_text(" ".join(text.split())[:max_chars]).replace("\t", " ")


def _draw_header(canvas: Canvas, title: str, page_label: str, paper_w: float, y: float) -> None:
    from reportlab.pdfbase.pdfmetrics import stringWidth

    from gateway.documents import fonts

    right = paper_w - TEXT_MARGIN_X_PT
    room = right - TEXT_MARGIN_X_PT - stringWidth(page_label, HEADER_FONT, TEXT_SIZE_PT) - 12
    wide = _needs_unicode(title)

    def width(value: str) -> float:
        if wide:
            return fonts.line_width(value, fonts.BOLD, TEXT_SIZE_PT)
        return stringWidth(value, HEADER_FONT, TEXT_SIZE_PT)

    while title and width(title) > room:
        title = title[:-4] + "..." if len(title) > 4 else ""
    canvas.setFont(HEADER_FONT, TEXT_SIZE_PT)
    if wide:
        fonts.draw_line(canvas, TEXT_MARGIN_X_PT, y, title, fonts.BOLD, TEXT_SIZE_PT)
    else:
        canvas.drawString(TEXT_MARGIN_X_PT, y, title)
    canvas.setFont(HEADER_FONT, TEXT_SIZE_PT)
    canvas.drawRightString(right, y, page_label)
    canvas.setLineWidth(1)
    canvas.line(TEXT_MARGIN_X_PT, y - 4, right, y - 4)


def cover_page(*, to: str, sender: str, subject: str, pages: int, date: str, note: str | None,
               paper: str) -> bytes:
    """A one-page cover sheet, as receiving offices expect before a fax.

    ``pages`` is the total sent, this cover included.  Everything is drawn large (the title at
    60 pt, details at 14 pt) because the far end may be a thermal fax printer; a note longer
    than the page holds is cut with a marker rather than spilling onto a second page.
    """
    from reportlab.lib.utils import simpleSplit
    from reportlab.pdfgen.canvas import Canvas

    from gateway.documents import fonts

    paper_w, paper_h = _paper(paper)
    margin = 54.0
    width = paper_w - 2 * margin
    buf = io.BytesIO()
    canvas = Canvas(buf, pagesize=(paper_w, paper_h), invariant=True, pageCompression=1)
    canvas.setTitle("Fax cover")
    y = paper_h - margin - 50
    canvas.setFont("Helvetica-Bold", 60)
    canvas.drawString(margin, y, "FAX")
    y -= 22
    canvas.setLineWidth(3)
    canvas.line(margin, y, paper_w - margin, y)
    y -= 34
    label_w = 90.0
    rows = (("To:", to, 2), ("From:", sender, 2), ("Date:", date, 1),
            ("Pages:", f"{pages} (including this cover page)", 1), ("Subject:", subject, 3))
    for label, value, max_lines in rows:
        value = _title_line(value, 500) or "-"
        wide = _needs_unicode(value)
        if wide:
            lines = fonts.split_width(value, fonts.SANS, 14, width - label_w)
        else:
            lines = simpleSplit(value, "Helvetica", 14, width - label_w)
        if len(lines) > max_lines:
            lines = lines[:max_lines]
            lines[-1] = lines[-1][:max(0, len(lines[-1]) - 3)] + "..."
        canvas.setFont("Helvetica-Bold", 14)
        canvas.drawString(margin, y, label)
        canvas.setFont("Helvetica", 14)
        for line in lines:
            if wide:
                fonts.draw_line(canvas, margin + label_w, y, line, fonts.SANS, 14,
                                right=paper_w - margin)
            else:
                canvas.drawString(margin + label_w, y, line)
            y -= 20
        y -= 8
    if note and note.strip():
        y -= 4
        canvas.setLineWidth(1)
        canvas.line(margin, y, paper_w - margin, y)
        y -= 26
        size, leading = 13.0, 17.0
        text = _clean_text(note[:MAX_COVER_NOTE_CHARS].replace("\r\n", "\n").replace("\r", "\n"))
        wide = _needs_unicode(text)
        lines = []
        for paragraph in text.replace("\f", "\n").split("\n"):
            paragraph = paragraph.expandtabs(TAB_SIZE)
            if wide:
                lines.extend(fonts.split_width(paragraph, fonts.SANS, size, width) or [""])
            else:
                lines.extend(simpleSplit(paragraph, "Helvetica", size, width) or [""])
        room = max(0, int((y - margin) / leading))
        if len(lines) > room:
            lines = lines[:max(0, room - 1)] + ["[... the note is cut here ...]"]
        if wide:
            for line in lines:
                fonts.draw_line(canvas, margin, y, line, fonts.SANS, size, right=paper_w - margin)
                y -= leading
        else:
            note_text = canvas.beginText(margin, y)
            note_text.setFont("Helvetica", size, leading)
            for line in lines:
                note_text.textLine(line)
            canvas.drawText(note_text)
    canvas.showPage()
    canvas.save()
    return buf.getvalue()


# --------------------------------------------------------------------------- PDFs


def normalize_pdf(data: bytes, name: str, paper: str, limits: Limits) -> tuple[bytes, int]:
    """Make a sender's PDF safe for fax providers; returns (PDF bytes, page count).

    Refuses password-protected files (an owner password alone, which the empty user password
    opens, is fine), bakes form fields and other printable annotations into the page content,
    turns every page portrait and shrinks pages larger than the paper, centred, never cropped.
    A file that needs none of this is returned byte for byte.
    """
    paper_w, paper_h = _paper(paper)
    label = _label(name)
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        encrypted = reader.is_encrypted
        if encrypted and not reader.decrypt(""):
            raise ConvertError(f"{label} is password-protected; send it without a password")
        count = len(reader.pages)
        if count == 0:
            raise ConvertError(f"{label} has no pages")
        if count > limits.max_pages:
            raise _too_many_pages(label, count, limits)
        if not encrypted and not _needs_work(reader, paper_w, paper_h):
            return data, count
        writer = PdfWriter(clone_from=reader)
        _flatten_forms(writer)
        for page in writer.pages:
            _fit_page(writer, page, paper_w, paper_h)
        out = io.BytesIO()
        writer.write(out)
    except ConvertError:
        raise
    except _PDF_ERRORS as exc:
        log.info("unreadable PDF %s: %s: %s", label, type(exc).__name__, exc)
        raise ConvertError(f"{label} is not a readable PDF") from exc
    return out.getvalue(), count


def _needs_work(reader: PdfReader, paper_w: float, paper_h: float) -> bool:
    if "/AcroForm" in cast(DictionaryObject, reader.trailer["/Root"]):
        return True
    for page in reader.pages:
        annots = page.get("/Annots")
        if annots is not None and any(
                a.get_object().get("/Subtype") != "/Link" for a in annots.get_object()):
            return True
        if _page_geometry(page, paper_w, paper_h) is not None:
            return True
    return False


def _flatten_forms(writer: PdfWriter) -> None:
    """Draw every printable annotation's appearance into its page and drop the annotations
    and the form, so filled values print on any rasteriser and nothing stays interactive."""
    root = writer.root_object
    form = root.get("/AcroForm")
    form = form.get_object() if form is not None else None
    regenerate = isinstance(form, DictionaryObject) and bool(form.get("/NeedAppearances"))
    for number, page in enumerate(writer.pages):
        if "/Annots" not in page:
            continue
        if isinstance(form, DictionaryObject):
            _refresh_text_appearances(writer, page, regenerate)
        draws: list[str] = []
        if "/Resources" not in page:
            page[NameObject("/Resources")] = DictionaryObject()
        resources = cast(DictionaryObject, page["/Resources"].get_object())
        if "/XObject" not in resources:
            resources[NameObject("/XObject")] = DictionaryObject()
        xobjects = cast(DictionaryObject, resources["/XObject"].get_object())
        annotations = cast(ArrayObject, page["/Annots"].get_object())
        for index, ref in enumerate(list(annotations)[:MAX_ANNOTATIONS_PER_PAGE]):
            try:
                placed = _annotation_placement(ref.get_object())
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                # One malformed annotation should not cost the sender the whole document.
                log.info("skipped an annotation that cannot be drawn: %s", exc)
                continue
            if placed is None:
                continue
            stream, matrix = placed
            xname = NameObject(f"/FaxFlat{number}x{index}")
            xobjects[xname] = _indirect(writer, stream)
            draws.append(f"q {_cm(matrix)} {xname} Do Q")
        del page["/Annots"]
        if draws:
            _wrap_contents(writer, page, b"q\n", ("\nQ\n" + "\n".join(draws) + "\n").encode())
    if "/AcroForm" in root:
        del root["/AcroForm"]


def _field_chain(annotation: DictionaryObject) -> Iterator[DictionaryObject]:
    node: DictionaryObject | None = annotation
    for _ in range(32):  # bounded: /Parent loops exist in the wild
        if node is None:
            return
        yield node
        parent = node.get("/Parent")
        node = parent.get_object() if parent is not None else None


def _refresh_text_appearances(writer: PdfWriter, page: PageObject,
                              regenerate: bool) -> None:
    """Rebuild text-field appearances that are missing, or stale because the filler only set
    values and asked viewers to redraw (/NeedAppearances), using pypdf's field renderer."""
    fields: dict[str, str] = {}
    for ref in cast(ArrayObject, page["/Annots"].get_object()):
        annotation = ref.get_object()
        if annotation.get("/Subtype") != "/Widget":
            continue
        chain = list(_field_chain(annotation))
        kind = next((n["/FT"] for n in chain if "/FT" in n), None)
        value = next((n["/V"] for n in chain if "/V" in n), None)
        if kind not in ("/Tx", "/Ch") or not isinstance(value, str) or not value:
            continue
        if not regenerate and "/AP" in annotation:
            continue
        names = [str(n["/T"]) for n in reversed(chain) if "/T" in n]
        if names:
            fields[".".join(names)] = value
    if not fields:
        return
    try:
        writer.update_page_form_field_values(page, fields, auto_regenerate=False)
    except _PDF_ERRORS as exc:  # the existing appearances are still drawn
        log.info("could not regenerate form appearances: %s: %s", type(exc).__name__, exc)


def _annotation_placement(annotation: object
                          ) -> tuple[StreamObject, Matrix] | None:
    """The normal appearance of a printable annotation and the matrix that puts it on the page
    (PDF 32000-1, 12.5.5: the form's transformed BBox is mapped onto /Rect)."""
    if not isinstance(annotation, DictionaryObject):
        return None
    subtype = annotation.get("/Subtype")
    if subtype in ("/Popup", "/Link"):
        return None
    flags_obj = annotation.get("/F")
    # Form fillers often omit /F on fields, which by the letter means "do not print".
    flags = int(_number(flags_obj)) if flags_obj is not None else (
        4 if subtype == "/Widget" else 0)
    if flags & 2 or not flags & 4:  # hidden, or not meant to print
        return None
    appearance = annotation.get("/AP")
    appearance = appearance.get_object() if appearance is not None else None
    if not isinstance(appearance, DictionaryObject) or "/N" not in appearance:
        return None
    normal = appearance["/N"].get_object()
    if not isinstance(normal, StreamObject):
        state = annotation.get("/AS")
        if not isinstance(normal, DictionaryObject) or state is None or state not in normal:
            return None
        normal = normal[state].get_object()
    if not isinstance(normal, StreamObject) or "/BBox" not in normal:
        return None
    rect = [_number(v) for v in cast(ArrayObject, annotation["/Rect"])]
    bx0, by0, bx1, by1 = (_number(v) for v in cast(ArrayObject, normal["/BBox"]))
    matrix = cast(ArrayObject, normal["/Matrix"]) if "/Matrix" in normal else (1, 0, 0, 1, 0, 0)
    a, b, c, d, e, f = (_number(v) for v in matrix)
    corners = [(a * x + c * y + e, b * x + d * y + f) for x in (bx0, bx1) for y in (by0, by1)]
    xs, ys = [p[0] for p in corners], [p[1] for p in corners]
    box_w, box_h = max(xs) - min(xs), max(ys) - min(ys)
    rx0, rx1 = sorted(rect[0::2][:2])
    ry0, ry1 = sorted(rect[1::2][:2])
    if box_w <= 0 or box_h <= 0 or rx1 <= rx0 or ry1 <= ry0:
        return None
    normal[NameObject("/Type")] = NameObject("/XObject")
    normal[NameObject("/Subtype")] = NameObject("/Form")
    sx, sy = (rx1 - rx0) / box_w, (ry1 - ry0) / box_h
    return normal, (sx, 0.0, 0.0, sy, rx0 - sx * min(xs), ry0 - sy * min(ys))


def _number(value: object) -> float:
    resolved = value.get_object() if isinstance(value, IndirectObject) else value
    return float(resolved)  # type: ignore[arg-type]


def _page_geometry(page: PageObject, paper_w: float, paper_h: float
                   ) -> tuple[Matrix, tuple[float, float, float, float],
                              tuple[float, float]] | None:
    """(content matrix, clip box in user space, new page size) for a page that must be turned
    or shrunk; None for a portrait page that already fits, which is left as it is."""
    media = page.mediabox if "/MediaBox" in page else RectangleObject((0, 0, 612, 792))
    crop = page.cropbox if "/CropBox" in page else media
    x0, y0 = max(media.left, crop.left), max(media.bottom, crop.bottom)
    x1, y1 = min(media.right, crop.right), min(media.top, crop.top)
    if x1 - x0 < 1 or y1 - y0 < 1:
        x0, y0, x1, y1 = media.left, media.bottom, media.right, media.top
    x0, y0, x1, y1 = (float(v) for v in (x0, y0, x1, y1))
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ValueError("page has no area")
    unit = float(page.user_unit or 1)
    w, h = (x1 - x0) * unit, (y1 - y0) * unit
    rotate = int(page.rotation or 0) % 360
    rotate = rotate if rotate in (0, 90, 180, 270) else 0
    if rotate == 0 and w <= h and w <= paper_w + FIT_TOLERANCE_PT \
            and h <= paper_h + FIT_TOLERANCE_PT and unit == 1:
        return None
    # User space to a box at the origin, then the page's /Rotate (clockwise on display) baked
    # in, then landscape turned counter-clockwise to portrait.
    m = (unit, 0.0, 0.0, unit, -x0 * unit, -y0 * unit)
    turns = {0: None, 90: (0.0, -1.0, 1.0, 0.0, 0.0, w), 180: (-1.0, 0.0, 0.0, -1.0, w, h),
             270: (0.0, 1.0, -1.0, 0.0, h, 0.0)}[rotate]
    if turns is not None:
        m = _then(m, turns)
        if rotate in (90, 270):
            w, h = h, w
    if w > h:
        m = _then(m, (0.0, 1.0, -1.0, 0.0, h, 0.0))
        w, h = h, w
    size = (w, h)
    if w > paper_w + FIT_TOLERANCE_PT or h > paper_h + FIT_TOLERANCE_PT:
        s = min(paper_w / w, paper_h / h)
        m = _then(m, (s, 0.0, 0.0, s, (paper_w - w * s) / 2, (paper_h - h * s) / 2))
        size = (paper_w, paper_h)
    return m, (x0, y0, x1 - x0, y1 - y0), size


def _then(m1: Matrix, m2: Matrix) -> Matrix:
    """Matrix product in PDF order: apply m1, then m2."""
    a1, b1, c1, d1, e1, f1 = m1
    a2, b2, c2, d2, e2, f2 = m2
    return (a1 * a2 + b1 * c2, a1 * b2 + b1 * d2, c1 * a2 + d1 * c2, c1 * b2 + d1 * d2,
            e1 * a2 + f1 * c2 + e2, e1 * b2 + f1 * d2 + f2)


def _fit_page(writer: PdfWriter, page: PageObject, paper_w: float,
              paper_h: float) -> None:
    geometry = _page_geometry(page, paper_w, paper_h)
    if geometry is None:
        return
    matrix, (cx, cy, cw, ch), (width, height) = geometry
    clip = " ".join(_num(v) for v in (cx, cy, cw, ch))
    _wrap_contents(writer, page, f"q {_cm(matrix)} {clip} re W n\n".encode(), b"\nQ\n")
    page[NameObject("/MediaBox")] = RectangleObject((0, 0, width, height))
    page[NameObject("/Rotate")] = NumberObject(0)
    for key in ("/CropBox", "/BleedBox", "/TrimBox", "/ArtBox", "/UserUnit"):
        if key in page:
            del page[key]


def merge_pdfs(pdfs: list[bytes]) -> bytes:
    """One PDF from the converted parts, in order: SignalWire takes exactly one document."""
    if not pdfs:
        raise ConvertError("The message holds nothing to fax")
    if len(pdfs) == 1:
        return pdfs[0]
    writer = PdfWriter()
    try:
        for data in pdfs:
            writer.append(PdfReader(io.BytesIO(data)), import_outline=False)
        out = io.BytesIO()
        writer.write(out)
    except _PDF_ERRORS as exc:
        raise ConvertError("The converted documents could not be put together") from exc
    return out.getvalue()
