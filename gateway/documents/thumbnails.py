"""Pictures of a document's first page: the thumbnail a report mail and the dashboard show,
and the check that a page would fax as blank. PDFium renders; it is imported at the first
picture, so only what draws one pays for it."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import cast

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
        try:
            document = pdfium.PdfDocument(str(pdf) if isinstance(pdf, Path) else pdf)
            try:
                page = document[0]
                page_w, page_h = page.get_size()
                scale = min(width_px / page_w, 4 * width_px / page_h)
                image = page.render(scale=scale, grayscale=True, may_draw_forms=True).to_pil()
                page.close()
            finally:
                document.close()
        except (pdfium.PdfiumError, IndexError, ValueError) as exc:
            raise ConvertError("The document could not be rendered") from exc
    # Sixteen greys, four bits a pixel (a fax is black and white; the picture only has to
    # show which document went): half the bytes to compress and to mail. zlib level 3, not
    # optimize=True (level 9 plus a filter search). For a 300-pixel page: 0.7 ms and ~6 KB,
    # where 256 greys cost 1.1 ms and ~12 KB (optimize=True: 10 ms). It is made for every
    # report mail.
    grey = image.convert("L").point(_TO_16_GREYS)
    indexed = Image.frombytes("P", grey.size, grey.tobytes())
    indexed.putpalette(_16_GREYS_PALETTE)
    out = io.BytesIO()
    indexed.save(out, "PNG", bits=4, compress_level=THUMBNAIL_ZLIB_LEVEL)
    return out.getvalue()


_TO_16_GREYS = [(v * 15 + 127) // 255 for v in range(256)]
_16_GREYS_PALETTE = [c for i in range(16) for c in (i * 17,) * 3]


def is_blank_png(png: bytes) -> bool:
    """True when no pixel is darker than light grey: a page that would fax as blank."""
    with Image.open(io.BytesIO(png), formats=("PNG",)) as im:
        if im.width * im.height > MAX_PNG_PIXELS:
            raise ValueError("image too large to check")
        darkest = cast(tuple[int, int], im.convert("L").getextrema())[0]
    return darkest >= BLANK_DARKEST
