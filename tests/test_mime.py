"""MIME walking over mail in the shapes real senders produce, plus property tests.

The corpus is written out as raw MIME text (CRLF where the client uses it) rather than built
with the email API, because the damage real clients do (odd base64 lines, QP-encoded binary,
missing padding) cannot be produced through the API.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import struct
import subprocess
import zlib
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pypdf import PdfReader

from gateway.documents.body_text import html_to_text
from gateway.documents.mime import (
    KINDS,
    MimeError,
    ParsedMail,
    Part,
    detect_kind,
    parse_mail,
    read_message,
    sanitize_header_text,
)
from tests.conftest import make_pdf, smtp_send
from tests.corpus import winmail_dat


def make_tiff(width: int = 16, height: int = 16) -> bytes:
    """A valid uncompressed bilevel TIFF, as a fax scanner would send (built by hand)."""
    strip = b"\x00" * ((width + 7) // 8 * height)
    entries = [(256, 3, width), (257, 3, height), (258, 3, 1), (259, 3, 1), (262, 3, 0),
               (273, 4, 0), (277, 3, 1), (278, 3, height), (279, 4, len(strip))]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    ifd = b"".join(struct.pack("<HHII", tag, kind, 1, data_offset if tag == 273 else value)
                   for tag, kind, value in entries)
    return b"II*\x00" + struct.pack("<IH", 8, len(entries)) + ifd + struct.pack("<I", 0) + strip


def make_png(width: int = 16, height: int = 16) -> bytes:
    """A valid greyscale PNG (built by hand, so the tests need no imaging library)."""

    def chunk(name: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(name + body))
        return struct.pack(">I", len(body)) + name + body + crc

    rows = b"".join(b"\x00" + b"\xff" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


PDF = make_pdf()
PDF2 = make_pdf(2)
TIFF = make_tiff()
PNG = make_png()


def b64(data: bytes, width: int = 76) -> str:
    text = base64.b64encode(data).decode("ascii")
    return "\r\n".join(text[i : i + width] for i in range(0, len(text), width))


def qp_binary(data: bytes) -> str:
    """Quoted-printable as Outlook writes binary: every CR, LF and 8-bit byte escaped."""
    tokens = [chr(b) if 33 <= b <= 126 and b != 61 else f"={b:02X}" for b in data]
    lines, line = [], ""
    for token in tokens:
        if len(line) + len(token) > 75:
            lines.append(line + "=")
            line = ""
        line += token
    lines.append(line)
    return "\r\n".join(lines)


def mail(text: str, newline: str = "\r\n") -> bytes:
    lines = text.strip("\n").split("\n")
    return newline.join(lines).encode("utf-8", "surrogateescape") + newline.encode()


def parse(raw: bytes) -> ParsedMail:
    return parse_mail(BytesParser(policy=policy.default).parsebytes(raw))


def docs(parsed: ParsedMail) -> list[tuple[str | None, str | None]]:
    return [(p.kind, p.filename) for p in parsed.parts if not p.inline]


# --- detect_kind and sanitize_header_text --------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (PDF, "pdf"),
        (b"\r\n\r\n" + b"x" * 900 + PDF, "pdf"),  # junk before the header
        (b"x" * 1100 + PDF, None),  # too far in to be a PDF header
        (TIFF, "tiff"),
        (b"II*\x00rest", "tiff"),
        (b"MM\x00*rest", "tiff"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "jpeg"),
        (PNG, "png"),
        (b"GIF89a\x01\x00\x01\x00", "gif"),
        (b"GIF87a\x01\x00\x01\x00", "gif"),
        (b"PK\x03\x04word/document.xml", "zip"),
        (bytes.fromhex("D0CF11E0A1B11AE1") + b"\x00" * 8, "ole"),
        (bytes.fromhex("789F3E22") + b"\x00" * 8, "tnef"),
        (b"", None),
        (b"Hello, world", None),
        (b"%PD", None),
    ],
)
def test_detect_kind(data: bytes, kind: str | None) -> None:
    assert detect_kind(data) == kind


@pytest.mark.parametrize(
    ("text", "max_len", "expected"),
    [
        ("Invoice  42", 200, "Invoice 42"),
        ("a\r\nBcc: victim@example.com", 200, "a Bcc: victim@example.com"),
        ("tab\there\x00\x1b[31m", 200, "tab here [31m"),
        ("evil\u202egpj.pdf", 200, "evil gpj.pdf"),  # right-to-left override
        ("line\u2028sep", 200, "line sep"),
        ("broken \udcff byte", 200, "broken \ufffd byte"),
        ("x" * 300, 200, "x" * 197 + "..."),
        ("abcdef", 3, "abc"),
        ("   ", 200, ""),
    ],
)
def test_sanitize_header_text(text: str, max_len: int, expected: str) -> None:
    assert sanitize_header_text(text, max_len) == expected


def test_html_to_text() -> None:
    html = (
        "<html><head><title>T</title><style>p {color: red}</style></head><body>"
        "<script>alert('x')</script><p>Dear   customer,</p><div>Line one<br>Line two</div>"
        "<table><tr><td>Qty</td><td>2</td></tr><tr><td>Total</td><td>&euro;9</td></tr></table>"
        "<ul><li>first</li><li>second</li></ul><!-- comment --><![if !supportLists]>x<![endif]>"
        "</body></html>"
    )
    text = html_to_text(html)
    assert "alert" not in text and "color" not in text and "T\n" not in text
    assert text.splitlines()[:3] == ["Dear customer,", "Line one", "Line two"]
    assert "Qty\t2" in text and "Total\t\u20ac9" in text
    assert "- first" in text and "- second" in text


def test_html_to_text_survives_parser_assertion() -> None:
    assert html_to_text("<p>before</p><![ x [ <b>after</b>") == "before after"


# --- corpus: mail as real clients send it -----------------------------------------------------


def test_outlook_related_alternative_and_qp_pdf() -> None:
    raw = mail(f"""
From: "Smith, Jane" <jane.smith@example.com>
To: "+15551234567@fax.example.com" <+15551234567@fax.example.com>
Subject: =?iso-8859-1?Q?Rechnung_f=FCr_M=E4rz?=
Message-ID: <DM6PR01MB1234.namprd01.prod.outlook.com>
References: <a@example.com>
 <b@example.com>
MIME-Version: 1.0
Content-Type: multipart/mixed;
\tboundary="_005_DM6PR_"

--_005_DM6PR_
Content-Type: multipart/related;
\tboundary="_004_DM6PR_";
\ttype="multipart/alternative"

--_004_DM6PR_
Content-Type: multipart/alternative;
\tboundary="_000_DM6PR_"

--_000_DM6PR_
Content-Type: text/plain; charset="iso-8859-1"
Content-Transfer-Encoding: quoted-printable

Please fax the attached invoice.=0D
=0D
Jane Smith | ACME Gro=DFhandel

--_000_DM6PR_
Content-Type: text/html; charset="iso-8859-1"
Content-Transfer-Encoding: quoted-printable

<html><body><p>Please fax the <b>attached</b> invoice.</p><img src=3D"cid:image001.png@01D">
</body></html>

--_000_DM6PR_--

--_004_DM6PR_
Content-Type: image/png; name="image001.png"
Content-Description: image001.png
Content-Disposition: inline; filename="image001.png"; size=120
Content-ID: <image001.png@01D>
Content-Transfer-Encoding: base64

{b64(PNG)}

--_004_DM6PR_--

--_005_DM6PR_
Content-Type: application/pdf; name="Invoice 2024-03.pdf"
Content-Description: Invoice 2024-03.pdf
Content-Disposition: attachment; filename="Invoice 2024-03.pdf"
Content-Transfer-Encoding: quoted-printable

{qp_binary(PDF)}

--_005_DM6PR_--
""")
    parsed = parse(raw)
    assert [(p.kind, p.filename, p.inline, p.index) for p in parsed.parts] == [
        ("png", "image001.png", True, 1),
        ("pdf", "Invoice 2024-03.pdf", False, 2),
    ]
    # QP has no "end of data" mark: the line break before the boundary decodes as CRLF,
    # which PDF readers ignore after %%EOF.
    assert parsed.parts[1].data.rstrip(b"\r\n") == PDF.rstrip(b"\n")
    assert parsed.parts[0].data == PNG
    assert parsed.text_body == (
        "Please fax the attached invoice.\n\nJane Smith | ACME Gro\u00dfhandel"
    )
    assert parsed.subject == "Rechnung f\u00fcr M\u00e4rz"
    assert parsed.from_addr == "jane.smith@example.com"
    assert parsed.reply_to is None
    assert parsed.message_id == "<DM6PR01MB1234.namprd01.prod.outlook.com>"
    assert parsed.references == ["<a@example.com>", "<b@example.com>"]
    assert parsed.notes == []


def test_apple_mail_html_with_inline_pdf_between_html_pieces() -> None:
    raw = mail(f"""
From: Tim <tim@example.org>
Subject: Contract
Content-Type: multipart/alternative; boundary="Apple-Mail=_A"
Mime-Version: 1.0 (Mac OS X Mail 16.0)

--Apple-Mail=_A
Content-Transfer-Encoding: 7bit
Content-Type: text/plain; charset=us-ascii

Here is the contract.

Tim

--Apple-Mail=_A
Content-Type: multipart/mixed; boundary="Apple-Mail=_B"

--Apple-Mail=_B
Content-Transfer-Encoding: 7bit
Content-Type: text/html; charset=us-ascii

<html><body><div>Here is the contract.</div><div></div></body></html>
--Apple-Mail=_B
Content-Disposition: inline; filename=Contract.pdf
Content-Type: application/pdf; x-unix-mode=0644; name="Contract.pdf"
Content-Transfer-Encoding: base64

{b64(PDF)}
--Apple-Mail=_B
Content-Transfer-Encoding: 7bit
Content-Type: text/html; charset=us-ascii

<html><body><div><br></div><div>Tim</div></body></html>
--Apple-Mail=_B--

--Apple-Mail=_A--
""", newline="\n")
    parsed = parse(raw)
    assert docs(parsed) == [("pdf", "Contract.pdf")]
    assert parsed.parts[0].data == PDF
    assert parsed.text_body == "Here is the contract.\n\nTim"  # the plain alternative only


def test_apple_mail_plain_split_around_attachment() -> None:
    raw = mail(f"""
From: tim@example.org
Subject: Two
Content-Type: multipart/mixed; boundary="Apple-Mail=_C"

--Apple-Mail=_C
Content-Type: text/plain; charset=us-ascii

Before.
--Apple-Mail=_C
Content-Disposition: inline; filename=a.pdf
Content-Type: application/pdf; name="a.pdf"
Content-Transfer-Encoding: base64

{b64(PDF)}
--Apple-Mail=_C
Content-Type: text/plain; charset=us-ascii

After.
--Apple-Mail=_C--
""")
    parsed = parse(raw)
    assert docs(parsed) == [("pdf", "a.pdf")]
    assert parsed.text_body == "Before.\n\nAfter."
    assert parsed.from_addr == "tim@example.org"


def test_gmail_attachment_with_content_id_is_not_inline() -> None:
    raw = mail(f"""
MIME-Version: 1.0
From: Ann Lee <ann.lee@gmail.com>
Date: Mon, 4 Mar 2024 10:00:00 +0100
Message-ID: <CAF=abc+def@mail.gmail.com>
Subject: Fax please
To: 5551234567@fax.example.com
Content-Type: multipart/mixed; boundary="000000000000a1b2c3"

--000000000000a1b2c3
Content-Type: multipart/alternative; boundary="000000000000a1b2c1"

--000000000000a1b2c1
Content-Type: text/plain; charset="UTF-8"

Two documents attached =E2=80=94 thanks!

--000000000000a1b2c1
Content-Type: text/html; charset="UTF-8"
Content-Transfer-Encoding: quoted-printable

<div dir=3D"ltr">Two documents attached =E2=80=94 thanks!</div>

--000000000000a1b2c1--
--000000000000a1b2c3
Content-Type: application/pdf; name="first.pdf"
Content-Disposition: attachment; filename="first.pdf"
Content-Transfer-Encoding: base64
Content-ID: <f_ltb1>
X-Attachment-Id: f_ltb1

{b64(PDF)}
--000000000000a1b2c3
Content-Type: image/png; name="photo.png"
Content-Disposition: attachment; filename="photo.png"
Content-Transfer-Encoding: base64
Content-ID: <f_ltb2>
X-Attachment-Id: f_ltb2

{b64(PNG)}
--000000000000a1b2c3--
""")
    parsed = parse(raw)
    assert [(p.kind, p.filename, p.inline) for p in parsed.parts] == [
        ("pdf", "first.pdf", False),
        ("png", "photo.png", False),
    ]
    # the text/plain part is 7bit with a literal "=E2=80=94": it is not QP, so it stays
    assert parsed.text_body == "Two documents attached =E2=80=94 thanks!"
    assert parsed.message_id == "<CAF=abc+def@mail.gmail.com>"


def test_scanner_boilerplate_and_tiff_no_subject_reply_to() -> None:
    raw = mail(f"""
From: MFP-3F <scanner@printers.example.com>
Reply-To: bob@example.com
To: +15551234567@fax.example.com
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="NextPart_RICOH"

This is a multi-part message in MIME format.
--NextPart_RICOH
Content-Type: text/plain; charset=us-ascii
Content-Transfer-Encoding: 7bit

Please open the attached document. It was scanned and sent to you using a Ricoh MFP.
--NextPart_RICOH
Content-Type: image/tiff; name="20240304100000.tif"
Content-Transfer-Encoding: base64
Content-Disposition: attachment; filename="20240304100000.tif"

{b64(TIFF)}

--NextPart_RICOH--
""")
    parsed = parse(raw)
    assert docs(parsed) == [("tiff", "20240304100000.tif")]
    assert parsed.parts[0].data == TIFF
    assert parsed.subject == ""
    assert parsed.from_addr == "scanner@printers.example.com"
    assert parsed.reply_to == "bob@example.com"
    assert parsed.text_body is not None and parsed.text_body.startswith("Please open")


def test_t37_internet_fax_tiff_only() -> None:
    raw = mail(f"""
From: fax-machine@branch.example.com
To: FAX=+15551234567@fax.example.com
Subject: Internet Fax
MIME-Version: 1.0
Content-Type: image/tiff; application=faxbw
Content-Transfer-Encoding: base64

{b64(TIFF)}
""")
    parsed = parse(raw)
    assert docs(parsed) == [("tiff", None)]
    assert parsed.text_body is None


def test_iso_8859_1_text_body_without_attachment() -> None:
    body = "Bestellung f\u00fcr M\u00fcller \u2013 \u201eeilig\u201c\r\nSumme: 12,50 \u20ac\r\n"
    raw = (
        b"From: erp@example.de\r\nSubject: Bestellung\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=ISO-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + body.encode("cp1252")  # real "ISO-8859-1" mail carries Windows-1252 punctuation
    )
    parsed = parse(raw)
    assert parsed.parts == []
    assert parsed.text_body == body.replace("\r\n", "\n").strip()


def test_unlabelled_8bit_utf8_and_unknown_charset_do_not_raise() -> None:
    raw = (
        b"From: a@example.com\r\nContent-Type: text/plain; charset=x-no-such-charset\r\n"
        b"Subject: =?x-no-such-charset?Q?caf=E9?= =?utf-8?B?w6k?=\r\n\r\n"
        + "Gr\u00fc\u00dfe".encode("utf-8")
    )
    parsed = parse(raw)
    assert parsed.text_body == "Gr\u00fc\u00dfe"
    assert parsed.subject == "caf\u00e9\u00e9"
    raw = b"Content-Type: text/plain; charset=rot13\r\n\r\nuryyb"
    assert parse(raw).text_body == "uryyb"  # a codec that is not a text encoding


def test_octet_stream_pdf_without_filename() -> None:
    raw = mail(f"""
From: cron@lab.example.com
Subject: Results
Content-Type: multipart/mixed; boundary=XX

--XX
Content-Type: text/plain

Results attached.
--XX
Content-Type: application/octet-stream
Content-Transfer-Encoding: base64

{b64(PDF)}
--XX
Content-Type: application/binary

{"".join(chr(b) for b in TIFF[:4])}rest
--XX--
""")
    parsed = parse(raw)
    assert docs(parsed) == [("pdf", None), ("tiff", None)]
    assert parsed.parts[0].content_type == "application/octet-stream"
    assert parsed.parts[1].content_type == "application/binary"


def test_forwarded_message_rfc822_carrying_pdf() -> None:
    raw = mail(f"""
From: boss@example.com
Subject: Fwd: Signed contract
Content-Type: multipart/mixed; boundary=outer

--outer
Content-Type: text/plain

Please fax this on.
--outer
Content-Type: message/rfc822

From: client@example.net
Subject: Signed contract
Content-Type: multipart/mixed; boundary=inner

--inner
Content-Type: text/plain

Signed copy attached.
--inner
Content-Type: application/pdf; name=signed.pdf
Content-Disposition: attachment; filename=signed.pdf
Content-Transfer-Encoding: base64

{b64(PDF2)}
--inner--

--outer
Content-Type: application/pdf
Content-Disposition: attachment; filename=cover.pdf
Content-Transfer-Encoding: base64

{b64(PDF)}
--outer--
""")
    parsed = parse(raw)
    assert docs(parsed) == [("pdf", "signed.pdf"), ("pdf", "cover.pdf")]
    assert parsed.parts[0].data == PDF2
    assert parsed.text_body == "Please fax this on."
    assert parsed.from_addr == "boss@example.com"  # the outer sender, not the forwarded one


def test_forwarded_body_used_when_outer_has_none() -> None:
    inner = EmailMessage()
    inner["Subject"] = "Original"
    inner.set_content("The forwarded text.")
    outer = EmailMessage()
    outer["Subject"] = "Fwd: Original"
    outer.set_content(inner)
    parsed = parse_mail(outer)
    assert parsed.text_body == "The forwarded text."
    assert parsed.subject == "Fwd: Original"


def test_base64_encoded_message_rfc822_is_decoded() -> None:
    inner = mail(f"""
From: client@example.net
Content-Type: multipart/mixed; boundary=i

--i
Content-Type: text/plain

Inner text.
--i
Content-Type: application/pdf; name=inner.pdf
Content-Transfer-Encoding: base64

{b64(PDF)}
--i--
""")
    raw = mail(f"""
From: exchange@example.com
Content-Type: multipart/mixed; boundary=o

--o
Content-Type: message/rfc822
Content-Transfer-Encoding: base64

{b64(inner)}
--o--
""")
    parsed = parse(raw)
    assert docs(parsed) == [("pdf", "inner.pdf")]
    assert parsed.text_body == "Inner text."


def test_rfc2231_filename_continuations() -> None:
    raw = mail(f"""
Content-Type: multipart/mixed; boundary=B

--B
Content-Type: application/pdf;
 name*0*=utf-8''%E5%A5%91%E7%B4%84%E6%9B%B8;
 name*1*=%20final.pdf
Content-Disposition: attachment;
 filename*0*=utf-8''%E5%A5%91%E7%B4%84%E6%9B%B8;
 filename*1*=%20final.pdf
Content-Transfer-Encoding: base64

{b64(PDF)}
--B
Content-Type: application/pdf; name="=?UTF-8?B?UsOpc3Vtw6kucGRm?="
Content-Transfer-Encoding: base64

{b64(PDF)}
--B
Content-Type: application/pdf
Content-Disposition: attachment; filename="C:\\\\Users\\\\jane\\\\scan.pdf"
Content-Transfer-Encoding: base64

{b64(PDF)}
--B
Content-Type: application/pdf
Content-Disposition: attachment; filename="../../etc/scan2.pdf"
Content-Transfer-Encoding: base64

{b64(PDF)}
--B--
""")
    parsed = parse(raw)
    assert [p.filename for p in parsed.parts] == [
        "\u5951\u7d04\u66f8 final.pdf",
        "R\u00e9sum\u00e9.pdf",  # RFC 2047 in a parameter, as Outlook writes it
        "scan.pdf",  # directory dropped
        "scan2.pdf",
    ]


def test_base64_with_60_char_lines_and_missing_padding() -> None:
    data = PDF if len(PDF) % 3 else PDF + b"\n"
    encoded = base64.b64encode(data).decode().rstrip("=")
    assert len(encoded) % 4  # padding really is missing
    lines = "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60))
    raw = mail(f"""
Content-Type: multipart/mixed; boundary=B

--B
Content-Type: application/pdf; name=x.pdf
Content-Transfer-Encoding: base64

{lines}
--B
Content-Type: application/pdf; name=odd.pdf
Content-Transfer-Encoding: BASE64

{encoded[:17]}
  {encoded[17:51]}*
{encoded[51:]}
--B--
""")
    parsed = parse(raw)
    assert [p.data for p in parsed.parts] == [data, data]
    assert parsed.notes == [
        "attachment 'odd.pdf': the base64 data contains stray characters, which were skipped"
    ]


def test_base64_cut_short_is_decoded_and_reported() -> None:
    encoded = base64.b64encode(PDF).decode()
    cut = encoded[: (len(encoded) // 4 - 3) * 4 + 1]  # one character into a quantum
    raw = mail(f"""
Content-Type: application/pdf; name=cut.pdf
Content-Transfer-Encoding: base64

{cut}
""")
    parsed = parse(raw)
    assert detect_kind(parsed.parts[0].data) == "pdf"
    assert PDF.startswith(parsed.parts[0].data)
    assert parsed.notes == [
        "attachment 'cut.pdf': the base64 data is cut short or damaged;"
        " the document may be incomplete"
    ]


def test_glued_padded_base64_chunks() -> None:
    first, second = base64.b64encode(b"%PDF-1"), base64.b64encode(b".4 rest")
    head = b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    raw = head + first + second
    assert parse(raw).parts[0].data == b"%PDF-1.4 rest"


def test_winmail_dat_is_explained() -> None:
    tnef = bytes.fromhex("789F3E22") + b"\x00" * 32
    raw = mail(f"""
From: exchange-user@example.com
Content-Type: multipart/mixed; boundary=B

--B
Content-Type: text/plain

See attachment.
--B
Content-Type: application/ms-tnef; name="winmail.dat"
Content-Disposition: attachment; filename="winmail.dat"
Content-Transfer-Encoding: base64

{b64(tnef)}
--B--
""")
    parsed = parse(raw)
    assert docs(parsed) == [("tnef", "winmail.dat")]
    assert parsed.notes == ["attachment 'winmail.dat' is an Outlook winmail.dat (TNEF) with no "
                            "files in it; send the document again from a mail in HTML or "
                            "plain-text format"]


def winmail_mail(tnef: bytes) -> bytes:
    return mail(f"""
From: exchange-user@example.com
Content-Type: multipart/mixed; boundary=B

--B
Content-Type: text/plain

See attachment.
--B
Content-Type: application/ms-tnef; name="winmail.dat"
Content-Disposition: attachment; filename="winmail.dat"
Content-Transfer-Encoding: base64

{b64(tnef)}
--B--
""")


def test_winmail_dat_files_become_attachments() -> None:
    """Outlook's Rich Text mail: the PDF, the Word file and the text inside winmail.dat are
    the mail's attachments, by their long (Unicode) names; the logo Outlook shows in place
    is marked inline."""
    pdf = make_pdf(2)
    tnef = winmail_dat([("Vertrag Müller.pdf", pdf), ("Anlage.docx", b"PK\x03\x04" + b"\0" * 40),
                        ("notes.txt", "Grüße\r\n".encode("cp1252"))],
                       body="Please fax the contract.")
    parsed = parse(winmail_mail(tnef))
    assert docs(parsed) == [("pdf", "Vertrag Müller.pdf"), ("zip", "Anlage.docx"),
                            ("text", "notes.txt")]
    assert parsed.parts[0].data == pdf and parsed.parts[0].content_type == "application/pdf"
    assert parsed.parts[2].data.decode("utf-8").strip() == "Grüße"
    assert parsed.notes == []


def test_damaged_winmail_dat_is_explained() -> None:
    tnef = winmail_dat([("a.pdf", make_pdf(1))])
    cut = tnef[:30] + b"\xff" * 8  # an attribute's length runs past the end
    parsed = parse(winmail_mail(cut))
    assert [p.kind for p in parsed.parts] == ["tnef"]
    assert len(parsed.notes) == 1 and "winmail.dat" in parsed.notes[0]


@pytest.mark.skipif(shutil.which("tnef") is None, reason="Debian's tnef is not installed")
def test_winmail_dat_samples_read_as_outlooks(tmp_path) -> None:
    """The samples above are TNEF as Outlook writes it: an independent decoder (Debian's
    `tnef`, written from Outlook's files) lists the same files with the same names."""
    path = tmp_path / "winmail.dat"
    path.write_bytes(winmail_dat([("Vertrag Müller.pdf", make_pdf(1)), ("notes.txt", b"x")]))
    done = subprocess.run(["tnef", "-t", str(path)], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines() == ["Vertrag Müller.pdf\t|\tVertrag Müller.pdf",
                                                 "notes.txt\t|\tnotes.txt"]


def test_message_partial_is_explained() -> None:
    raw = mail("""
From: scanner@example.com
Subject: Scan [1/3]
Content-Type: message/partial; id="ABC@scanner"; number=1; total=3

From: scanner@example.com
Content-Type: multipart/mixed; boundary=B

--B
Content-Type: application/pdf
Content-Transfer-Encoding: base64

JVBERi0xLjQK
""")
    parsed = parse(raw)
    assert parsed.parts == []
    assert parsed.notes[0].startswith("message/partial fragments cannot be reassembled")
    assert parsed.subject == "Scan [1/3]"


def test_text_and_html_attachments_are_text_parts() -> None:
    raw = mail("""
Content-Type: multipart/mixed; boundary=B

--B
Content-Type: text/plain; charset=utf-8

The body.
--B
Content-Type: text/plain; charset=iso-8859-1
Content-Disposition: attachment; filename=notes.txt

Caf\udce9
--B
Content-Type: text/html
Content-Disposition: attachment; filename=page.html

<p>One</p><p>Two</p>
--B
Content-Type: text/calendar; method=REQUEST

BEGIN:VCALENDAR
--B--
""")
    parsed = parse(raw)
    assert [(p.kind, p.data) for p in parsed.parts] == [
        ("text", "Caf\u00e9".encode()),
        ("text", b"One\nTwo"),
    ]
    assert parsed.text_body == "The body."


def test_html_only_body_from_legacy_system() -> None:
    raw = mail("""
From: "ERP" <erp@example.com>
Content-Type: text/html; charset=windows-1252
Content-Transfer-Encoding: quoted-printable

<html><head><style>td {font: 10pt}</style></head><body>
<p>Order =9342=94 confirmed</p><table><tr><td>Item</td><td>Qty</td></tr></table>
</body></html>
""")
    parsed = parse(raw)
    assert parsed.text_body == "Order \u201c42\u201d confirmed\nItem\tQty"


def test_alternative_prefers_plain_but_skips_blank_plain() -> None:
    msg = EmailMessage()
    msg.set_content("   \n")
    msg.add_alternative("<p>Real text</p>", subtype="html")
    assert parse_mail(msg).text_body == "Real text"


def test_alternative_keeps_documents_once() -> None:
    msg = EmailMessage()
    msg.make_alternative()
    for subtype in ("plain", "html"):
        branch = EmailMessage()
        branch.set_content("see attached", subtype=subtype)
        branch.add_attachment(PDF, "application", "pdf", filename="same.pdf")
        msg.attach(branch)
    parsed = parse_mail(msg)
    assert docs(parsed) == [("pdf", "same.pdf")]
    assert parsed.text_body == "see attached"


def test_signed_mail_walks_content_and_skips_signature() -> None:
    raw = mail(f"""
Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256; boundary=S

--S
Content-Type: multipart/mixed; boundary=M

--M
Content-Type: text/plain

Signed.
--M
Content-Type: application/pdf; name=a.pdf
Content-Transfer-Encoding: base64

{b64(PDF)}
--M--

--S
Content-Type: application/pkcs7-signature; name=smime.p7s
Content-Transfer-Encoding: base64

MIAGCSqGSIb3DQEHAqCAMIACAQExDzANBglghkgBZQMEAgEFADCABgkqhkiG9w0BBwEAAKCC
--S--
""")
    parsed = parse(raw)
    assert docs(parsed) == [("pdf", "a.pdf")]
    assert parsed.notes == []


def test_encrypted_mail_is_explained() -> None:
    raw = mail("""
Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m
Content-Transfer-Encoding: base64

MIAGCSqGSIb3DQEHA6CAMIACAQAxggFQMIIBTAIBADA0MCwxKjAoBgNVBAMMIVNhbXBsZSBM
""")
    parsed = parse(raw)
    assert parsed.parts == [] and "encrypted" in parsed.notes[0]


def test_broken_boundary_is_explained() -> None:
    raw = mail("""
Content-Type: multipart/mixed; boundary=right

--wrong
Content-Type: application/pdf

%PDF-1.4
--wrong--
""")
    parsed = parse(raw)
    assert parsed.parts == [] and "boundary" in parsed.notes[0]


def test_header_injection_and_garbage_headers_are_neutralised() -> None:
    raw = mail("""
From: =?utf-8?q?Eve=0D=0ABcc=3A_x?= <eve@example.com> (comment)
Reply-To: not an address
Subject: =?utf-8?q?Hello=0D=0ABcc:_victim@example.com?=
Message-ID: no brackets here
References: <ok@x> junk <also ok@x> <fine@y>

body
""")
    parsed = parse(raw)
    assert parsed.subject == "Hello Bcc: victim@example.com"
    assert parsed.from_addr == "eve@example.com"
    assert parsed.reply_to is None
    assert parsed.message_id is None
    assert parsed.references == ["<ok@x>", "<fine@y>"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"ann@example.com via Portal" <portal@example.net>', "portal@example.net"),
        ("ann@example.com (Ann), Bob <bob@example.com>", "ann@example.com"),
        ("Ann <ann@example.com>, bob@example.com", "ann@example.com"),
        ("<ann@example.com>", "ann@example.com"),
        ("undisclosed-recipients:;", None),
        ("", None),
    ],
)
def test_from_address_extraction(value: str, expected: str | None) -> None:
    raw = f"From: {value}\r\n\r\nbody".encode()
    assert parse(raw).from_addr == expected


def test_subject_is_bounded() -> None:
    msg = EmailMessage()
    msg["Subject"] = "word " * 400
    msg.set_content("x")
    assert len(parse_mail(msg).subject) <= 998


def test_references_are_bounded_first_and_latest() -> None:
    msg = EmailMessage()
    msg["References"] = " ".join(f"<{i}@x>" for i in range(50))
    msg.set_content("x")
    refs = parse_mail(msg).references
    assert len(refs) == 20 and refs[0] == "<0@x>" and refs[-1] == "<49@x>"


def _nested(depth: int) -> EmailMessage:
    msg = EmailMessage()
    msg.add_attachment(PDF, "application", "pdf", filename="deep.pdf")
    for _ in range(depth):
        outer = EmailMessage()
        outer.make_mixed()
        outer.attach(msg)
        msg = outer
    return msg


def test_nesting_within_bound_is_walked() -> None:
    assert docs(parse_mail(_nested(15))) == [("pdf", "deep.pdf")]


def test_very_deep_nesting_is_refused() -> None:
    raw = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for i in range(1, 60):
        raw += f"--b{i - 1}\r\nContent-Type: multipart/mixed; boundary=b{i}\r\n\r\n".encode()
    with pytest.raises(MimeError, match="nested more than 20 levels"):
        parse(raw)


def test_read_message_turns_parser_stack_overflow_into_mime_error() -> None:
    raw = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for i in range(1, 1500):
        raw += f"--b{i - 1}\r\nContent-Type: multipart/mixed; boundary=b{i}\r\n\r\n".encode()
    with pytest.raises(MimeError, match="nested too deeply"):
        read_message(raw)
    small = read_message(b"Content-Type: application/pdf\r\n\r\n" + PDF)
    assert parse_mail(small).parts[0].data == PDF


def test_deep_forwarding_is_refused() -> None:
    msg = EmailMessage()
    msg.set_content("core")
    for _ in range(30):
        outer = EmailMessage()
        outer.set_content(msg)
        msg = outer
    with pytest.raises(MimeError):
        parse_mail(msg)


def test_too_many_parts_is_refused() -> None:
    msg = EmailMessage()
    msg.set_content("body")
    for i in range(12):
        msg.add_attachment(b"x", "application", "octet-stream", filename=f"{i}.bin")
    assert len(parse_mail(msg, max_parts=20).parts) == 12
    with pytest.raises(MimeError, match="more than 10 MIME parts"):
        parse_mail(msg, max_parts=10)


def test_empty_attachment_is_noted() -> None:
    msg = EmailMessage()
    msg.set_content("body")
    msg.add_attachment(b"", "application", "pdf", filename="empty.pdf")
    parsed = parse_mail(msg)
    assert parsed.notes == ["attachment 'empty.pdf' is empty"]


def test_pdf_with_junk_before_header_and_merged_pages_readable() -> None:
    data = b"\r\n\x00junk\r\n" + PDF2
    msg = EmailMessage()
    msg.add_attachment(data, "application", "pdf", filename="j.pdf")
    part = parse_mail(msg).parts[0]
    assert part.kind == "pdf"
    assert len(PdfReader(io.BytesIO(part.data)).pages) == 2


# --- property tests ------------------------------------------------------------------------

_NO_CONTROL = st.characters(blacklist_categories=("Cs", "Cc"))
_HEADER_TEXT = st.text(_NO_CONTROL, max_size=60)
_FILENAMES = st.one_of(st.none(), st.text(_NO_CONTROL, min_size=1, max_size=40))
_DOCS = st.sampled_from([PDF, TIFF, PNG, bytes.fromhex("789F3E22") + b"\x00" * 8, b"PK\x03\x04"])
_BINARY_TYPES = st.sampled_from(
    [
        ("application", "pdf"),
        ("application", "octet-stream"),
        ("application", "binary"),
        ("application", "ms-tnef"),
        ("application", "pkcs7-mime"),
        ("application", "pkcs7-signature"),
        ("image", "tiff"),
        ("image", "png"),
        ("text", "plain"),
        ("text", "html"),
        ("text", "calendar"),
        ("message", "partial"),
        ("x-weird", "thing"),
    ]
)


@st.composite
def _leaves(draw: st.DrawFn) -> EmailMessage:
    msg = EmailMessage()
    disposition = draw(st.sampled_from([None, "inline", "attachment"]))
    filename = draw(_FILENAMES)
    cid = draw(st.sampled_from([None, "<logo@x>"]))
    if draw(st.booleans()):
        msg.set_content(
            draw(st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)),
            subtype=draw(st.sampled_from(["plain", "html"])),
            cte=draw(st.sampled_from([None, "base64", "quoted-printable"])),
            disposition=disposition,
            filename=filename,
            cid=cid,
        )
    else:
        maintype, subtype = draw(_BINARY_TYPES)
        data = draw(st.one_of(st.binary(max_size=200), _DOCS))
        params = {"charset": draw(st.sampled_from(["utf-8", "koi8-r", "bogus", "rot13", "idna"]))}
        msg.set_content(
            data,
            maintype,
            subtype,
            cte=draw(st.sampled_from(["base64", "quoted-printable"])),
            disposition=disposition,
            filename=filename,
            cid=cid,
            params=params if maintype == "text" else None,
        )
    return msg


def _multipart(subtype: str, children: list[EmailMessage]) -> EmailMessage:
    msg = EmailMessage()
    msg["Content-Type"] = f"multipart/{subtype}"
    msg.set_payload(list(children))
    return msg


def _forward(child: EmailMessage) -> EmailMessage:
    msg = EmailMessage()
    msg.set_content(child)
    return msg


_TREES = st.recursive(
    _leaves(),
    lambda children: st.one_of(
        st.builds(
            _multipart,
            st.sampled_from(["mixed", "related", "alternative", "signed", "encrypted", "report"]),
            st.lists(children, max_size=4),
        ),
        st.builds(_forward, children),
    ),
    max_leaves=12,
)


def _check(parsed: ParsedMail) -> None:
    assert [p.index for p in parsed.parts] == list(range(1, len(parsed.parts) + 1))
    for part in parsed.parts:
        assert isinstance(part, Part) and part.kind in KINDS + (None,)
        assert part.filename is None or (part.filename and "\n" not in part.filename)
    headers = [parsed.subject, parsed.from_addr, parsed.reply_to, parsed.message_id]
    for text in headers + list(parsed.references):
        assert text is None or ("\r" not in text and "\n" not in text)
    assert len(parsed.subject) <= 998
    assert parsed.text_body is None or ("\r" not in parsed.text_body and parsed.text_body.strip())
    assert all("\n" not in note for note in parsed.notes)


_LIMIT_REFUSAL = re.compile(r"the message (is nested more than 20 levels deep"
                            r"|has more than 500 MIME parts)")


def _parse_totally(msg: EmailMessage, size: int) -> None:
    """parse_mail is total: a mail inside its limits is always read (never refused, never a
    crash), and with the default limits the only refusal is a limit, named in plain words.

    Every MIME entity takes at least one byte of the `size`-byte message, so limits of
    `size` can never be reached: a MimeError there is a bug, and fails the test."""
    _check(parse_mail(msg, max_depth=size, max_parts=size))
    try:
        parsed = parse_mail(msg)
    except MimeError as exc:
        assert _LIMIT_REFUSAL.fullmatch(str(exc)), exc
    else:
        _check(parsed)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TREES, _HEADER_TEXT, _HEADER_TEXT)
def test_parse_mail_total_over_generated_trees(
    tree: EmailMessage, subject: str, sender: str
) -> None:
    tree["Subject"] = subject
    tree["X-Sender-Text"] = sender
    raw = tree.as_bytes()
    for msg in (tree, BytesParser(policy=policy.default).parsebytes(raw)):
        _parse_totally(msg, len(raw) + 1)


_MIME_LINES = st.sampled_from(
    [
        "Content-Type: multipart/mixed; boundary=b",
        "Content-Type: multipart/alternative; boundary=\"b\"",
        "Content-Type: multipart/related; boundary=c",
        "Content-Type: message/rfc822",
        "Content-Type: message/partial; id=x; number=1",
        "Content-Type: message/global",
        "Content-Type: text/plain; charset=\"=?utf-8?q?x?=\"",
        "Content-Type: text/html; charset*=utf-8''%ZZ",
        "Content-Type: application/pdf; name*0*=utf-8''%E5; name*1=\"x\"",
        "Content-Type: ;;;",
        "Content-Type: text/plain; charset=utf-16",
        "Content-Disposition: attachment; filename*=bogus''%FF%FE",
        "Content-Disposition: inline; filename==?utf-8?b?====?=",
        "Content-Transfer-Encoding: base64",
        "Content-Transfer-Encoding: quoted-printable",
        "Content-Transfer-Encoding: x-uuencode",
        "Content-ID: <a@b>",
        "From: \"unterminated <a@b",
        "From: =?utf-8?b?AAAA?= <@>",
        "Reply-To: a@b, (comment <x@y>)",
        "Subject: =?bogus?X?abc?= =?utf-8?b?w6k=?=",
        "Subject: =?utf-8?q?=FF=FE?=",
        "References: <a@b> <<c@d>>",
        "Message-ID: <a@b",
        "--b",
        "--b--",
        "--c",
        "--c--",
        "",
        "",
        "JVBERi0xLjQK",
        "JVBERi0xLjQKJ",
        "begin 644 x.pdf",
        "<html><![ x [<p>x</p>",
        "=E9=\r",
        "\x00\xff",
    ]
)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=600),
        st.builds(
            lambda lines, newline: newline.join(lines).encode("utf-8", "surrogateescape"),
            st.lists(st.one_of(_MIME_LINES, st.text(max_size=20)), max_size=40),
            st.sampled_from(["\r\n", "\n"]),
        ),
    )
)
def test_parse_mail_total_over_arbitrary_bytes(raw: bytes) -> None:
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    _parse_totally(msg, len(raw) + 1)


def nested_winmail(outer: int, inner: int) -> bytes:
    """A winmail.dat of `outer` winmail.dat files of `inner` small text files each."""
    one = winmail_dat([(f"n{i}.txt", b"x") for i in range(inner)])
    return winmail_dat([(f"item{i}.dat", one) for i in range(outer)])


def test_files_inside_winmail_dat_count_toward_the_part_limit() -> None:
    """Nested winmail.dat: 20 items of 30 files each are 620 parts (the 600 files, the 20
    items): past the 500 part limit, which counts them like MIME parts."""
    raw = winmail_mail(nested_winmail(20, 30))
    with pytest.raises(MimeError) as err:
        parse(raw)
    assert str(err.value) == ("the message has more than 500 MIME parts (counting the files "
                              "inside winmail.dat)")
    # Within the limit, the files inside are the mail's attachments, as before.
    parsed = parse(winmail_mail(nested_winmail(3, 4)))
    assert [name for _kind, name in docs(parsed)] == [f"n{i}.txt" for i in range(4)] * 3


async def test_winmail_dat_past_the_part_limit_is_refused_over_smtp(make_gateway,
                                                                    tmp_path) -> None:
    """The same over SMTP: 554 5.6.0 with the reason, no job."""
    gw = await make_gateway()
    raw = winmail_mail(nested_winmail(20, 30))
    raw = raw.replace(b"exchange-user@example.com", b"alice@example.com", 1)
    reply = await smtp_send(gw.smtp.port, raw, ["15551234567@fax.local"])
    assert (reply.code, reply.text) == (554, "5.6.0 the message has more than 500 MIME parts "
                                        "(counting the files inside winmail.dat)")
    assert await gw.store.run(gw.store.jobs) == []
