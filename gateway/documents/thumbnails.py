"""Pictures of a document's first page: the thumbnail a report mail and the dashboard show,
and the check that a page would fax as blank. PDFium renders; it is imported at the first
picture, so only what draws one pays for it."""

from __future__ import annotations

import atexit
import functools
import io
import math
import struct
import threading
import zlib
from pathlib import Path
from typing import Any, cast

from PIL import Image

from gateway.documents.convert import ConvertError
from gateway.documents.pdf_objects import pdf_from_objects

MAX_THUMBNAIL_PX = 2000
MAX_PNG_PIXELS = 40_000_000
BLANK_DARKEST = 192  # a rendered pixel darker than this is ink
THUMBNAIL_ZLIB_LEVEL = 3
JPEG_GREY_MIN_PIXELS = 4_000_000  # see _one_jpeg
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
                image = _one_jpeg(pdfium, pdf, page, scale)
                if image is None:
                    # grayscale: an 8-bit grey bitmap (pypdfium2 picks FPDFBitmap_Gray)
                    image = page.render(scale=scale, grayscale=True,
                                        may_draw_forms=True).to_pil()
                page.close()
            finally:
                document.close()
        except (pdfium.PdfiumError, IndexError, ValueError) as exc:
            raise ConvertError("The document could not be rendered") from exc
    return _png_16_greys(image if image.mode == "L" else image.convert("L"))


def _one_jpeg(pdfium: Any, pdf: bytes | Path, page: Any, scale: float) -> Image.Image | None:
    """Page 1 drawn from its JPEG by Pillow, when the page is one JPEG image and nothing else
    (what a scanner sends, and the pages image_to_pdf makes of photos); None otherwise, and
    PDFium draws it.

    PDFium decodes most JPEGs at full size to draw them small: for a 300 dpi Letter scan (a
    2550 x 3300 JPEG) 90 ms and +53 MB in colour, 40-60 ms and +20 MB in grey. libjpeg decodes
    at 1/2, 1/4 or 1/8 of the size (Pillow's draft mode): here at the smallest scale that is
    still twice the picture's size, then reduced with the filter whose result is nearest
    PDFium's (Hamming: a mean difference of 1.5-3 grey levels of 255 on text scans, against
    3-9 for the other filters at 1/8): 15-30 ms and +5-9 MB. Grey JPEGs below
    JPEG_GREY_MIN_PIXELS are left to PDFium, which draws some of them faster (9-12 ms for a
    1632 x 2112 page, the size image_to_pdf makes; this path took 13-16 ms).

    Only for what both draw alike: a page not rotated, with no annotations, one image object
    placed upright without a clip or transparency, DCT its only filter, 8-bit grey or RGB
    samples with the default decoding, no mask; anything else is left to PDFium."""
    raw = pdfium.raw
    if page.get_rotation() != 0 or raw.FPDFPage_CountObjects(page) != 1 \
            or raw.FPDFPage_GetAnnotCount(page) != 0:
        return None
    image = next(page.get_objects(max_depth=1))
    if image.type != raw.FPDF_PAGEOBJ_IMAGE or raw.FPDFPageObj_HasTransparency(image) \
            or image.get_filters() != ["DCTDecode"]:
        return None
    clip = raw.FPDFPageObj_GetClipPath(image)
    if clip and raw.FPDFClipPath_CountPaths(clip) > 0:
        return None
    a, b, c, d, e, f = image.get_matrix().get()
    if b or c or a <= 0 or d <= 0:
        return None
    width, height = image.get_px_size()
    left, _, _, top = page.get_bbox()
    # As page.render sizes the bitmap, and PDFium then fits the page to it exactly: the
    # vertical and horizontal scales differ by the rounding of the bitmap's size.
    page_w, page_h = page.get_width(), page.get_height()
    size = (math.ceil(page_w * scale), math.ceil(page_h * scale))
    scale_x, scale_y = size[0] / page_w, size[1] / page_h
    x0, x1 = (e - left) * scale_x, (e + a - left) * scale_x
    y0, y1 = (top - f - d) * scale_y, (top - f) * scale_y
    box = (math.floor(x0 + 1e-6), math.floor(y0 + 1e-6), math.ceil(x1 - 1e-6),
           math.ceil(y1 - 1e-6))
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    if box_w < 1 or box_h < 1 or width < 2 * box_w or height < 2 * box_h:
        return None  # no smaller decoding to gain
    data = bytes(image.get_data(decode_simple=False))  # the JPEG as stored
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as jpeg:  # its header only
            if jpeg.size != (width, height) or jpeg.mode not in ("L", "RGB") \
                    or (jpeg.mode == "L" and width * height < JPEG_GREY_MIN_PIXELS) \
                    or _plain_jpeg_image(pdf, width, height) != len(jpeg.mode):
                return None
            jpeg.draft("L", (2 * box_w, 2 * box_h))
            drawn = jpeg.convert("L").resize((box_w, box_h), Image.Resampling.HAMMING)
    except _JPEG_ERRORS:
        return None  # PDFium draws what it can of a damaged JPEG
    out = Image.new("L", size, 255)
    out.paste(drawn, box[:2])
    return out


_JPEG_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, IndexError, Image.DecompressionBombError)


def _plain_jpeg_image(pdf: bytes | Path, width: int, height: int) -> int | None:
    """The components (1 or 3) of page 1's only image XObject as pypdf reads it, when it is
    `width` x `height`, DCT-encoded with no parameters, 8-bit DeviceGray, DeviceRGB or
    ICCBased with 1 or 3 components, the default /Decode, no mask, no optional content;
    else None. (PDFium's API says nothing of /Decode or masks.) The page's objects only: no
    stream is read (a scan's file is read from disk as needed)."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    with open(pdf, "rb") if isinstance(pdf, Path) else io.BytesIO(pdf) as fh:
        try:
            reader = PdfReader(fh, strict=False)
            if reader.is_encrypted:
                return None
            resources = reader.pages[0].get("/Resources")
            xobjects = resources.get_object().get("/XObject") if resources is not None else None
            xobjects = xobjects.get_object() if xobjects is not None else None
            if not isinstance(xobjects, dict) or len(xobjects) != 1:
                return None
            xobject = next(iter(xobjects.values())).get_object()
            return _plain_jpeg_dict(xobject, width, height)
        except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError,
                OSError, RecursionError, ArithmeticError, AssertionError):
            return None


def _plain_jpeg_dict(xobject: Any, width: int, height: int) -> int | None:
    filters = xobject.get("/Filter")
    filters = list(filters) if isinstance(filters, list) else [filters]
    if (xobject.get("/Subtype") != "/Image" or filters != ["/DCTDecode"]
            or xobject.get("/Width") != width or xobject.get("/Height") != height
            or xobject.get("/BitsPerComponent") != 8
            or any(key in xobject for key in ("/DecodeParms", "/SMask", "/Mask", "/OC",
                                               "/Alternates", "/SMaskInData"))
            or xobject.get("/ImageMask", False)):
        return None
    space = xobject.get("/ColorSpace")
    space = space.get_object() if space is not None else None
    if space == "/DeviceGray":
        components = 1
    elif space == "/DeviceRGB":
        components = 3
    elif isinstance(space, list) and len(space) == 2 and space[0] == "/ICCBased":
        components = space[1].get_object().get("/N")
        if components not in (1, 3):
            return None
    else:
        return None
    decode = xobject.get("/Decode")
    if decode is not None and [float(v) for v in decode] != [0.0, 1.0] * components:
        return None
    return int(components)


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
    return pdf_from_objects(objects)


def is_blank_png(png: bytes) -> bool:
    """True when no pixel is darker than light grey: a page that would fax as blank."""
    with Image.open(io.BytesIO(png), formats=("PNG",)) as im:
        if im.width * im.height > MAX_PNG_PIXELS:
            raise ValueError("image too large to check")
        darkest = cast(tuple[int, int], im.convert("L").getextrema())[0]
    return darkest >= BLANK_DARKEST
