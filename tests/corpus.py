"""Builders for the mail corpus: raw MIME in the shapes real clients write, the documents they
carry (PDFs with a readable label on every page, scanner TIFFs, photos), and checks on the fax
PDF that comes out (paper, orientation, order, ink).

Messages are assembled as raw bytes, not with ``email.message``: the point is to reproduce what
Outlook, Apple Mail, Gmail, scanners and legacy systems put on the wire (boundaries, header
spellings, quoted-printable binaries, 8-bit bodies), which the stdlib serializer would tidy up.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import quopri
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from PIL import Image, ImageDraw, ImageFont, ImageOps
from pypdf import PdfReader, PdfWriter
from reportlab.pdfgen.canvas import Canvas

CRLF = b"\r\n"
LETTER = (612.0, 792.0)
LEGAL = (612.0, 1008.0)
A4 = (595.28, 841.89)
# Scanner pages: A4 at 200 dpi.
A4_200DPI_PX = (1654, 2339)

# ----------------------------------------------------------------------------- raw MIME


def _header_lines(headers: Sequence[tuple[str, str]]) -> bytes:
    # Header values are ASCII (encoded words where needed), as clients send them.
    return b"".join(f"{name}: {value}".encode("ascii") + CRLF for name, value in headers)


def entity(headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    """One MIME entity: its header lines, a blank line, the (already encoded) body."""
    body = body if body.endswith(CRLF) else body + CRLF
    return _header_lines(headers) + CRLF + body


def multipart(subtype: str, boundary: str, parts: Sequence[bytes],
              extra_params: str = "", preamble: bytes = b"") -> bytes:
    """A multipart entity made of entities built with `entity` / `multipart`."""
    ctype = f'multipart/{subtype};{extra_params} boundary="{boundary}"'
    body = preamble
    for part in parts:
        body += b"--" + boundary.encode() + CRLF + part
    body += b"--" + boundary.encode() + b"--" + CRLF
    return entity([("Content-Type", ctype)], body)


def mail(headers: Sequence[tuple[str, str]], content: bytes) -> bytes:
    """A whole message: top-level headers, MIME-Version, then the content entity's headers."""
    return _header_lines([*headers, ("MIME-Version", "1.0")]) + content


def b64(data: bytes) -> bytes:
    """Base64 in 76-character lines, as every client writes it."""
    text = base64.b64encode(data)
    return CRLF.join(text[i:i + 76] for i in range(0, len(text), 76)) + CRLF


def qp_binary(data: bytes) -> bytes:
    """Quoted-printable of binary data, as Outlook encodes PDFs: every byte outside printable
    ASCII (CR and LF included, so nothing depends on line-end conversion) is =XX, with soft line
    breaks keeping lines at most 76 characters."""
    lines: list[bytes] = []
    line = b""
    for byte in data:
        token = bytes([byte]) if 33 <= byte <= 126 and byte != 61 else b"=%02X" % byte
        if len(line) + len(token) > 75:
            lines.append(line + b"=")
            line = b""
        line += token
    lines.append(line)
    return CRLF.join(lines) + CRLF


def qp_text(data: bytes) -> bytes:
    """Quoted-printable of text (line breaks kept as hard breaks), as legacy mailers send."""
    encoded = quopri.encodestring(data.replace(CRLF, b"\n"))
    return encoded.replace(b"\n", CRLF) + (b"" if encoded.endswith(b"\n") else CRLF)


def crlf(text: str, charset: str = "ascii") -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode(charset)


# ----------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class PageSpec:
    """One source page: its size in points and the label printed big in its middle."""

    label: str
    width: float = LETTER[0]
    height: float = LETTER[1]


def labelled_pdf(pages: Sequence[PageSpec]) -> bytes:
    """A PDF whose every page has a thick frame 3..9 pt inside its edges, its label in large
    type in the middle, and marker texts on its top and bottom lines, so that order, cropping
    and scaling can all be seen in the fax."""
    buf = io.BytesIO()
    canvas = Canvas(buf, invariant=True)
    for spec in pages:
        w, h = spec.width, spec.height
        canvas.setPageSize((w, h))
        canvas.setLineWidth(6)
        canvas.rect(6, 6, w - 12, h - 12, stroke=1, fill=0)
        canvas.setFont("Helvetica-Bold", 44)
        canvas.drawCentredString(w / 2, h / 2, spec.label)
        canvas.setFont("Helvetica", 12)
        canvas.drawCentredString(w / 2, h - 30, f"TOP-{spec.label}")
        canvas.drawCentredString(w / 2, 20, f"BOTTOM-{spec.label}")
        canvas.showPage()
    canvas.save()
    return buf.getvalue()


def encrypted_pdf(password: str = "secret") -> bytes:
    writer = PdfWriter()
    writer.append(PdfReader(io.BytesIO(labelled_pdf([PageSpec("SECRET-1")]))))
    writer.encrypt(user_password=password, owner_password="owner-" + password)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def scan_page(label: str, corner: str, size: tuple[int, int] = A4_200DPI_PX) -> Image.Image:
    """A bilevel scanned page: white, a few lines of text, and a solid black square in one
    corner ("top-left" or "bottom-right") so the page can be told apart once rendered."""
    im = Image.new("1", size, 1)
    draw = ImageDraw.Draw(im)
    w, h = size
    draw.text((w // 6, h // 3), label, fill=0, font=_font(160))
    for n in range(8):
        draw.text((w // 10, h // 2 + n * 70), f"Line {n + 1} of the scanned letter {label}.",
                  fill=0, font=_font(48))
    box = w // 5
    if corner == "top-left":
        draw.rectangle((100, 100, 100 + box, 100 + box), fill=0)
    else:
        draw.rectangle((w - 100 - box, h - 100 - box, w - 100, h - 100), fill=0)
    return im


def _set_photometric(tiff: bytes, value: int) -> bytes:
    """Rewrite PhotometricInterpretation in every IFD of a little-endian TIFF."""
    data = bytearray(tiff)
    assert data[:4] == b"II*\x00"
    offset = struct.unpack_from("<I", data, 4)[0]
    patched = 0
    while offset:
        count = struct.unpack_from("<H", data, offset)[0]
        for i in range(count):
            entry = offset + 2 + 12 * i
            tag, kind, n = struct.unpack_from("<HHI", data, entry)
            if tag == 262:
                assert (kind, n) == (3, 1)
                struct.pack_into("<H", data, entry + 8, value)
                patched += 1
        offset = struct.unpack_from("<I", data, offset + 2 + 12 * count)[0]
    assert patched, "no PhotometricInterpretation tag"
    return bytes(data)


def scanner_tiff(pages: Sequence[Image.Image], *, min_is_black: bool, dpi: int = 200) -> bytes:
    """A multi-page CCITT G4 TIFF.  Scanners and fax software write WhiteIsZero (photometric
    0, the TIFF-F convention); some write MinIsBlack (photometric 1), which decoders that
    assume fax conventions show as a negative.  Both describe the same white page here."""
    buf = io.BytesIO()
    if min_is_black:
        first, *rest = pages
        first.save(buf, "TIFF", compression="group4", save_all=True, append_images=rest,
                   dpi=(dpi, dpi))
        return buf.getvalue()
    # Pillow's own WhiteIsZero writer garbles bilevel pages; store the inverted bits as
    # MinIsBlack and relabel them, which is exactly WhiteIsZero.
    inverted = [ImageOps.invert(p.convert("L")).convert("1") for p in pages]
    first, *rest = inverted
    first.save(buf, "TIFF", compression="group4", save_all=True, append_images=rest,
               dpi=(dpi, dpi))
    return _set_photometric(buf.getvalue(), 0)


def solid_image(size: tuple[int, int], color: tuple[int, int, int], fmt: str) -> bytes:
    """A solid image with a white 2-px border, in PNG, JPEG or GIF."""
    im = Image.new("RGB", size, color)
    ImageDraw.Draw(im).rectangle((0, 0, size[0] - 1, size[1] - 1), outline=(255, 255, 255),
                                 width=2)
    if fmt == "GIF":
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def logo_png() -> bytes:
    """A small signature logo (well under the 20 kB inline-image threshold)."""
    im = Image.new("RGB", (120, 40), (0, 70, 140))
    ImageDraw.Draw(im).text((8, 10), "ACME", fill=(255, 255, 255), font=_font(20))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def docx_bytes() -> bytes:
    """A minimal Word document (OOXML zip), [Content_Types].xml first as Word writes it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml",
                   '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
                   '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
                   '<Default Extension="rels" ContentType="application/vnd.openxmlformats-'
                   'package.relationships+xml"/><Default Extension="xml" ContentType='
                   '"application/xml"/><Override PartName="/word/document.xml" ContentType='
                   '"application/vnd.openxmlformats-officedocument.wordprocessingml.document.'
                   'main+xml"/></Types>')
        z.writestr("_rels/.rels",
                   '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.'
                   'openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" '
                   'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/'
                   'officeDocument" Target="word/document.xml"/></Relationships>')
        z.writestr("word/document.xml",
                   '<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="http://schemas.'
                   'openxmlformats.org/wordprocessingml/2006/main"><w:body><w:p><w:r><w:t>'
                   'Contract</w:t></w:r></w:p></w:body></w:document>')
    return buf.getvalue()


def tnef_bytes() -> bytes:
    """The start of a winmail.dat: TNEF signature, key, then attribute records."""
    return (b"\x78\x9f\x3e\x22" + b"\x01\x00" + b"\x01\x06\x90\x08\x00\x04\x00\x00\x00"
            + b"\x00\x00\x01\x00\x01\x00" + bytes(range(256)) * 8)


def _tnef_attribute(level: int, attr_id: int, data: bytes) -> bytes:
    """One TNEF attribute record (MS-OXTNEF 2.1.3.1): level, id (type << 16 | name), length,
    the data, and its checksum (the sum of the data bytes, mod 65536)."""
    return (struct.pack("<BII", level, attr_id, len(data)) + data
            + struct.pack("<H", sum(data) & 0xFFFF))


def _mapi_string(prop_id: int, text: str) -> bytes:
    """A PT_UNICODE MAPI property in a TNEF property list (MS-OXTNEF 2.1.3.4): type and id, one
    value: its byte count, UTF-16LE with its terminator, padded to 4 bytes."""
    raw = text.encode("utf-16-le") + b"\x00\x00"
    return (struct.pack("<HHII", 0x001F, prop_id, 1, len(raw)) + raw
            + b"\x00" * (-len(raw) % 4))


def winmail_dat(files: list[tuple[str, bytes]], body: str = "") -> bytes:
    """A winmail.dat as Outlook writes one for a Rich Text mail (MS-OXTNEF): the TNEF stream
    with the message attributes (version, codepage, message class, MAPI properties with the
    plain-text body), then per file its rendering data, title, data and MAPI properties (long
    file name, MIME type). Debian's `tnef` and tnefparse read these as they read Outlook's."""
    msg, att = 0x01, 0x02
    out = struct.pack("<IH", 0x223E9F78, 0x0001)
    out += _tnef_attribute(msg, 0x00089006, struct.pack("<I", 0x00010000))  # attTnefVersion
    out += _tnef_attribute(msg, 0x00069007, struct.pack("<II", 1252, 0))  # attOemCodepage
    out += _tnef_attribute(msg, 0x00078008, b"IPM.Microsoft Mail.Note\x00")  # attMessageClass
    props = _mapi_string(0x1000, body)  # PR_BODY
    out += _tnef_attribute(msg, 0x00069003, struct.pack("<I", 1) + props)
    for name, data in files:
        rend = struct.pack("<HIHHI", 0x0001, 0xFFFFFFFF, 0xFFFF, 0xFFFF, 0x00000001)
        out += _tnef_attribute(att, 0x00069002, rend)  # attAttachRendData: a file
        short = name.encode("cp1252", "replace")[:255] + b"\x00"
        out += _tnef_attribute(att, 0x00018010, short)  # attAttachTitle
        out += _tnef_attribute(att, 0x0006800F, data)  # attAttachData
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        props = [_mapi_string(0x3707, name), _mapi_string(0x370E, mime)]  # long name, MIME tag
        out += _tnef_attribute(att, 0x00069005, struct.pack("<I", len(props)) + b"".join(props))
    return out


# ----------------------------------------------------------------------------- fax checks


@dataclass(frozen=True)
class FaxPage:
    width: float
    height: float
    text: str
    image: Image.Image  # grayscale, rendered at RENDER_SCALE

    def ink_pixels(self, threshold: int = 128) -> int:
        return self.image.point(lambda v: 255 if v < threshold else 0).histogram()[255]

    def ink_bbox_pt(self, threshold: int = 128) -> tuple[float, float, float, float] | None:
        """Bounding box of the ink in PDF points, origin bottom-left: (x0, y0, x1, y1)."""
        mask = self.image.point(lambda v: 255 if v < threshold else 0)
        box = mask.getbbox()
        if box is None:
            return None
        left, top, right, bottom = (v / RENDER_SCALE for v in box)
        return left, self.height - bottom, right, self.height - top

    def mean(self) -> float:
        hist = self.image.histogram()
        return sum(i * n for i, n in enumerate(hist)) / max(1, sum(hist))

    def region_ink(self, x0: float, y0: float, x1: float, y1: float) -> float:
        """Fraction of dark pixels in a box given as fractions of the page (origin top-left)."""
        w, h = self.image.size
        crop = self.image.crop((int(x0 * w), int(y0 * h), int(x1 * w), int(y1 * h)))
        hist = crop.point(lambda v: 255 if v < 128 else 0).histogram()
        return hist[255] / max(1, crop.width * crop.height)


RENDER_SCALE = 1.0  # 72 dpi: enough to see ink, fast


def render_pages(pdf: bytes, scale: float = RENDER_SCALE) -> list[Image.Image]:
    import pypdfium2 as pdfium

    document = pdfium.PdfDocument(pdf)
    try:
        images = []
        for index in range(len(document)):
            page = document[index]
            images.append(page.render(scale=scale, grayscale=True).to_pil().convert("L"))
            page.close()
        return images
    finally:
        document.close()


def fax_pages(pdf: bytes, paper: tuple[float, float] = LETTER) -> list[FaxPage]:
    """Check what a fax machine would print: every page portrait, on the configured paper
    (within 1 pt), not blank; returns the pages with their text and rendering."""
    assert pdf.startswith(b"%PDF-"), pdf[:20]
    reader = PdfReader(io.BytesIO(pdf))
    images = render_pages(pdf)
    assert len(images) == len(reader.pages)
    pages: list[FaxPage] = []
    for number, (page, image) in enumerate(zip(reader.pages, images, strict=True), start=1):
        box = page.cropbox
        width, height = float(box.width), float(box.height)
        if int(page.rotation or 0) % 180:
            width, height = height, width
        assert abs(width - paper[0]) <= 1 and abs(height - paper[1]) <= 1, (
            f"page {number} is {width:.1f} x {height:.1f} pt, not {paper[0]} x {paper[1]}")
        assert width < height, f"page {number} is not portrait"
        fax_page = FaxPage(width, height, page.extract_text() or "", image)
        darkest = cast(tuple[int, int], image.getextrema())[0]
        assert darkest < 128 and fax_page.ink_pixels() >= 50, \
            f"page {number} renders blank"
        pages.append(fax_page)
    return pages
