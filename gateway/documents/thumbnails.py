"""Pictures of a document's first page: the thumbnail a report mail and the dashboard show,
and the check that a page would fax as blank. PDFium renders; it is imported at the first
picture, so only what draws one pays for it."""

from __future__ import annotations

import atexit
import functools
import io
import struct
import threading
import zlib
from pathlib import Path
from typing import Any, cast

from PIL import Image

from gateway.documents.convert import ConvertError

MAX_THUMBNAIL_PX = 2000
MAX_PNG_PIXELS = 40_000_000
BLANK_DARKEST = 192  # a rendered pixel darker than this is ink
THUMBNAIL_ZLIB_LEVEL = 3
# PDFium is not thread-safe, not even across documents.
_PDFIUM_LOCK = threading.Lock()


def first_page_png(pdf: bytes | Path, width_px: int = 300) -> bytes:
    """A grayscale PNG of page 1 for report mails, so the sender sees what was faxed.

    Given a path, PDFium reads the file as it needs it (page 1 only), so a 20 MB scan is not
    read into memory to draw a 300-pixel picture."""
    if not 1 <= width_px <= MAX_THUMBNAIL_PX:
        raise ValueError(f"width_px must be 1..{MAX_THUMBNAIL_PX}")
    import pypdfium2 as pdfium  # imported here: only report mails need PDFium

    with _PDFIUM_LOCK:
        _FONTS.hold(pdfium)
        try:
            document = pdfium.PdfDocument(str(pdf) if isinstance(pdf, Path) else pdf)
            try:
                page = document[0]
                page_w, page_h = page.get_size()
                scale = min(width_px / page_w, 4 * width_px / page_h)
                # grayscale: an 8-bit grey bitmap (pypdfium2 picks FPDFBitmap_Gray), mode "L"
                image = page.render(scale=scale, grayscale=True, may_draw_forms=True).to_pil()
                page.close()
            finally:
                document.close()
        except (pdfium.PdfiumError, IndexError, ValueError) as exc:
            raise ConvertError("The document could not be rendered") from exc
    return _png_16_greys(image if image.mode == "L" else image.convert("L"))


def _png_16_greys(grey: Image.Image) -> bytes:
    """`grey` as a PNG of sixteen greys, four bits a pixel (a fax is black and white; the
    picture only has to show which document went): half the bytes to compress and to mail.

    Written here rather than by Pillow, whose PNG encoder tries four row filters on every row
    (~60% of its time for a 300-pixel page) where sixteen-colour rows compress as well
    unfiltered (filter 0, what the PNG spec advises for palette images): 0.3 ms and ~6 KB for
    a 300-pixel page, where Pillow at the same zlib level took 0.9 ms. zlib level 3: level 6
    saves ~10% of the bytes for twice the time; the picture is made for every report mail."""
    width, height = grey.size
    # Each row of the picture data starts with its filter byte, 0: two black pixels more at
    # the left of each row, packed four bits a pixel, are that byte.
    rows = Image.new("P", (width + 2, height), 0)
    rows.paste(grey.point(_TO_16_GREYS), (2, 0))
    packer = zlib.compressobj(THUMBNAIL_ZLIB_LEVEL)
    data = packer.compress(rows.tobytes("raw", "P;4")) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 4, 3, 0, 0, 0)  # 4 bits, palette
    return b"".join((_PNG_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"PLTE", _16_GREYS_PLTE),
                     _chunk(b"IDAT", data), _chunk(b"IEND", b"")))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind))))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TO_16_GREYS = [(v * 15 + 127) // 255 for v in range(256)]
_16_GREYS_PLTE = bytes(c for i in range(16) for c in (i * 17,) * 3)


class _StandardFonts:
    """A small page set in the fourteen standard PDF fonts, drawn once and kept open.

    PDFium draws a font that is not embedded (Helvetica, Times, Courier: the gateway's own
    text and cover pages, and many senders' PDFs) with a face of its own, and keeps the
    glyphs it has drawn with that face while a drawn page that uses the face is open. Every
    picture is of a new document, closed after it: without this page each one drew every
    glyph afresh (~11% of the instructions of bench.run's page's picture). The page is drawn
    again after REOPEN_AFTER pictures, which bounds the glyphs kept (sizes vary from document
    to document)."""

    REOPEN_AFTER = 100

    def __init__(self) -> None:
        self._held: tuple[Any, Any] | None = None
        self._uses = 0
        self._closed_at_exit = False

    def hold(self, pdfium: Any) -> None:
        """Before a picture (under _PDFIUM_LOCK)."""
        self._uses += 1
        if self._held is not None and self._uses <= self.REOPEN_AFTER:
            return
        if not self._closed_at_exit:
            # Registered after PDFium's own exit handler (which complains of documents left
            # open), so it runs before it.
            atexit.register(self.release)
            self._closed_at_exit = True
        self.release()
        self._uses = 1
        try:
            document = pdfium.PdfDocument(_standard_fonts_pdf())
            page = document[0]
            page.render(grayscale=True)
        except (pdfium.PdfiumError, IndexError, ValueError):  # only slower without it
            return
        self._held = (document, page)

    def release(self) -> None:
        if self._held is not None:
            document, page = self._held
            self._held = None
            page.close()
            document.close()


_FONTS = _StandardFonts()
STANDARD_FONTS = ("Helvetica", "Helvetica-Bold", "Helvetica-Oblique", "Helvetica-BoldOblique",
                  "Times-Roman", "Times-Bold", "Times-Italic", "Times-BoldItalic", "Courier",
                  "Courier-Bold", "Courier-Oblique", "Courier-BoldOblique", "Symbol",
                  "ZapfDingbats")


@functools.cache
def _standard_fonts_pdf() -> bytes:
    """One page that sets a character in each of the standard fonts."""
    text = " ".join(f"/F{n} 10 Tf (a) Tj" for n in range(len(STANDARD_FONTS)))
    content = f"BT 10 10 Td {text} ET".encode("ascii")
    fonts = " ".join(f"/F{n} {n + 5} 0 R" for n in range(len(STANDARD_FONTS)))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 100 100] /Resources "
               f"<< /Font << {fonts} >> >> /Contents 4 0 R >>".encode("ascii"),
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content)]
    objects += [f"<< /Type /Font /Subtype /Type1 /BaseFont /{name} >>".encode("ascii")
                for name in STANDARD_FONTS]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


def is_blank_png(png: bytes) -> bool:
    """True when no pixel is darker than light grey: a page that would fax as blank."""
    with Image.open(io.BytesIO(png), formats=("PNG",)) as im:
        if im.width * im.height > MAX_PNG_PIXELS:
            raise ValueError("image too large to check")
        darkest = cast(tuple[int, int], im.convert("L").getextrema())[0]
    return darkest >= BLANK_DARKEST
