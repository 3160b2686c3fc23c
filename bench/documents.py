"""Test documents and the mail around them: noise-image PDFs of a chosen size (reportlab),
wrapped in a MIME message the way a scanner would send it.

Random noise does not compress, so the PDF's size is the image's size: a ~100 KB one-page
fax, a ~2 MB scan, a ~20 MB scan.
"""

from __future__ import annotations

import io
import math
import os
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

TO_PLACEHOLDER = "+19999999999"


def noise_pdf(size_bytes: int, seed_text: str = "faxgw bench") -> bytes:
    """A one-page Letter PDF of about `size_bytes`: a typed letter with a grey random-noise
    "photo" in a 2.5-inch box. The noise makes the size (it does not compress); keeping it in
    a box makes the page, and the thumbnail in the report mail, look like a real letter
    rather than a page of static (a full-page noise thumbnail is ~110 KB of PNG)."""
    from PIL import Image
    from reportlab import rl_config  # type: ignore[import-untyped]
    from reportlab.lib.pagesizes import letter  # type: ignore[import-untyped]
    from reportlab.lib.utils import ImageReader  # type: ignore[import-untyped]
    from reportlab.pdfgen import canvas  # type: ignore[import-untyped]

    rl_config.useA85 = 0  # binary streams: no ASCII85 inflation of the image
    pixels = max(1000, size_bytes - 4000)
    side = max(32, int(math.sqrt(pixels)))
    image = Image.frombytes("L", (side, pixels // side), os.urandom(side * (pixels // side)))
    out = io.BytesIO()
    page = canvas.Canvas(out, pagesize=letter)
    page.drawImage(ImageReader(image), 360, 520, width=180, height=180)
    page.setFont("Helvetica-Bold", 16)
    page.drawString(72, 720, seed_text)
    page.setFont("Helvetica", 11)
    body = ("Please find below the figures we discussed on the phone this morning; the "
            "signed copy follows by post.")
    for line in range(34):  # the first 10 lines run beside the photo, so they are shorter
        y, width = (680 - line * 16, 35) if line < 10 else (480 - (line - 10) * 16, 95)
        page.drawString(72, y, f"{line + 1:2d}. {body[: width - (line * 7) % 20]}")
    page.showPage()
    page.save()
    return out.getvalue()


def mail_bytes(pdf: bytes, *, to: str = TO_PLACEHOLDER, domain: str = "fax.local",
               sender: str = "scanner@example.com", filename: str = "scan.pdf") -> bytes:
    """The message as sent on the wire: CRLF line ends, base64 PDF attachment, no dot-stuffing."""
    msg = EmailMessage()
    msg["From"] = f"Office Scanner <{sender}>"
    msg["To"] = f"{to}@{domain}"
    msg["Subject"] = "Scan to fax"
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = "<bench-scan@example.com>"
    msg.set_content("Scanned document attached.\n")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename=filename)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def write_documents(root: Path, sizes: dict[str, int]) -> dict[str, dict[str, object]]:
    """For each label: the PDF, the CRLF message (for our client) and an LF copy (for
    Postfix's smtp-source -F, which appends CRLF to every line itself)."""
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, object]] = {}
    for label, size in sizes.items():
        pdf = noise_pdf(size)
        message = mail_bytes(pdf)
        pdf_path = root / f"{label}.pdf"
        mail_path = root / f"{label}.eml"
        lf_path = root / f"{label}.lf.eml"
        pdf_path.write_bytes(pdf)
        mail_path.write_bytes(message)
        lf_path.write_bytes(message.replace(b"\r\n", b"\n"))
        out[label] = {"pdf_bytes": len(pdf), "message_bytes": len(message),
                      "pdf": str(pdf_path), "mail": str(mail_path), "mail_lf": str(lf_path)}
    return out
