"""First-page pictures (gateway/documents/thumbnails.py) against the way they were made before
(PDFium drawing grey, Pillow quantising it to sixteen greys and writing the PNG): the same
pixels for a corpus of documents the gateway faxes, a valid four-bit PNG, and no pixel changed
by the standard-font page kept between pictures."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pypdfium2 as pdfium
import pytest
from PIL import Image, ImageChops, ImageDraw
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
from gateway.documents.pdf_objects import pdf_from_objects
from gateway.documents.thumbnails import first_page_png

from .corpus import PageSpec, labelled_pdf, scan_page, scanner_tiff, solid_image
from .helpers.pdfs import form_pdf, reportlab_pdf, text_page


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


# --------------------------------------------------------------------------- one-JPEG pages


def _scan_jpeg(size: tuple[int, int], mode: str = "RGB", quality: int = 85) -> bytes:
    """A scanned letter: lines of text on off-white, as a scanner's JPEG."""
    image = Image.new(mode, size, 248 if mode == "L" else (250, 249, 244))
    draw = ImageDraw.Draw(image)
    step = size[0] // 45
    for n in range(size[1] // step - 6):
        draw.text((size[0] // 12, size[0] // 12 + n * step),
                  f"Line {n}: the quick brown fox jumps over the lazy dog, twice over.",
                  fill=20 if mode == "L" else (25, 25, 60), font_size=step * 2 // 3)
    draw.rectangle((size[0] // 12, size[1] - size[0] // 6, size[0] // 3, size[1] - size[0] // 12),
                   fill=0 if mode == "L" else (200, 30, 30))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _jpeg_page(jpeg: bytes, *, space: str = "/DeviceRGB", image_extra: str = "",
               content: str = "q 612 0 0 792 0 0 cm /Im0 Do Q", page_extra: str = "",
               media: str = "0 0 612 792", extra_objects: tuple[bytes, ...] = ()) -> bytes:
    """A one-page PDF whose page draws `jpeg` (an /Im0 XObject, DCTDecode) with `content`,
    written by hand so that each dictionary entry is what the test says."""
    with Image.open(io.BytesIO(jpeg)) as im:
        width, height = im.size
    stream = content.encode("ascii")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        f"<< /Type /Page /Parent 2 0 R /MediaBox [{media}] /Resources << /XObject "
        f"<< /Im0 5 0 R >> >> /Contents 4 0 R {page_extra} >>".encode("ascii"),
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        (f"<< /Type /XObject /Subtype /Image /Width {width} /Height {height} /ColorSpace "
         f"{space} /BitsPerComponent 8 /Filter /DCTDecode {image_extra} /Length "
         f"{len(jpeg)} >>\nstream\n").encode("ascii") + jpeg + b"\nendstream",
        *extra_objects,
    ]
    return pdf_from_objects(objects)


_COLOUR_SCAN = _scan_jpeg((2550, 3300))
_GREY_SCAN = _scan_jpeg((2480, 3508), "L")
_SRGB = b"<< /N 3 /Length 0 >>\nstream\n\nendstream"

# Pages drawn from the JPEG by Pillow: they look as PDFium draws them, not pixel for pixel.
DRAWN_FROM_JPEG = {
    "colour letter scan": _jpeg_page(_COLOUR_SCAN),
    "grey A4 scan": _jpeg_page(_GREY_SCAN, space="/DeviceGray", media="0 0 595.28 841.89",
                               content="q 595.28 0 0 841.89 0 0 cm /Im0 Do Q"),
    "colour scan with margins": _jpeg_page(_COLOUR_SCAN,
                                           content="q 1 0 0 1 0 0 cm 576 0 0 745 18 28.5 cm "
                                                   "/Im0 Do Q"),
    "colour scan, crop box off the origin": _jpeg_page(
        _COLOUR_SCAN, media="-40 -30 572 762",
        content="q 612 0 0 792 -40 -30 cm /Im0 Do Q", page_extra="/CropBox [0 0 540 720]"),
    "ICC-based RGB": _jpeg_page(_COLOUR_SCAN, space="[/ICCBased 6 0 R]",
                                extra_objects=(_SRGB,)),
    "default decode array": _jpeg_page(_COLOUR_SCAN, image_extra="/Decode [0 1 0 1 0 1]"),
}


def _ink(image: Image.Image) -> float:
    return 255 - sum(image.tobytes()) / (image.width * image.height)


@pytest.mark.parametrize("name", list(DRAWN_FROM_JPEG))
def test_one_jpeg_page_is_drawn_from_the_jpeg_like_pdfium(name: str) -> None:
    pdf = DRAWN_FROM_JPEG[name]
    document = pdfium.PdfDocument(pdf)
    page = document[0]
    width, height = page.get_size()
    scale = min(300 / width, 1200 / height)
    drawn = thumbnails._one_jpeg(pdfium, pdf, page, scale)
    rendered = page.render(scale=scale, grayscale=True).to_pil()
    page.close()
    document.close()
    assert drawn is not None, "not drawn from the JPEG"
    assert drawn.size == rendered.size
    difference = ImageChops.difference(drawn, rendered).tobytes()
    assert sum(difference) / len(difference) < 3.0  # of 255 grey levels, on average
    assert abs(_ink(drawn) - _ink(rendered)) < 0.05 * _ink(rendered) + 0.5
    # The red box at the bottom left and the first line of text, where PDFium has them.
    for box in ((30, 330, 90, 360), (20, 20, 200, 40)):
        assert _ink(drawn.crop(box)) > 10 and _ink(rendered.crop(box)) > 10
    png = first_page_png(pdf)
    assert _pixels(png)[0] == rendered.size


_CMYK = io.BytesIO()
Image.new("CMYK", (2550, 3300), (0, 0, 0, 40)).save(_CMYK, "JPEG")
_MASK = b"<< /Type /XObject /Subtype /Image /Width 1 /Height 1 /ColorSpace /DeviceGray " \
        b"/BitsPerComponent 8 /Length 1 >>\nstream\n\x80\nendstream"

# Pages PDFium draws (the same pixels as before): what the JPEG alone does not show as the
# page does, and what is not worth it.
LEFT_TO_PDFIUM = {
    "inverted by /Decode": _jpeg_page(_COLOUR_SCAN, image_extra="/Decode [1 0 1 0 1 0]"),
    "soft mask": _jpeg_page(_COLOUR_SCAN, image_extra="/SMask 6 0 R", extra_objects=(_MASK,)),
    "CMYK": _jpeg_page(_CMYK.getvalue(), space="/DeviceCMYK"),
    "page rotated": _jpeg_page(_COLOUR_SCAN, page_extra="/Rotate 90"),
    "drawn upside down": _jpeg_page(_COLOUR_SCAN, content="q 612 0 0 -792 0 792 cm /Im0 Do Q"),
    "clipped": _jpeg_page(_COLOUR_SCAN, content="q 0 0 300 400 re W n 612 0 0 792 0 0 cm "
                                                "/Im0 Do Q"),
    "drawn twice": _jpeg_page(_COLOUR_SCAN, content="q 306 0 0 396 0 0 cm /Im0 Do Q "
                                                    "q 306 0 0 396 306 396 cm /Im0 Do Q"),
    "a line over it": _jpeg_page(_COLOUR_SCAN, content="q 612 0 0 792 0 0 cm /Im0 Do Q "
                                                       "10 10 m 600 780 l S"),
    "an annotation": _jpeg_page(_COLOUR_SCAN, page_extra="/Annots [6 0 R]", extra_objects=(
        b"<< /Type /Annot /Subtype /Square /Rect [100 100 300 300] /C [1 0 0] /F 4 >>",)),
    "decode parameters": _jpeg_page(_COLOUR_SCAN, image_extra="/DecodeParms "
                                                              "<< /ColorTransform 0 >>"),
    "grey below the size": _jpeg_page(_scan_jpeg((1632, 2112), "L"), space="/DeviceGray"),
    "small colour image": _jpeg_page(_scan_jpeg((500, 650))),
}


@pytest.mark.parametrize("name", list(LEFT_TO_PDFIUM))
def test_other_jpeg_pages_are_drawn_by_pdfium(name: str) -> None:
    pdf = LEFT_TO_PDFIUM[name]
    document = pdfium.PdfDocument(pdf)
    page = document[0]
    width, height = page.get_size()
    assert thumbnails._one_jpeg(pdfium, pdf, page, min(300 / width, 1200 / height)) is None
    page.close()
    document.close()
    assert _pixels(first_page_png(pdf)) == _pixels(_before(pdf))


def test_one_jpeg_page_from_a_file_reads_no_more_than_it_needs(tmp_path: Path) -> None:
    path = tmp_path / "scan.pdf"
    path.write_bytes(DRAWN_FROM_JPEG["colour letter scan"])
    assert _pixels(first_page_png(path)) == _pixels(first_page_png(path.read_bytes()))
