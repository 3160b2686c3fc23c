"""PDFs and page images the document tests build: a scanned-looking letter, pages with
marked corners, an AcroForm (shared by tests/test_convert.py and tests/test_thumbnails.py)."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw
from reportlab.lib.pagesizes import letter
from reportlab.pdfgen import canvas as rl_canvas

A4_300DPI = (2480, 3508)


def text_page(size: tuple[int, int] = A4_300DPI, label: str = "Page", lines: int = 30,
              mode: str = "1") -> Image.Image:
    """A plausible scanned letter: lines of text at about 12 pt at 300 dpi."""
    image = Image.new("L", size, 255)
    draw = ImageDraw.Draw(image)
    step = max(40, (size[1] - 400) // lines)
    for number in range(lines):
        draw.text((240, 200 + number * step),
                  f"{label} line {number}: the quick brown fox jumps over the lazy dog.",
                  fill=0, font_size=max(12, size[0] // 50))
    return image.convert(mode) if mode != "L" else image


def reportlab_pdf(sizes: list[tuple[float, float]], label: str = "Page") -> bytes:
    """Pages with a label and a dark square in each corner, so clipping shows."""
    out = io.BytesIO()
    canvas = rl_canvas.Canvas(out, pagesize=sizes[0])
    for number, (w, h) in enumerate(sizes, start=1):
        canvas.setPageSize((w, h))
        canvas.setFont("Helvetica", 24)
        canvas.drawString(72, h / 2, f"{label} {number}")
        for x, y in ((0, 0), (w - 30, 0), (0, h - 30), (w - 30, h - 30)):
            canvas.rect(x, y, 30, 30, fill=1, stroke=0)
        canvas.showPage()
    canvas.save()
    return out.getvalue()


def form_pdf() -> bytes:
    out = io.BytesIO()
    canvas = rl_canvas.Canvas(out, pagesize=letter)
    canvas.drawString(72, 720, "Name:")
    canvas.acroForm.textfield(name="name", value="Jane Q Sender", x=120, y=710, width=220,
                              height=20)
    canvas.acroForm.checkbox(name="agree", checked=True, x=120, y=680)
    canvas.showPage()
    canvas.save()
    return out.getvalue()
