"""First-page pictures (gateway/documents/thumbnails.py) against the way they were made before
(PDFium drawing grey, Pillow quantising it to sixteen greys and writing the PNG): the same
pixels for a corpus of documents the gateway faxes, a valid four-bit PNG, and no pixel changed
by the standard-font page kept between pictures."""

from __future__ import annotations

import io
import random

import pypdfium2 as pdfium
import pytest
from PIL import Image
from reportlab.lib.pagesizes import A4, landscape, legal, letter
from reportlab.lib.utils import ImageReader
from reportlab.pdfgen import canvas as rl_canvas

from gateway.documents import thumbnails
from gateway.documents.convert import (
    Limits,
    cover_page,
    image_to_pdf,
    merge_pdfs,
    normalize_pdf,
    text_to_pdf,
)
from gateway.documents.thumbnails import first_page_png

from .corpus import PageSpec, labelled_pdf, scan_page, scanner_tiff, solid_image
from .test_convert import form_pdf, reportlab_pdf, text_page


def _before(pdf: bytes, width_px: int = 300) -> bytes:
    """The picture as first_page_png made it before (the pixels to match)."""
    document = pdfium.PdfDocument(pdf)
    try:
        page = document[0]
        page_w, page_h = page.get_size()
        scale = min(width_px / page_w, 4 * width_px / page_h)
        image = page.render(scale=scale, grayscale=True, may_draw_forms=True).to_pil()
        page.close()
    finally:
        document.close()
    grey = image.convert("L").point([(v * 15 + 127) // 255 for v in range(256)])
    indexed = Image.frombytes("P", grey.size, grey.tobytes())
    indexed.putpalette([c for i in range(16) for c in (i * 17,) * 3])
    out = io.BytesIO()
    indexed.save(out, "PNG", bits=4, compress_level=3)
    return out.getvalue()


def _letter_with_photo() -> bytes:
    """bench.run's fax: a typed letter in Helvetica with a grey noise "photo" in a box."""
    rng = random.Random(7)
    photo = Image.frombytes("L", (200, 200), bytes(rng.randrange(256) for _ in range(40_000)))
    out = io.BytesIO()
    page = rl_canvas.Canvas(out, pagesize=letter)
    page.drawImage(ImageReader(photo), 360, 520, width=180, height=180)
    page.setFont("Helvetica-Bold", 16)
    page.drawString(72, 720, "faxgw bench")
    page.setFont("Helvetica", 11)
    for line in range(34):
        page.drawString(72, 680 - line * 16, f"{line + 1:2d}. Please find the figures below.")
    page.showPage()
    page.save()
    return out.getvalue()


def _times_and_courier() -> bytes:
    out = io.BytesIO()
    page = rl_canvas.Canvas(out, pagesize=A4)
    for n, font in enumerate(("Times-Roman", "Times-BoldItalic", "Courier", "Courier-Oblique",
                              "Symbol", "ZapfDingbats")):
        page.setFont(font, 8 + 3 * n)
        page.drawString(40, 760 - 60 * n, "The quick brown fox jumps over the lazy dog 0123")
    page.showPage()
    page.save()
    return out.getvalue()


LIMITS = Limits()


def _corpus() -> dict[str, bytes]:
    photo = image_to_pdf(solid_image((900, 600), (120, 30, 200), "JPEG"), "photo.jpg",
                         "letter", LIMITS)[0]
    scan = image_to_pdf(scanner_tiff([scan_page("SCAN-1", "top-left")], min_is_black=False),
                        "scan.tif", "a4", LIMITS)[0]
    grey_scan = image_to_pdf(_png(text_page(mode="L")), "grey.png", "letter", LIMITS)[0]
    text = text_to_pdf("Dear Sir,\n\n" + "A line of the letter, typed.\n" * 40, "letter",
                       LIMITS, title="A typed letter")[0]
    cover = cover_page(to="+1 555-123-4567", sender="alice@example.com", subject="Invoice 42",
                       pages=3, date="Mon, 07 Dec 2026 19:31:02 +0000", note="Two pages follow.",
                       paper="letter")
    landscape_legal = reportlab_pdf([landscape(legal)], label="Wide")
    return {
        "letter with photo": _letter_with_photo(),
        "times, courier, symbol": _times_and_courier(),
        "labelled A4": labelled_pdf([PageSpec("A4-1", *A4)]),
        "landscape legal": landscape_legal,
        "landscape legal, fitted": normalize_pdf(landscape_legal, "wide.pdf", "letter",
                                                 LIMITS)[0],
        "form": form_pdf(),
        "form, flattened": normalize_pdf(form_pdf(), "form.pdf", "letter", LIMITS)[0],
        "photo": photo,
        "bilevel scan": scan,
        "grey scan": grey_scan,
        "text": text,
        "cover": cover,
        "cover, then text": merge_pdfs([cover, text]),
    }


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _pixels(png: bytes) -> tuple[tuple[int, int], bytes]:
    with Image.open(io.BytesIO(png), formats=("PNG",)) as image:
        return image.size, image.convert("L").tobytes()


CORPUS = _corpus()


@pytest.mark.parametrize("name", list(CORPUS))
@pytest.mark.parametrize("width_px", [300, 120])
def test_same_pixels_as_before(name: str, width_px: int) -> None:
    pdf = CORPUS[name]
    thumbnails._FONTS.release()  # drawn without a kept font first
    before = _pixels(_before(pdf, width_px))
    first = first_page_png(pdf, width_px)  # opens the standard-font page, draws, keeps it
    again = first_page_png(pdf, width_px)  # its glyphs drawn before, with the faces kept
    assert _pixels(first) == before
    assert _pixels(again) == before
    assert before[1] != bytes(len(before[1])), "the page drew nothing at all"


def test_the_png_is_four_bit_sixteen_greys() -> None:
    png = first_page_png(CORPUS["letter with photo"])
    with Image.open(io.BytesIO(png), formats=("PNG",)) as image:
        image.verify()  # chunk CRCs and structure
    with Image.open(io.BytesIO(png), formats=("PNG",)) as image:
        assert (image.mode, image.size) == ("P", (300, 389))
        assert image.getpalette() == [c for i in range(16) for c in (i * 17,) * 3]
        assert max(image.tobytes()) <= 15
    assert png[24] == 4 and png[25] == 3  # IHDR: bit depth 4, palette
    before = _before(CORPUS["letter with photo"])
    assert len(png) <= len(before) * 1.1  # unfiltered rows compress as well


def test_kept_fonts_are_let_go_after_a_bound() -> None:
    fonts = thumbnails._FONTS
    fonts.release()
    first_page_png(CORPUS["text"])
    held = fonts._held
    assert held is not None
    for _ in range(fonts.REOPEN_AFTER - 1):
        fonts.hold(pdfium)
    assert fonts._held is held
    fonts.hold(pdfium)
    assert fonts._held is not None and fonts._held is not held
