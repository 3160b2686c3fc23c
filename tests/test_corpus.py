"""Issue "Any mail becomes a good fax": the end-to-end corpus.

Each case builds a mail in the shape a real client writes it (Outlook, Apple Mail, Gmail, a
copier's scan-to-email, an ERP system, a forwarded mail, ...), sends it over SMTP to a real
gateway that talks to the SignalWire simulator, and checks the PDF that SignalWire fetched from
the MediaUrl: the page count, every page portrait Letter (region US), the page order (a label
on every page), no blank page, nothing cut off; and the report mail.  Mail that cannot become a
fax must be refused with 554 5.6.0 and a reason the sender can act on.

Set FAXGW_CORPUS_SAMPLES=/some/dir to keep PNG renderings of a scanned page and a cover page.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
import unicodedata
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.header import Header
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import pytest
from pypdf import PdfReader

from gateway.daemon import Gateway
from gateway.jobs.outbound_states import State

from .conftest import (
    RelaySink,
    Simulator,
    SMTPResult,
    job_ids,
    needs,
    production_env,
    smtp_send,
    wait_state,
)
from .corpus import (
    FaxPage,
    PageSpec,
    b64,
    crlf,
    docx_bytes,
    encrypted_pdf,
    entity,
    fax_pages,
    labelled_pdf,
    logo_png,
    mail,
    multipart,
    qp_binary,
    qp_text,
    render_pages,
    scan_page,
    scanner_tiff,
    solid_image,
    tnef_bytes,
    winmail_dat,
)

log = logging.getLogger(__name__)

NUMBER = "15551234567"
DATE = "Tue, 24 Nov 2026 09:15:02 +0100"
SAMPLES = os.environ.get("FAXGW_CORPUS_SAMPLES")


def pretty(number: str) -> str:
    """How reports write a NANP number: +1 555-123-4567."""
    return f"+1 {number[1:4]}-{number[4:7]}-{number[7:]}"


def top(subject: str | None, message_id: str, *, sender: str = "Alice Example "
        "<alice@example.com>", number: str = NUMBER,
        extra: tuple[tuple[str, str], ...] = ()) -> list[tuple[str, str]]:
    headers = [("From", sender), ("To", f"<{number}@fax.local>")]
    if subject is not None:
        headers.append(("Subject", subject))
    return [*headers, ("Date", DATE), ("Message-ID", message_id), *extra]


def texts(pages: list[FaxPage]) -> list[str]:
    return [p.text for p in pages]


def assert_labels(pages: list[FaxPage], labels: list[str]) -> None:
    """Page i carries label i and no other label: right pages, right order."""
    assert len(pages) == len(labels)
    for number, (page, label) in enumerate(zip(pages, labels, strict=True), start=1):
        assert label in page.text, f"page {number} should show {label}: {page.text[:200]!r}"
        others = [other for other in labels if other != label and other in page.text]
        assert not others, f"page {number} also shows {others}"


def save_sample(pdf: bytes, index: int, name: str) -> None:
    if not SAMPLES:
        return
    Path(SAMPLES).mkdir(parents=True, exist_ok=True)
    render_pages(pdf, scale=1.5)[index].save(Path(SAMPLES) / name)


def plain_text(report: EmailMessage) -> str:
    body = report.get_body(("plain",))
    assert body is not None, "the report has no text/plain part"
    return str(body.get_content()).replace("\r\n", "\n")


@dataclass
class Faxed:
    reply: SMTPResult
    job_id: str
    report: EmailMessage
    request: dict[str, str]
    pdf: bytes
    pages: list[FaxPage]

    @property
    def report_text(self) -> str:
        return plain_text(self.report)


class Corpus:
    """A gateway with local media, reports through the relay sink, documents kept after the
    report (so the MediaUrl still answers when the test fetches it)."""

    def __init__(self, gw: Gateway, simulator: Simulator, relay: RelaySink) -> None:
        self.gw = gw
        self.simulator = simulator
        self.relay = relay

    async def send(self, raw: bytes, number: str = NUMBER) -> SMTPResult:
        return await smtp_send(self.gw.smtp.port, raw, [f"{number}@fax.local"],
                               mail_from="alice@example.com")

    async def fax(self, raw: bytes, pages: int, number: str = NUMBER) -> Faxed:
        reply = await self.send(raw, number)
        assert reply.code == 250, reply.text
        assert f"({pages} page{'s' if pages != 1 else ''})" in reply.text, reply.text
        [job_id] = job_ids(reply.text)
        report = await self.relay.next()
        await self.simulator.state.wait_idle()
        await wait_state(self.gw, job_id, State.REPORTED)
        [request] = [r for r in self.simulator.state.send_requests if r["To"] == "+" + number]
        async with aiohttp.ClientSession() as http, http.get(request["MediaUrl"]) as resp:
            assert resp.status == 200, "the MediaUrl no longer serves the document"
            assert resp.headers["Content-Type"].startswith("application/pdf")
            pdf = await resp.read()
        # SignalWire fetched exactly this and counted the same pages.
        [fetch] = [f for f in self.simulator.state.media_fetches
                   if f.url == request["MediaUrl"]]
        assert (fetch.status, fetch.num_pages) == (200, pages)
        job = await self.gw.store.run(self.gw.store.job, job_id)
        assert job is not None
        message = await self.gw.store.run(self.gw.store.message, job.message_id)
        assert message is not None
        assert Path(message.document_path).read_bytes() == pdf
        assert report["Subject"] == (f"Fax to {pretty(number)} delivered, {pages} "
                                     f"page{'s' if pages != 1 else ''}")
        return Faxed(reply, job_id, report, request, pdf, fax_pages(pdf))

    async def refuse(self, raw: bytes) -> SMTPResult:
        reply = await self.send(raw)
        assert reply.code == 554, reply.text
        assert reply.text.startswith("5.6.0 "), reply.text
        assert await self.gw.store.run(self.gw.store.jobs) == []
        assert self.simulator.state.send_requests == []
        return reply


CorpusFactory = Callable[..., Awaitable[Corpus]]


@pytest.fixture
async def corpus(make_gateway, simulator: Simulator, relay: RelaySink,
                 tmp_path: Path) -> CorpusFactory:
    async def start(**overrides: str) -> Corpus:
        env = production_env(tmp_path / "var", simulator, NOTIFY_SMTP_HOST="127.0.0.1",
                             NOTIFY_SMTP_PORT=str(relay.port), NOTIFY_SMTP_TLS="none",
                             DOCUMENT_RETENTION_HOURS="1", **overrides)
        return Corpus(await make_gateway(env), simulator, relay)

    return start


def pdf_attachment(pdf: bytes, name: str, *, disposition: str = "attachment") -> bytes:
    return entity([("Content-Type", f'application/pdf; name="{name}"'),
                   ("Content-Disposition", f'{disposition}; filename="{name}"'),
                   ("Content-Transfer-Encoding", "base64")], b64(pdf))


# ----------------------------------------------------------------------------- 1. Outlook


def outlook_mail(pdf: bytes, message_id: str) -> bytes:
    """mixed > related > alternative(plain, html) + logo, then the PDF quoted-printable."""
    plain = crlf("Hi,\n\nplease fax the attached invoice to the customer.\n\nThanks,\nAlice\n"
                 "ACME Corp. | Accounts\n")
    html = crlf('<html xmlns:o="urn:schemas-microsoft-com:office:office"><head>\n'
                '<meta http-equiv="Content-Type" content="text/html; charset=us-ascii">\n'
                '<style><!-- p.MsoNormal {margin:0cm;} --></style></head>\n'
                '<body lang="EN-US"><div class="WordSection1">\n'
                '<p class="MsoNormal">Hi,<o:p></o:p></p>\n'
                '<p class="MsoNormal">please fax the attached invoice to the customer.'
                '<o:p></o:p></p>\n<p class="MsoNormal">Thanks,<br>Alice<o:p></o:p></p>\n'
                '<p class="MsoNormal"><img width="120" height="40" id="Picture_x0020_1" '
                'src="cid:image001.png@01DB3E4A.5F2C1B30" alt="ACME"> ACME Corp. | Accounts'
                '<o:p></o:p></p>\n</div></body></html>\n')
    alternative = multipart("alternative", "----=_NextPart_002_0007_01DB3E4A.5F2C1B30", [
        entity([("Content-Type", 'text/plain;\r\n\tcharset="us-ascii"'),
                ("Content-Transfer-Encoding", "7bit")], plain),
        entity([("Content-Type", 'text/html;\r\n\tcharset="us-ascii"'),
                ("Content-Transfer-Encoding", "quoted-printable")], qp_text(html)),
    ])
    related = multipart("related", "----=_NextPart_001_0006_01DB3E4A.5F2C1B30", [
        alternative,
        entity([("Content-Type", 'image/png;\r\n\tname="image001.png"'),
                ("Content-Transfer-Encoding", "base64"),
                ("Content-ID", "<image001.png@01DB3E4A.5F2C1B30>")], b64(logo_png())),
    ], extra_params=' type="multipart/alternative";')
    document = entity([("Content-Type", 'application/pdf;\r\n\tname="Invoice 2026-118.pdf"'),
                       ("Content-Transfer-Encoding", "quoted-printable"),
                       ("Content-Disposition",
                        'attachment;\r\n\tfilename="Invoice 2026-118.pdf"')],
                      qp_binary(pdf))
    content = multipart("mixed", "----=_NextPart_000_0005_01DB3E4A.5F2C1B30",
                        [related, document],
                        preamble=b"This is a multipart message in MIME format.\r\n\r\n")
    return mail(top("Invoice 2026-118", message_id, extra=(
        ("X-Mailer", "Microsoft Outlook 16.0"),
        ("Thread-Index", "AQHbPkpfLBswHYRRoB2EUaAdhFGgHQ=="),
        ("Content-Language", "en-us"))), content)


async def test_outlook_related_alternative_logo_and_qp_pdf(corpus: CorpusFactory) -> None:
    c = await corpus()
    pdf = labelled_pdf([PageSpec("PAGE-A1"), PageSpec("PAGE-A2")])
    message_id = "<000601db3e4a$5f2c1b30$1d8451a0$@example.com>"
    faxed = await c.fax(outlook_mail(pdf, message_id), pages=2)

    # Only the PDF: no body page (there is an attachment), no page for the logo; and the
    # quoted-printable decoding is byte-exact (a Letter portrait PDF is passed through).
    assert_labels(faxed.pages, ["PAGE-A1", "PAGE-A2"])
    assert faxed.pdf == pdf
    assert faxed.request["Quality"] == "fine"

    report = faxed.report
    assert report["Subject"] == "Fax to +1 555-123-4567 delivered, 2 pages"
    assert report["In-Reply-To"] == message_id
    assert message_id in report["References"].split()
    assert report["To"] == "alice@example.com"
    assert "Invoice 2026-118.pdf" in faxed.report_text
    assert "image001.png" not in faxed.report_text


# ----------------------------------------------------------------------------- 2. Apple Mail


async def test_apple_mail_inline_pdf_between_text_parts(corpus: CorpusFactory) -> None:
    c = await corpus()
    pdf = labelled_pdf([PageSpec("PAGE-B1"), PageSpec("PAGE-B2"), PageSpec("PAGE-B3")])
    boundary = "Apple-Mail=_5B1E3A40-7C2D-4F0B-9E61-3D8A2C4B1F00"
    text = [("Content-Transfer-Encoding", "7bit"),
            ("Content-Type", "text/plain;\r\n\tcharset=us-ascii")]
    content = multipart("mixed", boundary, [
        entity(text, crlf("Hi Bob,\n\nhere is the signed contract:\n")),
        entity([("Content-Disposition", "inline;\r\n\tfilename=Contract.pdf"),
                ("Content-Type",
                 'application/pdf;\r\n\tx-unix-mode=0644;\r\n\tname="Contract.pdf"'),
                ("Content-Transfer-Encoding", "base64")], b64(pdf)),
        entity(text, crlf("\nPlease send it back signed by Friday.\n\nBest regards,\nCarol\n")),
    ])
    raw = mail(top("Signed contract", "<7F1C2B9E-3A4D-4E5F-8A6B-9C0D1E2F3A4B@example.com>",
                   sender="Carol Apple <carol@example.com>",
                   extra=(("X-Mailer", "Apple Mail (2.3826.200.121)"),)), content)
    faxed = await c.fax(raw, pages=3)
    assert_labels(faxed.pages, ["PAGE-B1", "PAGE-B2", "PAGE-B3"])
    assert "Contract.pdf" in faxed.report_text


# ----------------------------------------------------------------------------- 3. Gmail


async def test_gmail_alternative_and_rfc2231_filename(corpus: CorpusFactory) -> None:
    c = await corpus()
    pdf = labelled_pdf([PageSpec("PAGE-G1"), PageSpec("PAGE-G2")])
    alternative = multipart("alternative", "000000000000a1b2c3060a1b2c3b", [
        entity([("Content-Type", 'text/plain; charset="UTF-8"'),
                ("Content-Transfer-Encoding", "quoted-printable")],
               qp_text(crlf("Anbei die Rechnung.\n\nViele Grüße\nGünter\n", "utf-8"))),
        entity([("Content-Type", 'text/html; charset="UTF-8"'),
                ("Content-Transfer-Encoding", "quoted-printable")],
               qp_text(crlf('<div dir="ltr">Anbei die Rechnung.<div><br></div><div>Viele '
                            'Grüße</div><div>Günter</div></div>\n', "utf-8"))),
    ])
    document = entity([
        ("Content-Type", 'application/pdf; name="=?UTF-8?Q?Rechnung_=C3=BC=2Epdf?="'),
        ("Content-Disposition", "attachment; filename*=utf-8''Rechnung%20%C3%BC.pdf"),
        ("Content-Transfer-Encoding", "base64"),
        ("Content-ID", "<f_m3x9k2a10>"),
        ("X-Attachment-Id", "f_m3x9k2a10")], b64(pdf))
    content = multipart("mixed", "000000000000a1b2c5060a1b2c3d", [alternative, document])
    raw = mail(top("Rechnung", "<CAJ7v9=Qx3sZk2Lq@mail.gmail.com>",
                   sender="=?UTF-8?Q?G=C3=BCnter_Gmail?= <guenter@gmail.com>"), content)
    faxed = await c.fax(raw, pages=2)
    assert_labels(faxed.pages, ["PAGE-G1", "PAGE-G2"])
    assert faxed.report["To"] == "guenter@gmail.com"
    # The RFC 2231 name is decoded, not shown as utf-8''Rechnung%20%C3%BC.pdf.
    assert "Rechnung ü.pdf" in faxed.report_text


# ----------------------------------------------------------------------------- 4. scanner


SCANNER_BODY = ("Please open the attached document. It was scanned and sent to you using a "
                "Xerox WorkCentre.\n\nSent by: Guest [scanner@example.com]\nNumber of Images: 2\n"
                "Attachment File Type: TIFF\n\nDevice Name: XRX-7845-2F\n"
                "Device Location: 2nd floor, copy room\n\nFor more information about Xerox "
                "products and solutions, please visit http://www.xerox.com\n")


@pytest.mark.parametrize("min_is_black", [False, True], ids=["white-is-zero", "min-is-black"])
async def test_scanner_multipage_g4_tiff(corpus: CorpusFactory, min_is_black: bool) -> None:
    c = await corpus()
    tiff = scanner_tiff([scan_page("SCAN-1", "top-left"), scan_page("SCAN-2", "bottom-right")],
                        min_is_black=min_is_black)
    content = multipart("mixed", "---- =_NextPart_XRX_1732436102", [
        entity([("Content-Type", "text/plain; charset=us-ascii"),
                ("Content-Transfer-Encoding", "7bit")], crlf(SCANNER_BODY)),
        entity([("Content-Type", 'image/tiff; name="img-241124091502-0001.tif"'),
                ("Content-Transfer-Encoding", "base64"),
                ("Content-Disposition", 'attachment; filename="img-241124091502-0001.tif"')],
               b64(tiff)),
    ])
    # Copiers send as the device and sometimes without a Subject.
    subject = None if min_is_black else "Scan from XRX-7845-2F"
    raw = mail(top(subject, "<XRX0000AA1B2C3D.1732436102@xrx-7845-2f.example.com>",
                   sender='"XRX-7845-2F" <scanner@example.com>'), content)
    faxed = await c.fax(raw, pages=2)  # the boilerplate body is not a page

    first, second = faxed.pages
    for page in faxed.pages:
        # A white page with text: a negative would be mostly black.
        assert page.mean() > 200, f"page renders as a negative (mean {page.mean():.0f})"
    top_left, bottom_right = (0.05, 0.03, 0.35, 0.25), (0.6, 0.78, 0.95, 0.97)
    assert first.region_ink(*top_left) > 0.2 and first.region_ink(*bottom_right) < 0.02
    assert second.region_ink(*bottom_right) > 0.2 and second.region_ink(*top_left) < 0.02
    save_sample(faxed.pdf, 0, f"case04-scanner-tiff-{'minisblack' if min_is_black else 'g4'}"
                "-page1.png")


# ----------------------------------------------------------------------------- 5./6. legacy


async def test_legacy_iso_8859_1_body_becomes_a_page(corpus: CorpusFactory) -> None:
    c = await corpus()
    body = ("Sehr geehrte Damen und Herren,\n\n"
            "Grüße, Müller - Rechnung Nr. 42\n\n"
            "Pos  Artikel                 Menge    Betrag\n"
            "  1  Schraube M6 verzinkt      100     12,50\n"
            "  2  Mutter M6                 100      8,90\n"
            "                              Summe    21,40 EUR\n\n"
            "Zahlbar innerhalb von 14 Tagen ohne Abzug.\n")
    content = entity([("Content-Type", "text/plain; charset=ISO-8859-1"),
                      ("Content-Transfer-Encoding", "8bit")], crlf(body, "latin-1"))
    raw = mail(top("Rechnung Nr. 42", "<20261124091502.4711@erp.example.com>",
                   sender="ERP System <erp@example.com>",
                   extra=(("X-Mailer", "SAP NetWeaver 7.50"),)), content)
    faxed = await c.fax(raw, pages=1)
    text = faxed.pages[0].text
    for words in ("Sehr geehrte Damen und Herren", "Rechnung Nr. 42", "Schraube M6 verzinkt",
                  "21,40 EUR", "Zahlbar innerhalb von 14 Tagen"):
        assert words in text, words
    # Decoded as Latin-1, not as mojibake from a wrong charset guess.
    assert "Ã" not in text and "\ufffd" not in text


@pytest.mark.parametrize("label", ["windows-1252", "iso-8859-1"])
async def test_legacy_windows_1252_body_quotes_and_euro(corpus: CorpusFactory,
                                                        label: str) -> None:
    """Windows-1252 text, correctly labelled and (very common) labelled ISO-8859-1."""
    c = await corpus()
    body = ("Dear Mr. O\u2019Brien,\n\n"
            "your order \u201cPremium Support\u201d costs \u20ac 99.00 \u2013 payable within "
            "14 days.\n\nKind regards\nAccounts Receivable\n")
    content = entity([("Content-Type", f'text/plain; charset="{label}"'),
                      ("Content-Transfer-Encoding", "quoted-printable")],
                     qp_text(crlf(body, "cp1252")))
    raw = mail(top("Your order", "<a1b2c3.20261124@billing.example.com>",
                   sender="billing@example.com"), content)
    faxed = await c.fax(raw, pages=1)
    text = faxed.pages[0].text
    for words in ("Brien", "Premium Support", "99.00", "payable within 14 days",
                  "Accounts Receivable"):
        assert words in text, words
    assert "\u20ac" in text, f"the euro sign is lost: {text!r}"
    assert "\u201cPremium Support\u201d" in text
    assert "Ã" not in text and "\ufffd" not in text


async def test_legacy_html_only_body_becomes_text_page(corpus: CorpusFactory) -> None:
    c = await corpus()
    html = ("<html><body><h2>Lieferschein 7788</h2><table><tr><td>Artikel</td><td>Menge</td>"
            "</tr><tr><td>Palette Kopierpapier</td><td>3</td></tr></table>"
            "<p>Lieferung am Montag.</p></body></html>")
    content = entity([("Content-Type", "text/html; charset=iso-8859-1"),
                      ("Content-Transfer-Encoding", "quoted-printable")],
                     qp_text(html.encode("latin-1")))
    raw = mail(top("Lieferschein 7788", "<ls7788@wms.example.com>",
                   sender="wms@example.com"), content)
    faxed = await c.fax(raw, pages=1)
    text = faxed.pages[0].text
    for words in ("Lieferschein 7788", "Palette Kopierpapier", "Lieferung am Montag."):
        assert words in text, words
    assert "<td>" not in text and "<html>" not in text


# ----------------------------------------------------------------------------- 7. octet-stream


async def test_octet_stream_pdf_without_a_name(corpus: CorpusFactory) -> None:
    c = await corpus()
    pdf = labelled_pdf([PageSpec("PAGE-O1"), PageSpec("PAGE-O2")])
    content = multipart("mixed", "=_erp_boundary_4711", [
        entity([("Content-Type", "text/plain"), ("Content-Transfer-Encoding", "7bit")],
               crlf("Invoice 4711 for order 0815, generated by the billing run.\n")),
        entity([("Content-Type", "application/octet-stream"),
                ("Content-Transfer-Encoding", "base64")], b64(pdf)),
    ])
    raw = mail(top("Invoice 4711", "<4711.billing@erp.example.com>",
                   sender="erp@example.com"), content)
    faxed = await c.fax(raw, pages=2)
    assert_labels(faxed.pages, ["PAGE-O1", "PAGE-O2"])


# ----------------------------------------------------------------------------- 8. forwarded


async def test_forwarded_message_rfc822_carrying_the_pdf(corpus: CorpusFactory) -> None:
    c = await corpus()
    pdf = labelled_pdf([PageSpec("PAGE-F1"), PageSpec("PAGE-F2")])
    inner_content = multipart("mixed", "------------inner0A1B2C3D", [
        entity([("Content-Type", "text/plain; charset=UTF-8; format=flowed"),
                ("Content-Transfer-Encoding", "7bit")],
               crlf("Dear Dan,\n\nplease find our invoice 77 attached.\n\nRegards, Erin\n")),
        pdf_attachment(pdf, "Invoice 77.pdf"),
    ])
    inner = mail([("From", "Erin Vendor <erin@vendor.example>"),
                  ("To", "Dan Customer <dan@example.com>"),
                  ("Subject", "Invoice 77"), ("Date", "Mon, 23 Nov 2026 16:02:11 +0000"),
                  ("Message-ID", "<inv77@vendor.example>")], inner_content)
    content = multipart("mixed", "------------outer9F8E7D6C", [
        entity([("Content-Type", "text/plain; charset=UTF-8; format=flowed"),
                ("Content-Transfer-Encoding", "7bit")],
               crlf("Please fax the invoice in the attached mail to accounting.\n\n-- \nDan\n")),
        entity([("Content-Type", 'message/rfc822; name="Invoice 77.eml"'),
                ("Content-Disposition", 'attachment; filename="Invoice 77.eml"')], inner),
    ])
    raw = mail(top("Fwd: Invoice 77", "<fwd-inv77@example.com>",
                   sender="Dan Customer <dan@example.com>",
                   extra=(("User-Agent", "Mozilla Thunderbird"),)), content)
    faxed = await c.fax(raw, pages=2)
    assert_labels(faxed.pages, ["PAGE-F1", "PAGE-F2"])
    assert faxed.report["To"] == "dan@example.com"


# ----------------------------------------------------------------------------- 9. orientation


async def test_mixed_portrait_landscape_legal_pdf_fits_letter_uncropped(
        corpus: CorpusFactory) -> None:
    c = await corpus()
    pdf = labelled_pdf([PageSpec("PORTRAIT-1"), PageSpec("LANDSCAPE-2", 792, 612),
                        PageSpec("LEGAL-3", 612, 1008)])
    content = multipart("mixed", "b1_mixed_orientation", [
        entity([("Content-Type", "text/plain; charset=us-ascii")], crlf("Report attached.\n")),
        pdf_attachment(pdf, "report.pdf"),
    ])
    faxed = await c.fax(mail(top("Quarterly report", "<q-report@example.com>"), content),
                        pages=3)
    portrait, landscape, legal = faxed.pages
    assert_labels(faxed.pages, ["PORTRAIT-1", "LANDSCAPE-2", "LEGAL-3"])
    for page in faxed.pages:
        assert "TOP-" in page.text and "BOTTOM-" in page.text

    def near(box: tuple[float, float, float, float] | None,
             want: tuple[float, float, float, float], tol: float = 3.0) -> bool:
        return box is not None and all(abs(a - b) <= tol for a, b in zip(box, want, strict=True))

    # Each source page's frame (3..9 pt inside its edges) is whole on the fax page.
    assert near(portrait.ink_bbox_pt(), (3, 3, 609, 789)), portrait.ink_bbox_pt()
    # Landscape turned to portrait: the full frame, no scaling needed.
    assert near(landscape.ink_bbox_pt(), (3, 3, 609, 789)), landscape.ink_bbox_pt()
    # Legal shrunk to the page height (792/1008), centred across, nothing cut.
    s = 792 / 1008
    x0 = (612 - 612 * s) / 2
    assert near(legal.ink_bbox_pt(), (x0 + 3 * s, 3 * s, 612 - x0 - 3 * s, 792 - 3 * s)), \
        legal.ink_bbox_pt()
    # Its bottom line ("BOTTOM-LEGAL-3" at 20 pt above the old edge) is printed on the page.
    assert "BOTTOM-LEGAL-3" in legal.text
    band_top = 1 - (20 + 12) * s / 792
    band_bottom = 1 - (20 - 4) * s / 792
    assert legal.region_ink(0.35, band_top, 0.65, band_bottom) > 0.02


# ----------------------------------------------------------------------------- 10. images


async def test_images_of_odd_sizes_one_page_each_in_order(corpus: CorpusFactory) -> None:
    c = await corpus()
    parts = [
        entity([("Content-Type", 'image/png; name="tall.png"'),
                ("Content-Disposition", 'attachment; filename="tall.png"'),
                ("Content-Transfer-Encoding", "base64")],
               b64(solid_image((300, 3000), (0, 0, 0), "PNG"))),
        entity([("Content-Type", 'image/jpeg; name="wide.jpg"'),
                ("Content-Disposition", 'attachment; filename="wide.jpg"'),
                ("Content-Transfer-Encoding", "base64")],
               b64(solid_image((3000, 300), (100, 100, 100), "JPEG"))),
        entity([("Content-Type", 'image/gif; name="photo.gif"'),
                ("Content-Disposition", 'attachment; filename="photo.gif"'),
                ("Content-Transfer-Encoding", "base64")],
               b64(solid_image((640, 480), (0, 0, 0), "GIF"))),
    ]
    content = multipart("mixed", "images_b0undary", [
        entity([("Content-Type", "text/plain; charset=us-ascii")], crlf("Photos attached.\n")),
        *parts,
    ])
    faxed = await c.fax(mail(top("Photos", "<photos@example.com>"), content), pages=3)
    tall, wide, gif = faxed.pages

    def box_size(page: FaxPage) -> tuple[float, float]:
        box = page.ink_bbox_pt(threshold=200)
        assert box is not None
        return box[2] - box[0], box[3] - box[1]

    def darkness(page: FaxPage) -> float:
        box = page.ink_bbox_pt(threshold=200)
        assert box is not None
        inner = page.image.crop((int(box[0]) + 4, int(page.height - box[3]) + 4,
                                 int(box[2]) - 4, int(page.height - box[1]) - 4))
        hist = inner.histogram()
        return sum(i * n for i, n in enumerate(hist)) / max(1, sum(hist))

    # 300x3000 px at 72 dpi, fitted into the 756 pt printable height: a narrow strip.
    w, h = box_size(tall)
    assert h > 700 and w < 90, (w, h)
    assert darkness(tall) < 40
    # 3000x300 turned to portrait shows it larger: the same narrow strip, but grey.
    w, h = box_size(wide)
    assert h > 700 and w < 90, (w, h)
    assert 70 < darkness(wide) < 130
    # 640x480 turned to portrait at its own size (480x640 pt).
    w, h = box_size(gif)
    assert abs(w - 480) < 8 and abs(h - 640) < 8, (w, h)
    assert darkness(gif) < 40


# ----------------------------------------------------------------------------- 11. options


async def test_subject_tags_cover_page_and_quality_header(corpus: CorpusFactory) -> None:
    c = await corpus()
    pdf = labelled_pdf([PageSpec("PAGE-C1"), PageSpec("PAGE-C2")])
    content = multipart("mixed", "tags_boundary", [
        entity([("Content-Type", "text/plain; charset=us-ascii")],
               crlf("Attention: Dr. Smith, accounts payable. NOTE-MARKER\n")),
        pdf_attachment(pdf, "invoice.pdf"),
    ])
    raw = mail(top("[superfine] [cover] Invoice", "<tags-1@example.com>"), content)
    faxed = await c.fax(raw, pages=3)
    assert faxed.request["Quality"] == "superfine"

    cover, *document = faxed.pages
    assert_labels(document, ["PAGE-C1", "PAGE-C2"])
    assert "FAX" in cover.text and "PAGE-C" not in cover.text
    assert "Invoice" in cover.text
    assert "[superfine]" not in cover.text and "[cover]" not in cover.text
    assert "+15551234567" in cover.text or "555-123-4567" in cover.text
    assert "alice@example.com" in cover.text
    assert "3 (including this cover page)" in cover.text
    assert "NOTE-MARKER" in cover.text  # the mail's own words go on the cover
    save_sample(faxed.pdf, 0, "case11-cover-page1.png")

    assert "[" not in faxed.report["Subject"]
    assert "  Subject:       Invoice\n" in faxed.report_text

    # X-Fax-Quality header; no cover without the tag.
    content = multipart("mixed", "tags_boundary2", [
        entity([("Content-Type", "text/plain; charset=us-ascii")], crlf("Second copy.\n")),
        pdf_attachment(pdf, "invoice.pdf"),
    ])
    raw = mail(top("Invoice copy", "<tags-2@example.com>", number="15551234568",
                   extra=(("X-Fax-Quality", "standard"),)), content)
    faxed = await c.fax(raw, pages=2, number="15551234568")
    assert faxed.request["Quality"] == "standard"
    assert_labels(faxed.pages, ["PAGE-C1", "PAGE-C2"])


# ----------------------------------------------------------------------------- 12. FAX_BODY


async def test_body_always_puts_the_text_page_first(corpus: CorpusFactory) -> None:
    c = await corpus(FAX_BODY="always")
    pdf = labelled_pdf([PageSpec("PAGE-E1"), PageSpec("PAGE-E2")])
    content = multipart("mixed", "body_always", [
        entity([("Content-Type", "text/plain; charset=us-ascii")],
               crlf("BODY-MARKER: for Dr. Smith, room 4. Two pages follow.\n")),
        pdf_attachment(pdf, "lab-results.pdf"),
    ])
    faxed = await c.fax(mail(top("Lab results", "<body-always@example.com>"), content),
                        pages=3)
    body, *document = faxed.pages
    assert "BODY-MARKER" in body.text and "PAGE-E" not in body.text
    assert "Lab results" in body.text  # the subject heads the text page
    assert_labels(document, ["PAGE-E1", "PAGE-E2"])


# ----------------------------------------------------------------------------- 13-15. refusals


@pytest.mark.skipif(shutil.which("soffice") is not None,
                    reason="LibreOffice is installed: office files are converted")
async def test_docx_only_without_libreoffice_is_refused(corpus: CorpusFactory) -> None:
    c = await corpus()
    content = multipart("mixed", "docx_only", [
        entity([("Content-Type", "text/plain; charset=us-ascii")],
               crlf("Please fax the attached contract to the notary.\n")),
        entity([("Content-Type", ("application/vnd.openxmlformats-officedocument."
                                  'wordprocessingml.document; name="Vertrag.docx"')),
                ("Content-Disposition", 'attachment; filename="Vertrag.docx"'),
                ("Content-Transfer-Encoding", "base64")], b64(docx_bytes())),
    ])
    reply = await c.refuse(mail(top("Contract", "<docx@example.com>"), content))
    assert "office document" in reply.text.lower()
    assert "Vertrag.docx" in reply.text


def winmail_mail(body: str, tnef: bytes | None = None) -> bytes:
    content = multipart("mixed", "----=_NextPart_000_0012_01DB3E4A.5F2C1B30", [
        entity([("Content-Type", 'text/plain;\r\n\tcharset="us-ascii"'),
                ("Content-Transfer-Encoding", "7bit")], crlf(body)),
        entity([("Content-Type", 'application/ms-tnef;\r\n\tname="winmail.dat"'),
                ("Content-Transfer-Encoding", "base64"),
                ("Content-Disposition", 'attachment;\r\n\tfilename="winmail.dat"')],
               b64(tnef if tnef is not None else tnef_bytes())),
    ])
    return mail(top("Contract", "<000101db3e4a$tnef$@example.com>",
                    extra=(("X-Mailer", "Microsoft Outlook 16.0"),)), content)


async def test_winmail_dat_only_is_refused_with_an_explanation(corpus: CorpusFactory) -> None:
    c = await corpus()
    reply = await c.refuse(winmail_mail("\n"))
    assert "winmail.dat" in reply.text


async def test_winmail_dat_with_covering_text_tells_the_sender(corpus: CorpusFactory) -> None:
    """Outlook in RTF mode: the user's text in the body, the document inside winmail.dat.
    Faxing the covering note alone must not pass for delivering the document: refuse, or at
    least say in the report that winmail.dat was not faxed."""
    c = await corpus()
    raw = winmail_mail("Hello,\n\nplease fax the attached contract to the Smith office.\n\n"
                       "Regards,\nBob\n")
    reply = await c.send(raw)
    if reply.code == 250:
        assert "winmail.dat" in plain_text(await c.relay.next())
    else:
        assert reply.code == 554 and "winmail.dat" in reply.text, reply.text


async def test_winmail_dat_carrying_a_pdf_is_faxed(corpus: CorpusFactory) -> None:
    """Outlook in Rich Text mode packs the PDF into winmail.dat: the PDF inside is faxed, and
    the covering note in the body is not (as for any mail with an attachment)."""
    c = await corpus()
    body = "Hello,\n\nplease fax the attached contract to the Smith office.\n\nRegards,\nBob\n"
    pdf = labelled_pdf([PageSpec("PAGE-W1"), PageSpec("PAGE-W2"), PageSpec("PAGE-W3")])
    tnef = winmail_dat([("Vertrag Müller.pdf", pdf)], body=body)
    faxed = await c.fax(winmail_mail(body, tnef), pages=3)
    assert ["PAGE-W1" in faxed.pages[0].text, "PAGE-W2" in faxed.pages[1].text,
            "PAGE-W3" in faxed.pages[2].text] == [True, True, True]
    assert "Smith office" not in " ".join(p.text for p in faxed.pages)


async def test_encrypted_pdf_is_refused(corpus: CorpusFactory) -> None:
    c = await corpus()
    content = multipart("mixed", "encrypted_pdf", [
        entity([("Content-Type", "text/plain; charset=us-ascii")],
               crlf("Here is the medical report you asked for.\n")),
        pdf_attachment(encrypted_pdf(), "Befund.pdf"),
    ])
    reply = await c.refuse(mail(top("Befund", "<enc@example.com>"), content))
    assert "password-protected" in reply.text
    assert "Befund.pdf" in reply.text


# ---------------------------------------------------------------------- scripts (issue 15, item 7)

CHINESE, RUSSIAN, GREEK, ARABIC = ("发票已付款", "Счёт оплачен", "Το τιμολόγιο πληρώθηκε",
                                   "تم دفع الفاتورة")


def pdf_fonts(pdf: bytes) -> set[str]:
    """The BaseFont names of every font the pages use (embedded subsets carry a tag prefix)."""
    reader = PdfReader(io.BytesIO(pdf))
    names: set[str] = set()
    for page in reader.pages:
        for font in page["/Resources"]["/Font"].values():
            names.add(str(font.get_object()["/BaseFont"]).lstrip("/").split("+")[-1])
    return names


def has_words(text: str, word: str) -> bool:
    """The word is there, whether the extractor gives right-to-left runs in logical or
    drawing order; Arabic presentation forms count as their letters (NFKC)."""
    folded = unicodedata.normalize("NFKC", text)
    return word in folded or word[::-1] in folded


def utf8_text(text: str) -> bytes:
    return entity([("Content-Type", "text/plain; charset=utf-8"),
                   ("Content-Transfer-Encoding", "base64")], b64(text.encode("utf-8")))


async def test_scripts_in_body_and_cover_subject_are_faxed_legibly(corpus: CorpusFactory) -> None:
    """Chinese, Cyrillic, Greek and Arabic used to be faxed as '?' with a clean report."""
    c = await corpus()
    subject = Header(f"[cover] {RUSSIAN} {CHINESE} {ARABIC}", "utf-8").encode()
    body = f"{CHINESE}\n{RUSSIAN}\n{GREEK}\n{ARABIC}\n"
    faxed = await c.fax(mail(top(subject, "<scripts@example.com>"), utf8_text(body)), 2)
    cover, text_page = faxed.pages
    for word in (RUSSIAN, CHINESE, ARABIC.split()[-1]):
        assert has_words(cover.text, word), (word, cover.text)
    for word in (CHINESE, RUSSIAN, GREEK, ARABIC.split()[-1]):
        assert has_words(text_page.text, word), (word, text_page.text)
    assert "?" not in cover.text + text_page.text
    # Arabic letters are drawn in their joined (presentation) forms, not as isolated letters.
    assert any("\ufe70" <= ch <= "\ufeff" for ch in text_page.text)
    assert {"WenQuanYiMicroHei-0", "DejaVuSansMono-Bold", "DejaVuSans-Bold",
            "DejaVuSans"} <= pdf_fonts(faxed.pdf)
    # Ink where each line is (40 pt margin, 11 pt type on 13 pt leading, the header takes two
    # lines): the Arabic line, which reads right to left, is set flush right.
    baselines = [792 - 40 - 11 - 26 - 13 * i for i in range(4)]
    lines = [((792 - y - 9) / 792, (792 - y + 2) / 792) for y in baselines]
    for top_f, bottom_f in lines[:3]:
        assert text_page.region_ink(0.05, top_f, 0.3, bottom_f) > 0.02
    arabic_top, arabic_bottom = lines[3]
    assert text_page.region_ink(0.7, arabic_top, 0.95, arabic_bottom) > 0.02
    assert text_page.region_ink(0.05, arabic_top, 0.5, arabic_bottom) == 0
    assert "could not be printed" not in faxed.report_text


async def test_a_character_no_font_has_is_named_in_the_report(corpus: CorpusFactory) -> None:
    c = await corpus()
    body = "Ancient order: \U00013000 and \U00013001 twice \U00013000, the rest is fine.\n"
    faxed = await c.fax(mail(top("Hieroglyphs", "<glyph@example.com>"), utf8_text(body)), 1)
    assert "the rest is fine" in faxed.pages[0].text
    report = " ".join(faxed.report_text.split())
    assert ("2 character(s) could not be printed and were faxed as '?': \U00013000 (U+13000) "
            "\U00013001 (U+13001)") in report, report
    assert report.index("Some characters of your text could not be printed") < \
        report.index("Details")


async def test_text_body_over_the_limit_is_refused_with_554_and_a_mail(
        corpus: CorpusFactory) -> None:
    """It used to be '500 Error: (ConvertError)' and a traceback (issue 15, item 8)."""
    c = await corpus()
    body = ("A line of a very long legacy report that nobody should fax. " * 4 + "\n") * 900
    assert len(body) > 200_000
    reply = await c.refuse(mail(top("Huge report", "<huge@example.com>"), utf8_text(body)))
    assert reply.text.startswith("5.6.0 The message text is too long to fax ("), reply.text
    refusal = await c.relay.next()
    assert "not sent" in str(refusal["Subject"])
    assert "too long to fax" in plain_text(refusal)


async def test_an_empty_pdf_attachment_is_refused_without_contradiction(
        corpus: CorpusFactory) -> None:
    c = await corpus()
    content = multipart("mixed", "empty_pdf", [
        entity([("Content-Type", "text/plain; charset=us-ascii")],
               crlf("Please open the attached document.\n")),
        pdf_attachment(b"", "scan.pdf"),
    ])
    reply = await c.refuse(mail(top("Scan", "<empty@example.com>"), content))
    assert "attachment 'scan.pdf' is empty" in reply.text
    assert "not a document" not in reply.text, reply.text


# ----------------------------------------------------------------------------- LibreOffice

OFFICE_TYPES = {
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "odt": "application/vnd.oasis.opendocument.text",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}


def real_docx() -> bytes:
    import docx  # python-docx, a test dependency

    document = docx.Document()
    document.add_heading("Lease agreement 2026-77", level=1)
    document.add_paragraph("Page one of the lease, written in Word.")
    document.add_page_break()
    document.add_paragraph("Page two: signatures. Подпись")
    buf = io.BytesIO()
    document.save(buf)
    return buf.getvalue()


def real_xlsx() -> bytes:
    import openpyxl  # a test dependency

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Prices"
    sheet.append(["Item", "Quantity", "Price"])
    sheet.append(["Toner cartridge", 3, 89.5])
    sheet.append(["Paper A4", 10, 4.25])
    sheet["A5"] = "Total"
    sheet["C5"] = "=SUM(C2:C3)"  # LibreOffice computes it: 93.75
    sheet.column_dimensions["A"].width = 30
    buf = io.BytesIO()
    book.save(buf)
    return buf.getvalue()


def real_odt() -> bytes:
    """An OpenDocument text as LibreOffice writes it: 'mimetype' first and stored."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(zipfile.ZipInfo("mimetype"), "application/vnd.oasis.opendocument.text",
                   compress_type=zipfile.ZIP_STORED)
        z.writestr("META-INF/manifest.xml",
                   '<?xml version="1.0" encoding="UTF-8"?><manifest:manifest xmlns:manifest='
                   '"urn:oasis:names:tc:opendocument:xmlns:manifest:1.0" manifest:version="1.2">'
                   '<manifest:file-entry manifest:full-path="/" manifest:media-type='
                   '"application/vnd.oasis.opendocument.text"/><manifest:file-entry '
                   'manifest:full-path="content.xml" manifest:media-type="text/xml"/>'
                   '</manifest:manifest>')
        z.writestr("content.xml",
                   '<?xml version="1.0" encoding="UTF-8"?><office:document-content xmlns:office='
                   '"urn:oasis:names:tc:opendocument:xmlns:office:1.0" xmlns:text="urn:oasis:'
                   'names:tc:opendocument:xmlns:text:1.0" office:version="1.2"><office:body>'
                   '<office:text><text:h text:outline-level="1">Meeting minutes</text:h>'
                   '<text:p>Written in LibreOffice Writer, faxed by faxgw.</text:p>'
                   '</office:text></office:body></office:document-content>')
    return buf.getvalue()


@needs(shutil.which("soffice") is not None, "LibreOffice (soffice); .ci/run installs it")
@pytest.mark.parametrize(("kind", "build", "pages", "words"), [
    ("docx", real_docx, 2, [["Lease agreement 2026-77", "Page one of the lease"],
                            ["Page two: signatures.", "Подпись"]]),
    ("odt", real_odt, 1, [["Meeting minutes", "Written in LibreOffice Writer"]]),
    ("xlsx", real_xlsx, 1, [["Toner cartridge", "Paper A4", "Total 93.75"]]),
])
async def test_real_office_files_are_converted_by_libreoffice(
        corpus: CorpusFactory, kind: str, build: Callable[[], bytes], pages: int,
        words: list[list[str]]) -> None:
    c = await corpus(DOC_TIMEOUT_SECONDS="120")
    name = f"document.{kind}"
    content = multipart("mixed", f"office_{kind}", [
        entity([("Content-Type", "text/plain; charset=us-ascii")],
               crlf("Please fax the attached file.\n")),
        entity([("Content-Type", f'{OFFICE_TYPES[kind]}; name="{name}"'),
                ("Content-Disposition", f'attachment; filename="{name}"'),
                ("Content-Transfer-Encoding", "base64")], b64(build())),
    ])
    started = time.perf_counter()
    faxed = await c.fax(mail(top(f"Office {kind}", f"<{kind}@example.com>"), content), pages)
    log.info("%s faxed through LibreOffice in %.1f s", kind, time.perf_counter() - started)
    for page, expected in zip(faxed.pages, words, strict=True):
        flat = " ".join(page.text.split())
        for word in expected:
            assert word in flat, (word, flat)
    assert name in faxed.report_text
