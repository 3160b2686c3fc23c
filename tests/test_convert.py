"""gateway.convert on inputs built here: scans, photos, text, PDFs, forms, office stand-ins.

Every produced PDF is checked the way a fax provider would take it: page count, every page
portrait and no larger than the paper, and rendered with PDFium to see that what should be
on the page is there (and, for min-is-black scans, that white stays white).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageDraw
from pypdf import PdfReader, PdfWriter
from pypdf.generic import BooleanObject, NameObject, TextStringObject
from reportlab.lib.pagesizes import landscape, legal, letter
from reportlab.pdfgen import canvas as rl_canvas

from gateway.documents.convert import (
    PAPER,
    ConvertError,
    Limits,
    cover_page,
    image_to_pdf,
    merge_pdfs,
    normalize_pdf,
    text_to_pdf,
)
from gateway.documents.office import office_to_pdf
from gateway.documents.thumbnails import first_page_png, is_blank_png

from .conftest import needs
from .corpus import render_pages
from .helpers.pdfs import A4_300DPI, form_pdf, reportlab_pdf, text_page

LIMITS = Limits()


# --------------------------------------------------------------------------- helpers


def render(pdf: bytes, scale: float = 0.5) -> list[Image.Image]:
    """Every page as a grayscale image (72 dpi * scale; half the corpus's default: faster)."""
    return render_pages(pdf, scale)


def check_fax_pdf(pdf: bytes, paper: str, pages: int, blank_ok: bool = False
                  ) -> list[Image.Image]:
    """Page count, portrait pages within the paper, and nothing blank."""
    paper_w, paper_h = PAPER[paper]
    reader = PdfReader(io.BytesIO(pdf))
    assert len(reader.pages) == pages
    for page in reader.pages:
        box = page.mediabox
        assert page.rotation == 0
        assert float(box.width) <= float(box.height), "page is landscape"
        assert float(box.width) <= paper_w + 1 and float(box.height) <= paper_h + 1
    images = render(pdf)
    assert len(images) == pages
    if not blank_ok:
        for number, image in enumerate(images, start=1):
            assert image.getextrema()[0] < 128, f"page {number} renders blank"
    return images


def ink(image: Image.Image, box: tuple[float, float, float, float]) -> float:
    """Share of dark pixels in a box given as fractions of the page (left, top, right, bottom)."""
    w, h = image.size
    crop = image.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))
    histogram = crop.histogram()
    return sum(histogram[:128]) / max(1, crop.width * crop.height)


def tiff_bytes(frames: list[Image.Image], **options: object) -> bytes:
    out = io.BytesIO()
    frames[0].save(out, "TIFF", save_all=True, append_images=frames[1:], **options)
    return out.getvalue()


def image_filters(pdf: bytes) -> list[str]:
    filters = []
    for page in PdfReader(io.BytesIO(pdf)).pages:
        for xobject in page["/Resources"]["/XObject"].values():
            value = xobject.get_object()["/Filter"]
            filters.append(str(value[0] if isinstance(value, list) else value))
    return filters


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size and holds no pixels: only the header is ever read."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- images


def test_multipage_g4_tiff_stays_bilevel_and_small() -> None:
    data = tiff_bytes([text_page(label="First"), text_page(label="Second")],
                      compression="group4", dpi=(300, 300))
    started = time.perf_counter()
    pdf, pages = image_to_pdf(data, "scan.tif", "a4", LIMITS)
    elapsed = time.perf_counter() - started
    assert pages == 2
    images = check_fax_pdf(pdf, "a4", 2)
    assert image_filters(pdf) == ["/CCITTFaxDecode", "/CCITTFaxDecode"]
    assert len(pdf) < 2 * 100_000, f"{len(pdf)} bytes for two G4 pages"
    assert elapsed < 10
    # Text starts near the top of a portrait page: the scan was not rotated.
    assert ink(images[0], (0.05, 0.03, 0.95, 0.2)) > 0.01


@pytest.mark.parametrize(("mode", "compression"), [
    ("1", "tiff_lzw"), ("1", "raw"), ("1", "group3"), ("L", "tiff_lzw"), ("L", "jpeg"),
    ("RGB", "jpeg"), ("RGB", "tiff_lzw"),
])
def test_tiff_compressions(mode: str, compression: str) -> None:
    page = text_page(size=(1700, 2200), mode="L")
    page = page.convert(mode) if mode != "L" else page
    data = tiff_bytes([page, page], compression=compression, dpi=(200, 200))
    pdf, pages = image_to_pdf(data, "scan.tif", "letter", LIMITS)
    assert pages == 2
    check_fax_pdf(pdf, "letter", 2)
    # The drawn text is anti-aliased, so only the bilevel scan stays bilevel.
    assert set(image_filters(pdf)) == {"/CCITTFaxDecode" if mode == "1" else "/DCTDecode"}


def test_bilevel_page_stored_as_8_bit_becomes_g4() -> None:
    page = text_page(size=(1700, 2200)).convert("L")  # only 0 and 255, as some scanners write
    pdf, _ = image_to_pdf(tiff_bytes([page], compression="tiff_lzw"), "s.tif", "letter", LIMITS)
    check_fax_pdf(pdf, "letter", 1)
    assert image_filters(pdf) == ["/CCITTFaxDecode"]


@pytest.mark.parametrize(("mode", "compression"), [
    ("1", "group4"), ("1", "raw"), ("1", "tiff_lzw"), ("L", "raw"), ("L", "tiff_lzw"),
])
def test_min_is_black_and_min_is_white_white_pages_stay_white(mode: str,
                                                              compression: str) -> None:
    white = Image.new(mode, (1700, 2200), 255)
    encoded = {}
    for photometric in (0, 1):  # 0 = MinIsWhite, 1 = MinIsBlack
        data = tiff_bytes([white], compression=compression, tiffinfo={262: photometric})
        assert Image.open(io.BytesIO(data)).tag_v2[262] == photometric
        encoded[photometric] = data
        pdf, pages = image_to_pdf(data, "white.tif", "letter", LIMITS)
        assert pages == 1
        check_fax_pdf(pdf, "letter", 1, blank_ok=True)
        assert is_blank_png(first_page_png(pdf)), f"photometric {photometric} came out dark"
    # The stored samples really differ: the same white page is 0s in one file, 1s in the
    # other, so the test would catch a converter that ignored the tag.
    assert encoded[0] != encoded[1]


def test_min_is_black_g4_with_content_is_not_a_negative() -> None:
    page = Image.new("1", (1700, 2200), 255)
    ImageDraw.Draw(page).rectangle((100, 100, 600, 400), fill=0)
    data = tiff_bytes([page], compression="group4", tiffinfo={262: 1})
    pdf, _ = image_to_pdf(data, "mib.tif", "letter", LIMITS)
    image = check_fax_pdf(pdf, "letter", 1)[0]
    assert ink(image, (0.1, 0.1, 0.3, 0.15)) > 0.9  # the black box
    assert ink(image, (0.1, 0.4, 0.9, 0.9)) < 0.01  # the white page


def test_fax_tiff_with_204x98_dpi_keeps_its_proportions() -> None:
    page = text_page(size=(1728, 1100), lines=20)
    data = tiff_bytes([page], compression="group3", dpi=(204, 98))
    pdf, _ = image_to_pdf(data, "fax.tif", "letter", LIMITS)
    check_fax_pdf(pdf, "letter", 1)
    content = PdfReader(io.BytesIO(pdf)).pages[0].get_contents().get_data().decode()
    draw_w, _, _, draw_h = (float(v) for v in content.split()[1:5])
    assert draw_w / draw_h == pytest.approx((1728 / 204) / (1100 / 98), rel=0.01)


def test_landscape_scan_is_turned_to_portrait() -> None:
    page = Image.new("1", A4_300DPI[::-1], 255)
    ImageDraw.Draw(page).rectangle((0, 0, A4_300DPI[1], 150), fill=0)  # a bar along the top
    data = tiff_bytes([page], compression="group4", dpi=(300, 300))
    pdf, _ = image_to_pdf(data, "wide.tif", "letter", LIMITS)
    image = check_fax_pdf(pdf, "letter", 1)[0]
    # Turned counter-clockwise: the top edge now runs down the left side of the page.
    assert ink(image, (0.0, 0.3, 0.1, 0.7)) > 0.3
    assert ink(image, (0.2, 0.0, 1.0, 1.0)) < 0.01


def test_small_landscape_image_is_neither_turned_nor_enlarged() -> None:
    image = Image.new("RGB", (200, 100), (200, 30, 30))
    out = io.BytesIO()
    image.save(out, "PNG")
    pdf, _ = image_to_pdf(out.getvalue(), "logo.png", "letter", LIMITS)
    check_fax_pdf(pdf, "letter", 1)
    content = PdfReader(io.BytesIO(pdf)).pages[0].get_contents().get_data().decode()
    assert content.split()[1:5] == ["200", "0", "0", "100"]


def test_jpeg_exif_orientation_is_honoured() -> None:
    shown = Image.new("RGB", (1200, 1600), "white")
    ImageDraw.Draw(shown).rectangle((0, 0, 1200, 120), fill="black")  # bar along the top
    stored = shown.transpose(Image.Transpose.ROTATE_90)  # what a phone held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    out = io.BytesIO()
    stored.save(out, "JPEG", exif=exif, quality=90)
    pdf, _ = image_to_pdf(out.getvalue(), "photo.jpg", "letter", LIMITS)
    page = check_fax_pdf(pdf, "letter", 1)[0]
    assert ink(page, (0.2, 0.03, 0.8, 0.08)) > 0.8  # the bar is at the top
    assert ink(page, (0.2, 0.3, 0.8, 0.97)) < 0.01


def test_big_photo_is_downsampled_to_fax_resolution_quickly() -> None:
    photo = Image.effect_mandelbrot((4000, 3000), (-2.0, -1.2, 1.0, 1.2), 64).convert("RGB")
    out = io.BytesIO()
    photo.save(out, "JPEG", quality=90)
    started = time.perf_counter()
    pdf, _ = image_to_pdf(out.getvalue(), "photo.jpg", "letter", LIMITS)
    elapsed = time.perf_counter() - started
    check_fax_pdf(pdf, "letter", 1)
    xobject = next(iter(PdfReader(io.BytesIO(pdf)).pages[0]["/Resources"]["/XObject"]
                        .values())).get_object()
    assert xobject["/Filter"] == "/DCTDecode" and xobject["/ColorSpace"] == "/DeviceGray"
    assert max(xobject["/Width"], xobject["/Height"]) <= 2300
    assert len(pdf) < 500_000
    assert elapsed < 10


def test_png_alpha_is_composited_on_white() -> None:
    image = Image.new("RGBA", (800, 1000), (0, 0, 0, 0))  # transparent black
    ImageDraw.Draw(image).rectangle((0, 0, 400, 200), fill=(0, 0, 0, 255))
    out = io.BytesIO()
    image.save(out, "PNG")
    pdf, _ = image_to_pdf(out.getvalue(), "sig.png", "a4", LIMITS)
    page = check_fax_pdf(pdf, "a4", 1)[0]
    assert ink(page, (0.0, 0.3, 1.0, 1.0)) < 0.01  # transparency did not turn black


def test_animated_gif_frames_become_pages() -> None:
    frames = []
    for number in range(3):
        frame = Image.new("P", (300, 400), 0)
        frame.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
        ImageDraw.Draw(frame).rectangle((20, 20 + number * 100, 280, 80 + number * 100), fill=1)
        frames.append(frame)
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    pdf, pages = image_to_pdf(out.getvalue(), "anim.gif", "letter", LIMITS)
    assert pages == 3
    check_fax_pdf(pdf, "letter", 3)


def test_decompression_bomb_is_refused_from_the_header() -> None:
    before = Image.MAX_IMAGE_PIXELS
    small = Limits(max_image_pixels=1_000_000)
    with pytest.raises(ConvertError, match=r"^bomb\.png is too large an image"):
        image_to_pdf(png_header_only(2000, 1000), "bomb.png", "letter", small)
    # Beyond Pillow's own hard limit it refuses at open; same answer to the sender.
    with pytest.raises(ConvertError, match=r"^huge\.png is too large an image"):
        image_to_pdf(png_header_only(30000, 30000), "huge.png", "letter", LIMITS)
    assert Image.MAX_IMAGE_PIXELS == before


def test_image_page_limit_and_garbage() -> None:
    page = Image.new("1", (100, 100), 255)
    data = tiff_bytes([page] * 3, compression="group4")
    with pytest.raises(ConvertError, match=r"^many\.tif has 3 pages; at most 2 pages per fax$"):
        image_to_pdf(data, "many.tif", "letter", Limits(max_pages=2))
    with pytest.raises(ConvertError, match=r"^scan\.tif could not be read as an image$"):
        image_to_pdf(b"II*\x00garbage" * 10, "scan.tif", "letter", LIMITS)
    truncated = tiff_bytes([text_page()], compression="group4")[:3000]
    with pytest.raises(ConvertError, match="could not be read as an image"):
        image_to_pdf(truncated, "cut.tif", "letter", LIMITS)
    with pytest.raises(ConvertError) as caught:
        image_to_pdf(b"%!PS-Adobe-3.0 EPSF-3.0\n", "x\u00e9\nname.eps", "letter", LIMITS)
    assert str(caught.value).isascii() and "\n" not in str(caught.value)


# --------------------------------------------------------------------------- text


def test_text_pages_wrap_tabs_and_form_feeds() -> None:
    long_line = " ".join(f"word{n}" for n in range(60))
    text = ("Invoice\tNo. 42\r\nCaf\u00e9 \u20ac 12,50 \u2014 \u201cquoted\u201d \u4e2d\u6587\n"
            + long_line + "\n\fSecond page\n")
    pdf, pages = text_to_pdf(text, "a4", LIMITS, title="Order confirmation")
    assert pages == 2
    check_fax_pdf(pdf, "a4", 2)
    reader = PdfReader(io.BytesIO(pdf))
    first = reader.pages[0].extract_text()
    assert "Invoice No. 42" in " ".join(first.split())
    # The Chinese is drawn with the shipped CJK font now, not as "??" (issue 15, item 7).
    assert "Caf\u00e9 \u20ac 12,50 \u2014 \u201cquoted\u201d" in first
    assert "\u4e2d\u6587" in first and "??" not in first
    assert "word59" in first and "Page 1 of 2" in first and "Order confirmation" in first
    assert "Second page" in reader.pages[1].extract_text()
    for page in reader.pages:
        sizes = re.findall(rb"([\d.]+) Tf", page.get_contents().get_data())
        assert sizes and min(float(s) for s in sizes) >= 11


def test_text_keeps_80_columns_on_a4_and_letter() -> None:
    line = "".join(str(n % 10) for n in range(80))
    for paper in PAPER:
        pdf, _ = text_to_pdf(line + "\n" + line, paper, LIMITS)
        assert line in PdfReader(io.BytesIO(pdf)).pages[0].extract_text().split("\n")


def test_text_limits() -> None:
    with pytest.raises(ConvertError, match="too long to fax"):
        text_to_pdf("x" * 101, "letter", Limits(max_text_chars=100))
    with pytest.raises(ConvertError, match="more than 2 pages"):
        text_to_pdf("line\n" * 500, "letter", Limits(max_pages=2))
    with pytest.raises(ConvertError, match="no text"):
        text_to_pdf(" \n\f\n\t", "letter", LIMITS)
    pdf, pages = text_to_pdf("\fone\f\f\ftwo\f", "letter", LIMITS)
    assert pages == 2  # leading, repeated and trailing form feeds make no blank pages
    check_fax_pdf(pdf, "letter", 2)


def test_cover_page() -> None:
    pdf = cover_page(to="+1 555 0100 (Dr. Smith)", sender="scanner@example.com",
                     subject="Referral for J\u00fcrgen", pages=4, date="2024-05-01 10:00 UTC",
                     note="Please call back.\n" + "Long note. " * 1000, paper="letter")
    check_fax_pdf(pdf, "letter", 1)
    text = PdfReader(io.BytesIO(pdf)).pages[0].extract_text()
    for expected in ("FAX", "+1 555 0100", "scanner@example.com", "Referral for J\u00fcrgen",
                     "4 (including this cover page)", "2024-05-01", "Please call back.",
                     "the note is cut here"):
        assert expected in text
    plain = cover_page(to="x", sender="y", subject="", pages=1, date="d", note=None, paper="a4")
    check_fax_pdf(plain, "a4", 1)


# --------------------------------------------------------------------------- PDFs


def test_fitting_portrait_pdf_is_returned_untouched() -> None:
    data = reportlab_pdf([letter, letter])
    assert normalize_pdf(data, "doc.pdf", "letter", LIMITS) == (data, 2)


def test_mixed_landscape_legal_and_a4_pages_fit_letter_uncropped() -> None:
    data = reportlab_pdf([letter, landscape(letter), legal, (595.28, 841.89), (2000, 1200)])
    pdf, pages = normalize_pdf(data, "mixed.pdf", "letter", LIMITS)
    assert pages == 5
    images = check_fax_pdf(pdf, "letter", 5)
    reader = PdfReader(io.BytesIO(pdf))
    for number, page in enumerate(reader.pages, start=1):
        assert f"Page {number}" in page.extract_text()
    for image in images:
        # All four corner squares of every page survive (never cropped).
        left, top, right, bottom = Image.eval(image, lambda v: 255 - v).getbbox()
        w, h = image.size
        content = image.crop((left, top, right, bottom))
        for box in ((0, 0, 0.02, 0.02), (0.98, 0, 1, 0.02), (0, 0.98, 0.02, 1),
                    (0.98, 0.98, 1, 1)):
            assert ink(content, box) > 0.5
    # Legal was shrunk to the height of Letter and centred across.
    left, _, right, _ = Image.eval(images[2], lambda v: 255 - v).getbbox()
    assert left == pytest.approx(images[2].width * (1 - 792 / 1008) / 2, abs=3)
    assert images[2].width - right == pytest.approx(left, abs=3)


def test_rotate_attribute_is_baked_into_the_content() -> None:
    original = reportlab_pdf([letter] * 4)
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(original)))
    for page, angle in zip(writer.pages, (90, 180, 270, 0), strict=True):
        page.rotate(angle)
    out = io.BytesIO()
    writer.write(out)
    pdf, _ = normalize_pdf(out.getvalue(), "rotated.pdf", "letter", LIMITS)
    images = check_fax_pdf(pdf, "letter", 4)
    # What the sender saw in a viewer (which honours /Rotate), landscape views turned
    # counter-clockwise onto portrait paper, is what the fax shows.
    for number, (shown, faxed) in enumerate(zip(render(out.getvalue()), images, strict=True),
                                            start=1):
        expected = shown.rotate(90, expand=True) if shown.width > shown.height else shown
        assert expected.size == faxed.size
        difference = ImageChops.difference(expected, faxed)
        assert sum(difference.histogram()[64:]) < 0.002 * faxed.width * faxed.height, number


def test_filled_form_is_flattened() -> None:
    pdf, pages = normalize_pdf(form_pdf(), "form.pdf", "letter", LIMITS)
    assert pages == 1
    check_fax_pdf(pdf, "letter", 1)
    reader = PdfReader(io.BytesIO(pdf))
    page = reader.pages[0]
    assert "/Annots" not in page
    assert "/AcroForm" not in reader.trailer["/Root"]
    assert "Jane Q Sender" in page.extract_text()


def test_form_with_stale_appearances_gets_its_values_printed() -> None:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(form_pdf())))
    for ref in writer.pages[0]["/Annots"]:
        annotation = ref.get_object()
        if annotation.get("/FT") == "/Tx":
            del annotation["/AP"]
            annotation[NameObject("/V")] = TextStringObject("Updated value")
    writer._root_object["/AcroForm"][NameObject("/NeedAppearances")] = BooleanObject(True)
    out = io.BytesIO()
    writer.write(out)
    pdf, _ = normalize_pdf(out.getvalue(), "stale.pdf", "letter", LIMITS)
    page = PdfReader(io.BytesIO(pdf)).pages[0]
    assert "/Annots" not in page
    assert "Updated value" in page.extract_text()


def test_flattened_landscape_form_keeps_its_values() -> None:
    out = io.BytesIO()
    canvas = rl_canvas.Canvas(out, pagesize=landscape(legal))
    canvas.acroForm.textfield(name="f", value="Wide form value", x=700, y=500, width=250,
                              height=20)
    canvas.showPage()
    canvas.save()
    pdf, _ = normalize_pdf(out.getvalue(), "wide.pdf", "letter", LIMITS)
    check_fax_pdf(pdf, "letter", 1)
    assert "Wide form value" in PdfReader(io.BytesIO(pdf)).pages[0].extract_text()


@pytest.mark.parametrize("algorithm", ["RC4-128", "AES-256"])
def test_encrypted_pdfs(algorithm: str) -> None:
    def encrypted(user_password: str) -> bytes:
        writer = PdfWriter(clone_from=PdfReader(io.BytesIO(reportlab_pdf([letter]))))
        writer.encrypt(user_password=user_password, owner_password="owner",
                       algorithm=algorithm)
        out = io.BytesIO()
        writer.write(out)
        return out.getvalue()

    with pytest.raises(ConvertError, match=r"^locked\.pdf is password-protected; send it "
                                           r"without a password$"):
        normalize_pdf(encrypted("secret"), "locked.pdf", "letter", LIMITS)
    pdf, pages = normalize_pdf(encrypted(""), "restricted.pdf", "letter", LIMITS)
    assert pages == 1 and not PdfReader(io.BytesIO(pdf)).is_encrypted
    check_fax_pdf(pdf, "letter", 1)


def test_unreadable_and_too_long_pdfs() -> None:
    with pytest.raises(ConvertError, match=r"^junk\.pdf is not a readable PDF$"):
        normalize_pdf(b"%PDF-1.4\n" + os.urandom(500), "junk.pdf", "letter", LIMITS)
    with pytest.raises(ConvertError, match=r"^long\.pdf has 3 pages; at most 2 pages per fax$"):
        normalize_pdf(reportlab_pdf([letter] * 3), "long.pdf", "letter", Limits(max_pages=2))


def test_merge_and_thumbnail() -> None:
    text_pdf, _ = text_to_pdf("hello", "letter", LIMITS)
    scan_pdf, _ = image_to_pdf(tiff_bytes([text_page()], compression="group4"), "s.tif",
                               "letter", LIMITS)
    merged = merge_pdfs([text_pdf, scan_pdf, text_pdf])
    check_fax_pdf(merged, "letter", 3)
    png = first_page_png(merged)
    with Image.open(io.BytesIO(png)) as thumbnail:
        assert thumbnail.format == "PNG" and thumbnail.width == 300
    assert not is_blank_png(png)
    blank = io.BytesIO()
    blank_canvas = rl_canvas.Canvas(blank, pagesize=letter)
    blank_canvas.showPage()
    blank_canvas.save()
    assert is_blank_png(first_page_png(blank.getvalue(), width_px=100))
    with pytest.raises(ConvertError):
        merge_pdfs([])
    with pytest.raises(ConvertError):
        first_page_png(b"not a pdf")


# --------------------------------------------------------------------------- office


def fake_soffice(directory: Path, script: str) -> None:
    path = directory / "soffice"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_office_without_libreoffice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConvertError) as caught:
        office_to_pdf(b"PK\x03\x04", "letter.docx")
    assert str(caught.value) == (
        "letter.docx is an office document; this gateway cannot convert office documents "
        "(LibreOffice is not installed); send a PDF")


def test_office_plumbing_with_a_stand_in(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    """A shell stand-in for soffice: the arguments, the output pick-up and the timeout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sample = tmp_path / "sample.pdf"
    sample.write_bytes(reportlab_pdf([letter]))
    args_file = tmp_path / "args"
    fake_soffice(bin_dir, f'echo "$@" > {args_file}\n'
                          'while [ $# -gt 1 ]; do [ "$1" = --outdir ] && out=$2; shift; done\n'
                          f'cp {sample} "$out/document.pdf"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert office_to_pdf(b"PK", "report.docx") == sample.read_bytes()
    args = args_file.read_text()
    assert "-env:UserInstallation=file:///" in args and "--headless" in args
    assert args.rstrip().endswith("document.docx")

    fake_soffice(bin_dir, "exit 1\n")
    with pytest.raises(ConvertError, match="could not be converted to PDF"):
        office_to_pdf(b"PK", "report.docx")

    pid_file = tmp_path / "pid"
    fake_soffice(bin_dir, f"sleep 60 &\necho $! > {pid_file}\nwait\n")
    started = time.perf_counter()
    with pytest.raises(ConvertError, match=r"^slow\.odt took too long to convert; send a PDF$"):
        office_to_pdf(b"PK", "slow.odt", timeout_s=1)
    assert time.perf_counter() - started < 10
    helper = int(pid_file.read_text())
    # The helper it spawned was killed with it (gone, or a zombie awaiting its reaper).
    status = Path(f"/proc/{helper}/status")
    assert not status.exists() or "\nState:\tZ" in status.read_text()


@needs(shutil.which("soffice") is not None, "LibreOffice (soffice); .ci/run installs it")
def test_office_with_libreoffice(tmp_path: Path) -> None:
    source = tmp_path / "note.txt"
    source.write_text("Converted by LibreOffice\n")
    pdf = office_to_pdf(source.read_bytes(), "note.txt", timeout_s=120)
    assert "Converted by LibreOffice" in PdfReader(io.BytesIO(pdf)).pages[0].extract_text()


def test_conversions_run_in_parallel_threads() -> None:
    """Callers use worker threads: nothing here may depend on shared mutable state."""
    from concurrent.futures import ThreadPoolExecutor

    inputs = [tiff_bytes([text_page(size=(1700, 2200), label=f"Doc {n}")],
                         compression="group4", dpi=(200, 200)) for n in range(4)]
    expected = [image_to_pdf(data, "s.tif", "letter", LIMITS) for data in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda d: image_to_pdf(d, "s.tif", "letter", LIMITS), inputs))
        thumbnails = list(pool.map(first_page_png, [pdf for pdf, _ in results]))
    assert [pages for _, pages in results] == [1, 1, 1, 1]
    assert [len(pdf) for pdf, _ in results] == [len(pdf) for pdf, _ in expected]
    assert not any(is_blank_png(png) for png in thumbnails)


# --------------------------------------------------------------------------- scripts


def test_shipped_fonts_cover_the_scripts_people_fax_in() -> None:
    from gateway.documents import fonts

    text = "发票 日本語 한국어 Счёт Τιμολόγιο فاتورة חשבונית Ünïcødé € “ ”"
    assert fonts.undrawable(text) == []
    assert fonts.undrawable("a \U00013000 b \U00013000") == ["\U00013000"]


def test_cover_page_subject_and_note_in_other_scripts() -> None:
    pdf = cover_page(to="+1 555-123-4567", sender="a@example.com", subject="Счёт 发票 Τιμή",
                     pages=2, date="today", note="Примечание 注意 ملاحظة", paper="letter")
    text = PdfReader(io.BytesIO(pdf)).pages[0].extract_text()
    for word in ("Счёт", "发票", "Τιμή", "Примечание", "注意"):
        assert word in text, text
    assert "?" not in text


def test_right_to_left_line_is_shaped_and_set_flush_right() -> None:
    pdf, _ = text_to_pdf("שלום עולם", "letter", LIMITS)
    page = render(pdf, scale=1.0)[0].convert("L")
    band = page.crop((0, 40 + 11 - 9, 612, 40 + 11 + 3))  # the first line, top-down
    ink = band.point(lambda v: 255 if v < 128 else 0)
    left, _, right, _ = ink.getbbox()
    assert right > 612 - 32 - 4 and left > 612 / 2, (left, right)
